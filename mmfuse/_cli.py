"""The ``mmfuse`` command: info, verify, bench, demo."""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import importlib.util
import json
import math
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from ._console import (
    MissingDependency,
    Progress,
    check_interrupted,
    keeping_interrupts,
    require,
    require_pyplot,
    shorten,
    table,
)
from ._namespace import is_array, tree_map
from .backends import BackendUnsupported
from .backends._registry import installed as _installed  # (a name tests replace)

__all__ = ["main"]

NAMESPACES = ("numpy", "array_api_strict", "torch", "cupy", "jax", "dask")
#: The module that is the array namespace for each name in NAMESPACES.
_NS_MODULE = {"jax": "jax.numpy", "dask": "dask.array"}
#: Widest text in a table's last column (a refusal's reason, an error message), cut between words.
_DETAIL = 100


class UsageError(SystemExit):
    """A bad command line: the message goes to stderr and the exit status is 2, as for
    argparse's own errors (status 1 means a mismatch or failure found by ``verify``)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = 2
        print(message, file=sys.stderr)


def _probe(module: str) -> tuple[Any, str | None]:
    from mmfuse._extras import install_hint

    try:
        return importlib.import_module(module), None
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}{install_hint(exc)}"


# --------------------------------------------------------------------------- info


def cmd_info(args: argparse.Namespace) -> int:
    import mmfuse
    from mmfuse import backends
    from mmfuse._config import config_source, refused_options

    # the first words are what ``mmfuse --version`` prints
    print(f"mmfuse {mmfuse.__version__}  (Python {platform.python_version()}, {platform.platform()})")
    print("\narray namespaces:")
    for name in NAMESPACES:
        if name == "cupy" and not args.probe_gpu and "cupy" not in sys.modules:
            # importing CuPy initialises CUDA: only --probe-gpu does that
            found = importlib.util.find_spec("cupy") is not None
            note = "installed (not imported; --probe-gpu imports it)" if found else "missing: not installed"
            print(f"  {name:<17} {note}")
            continue
        module, reason = _probe(_NS_MODULE.get(name, name))
        version = getattr(sys.modules.get(name), "__version__", "") if module else ""
        print(f"  {name:<17} {'found ' + version if module else 'missing: ' + str(reason)}")
    print("\nbackends:")
    table = backends.available()
    assert isinstance(table, dict)
    names = sorted({b for impls in table.values() for b in impls})
    for b in names:
        ops = [op for op, impls in table.items() if b in impls]
        print(f"  {b:<10} {', '.join(ops)}")
    for b, reason in sorted(backends.unavailable().items()):
        # a backend with registrations (listed above) and its own implementations missing
        # had read as both working and missing (a review's find)
        label = "own implementations missing" if b in names else "missing"
        print(f"  {b:<10} {label}: {reason}")
    print("\ndevices:")
    print("  cpu")
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"  cuda:{i} {torch.cuda.get_device_name(i)} (torch)")
    cupy, reason = _probe("cupy") if args.probe_gpu else (None, None)
    if args.probe_gpu and cupy is None:
        print(f"  cupy: not importable ({reason})")
    if cupy is not None:
        try:
            print(f"  cupy sees {cupy.cuda.runtime.getDeviceCount()} CUDA device(s)")
        except Exception as exc:
            print(f"  cupy: no CUDA device ({type(exc).__name__})")
    print("\nconfig:")
    try:
        source = config_source()
        config = mmfuse.get_config()
    except ValueError as exc:  # e.g. a bad MMFUSE_BACKEND: report it, this is the diagnostic command
        print(f"  invalid: {exc}")
        return 0
    refused = refused_options()  # a bad MMFUSE_PREFER is not in force under a named backend
    for key, value in config.items():
        why = f"{refused[key]}; not in force while the backend is named" if key in refused else None
        print(f"  {key} = {value!r}  ({why or f'from {source[key]}'})")
    return 0


# --------------------------------------------------------------------------- verify


def _leaves(obj: Any) -> list[Any]:
    """An op's outputs, flat: each array on its own, and each label (a list or tuple holding
    no array: an interaction term's subset, or the list of them) whole, as nested tuples, so
    that labels are compared with their grouping (flattened, ``[(0,), (1,)]`` and ``[(0, 1)]``
    would look the same)."""
    if isinstance(obj, (list, tuple)):
        if not _holds_array(obj):
            return [_as_tuples(obj)]
        return [leaf for o in obj for leaf in _leaves(o)]
    return [obj]


def _holds_array(obj: Any) -> bool:
    if isinstance(obj, (list, tuple)):
        return any(_holds_array(o) for o in obj)
    return is_array(obj)


def _as_tuples(obj: Any) -> Any:
    return tuple(_as_tuples(o) for o in obj) if isinstance(obj, (list, tuple)) else obj


def _converter(namespace: str, dtype: str) -> Callable[[np.ndarray], Any] | None:
    if namespace == "numpy":
        return lambda a: a if a.dtype == np.bool_ else a.astype(dtype)
    module, _ = _probe(_NS_MODULE.get(namespace, namespace))
    if module is None:
        return None
    if namespace == "torch":
        return lambda a: module.from_numpy(a if a.dtype == np.bool_ else a.astype(dtype))
    if namespace == "cupy":
        try:
            if module.cuda.runtime.getDeviceCount() < 1:
                return None
        except Exception:
            return None
    return lambda a: module.asarray(a if a.dtype == np.bool_ else a.astype(dtype))


def _call(func: Callable[..., Any], backend: str, args: Any, kwargs: Any) -> Any:
    """Call a public op on ``backend``."""
    return func(*args, **kwargs, backend=backend)


def _host_copies(inputs: Any) -> list[np.ndarray]:
    """Host copies of every array in ``inputs`` (nested lists, tuples, dicts), in order."""
    from mmfuse._namespace import to_numpy

    found: list[Any] = []
    tree_map(found.append, inputs)
    return [to_numpy(a, dtype=None) for a in found]


def _changed_input(inputs: Any, before: list[np.ndarray]) -> int | None:
    """The index (in :func:`_host_copies`' order) of the first input array whose values are
    no longer those copied in ``before``, or None: an op must not write to its inputs (the
    reference runs on its own copy, so a comparison of outputs cannot see it)."""
    for i, (now, then) in enumerate(zip(_host_copies(inputs), before)):
        if not np.array_equal(now, then, equal_nan=then.dtype.kind == "f"):
            return i
    return None


def _rel_err(got: Any, want: np.ndarray) -> float:
    from mmfuse._namespace import to_numpy

    g = to_numpy(got)
    if g.shape != want.shape:
        return float("inf")
    scale = max(float(np.abs(want).max()), 1e-300)
    return float(np.abs(g - want).max() / scale)


def _wrong_kind(got: list[Any], want: list[Any], like: Any) -> str | None:
    """What is wrong with the kind of an op's array outputs, or None: each must be an array of
    the inputs' namespace (``like``: an input as the op was given it) and dtype, in the
    reference's shape (a wrong one had read "max rel err inf", or, where it broadcast against
    the reference's, passed)."""
    from mmfuse._namespace import array_namespace, namespace_name
    from mmfuse.testing import _dtype_key

    space = namespace_name(array_namespace(like))
    for i, (g, w) in enumerate(zip(got, want)):
        if not isinstance(w, np.ndarray):
            continue
        if not is_array(g):
            return f"output {i} is a {type(g).__name__}, not an array"
        got_space, got_dtype = namespace_name(array_namespace(g)), _dtype_key(g.dtype)
        dtype = _dtype_key(like.dtype)
        if got_space != space or got_dtype != dtype:
            return f"output {i} is {got_space} {got_dtype} for {space} {dtype} inputs"
        # (a shape Dask does not know yet, a NaN, is left to the comparison of values)
        shape = tuple(g.shape)
        if all(isinstance(n, int) for n in shape) and shape != w.shape:
            return f"output {i} has shape {shape} where the reference's has {w.shape}"
    return None


# verify's tolerances on its own small problems, errors scaled by the reference's largest
# magnitude (_rel_err).  float32: every op, backend and namespace was within 4.8e-7 (seeds 0-2,
# CPU), and inputs rounded to TF32's 10-bit mantissa (what a GPU matmul gives with TF32 on)
# were 1.9e-4 to 8.7e-4 off, so 2e-5 has a margin of ten or more on each side; the 1e-3 it
# had (5x mmfuse.testing's float32 tolerance, which is for problems of any size) passed them.
_VERIFY_RTOL = {"float32": 2e-5, "float64": 5e-10}


def verify_rows(
    ops: Iterable[str],
    backends_wanted: Iterable[str] | None,
    namespaces: Iterable[str],
    seed: int,
    progress: bool,
) -> list[dict[str, Any]]:
    import mmfuse
    import mmfuse.reference as ref
    from mmfuse import backends
    from mmfuse._problems import CASES, make_problem

    jobs = []
    unverified = []
    for op in ops:
        registered = backends.available(op)
        assert isinstance(registered, list)
        for b in registered:
            if b == "reference" or (backends_wanted is not None and b not in backends_wanted):
                continue
            # the default problem, then the options an implementation could ignore and pass it
            for case in (None, *CASES.get(op, ())):
                for ns in namespaces:
                    for dtype in ("float32", "float64"):
                        jobs.append((op, case, b, ns, dtype))
        # a backend asked for by name that cannot run here says so, rather than vanishing
        for b in backends_wanted or ():
            if b == "reference" or b not in registered:
                unverified.append(
                    {
                        "op": op,
                        "backend": b,
                        "namespace": "-",
                        "dtype": "-",
                        "status": "skipped",
                        "detail": _not_verified(b, op),
                    }
                )
    # one finished item per operator: off a terminal that is a line per op, not one per check
    last_job = {job[0]: i for i, job in enumerate(jobs)}
    bar = Progress(len(jobs), "verify", items=len(last_job), enabled=progress)
    rows: list[dict[str, Any]] = []
    # the reference's answer for each (op, case), computed at the first job that needs it: the
    # problem is the same for every backend, namespace and dtype (a fixed seed), and the
    # reference ran once a job, 20 to 40 times each, skipped rows included (7.7 s of a 30 s
    # run; a review's find)
    answers: dict[tuple[str, str | None], list[Any]] = {}
    for i, (op, case, b, ns, dtype) in enumerate(jobs):
        convert = _converter(ns, dtype)
        row = {"op": op if case is None else f"{op} ({case})", "backend": b, "namespace": ns, "dtype": dtype}
        if convert is None:
            row.update(status="skipped", detail=f"{ns} not available")
        elif ns == "jax" and str(convert(np.zeros(1)).dtype) != dtype:
            # JAX without x64 turns float64 into float32: checking it at float64 tolerance is meaningless
            row.update(status="skipped", detail=f"jax makes {dtype} float32 unless JAX_ENABLE_X64=1")
        else:
            if (op, case) not in answers:  # (on a problem of its own, as each job's)
                ref_args, ref_kwargs = make_problem(op, seed=seed, case=case)
                answers[op, case] = _leaves(getattr(ref, op)(*ref_args, **ref_kwargs))
            want = answers[op, case]
            # but fresh inputs for each job: the converters pass NumPy's boolean masks on
            # uncopied, so a problem shared between jobs would carry one job's writes into the next
            args, kwargs = make_problem(op, seed=seed, case=case)
            given = tree_map(convert, args), tree_map(convert, kwargs)
            before = _host_copies(given)
            try:
                got = _leaves(_call(getattr(mmfuse, op), b, *given))
            except BackendUnsupported as exc:
                row.update(status="n/a", detail=_refusal(exc))
            except Exception as exc:
                row.update(status="ERROR", detail=shorten(f"{type(exc).__name__}: {exc}", _DETAIL))
            else:
                tol = _VERIFY_RTOL[dtype]
                # labels (the interaction terms' orders or subsets) are compared as they are
                labels = [(g, w) for g, w in zip(got, want) if not isinstance(w, np.ndarray)]
                if len(got) != len(want):  # zip would compare the shorter list only
                    row.update(
                        status="MISMATCH", detail=f"{len(got)} outputs where the reference gives {len(want)}"
                    )
                elif not all(_same_labels(g, w) for g, w in labels):
                    row.update(status="MISMATCH", detail="labels differ from the reference's")
                elif (kind := _wrong_kind(got, want, convert(np.ones(1)))) is not None:
                    row.update(status="MISMATCH", detail=kind)
                elif (changed := _changed_input(given, before)) is not None:
                    row.update(status="MISMATCH", detail=f"input {changed} was written to")
                else:
                    pairs = [(g, w) for g, w in zip(got, want) if isinstance(w, np.ndarray)]
                    errs = [_rel_err(g, w) for g, w in pairs]
                    # (max would drop a NaN after the first output: max(3e-8, nan) is 3e-8)
                    err = math.nan if any(math.isnan(e) for e in errs) else max(errs)
                    row.update(
                        status="ok" if err <= tol else "MISMATCH",
                        detail=f"max rel err {err:.1e} (tol {tol:.0e})",
                    )
        rows.append(row)
        bar.step(f"{row['op']}/{b}/{ns}/{dtype}")
        if last_job[op] == i:
            bar.finished(f"{op} checked: {tally([r for r in rows if r['op'].split(' ')[0] == op])}")
    return rows + unverified


def tally(rows: list[dict[str, Any]]) -> str:
    """verify's counts of ``rows`` by status: passed, failed (a mismatch or an error), skipped
    (not run here: a namespace or dtype not available, a named backend that cannot run or has
    no implementation of the operator, TensorLy not installed) and not applicable (a backend
    that does not take such arrays, "n/a": by design, not a gap).  Not applicable apart from
    skipped: "22 of 80 rows ok" read as 58 problems where every other row was a backend for
    another device (a new user's report)."""
    counts = Counter(r["status"] for r in rows)
    failed = counts["MISMATCH"] + counts["ERROR"]
    skipped = len(rows) - counts["ok"] - failed - counts["n/a"]
    return f"{counts['ok']} passed, {failed} failed, {skipped} skipped, {counts['n/a']} not applicable"


def _refusal(exc: BaseException) -> str:
    """What a backend's refusal says it needs, for the detail column.

    The message starts "backend 'x' cannot take <namespace> arrays [on device ...] for <op>: ",
    which the row's other columns already say; what follows the first ": " is the reason.
    """
    text = str(exc)
    return shorten(text.split(": ", 1)[1] if ": " in text else text, _DETAIL)


def _same_labels(got: Any, want: Any) -> bool:
    """Whether an output the reference gives as labels (the interaction terms' orders or
    subsets) came back equal; not where it came back as an array, whose ``==`` answers
    element by element (a registered implementation's ``np.asarray(labels)`` had ended
    ``verify`` in a traceback)."""
    if hasattr(got, "shape"):
        return False
    try:
        return bool(got == want)
    except Exception:
        return False


def _not_verified(backend: str, op: str) -> str:
    """Why ``verify`` checks nothing for a backend asked for by name."""
    from mmfuse import backends

    if backend == "reference":
        return "the reference is the oracle the others are checked against"
    reason = backends.unavailable().get(backend)
    if reason is not None:
        return shorten(f"not available here: {reason}", _DETAIL)
    return f"{backend} has no implementation of {op}"


def _tensorly_rows(seed: int) -> list[dict[str, Any]]:
    tl, reason = _probe("tensorly")
    if tl is None:
        return [
            {
                "op": "cp_fusion",
                "backend": "tensorly",
                "namespace": "numpy",
                "dtype": "float64",
                "status": "skipped",
                "detail": reason,
            }
        ]
    import mmfuse
    from mmfuse._problems import make_problem

    (xs, cp, bias), _ = make_problem("cp_fusion", seed=seed)
    # backend named, as every verify row's: a configured one (MMFUSE_BACKEND=torch, say) could
    # not take these NumPy arrays, and its refusal discarded the whole table (exit 2)
    fused = mmfuse.cp_fusion(xs, cp, bias, backend="auto")
    err = _rel_err(fused, mmfuse.tensor_fusion(xs, tl.cp_to_tensor(cp), bias, backend="auto"))
    ok = err <= 1e-10
    return [
        {
            "op": "cp_fusion",
            "backend": "vs tensorly.cp_to_tensor",
            "namespace": "numpy",
            "dtype": "float64",
            "status": "ok" if ok else "MISMATCH",
            "detail": f"max rel err {err:.1e}",
        }
    ]


def cmd_verify(args: argparse.Namespace) -> int:
    from mmfuse._config import BACKEND_NAMES
    from mmfuse._problems import OPS

    ops = _check_choices(args.ops, OPS, "op")
    wanted = (
        _check_choices(args.backends, [b for b in BACKEND_NAMES if b != "auto"], "backend")
        if args.backends
        else None
    )
    if args.namespaces:
        namespaces, not_installed = list(dict.fromkeys(args.namespaces)), []
    else:
        # Default: every namespace installed here, JAX and Dask included.  ``verify`` is the
        # check a user runs after installing on a new machine, and ``info`` lists JAX and Dask as
        # found: leaving them out by default would pass a machine whose JAX path fails.  They
        # cost a few seconds more (JAX dispatches each operation eagerly); ``--namespaces``
        # narrows the run.  Namespaces not installed get one line below the table, not rows.
        namespaces = [ns for ns in NAMESPACES if _installed(ns)]
        not_installed = [ns for ns in NAMESPACES if ns not in namespaces]
    rows = verify_rows(ops, wanted, namespaces, args.seed, not args.no_progress)
    if "cp_fusion" in ops and wanted is None and "numpy" in namespaces:
        # TensorLy's cross-check runs "auto" on NumPy arrays: only in a run that names no
        # backend and includes NumPy (it passed ``--backends reference``, which checks nothing,
        # and added NumPy rows to ``--namespaces dask``)
        rows += _tensorly_rows(args.seed)
    print(table(rows, ["op", "backend", "namespace", "dtype", "status", "detail"]))
    bad = [r for r in rows if r["status"] in ("MISMATCH", "ERROR")]
    ran = sum(r["status"] == "ok" for r in rows)
    print(f"\n{tally(rows)}")
    if not_installed:
        print(f"not installed here, so not checked: {', '.join(not_installed)}")
    # A check that checked nothing is no pass: what was named on the command line (a
    # namespace, a backend) must have run somewhere, and something must have run at all
    # (``--namespaces cupy`` on a machine whose CuPy is broken would otherwise exit 0)
    # (the reference is the oracle, never itself checked)
    named = [("namespace", ns) for ns in (args.namespaces or [])]
    named += [("backend", b) for b in (wanted or []) if b != "reference"]
    # (a row that failed was checked: its failure is counted above, not called unchecked)
    what = _missed(named, rows, lambda r: r["status"] in ("ok", "MISMATCH", "ERROR"))
    if what is not None:
        why = "see the rows above that were skipped or not applicable"
        if not ran and wanted and set(wanted) == {"reference"}:
            why += "; the reference is the oracle the others are checked against, never checked itself"
        print(f"mmfuse verify: nothing was checked for {what} ({why})", file=sys.stderr)
        return 1
    return 1 if bad else 0


def _missed(
    named: list[tuple[str, str]], rows: list[dict[str, Any]], done: Callable[[dict[str, Any]], bool]
) -> str | None:
    """What a run (``verify``'s checks, ``bench``'s timings) did nothing for: the namespaces
    and backends named on the command line, as (kind, name), with no row ``done``, or
    "anything" when no row was done at all; None when something was done for each."""
    missed = [f"{kind} {name}" for kind, name in dict.fromkeys(named)
              if not any(r[kind] == name and done(r) for r in rows)]  # fmt: skip
    if missed:
        return ", ".join(missed)
    return None if any(done(r) for r in rows) else "anything"


def _check_choices(given: Sequence[str] | None, valid: Iterable[str], what: str) -> list[str]:
    valid = list(valid)
    if not given:
        return valid
    unknown = [g for g in given if g not in valid]
    if unknown:
        raise UsageError(
            f"mmfuse: unknown {what} {', '.join(map(repr, unknown))}; valid {what}s: {', '.join(valid)}"
        )
    return list(dict.fromkeys(given))


# --------------------------------------------------------------------------- output paths


def _check_output_file(path: str) -> None:
    """Fail now, not after all the work, if ``path`` cannot be written."""
    if os.path.isdir(path):
        raise UsageError(f"mmfuse: cannot write {path!r}: it is a directory")
    if path.endswith(("/", os.sep)):  # (dirname drops the slash: the parent check would pass)
        raise UsageError(
            f"mmfuse: cannot write {path!r}: a trailing {path[-1]!r} names a directory, not a file"
        )
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise UsageError(f"mmfuse: cannot write {path!r}: {parent!r} is a file, not a directory")
    if not os.path.isdir(parent):
        raise UsageError(f"mmfuse: cannot write {path!r}: directory {parent!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UsageError(f"mmfuse: cannot write {path!r}: {_why_not_writable(parent)}")


def _why_not_writable(folder: str) -> str:
    """Why the files of ``folder`` cannot be written, as the OS would say it: a read-only
    file system (access() refuses those too, and "permission denied" sent the user to the
    file's mode; a review's find) or the permissions."""
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (AttributeError, OSError):  # (no statvfs on Windows)
        read_only = False
    return "read-only file system" if read_only else "permission denied"


@contextlib.contextmanager
def _writing(path: str, what: str = "write", *, any_error: bool = False) -> Iterator[None]:
    """Report an OSError raised while writing ``path`` (a file, or the files in folder
    ``path``) like the up-front checks do: one line naming the path on stderr, exit status 2
    (the checks cannot see everything: a virtual or read-only file system, a full disk, ...).

    An OSError about another file (one the work reads, say) propagates unless ``any_error``.
    """
    try:
        yield
    except OSError as exc:
        name = exc.filename
        where = os.fsdecode(name) if isinstance(name, (str, bytes, os.PathLike)) else None
        top = os.path.abspath(path)
        if where is not None and not any_error:
            if not _inside(os.path.abspath(where), top):
                raise  # not the output: a real failure, shown in full
            path = where
        raise UsageError(f"mmfuse: cannot {what} {path!r}: {exc.strerror or exc}") from None


def _inside(path: str, folder: str) -> bool:
    """Whether absolute ``path`` is ``folder`` or inside it; False for paths on two Windows
    drives, of which ``commonpath`` raises ValueError ("Paths don't have the same drive"),
    which had buried the error being reported (a review's find)."""
    try:
        return os.path.commonpath([folder, path]) == folder
    except ValueError:
        return False


def _check_output_dir(path: str, files: Sequence[str]) -> None:
    """Fail now if folder ``path`` cannot be created or the ``files`` in it cannot be written."""
    if not path:
        raise UsageError("mmfuse: --out needs a folder name, got an empty one")
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise UsageError(f"mmfuse: cannot use {path!r} as the output folder: it is not a directory")
        for name in files:
            _check_output_file(os.path.join(path, name))
        return
    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise UsageError(f"mmfuse: cannot create folder {path!r}: {ancestor!r} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        why = _why_not_writable(ancestor)
        raise UsageError(f"mmfuse: cannot create folder {path!r}: {why} in {ancestor!r}")


# --------------------------------------------------------------------------- bench


def _sync(out: Any) -> None:
    """Wait for ``out``, so that a call's time is the time to its result: Dask's graph
    computed, JAX's asynchronous dispatch and CuPy's and torch's CUDA queues drained."""
    leaves = _leaves(out)
    dask = sys.modules.get("dask")
    if dask is not None:
        lazy = [a for a in leaves if hasattr(a, "dask") and hasattr(a, "compute")]
        if lazy:
            dask.compute(*lazy)
    for a in leaves:
        if hasattr(a, "block_until_ready"):  # JAX
            a.block_until_ready()
    cupy = sys.modules.get("cupy")
    if cupy is not None and any(type(a).__module__.startswith("cupy") for a in leaves):
        cupy.cuda.get_current_stream().synchronize()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.synchronize()


# What ``bench`` times inputs of unless --namespaces says otherwise
_BENCH_NAMESPACES = ("numpy", "torch")


def cmd_bench(args: argparse.Namespace) -> int:
    import mmfuse
    from mmfuse import backends
    from mmfuse._config import BACKEND_NAMES
    from mmfuse._problems import OPS, make_problem

    ops = _check_choices(args.ops, OPS, "op")
    wanted = _check_choices(args.backends, [b for b in BACKEND_NAMES if b != "auto"], "backend")
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None:
            if not path:
                raise UsageError(f"mmfuse: {option} needs a file name, got an empty one")
            _check_output_file(path)
    if args.plot and not args.plot.lower().endswith(".png"):
        raise UsageError(f"mmfuse: --plot writes a PNG: give a file name ending in .png, got {args.plot!r}")
    if args.json and args.plot and os.path.realpath(args.json) == os.path.realpath(args.plot):
        # (the PNG, written last, had replaced the report, and both were said to be written)
        raise UsageError(f"mmfuse: --json and --plot name the same file ({args.plot!r}): give two names")
    if args.plot:
        require_pyplot()  # now, not after minutes of timing
    namespaces = list(dict.fromkeys(args.namespaces or _BENCH_NAMESPACES))
    scale = "verify" if args.quick else "bench"
    jobs = []
    missing = backends.unavailable()
    unrunnable = []
    for op in ops:
        registered = backends.available(op)
        assert isinstance(registered, list)
        for b in registered:
            if b in wanted and not (b == "reference" and scale == "bench"):
                for ns in namespaces:
                    jobs.append((op, b, ns))
        # a backend named here that runs but has no implementation of this op: a row saying
        # so (as verify's), where it had vanished from the table
        for b in wanted if args.backends else ():  # (wanted: the named ones, each once)
            if b not in registered and b not in missing:
                unrunnable.append({"op": op, "backend": b, "namespace": "-", "dtype": "float32",
                                   "status": "n/a", "seconds": None,
                                   "detail": _not_verified(b, op)})  # fmt: skip
    # a backend asked for by name that cannot run here says so, rather than vanishing
    for b in args.backends or ():
        if b in missing:
            print(shorten(f"{b}: skipped, not available here: {missing[b]}", 200))
        elif b == "reference" and scale == "bench":
            print("reference: skipped at bench scale (its loops would take minutes there); --quick times it")
    bar = Progress(len(jobs), "bench", items=len(jobs), enabled=not args.no_progress)
    results: list[dict[str, Any]] = []
    problems: dict[str, Any] = {}
    for op, b, ns in jobs:
        args_np, kwargs_np = make_problem(op, seed=0, scale=scale)
        problems.setdefault(op, _problem_shapes(args_np, kwargs_np))
        convert = _converter(ns, "float32")
        entry: dict[str, Any] = {"op": op, "backend": b, "namespace": ns, "dtype": "float32"}
        if convert is None:
            entry.update(status="skipped", seconds=None, detail=f"{ns} not available")
        else:
            call_args, call_kwargs = tree_map(convert, args_np), tree_map(convert, kwargs_np)
            func = getattr(mmfuse, op)
            try:
                _call(func, b, call_args, call_kwargs)
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    _sync(_call(func, b, call_args, call_kwargs))
                    times.append(time.perf_counter() - t0)
                entry.update(status="ok", seconds=float(np.median(times)))
            except BackendUnsupported as exc:  # what it needs, as verify's detail column says
                entry.update(status="n/a", seconds=None, detail=_refusal(exc))
            except Exception as exc:
                entry.update(status=shorten(f"error: {type(exc).__name__}: {exc}", _DETAIL), seconds=None)
        results.append(entry)
        bar.step(f"{op}/{b}/{ns}")
        timing = f"{entry['seconds'] * 1e3:.3f} ms" if entry["seconds"] else entry["status"]
        bar.finished(f"{op} {b} {ns}: {timing}")
    results = sorted(results + unrunnable, key=lambda r: ops.index(r["op"]))  # (stable: timed rows first)
    for op in ops:
        base = [
            r["seconds"]
            for r in results
            if r["op"] == op and r["backend"] == "array_api" and r["namespace"] == "numpy" and r["seconds"]
        ]
        for r in results:
            if r["op"] == op and r["seconds"] and base:
                r["vs_array_api_numpy"] = base[0] / r["seconds"]
    rows = [
        {
            **r,
            "ms": f"{r['seconds'] * 1e3:.3f}" if r["seconds"] else "-",
            "speed-up": f"{r['vs_array_api_numpy']:.2f}x" if r.get("vs_array_api_numpy") else "-",
        }
        for r in results
    ]
    if rows or not args.backends:
        # why rows were skipped or not applicable, where any were
        why = ["detail"] if any(r.get("detail") for r in rows) else []
        print(table(rows, ["op", "backend", "namespace", "ms", "speed-up", "status", *why]))
    if any(r["seconds"] for r in results):
        print(_speedup_note(any(r.get("vs_array_api_numpy") for r in results)))
    if args.json:
        machine = platform.platform()
        report = {
            "mmfuse": mmfuse.__version__, "machine": machine, "scale": scale, "problems": problems,
            "results": results,
        }  # fmt: skip
        with _writing(args.json), open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        with _writing(args.plot):
            wrote = _bench_plot(results, args.plot, quick=args.quick)
        print(f"wrote {args.plot}" if wrote else f"no timings to plot, so {args.plot} was not written")
    errors = sum(str(r["status"]).startswith("error") for r in results)
    if errors:
        print(f"\n{errors} error(s)", file=sys.stderr)
    # as verify: a run that timed nothing is no success, nor one where a namespace or backend
    # named on the command line timed nothing (``--backends cupy`` without CuPy, ``--backends
    # reference`` without --quick, ``--namespaces cupy`` whose rows all skip)
    named = [("namespace", ns) for ns in (args.namespaces or [])]
    named += [("backend", b) for b in (args.backends or [])]
    what = _missed(named, results, lambda r: bool(r["seconds"]))
    if what is not None:
        print(f"mmfuse bench: nothing was timed for {what} (see the lines above)", file=sys.stderr)
        return 1
    return 1 if errors else 0


def _problem_shapes(args: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """An op's timed problem as bench's JSON records it: its arguments with every array
    replaced by its shape, so that a timing says what it timed."""
    def shape(a: Any) -> list[int]:
        return list(a.shape)

    return {"args": tree_map(shape, list(args)), "kwargs": tree_map(shape, kwargs)}


def _speedup_note(have_baseline: bool) -> str:
    """The line under the bench table that says what "speed-up" is relative to."""
    if have_baseline:
        return (
            "speed-up: relative to the array_api backend on numpy (the Array-API core) for the same op: "
            "its median time / this row's; above 1x is faster"
        )
    return (
        "speed-up: none shown, its baseline (the array_api backend on numpy) was not timed; "
        "add array_api to --backends and numpy to --namespaces to get it"
    )


def _bench_plot(results: list[dict[str, Any]], path: str, *, quick: bool) -> bool:
    """Draw the timed rows of ``results`` into the PNG ``path``; False (nothing written) when
    no row was timed."""
    plt = require_pyplot()
    fig = _bench_figure(results, quick=quick)
    if fig is None:
        return False
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _bench_figure(results: list[dict[str, Any]], *, quick: bool) -> Any:
    """The figure of :func:`_bench_plot` (None where no row was timed).  A quick run's title
    says so, as the demo's figure does: its tiny problems time the calls' fixed costs, not the
    backends' speed at bench scale."""
    import matplotlib.pyplot as plt

    done = [r for r in results if r.get("seconds")]
    if not done:  # nothing was timed (every row skipped): no empty chart
        return None
    ops = sorted({r["op"] for r in done})
    series = sorted({(r["backend"], r["namespace"]) for r in done})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(ops) + 2), 4.2), constrained_layout=True)
    width = 0.8 / max(1, len(series))
    for i, (b, ns) in enumerate(series):
        xs, ys = [], []
        for j, op in enumerate(ops):
            hit = [r["seconds"] for r in done if r["op"] == op and r["backend"] == b and r["namespace"] == ns]
            if hit:
                xs.append(j + i * width)
                ys.append(hit[0] * 1e3)
        ax.bar(xs, ys, width, label=f"{b} on {ns}")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(ops))], ops, rotation=20, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("median time per call (ms, log scale)")
    quick_note = "\nQUICK RUN: tiny problems (fixed costs, not bench scale)" if quick else ""
    ax.set_title(f"mmfuse bench: lower is better{quick_note}")
    ax.legend(fontsize=8)
    return fig


