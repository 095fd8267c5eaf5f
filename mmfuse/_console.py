"""Console helpers shared by the ``mmfuse`` command (:mod:`mmfuse._cli`) and its demo
(:mod:`mmfuse._demo`): optional imports that name their extra, plain-text tables, word-boundary
shortening, a progress display, and Ctrl-C kept where a library would swallow it.

It imports neither of those modules, so they can both use it without importing each other.
"""

from __future__ import annotations

import contextlib
import importlib
import shutil
import signal
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from ._extras import install_command

__all__ = [
    "MissingDependency",
    "Progress",
    "check_interrupted",
    "keeping_interrupts",
    "require",
    "require_pyplot",
    "shorten",
    "table",
]


class MissingDependency(RuntimeError):
    """An optional module a command needs is not installed (the message names the extra)."""


def require(module: str) -> Any:
    """Import ``module`` or raise :class:`MissingDependency` naming the extra that installs it.

    Any failure of the import counts, not only ImportError: a broken installation raises
    others (a CUDA build of torch missing a shared library: OSError), which had reached the
    user as a traceback where ``mmfuse info`` named it (a review's find)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependency(
            f"{module} is needed for this command but could not be imported ({exc}); "
            f"install it with: {install_command(module)}"
        ) from None
    except Exception as exc:
        raise MissingDependency(
            f"{module} is needed for this command but its import failed "
            f"({type(exc).__name__}: {exc}); repair or reinstall it: {install_command(module)}"
        ) from None


def require_pyplot() -> Any:
    """matplotlib's pyplot on its file-only Agg backend, or :class:`MissingDependency`: the
    package and pyplot both (pyplot loads the compiled Agg backend, which can fail where the
    package imported; a review's find)."""
    require("matplotlib").use("Agg")
    return require("matplotlib.pyplot")


def shorten(text: str, width: int) -> str:
    """``text`` on one line, cut at a word boundary to at most ``width`` characters.

    A cut is marked with ``...``; a word is never split (a single word longer than ``width``
    is the only exception, so that something is left to read).
    """
    flat = " ".join(str(text).split())
    if len(flat) <= width:
        return flat
    short = textwrap.shorten(flat, width, placeholder=" ...")
    if short == "...":  # the first word alone is wider than ``width``
        return flat[: max(0, width - 3)] + "..."
    return short


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """``rows`` as a left-aligned text table with a header and a rule under it.

    Lines carry no trailing blanks (the last column is not padded), so logs and diffs stay clean.
    """
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) if rows else len(c) for c in columns]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    lines = [line(columns), line(["-" * w for w in widths])]
    lines += [line([str(r.get(c, "")) for c in columns]) for r in rows]
    return "\n".join(lines)


class _Interrupts:
    """Whether a Ctrl-C came while :func:`keeping_interrupts` was in force (a class attribute,
    not a ``threading.Event``: the handler sets it in the middle of any bytecode, and an
    Event's lock, held by the interrupted code, would deadlock it)."""

    seen = False


def _remember_and_raise(signum: int, frame: Any) -> None:
    """The SIGINT handler of :func:`keeping_interrupts`: note the interrupt, then raise it as
    Python's default handler does."""
    _Interrupts.seen = True
    raise KeyboardInterrupt


@contextlib.contextmanager
def keeping_interrupts() -> Iterator[None]:
    """Ctrl-C (SIGINT) while the block runs is remembered as well as raised, so that
    :func:`check_interrupted` raises it again where the first KeyboardInterrupt was swallowed.

    Why: CPython "ignores" an exception raised in a ``__del__`` method or a garbage-collection
    callback (it prints "Exception ignored in ..." and carries on).  JAX installs such a
    callback (``_xla_gc_callback``): a Ctrl-C that landed while it ran was lost, and ``mmfuse
    verify`` finished and exited 0 (2 runs of 6; a review's find).

    The handler is installed only in the main thread (the only one where ``signal.signal``
    works) and only over Python's default one: a program that ignores SIGINT (``SIG_IGN``, a
    ``nohup``-like launcher) or handles it itself keeps its choice.  The previous handler and
    a clear flag are restored on the way out.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    _Interrupts.seen = False
    previous = signal.signal(signal.SIGINT, _remember_and_raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _Interrupts.seen = False


def check_interrupted() -> None:
    """Raise KeyboardInterrupt if a Ctrl-C came under :func:`keeping_interrupts` (whether or
    not its KeyboardInterrupt reached the code that was running); a no-op otherwise."""
    if _Interrupts.seen:
        raise KeyboardInterrupt


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """Progress on stderr: a bar redrawn in place on a terminal, plain lines elsewhere.

    ``total`` counts steps (:meth:`step`, e.g. one training epoch or one check); ``items``
    counts the larger units that :meth:`finished` reports (e.g. one model, one operator).

    On a terminal the bar is redrawn with a carriage return after every step.  When the stream
    is not a terminal (a CI log, a pipe, a file) a redrawn bar would leave every frame in the
    log, so nothing is written per step and :meth:`finished` writes one line per finished item.

    Why our own few lines rather than tqdm or rich: mmfuse's runtime dependencies are NumPy
    and array-api-compat only, and either library would be a new one for a single bar.  Nor
    would they give the log behaviour wanted here without code of ours around them: tqdm
    writes carriage-return frames to any stream unless disabled (then it writes nothing at
    all), and rich's live display likewise prints nothing per item off a terminal.
    """

    BAR = 24

    def __init__(
        self,
        total: int,
        label: str,
        *,
        items: int | None = None,
        stream: Any = None,
        enabled: bool = True,
        interactive: bool | None = None,
    ) -> None:
        self.total, self.label, self.done = max(1, total), label, 0
        self.items, self.items_done = items, 0
        self.stream = stream if stream is not None else sys.stderr
        # (sys.stderr is None where the process started with it closed: nothing to show then)
        self.enabled = enabled and self.stream is not None
        self.interactive = _is_terminal(self.stream) if interactive is None else interactive
        self.start = time.perf_counter()

    def _elapsed(self) -> float:
        return time.perf_counter() - self.start

    def step(self, note: str = "") -> None:
        """One step done; on a terminal, redraw the bar (``note`` says what ran).

        Raises KeyboardInterrupt where a Ctrl-C was swallowed during the step (see
        :func:`keeping_interrupts`): every command's loop of work calls this once a step.
        """
        check_interrupted()
        self.done += 1
        if not (self.enabled and self.interactive):
            return
        bar = "#" * int(self.done / self.total * self.BAR)
        text = f"{self.label} [{bar:<{self.BAR}}] {self.done}/{self.total} {self._elapsed():5.1f}s {note}"
        # a line wider than the terminal wraps, and the carriage return then redraws only its tail
        width = shutil.get_terminal_size((80, 24)).columns - 1
        self.stream.write("\r" + text[:width].ljust(width))
        if self.done >= self.total:
            self.stream.write("\n")
        self.stream.flush()

    def finished(self, item: str) -> None:
        """An item is complete; off a terminal, write one line saying so."""
        self.items_done += 1
        if not self.enabled or self.interactive:
            return
        count = f"{self.items_done}/{self.items}" if self.items else f"{self.items_done}"
        self.stream.write(f"{self.label.strip()}: {item} ({count}, {self._elapsed():.1f} s)\n")
        self.stream.flush()
