"""GPU benchmark: mmfuse's numba and CuPy kernels against straightforward torch CUDA code.

Run on a CUDA machine (``python benchmarks/gpu.py``, optionally ``--quick``).  For each case it
first checks every candidate against a float64 result on the same inputs, then times all
candidates side by side in one process with CUDA events (median of repeats after warm-up,
round-robin), records peak device memory per candidate, and prints a table with ratios.

Cases (issue 6):

- ``lowrank_fusion`` float32, TF32 off everywhere, at (B, dims, h, R) =
  (65536, (32, 32, 128), 128, 16), (262144, (8, 16, 64), 1, 4),
  (16384, (256, 256, 256), 256, 16).  Candidates: ``lmf`` (torch, in the style of LMF's
  released code: concatenate a ones column, one matmul per modality into (B, R, h), product,
  weighted rank sum), ``numba`` and ``cupy`` (mmfuse backends), ``gemm-only`` (just the M
  projection GEMMs of the same shapes: the lower bound).  Forward+backward is timed for
  ``lmf`` and for the torch backend when it is installed (``mmfuse.lowrank_fusion`` on torch
  tensors with ``backend="torch"``).
- ``zoom_shift`` float32 on (256, 512, 512): ``numba``, ``cupy``, ``array_api`` (torch), and a
  device-to-device copy of x; the bandwidth counts x and guide read once and the output
  written once, against the measured copy bandwidth.

Also issue 5's layer comparison (``benchmarks/torch_cpu.py``'s candidates) on CUDA tensors.
Results of a run on an H100: benchmarks/RESULTS.md (``--json`` wrote docs/performance/gpu_h100.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

LOWRANK_CASES = [
    (65536, (32, 32, 128), 128, 16),
    (262144, (8, 16, 64), 1, 4),
    (16384, (256, 256, 256), 256, 16),
]
ZOOM_SHAPE = (256, 512, 512)


def _torch() -> Any:
    import torch

    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA device (torch.cuda.is_available() is False)")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch


def time_cuda(cands: dict[str, Callable[[], Any]], *, repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median milliseconds per call, CUDA events, round-robin over candidates."""
    torch = _torch()
    for fn in cands.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    samples: dict[str, list[float]] = {k: [] for k in cands}
    for _ in range(repeats):
        for name, fn in cands.items():
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            samples[name].append(start.elapsed_time(stop))
    return {k: statistics.median(v) for k, v in samples.items()}


def peak_mib(fn: Callable[[], Any]) -> float:
    """Peak device memory of one call beyond what was allocated before it (torch + CuPy pools)."""
    torch = _torch()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    pool = None
    if "cupy" in sys.modules:
        import cupy

        pool = cupy.get_default_memory_pool()
        pool.free_all_blocks()
        cupy_base = pool.used_bytes()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    if pool is not None:
        # CuPy's pool keeps its high-water mark in total_bytes after free_all_blocks above.
        peak += max(0, pool.total_bytes() - cupy_base)
    del out
    return peak / 2**20


def lmf_straightforward(torch: Any, xs: list[Any], factors: list[Any], weights: Any, bias: Any) -> Any:
    """LMF's released-code style: [1, x] (here [x, 1]) @ factor for each modality, (B, R, h)."""
    batch = xs[0].shape[0]
    prod = None
    for x, f in zip(xs, factors):
        hat = torch.cat([x, torch.ones(batch, 1, dtype=x.dtype, device=x.device)], dim=1)
        proj = torch.matmul(hat, f)  # (R, B, h)
        prod = proj if prod is None else prod * proj
    out = torch.matmul(weights, prod.permute(1, 0, 2)).squeeze(1)  # (B, h)
    return out + bias


def check(name: str, got: Any, want: np.ndarray, rtol: float = 2e-4) -> None:
    from mmfuse._namespace import to_numpy

    a = to_numpy(got)
    err = float(np.max(np.abs(a - want))) if want.size else 0.0
    scale = float(np.max(np.abs(want))) or 1.0
    status = "ok" if err <= rtol * scale else "MISMATCH"
    print(f"  check {name:<12} max|err|/max|ref| = {err / scale:.2e}  {status}")
    if status != "ok":
        raise SystemExit(f"{name} does not match the float64 result")


def bench_lowrank(quick: bool) -> list[tuple[str, str, float, float]]:
    torch = _torch()
    import mmfuse

    rows: list[tuple[str, str, float, float]] = []
    backends = [b for b in ("numba", "cupy") if b in mmfuse.backends.available("lowrank_fusion")]
    for batch, dims, out_dim, rank in LOWRANK_CASES:
        rows += _lowrank_case(torch, backends, min(batch, 8192) if quick else batch, dims, out_dim, rank, quick)
    return rows


