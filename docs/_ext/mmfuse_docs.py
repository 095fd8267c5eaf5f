"""Sphinx directives of the mmfuse docs: numbers computed at build time, never typed by hand.

``.. mmfuse-exec::``
    Run the Python code of the directive's body at build time and show the code, then what it
    printed.  All blocks of one page share a namespace (top to bottom), so a worked example can
    be split into steps.  An exception fails the build.  ``:hide-code:`` shows only the output.

``.. mmfuse-support-table::``
    The table of operators x backends, generated from :func:`mmfuse.backends.available` (and,
    for optional backends that cannot load on the build machine, from the ``__all__`` of their
    module, read without importing it).

``.. mmfuse-benchmark:: NAME``
    The table of ``docs/performance/NAME.json``, the file written by
    ``python benchmarks/NAME.py --json docs/performance/NAME.json``, with the machine it was
    measured on; a note saying how to produce it when the file does not exist.

``.. mmfuse-markdown:: PATH``
    A small Markdown file (headings, paragraphs, lists nested by indentation, pipe tables, inline code and bold;
    e.g. ``benchmarks/RESULTS.md``) included as reStructuredText.

``plot_benchmark(name)``
    Helper for ``.. plot::`` blocks: a bar chart of one benchmark file (nothing if absent).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import traceback
from typing import Any, ClassVar

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective

HERE = os.path.dirname(os.path.abspath(__file__))
DOCS = os.path.dirname(HERE)
ROOT = os.path.dirname(DOCS)
PERF = os.path.join(DOCS, "performance")

BACKEND_ORDER = ("array_api", "reference", "torch", "numba", "cupy", "triton")
BACKEND_NOTES = {
    "array_api": "the Array-API core: any namespace (NumPy, torch, CuPy, JAX, Dask, ...)",
    "reference": "mmfuse.reference: NumPy float64 loops, the oracle; copies to NumPy and back",
    "torch": "torch.library custom ops with analytic backward; torch tensors (CPU or CUDA)",
    "numba": "numba-cuda kernels; CUDA arrays (CuPy, torch CUDA)",
    "cupy": "cuBLAS + fused CuPy kernels; CuPy arrays",
}


def _rst_block(directive: SphinxDirective, lines: list[str]) -> list[nodes.Node]:
    """Parse generated reStructuredText lines into nodes at the directive's place."""
    container = nodes.container()
    source = directive.get_source_info()[0] or "<mmfuse-docs>"
    directive.state.nested_parse(StringList(lines, source=source), directive.content_offset, container)
    return list(container.children)


def _list_table(header: list[str], rows: list[list[str]], *, widths: str | None = None) -> list[str]:
    out = [".. list-table::", "   :header-rows: 1"]
    if widths:
        out.append(f"   :widths: {widths}")
    out.append("")
    for row in [header, *rows]:
        for k, cell in enumerate(row):
            cell = str(cell) if str(cell) else r"\ "
            out.append(("   * - " if k == 0 else "     - ") + cell)
    out.append("")
    return out


# --------------------------------------------------------------------------- exec


class ExecDirective(SphinxDirective):
    """Run code at build time; show it and its printed output."""

    has_content = True
    option_spec: ClassVar[dict[str, Any]] = {"hide-code": directives.flag, "hide-output": directives.flag}

    def run(self) -> list[nodes.Node]:
        code = "\n".join(self.content)
        # temp_data lives while one document is read: one namespace per page, top to bottom
        namespace = self.env.temp_data.setdefault("mmfuse_exec_namespace", {"__name__": "__mmfuse_docs__"})
        buffer = io.StringIO()
        try:
            with contextlib.redirect_stdout(buffer):
                exec(compile(code, f"<{self.env.docname}: mmfuse-exec>", "exec"), namespace)
        except Exception:
            raise self.error(
                "mmfuse-exec: the code raised\n" + traceback.format_exc(limit=-3)
            ) from None
        result: list[nodes.Node] = []
        if "hide-code" not in self.options:
            block = nodes.literal_block(code, code, language="python")
            block["classes"].append("mmfuse-exec-code")
            result.append(block)
        text = buffer.getvalue().rstrip("\n")
        if text and "hide-output" not in self.options:
            out = nodes.literal_block(text, text, language="none")
            out["classes"].append("mmfuse-exec-output")
            result.append(out)
        return result


