"""Interaction terms by order vs the plain fusion they explain (issue 22), on CPU.

Run: ``OPENBLAS_NUM_THREADS=1 python benchmarks/interactions.py [--json FILE] [--quick]``.

The target: ``lowrank_interactions(..., by="order")`` at M = 8 costs at most 2x a plain
``lowrank_fusion`` call at (B, M x d, h, R) = (4096, 8 x 32, 64, 8).  Candidates, float32
(``--dtype float64`` for the other), all side by side in one process:

- ``lowrank_fusion``: the fused output, (B, h), NumPy arrays ("auto": the cache-blocked core).
- ``lowrank_interactions-order``: its M + 1 = 9 terms by order, (9, B, h), by the O(M^2)
  recursion per rank ("auto" on NumPy arrays: the core's NumPy variant, in-place ufuncs).
- ``lowrank_interactions-order[numba]`` (numba installed): the same terms with the recursion
  compiled (:mod:`mmfuse.backends._numba_interactions`), called directly: the registry has no
  row for it yet, so "auto" does not pick it.
- ``cp_interactions-order`` / ``cp_fusion``: the same for a CP fusion of rank 64 (for context),
  NumPy and numba.
- ``lowrank_interactions-subset`` (M = 4 only; by subset is 2^M terms).
- ``torch ...`` (torch installed, M = 8): the same calls on torch CPU tensors ("auto": the
  torch backend's custom op for the fusion, the core's autograd path for the terms) and the
  numba kernel through NumPy views of the tensors.

The ratio column is each candidate's median time over its plain fusion's (same namespace);
"p10-p90" is the spread of that ratio over the interleaved rounds (each round times both
within milliseconds of each other).  On a shared machine, OpenBLAS's and torch's worker
threads spin while other processes hold the cores and every GEMM-heavy call slows down
erratically (the fusion's median can move 10x); there, run with ``OPENBLAS_NUM_THREADS=1``
(torch then runs on one thread too: :func:`main` sets it) for ratios that mean something.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import arg_parser, machine, peak_rss_mib, print_table, quantile, round_ratios, sample_rounds

# (batch, dims, out_dim, rank)
CASES = {
    "B4096-8x32-h64-R8": (4096, (32,) * 8, 64, 8),
    "B4096-4x32-h64-R8": (4096, (32,) * 4, 64, 8),
}
BASE = {
    "lowrank_interactions-order": "lowrank_fusion",
    "lowrank_interactions-order[numba]": "lowrank_fusion",
    "lowrank_interactions-subset": "lowrank_fusion",
    "cp_interactions-order": "cp_fusion",
    "cp_interactions-order[numba]": "cp_fusion",
    "torch lowrank_interactions-order": "torch lowrank_fusion",
    "torch lowrank_interactions-order[numba]": "torch lowrank_fusion",
}
HAS_NUMBA = importlib.util.find_spec("numba") is not None
HAS_TORCH = importlib.util.find_spec("torch") is not None
DTYPE = os.environ.get("MMFUSE_BENCH_DTYPE", "float32")


def setup(case: str) -> dict[str, object]:
    import mmfuse

    batch, dims, out_dim, rank = CASES[case]
    dtype = np.dtype(DTYPE)
    rng = np.random.default_rng(20261202)
    xs = [rng.standard_normal((batch, d)).astype(dtype) for d in dims]
    p = mmfuse.init_lowrank(dims, rank=rank, out_dim=out_dim, seed=rng, dtype=dtype)
    factors, weights = p["factors"], p["weights"]
    cp_rank = 64
    cp = (
        np.ones(cp_rank, dtype),
        [(rng.standard_normal((d + 1, cp_rank)) / np.sqrt(d + 1)).astype(dtype) for d in dims]
        + [(rng.standard_normal((out_dim, cp_rank)) / np.sqrt(cp_rank)).astype(dtype)],
    )
    cands = {
        "lowrank_fusion": lambda: mmfuse.lowrank_fusion(xs, factors, weights),
        "lowrank_interactions-order": lambda: mmfuse.lowrank_interactions(xs, factors, weights)[0],
        "cp_fusion": lambda: mmfuse.cp_fusion(xs, cp),
        "cp_interactions-order": lambda: mmfuse.cp_interactions(xs, cp)[0],
    }
    if HAS_NUMBA:
        from mmfuse.backends import _numba_interactions as nbi

        cands["lowrank_interactions-order[numba]"] = lambda: nbi.lowrank_interactions_cpu(
            xs, factors, weights
        )[0]
        cands["cp_interactions-order[numba]"] = lambda: nbi.cp_interactions_cpu(xs, cp)[0]
    if len(dims) <= 4:
        cands["lowrank_interactions-subset"] = lambda: mmfuse.lowrank_interactions(
            xs, factors, weights, by="subset"
        )[0]
    elif HAS_TORCH:
        import torch

        txs = [torch.from_numpy(x) for x in xs]
        tf, tw = [torch.from_numpy(f) for f in factors], torch.from_numpy(weights)
        cands["torch lowrank_fusion"] = lambda: mmfuse.lowrank_fusion(txs, tf, tw)
        cands["torch lowrank_interactions-order"] = lambda: mmfuse.lowrank_interactions(txs, tf, tw)[0]
        if HAS_NUMBA:
            cands["torch lowrank_interactions-order[numba]"] = lambda: nbi.lowrank_interactions_cpu(
                txs, tf, tw
            )[0]
    return cands


def check(cands: dict[str, object]) -> float:
    """Max relative error of every candidate's terms summed over the orders against the fused
    output of its namespace."""
    worst = 0.0
    for name, base in BASE.items():
        if name not in cands or name.endswith("-subset"):
            continue
        y = np.asarray(cands[base](), dtype=np.float64)
        terms = np.asarray(cands[name](), dtype=np.float64)
        worst = max(worst, float(np.abs(terms.sum(axis=0) - y).max() / np.abs(y).max()))
    return worst


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--dtype", default=DTYPE, choices=["float32", "float64"])
    args = parser.parse_args()
    os.environ["MMFUSE_BENCH_DTYPE"] = args.dtype  # the memory runs' subprocesses too
    globals()["DTYPE"] = args.dtype
    if HAS_TORCH and os.environ.get("OPENBLAS_NUM_THREADS") == "1":
        import torch

        torch.set_num_threads(1)
    print(
        f"machine: {machine()}; {args.dtype}; OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}"
    )
    rows, results = [], []
    for case in CASES:
        cands = setup(case)
        err = check(cands)
        rounds = sample_rounds(cands, repeats=8 if args.quick else 24)
        times = {name: float(np.median([t for r in rs for t in r])) for name, rs in rounds.items()}
        mem = {} if args.quick else {n: peak_rss_mib("interactions", case, n) for n in cands}
        for name, t in times.items():
            base = BASE.get(name)
            ratio = t / times[base] if base else 1.0
            spread, lo, hi = "", None, None
            if base:
                per_round = [1 / r for r in round_ratios(rounds, base, name)]
                lo, hi = quantile(per_round, 0.1), quantile(per_round, 0.9)
                spread = f"{lo:.2f}-{hi:.2f}"
            rows.append(
                {
                    "case": case,
                    "candidate": name,
                    "ms": f"{t * 1e3:.2f}",
                    "this/fusion": f"{ratio:.2f}",
                    "p10-p90": spread,
                    "peak MiB": f"{mem[name]:.1f}" if name in mem else "-",
                }
            )
            results.append(
                {
                    "case": case,
                    "candidate": name,
                    "dtype": args.dtype,
                    "seconds": t,
                    "ratio_to_fusion": ratio,
                    "ratio_p10": lo,
                    "ratio_p90": hi,
                    "peak_mib": mem.get(name),
                    "rel_err_sum_vs_fusion": err,
                }
            )
        print(f"{case}: max relative error of the terms' sum against the fusion {err:.1e}")
    print_table(rows, ["case", "candidate", "ms", "this/fusion", "p10-p90", "peak MiB"])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine(), "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
