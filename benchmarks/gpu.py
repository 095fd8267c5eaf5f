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

Also issue 5's layer comparison (``benchmarks/torch_cpu.py``'s candidates) on CUDA tensors,
each step's output and gradients checked against its reference first (``torch_cpu.check``).
Results of a run on an H100: benchmarks/RESULTS.md (``--json`` wrote docs/performance/gpu_h100.json).

Triton kernels (issue 21; the ``"triton"`` backend, ``mmfuse.backends.triton``), run first:

1. Correctness of every kernel against a float64 result on the same inputs: the low-rank
   forward (with and without a ``present`` mask, against the NumPy reference on a slice), its
   backward (the default path; all gradients, against float64 autograd of the LMF-style code), the
   CP forward and its backward; in float32 (TF32 off) and bfloat16 at the three sizes (the
   low-rank checks on the whole timed batch, so that the kernels' loops over row blocks run
   as they are timed); bit-identical reruns (same rows); ``moments``
   and ``zoom_shift`` (token masks, alpha 1 and 0.5, token axes in one tile and in blocks,
   against the Array-API core in float64) and their gradients (against float64 autograd of
   the Array-API core); ``sequence_fusion`` in cp and collapsed mode (token masks with NaN in
   the padded tokens; forward and the gradients of every input against the torch backend in
   float64) at the CMU-MOSI adapter's sizes and at odd sizes; ``wander`` in collapsed mode
   (forward and the gradients of inputs and parameters, against the torch backend in
   float64); ``align`` with rounds=1 and rounds=None on 2 and 3 modalities (a 1e4 mean
   against a unit spread in float32, masks, against the Array-API core in float64); each in
   float32 (TF32 off) and bfloat16, each also confirming that the Triton op served the call;
   and ``torch.compile`` of the ``triton_op`` (forward and backward) against eager.
2. Timings at the three sizes, float32 TF32 off and bfloat16: forward of ``triton``,
   ``lmf``, ``mmfuse-torch`` and ``gemm-only``; forward+backward of ``triton``, ``lmf`` and
   ``mmfuse-torch``; peak memory of each; before timing, the forward and x_0's gradient of
   ``triton`` and ``mmfuse-torch`` against the LMF-style code's at the timed size
   (``agree_vs_lmf``: the torch backend's CUDA paths are checked nowhere else).  The
   closing table holds issue 21's targets:
   forward >= 2x LMF and <= 1.3x GEMM-only, forward+backward >= 1.5x LMF, peak memory
   <= 0.25x LMF's; and ``zoom_shift`` (256, 512, 512) float32 against copy bandwidth
   (target >= 80%).
3. While the time budget (``--budget-s``, default 420 s) lasts, each section started only
   before it runs out: the Wander adapter (``nn.WanderAdapter``, collapsed mode) at the
   CMU-MOSI defaults (lengths (50, 50, 50), d 40, r 16, R_h 8, R_t 12) at B = 32 and 4096,
   forward and forward+backward, under ``backend="triton"``, under ``backend="torch"`` and
   the released-style plain torch layer (target: the layer >= 1.2x the plain layer);
   ``align(rounds=1)`` of two (256, 512, 512) float32 modalities (triton, torch, and CuPy
   when installed) as a fraction of copy bandwidth (each modality read twice, written
   once); and, with CuPy installed, the Triton ``zoom_shift`` and low-rank forward on CuPy
   arrays through DLPack (``torch.from_dlpack`` in, ``cupy.from_dlpack`` out, timed end to
   end) beside the CuPy backend's own call.  ``--quick`` shrinks them (B <= 512, 32 samples
   of 512 x 512, B <= 8192).