# --------------------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    from mmfuse._demo import check_models_train, run_demo

    require("torch")  # before the folder: a missing torch left an empty one behind
    _check_output_dir(args.out, ("demo.txt", "demo.png"))
    check_models_train()  # and a backend in force that cannot train the layers
    created = []  # the folders makedirs will create, the innermost first
    path = os.path.abspath(args.out)
    while not os.path.isdir(path) and path != os.path.dirname(path):
        created.append(path)
        path = os.path.dirname(path)
    with _writing(args.out, "create folder", any_error=True):  # now, not after the training
        os.makedirs(args.out, exist_ok=True)
    try:
        with _writing(args.out):
            return run_demo(quick=args.quick, out=args.out, progress=not args.no_progress)
    except KeyboardInterrupt:  # no empty folder left behind (rmdir: only if nothing was written)
        with contextlib.suppress(OSError):
            for folder in created:
                os.rmdir(folder)
        raise


# --------------------------------------------------------------------------- main


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = "non-negative integer" if low == 0 else f"integer >= {low}"
    return parse


class _Parser(argparse.ArgumentParser):
    """argparse's parser, except that a failed write of its help, version or usage text raises.

    argparse drops an OSError from writing them: with an unbuffered stdout
    (``PYTHONUNBUFFERED``) ``mmfuse --help > /dev/full`` exited 0 having written nothing,
    where ``info`` says "cannot write the output" and exits 1 (a review's find).  Raised, the
    error reaches main's handlers of a closed reader and a full disk.  (The subcommands'
    parsers are made of this class too: ``add_subparsers`` uses the parent's class.)
    """

    def _print_message(self, message: str, file: Any = None) -> None:
        if message:
            # as argparse: stderr where no stream is given or stdout is None (closed at startup)
            stream = file or sys.stderr
            if stream is not None:
                stream.write(message)


