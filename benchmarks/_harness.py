"""Shared timing and memory harness for the CPU benchmarks.

Times are medians over repeats after warm-up, all candidates in one process, interleaved in
short bursts (see :func:`time_candidates`) so drifts in machine load hit every candidate
alike.  Peak memory is measured per
candidate in a fresh subprocess (peak RSS growth over a baseline taken after the inputs exist),
because torch's CPU allocator is invisible to ``tracemalloc``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = [
    "as_float64", "check_same", "machine", "medians", "peak_rss_mib", "print_table", "quantile", "round_ratios",
    "sample_rounds", "time_candidates",
]


def arg_parser(doc: str | None) -> argparse.ArgumentParser:
    """The CPU benchmarks' command line: ``--json FILE`` and ``--quick`` (a script adds its own)."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--json", help="write full results here")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, no memory runs")
    return parser


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def sample_rounds(
    candidates: dict[str, Callable[[], Any]],
    *,
    repeats: int = 15,
    warmup: int = 2,
    burst: int = 3,
    sync: Callable[[Any], Any] | None = None,
) -> dict[str, list[list[float]]]:
    """Seconds per call of each candidate, as one list per round, measured in interleaved
    bursts.

    Each round runs every candidate ``burst`` times in a row (at least twice: a ``burst`` of 1
    runs as 2) and discards the first call of the burst.  That first call absorbs what the
    previous candidate left behind: on a small machine, the worker threads of OpenBLAS (NumPy)
    and of OpenMP (torch) keep spinning for a while after their parallel region, and a call of
    the other library that starts then loses cores to them (on 2 cores an LMF-style torch step
    ran nearly twice as long right after a NumPy-backed one).  Rounds still interleave the
    candidates, so slow drifts of the machine hit all of them alike; ``repeats`` samples per
    candidate in all, rounded up to whole rounds (``max(burst - 1, 1)`` samples each: 16 for
    15 at the default burst of 3).
    """
    for fn in candidates.values():
        for _ in range(warmup):
            out = fn()
            if sync:
                sync(out)
    rounds: dict[str, list[list[float]]] = {name: [] for name in candidates}
    timed = max(1, burst - 1)
    for _ in range(-(-repeats // timed)):
        for name, fn in candidates.items():
            samples = []
            for call in range(timed + 1):
                t0 = time.perf_counter()
                out = fn()
                if sync:
                    sync(out)
                if call:
                    samples.append(time.perf_counter() - t0)
                del out
            rounds[name].append(samples)
    return rounds


def medians(rounds: dict[str, list[list[float]]]) -> dict[str, float]:
    """Median seconds per call of each candidate over all its rounds' samples."""
    return {name: statistics.median(t for r in rs for t in r) for name, rs in rounds.items()}


def time_candidates(candidates: dict[str, Callable[[], Any]], **options: Any) -> dict[str, float]:
    """Median seconds per call of each candidate (:func:`sample_rounds`, ``options`` passed on)."""
    return medians(sample_rounds(candidates, **options))


def round_ratios(rounds: dict[str, list[list[float]]], base: str, name: str) -> list[float]:
    """Per round, the median time of ``base`` over that of ``name``: the speed-up as it was
    measured within one round, where both ran within milliseconds of each other.  Their spread
    shows how much of a ratio is the machine's drift rather than the code."""
    return [statistics.median(b) / statistics.median(t) for b, t in zip(rounds[base], rounds[name])]


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (linear interpolation, as NumPy's default)."""
    ordered = sorted(values)
    at = q * (len(ordered) - 1)
    lo = int(at)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (at - lo)


def peak_rss_mib(module: str, case: str, candidate: str, env: dict[str, str] | None = None) -> float:
    """Peak RSS growth (MiB) of one call of ``candidate`` in a fresh process.

    The benchmark module must define ``setup(case) -> dict[str, callable]``; the child builds
    inputs, records its RSS high-water mark, resets it (``/proc/self/clear_refs``) and calls
    the candidate once.  ``env``: variables set for the child on top of this process's.
    """
    code = f"""
import json, resource, sys
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
import {module} as bench
cands = bench.setup({case!r})
fn = cands[{candidate!r}]
fn()  # warm: lazy imports, allocator pools, thread pools
def rss_kib():
    with open('/proc/self/status') as fh:
        for line in fh:
            if line.startswith('VmRSS'):
                return int(line.split()[1])
def hwm_kib():
    with open('/proc/self/status') as fh:
        for line in fh:
            if line.startswith('VmHWM'):
                return int(line.split()[1])
base = rss_kib()
try:
    with open('/proc/self/clear_refs', 'w') as fh:
        fh.write('5')
except OSError:
    pass
out = fn()
print(json.dumps({{'base': base, 'peak': hwm_kib()}}))
"""
    env = {**os.environ, **(env or {})}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    data = json.loads(res.stdout.strip().splitlines()[-1])
    return max(0.0, (data["peak"] - data["base"]) / 1024.0)


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    widths = [max([len(c), *(len(str(r.get(c, ""))) for r in rows)]) for c in columns]  # rows may be none
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)))


def as_float64(out: Any) -> Any:
    """A result (a NumPy array, a torch tensor, or a list or tuple of them) as one flat float64
    NumPy array (tensors detached and copied to the host: gpu.py checks CUDA results too)."""
    import numpy as np

    if isinstance(out, (list, tuple)):
        return np.concatenate([as_float64(o).ravel() for o in out])
    return np.asarray(out.detach().cpu().numpy() if hasattr(out, "detach") else out, dtype=np.float64)


def check_same(case: str, got: Any, want: Any, rtol: float) -> float:
    """The largest difference of ``got`` from ``want`` relative to ``want``'s largest magnitude
    (results as :func:`as_float64` takes them); raises if the shapes differ or it exceeds
    ``rtol``: a benchmark checks that its candidates compute the same before timing them."""
    import numpy as np

    a, b = as_float64(got), as_float64(want)
    err = float("nan")  # (shapes first: different ones may not broadcast, or broadcast wrongly)
    if a.shape == b.shape:
        err = float(np.abs(a - b).max(initial=0.0) / max(float(np.abs(b).max(initial=0.0)), 1e-300))
    if a.shape != b.shape or not err <= rtol:
        raise AssertionError(
            f"{case}: the results differ (shapes {a.shape}, {b.shape}; rel. err {err:.1e}, tol {rtol:.0e})"
        )
    return err
