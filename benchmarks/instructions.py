"""Instructions per call of ``overhead.py``'s tiny cases, counted by valgrind's cachegrind.

Run: ``python benchmarks/instructions.py [--only TEXT ...] [--calls N] [--jobs J] [--json FILE]``
(needs ``valgrind``; each run is a Python importing torch under the simulator, about two
minutes on the 2-core VM, ``--jobs`` of them at once: the default selection, the ``zoom_shift``
cases, takes about 6 minutes with 2 jobs).  ``--only TEXT`` (repeatable) selects the cases
whose "case xp" label (``overhead.py``'s, e.g. ``zoom_shift (4,6,5) to (4,7,5) torch``) contains
one of the texts; ``--only ""`` selects all fourteen (over half an hour).

Why: on a shared VM one tiny call's time drifts by more than the pieces a change moves, and a
piece timed alone (``timeit`` of a hot loop) costs two to three times as much inside the call,
where its code competes with the rest for the instruction cache.  Instructions executed do
not drift, and the simulated instruction-cache misses show how much code a call runs
through.  They complement ``overhead.py``'s times (the issue's measure), they do not replace
them.

Method: per namespace, one run that only warms up (each selected case's mmfuse call and plain
code, 50 calls each, under ``torch.no_grad()`` as in ``overhead.py``), and per case and side one
run with the same warm-up followed by N calls (``--calls``, default 2000; 500 with ``--quick``) of that side; the
figures per call are that run's counts less the warm-up run's, divided by N.  A fixed
``PYTHONHASHSEED`` (two runs of one process then differ by a few thousand instructions in
billions).  One thread
(``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``): an idle OpenBLAS thread spinning would
add instructions of its own.

Columns: "k instr" (thousands of instructions per call) of mmfuse and of the plain code, their
ratio, and "k I1 miss" (thousands of simulated first-level instruction-cache misses per call:
cachegrind's model of a cache like this CPU's, not the CPU's own counts, which this VM does
not expose).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import arg_parser, machine, print_table

WARMUP = 50
DEFAULT_ONLY = ["zoom_shift"]


def _child(xp_name: str, labels: list[str], case: str, side: str, calls: int) -> None:
    """Runs under valgrind: warm up every case of ``labels``, then ``calls`` calls of one side."""
    import torch
    from overhead import tiny_cases

    torch.set_num_threads(1)
    cases = tiny_cases(xp_name)
    with torch.no_grad():
        for label in labels:
            for fn in cases[label]:
                for _ in range(WARMUP):
                    fn()
        if calls:
            fn = cases[case][0 if side == "mmfuse" else 1]
            for _ in range(calls):
                fn()


def _counts(args: list[str]) -> dict[str, int]:
    """Run this script's child mode under cachegrind; its totals by event (Ir, I1mr, ...)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "cachegrind.out")
        # (a fixed hash seed: string hashes decide dict and set layouts, which moved a run's
        # count by about 0.6 M instructions between two runs of the same process)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "PYTHONHASHSEED": "0"}  # fmt: skip
        command = ["valgrind", "--tool=cachegrind", "--cache-sim=yes", f"--cachegrind-out-file={out}",
                   sys.executable, os.path.abspath(__file__), "--child", *args]  # fmt: skip
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"cachegrind run {args} failed:\n{done.stderr[-3000:]}")
        events = summary = None
        with open(out) as fh:
            for line in fh:
                if line.startswith("events:"):
                    events = line.split()[1:]
                elif line.startswith("summary:"):
                    summary = [int(v) for v in line.split()[1:]]
        if events is None or summary is None:
            raise RuntimeError(f"cachegrind run {args}: no totals in its output")
        return dict(zip(events, summary))


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--only", action="append", help="cases whose 'case xp' contains this (repeatable)")
    parser.add_argument("--calls", type=int, help="calls counted per run (default 2000, --quick 500)")
    parser.add_argument("--jobs", type=int, default=2, help="cachegrind runs at once (default 2)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # (the runs under valgrind)
    args = parser.parse_args()
    calls = args.calls if args.calls is not None else (500 if args.quick else 2000)
    if calls < 1 or args.jobs < 1:
        parser.error(f"--calls and --jobs must be at least 1, got {calls} and {args.jobs}")
    if args.child:
        xp_name, case, side, child_calls, *labels = args.child
        _child(xp_name, labels, case, side, int(child_calls))
        return
    if shutil.which("valgrind") is None:
        sys.exit("instructions.py needs valgrind (e.g. apt-get install valgrind)")
    from overhead import tiny_cases

    only = DEFAULT_ONLY if args.only is None else args.only
    selected = {
        xp_name: [case for case in tiny_cases(xp_name) if any(text in f"{case} {xp_name}" for text in only)]
        for xp_name in ("numpy", "torch")
    }
    runs: dict[tuple[str, str, str], list[str]] = {}
    for xp_name, labels in selected.items():
        if labels:
            runs[(xp_name, "", "warm-up")] = [xp_name, labels[0], "none", "0", *labels]
        for case in labels:
            for side in ("mmfuse", "plain"):
                runs[(xp_name, case, side)] = [xp_name, case, side, str(calls), *labels]
    if not runs:
        sys.exit(f"no case matches {only}")
    print(f"machine: {machine()}; {len(runs)} cachegrind runs, {args.jobs} at a time", flush=True)
    try:
        with ThreadPoolExecutor(args.jobs) as pool:
            counts = dict(zip(runs, pool.map(_counts, runs.values())))
    except RuntimeError as exc:  # a run under valgrind failed: its own error, no traceback
        sys.exit(f"instructions.py: {exc}")
    rows, results = [], []
    for xp_name, case, side in counts:
        if side != "mmfuse":
            continue
        base = counts[(xp_name, "", "warm-up")]
        per = {
            s: {e: (counts[(xp_name, case, s)][e] - base[e]) / calls for e in ("Ir", "I1mr")}
            for s in ("mmfuse", "plain")
        }
        ratio = per["mmfuse"]["Ir"] / per["plain"]["Ir"]
        rows.append({
            "case": case, "xp": xp_name,
            "k instr mmfuse": f"{per['mmfuse']['Ir'] / 1e3:.1f}", "k instr plain": f"{per['plain']['Ir'] / 1e3:.1f}",
            "instr mmfuse/plain": f"{ratio:.2f}",
            "k I1 miss mmfuse": f"{per['mmfuse']['I1mr'] / 1e3:.2f}", "k I1 miss plain": f"{per['plain']['I1mr'] / 1e3:.2f}",
        })  # fmt: skip
        results.append({"case": case, "namespace": xp_name, "calls": calls, "per_call": per, "ratio_instructions": ratio})
    print("\nTiny inputs, per call, counted (overhead.py's cases; times there)")
    print_table(rows, ["case", "xp", "k instr mmfuse", "k instr plain", "instr mmfuse/plain", "k I1 miss mmfuse",
                       "k I1 miss plain"])  # fmt: skip
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine(), "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