def build_parser() -> argparse.ArgumentParser:
    from mmfuse import __version__
    from mmfuse._problems import OPS

    parser = _Parser(
        prog="mmfuse", description="Multimodal fusion over the Python Array API."
    )
    # the same text as the first words of ``mmfuse info``
    parser.add_argument("--version", action="version", version=f"mmfuse {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="version, namespaces, backends, devices, config")
    p.add_argument(
        "--probe-gpu",
        action="store_true",
        help="import CuPy and ask it how many CUDA devices it sees; without this flag no CUDA "
        "device query is made through CuPy (torch's CUDA devices are listed either way)",
    )
    p.set_defaults(func=cmd_info, command_parser=p)

    p = sub.add_parser("verify", help="check every available backend against mmfuse.reference")
    p.add_argument(
        "--ops", nargs="+", action="extend", metavar="OP",
        help=f"ops to check (default all: {', '.join(OPS)})",
    )  # fmt: skip
    p.add_argument(
        "--backends", nargs="+", action="extend", metavar="BACKEND", help="backends to check (default: all)"
    )
    p.add_argument(
        "--namespaces",
        nargs="+", action="extend",
        choices=NAMESPACES,
        metavar="NAMESPACE",
        help=f"array namespaces to check, of: {', '.join(NAMESPACES)} (default: every one installed here)",
    )
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="random seed, >= 0 (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress display on stderr")
    p.set_defaults(func=cmd_verify, command_parser=p)

    p = sub.add_parser("bench", help="time the ops across available backends, side by side")
    p.add_argument(
        "--ops", nargs="+", action="extend", metavar="OP", help=f"ops to time (default all: {', '.join(OPS)})"
    )
    p.add_argument(
        "--backends", nargs="+", action="extend", metavar="BACKEND",
        help="backends to time (default: all; the reference only with --quick: its loops take minutes "
        "at full size)",
    )  # fmt: skip
    p.add_argument(
        "--namespaces", nargs="+", action="extend", choices=NAMESPACES, metavar="NAMESPACE",
        help=f"array namespaces of the inputs, of: {', '.join(NAMESPACES)} "
        f"(default: {' '.join(_BENCH_NAMESPACES)})",
    )  # fmt: skip
    p.add_argument(
        "--json", metavar="FILE", help="write the timings, and each op's problem (its arrays' shapes) as JSON"
    )
    p.add_argument("--repeats", type=_int_at_least(1), default=5, help="timed calls per row (default 5)")
    p.add_argument("--quick", action="store_true", help="tiny problems (a smoke run)")
    p.add_argument("--plot", metavar="FILE", help="write a PNG bar chart")
    p.add_argument("--no-progress", action="store_true", help="no progress display on stderr")
    p.set_defaults(func=cmd_bench, command_parser=p)

    p = sub.add_parser("demo", help="train small fusion models on bundled real data")
    # (no time promised: on a loaded 2-core machine a quick run took 38-43 s)
    p.add_argument("--quick", action="store_true", help="a short run: fewer epochs, results marked as such")
    p.add_argument("--out", default="mmfuse-demo", help="folder for the summary figure and table")
    p.add_argument("--no-progress", action="store_true", help="no progress display on stderr")
    p.set_defaults(func=cmd_demo, command_parser=p)
    return parser


