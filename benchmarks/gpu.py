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

Triton kernels (issue 21; the ``"triton"`` backend, ``mmfuse.backends.triton``), run first:

1. Correctness of every kernel against a float64 result on the same inputs: the low-rank
   forward (with and without a ``present`` mask, against the NumPy reference on a slice), its
   two backward kernels (all gradients, against float64 autograd of the LMF-style code), the
   CP forward and its backward; in float32 (TF32 off) and bfloat16 at the three sizes (the
   gradient checks on the first 4096 rows); bit-identical reruns (same rows); ``moments``
   and ``zoom_shift`` (token masks, alpha 1 and 0.5, token axes in one tile and in blocks,
   against the Array-API core in float64); and ``torch.compile`` of the ``triton_op``
   (forward and backward) against eager.
2. Timings at the three sizes, float32 TF32 off and bfloat16: forward of ``triton``,
   ``lmf``, ``mmfuse-torch`` and ``gemm-only``; forward+backward of ``triton``, ``lmf`` and
   ``mmfuse-torch``; peak memory of each.  The closing table holds issue 21's targets:
   forward >= 2x LMF and <= 1.3x GEMM-only, forward+backward >= 1.5x LMF, peak memory
   <= 0.25x LMF's; and ``zoom_shift`` (256, 512, 512) float32 against copy bandwidth
   (target >= 80%).

Then the older sections (numba/CuPy lowrank, zoom_shift, layers) while the time budget
(``--budget-s``, default 420 s) lasts.  The JSON goes to ``--json``, else ``$OUT/gpu.json``
when ``$OUT`` is set.

``--sweep`` adds the low-rank kernels' times under other tile sizes (the defaults come from
``ptxas`` register counts, not timings).

``--cpu-check`` runs the Triton correctness helpers on tiny CPU tensors under Triton's
interpreter (no GPU needed; what CI can check of this script).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

LOWRANK_CASES = [
    (65536, (32, 32, 128), 128, 16),
    (262144, (8, 16, 64), 1, 4),
    (16384, (256, 256, 256), 256, 16),
]
ZOOM_SHAPE = (256, 512, 512)
# issue 21's targets: forward speed-up over LMF, forward time over GEMM-only, forward+backward
# speed-up over LMF, peak memory over LMF's (forward and forward+backward)
TARGETS = {"fwd_vs_lmf": 2.0, "fwd_vs_gemm": 1.3, "fb_vs_lmf": 1.5, "mem_vs_lmf": 0.25}


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


# --------------------------------------------------------------------------- Triton (issue 21)


