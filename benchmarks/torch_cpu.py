"""LowRankFusion forward+backward on CPU: mmfuse's custom op vs an LMF-style torch layer.

Run: ``python benchmarks/torch_cpu.py [--json FILE] [--quick]``.

Candidates, float32, all cores, one training step's forward and backward (``out.sum()``
back-propagated to the inputs and all parameters):

- ``mmfuse-layer``: ``mmfuse.nn.LowRankFusion`` (the ``mmfuse::lowrank_fusion`` custom op:
  blocked forward, analytic backward that saves only the inputs).
- ``mmfuse-core``: the same layer forced onto the Array-API core (autograd through it).
- ``lmf-layer``: a straightforward layer in the style of LMF's released code: concatenate the
  constant, one batched matmul per modality giving (R, B, h), elementwise product, rank-weighted
  sum by a matmul, autograd for the backward.

Peak memory is the RSS growth of one forward+backward in a fresh process (see _harness.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import machine, peak_rss_mib, print_table, time_candidates

CASES = {
    "B4096-d32,32,128-h128-R16": (4096, (32, 32, 128), 128, 16),
    "B65536-d8,16,64-h1-R4": (65536, (8, 16, 64), 1, 4),
}


def setup(case: str) -> dict[str, object]:
    import torch

    import mmfuse
    from mmfuse.nn import LowRankFusion

    batch, dims, out_dim, rank = CASES[case]
    torch.manual_seed(20261122)
    xs = [torch.randn(batch, d, requires_grad=True) for d in dims]
    layer = LowRankFusion(dims, out_dim, rank)

    class LMFLayer(torch.nn.Module):
        """LMF's released fusion (constant prepended), parameters from ``layer``."""

        def __init__(self) -> None:
            super().__init__()
            self.factors = torch.nn.ParameterList(
                [torch.nn.Parameter(torch.cat([f[:, -1:], f[:, :-1]], dim=1).detach().clone()) for f in layer.factors]
            )
            self.fusion_weights = torch.nn.Parameter(layer.weights.detach().clone()[None, :])
            self.fusion_bias = torch.nn.Parameter(layer.bias.detach().clone()[None, :])

        def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
            n = inputs[0].shape[0]
            fused = None
            for x, f in zip(inputs, self.factors):
                hat = torch.cat([torch.ones(n, 1, dtype=x.dtype), x], dim=1)
                proj = torch.matmul(hat, f)  # (R, B, h)
                fused = proj if fused is None else fused * proj
            out = torch.matmul(self.fusion_weights, fused.permute(1, 0, 2)).squeeze(1) + self.fusion_bias
            return out.view(-1, out_dim)

    lmf = LMFLayer()

    def step(module, **kw):
        def run():
            for p in (*xs, *module.parameters()):
                p.grad = None
            if kw:
                with mmfuse.config_context(**kw):
                    out = module(xs)
            else:
                out = module(xs)
            out.sum().backward()
            return out

        return run

    return {
        "mmfuse-layer": step(layer),
        "mmfuse-core": step(layer, backend="array_api"),
        "lmf-layer": step(lmf),
    }


def check(cands: dict[str, object]) -> float:
    a = cands["mmfuse-layer"]().detach().double()
    b = cands["lmf-layer"]().detach().double()
    return float((a - b).abs().max() / b.abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write full results here")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, no memory runs")
    args = parser.parse_args()
    import torch

    print(f"machine: {machine()}; torch {torch.__version__}, threads {torch.get_num_threads()}")
    rows, results = [], []
    for case in CASES:
        cands = setup(case)
        err = check(cands)
        times = time_candidates(cands, repeats=5 if args.quick else 15)
        mem = {} if args.quick else {n: peak_rss_mib("torch_cpu", case, n) for n in cands}
        for name, t in times.items():
            row = {
                "case": case,
                "candidate": name,
                "fwd+bwd ms": f"{t * 1e3:.2f}",
                "lmf/this time": f"{times['lmf-layer'] / t:.2f}",
                "peak MiB": f"{mem[name]:.1f}" if name in mem else "-",
                "this/lmf mem": f"{mem[name] / max(mem['lmf-layer'], 1e-9):.2f}" if name in mem else "-",
            }
            rows.append(row)
            results.append({"case": case, "candidate": name, "seconds": t, "peak_mib": mem.get(name), "rel_err_vs_lmf": err})
        print(f"{case}: max rel. error of mmfuse vs LMF-style output {err:.1e}")
    print_table(rows, ["case", "candidate", "fwd+bwd ms", "lmf/this time", "peak MiB", "this/lmf mem"])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine(), "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
