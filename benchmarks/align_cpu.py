"""zoom_shift and align on CPU: mmfuse vs a straightforward torch version vs a NumPy copy.

Run: ``python benchmarks/align_cpu.py [--json FILE] [--quick]``.

Inputs (B, T, C) = (64, 512, 256) float32 per modality, all cores.  Candidates per case:

- ``mmfuse-numba``: the public function on NumPy arrays with ``backend="numba"`` (the numba
  CPU kernels: one loop nest per pass over a sample; what "auto" runs once numba is imported).
- ``mmfuse-numpy``: the same call on the Array-API core's NumPy fast path
  (``backend="array_api"``; cache-blocked: each input is read from memory once for its
  statistics; zoom_shift maps each block while in cache); what "auto" runs without numba.
- ``mmfuse-torch``: the same call on torch CPU tensors (the Array-API core, autograd-capable).
- ``torch-straight``: the straightforward torch version: mean, then std, then the affine map as
  separate ops (align: the rounds literally, re-measuring every array each round).
- ``numpy-copy``: ``np.copy`` of one input: the bandwidth yardstick.

Effective bandwidth = (bytes of every input read once + bytes of every output written once) /
time; ``bw/copy`` divides it by the copy's (2 x nbytes / time).  Targets (issue 4): mmfuse at
least 1.5x faster than ``torch-straight`` and at least 50% of copy bandwidth.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import arg_parser, machine, peak_rss_mib, print_table, time_candidates

SHAPE = (64, 512, 256)
EPS = 1e-5
ALPHA = 0.5
# case -> (number of modalities, what runs); bytes moved = 2 inputs + outputs
CASES = {
    "zoom_shift": (2, "zoom_shift"),
    "align-r1": (2, "align", 1),
    "align-r3": (2, "align", 3),
    "align-limit-M3": (3, "align", None),
}


def _torch_zoom_shift(torch, x, guide, alpha):
    """The straightforward version: mean, std, then the affine map, each a separate op."""
    mx = x.mean(dim=1, keepdim=True)
    sx = torch.sqrt(x.var(dim=1, correction=0, keepdim=True) + EPS)
    mg = guide.mean(dim=1, keepdim=True)
    sg = torch.sqrt(guide.var(dim=1, correction=0, keepdim=True) + EPS)
    return mx + (x - mx) * (sg / sx) ** alpha + alpha * (mg - mx)


def setup(case: str) -> dict[str, object]:
    import torch

    import mmfuse

    n, op, *extra = CASES[case]
    rng = np.random.default_rng(20261122)
    xs = [
        (float(m) + (1.0 + m) * rng.standard_normal(SHAPE, dtype=np.float32)).astype(np.float32)
        for m in range(n)
    ]
    ts = [torch.from_numpy(x) for x in xs]
    if op == "zoom_shift":
        alpha = 1.0

        def mmfuse_numba():
            return mmfuse.zoom_shift(xs[0], xs[1], alpha=alpha, eps=EPS, backend="numba")

        def mmfuse_numpy():
            return mmfuse.zoom_shift(xs[0], xs[1], alpha=alpha, eps=EPS, backend="array_api")

        def mmfuse_torch():
            return mmfuse.zoom_shift(ts[0], ts[1], alpha=alpha, eps=EPS, backend="array_api")

        def straight():
            return _torch_zoom_shift(torch, ts[0], ts[1], alpha)

    else:
        rounds = extra[0]
        opts = {"rounds": rounds, "alpha": ALPHA, "eps": EPS}

        def mmfuse_numba():
            return mmfuse.align(xs, backend="numba", **opts)

        def mmfuse_numpy():
            return mmfuse.align(xs, backend="array_api", **opts)

        def mmfuse_torch():
            return mmfuse.align(ts, backend="array_api", **opts)

        def straight():
            ys = list(ts)
            for _ in range(rounds if rounds is not None else 0):
                for i in range(n):  # Gauss-Seidel, consensus (M = 2: toward the other)
                    ys[i] = _torch_zoom_shift(torch, ys[i], ys[1 - i], ALPHA)
            return ys

    cands = {"mmfuse-numba": mmfuse_numba, "mmfuse-numpy": mmfuse_numpy, "mmfuse-torch": mmfuse_torch}
    if op == "zoom_shift" or extra[0] is not None:
        cands["torch-straight"] = straight
    cands["numpy-copy"] = lambda: xs[0].copy()
    return cands


def moved_bytes(case: str) -> int:
    n, op, *_ = CASES[case]
    nbytes = int(np.prod(SHAPE)) * 4
    outputs = 1 if op == "zoom_shift" else n
    return (n + outputs) * nbytes


def check(case: str, cands: dict[str, object]) -> float:
    """Max relative difference of the NumPy-array candidates (numba, numpy) against the torch
    version (or mmfuse-torch)."""
    b = cands["torch-straight" if "torch-straight" in cands else "mmfuse-torch"]()
    b = b if isinstance(b, list) else [b]
    worst = 0.0
    for name in ("mmfuse-numba", "mmfuse-numpy"):
        a = cands[name]()
        a = a if isinstance(a, list) else [a]
        for u, v in zip(a, b):
            v = v.double().numpy()
            worst = max(worst, float(np.abs(np.asarray(u, dtype=np.float64) - v).max() / np.abs(v).max()))
    return worst


def main() -> None:
    args = arg_parser(__doc__).parse_args()
    import torch

    print(f"machine: {machine()}; torch threads {torch.get_num_threads()}")
    rows, results = [], []
    nbytes = int(np.prod(SHAPE)) * 4
    for case in CASES:
        cands = setup(case)
        err = check(case, cands)
        # Two groups, NumPy first: torch's OpenMP workers spin for a while after each parallel
        # region, and interleaved with them NumPy's block threads lose a core (measured: 0.62
        # vs 0.44 of copy bandwidth for zoom_shift).  Each group is still round-robin.
        repeats = 3 if args.quick else 9
        numpy_group = {n: c for n, c in cands.items() if "torch" not in n}
        torch_group = {n: c for n, c in cands.items() if "torch" in n}
        times = {**time_candidates(numpy_group, repeats=repeats), **time_candidates(torch_group, repeats=repeats)}
        times = {n: times[n] for n in cands}
        mem = {} if args.quick else {n: peak_rss_mib("align_cpu", case, n) for n in cands}
        copy_bw = 2 * nbytes / times["numpy-copy"]
        for name, t in times.items():
            bw = (2 * nbytes if name == "numpy-copy" else moved_bytes(case)) / t
            row = {
                "case": case,
                "candidate": name,
                "ms": f"{t * 1e3:.2f}",
                "straight/this": f"{times['torch-straight'] / t:.2f}" if "torch-straight" in times else "-",
                "GB/s": f"{bw / 1e9:.1f}",
                "bw/copy": f"{bw / copy_bw:.2f}",
                "peak MiB": f"{mem[name]:.1f}" if name in mem else "-",
            }
            rows.append(row)
            results.append(
                {"case": case, "candidate": name, "seconds": t, "bytes": moved_bytes(case),
                 "bw_fraction_of_copy": bw / copy_bw, "peak_mib": mem.get(name),
                 "rel_err": err}
            )
        print(f"{case}: max relative difference mmfuse-numba/-numpy vs reference candidate {err:.2e}")
    print_table(rows, ["case", "candidate", "ms", "straight/this", "GB/s", "bw/copy", "peak MiB"])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine(), "shape": SHAPE, "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