# --------------------------------------------------------------------------- support table


def support_table() -> tuple[list[str], list[list[str]], dict[str, str]]:
    """(header, rows, reasons) of the operator x backend table: the registry's static table,
    with the backends this build machine could not load marked."""
    import mmfuse.backends as backends
    from mmfuse.backends._table import ROWS

    missing = backends.unavailable()
    table: dict[str, set[str]] = {}
    for row in ROWS:
        table.setdefault(row.op, set()).add(row.backend)
    ops = sorted(table)
    names = [b for b in BACKEND_ORDER if any(b in v for v in table.values())]
    names += sorted({b for v in table.values() for b in v} - set(names))
    rows = []
    for op in ops:
        row = [f":func:`~mmfuse.{op}`"]
        for b in names:
            if b in table[op]:
                row.append("yes [#notloaded]_" if b in missing else "yes")
            else:
                row.append("--")
        rows.append(row)
    header = ["operator", *[f"``{b}``" for b in names]]
    return header, rows, missing


class SupportTableDirective(SphinxDirective):
    has_content = False

    def run(self) -> list[nodes.Node]:
        header, rows, missing = support_table()
        lines = _list_table(header, rows)
        if missing:
            lines += [
                ".. [#notloaded] Registered by its module, which could not be imported on the "
                "machine that built these pages (" + "; ".join(
                    f"``{b}``: {reason}" for b, reason in sorted(missing.items())
                ) + "); the operator list is read from the module's ``__all__``.",
                "",
            ]
        return _rst_block(self, lines)


# --------------------------------------------------------------------------- benchmarks


def load_benchmark(name: str) -> dict[str, Any] | None:
    path = os.path.join(PERF, f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _fmt(value: Any) -> str:
    if value is None:
        return "--"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) < 1e-3 or abs(value) >= 1e6:
            return f"{value:.1e}"
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_fmt(v) for v in value) + ")"
    return str(value).replace("|", "/")


