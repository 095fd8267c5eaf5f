"""Interaction terms by order vs the plain fusion they explain (issue 22), on CPU.

Run: ``python benchmarks/interactions.py [--json FILE] [--quick]``.

The target: ``lowrank_interactions(..., by="order")`` at M = 8 costs at most 2x a plain
``lowrank_fusion`` call at (B, M x d, h, R) = (4096, 8 x 32, 64, 8).  Candidates, float32,
NumPy arrays, all cores, side by side in one process:

- ``lowrank_fusion``: the fused output, (B, h).
- ``lowrank_interactions-order``: its M + 1 = 9 terms by order, (9, B, h), by the O(M^2)
  recursion per rank.
- ``cp_interactions-order`` / ``cp_fusion``: the same for a CP fusion of rank 64 (for context).
- ``lowrank_interactions-subset`` (M = 4 only; by subset is 2^M terms).

The ratio column is each candidate's time over its plain fusion's; "per-round" is its range
over the interleaved rounds.  On a shared machine, OpenBLAS's worker threads spin while other
processes hold the cores and every GEMM-heavy call slows down erratically; there, run with
``OPENBLAS_NUM_THREADS=1`` for ratios that mean something (every candidate then runs on one
core, the elementwise work always does).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import arg_parser, machine, peak_rss_mib, print_table, round_ratios, sample_rounds

# (batch, dims, out_dim, rank)
CASES = {
    "B4096-8x32-h64-R8": (4096, (32,) * 8, 64, 8),
    "B4096-4x32-h64-R8": (4096, (32,) * 4, 64, 8),
}
BASE = {
    "lowrank_interactions-order": "lowrank_fusion",
    "lowrank_interactions-subset": "lowrank_fusion",
    "cp_interactions-order": "cp_fusion",
}


def setup(case: str) -> dict[str, object]:
    import mmfuse

    batch, dims, out_dim, rank = CASES[case]
    rng = np.random.default_rng(20261202)
    xs = [rng.standard_normal((batch, d), dtype=np.float32) for d in dims]
    p = mmfuse.init_lowrank(dims, rank=rank, out_dim=out_dim, seed=rng, dtype=np.float32)
    factors, weights = p["factors"], p["weights"]
    cp_rank = 64
    cp = (
        np.ones(cp_rank, np.float32),
        [(rng.standard_normal((d + 1, cp_rank)) / np.sqrt(d + 1)).astype(np.float32) for d in dims]
        + [(rng.standard_normal((out_dim, cp_rank)) / np.sqrt(cp_rank)).astype(np.float32)],
    )
    cands = {
        "lowrank_fusion": lambda: mmfuse.lowrank_fusion(xs, factors, weights),
        "lowrank_interactions-order": lambda: mmfuse.lowrank_interactions(xs, factors, weights)[0],
        "cp_fusion": lambda: mmfuse.cp_fusion(xs, cp),
        "cp_interactions-order": lambda: mmfuse.cp_interactions(xs, cp)[0],
    }
    if len(dims) <= 4:
        cands["lowrank_interactions-subset"] = lambda: mmfuse.lowrank_interactions(
            xs, factors, weights, by="subset"
        )[0]
    return cands


def check(cands: dict[str, object]) -> float:
    """Max relative error of the terms' sum against the fused output (both float32)."""
    y = np.asarray(cands["lowrank_fusion"](), dtype=np.float64)
    terms = np.asarray(cands["lowrank_interactions-order"](), dtype=np.float64)
    return float(np.abs(terms.sum(axis=0) - y).max() / np.abs(y).max())


def main() -> None:
    args = arg_parser(__doc__).parse_args()
    print(f"machine: {machine()}")
    rows, results = [], []
    for case in CASES:
        cands = setup(case)
        err = check(cands)
        rounds = sample_rounds(cands, repeats=6 if args.quick else 15)
        times = {name: float(np.median([t for r in rs for t in r])) for name, rs in rounds.items()}
        mem = {} if args.quick else {n: peak_rss_mib("interactions", case, n) for n in cands}
        for name, t in times.items():
            base = BASE.get(name)
            ratio = t / times[base] if base else 1.0
            spread = ""
            if base:
                per_round = [1 / r for r in round_ratios(rounds, base, name)]
                spread = f"{min(per_round):.2f}-{max(per_round):.2f}"
            rows.append({
                "case": case,
                "candidate": name,
                "ms": f"{t * 1e3:.2f}",
                "this/fusion": f"{ratio:.2f}",
                "per-round": spread,
                "peak MiB": f"{mem[name]:.1f}" if name in mem else "-",
            })
            results.append({
                "case": case, "candidate": name, "seconds": t, "ratio_to_fusion": ratio,
                "peak_mib": mem.get(name), "rel_err_sum_vs_fusion": err,
            })
    print_table(rows, ["case", "candidate", "ms", "this/fusion", "per-round", "peak MiB"])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine(), "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