Then the older sections (numba/CuPy lowrank, zoom_shift, layers) while the budget lasts.
A check, Triton timing case, candidate or section that raises prints its traceback and is
reported as failed; the rest still run (one device run is all a session may get).  The
budget is also checked between the Triton timing cases (those skipped are named in the
JSON's ``skipped``).  The JSON goes to ``--json``, else ``$OUT/gpu.json`` when ``$OUT`` is
set, rewritten after every check group, Triton timing case and section, and stdout is
line-buffered: a run killed at its time limit keeps what it measured.

Tiles and the low-rank backward's paths are swept by ``benchmarks/gpu_tune.py``.

``--cpu-check`` runs the Triton correctness helpers on tiny CPU tensors under Triton's
interpreter (no GPU needed; what CI can check of this script; the timings need a GPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

# the checkout's own mmfuse, installed or not: ``python benchmarks/<script>.py`` puts only
# benchmarks/ on the path, and a lent device has no network to install the package
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LOWRANK_CASES = [
    (65536, (32, 32, 128), 128, 16),
    (262144, (8, 16, 64), 1, 4),
    (16384, (256, 256, 256), 256, 16),
]
ZOOM_SHAPE = (256, 512, 512)
# issue 21's targets: forward speed-up over LMF, forward time over GEMM-only, forward+backward
# speed-up over LMF, peak memory over LMF's (forward and forward+backward); the layers'
# speed-up over the plain torch layers; zoom_shift's bandwidth as a fraction of copy's
TARGETS = {"fwd_vs_lmf": 2.0, "fwd_vs_gemm": 1.3, "fb_vs_lmf": 1.5, "mem_vs_lmf": 0.25, "layers_vs_plain": 1.2,
           "zoom_of_copy": 0.8}  # fmt: skip
# the Wander adapter at the CMU-MOSI defaults of the released code (benchmarks/torch_cpu.py
# WANDER_CASES, benchmarks/overhead.py LAYER_CASES): lengths, d, r, R_h, R_t; T_out = r
WANDER_MOSI = ((50, 50, 50), 40, 16, 8, 12)
WANDER_BATCHES = (32, 4096)
ALIGN_SHAPE = (256, 512, 512)
# float32 layer steps against the plain layers' float32 steps on CUDA: outputs and gradients,
# before timing.  Twice mmfuse.testing's float32 tolerance (2e-4), which the Triton checks
# allow each side of float64 (their gradients 4e-4); a wrong or missing term is far above
LAYER_RTOL = 4e-4


def _torch() -> Any:
    import torch

    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA device (torch.cuda.is_available() is False)")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch


def time_cuda(
    cands: dict[str, Callable[[], Any]], *, repeats: int, warmup: int = 3, queue: int = 4
) -> dict[str, float]:
    """Median milliseconds per call, CUDA events, round-robin over candidates; each sample
    queues ``queue`` calls between its events, so the host runs ahead as in training and the
    device's time is measured (one call per sample timed the host's launch latency too:
    zoom_shift's 0.15 ms kernel read 0.53 ms that way, 0.37 ms queued)."""
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
            for _ in range(queue):
                fn()
            stop.record()
            stop.synchronize()
            samples[name].append(start.elapsed_time(stop) / queue)
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
    if status != "ok":  # (not SystemExit: the section fails, the run goes on)
        raise RuntimeError(f"{name} does not match the float64 result")


def _check_candidates(cands: dict[str, Callable[[], Any]], want: np.ndarray, rows: int, skip: str) -> None:
    """:func:`check` every candidate but ``skip`` on its first ``rows`` rows; one that raises
    (a mismatch, or a backend that cannot run on this device) is dropped, its traceback
    printed, and the others are still timed."""
    for name, fn in list(cands.items()):
        if name == skip:
            continue
        try:
            check(name, fn()[:rows], want)
        except Exception:
            traceback.print_exc()
            print(f"  {name} dropped from the timings")
            del cands[name]


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
    _check_candidates(cands, want, n_chk, skip="gemm-only")
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
    if dtype == torch.float32:
        # a partial step between means near 1e4 and -1e4 (unit spreads): the target near 0 in
        # float64, rounded once (float32 means left 1.3e-4 of the outputs' size there)
        far = (1e4 + torch.randn(*shape, device=device, generator=gen)).to(dtype)
        back = (-1e4 + torch.randn(*shape, device=device, generator=gen)).to(dtype)
        want = mmfuse.zoom_shift(far.double(), back.double(), alpha=0.5, backend="array_api")
        err = _rel_err(mmfuse.zoom_shift(far, back, alpha=0.5, backend="triton"), want)
        rows.append(_row(label, "zoom_shift means +-1e4 alpha=0.5 (triton)", err, 2e-6))
        # the same check of the other GPU backends, each in its own row: one that fails (numba-
        # cuda did not compile on the device's NumPy 2.5) must not take the Triton rows with it
        others = {
            "numba": lambda: mmfuse.zoom_shift(far, back, alpha=0.5, backend="numba"),
            "cupy": lambda: torch.from_dlpack(_cupy_zoom_shift(far, back)),
        }
        for backend, run in others.items():
            if device != "cuda" or backend not in mmfuse.backends.available("zoom_shift"):
                continue
            check = f"zoom_shift means +-1e4 alpha=0.5 ({backend})"
            try:
                rows.append(_row(label, check, _rel_err(run(), want), 2e-6))
            except Exception as exc:
                rows.append(_failed_row(f"{label} ({backend})", exc))
    return rows


def _cupy_zoom_shift(far: Any, back: Any) -> Any:
    import cupy

    import mmfuse

    return mmfuse.zoom_shift(cupy.from_dlpack(far), cupy.from_dlpack(back), alpha=0.5, backend="cupy")


def _dtype_name(dtype: Any) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def _row(label: str, check: str, err: float, tol: float) -> dict[str, Any]:
    return {"case": label, "check": check, "rel_err": err, "tol": tol, "ok": err <= tol}


def _ran(label: str, check: str, ran: bool) -> dict[str, Any]:
    """A check row that says whether the Triton op served the call (not a fallback)."""
    return {"case": label, "check": check, "rel_err": 0.0 if ran else float("nan"), "tol": 0.0, "ok": ran}


def _cat(ts: list[Any]) -> Any:
    import torch

    return torch.cat([t.detach().double().flatten() for t in ts])


def check_triton_sequence(
    torch: Any, device: str, dtype: Any, mode: str, batch: int, lengths: tuple[int, ...],
    widths: tuple[int, ...], r_h: int, r_t: int, n_out: int, out_dim: int,
) -> list[dict[str, Any]]:  # fmt: skip
    """Triton ``sequence_fusion`` (one mode) with token masks, NaN stored in the padded tokens:
    the forward and the gradients of H, Phi and Psi against the torch backend in float64 on
    the same (rounded) inputs; padded tokens' gradients exact zeros; the Triton op ran."""
    import mmfuse
    from mmfuse.testing import default_rtol

    tol = default_rtol(_dtype_name(dtype))
    label = f"triton seq {mode} {_dtype_name(dtype)} B={batch} T={lengths} r={widths} R={r_h},{r_t} {n_out}x{out_dim}"
    gen = torch.Generator(device=device).manual_seed(7)

    def randn(*shape: int) -> Any:
        return torch.randn(*shape, device=device, generator=gen)

    masks = [torch.rand(batch, t, device=device, generator=gen) < 0.8 for t in lengths]
    for k in masks:
        k[:, 0] = True
    # each modality's term O(1) in every dtype; padded tokens hold NaN (never to be read)
    hs = [torch.where(k[..., None], randn(batch, t, r), float("nan")).to(dtype)
          for k, t, r in zip(masks, lengths, widths)]  # fmt: skip
    feats = [(randn(r_h, r, out_dim) / (r * r_h) ** 0.5).to(dtype) for r in widths]
    toks = [(randn(r_t, t, n_out) / (t * r_t) ** 0.5).to(dtype) for t in lengths]
    upstream = randn(batch, n_out, out_dim).to(dtype)
    leaves = [t.requires_grad_(True) for t in (*hs, *feats, *toks)]
    m = len(lengths)
    out, grads = _grads(
        torch, lambda: mmfuse.sequence_fusion(hs, feats, toks, mode=mode, masks=masks, backend="triton"),
        leaves, upstream,
    )  # fmt: skip
    x64 = [t.detach().double().requires_grad_(True) for t in leaves]
    want, want_grads = _grads(
        torch,
        lambda: mmfuse.sequence_fusion(x64[:m], x64[m : 2 * m], x64[2 * m :], mode=mode, masks=masks, backend="torch"),
        x64, upstream.double(),
    )  # fmt: skip
    rows = [_ran(label, "Triton op ran", type(out.grad_fn).__name__ == "_TritonSequenceFusionBackward")]
    rows.append(_row(label, "forward", _rel_err(out, want), tol))
    for name, sl in (("dH", slice(0, m)), ("dPhi", slice(m, 2 * m)), ("dPsi", slice(2 * m, 3 * m))):
        rows.append(_row(label, name, _rel_err(_cat(grads[sl]), _cat(want_grads[sl])), 2 * tol))
    padded = all(bool((g[~k] == 0).all()) for g, k in zip(grads[:m], masks))
    rows.append({"case": label, "check": "dH padded tokens == 0", "rel_err": 0.0 if padded else float("nan"),
                 "tol": 0.0, "ok": padded})  # fmt: skip
    return rows


def check_triton_wander(
    torch: Any, device: str, dtype: Any, batch: int, lengths: tuple[int, ...], dim: int, rank: int,
    r_h: int, r_t: int,
) -> list[dict[str, Any]]:  # fmt: skip
    """Triton ``wander`` in collapsed mode (the released adapter: down-projection, GELU, the
    kernel, residual; T_out = r) with token masks: the forward and the gradients of the
    inputs and of every parameter against the torch backend in float64 on the same inputs;
    the kernel served the fusion."""
    from unittest import mock

    import mmfuse
    from mmfuse.backends.triton import _sequence_ops
    from mmfuse.testing import default_rtol

    tol = default_rtol(_dtype_name(dtype))
    label = f"triton wander collapsed {_dtype_name(dtype)} B={batch} T={lengths} d={dim} r={rank} R={r_h},{r_t}"
    gen = torch.Generator(device=device).manual_seed(8)

    def randn(*shape: int) -> Any:
        return torch.randn(*shape, device=device, generator=gen)

    m = len(lengths)
    xs = [randn(batch, t, dim).to(dtype) for t in lengths]
    masks = [torch.rand(batch, t, device=device, generator=gen) < 0.8 for t in lengths]
    for k in masks:
        k[:, 0] = True
    ws = [(randn(dim, rank) / dim**0.5).to(dtype) for _ in lengths]
    bs = [(0.1 * randn(rank)).to(dtype) for _ in lengths]
    feats = [(randn(r_h, rank, dim) / (rank * r_h) ** 0.5).to(dtype) for _ in lengths]
    toks = [(randn(r_t, t, rank) / (t * r_t) ** 0.5).to(dtype) for t in lengths]
    leaves = [t.requires_grad_(True) for t in (*xs, *ws, *bs, *feats, *toks)]
    upstream = randn(batch, rank, dim).to(dtype)

    def run(t: list[Any], backend: str) -> Any:
        params = {"down": list(zip(t[m : 2 * m], t[2 * m : 3 * m])), "feature": t[3 * m : 4 * m],
                  "token": t[4 * m :]}  # fmt: skip
        return mmfuse.wander(t[:m], params, mode="collapsed", masks=masks, backend=backend)

    with mock.patch.object(_sequence_ops, "sequence_call", wraps=_sequence_ops.sequence_call) as spy:
        out, grads = _grads(torch, lambda: run(leaves, "triton"), leaves, upstream)
    x64 = [t.detach().double().requires_grad_(True) for t in leaves]
    want, want_grads = _grads(torch, lambda: run(x64, "torch"), x64, upstream.double())
    ran = spy.call_count == 1 and spy.call_args.args[3] == "collapsed"
    rows = [_ran(label, "Triton op ran", ran), _row(label, "forward", _rel_err(out, want), tol)]
    for i, name in enumerate(("dx", "dW_down", "db_down", "dPhi", "dPsi")):
        sl = slice(i * m, (i + 1) * m)
        rows.append(_row(label, name, _rel_err(_cat(grads[sl]), _cat(want_grads[sl])), 2 * tol))
    return rows


def check_triton_align(
    torch: Any, device: str, dtype: Any, batch: int, tokens: tuple[int, ...], channels: int
) -> list[dict[str, Any]]:
    """Triton ``align`` (rounds=1 and the closed-form limit rounds=None) of M = len(tokens)
    modalities with token masks, NaN stored in the masked tokens, against the Array-API core
    in float64 on the same (NaN-free) inputs.  float32 data has means of about 1e4 against a
    spread of 0.5-3.5 (16-bit dtypes cannot hold that: means of a few units).  The error is
    max |y - want| over the kept tokens in units of the output's spread over tokens; its
    tolerance is 1e-3 (float32, as tests/test_triton_align.py) or default_rtol (16-bit) plus
    the rounding of the largest output, 4 eps max|want| (float32 arithmetic about a 1e4 mean)
    or 1 eps max|want| (16-bit: one rounding of the float32 result), in the same units.
    Masked tokens must come out NaN (mapped, never in the statistics), and the Triton
    primitives must have run (no fallback to the core)."""
    from unittest import mock

    import mmfuse
    from mmfuse.backends.triton import _align_ops
    from mmfuse.testing import default_rtol

    big = dtype == torch.float32
    # float32: tests/test_triton_align.py's limit (1e-3 of the spread); 16-bit: default_rtol
    tol = 1e-3 if big else default_rtol(_dtype_name(dtype))
    allowance = (4 if big else 1) * torch.finfo(dtype).eps
    label = f"triton align {_dtype_name(dtype)} B={batch} T={tokens} C={channels}"
    gen = torch.Generator(device=device).manual_seed(9)
    clean, poisoned, masks = [], [], []
    for m, t in enumerate(tokens):
        base = 1e4 * (1 + m / 10) if big else 3.0 - 2 * m
        scale = 0.5 + m + torch.rand(batch, 1, channels, device=device, generator=gen)
        x = (base + scale * torch.randn(batch, t, channels, device=device, generator=gen)).to(dtype)
        mask = torch.rand(batch, t, device=device, generator=gen) < 0.7
        mask[:, 0] = True
        clean.append(x)
        poisoned.append(torch.where(mask[..., None], x, float("nan")))
        masks.append(mask)
    rows = []
    for rounds in (1, None):
        with mock.patch.object(_align_ops, "core_align", wraps=_align_ops.core_align) as spy:
            ys = mmfuse.align(poisoned, rounds=rounds, masks=masks, backend="triton")
        wants = mmfuse.align([x.double() for x in clean], rounds=rounds, masks=masks, backend="array_api")
        rows.append(_ran(label, f"rounds={rounds} Triton ran", spy.call_count == 0))
        errs, limits = [], []
        for y, w, k in zip(ys, wants, masks):
            keep = k[..., None].expand_as(w)
            n = keep.sum(dim=-2, keepdim=True)
            mean = (w * keep).sum(dim=-2, keepdim=True) / n
            spread = float((((w - mean) * keep) ** 2).sum(dim=-2, keepdim=True).div(n).sqrt().mean())
            err = float((y.double() - w).abs()[keep].max()) / spread  # NaN in a kept token: not ok
            if y.dtype != dtype or not torch.equal(torch.isnan(y), ~keep):
                err = float("nan")
            errs.append(err)
            limits.append(tol + allowance * float(w.abs().max()) / spread)
        # the modality furthest from its limit (a NaN error fails the row)
        worst = max(range(len(errs)), key=lambda i: errs[i] / limits[i] if errs[i] == errs[i] else float("inf"))
        rows.append(_row(label, f"rounds={rounds} (/spread)", errs[worst], limits[worst]))
    # gradients: the kernels' forward with the torch backend's mmfuse::align backward, against
    # float64 autograd through the core on the same (clean, rounded) inputs
    leaves = [x.clone().requires_grad_(True) for x in clean]
    ups = [torch.randn(x.shape, device=device, generator=gen).to(dtype) for x in clean]
    with mock.patch.object(_align_ops, "core_align", wraps=_align_ops.core_align) as spy:
        ys = mmfuse.align(leaves, rounds=1, masks=masks, backend="triton")
    grads = torch.autograd.grad(sum((y * u).sum() for y, u in zip(ys, ups)), leaves)
    x64 = [x.double().requires_grad_(True) for x in clean]
    y64 = mmfuse.align(x64, rounds=1, masks=masks, backend="array_api")
    want = torch.autograd.grad(sum((y * u.double()).sum() for y, u in zip(y64, ups)), x64)
    rows.append(_ran(label, "gradients: Triton forward ran", spy.call_count == 0))
    rows.append(_row(label, "gradients rounds=1", _rel_err(_cat(list(grads)), _cat(list(want))), tol))
    return rows


def check_triton_stats_grads(torch: Any, device: str, dtype: Any, shape: tuple[int, int, int]) -> list[dict[str, Any]]:
    """Gradients of the Triton ``zoom_shift`` (alpha 0.5, token masks on x and on a longer
    guide) and ``moments`` (mask; upstream on mean and std) ops against float64 autograd of
    the Array-API core on the same inputs (float32: a 1e3 mean against a unit spread;
    16-bit: a few units); the Triton ops ran."""
    import mmfuse
    from mmfuse.testing import default_rtol

    tol = default_rtol(_dtype_name(dtype))
    label = f"triton stats grads {_dtype_name(dtype)} {shape}"
    gen = torch.Generator(device=device).manual_seed(10)

    def randn(*s: int) -> Any:
        return torch.randn(*s, device=device, generator=gen)

    base = 1e3 if dtype == torch.float32 else 3.0
    x = (base + randn(*shape)).to(dtype).requires_grad_(True)
    guide = (2 + 3 * randn(shape[0], shape[1] + 7, shape[2])).to(dtype).requires_grad_(True)
    mask = torch.rand(shape[:2], device=device, generator=gen) < 0.8
    gmask = torch.rand(guide.shape[:2], device=device, generator=gen) < 0.8
    mask[:, 0] = True
    gmask[:, 0] = True
    up = randn(*shape).to(dtype)
    x64, g64 = x.detach().double().requires_grad_(True), guide.detach().double().requires_grad_(True)

    def zs(a: Any, g: Any, backend: str) -> Any:
        return mmfuse.zoom_shift(a, g, alpha=0.5, mask=mask, guide_mask=gmask, backend=backend)

    y, (dx, dg) = _grads(torch, lambda: zs(x, guide, "triton"), [x, guide], up)
    _, (wx, wg) = _grads(torch, lambda: zs(x64, g64, "array_api"), [x64, g64], up.double())
    rows = [_ran(label, "zoom_shift Triton op ran", type(y.grad_fn).__name__ == "_TritonZoomShiftBackward")]
    rows.append(_row(label, "zoom_shift dx", _rel_err(dx, wx), 2 * tol))
    rows.append(_row(label, "zoom_shift dguide", _rel_err(dg, wg), 2 * tol))
    u_mean, u_std = randn(shape[0], 1, shape[2]).to(dtype), randn(shape[0], 1, shape[2]).to(dtype)

    def mom(a: Any, backend: str, um: Any, us: Any) -> tuple[Any, Any]:
        mean, std = mmfuse.moments(a, mask=mask, backend=backend)
        return mean, (mean.to(um.dtype) * um).sum() + (std.to(us.dtype) * us).sum()

    mean, loss = mom(x, "triton", u_mean, u_std)
    (dm,) = torch.autograd.grad(loss, [x])
    _, loss64 = mom(x64, "array_api", u_mean.double(), u_std.double())
    (wm,) = torch.autograd.grad(loss64, [x64])
    rows.append(_ran(label, "moments Triton op ran", type(mean.grad_fn).__name__ == "_TritonMomentsBackward"))
    rows.append(_row(label, "moments dx (mean, std)", _rel_err(dm, wm), 2 * tol))
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


def _guarded(label: str, fn: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The check rows of ``fn()``, or one failed row naming the exception (a check that
    crashes must not cost the rest of the run), printed as soon as they are known with the
    group's wall time (``seconds`` in each row; a group's first kernels include Triton's
    compilation: what a device run's budget goes to)."""
    start = time.monotonic()
    try:
        rows = fn()
    except Exception as exc:
        rows = [_failed_row(label, exc)]
    seconds = time.monotonic() - start
    for row in rows:
        row["seconds"] = seconds
        print(f"  check {row['case']:<64} {row['check']:<24} {row['rel_err']:.2e} (tol {row['tol']:.0e}) "
              f"{'ok' if row['ok'] else 'MISMATCH'}")  # fmt: skip
    print(f"    ({label}: {seconds:.1f} s)")
    return rows


def _strict(obj: Any) -> Any:
    """``obj`` with every non-finite float as None: strict JSON (the NaN of a failed row had
    made the file unreadable to strict parsers, ``jq`` and JavaScript's among them)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def write_json(path: str, obj: Any, indent: int = 2) -> None:
    """``obj`` as strict JSON (:func:`_strict`) at ``path``, atomically: written beside it,
    then moved over it (a run killed mid-write leaves the previous file whole)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(_strict(obj), fh, indent=indent, allow_nan=False)
    os.replace(tmp, path)


def _failed_row(label: str, exc: Exception) -> dict[str, Any]:
    """A failed check row naming the exception (listed as a mismatch in the closing table)."""
    traceback.print_exc()
    return {"case": label, "check": f"FAILED: {type(exc).__name__}: {exc}"[:200], "rel_err": float("nan"),
            "tol": 0.0, "ok": False}  # fmt: skip


def _cupy() -> Any:
    """The cupy module, or None where it is not installed (or does not import)."""
    try:
        import cupy
    except Exception:
        return None
    return cupy


def _as_torch(torch: Any, a: Any) -> Any:
    return a if isinstance(a, torch.Tensor) else torch.from_dlpack(a)


def _triton_wander_timings(
    batch: int, repeats: int, device: str = "cuda"
) -> tuple[list[tuple[str, str, float, float]], dict[str, Any]]:
    """The Wander adapter in the released configuration (``nn.WanderAdapter``, collapsed mode)
    at the CMU-MOSI defaults: forward (no grad) and forward+backward (``out.sum()`` to the
    inputs and all parameters) of the layer under ``backend="triton"``, under
    ``backend="torch"``, and of the released-style plain torch layer
    (``benchmarks/_baselines.py``, as torch_cpu.py and overhead.py); issue 21's target: the
    layer >= 1.2x the plain layer.  Also records whether the Triton layer's call reached the
    kernel, and its output's error against the plain layer's."""
    from unittest import mock

    import mmfuse
    from mmfuse.backends.triton import _sequence_ops
    from mmfuse.nn import WanderAdapter

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _baselines import released_wander
    from _harness import check_same
    from torch_cpu import check_step

    torch = _torch()
    lengths, dim, rank, r_h, r_t = WANDER_MOSI
    label = f"triton wander collapsed MOSI B={batch}"
    print(label)
    torch.manual_seed(20261122)
    layer = WanderAdapter((dim,) * len(lengths), lengths, rank, r_h, r_t, mode="collapsed", device=device)
    plain = released_wander(layer)
    gen = torch.Generator(device=device).manual_seed(11)
    xs = [torch.randn(batch, t, dim, device=device, generator=gen) for t in lengths]
    xg = [x.detach().clone().requires_grad_(True) for x in xs]

    def layer_call(backend: str, inputs: list[Any]) -> Callable[[], Any]:
        def run() -> Any:
            with mmfuse.config_context(backend=backend):
                return layer(inputs)

        return run

    def step(call: Callable[[], Any], module: Any) -> Callable[[], Any]:
        def run() -> Any:
            for p in (*xg, *module.parameters()):
                p.grad = None
            out = call()
            out.sum().backward()
            return out

        run.inputs, run.module = xg, module  # type: ignore[attr-defined]  (for check_step)
        return run

    fwd: dict[str, Callable[[], Any]] = {
        "triton": layer_call("triton", xs),
        "mmfuse-torch": layer_call("torch", xs),
        "plain": lambda: plain(xs),
    }
    fb: dict[str, Callable[[], Any]] = {
        "triton": step(layer_call("triton", xg), layer),
        "mmfuse-torch": step(layer_call("torch", xg), layer),
        "plain": step(lambda: plain(xg), plain),
    }
    # every candidate checked against the plain layer before anything is timed (raises past
    # LAYER_RTOL: the section fails): the forwards' outputs, the steps' outputs and gradients
    with torch.no_grad():
        with mock.patch.object(_sequence_ops, "sequence_call", wraps=_sequence_ops.sequence_call) as spy:
            got = fwd["triton"]()
        routed = spy.call_count == 1
        want = fwd["plain"]()
        errs = {"triton fwd": check_same(f"{label} triton fwd vs plain", got, want, LAYER_RTOL),
                "mmfuse-torch fwd": check_same(f"{label} mmfuse-torch fwd vs plain", fwd["mmfuse-torch"](), want,
                                               LAYER_RTOL)}  # fmt: skip
    for name in ("triton", "mmfuse-torch"):
        errs[f"{name} fwd+bwd"] = check_step(f"{label} {name} fwd+bwd vs plain", fb[name], fb["plain"], LAYER_RTOL)
    print(f"  triton layer reached the kernel: {routed}; max rel. error vs plain (outputs, gradients): "
          + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))  # fmt: skip
    with torch.no_grad():
        t_fwd = time_cuda(fwd, repeats=repeats)
        m_fwd = {k: peak_mib(fn) for k, fn in fwd.items()}
    t_fb = time_cuda(fb, repeats=repeats)
    m_fb = {k: peak_mib(fn) for k, fn in fb.items()}
    rows = [(label, f"{k} fwd", t_fwd[k], m_fwd[k]) for k in fwd]
    rows += [(label, f"{k} fwd+bwd", t_fb[k], m_fb[k]) for k in fb]
    summary = {
        "kind": "wander", "case": f"wander collapsed MOSI B={batch}", "routed": routed, "rel_err_vs_plain": errs,
        "fwd_ms": t_fwd["triton"], "torch_fwd_ms": t_fwd["mmfuse-torch"], "plain_fwd_ms": t_fwd["plain"],
        "fwd_vs_plain": t_fwd["plain"] / t_fwd["triton"], "torch_fwd_vs_plain": t_fwd["plain"] / t_fwd["mmfuse-torch"],
        "fb_ms": t_fb["triton"], "torch_fb_ms": t_fb["mmfuse-torch"], "plain_fb_ms": t_fb["plain"],
        "fb_vs_plain": t_fb["plain"] / t_fb["triton"], "torch_fb_vs_plain": t_fb["plain"] / t_fb["mmfuse-torch"],
    }  # fmt: skip
    return rows, summary


def bench_triton_wander(quick: bool) -> tuple[list[tuple[str, str, float, float]], list[dict[str, Any]]]:
    """:func:`_triton_wander_timings` at B = 32 and 4096 (``--quick``: 32 and 512)."""
    _torch()
    rows, summary = [], []
    for batch in WANDER_BATCHES:
        case_rows, case_summary = _triton_wander_timings(min(batch, 512) if quick else batch, 5 if quick else 20)
        rows += case_rows
        summary.append(case_summary)
    return rows, summary


def _cupy_align_call(mmfuse: Any, cupy: Any, xs: list[Any]) -> tuple[str, Callable[[], Any]]:
    """CuPy's ``align``: its backend's row if there is one, else the Array-API core on CuPy arrays."""
    cxs = [cupy.from_dlpack(x) for x in xs]
    if "cupy" in mmfuse.backends.available("align"):
        return "cupy", lambda: mmfuse.align(cxs, rounds=1, backend="cupy")
    return "cupy (array_api core)", lambda: mmfuse.align(cxs, rounds=1, backend="array_api")


def bench_triton_align(
    quick: bool, device: str = "cuda", shape: tuple[int, int, int] | None = None
) -> tuple[list[tuple[str, str, float, float]], list[dict[str, Any]]]:
    """``align(rounds=1)`` of two float32 modalities of ``shape`` ((256, 512, 512); ``--quick``:
    (32, 512, 512)): ``triton``, ``mmfuse-torch`` (the core on torch ops) and CuPy when it is
    installed, each checked against the float64 core on four samples first; bandwidth with
    each modality read twice (statistics, map) and written once, against a device-to-device
    copy of one modality (read once, written once)."""
    torch = _torch()
    import mmfuse

    shape = shape or ((32, 512, 512) if quick else ALIGN_SHAPE)
    label = f"triton align rounds=1 M=2 {shape}"
    print(label)
    gen = torch.Generator(device=device).manual_seed(12)
    xs = [torch.randn(*shape, device=device, generator=gen), 2 + 3 * torch.randn(*shape, device=device, generator=gen)]
    want = mmfuse.align([x[:4].double() for x in xs], rounds=1, backend="array_api")
    cands: dict[str, Callable[[], Any]] = {
        "copy": lambda: xs[0].clone(),
        "triton": lambda: mmfuse.align(xs, rounds=1, backend="triton"),
        "mmfuse-torch": lambda: mmfuse.align(xs, rounds=1, backend="torch"),
    }
    cupy = _cupy()
    if cupy is not None:
        name, fn = _cupy_align_call(mmfuse, cupy, xs)
        cands[name] = fn
    errs: dict[str, float] = {}
    with torch.no_grad():
        for name, fn in list(cands.items()):
            if name == "copy":
                continue
            try:
                errs[name] = max(_rel_err(_as_torch(torch, y)[:4], w) for y, w in zip(fn(), want))
            except Exception as exc:  # an optional candidate that fails is reported and dropped
                print(f"  {name} FAILED: {type(exc).__name__}: {exc}"[:300])
                errs[name] = float("nan")
                del cands[name]
                continue
            print(f"  check {name:<22} max|err|/max|ref| vs float64 = {errs[name]:.2e}  "
                  f"{'ok' if errs[name] <= 2e-4 else 'MISMATCH'}")  # fmt: skip
        bad = [name for name, err in errs.items() if not err <= 2e-4 and name in cands]
        if bad:  # (not timed: the section fails, the run goes on)
            raise RuntimeError(f"{label}: {', '.join(bad)} do not match the float64 result")
        times = time_cuda(cands, repeats=5 if quick else 20)
        mem = {k: peak_mib(fn) for k, fn in cands.items()}
    nbytes = xs[0].numel() * xs[0].element_size()
    copy_bw = 2 * nbytes / (times["copy"] * 1e-3)
    moved = 3 * nbytes * len(xs)
    frac = {k: moved / (ms * 1e-3) / copy_bw for k, ms in times.items() if k != "copy"}
    rows = []
    for name, ms in times.items():
        bw = (2 * nbytes if name == "copy" else moved) / (ms * 1e-3)
        rows.append((label, f"{name} ({bw / 1e9:.0f} GB/s, {bw / copy_bw:.0%} of copy)", ms, mem[name]))
    if "triton" not in times:  # its check failed (reported above): the other rows stand
        return rows, []
    summary = {"kind": "align", "case": f"align rounds=1 M=2 {shape}", "ms": times["triton"],
               "of_copy": frac["triton"], "others_of_copy": {k: v for k, v in frac.items() if k != "triton"},
               "ms_all": times, "rel_err": errs}  # fmt: skip
    return rows, [summary]


def bench_triton_cupy(
    quick: bool, device: str = "cuda", zoom_shape: tuple[int, int, int] | None = None,
    lowrank_cases: list[tuple[int, tuple[int, ...], int, int]] | None = None,
) -> tuple[list[tuple[str, str, float, float]], list[dict[str, Any]]]:  # fmt: skip
    """Whether the Triton kernels serve CuPy arrays faster than the CuPy backend: on CuPy
    arrays, ``triton via DLPack`` (``torch.from_dlpack`` in, the Triton call,
    ``cupy.from_dlpack`` out, timed end to end) beside the CuPy backend's own call, and the
    Triton call on the torch tensors (the DLPack round trip's cost); for ``zoom_shift``
    (256, 512, 512) and the low-rank forward at the three sizes, float32, each checked against
    a float64 result first.  Nothing without CuPy (or without its backend's row)."""
    torch = _torch()
    import mmfuse

    cupy = _cupy()
    if cupy is None:
        print("triton via DLPack on CuPy arrays: cupy is not installed (no rows)")
        return [], []
    rows: list[tuple[str, str, float, float]] = []
    summary: list[dict[str, Any]] = []
    repeats = 5 if quick else 20

    def run_case(label: str, cands: dict[str, Callable[[], Any]], check: Callable[[Any], float]) -> None:
        print(label)
        errs: dict[str, float] = {}
        with torch.no_grad():
            for name, fn in list(cands.items()):
                try:
                    errs[name] = check(_as_torch(torch, fn()))
                except Exception as exc:
                    print(f"  {name} FAILED: {type(exc).__name__}: {exc}"[:300])
                    del cands[name]
                    continue
                print(f"  check {name:<24} max|err|/max|ref| vs float64 = {errs[name]:.2e}  "
                      f"{'ok' if errs[name] <= 2e-4 else 'MISMATCH'}")  # fmt: skip
            bad = [name for name, err in errs.items() if not err <= 2e-4]
            if bad:  # (not timed: the section fails, the run goes on)
                raise RuntimeError(f"{label}: {', '.join(bad)} do not match the float64 result")
            if "triton via DLPack" not in cands:
                return
            times = time_cuda(cands, repeats=repeats)
            mem = {k: peak_mib(fn) for k, fn in cands.items()}
        rows.extend((label, name, ms, mem[name]) for name, ms in times.items())
        cupy_ms = times.get("cupy")
        summary.append({"kind": "dlpack", "case": label, "triton_ms": times["triton via DLPack"],
                        "cupy_ms": cupy_ms, "torch_ms": times.get("triton (torch tensors)"),
                        "speedup": None if cupy_ms is None else cupy_ms / times["triton via DLPack"],
                        "rel_err": errs})  # fmt: skip

    # zoom_shift
    shape = zoom_shape or ((32, 512, 512) if quick else ZOOM_SHAPE)
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(*shape, device=device, generator=gen)
    guide = 2 + 3 * torch.randn(*shape, device=device, generator=gen)
    want = mmfuse.zoom_shift(x[:4].double(), guide[:4].double(), alpha=0.5, backend="array_api")
    cx, cg = cupy.from_dlpack(x), cupy.from_dlpack(guide)
    cands: dict[str, Callable[[], Any]] = {
        "triton via DLPack": lambda: cupy.from_dlpack(
            mmfuse.zoom_shift(torch.from_dlpack(cx), torch.from_dlpack(cg), alpha=0.5, backend="triton")
        ),
        "triton (torch tensors)": lambda: mmfuse.zoom_shift(x, guide, alpha=0.5, backend="triton"),
    }
    if "cupy" in mmfuse.backends.available("zoom_shift"):
        cands["cupy"] = lambda: mmfuse.zoom_shift(cx, cg, alpha=0.5, backend="cupy")
    run_case(f"cupy arrays: zoom_shift {shape}", cands, lambda y: _rel_err(y[:4], want))

    # the low-rank forward
    cases = lowrank_cases or LOWRANK_CASES
    for batch, dims, out_dim, rank in cases:
        batch = min(batch, 8192) if quick else batch
        xs, factors, w, bias = _lowrank_inputs(torch, batch, dims, out_dim, rank, torch.float32, device)
        n = min(batch, 2048)
        want_l = lmf_straightforward(torch, [t[:n].double() for t in xs], [f.double() for f in factors],
                                     w.double()[None, :], bias.double())  # fmt: skip
        cxs, cfs = [cupy.from_dlpack(t) for t in xs], [cupy.from_dlpack(f) for f in factors]
        cw, cb = cupy.from_dlpack(w), cupy.from_dlpack(bias)

        def via_dlpack(cxs: Any = cxs, cfs: Any = cfs, cw: Any = cw, cb: Any = cb) -> Any:
            out = mmfuse.lowrank_fusion([torch.from_dlpack(a) for a in cxs], [torch.from_dlpack(a) for a in cfs],
                                        torch.from_dlpack(cw), torch.from_dlpack(cb), backend="triton")  # fmt: skip
            return cupy.from_dlpack(out)

        lr: dict[str, Callable[[], Any]] = {
            "triton via DLPack": via_dlpack,
            "triton (torch tensors)": lambda xs=xs, f=factors, w=w, b=bias: mmfuse.lowrank_fusion(
                xs, f, w, b, backend="triton"
            ),
        }
        if "cupy" in mmfuse.backends.available("lowrank_fusion"):
            lr["cupy"] = lambda cxs=cxs, cfs=cfs, cw=cw, cb=cb: mmfuse.lowrank_fusion(cxs, cfs, cw, cb, backend="cupy")
        run_case(f"cupy arrays: lowrank fwd B={batch} dims={dims} h={out_dim} R={rank}", lr,
                 lambda y, n=n, want_l=want_l: _rel_err(y[:n], want_l))  # fmt: skip
    return rows, summary


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
    except Exception as exc:  # report, do not abort the timings; the traceback too, since an
        # Inductor failure on the device is known from this one run only
        traceback.print_exc()
        return [{"case": "triton lowrank torch.compile", "check": f"FAILED: {type(exc).__name__}: {exc}"[:200],
                 "rel_err": float("nan"), "tol": 1e-6, "ok": False}]  # fmt: skip


# (batch, lengths, widths, R_h, R_t, T_out, D) of the sequence_fusion checks: the CMU-MOSI
# adapter's fusion, and odd sizes with several output tiles and the K loop; tiny ones for
# the interpreter (--cpu-check)
_SEQ_CHECKS = [(64, (50, 50, 50), (16, 16, 16), 8, 12, 16, 40), (8, (37, 50, 19), (16, 8, 20), 3, 2, 33, 70)]
_SEQ_CHECKS_TINY = [(2, (5, 7, 3), (3, 2, 4), 2, 3, 3, 5), (2, (19, 3), (20, 4), 1, 2, 33, 70)]
# (batch, tokens per modality, channels) of the align checks: M = 2 in one statistics tile,
# M = 3 with a token axis longer than one tile (the looping passes)
_ALIGN_CHECKS = [(8, (512, 384), 512), (4, (3000, 700, 50), 40)]
_ALIGN_CHECKS_TINY = [(3, (7, 5), 5), (1, (2100, 5, 3), 9)]
# x shapes of the zoom_shift / moments gradient checks (one tile; token axis in blocks)
_GRAD_CHECKS = [(4, 512, 512), (4, 3000, 40)]
_GRAD_CHECKS_TINY = [(2, 9, 5), (2, 2100, 9)]


def _new_triton_checks(torch: Any, device: str, dtype: Any, tiny: bool) -> list[dict[str, Any]]:
    """The sequence_fusion (cp and collapsed), wander (collapsed), align and statistics-gradient
    checks in one dtype: issue 21's sizes on a GPU, tiny ones (``tiny``) for the interpreter.
    A check that raises gives one failed row (the run goes on)."""
    rows: list[dict[str, Any]] = []
    name = _dtype_name(dtype)
    for batch, lengths, widths, r_h, r_t, n_out, out_dim in _SEQ_CHECKS_TINY if tiny else _SEQ_CHECKS:
        for mode in ("cp", "collapsed"):
            rows += _guarded(f"triton seq {mode} {name} B={batch} T={lengths}", lambda mode=mode, a=(
                batch, lengths, widths, r_h, r_t, n_out, out_dim): check_triton_sequence(torch, device, dtype, mode, *a))  # fmt: skip
    lengths, dim, rank, r_h, r_t = ((5, 4, 3), 4, 3, 2, 2) if tiny else WANDER_MOSI
    rows += _guarded(f"triton wander collapsed {name}", lambda: check_triton_wander(
        torch, device, dtype, 2 if tiny else 64, lengths, dim, rank, r_h, r_t))  # fmt: skip
    for batch, tokens, channels in _ALIGN_CHECKS_TINY if tiny else _ALIGN_CHECKS:
        rows += _guarded(f"triton align {name} B={batch} T={tokens} C={channels}",
                         lambda a=(batch, tokens, channels): check_triton_align(torch, device, dtype, *a))  # fmt: skip
    for shape in _GRAD_CHECKS_TINY if tiny else _GRAD_CHECKS:
        rows += _guarded(f"triton stats grads {name} {shape}",
                         lambda shape=shape: check_triton_stats_grads(torch, device, dtype, shape))  # fmt: skip
    return rows


class TritonResults:
    """What the Triton phase has measured so far: timing rows, check rows, the closing
    table's summary and the timing cases skipped for the budget."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, float, float]] = []
        self.checks: list[dict[str, Any]] = []
        self.summary: list[dict[str, Any]] = []
        self.skipped: list[str] = []


def bench_triton(
    quick: bool, deadline: float = float("inf"), progress: Callable[[TritonResults], None] = lambda _: None
) -> TritonResults:
    """Issue 21's table: correctness first, then timings.  A check or timing case that raises
    is a failed row (its traceback printed), not the end of the run; timing cases not started
    by ``deadline`` (``time.monotonic()``) are skipped, and named in ``skipped``.
    ``progress(results)`` runs after each check group and timing case (main writes the JSON
    there: a run killed in this phase keeps what it measured)."""
    torch = _torch()
    dtypes = (torch.float32, torch.bfloat16)
    results = TritonResults()
    checks = results.checks
    for dtype in dtypes:
        name = str(dtype).rsplit(".", 1)[-1]
        for batch, dims, out_dim, rank in LOWRANK_CASES:
            shape = (batch, dims, out_dim, rank)
            # the whole timed batch (a quick run's): the kernels' loops over row blocks run as
            # they are timed (the narrow backward's programs take 16 row blocks at B 262144,
            # one at 4096); float64 LMF of the whole batch takes milliseconds
            rows = min(batch, 8192) if quick else batch
            checks += _guarded(f"triton lowrank {name} {shape}",
                               lambda a=shape, dt=dtype, n=rows: check_triton_lowrank(torch, "cuda", dt, *a, n_check=n))  # fmt: skip
            checks += _guarded(f"triton cp {name} {shape}",
                               lambda a=shape, dt=dtype: check_triton_cp(torch, "cuda", dt, 2048, *a[1:]))  # fmt: skip
            progress(results)
        for shape in ((4, 512, 512), (4, 3000, 40)):  # the token axis in one tile, in blocks
            checks += _guarded(f"triton stats {name} {shape}",
                               lambda sh=shape, dt=dtype: check_triton_stats(torch, "cuda", dt, sh))  # fmt: skip
        checks += _new_triton_checks(torch, "cuda", dtype, tiny=False)
        progress(results)
    checks += _guarded("triton torch.compile", lambda: check_triton_compile(torch, "cuda"))
    progress(results)

    repeats = 5 if quick else 20
    timings: list[tuple[str, Callable[[], tuple[list[Any], dict[str, Any]]]]] = []
    for dtype in dtypes:
        for batch, dims, out_dim, rank in LOWRANK_CASES:
            shape = (min(batch, 8192) if quick else batch, dims, out_dim, rank)
            timings.append((f"triton timings {dtype} {shape}",
                            lambda dt=dtype, a=shape: _triton_timings(torch, dt, *a, repeats)))  # fmt: skip
    timings.append(("triton zoom_shift timings", lambda: _triton_zoom_shift_timings(quick)))
    for label, run in timings:
        if time.monotonic() > deadline:
            print(f"skipped (time budget): {label}")
            results.skipped.append(label)
            continue
        try:
            case_rows, case_summary = run()
        except Exception as exc:  # a failed case: a failed row, and the others still run
            checks.append(_failed_row(label, exc))
        else:
            results.rows += case_rows
            results.summary.append(case_summary)
        progress(results)
    return results


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
    agree = _agreement(torch, dtype, fwd, fb, xg[0])
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
        "fb_mem_vs_lmf": m_fb["triton"] / max(m_fb["lmf"], 1e-9), "agree_vs_lmf": agree,
    }  # fmt: skip
    return rows, summary


def _agreement(
    torch: Any, dtype: Any, fwd: dict[str, Callable[[], Any]], fb: dict[str, Callable[[], Any]], x0: Any
) -> dict[str, Any]:
    """The timed candidates' answers at the timed size, once, against the LMF-style code's in
    the same dtype: the forward and x_0's gradient of ``triton`` and ``mmfuse-torch`` (the
    torch backend's CUDA paths run nowhere else; the checks cover the Triton kernels against
    float64).  Printed, and MISMATCH past 4x the dtype's tolerance (two roundings)."""
    from mmfuse.testing import default_rtol

    tol = 4 * default_rtol(str(dtype).rsplit(".", 1)[-1])
    with torch.no_grad():
        want = fwd["lmf"]()
        errs = {f"{k} fwd": _rel_err(fwd[k](), want) for k in ("triton", "mmfuse-torch")}
    grads = {}
    for k in ("lmf", "triton", "mmfuse-torch"):
        x0.grad = None
        fb[k]()
        grads[k] = x0.grad.clone()
    x0.grad = None
    errs.update({f"{k} dx0": _rel_err(grads[k], grads["lmf"]) for k in ("triton", "mmfuse-torch")})
    ok = all(e <= tol for e in errs.values())
    print(f"  agreement with lmf: {', '.join(f'{k} {e:.1e}' for k, e in errs.items())} (tol {tol:.0e}) "
          f"{'ok' if ok else 'MISMATCH'}")  # fmt: skip
    return {**errs, "tol": tol, "ok": ok}


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
        kind = r.get("kind")
        if kind == "wander":
            print(f"{r['case']:<46} fwd {r['fwd_ms']:.3f} ms {r['fwd_vs_plain']:.2f}x plain (torch backend "
                  f"{r['torch_fwd_vs_plain']:.2f}x); f+b {r['fb_ms']:.3f} ms {r['fb_vs_plain']:.2f}x plain (torch "
                  f"backend {r['torch_fb_vs_plain']:.2f}x) (target >= {t['layers_vs_plain']}x)"
                  + ("" if r["routed"] else " NOT THE KERNEL"))  # fmt: skip
            continue
        if kind == "align":
            others = ", ".join(f"{k} {v:.0%}" for k, v in r["others_of_copy"].items())
            print(f"{r['case']:<46} {r['ms']:8.3f} ms, {r['of_copy']:.0%} of copy bandwidth ({others}; no target)")
            continue
        if kind == "dlpack":
            vs = "no CuPy backend row" if r["speedup"] is None else (
                f"CuPy backend {r['cupy_ms']:.3f} ms: triton {r['speedup']:.2f}x")  # fmt: skip
            torch_ms = r["torch_ms"]
            print(f"{r['case']:<46} triton via DLPack {r['triton_ms']:.3f} ms, {vs}"
                  + ("" if torch_ms is None else f" (on torch tensors {torch_ms:.3f} ms)"))  # fmt: skip
            continue
        if "of_copy" in r:
            print(f"{r['case']:<46} {r['ms']:8.3f} ms, {r['of_copy']:.0%} of copy bandwidth "
                  f"(target >= {t['zoom_of_copy']:.0%})")  # fmt: skip
            continue
        print(f"{r['case']:<46} {r['fwd_ms']:8.3f} {r['fwd_vs_lmf']:6.2f} {r['fwd_vs_gemm']:6.2f} "
              f"{r['fwd_mem_vs_lmf']:5.2f} {r['fb_ms']:8.3f} {r['fb_vs_lmf']:6.2f} {r['fb_mem_vs_lmf']:5.2f}"
              + ("" if r["agree_vs_lmf"]["ok"] else " ANSWERS DIFFER FROM LMF'S"))  # fmt: skip


def cpu_check() -> None:
    """The Triton correctness helpers on tiny CPU tensors under the interpreter."""
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: its helpers and ours
    import torch

    import mmfuse.backends.triton  # noqa: F401  (registers the backend)

    checks: list[dict[str, Any]] = []
    for dtype in (torch.float32, torch.bfloat16):
        name = _dtype_name(dtype)
        checks += _guarded(f"triton lowrank {name}",
                           lambda dt=dtype: check_triton_lowrank(torch, "cpu", dt, 37, (5, 3, 17), 6, 3, n_check=37))  # fmt: skip
        checks += _guarded(f"triton cp {name}", lambda dt=dtype: check_triton_cp(torch, "cpu", dt, 21, (5, 3, 17), 6, 3))
        for shape in ((2, 9, 5), (2, 2100, 9)):  # the token axis in one tile, in blocks
            checks += _guarded(f"triton stats {name} {shape}",
                               lambda dt=dtype, sh=shape: check_triton_stats(torch, "cpu", dt, sh))  # fmt: skip
        checks += _new_triton_checks(torch, "cpu", dtype, tiny=True)
    n_ok = sum(c["ok"] for c in checks)
    print(f"Triton correctness under the interpreter: {n_ok}/{len(checks)} checks ok")
    if n_ok != len(checks):
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
    _check_candidates(cands, want, 4, skip="copy")
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
        # outputs and gradients, every candidate against its reference; raises (the section
        # fails) before anything is timed
        errs = torch_cpu.check(cands, base, case, LAYER_RTOL)
        print("  check (outputs, gradients): max rel. error "
              + ", ".join(f"{name} vs {ref} {err:.1e}" for name, (ref, err) in errs.items()))  # fmt: skip
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
    parser.add_argument("--cpu-check", action="store_true",
                        help="only the Triton correctness checks, on CPU under the interpreter")  # fmt: skip
    args = parser.parse_args()
    if args.cpu_check:
        cpu_check()
        return
    # lines reach the log as they are printed: a run killed at its time limit keeps them
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    start = time.monotonic()
    deadline = start + args.budget_s
    torch = _torch()
    device = f"{torch.cuda.get_device_name()}  torch {torch.__version__}"
    print(f"device: {device}")
    import mmfuse.backends.triton  # noqa: F401  (the "triton" backend; needs triton installed)

    out_json = args.json or (os.path.join(os.environ["OUT"], "gpu.json") if os.environ.get("OUT") else None)
    triton = TritonResults()  # the Triton phase's, as it grows
    rows: list[tuple[str, str, float, float]] = []  # the later sections'
    skipped: list[str] = []
    failed: list[str] = []

    def dump() -> None:
        """The JSON so far, written after every check group, Triton timing case and section
        (a killed run keeps what it measured)."""
        if not out_json:
            return
        write_json(out_json, {"device": device, "seconds": time.monotonic() - start,
                              "skipped": [*triton.skipped, *skipped], "failed": failed,
                              "triton_checks": triton.checks, "triton_summary": triton.summary,
                              "targets": TARGETS,
                              "rows": [dict(zip(("case", "candidate", "ms", "peak_mib"), r))
                                       for r in (*triton.rows, *rows)]})  # fmt: skip

    def progress(results: TritonResults) -> None:
        nonlocal triton
        triton = results
        dump()

    try:
        bench_triton(args.quick, deadline, progress)
    except Exception:  # (each check and timing case is guarded; this is the last resort)
        traceback.print_exc()
        failed.append("triton")
    dump()
    summary, checks = triton.summary, triton.checks  # (the later sections extend the summary)
    def with_summary(fn: Callable[[], tuple[list[Any], list[dict[str, Any]]]]) -> Callable[[], list[Any]]:
        def run() -> list[Any]:
            section_rows, section_summary = fn()
            summary.extend(section_summary)
            return section_rows

        return run

    # issue 21's further Triton timings (after its checks and headline table), then the older
    # sections, each started only while the budget lasts
    sections: list[tuple[str, Callable[[], list[tuple[str, str, float, float]]]]] = [
        ("triton wander layers", with_summary(lambda: bench_triton_wander(args.quick))),
        ("triton align", with_summary(lambda: bench_triton_align(args.quick))),
        ("triton on CuPy arrays (DLPack)", with_summary(lambda: bench_triton_cupy(args.quick))),
        ("lowrank numba/cupy", lambda: bench_lowrank(args.quick)),
        ("zoom_shift", lambda: bench_zoom_shift(args.quick)[0]),
        ("layers", lambda: bench_layers(args.quick)),
    ]
    for name, section in sections:
        if time.monotonic() > deadline:
            skipped.append(name)
            continue
        try:
            rows += section()
        except Exception:  # report it and go on: the other sections and the tables still print
            traceback.print_exc()
            failed.append(name)
        dump()
    dump()
    print()
    print(f"{'case':<58} {'candidate':<44} {'ms':>9} {'peak MiB':>9} {'vs first':>9}")
    # each case's first forward and first forward+backward row: the base of their kind
    first: dict[tuple[str, bool], float] = {}
    for case, cand, ms, mib in (*triton.rows, *rows):
        base = first.setdefault((case, "fwd+bwd" in cand), ms)
        print(f"{case:<58} {cand:<44} {ms:9.3f} {mib:9.1f} {ms / base:9.2f}")
    if triton.skipped or skipped:
        print(f"skipped (time budget): {', '.join([*triton.skipped, *skipped])}")
    if failed:
        print(f"FAILED (traceback above): {', '.join(failed)}")
    print_triton_summary(summary, checks)
    print(f"total {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