def _lowrank_inputs(
    torch: Any, batch: int, dims: tuple[int, ...], out_dim: int, rank: int, dtype: Any, device: str, seed: int = 0
) -> tuple[list[Any], list[Any], Any, Any]:
    """xs (B, d_m), factors (R, d_m + 1, h) scaled so the product of M projections is O(1),
    rank weights (R,), bias (h,): generated in float32, then cast (identical across dtypes)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int) -> Any:
        return torch.randn(*shape, device=device, generator=gen)

    xs = [randn(batch, d).to(dtype) for d in dims]
    factors = [(randn(rank, d + 1, out_dim) / (d + 1) ** 0.5).to(dtype) for d in dims]
    return xs, factors, randn(rank).to(dtype), randn(out_dim).to(dtype)


def _rel_err(got: Any, want: Any) -> float:
    """max |got - want| / max |want| (float64)."""
    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    scale = float(w.abs().max()) if w.numel() else 1.0
    return float((g - w).abs().max()) / (scale or 1.0) if w.numel() else 0.0


def _grads(torch: Any, fn: Callable[[], Any], leaves: list[Any], upstream: Any) -> tuple[Any, list[Any]]:
    out = fn()
    return out, list(torch.autograd.grad((out.to(upstream.dtype) * upstream).sum(), leaves))


def check_triton_lowrank(
    torch: Any, device: str, dtype: Any, batch: int, dims: tuple[int, ...], out_dim: int, rank: int,
    n_check: int = 4096,
) -> list[dict[str, Any]]:
    """Correctness of the low-rank kernels on the first ``n_check`` rows of a problem: the
    forward and all gradients against float64 autograd of the LMF-style code, the forward with
    a ``present`` mask (NaN in absent rows) against the NumPy reference, and a bit-identical
    rerun.  Returns one row per check (name, max relative error, tolerance, ok)."""
    import mmfuse
    import mmfuse.reference as ref
    from mmfuse.testing import default_rtol

    rows: list[dict[str, Any]] = []
    tol = default_rtol(str(dtype).rsplit(".", 1)[-1])
    label = f"triton lowrank {str(dtype).rsplit('.', 1)[-1]} B={batch} dims={dims} h={out_dim} R={rank}"
    n = min(batch, n_check)
    xs, factors, w, bias = _lowrank_inputs(torch, n, dims, out_dim, rank, dtype, device, seed=1)
    leaves = [t.requires_grad_(True) for t in (*xs, *factors, w, bias)]
    upstream = torch.randn(n, out_dim, device=device, generator=torch.Generator(device=device).manual_seed(2))
    out, grads = _grads(
        torch, lambda: mmfuse.lowrank_fusion(xs, factors, w, bias, backend="triton"), leaves, upstream.to(dtype)
    )
    x64 = [t.detach().double().requires_grad_(True) for t in leaves]
    m = len(dims)
    want, want_grads = _grads(
        torch, lambda: lmf_straightforward(torch, x64[:m], x64[m : 2 * m], x64[-2][None, :], x64[-1]), x64,
        upstream.to(dtype).double(),
    )  # fmt: skip
    names = [*(f"dx{i}" for i in range(m)), *(f"dF{i}" for i in range(m)), "dw", "db"]
    checks = [("forward", out, want), *zip(names, grads, want_grads)]
    for name, got, exp in checks:
        err = _rel_err(got, exp)
        # gradients summed over the batch carry a little more rounding than the forward
        limit = tol if name == "forward" else 2 * tol
        rows.append({"case": label, "check": name, "rel_err": err, "tol": limit, "ok": err <= limit})
    # present mask, NaN in the absent rows, against the NumPy float64 reference (first 256 rows)
    k = min(n, 256)
    present = torch.rand(k, m, device=device, generator=torch.Generator(device=device).manual_seed(3)) < 0.7
    xs_nan = [torch.where(present[:, i : i + 1], x[:k].detach(), float("nan")).to(dtype) for i, x in enumerate(xs)]
    got = mmfuse.lowrank_fusion(xs_nan, [f.detach() for f in factors], w.detach(), bias.detach(), present=present,
                                backend="triton")  # fmt: skip

    def host(t: Any) -> Any:
        return t.detach().double().cpu().numpy()

    exp = ref.lowrank_fusion([host(x) for x in xs_nan], [host(f) for f in factors], host(w), host(bias),
                             present=present.cpu().numpy())  # fmt: skip
    err = _rel_err(got, torch.from_numpy(exp))
    rows.append({"case": label, "check": "forward, present mask", "rel_err": err, "tol": tol, "ok": err <= tol})
    # bit-identical rerun
    out2, grads2 = _grads(
        torch, lambda: mmfuse.lowrank_fusion(xs, factors, w, bias, backend="triton"), leaves, upstream.to(dtype)
    )
    same = bool(torch.equal(out, out2)) and all(torch.equal(a, b) for a, b in zip(grads, grads2))
    rows.append({"case": label, "check": "bit-identical rerun", "rel_err": 0.0 if same else float("nan"),
                 "tol": 0.0, "ok": same})  # fmt: skip
    return rows


def check_triton_cp(torch: Any, device: str, dtype: Any, batch: int, dims: tuple[int, ...], out_dim: int,
                    rank: int) -> list[dict[str, Any]]:  # fmt: skip
    """The CP kernel's forward (and its backward) against float64 torch autograd of
    h = C (w * prod_m [x_m, 1] A_m) + b."""
    import mmfuse
    from mmfuse.testing import default_rtol

    tol = default_rtol(str(dtype).rsplit(".", 1)[-1])
    label = f"triton cp {str(dtype).rsplit('.', 1)[-1]} B={batch} dims={dims} h={out_dim} R={rank}"
    gen = torch.Generator(device=device).manual_seed(4)
    xs = [torch.randn(batch, d, device=device, generator=gen).to(dtype) for d in dims]
    facs = [(torch.randn(d + 1, rank, device=device, generator=gen) / (d + 1) ** 0.5).to(dtype) for d in dims]
    facs.append(torch.randn(out_dim, rank, device=device, generator=gen).to(dtype))
    w = torch.randn(rank, device=device, generator=gen).to(dtype)
    bias = torch.randn(out_dim, device=device, generator=gen).to(dtype)
    leaves = [t.requires_grad_(True) for t in (*xs, *facs, w, bias)]
    upstream = torch.randn(batch, out_dim, device=device, generator=gen).to(dtype)
    m = len(dims)
    out, grads = _grads(torch, lambda: mmfuse.cp_fusion(xs, (w, facs), bias, backend="triton"), leaves, upstream)

    def cp64(*t: Any) -> Any:
        prod = None
        for x, a in zip(t[:m], t[m : 2 * m]):
            p = x @ a[:-1] + a[-1]
            prod = p if prod is None else prod * p
        return (prod * t[-2]) @ t[2 * m].t() + t[-1]

    x64 = [t.detach().double().requires_grad_(True) for t in leaves]
    want, want_grads = _grads(torch, lambda: cp64(*x64), x64, upstream.double())
    rows = []
    for name, got, exp in [("forward", out, want), ("gradients", torch.cat([g.flatten() for g in grads]),
                                                     torch.cat([g.flatten() for g in want_grads]))]:  # fmt: skip
        err = _rel_err(got, exp)
        limit = tol if name == "forward" else 2 * tol
        rows.append({"case": label, "check": name, "rel_err": err, "tol": limit, "ok": err <= limit})
    return rows


def check_triton_stats(torch: Any, device: str, dtype: Any, shape: tuple[int, int, int]) -> list[dict[str, Any]]:
    """The moments and zoom_shift kernels (with token masks, alpha 1 and 0.5) against the
    Array-API core in float64 on the same inputs (a mean that dwarfs the spread)."""
    import mmfuse
    from mmfuse.testing import default_rtol

    tol = default_rtol(str(dtype).rsplit(".", 1)[-1])
    label = f"triton stats {str(dtype).rsplit('.', 1)[-1]} {shape}"
    gen = torch.Generator(device=device).manual_seed(6)
    x = (1e3 + torch.randn(*shape, device=device, generator=gen)).to(dtype)
    guide = (2 + 3 * torch.randn(shape[0], shape[1] + 7, shape[2], device=device, generator=gen)).to(dtype)
    mask = torch.rand(shape[:2], device=device, generator=gen) < 0.8
    gmask = torch.rand(guide.shape[:2], device=device, generator=gen) < 0.8
    mask[:, 0] = True
    gmask[:, 0] = True
    rows = []
    for alpha in (1.0, 0.5):
        got = mmfuse.zoom_shift(x, guide, alpha=alpha, mask=mask, guide_mask=gmask, backend="triton")
        want = mmfuse.zoom_shift(x.double(), guide.double(), alpha=alpha, mask=mask, guide_mask=gmask,
                                 backend="array_api")  # fmt: skip
        err = _rel_err(got, want)
        rows.append({"case": label, "check": f"zoom_shift alpha={alpha}", "rel_err": err, "tol": tol, "ok": err <= tol})
    mean, std = mmfuse.moments(x, mask=mask, backend="triton")
    want_mean, want_std = mmfuse.moments(x.double(), mask=mask, backend="array_api")
    for name, got, want in (("moments mean", mean, want_mean), ("moments std", std, want_std)):
        err = _rel_err(got, want)
        rows.append({"case": label, "check": name, "rel_err": err, "tol": tol, "ok": err <= tol})
    return rows


def _triton_zoom_shift_timings(quick: bool) -> tuple[list[tuple[str, str, float, float]], dict[str, Any]]:
    """zoom_shift (256, 512, 512) float32: the kernel's bandwidth (x and guide read, y
    written) against a device-to-device copy of x (issue 21's target: >= 80% of copy)."""
    torch = _torch()
    import mmfuse

    shape = (32, 512, 512) if quick else ZOOM_SHAPE
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(*shape, device="cuda", generator=gen)
    guide = 2 + 3 * torch.randn(*shape, device="cuda", generator=gen)
    cands: dict[str, Callable[[], Any]] = {
        "copy": lambda: x.clone(),
        "triton": lambda: mmfuse.zoom_shift(x, guide, alpha=0.5, backend="triton"),
        "mmfuse-torch": lambda: mmfuse.zoom_shift(x, guide, alpha=0.5, backend="torch"),
    }
    with torch.no_grad():
        times = time_cuda(cands, repeats=5 if quick else 20)
        mem = {k: peak_mib(fn) for k, fn in cands.items()}
    nbytes = x.numel() * x.element_size()
    copy_bw = 2 * nbytes / (times["copy"] * 1e-3)
    rows = []
    for name, ms in times.items():
        bw = (2 if name == "copy" else 3) * nbytes / (ms * 1e-3)
        rows.append((f"triton zoom_shift {shape}", f"{name} ({bw / 1e9:.0f} GB/s, {bw / copy_bw:.0%} of copy)",
                     ms, mem[name]))  # fmt: skip
    frac = 3 * nbytes / (times["triton"] * 1e-3) / copy_bw
    return rows, {"case": f"zoom_shift {shape}", "ms": times["triton"], "of_copy": frac}


def check_triton_compile(torch: Any, device: str) -> list[dict[str, Any]]:
    """``torch.compile`` traces into the ``triton_op`` (forward and registered backward) and
    gives the eager values and gradients (on a GPU only: on CPU fake tensors have no data
    pointer for the interpreter)."""
    xs, factors, w, bias = _lowrank_inputs(torch, 1000, (32, 32, 128), 128, 16, torch.float32, device, seed=5)
    leaves = [t.requires_grad_(True) for t in (*xs, *factors, w, bias)]

    def step(*t: Any) -> Any:
        return torch.ops.mmfuse_triton.lowrank_fusion(list(t[:3]), list(t[3:6]), t[6], t[7], True, None)

    eager, ge = _grads(torch, lambda: step(*leaves), leaves, torch.ones(1000, 128, device=device))
    try:
        compiled = torch.compile(step, fullgraph=True)
        got, gc = _grads(torch, lambda: compiled(*leaves), leaves, torch.ones(1000, 128, device=device))
        err = max(_rel_err(got, eager), *(_rel_err(a, b) for a, b in zip(gc, ge)))
        return [{"case": "triton lowrank torch.compile", "check": "compiled vs eager", "rel_err": err,
                 "tol": 1e-6, "ok": err <= 1e-6}]  # fmt: skip
    except Exception as exc:  # report, do not abort the timings
        return [{"case": "triton lowrank torch.compile", "check": f"FAILED: {type(exc).__name__}: {exc}"[:200],
                 "rel_err": float("nan"), "tol": 1e-6, "ok": False}]  # fmt: skip


def bench_triton(quick: bool) -> tuple[list[tuple[str, str, float, float]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Issue 21's table: correctness first, then timings; returns (rows, checks, summary)."""
    torch = _torch()
    dtypes = (torch.float32, torch.bfloat16)
    checks: list[dict[str, Any]] = []
    for dtype in dtypes:
        for batch, dims, out_dim, rank in LOWRANK_CASES:
            checks += check_triton_lowrank(torch, "cuda", dtype, batch, dims, out_dim, rank)
            checks += check_triton_cp(torch, "cuda", dtype, 2048, dims, out_dim, rank)
        checks += check_triton_stats(torch, "cuda", dtype, (4, 512, 512))
        checks += check_triton_stats(torch, "cuda", dtype, (4, 3000, 40))  # token axis in blocks
    checks += check_triton_compile(torch, "cuda")
    for c in checks:
        print(f"  check {c['case']:<64} {c['check']:<24} {c['rel_err']:.2e} (tol {c['tol']:.0e}) "
              f"{'ok' if c['ok'] else 'MISMATCH'}")  # fmt: skip

    rows: list[tuple[str, str, float, float]] = []
    summary: list[dict[str, Any]] = []
    for dtype in dtypes:
        for batch, dims, out_dim, rank in LOWRANK_CASES:
            case_rows, case_summary = _triton_timings(
                torch, dtype, min(batch, 8192) if quick else batch, dims, out_dim, rank, 5 if quick else 20
            )
            rows += case_rows
            summary.append(case_summary)
    zoom_rows, zoom_summary = _triton_zoom_shift_timings(quick)
    rows += zoom_rows
    summary.append(zoom_summary)
    return rows, checks, summary


def _triton_timings(
    torch: Any, dtype: Any, batch: int, dims: tuple[int, ...], out_dim: int, rank: int, repeats: int
) -> tuple[list[tuple[str, str, float, float]], dict[str, Any]]:
    """One row of issue 21's table: forward and forward+backward times and peak memory."""
    import mmfuse

    label = f"{str(dtype).rsplit('.', 1)[-1]} B={batch} dims={dims} h={out_dim} R={rank}"
    print(f"triton timings {label}")
    xs, factors, w, bias = _lowrank_inputs(torch, batch, dims, out_dim, rank, dtype, "cuda")
    w2 = w[None, :]
    fwd: dict[str, Callable[[], Any]] = {
        "triton": lambda: mmfuse.lowrank_fusion(xs, factors, w, bias, backend="triton"),
        "lmf": lambda: lmf_straightforward(torch, xs, factors, w2, bias),
        "mmfuse-torch": lambda: mmfuse.lowrank_fusion(xs, factors, w, bias, backend="torch"),
        "gemm-only": lambda: [torch.matmul(x, f[:, :-1, :]) for x, f in zip(xs, factors)],
    }
    with torch.no_grad():
        t_fwd = time_cuda(fwd, repeats=repeats)
        m_fwd = {k: peak_mib(fn) for k, fn in fwd.items()}
    xg = [x.detach().requires_grad_(True) for x in xs]
    fg = [f.detach().requires_grad_(True) for f in factors]
    wg, bg = w.detach().requires_grad_(True), bias.detach().requires_grad_(True)
    wg2 = wg[None, :]
    fb: dict[str, Callable[[], Any]] = {
        "triton": lambda: mmfuse.lowrank_fusion(xg, fg, wg, bg, backend="triton").sum().backward(),
        "lmf": lambda: lmf_straightforward(torch, xg, fg, wg2, bg).sum().backward(),
        "mmfuse-torch": lambda: mmfuse.lowrank_fusion(xg, fg, wg, bg, backend="torch").sum().backward(),
    }
    t_fb = time_cuda(fb, repeats=repeats)
    m_fb = {k: peak_mib(fn) for k, fn in fb.items()}
    rows = [(f"triton {label}", f"{k} fwd", t_fwd[k], m_fwd[k]) for k in fwd]
    rows += [(f"triton {label}", f"{k} fwd+bwd", t_fb[k], m_fb[k]) for k in fb]
    summary = {
        "case": label,
        "fwd_ms": t_fwd["triton"], "lmf_fwd_ms": t_fwd["lmf"], "gemm_ms": t_fwd["gemm-only"],
        "fwd_vs_lmf": t_fwd["lmf"] / t_fwd["triton"], "fwd_vs_gemm": t_fwd["triton"] / t_fwd["gemm-only"],
        "fwd_mem_vs_lmf": m_fwd["triton"] / max(m_fwd["lmf"], 1e-9),
        "fb_ms": t_fb["triton"], "lmf_fb_ms": t_fb["lmf"], "fb_vs_lmf": t_fb["lmf"] / t_fb["triton"],
        "fb_mem_vs_lmf": m_fb["triton"] / max(m_fb["lmf"], 1e-9),
    }  # fmt: skip
    return rows, summary


_SWEEP_FWD = [(64, 8, 8), (32, 8, 4), (64, 4, 8), (128, 4, 8), (64, 16, 8)]
_SWEEP_BWD = [(32, 4, 8), (64, 2, 8), (16, 4, 4), (32, 8, 8)]


def sweep_triton_tiles(quick: bool) -> list[tuple[str, str, float, float]]:
    """Forward and forward+backward times of the low-rank kernels under other tile sizes
    (``--sweep``): the defaults were chosen from ptxas register counts without a GPU, so this
    says which tiles to keep.  Each config is (BLOCK_B, BLOCK_H, num_warps) for the forward
    or for the backward kernels; RANK_P and BLOCK_K stay as the defaults choose them."""
    torch = _torch()
    rows: list[tuple[str, str, float, float]] = []
    for dtype in (torch.float32, torch.bfloat16):
        for batch, dims, out_dim, rank in LOWRANK_CASES[::2]:  # the two compute-bound sizes
            rows += _sweep_case(torch, dtype, min(batch, 8192) if quick else batch, dims, out_dim, rank,
                                5 if quick else 10)  # fmt: skip
    return rows


def _sweep_case(
    torch: Any, dtype: Any, batch: int, dims: tuple[int, ...], out_dim: int, rank: int, repeats: int
) -> list[tuple[str, str, float, float]]:
    import mmfuse
    from mmfuse.backends.triton import _ops

    label = f"sweep {str(dtype).rsplit('.', 1)[-1]} B={batch} dims={dims} h={out_dim} R={rank}"
    print(label)
    xs, factors, w, bias = _lowrank_inputs(torch, batch, dims, out_dim, rank, dtype, "cuda")
    xg = [x.detach().requires_grad_(True) for x in xs]
    fg = [f.detach().requires_grad_(True) for f in factors]
    default = _ops._lowrank_tiles

    def runner(kind: str, block_b: int, block_h: int, warps: int) -> Callable[[], Any]:
        def tiles(r: int, h: int, n_mod: int, dt: Any, backward: bool) -> Any:
            t = default(r, h, n_mod, dt, backward)
            if backward != (kind == "bwd"):
                return t
            bh = min(block_h, _ops._pow2(h))
            return t._replace(block_b=block_b, block_h=bh, rank_p=max(t.rank_p, 16 // bh), num_warps=warps)

        def run() -> Any:
            _ops._lowrank_tiles = tiles
            try:
                if kind == "fwd":
                    with torch.no_grad():
                        return mmfuse.lowrank_fusion(xs, factors, w, bias, backend="triton")
                return mmfuse.lowrank_fusion(xg, fg, w, bias, backend="triton").sum().backward()
            finally:
                _ops._lowrank_tiles = default

        return run

    cands = {f"{kind} B{b} H{h} w{nw}": runner(kind, b, h, nw)
             for kind, cfgs in (("fwd", _SWEEP_FWD), ("bwd", _SWEEP_BWD)) for b, h, nw in cfgs}  # fmt: skip
    if dtype == torch.float32:
        # 3xTF32: tensor-core dots with about float32 accuracy (not torch's TF32 setting);
        # its error against float64 is printed so the two can be weighed
        default_precision = _ops._precision

        def tf32x3(kind: str) -> Callable[[], Any]:
            def run() -> Any:
                _ops._precision = lambda dt: "tf32x3"
                try:
                    if kind == "fwd":
                        with torch.no_grad():
                            return mmfuse.lowrank_fusion(xs, factors, w, bias, backend="triton")
                    return mmfuse.lowrank_fusion(xg, fg, w, bias, backend="triton").sum().backward()
                finally:
                    _ops._precision = default_precision

            return run

        cands["fwd tf32x3"], cands["bwd tf32x3"] = tf32x3("fwd"), tf32x3("bwd")
        n = min(batch, 2048)
        want = lmf_straightforward(torch, [x[:n].double() for x in xs], [f.double() for f in factors],
                                   w.double()[None, :], bias.double())  # fmt: skip
        print(f"  tf32x3 forward: max rel. error {_rel_err(cands['fwd tf32x3']()[:n], want):.1e}; "
              f"ieee: {_rel_err(mmfuse.lowrank_fusion(xs, factors, w, bias, backend='triton')[:n], want):.1e}")
    times = time_cuda(cands, repeats=repeats)
    return [(label, name, ms, float("nan")) for name, ms in times.items()]


def print_triton_summary(summary: list[dict[str, Any]], checks: list[dict[str, Any]]) -> None:
    """The short closing table: issue 21's ratios, each with its target."""
    t = TARGETS
    bad = [c for c in checks if not c["ok"]]
    print(f"\nTriton correctness: {len(checks) - len(bad)}/{len(checks)} checks ok"
          + "".join(f"\n  MISMATCH {c['case']} {c['check']} {c['rel_err']:.2e}" for c in bad))  # fmt: skip
    print(f"{'case (issue 21)':<46} {'fwd ms':>8} {'xLMF':>6} {'/GEMM':>6} {'mem':>5} "
          f"{'f+b ms':>8} {'xLMF':>6} {'mem':>5}")  # fmt: skip
    print(f"{'targets':<46} {'':>8} {'>=' + str(t['fwd_vs_lmf']):>6} {'<=' + str(t['fwd_vs_gemm']):>6} "
          f"{'<=' + str(t['mem_vs_lmf']):>5} {'':>8} {'>=' + str(t['fb_vs_lmf']):>6} "
          f"{'<=' + str(t['mem_vs_lmf']):>5}")  # fmt: skip
    for r in summary:
        if "of_copy" in r:
            print(f"{r['case']:<46} {r['ms']:8.3f} ms, {r['of_copy']:.0%} of copy bandwidth (target >= 80%)")
            continue
        print(f"{r['case']:<46} {r['fwd_ms']:8.3f} {r['fwd_vs_lmf']:6.2f} {r['fwd_vs_gemm']:6.2f} "
              f"{r['fwd_mem_vs_lmf']:5.2f} {r['fb_ms']:8.3f} {r['fb_vs_lmf']:6.2f} {r['fb_mem_vs_lmf']:5.2f}")  # fmt: skip


def cpu_check() -> None:
    """The Triton correctness helpers on tiny CPU tensors under the interpreter."""
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: its helpers and ours
    import torch

    import mmfuse.backends.triton  # noqa: F401  (registers the backend)

    checks: list[dict[str, Any]] = []
    for dtype in (torch.float32, torch.bfloat16):
        checks += check_triton_lowrank(torch, "cpu", dtype, 37, (5, 3, 17), 6, 3, n_check=37)
        checks += check_triton_cp(torch, "cpu", dtype, 21, (5, 3, 17), 6, 3)
        checks += check_triton_stats(torch, "cpu", dtype, (2, 9, 5))
        checks += check_triton_stats(torch, "cpu", dtype, (2, 2100, 9))  # token axis in blocks
    for c in checks:
        print(f"  check {c['case']:<64} {c['check']:<24} {c['rel_err']:.2e} (tol {c['tol']:.0e}) "
              f"{'ok' if c['ok'] else 'MISMATCH'}")  # fmt: skip
    if not all(c["ok"] for c in checks):
        raise SystemExit("a Triton kernel does not match the float64 result")


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
    parser.add_argument("--json", help="write the rows here (default: $OUT/gpu.json when $OUT is set)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="start no further section after this many seconds (default 420)")  # fmt: skip
    parser.add_argument("--sweep", action="store_true",
                        help="also time the low-rank kernels under other tile sizes (after the table)")  # fmt: skip
    parser.add_argument("--cpu-check", action="store_true",
                        help="only the Triton correctness checks, on CPU under the interpreter")  # fmt: skip
    args = parser.parse_args()
    if args.cpu_check:
        cpu_check()
        return
    start = time.monotonic()
    torch = _torch()
    device = f"{torch.cuda.get_device_name()}  torch {torch.__version__}"
    print(f"device: {device}")
    import mmfuse.backends.triton  # noqa: F401  (the "triton" backend; needs triton installed)

    rows, checks, summary = bench_triton(args.quick)
    if args.sweep:
        rows += sweep_triton_tiles(args.quick)
    sections: list[tuple[str, Callable[[], list[tuple[str, str, float, float]]]]] = [
        ("lowrank numba/cupy", lambda: bench_lowrank(args.quick)),
        ("zoom_shift", lambda: bench_zoom_shift(args.quick)[0]),
        ("layers", lambda: bench_layers(args.quick)),
    ]
    skipped = []
    for name, section in sections:
        if time.monotonic() - start > args.budget_s:
            skipped.append(name)
            continue
        rows += section()
    out_json = args.json or (os.path.join(os.environ["OUT"], "gpu.json") if os.environ.get("OUT") else None)
    if out_json:
        with open(out_json, "w") as fh:
            json.dump({"device": device, "seconds": time.monotonic() - start, "skipped": skipped,
                       "triton_checks": checks, "triton_summary": summary, "targets": TARGETS,
                       "rows": [dict(zip(("case", "candidate", "ms", "peak_mib"), r)) for r in rows]},
                      fh, indent=2)  # fmt: skip
    print()
    print(f"{'case':<58} {'candidate':<44} {'ms':>9} {'peak MiB':>9} {'vs first':>9}")
    first: dict[str, float] = {}
    for case, cand, ms, mib in rows:
        base = first.setdefault(case, ms)
        print(f"{case:<58} {cand:<44} {ms:9.3f} {mib:9.1f} {ms / base:9.2f}")
    if skipped:
        print(f"skipped (time budget): {', '.join(skipped)}")
    print_triton_summary(summary, checks)
    print(f"total {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
