"""lowrank_fusion on CPU: mmfuse vs LMF's released algorithm vs the GEMM-only bound.

Run: ``python benchmarks/fusion_cpu.py [--json FILE] [--quick]``.

Candidates, float32, all cores:

- ``mmfuse-numpy``: ``mmfuse.lowrank_fusion`` on NumPy arrays (Array-API core).
- ``mmfuse-torch``: the same call on torch CPU tensors (Array-API core, autograd-capable).
- ``lmf-torch``: the algorithm of LMF's released code: append the constant, one batched matmul
  per modality giving (R, B, h), elementwise product, rank-weighted sum by a matmul.
- ``gemm-bound``: only the multiply-adds, as one GEMM per modality (B, d_m + 1) @ (d_m + 1, R h)
  on pre-built inputs, nothing else.  mmfuse does these plus the product and rank sum.

Before timing a case, both mmfuse candidates' outputs are checked against ``lmf-torch``'s
(relative error at most ``RTOL``); a mismatch raises and nothing is timed.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import arg_parser, check_same, machine, peak_rss_mib, print_table, time_candidates

CASES = {
    "B4096-d32,32,128-h128-R16": (4096, (32, 32, 128), 128, 16),
    "B65536-d8,16,64-h1-R4": (65536, (8, 16, 64), 1, 4),
}


def setup(case: str) -> dict[str, object]:
    import torch

    import mmfuse

    batch, dims, out_dim, rank = CASES[case]
    rng = np.random.default_rng(20261122)
    xs = [rng.standard_normal((batch, d), dtype=np.float32) for d in dims]
    params = mmfuse.init_lowrank(dims, rank=rank, out_dim=out_dim, seed=rng, dtype=np.float32)
    factors, weights = params["factors"], params["weights"]
    bias = rng.standard_normal(out_dim, dtype=np.float32)

    t_xs = [torch.from_numpy(x) for x in xs]
    t_factors = [torch.from_numpy(f) for f in factors]
    t_weights = torch.from_numpy(weights)
    t_bias = torch.from_numpy(bias)

    def mmfuse_numpy():
        return mmfuse.lowrank_fusion(xs, factors, weights, bias)

    def mmfuse_torch():
        return mmfuse.lowrank_fusion(t_xs, t_factors, t_weights, t_bias, backend="array_api")

    lmf_weights = t_weights[None, :]  # LMF's fusion_weights is (1, R)

    def lmf_torch():
        # LMF's released forward (constant prepended there; appended here, same cost)
        fused = None
        for x, f in zip(t_xs, t_factors):
            hat = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
            proj = torch.matmul(hat, f)  # (R, B, h)
            fused = proj if fused is None else fused * proj
        out = torch.matmul(lmf_weights, fused.permute(1, 0, 2)).squeeze(1)
        return out + t_bias

    hats = [np.concatenate([x, np.ones((batch, 1), np.float32)], axis=1) for x in xs]
    flats = [np.ascontiguousarray(f.transpose(1, 0, 2).reshape(f.shape[1], -1)) for f in factors]

    def gemm_bound():
        return [h @ f for h, f in zip(hats, flats)]

    return {
        "mmfuse-numpy": mmfuse_numpy,
        "mmfuse-torch": mmfuse_torch,
        "lmf-torch": lmf_torch,
        "gemm-bound": gemm_bound,
    }


RTOL = 1e-5  # float32 against float32: observed ~1e-7; a wrong or missing term is far above


def check(case: str, cands: dict[str, object]) -> dict[str, float]:
    """Max relative error of each mmfuse candidate against LMF's algorithm (all float32); raises
    (:func:`_harness.check_same`) past ``RTOL``, before anything is timed."""
    want = cands["lmf-torch"]()
    return {name: check_same(f"{case} {name} vs lmf-torch", cands[name](), want, RTOL)
            for name in ("mmfuse-numpy", "mmfuse-torch")}  # fmt: skip


def main() -> None:
    args = arg_parser(__doc__).parse_args()
    import torch

    print(f"machine: {machine()}; torch threads {torch.get_num_threads()}")
    rows, results = [], []
    for case in CASES:
        cands = setup(case)
        errs = check(case, cands)
        times = time_candidates(cands, repeats=5 if args.quick else 15)
        mem = {} if args.quick else {n: peak_rss_mib("fusion_cpu", case, n) for n in cands}
        for name, t in times.items():
            row = {
                "case": case,
                "candidate": name,
                "ms": f"{t * 1e3:.2f}",
                "lmf/this": f"{times['lmf-torch'] / t:.2f}",
                "this/gemm": f"{t / times['gemm-bound']:.2f}",
                "peak MiB": f"{mem[name]:.1f}" if name in mem else "-",
            }
            rows.append(row)
            # each row its own check; None for lmf-torch (the reference) and gemm-bound (only the
            # projections, not the fused output: nothing to compare)
            results.append({"case": case, "candidate": name, "seconds": t, "peak_mib": mem.get(name),
                            "rel_err_vs_lmf": errs.get(name)})  # fmt: skip
    print_table(rows, ["case", "candidate", "ms", "lmf/this", "this/gemm", "peak MiB"])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine(), "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