def benchmark_rows(data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """A table of the ``results`` list: time in ms, speed relative to the case's fastest."""
    results = list(data.get("results", []))
    keys: list[str] = []
    for r in results:
        keys += [k for k in r if k not in keys]
    fastest: dict[Any, float] = {}
    for r in results:
        if isinstance(r.get("seconds"), (int, float)):
            case = r.get("case")
            fastest[case] = min(fastest.get(case, float("inf")), float(r["seconds"]))
    header: list[str] = []
    for k in keys:
        if k == "seconds":
            header += ["ms", "x fastest"]
        else:
            header.append(k.replace("_", " "))
    rows = []
    for r in results:
        row = []
        for k in keys:
            v = r.get(k)
            if k == "seconds":
                row.append(_fmt(None if v is None else float(v) * 1e3))
                best = fastest.get(r.get("case"))
                row.append(_fmt(None if v is None or not best else float(v) / best))
            else:
                row.append(_fmt(v))
        rows.append(row)
    return header, rows


class BenchmarkDirective(SphinxDirective):
    required_arguments = 1
    has_content = False

    def run(self) -> list[nodes.Node]:
        name = self.arguments[0]
        path = os.path.join(PERF, f"{name}.json")
        self.env.note_dependency(path)
        data = load_benchmark(name)
        command = f"python benchmarks/{name}.py --json docs/performance/{name}.json"
        if data is None:
            lines = [
                ".. note::",
                "",
                f"   Not measured yet for these pages: ``docs/performance/{name}.json`` does not "
                "exist.  Produce it with",
                "",
                "   .. code-block:: console",
                "",
                f"      $ {command}",
                "",
            ]
            return _rst_block(self, lines)
        lines = [f"**Machine:** {_fmt(data.get('machine', 'not recorded'))}.  Reproduce with "
                 f"``{command}``.", ""]
        extra = {k: v for k, v in data.items() if k not in ("machine", "results", "sweep")}
        tables = {k: v for k, v in extra.items() if _records(v)}  # (align_cpu's "auto" summary)
        for k, v in extra.items():
            if k not in tables:
                lines += [f"**{k}:** ``{_fmt(v)}``", ""]
        header, rows = benchmark_rows(data)
        lines += _list_table(header, rows)
        if _records(data.get("sweep")):
            tables = {"Sweep": data["sweep"], **tables}
        for title, records in tables.items():
            keys: list[str] = []
            for r in records:
                keys += [k for k in r if k not in keys]
            lines += [f"{title}:", ""]
            lines += _list_table(keys, [[_fmt(r.get(k)) for k in keys] for r in records])
        return _rst_block(self, lines)


def _records(value: Any) -> bool:
    """Whether a benchmark file's entry is a list of flat objects (shown as a table)."""
    return isinstance(value, list) and bool(value) and all(isinstance(r, dict) for r in value)


def plot_benchmark(name: str, *, title: str | None = None) -> None:
    """Horizontal bars of ms per candidate, one panel per case; nothing if no data file."""
    data = load_benchmark(name)
    if not data or not data.get("results"):
        return
    import matplotlib.pyplot as plt

    results = [r for r in data["results"] if isinstance(r.get("seconds"), (int, float))]
    cases: list[Any] = []
    for r in results:
        if r.get("case") not in cases:
            cases.append(r.get("case"))
    fig, axes = plt.subplots(
        len(cases), 1, figsize=(6.4, 0.55 + 0.32 * len(results) + 0.5 * len(cases)), squeeze=False
    )
    for ax, case in zip(axes[:, 0], cases):
        rows = [r for r in results if r.get("case") == case]
        labels = [str(r.get("candidate", "?")) for r in rows]
        ms = [float(r["seconds"]) * 1e3 for r in rows]
        ax.barh(range(len(ms)), ms, color="tab:blue")
        ax.set_yticks(range(len(ms)), labels)
        ax.invert_yaxis()
        ax.set_title(str(case), fontsize=9)
        ax.set_xlabel("ms (median)")
    fig.suptitle(title or name, fontsize=10)
    fig.tight_layout()


# --------------------------------------------------------------------------- markdown


def _inline(text: str) -> str:
    """Markdown inline code / bold / links to reStructuredText."""
    text = re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r"`\1 <\2>`__", text)
    parts = re.split(r"(`[^`]+`)", text)
    out = []
    for p in parts:
        if p.startswith("`") and p.endswith("`") and len(p) > 1 and not p.endswith(">`__"):
            out.append("``" + p[1:-1] + "``")
        else:
            out.append(re.sub(r"\*\*([^*]+)\*\*", r"**\1**", p))
    return "".join(out)


def markdown_to_rst(text: str) -> list[str]:
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            title = _inline(line.lstrip("#").strip())
            out += [f".. rubric:: {title}", ""]
            i += 1
        elif line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append(lines[i])
                i += 1
            cells = [[c.strip() for c in row.strip().strip("|").split("|")] for row in block]
            cells = [c for c in cells if not all(re.fullmatch(r":?-{2,}:?", x) for x in c)]
            out += _list_table([_inline(c) for c in cells[0]], [[_inline(c) for c in r] for r in cells[1:]])
        elif not line.strip():
            out.append("")
            i += 1
        else:
            para: list[str] = []
            level = None  # indentation of the last bullet
            while i < len(lines) and lines[i].strip() and not lines[i].startswith(("#", "|")):
                bullet = re.match(r"(\s*)[-*] ", lines[i])
                if bullet:
                    # reST wants a blank line where a list level starts or ends (Markdown does not)
                    if level is not None and len(bullet.group(1)) != level:
                        para.append("")
                    level = len(bullet.group(1))
                para.append(_inline(lines[i]))
                i += 1
            out += [*para, ""]
    return out


class MarkdownDirective(SphinxDirective):
    required_arguments = 1
    has_content = False

    def run(self) -> list[nodes.Node]:
        path = os.path.join(ROOT, self.arguments[0])
        self.env.note_dependency(path)
        with open(path, encoding="utf-8") as fh:
            return _rst_block(self, markdown_to_rst(fh.read()))


# --------------------------------------------------------------------------- setup


def setup(app: Any) -> dict[str, Any]:
    app.add_directive("mmfuse-exec", ExecDirective)
    app.add_directive("mmfuse-support-table", SupportTableDirective)
    app.add_directive("mmfuse-benchmark", BenchmarkDirective)
    app.add_directive("mmfuse-markdown", MarkdownDirective)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}


__all__ = ["markdown_to_rst", "plot_benchmark", "setup", "support_table"]