def _lowrank_case(
    torch: Any, backends: list[str], batch: int, dims: tuple[int, ...], out_dim: int, rank: int, quick: bool
) -> list[tuple[str, str, float, float]]:
    import mmfuse

    rows = []
    label = f"lowrank B={batch} dims={dims} h={out_dim} R={rank}"
    print(label)
    gen = torch.Generator(device="cuda").manual_seed(0)
    xs = [torch.randn(batch, d, device="cuda", generator=gen) for d in dims]
    factors = [torch.randn(rank, d + 1, out_dim, device="cuda", generator=gen) / (d + 1) ** 0.5 for d in dims]
    weights = torch.randn(1, rank, device="cuda", generator=gen)
    bias = torch.randn(out_dim, device="cuda", generator=gen)
    # float64 result on the first rows, from the straightforward code in float64
    n_chk = min(batch, 2048)
    want = lmf_straightforward(
        torch, [x[:n_chk].double() for x in xs], [f.double() for f in factors], weights.double(), bias.double()
    ).cpu().numpy()
    cands: dict[str, Callable[[], Any]] = {
        "lmf": lambda: lmf_straightforward(torch, xs, factors, weights, bias),
        "gemm-only": lambda: [torch.matmul(x, f[:, :-1, :]) for x, f in zip(xs, factors)],
    }
    w1 = weights[0]
    for b in backends:
        if b == "cupy":
            import cupy

            cxs = [cupy.from_dlpack(x) for x in xs]
            cfs = [cupy.from_dlpack(f) for f in factors]
            cw, cb = cupy.from_dlpack(w1), cupy.from_dlpack(bias)
            cands["cupy"] = lambda cxs=cxs, cfs=cfs, cw=cw, cb=cb: mmfuse.lowrank_fusion(cxs, cfs, cw, cb, backend="cupy")
        else:
            cands["numba"] = lambda: mmfuse.lowrank_fusion(xs, factors, w1, bias, backend="numba")
    for name, fn in cands.items():
        if name != "gemm-only":
            check(name, fn()[:n_chk], want)
    times = time_cuda(cands, repeats=5 if quick else 20)
    for name, ms in times.items():
        rows.append((label, f"{name} fwd", ms, peak_mib(cands[name])))
    # forward + backward
    params = [f.detach().requires_grad_(True) for f in factors]
    xg = [x.detach().requires_grad_(True) for x in xs]
    fb: dict[str, Callable[[], Any]] = {
        "lmf": lambda: lmf_straightforward(torch, xg, params, weights, bias).sum().backward(),
    }
    if "torch" in mmfuse.backends.available("lowrank_fusion"):
        fb["mmfuse-torch"] = lambda: mmfuse.lowrank_fusion(xg, params, w1, bias, backend="torch").sum().backward()
    times = time_cuda(fb, repeats=5 if quick else 20)
    for name, ms in times.items():
        rows.append((label, f"{name} fwd+bwd", ms, peak_mib(fb[name])))
    return rows


def bench_zoom_shift(quick: bool) -> tuple[list[tuple[str, str, float, float]], float]:
    torch = _torch()
    import mmfuse

    shape = (32, 512, 512) if quick else ZOOM_SHAPE
    label = f"zoom_shift {shape}"
    print(label)
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(*shape, device="cuda", generator=gen)
    guide = 2 + 3 * torch.randn(*shape, device="cuda", generator=gen)
    want = mmfuse.zoom_shift(x[:4].double(), guide[:4].double(), alpha=0.5, backend="array_api").cpu().numpy()
    cands: dict[str, Callable[[], Any]] = {
        "copy": lambda: x.clone(),
        "array_api": lambda: mmfuse.zoom_shift(x, guide, alpha=0.5, backend="array_api"),
    }
    avail = mmfuse.backends.available("zoom_shift")
    if "numba" in avail:
        cands["numba"] = lambda: mmfuse.zoom_shift(x, guide, alpha=0.5, backend="numba")
    if "cupy" in avail:
        import cupy

        cx, cg = cupy.from_dlpack(x), cupy.from_dlpack(guide)
        cands["cupy"] = lambda: mmfuse.zoom_shift(cx, cg, alpha=0.5, backend="cupy")
    for name, fn in cands.items():
        if name != "copy":
            check(name, fn()[:4], want)
    times = time_cuda(cands, repeats=5 if quick else 20)
    nbytes = x.numel() * x.element_size()
    copy_bw = 2 * nbytes / (times["copy"] * 1e-3)
    rows = []
    for name, ms in times.items():
        moved = 2 * nbytes if name == "copy" else 3 * nbytes
        bw = moved / (ms * 1e-3)
        rows.append((label, f"{name} ({bw / 1e9:.0f} GB/s, {bw / copy_bw:.0%} of copy)", ms, peak_mib(cands[name])))
    return rows, copy_bw


def bench_layers(quick: bool) -> list[tuple[str, str, float, float]]:
    """Issue 5's layer comparison (benchmarks/torch_cpu.py's candidates) on CUDA tensors."""
    _torch()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch_cpu

    rows = []
    for case in (*torch_cpu.CASES, *torch_cpu.WANDER_CASES):
        base = torch_cpu.BASELINE[case]
        label = f"{case} fwd+bwd"
        print(label)
        cands = torch_cpu.setup(case, device="cuda")
        print(f"  check mmfuse-layer vs {base}: max rel. error {torch_cpu.check(cands, base):.1e}")
        times = time_cuda(cands, repeats=5 if quick else 20)
        for name, ms in sorted(times.items(), key=lambda kv: kv[0] != base):
            rows.append((label, name, ms, peak_mib(cands[name])))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes, fewer repeats")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    torch = _torch()
    device = f"{torch.cuda.get_device_name()}  torch {torch.__version__}"
    print(f"device: {device}")
    rows = bench_lowrank(args.quick)
    zrows, _ = bench_zoom_shift(args.quick)
    rows += zrows
    rows += bench_layers(args.quick)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": device, "rows": [dict(zip(("case", "candidate", "ms", "peak_mib"), r)) for r in rows]},
                      fh, indent=2)  # fmt: skip
    print()
    print(f"{'case':<58} {'candidate':<44} {'ms':>9} {'peak MiB':>9} {'vs first':>9}")
    first: dict[str, float] = {}
    for case, cand, ms, mib in rows:
        base = first.setdefault(case, ms)
        print(f"{case:<58} {cand:<44} {ms:9.3f} {mib:9.1f} {ms / base:9.2f}")


if __name__ == "__main__":
    main()