# errno values of a write that found no room or no device (the output redirected to a full
# disk, /dev/full, a removed device)
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EIO, errno.EFBIG, errno.EDQUOT})


def main(argv: Sequence[str] | None = None) -> int:
    try:
        with _escaping_stdout():
            args = _parse(argv)
            if args.func is not cmd_info:
                import mmfuse

                try:
                    mmfuse.get_config()
                except ValueError as exc:  # e.g. MMFUSE_BACKEND=bogus
                    raise UsageError(f"mmfuse: {exc}") from None
            with keeping_interrupts():
                status = int(args.func(args))
                # a Ctrl-C swallowed on the way (in a garbage-collection callback: see
                # keeping_interrupts) after the last step of work is an interruption still
                check_interrupted()
            # written now, in here: a block-buffered stdout (a pipe, a file) is otherwise flushed
            # at exit, past the handlers below (a closed reader or a full disk gave "Exception
            # ignored" and status 120 outside this machine's unbuffered runs; a review's find)
            _flush_stdout()
        return status
    except KeyboardInterrupt:  # Ctrl-C: one line and the shell's status (128 + SIGINT)
        print("mmfuse: interrupted", file=sys.stderr)
        return 130
    except MissingDependency as exc:
        print(f"mmfuse: {exc}", file=sys.stderr)
        return 2
    except BackendUnsupported as exc:  # the configuration forces a backend the work cannot use
        # (the refusal without the registry's note of where the backend was set and of
        # backend=, which a command line has no use for: what is in force is said here)
        refusal = getattr(exc, "refusal", str(exc))
        print(f"mmfuse: {refusal} (the backend in force: {_backend_in_force()})", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (``mmfuse info | head -1``): stop quietly, as the shell's own
        # tools do, with their status (128 + SIGPIPE), never one of ours (1: a mismatch).
        # stdout now points at devnull, so flushing it at exit raises nothing more.
        _stdout_to_devnull()
        return 141
    except OSError as exc:
        # a write to the output that failed for want of room or a device (``mmfuse info >
        # /dev/full``): one line on stderr, as ``ls`` says "write error", not a traceback.  An
        # error about a file (one mmfuse reads, or writes: _writing) has its name, and
        # propagates whole.
        if exc.errno not in _WRITE_ERRNOS or exc.filename is not None:
            raise
        _stdout_to_devnull()  # no second failure when stdout is flushed at exit
        print(f"mmfuse: cannot write the output: {exc.strerror}", file=sys.stderr)
        return 1


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line parsed, or SystemExit: a usage error (status 2, its message written
    to stderr) or ``--help`` and ``--version``, written to stdout and flushed.

    Why flushed here: argparse prints them and exits inside ``parse_known_args``; their text,
    left in a block-buffered stdout (a pipe, a file), was written at exit, past main's
    handlers of a closed reader and a full disk (``mmfuse --version | true`` and ``mmfuse
    --help > /dev/full`` printed "Exception ignored ... BrokenPipeError" and exited 120; a
    review's find).  Flushed here, their failure ends as ``info``'s does.
    """
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit:
        _flush_stdout()
        raise
    if extra:
        # a subcommand's unknown option with that subcommand's usage (parse_args gave the
        # top-level one); an unknown option before the subcommand is the top level's
        given = list(sys.argv[1:] if argv is None else argv)
        first = given.index(args.command) if args.command in given else len(given)
        owner = parser if extra[0] in given[:first] else args.command_parser
        owner.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _flush_stdout() -> None:
    """Write what stdout holds; nothing to do where it is None (the process started with file
    descriptor 1 closed, ``mmfuse info >&-``: print() then writes nothing, and a plain
    ``sys.stdout.flush()`` ended the command in an AttributeError traceback; a review's find)."""
    if sys.stdout is not None:
        sys.stdout.flush()


@contextlib.contextmanager
def _escaping_stdout() -> Iterator[None]:
    """stdout writing characters its encoding lacks as escapes (``\\xe9``), as stderr does,
    while a command runs; then as it was.  The output names the user's paths and settings,
    which an ASCII or cp1252 stdout (Windows' redirected output, ``PYTHONIOENCODING``, a C
    locale) cannot always encode: the work was done, then its report raised
    UnicodeEncodeError (a review's find).  A stream without ``reconfigure`` (a test's
    capture, a user's wrapper) or with a handler that replaces already is left as it is;
    ``surrogateescape`` (``PYTHONIOENCODING=ascii:surrogateescape``) raises for other
    characters, so it is replaced too (a diff review's find)."""
    stream = sys.stdout
    reconfigure = getattr(stream, "reconfigure", None)
    before = getattr(stream, "errors", None)
    if reconfigure is None or before not in ("strict", "surrogateescape"):
        yield
        return
    reconfigure(errors="backslashreplace")
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):  # (a closed or failed stream: no matter)
            reconfigure(errors=before)


def _stdout_to_devnull() -> None:
    """Point file descriptor 1 at devnull, where writing the output failed (nothing is left to
    write, and the interpreter's flush at exit must not fail again).  An in-process stdout
    without a descriptor (a test's capture) is left as it is."""
    with contextlib.suppress(OSError, ValueError, AttributeError):  # (AttributeError: stdout is None)
        fd = sys.stdout.fileno()  # (first: no devnull opened where there is nothing to point)
        os.dup2(os.open(os.devnull, os.O_WRONLY), fd)


def _backend_in_force() -> str:
    from mmfuse._config import config_source, get_config

    config, source = get_config(), config_source()
    return ", ".join(f"{key}={config[key]!r} from {source[key]}" for key in ("backend", "prefer"))
