"""Tiles and paths of the ``"triton"`` backend's kernels, timed on a CUDA device (issue 21).

Run on a CUDA machine: ``python benchmarks/gpu_tune.py [--budget-s S] [--json FILE]``.

The kernels' default tiles came from ``ptxas`` register counts without a GPU; this times the
alternatives side by side in one process (CUDA events, median of repeats, round-robin; each
sample queues ``--queue`` calls between its events, so the device's time is measured rather
than the host's launch latency) at issue 21's sizes, and prints per case each candidate's
time over the default's (the defaults are the rows named ``default``):

1. ``torch.compile`` of the low-rank op: each output's and each gradient's error against
   eager, per backward path, with Inductor and with ``aot_eager`` (the same captured graph
   without Inductor's code generation), so a mismatch can be placed;
2. low-rank forward+backward, float32 (TF32 off) and bfloat16: the ``"fused"`` backward and
   the ``"gemm"`` one under several G-kernel tiles, beside LMF-style torch code; every
   candidate's gradients against the default's (max relative error), and peak memory;
3. ``zoom_shift`` (256, 512, 512) float32: channel tiles, warps, one register tile or token
   blocks, as a fraction of copy bandwidth; the whole public call and the bare op;
4. low-rank forward: (BLOCK_B, columns, warps, stages, BLOCK_K) tiles, beside LMF-style code
   and the GEMM-only time;
5. ``narrow``: h = 1, R = 4 forward+backward, the fused backward's row tiles, and a per-kernel
   profile of one step against LMF's;
6. ``layers``: the layers' training steps by batch under each torch-backend path (the size
   rules' alternatives), the Triton kernels and the plain layers.

Sections run cheapest first whatever ``--only``'s order (``RUN_ORDER``), and each timing
case starts only while ``--budget-s`` lasts: the cases left are listed in the JSON's
``skipped_cases`` (a section none of whose cases started, in ``skipped``), so a long sweep
cannot starve a cheap section queued after it. The JSON (``--json``, else
``$OUT/tune.json``) is rewritten after every case, atomically and as strict JSON (a device
machine is killed at its time limit, and what ``$OUT`` then holds is all that survives
besides stdout); a case that raises is listed in ``failed``, its traceback printed, and the
rest still run.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from functools import partial
from typing import Any

# the checkout's own mmfuse, installed or not: ``python benchmarks/<script>.py`` puts only
# benchmarks/ on the path, and a lent device has no network to install the package
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpu import (
    LAYER_RTOL,
    LOWRANK_CASES,
    ZOOM_SHAPE,
    _lowrank_inputs,
    _rel_err,
    _torch,
    lmf_straightforward,
    peak_mib,
    time_cuda,
    write_json,
)  # fmt: skip

# (BLOCK_B, columns = RANK_P * BLOCK_H, warps, stages, BLOCK_K); BLOCK_K 16 becomes 32 for
# 16-bit inputs (tensor-core dots need K >= 16; 32 is the default there)
FWD_TILES = [
    (32, 128, 4, 3, 16), (64, 64, 4, 3, 16), (32, 128, 4, 4, 16), (32, 64, 2, 3, 16), (64, 128, 8, 3, 16),
    (128, 128, 8, 3, 32), (256, 128, 8, 3, 32), (64, 128, 4, 3, 32), (128, 128, 8, 4, 32), (128, 128, 8, 3, 64),
    (256, 16, 4, 3, 16), (256, 16, 8, 3, 16), (512, 16, 8, 3, 32),
]  # fmt: skip
G_TILES = [(64, 128, 8, 3, 16), (32, 128, 4, 3, 16), (128, 128, 8, 3, 16), (64, 128, 8, 4, 16), (64, 64, 8, 3, 16),
           (256, 16, 4, 3, 16)]  # fmt: skip
# (BLOCK_C, warps, BLOCK_T or 0 for the whole token axis in one tile)
ZOOM_TILES = [(32, 8, 0), (16, 8, 0), (32, 4, 0), (32, 16, 0), (64, 16, 0), (64, 8, 0), (16, 4, 0)]


def _tiles(ops: Any, rank: int, out_dim: int, cfg: tuple[int, ...], dtype: Any) -> Any:
    """The kernels' _Tiles for a sweep configuration (the rules of ``_ops._lowrank_tiles``)."""
    block_b, cols, warps, stages, block_k = cfg
    rank_p, block_h = ops.column_tile(rank, out_dim, cols)
    return ops._Tiles(block_b, max(ops.block_k_for(dtype), block_k), block_h, rank_p, warps, stages)


def _name(t: Any) -> str:
    return f"B{t.block_b} N{t.rank_p * t.block_h} w{t.num_warps} s{t.num_stages} K{t.block_k}"


class _Patched:
    """Set module attributes for the duration of a call (the sweep's tiles and paths)."""

    def __init__(self, module: Any, **values: Any) -> None:
        self.module, self.values, self.saved = module, values, {}

    def __enter__(self) -> None:
        for k, v in self.values.items():
            self.saved[k] = getattr(self.module, k)
            setattr(self.module, k, v)

    def __exit__(self, *exc: Any) -> None:
        for k, v in self.saved.items():
            setattr(self.module, k, v)


# a section is a list of timing cases: (label, run it and return its JSON rows); main starts
# each while the budget lasts and writes the JSON after it
Case = tuple[str, Callable[[], list[dict[str, Any]]]]


def _label(kind: str, dtype: Any, batch: int, dims: tuple[int, ...], out_dim: int, rank: int) -> str:
    return f"{kind} {str(dtype)[6:]} B={batch} dims={dims} h={out_dim} R={rank}"


class _Log:
    """The run's JSON, rewritten after every case: ``{device, seconds, skipped, skipped_cases,
    failed, mismatch, <section>: [rows]}`` (``mismatch``: the rows marked ``ok`` false, a
    layer step past its tolerance or one that raised).  Each write goes to a temporary file
    beside it that ``os.replace`` then moves over the old one (atomic: a kill mid-write
    leaves the previous file whole), with NaN and inf as null (gpu.py's ``write_json``: the
    backward section's NaN had made the file unreadable to strict parsers, ``jq`` and
    JavaScript's among them)."""

    def __init__(self, path: str | None, device: str) -> None:
        self.path, self.start = path, time.monotonic()
        self.results: dict[str, Any] = {"device": device, "seconds": 0.0, "skipped": [], "skipped_cases": [],
                                         "failed": [], "mismatch": []}  # fmt: skip

    def add(self, section: str, rows: list[dict[str, Any]]) -> None:
        self.results.setdefault(section, []).extend(rows)
        self.results["mismatch"] += [f"{r['case']}: {r['cand']}" for r in rows if r.get("ok") is False]
        self.save()

    def note(self, key: str, *what: str) -> None:
        """Append to the ``skipped``, ``skipped_cases`` or ``failed`` list, and write."""
        self.results[key].extend(what)
        self.save()

    def save(self) -> None:
        if not self.path:
            return
        self.results["seconds"] = time.monotonic() - self.start
        write_json(self.path, self.results, indent=1)


def compile_diagnosis() -> list[dict[str, Any]]:
    """Compiled vs eager, per output, per backward path and compiler backend."""
    torch = _torch()
    from mmfuse.backends.triton import _ops

    xs, factors, w, bias = _lowrank_inputs(torch, 1000, (32, 32, 128), 128, 16, torch.float32, "cuda", seed=5)
    leaves = [t.requires_grad_(True) for t in (*xs, *factors, w, bias)]
    names = ["out", "dx0", "dx1", "dx2", "dF0", "dF1", "dF2", "dw", "db"]
    upstream = torch.randn(1000, 128, device="cuda", generator=torch.Generator(device="cuda").manual_seed(7))

    def step(*t: Any) -> Any:
        return torch.ops.mmfuse_triton.lowrank_fusion(list(t[:3]), list(t[3:6]), t[6], t[7], True, None)

    def run(fn: Callable[..., Any]) -> list[Any]:
        out = fn(*leaves)
        return [out.detach(), *torch.autograd.grad((out * upstream).sum(), leaves)]

    rows = []
    for path in ("gemm", "fused"):
        for backend in ("aot_eager", "inductor"):
            with _Patched(_ops, LOWRANK_BACKWARD=path):
                eager = run(step)
                torch._dynamo.reset()
                try:
                    got = run(torch.compile(step, backend=backend, fullgraph=True))
                    errs = {n: _rel_err(a, b) for n, a, b in zip(names, got, eager)}
                except Exception as exc:
                    errs = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            rows.append({"path": path, "backend": backend, **errs})
            shown = " ".join(f"{k} {v:.1e}" if isinstance(v, float) else f"{k} {v}" for k, v in errs.items())
            print(f"  compile {path:<5} {backend:<9} {shown}")
    with torch.no_grad():
        torch._dynamo.reset()
        fwd = torch.compile(step, fullgraph=True)(*leaves)
        err = _rel_err(fwd, step(*leaves))
    print(f"  compile forward only (no_grad, inductor): out {err:.1e}")
    rows.append({"path": "forward only", "backend": "inductor", "out": err})
    return rows


def lowrank_backward(repeats: int, queue: int) -> list[Case]:
    """Forward+backward of the "fused" and "gemm" (several G tiles) backwards and LMF's."""
    torch = _torch()
    return [(_label("f+b", dtype, *case), partial(_backward_case, dtype, *case, repeats=repeats, queue=queue))
            for dtype in (torch.float32, torch.bfloat16) for case in LOWRANK_CASES]  # fmt: skip


def _backward_case(
    dtype: Any, batch: int, dims: tuple[int, ...], out_dim: int, rank: int, *, repeats: int, queue: int
) -> list[dict[str, Any]]:
    torch = _torch()
    import mmfuse
    from mmfuse.backends.triton import _ops

    label = _label("f+b", dtype, batch, dims, out_dim, rank)
    print(label)
    xs, factors, w, bias = _lowrank_inputs(torch, batch, dims, out_dim, rank, dtype, "cuda")
    leaves = [t.detach().requires_grad_(True) for t in (*xs, *factors, w, bias)]
    xg, fg, wg, bg = leaves[: len(dims)], leaves[len(dims) : 2 * len(dims)], leaves[-2], leaves[-1]

    def triton_step(path: str, tiles: Any = None) -> Callable[[], Any]:
        patch: dict[str, Any] = {"LOWRANK_BACKWARD": path}
        if tiles is not None:
            patch["_g_tiles"] = lambda *a: tiles

        def run() -> Any:
            with _Patched(_ops, **patch):
                out = mmfuse.lowrank_fusion(xg, fg, wg, bg, backend="triton")
                return torch.autograd.grad(out.float().sum(), leaves)

        return run

    def lmf() -> Any:
        return torch.autograd.grad(lmf_straightforward(torch, xg, fg, wg[None, :], bg).float().sum(), leaves)

    def accumulated() -> Any:  # gpu.py's form: .backward() into the leaves' .grad
        mmfuse.lowrank_fusion(xg, fg, wg, bg, backend="triton").sum().backward()
        return [t.grad for t in leaves]

    cands: dict[str, Callable[[], Any]] = {
        "lmf": lmf, "fused default": triton_step("fused"), "gemm default": triton_step("gemm"),
        "default path, .sum().backward()": accumulated,
    }  # fmt: skip
    seen = {_name(_ops._g_tiles(rank, out_dim, len(dims), dtype))}
    for cfg in G_TILES:
        t = _tiles(_ops, rank, out_dim, cfg, dtype)
        if _name(t) not in seen:
            seen.add(_name(t))
            cands[f"gemm {_name(t)}"] = triton_step("gemm", t)
    want = cands["fused default"]()
    errs = {k: max(_rel_err(a, b) for a, b in zip(fn(), want)) for k, fn in cands.items() if k != "default path, .sum().backward()"}
    errs["default path, .sum().backward()"] = float("nan")  # accumulates: not comparable (JSON: null)
    times = time_cuda(cands, repeats=repeats, queue=queue)
    mem = {k: peak_mib(cands[k]) for k in ("lmf", "fused default", "gemm default")}
    rows = []
    for k, ms in sorted(times.items(), key=lambda kv: kv[1]):
        extra = f" {mem[k]:8.1f} MiB" if k in mem else ""
        print(f"  {k:<34} {ms:8.3f} ms  {times['lmf'] / ms:5.2f}x lmf  grad err {errs[k]:.1e}{extra}")
        rows.append({"case": label, "cand": k, "ms": ms, "vs_lmf": times["lmf"] / ms, "grad_err": errs[k],
                     "peak_mib": mem.get(k)})  # fmt: skip
    return rows


def zoom_shift(repeats: int, queue: int) -> list[dict[str, Any]]:
    """zoom_shift (256, 512, 512) float32 under each tile, against copy bandwidth."""
    torch = _torch()
    import mmfuse
    from mmfuse.backends.triton import _ops

    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(*ZOOM_SHAPE, device="cuda", generator=gen)
    guide = 2 + 3 * torch.randn(*ZOOM_SHAPE, device="cuda", generator=gen)
    want = mmfuse.zoom_shift(x.double(), guide.double(), alpha=0.5, backend="torch")

    def call(cfg: tuple[int, int, int] | None, bare: bool = False) -> Callable[[], Any]:
        def tiles(n_tok: int, n_ch: int, budget: int, block_c: int | None = None, num_warps: int = 8) -> Any:
            c, warps, block_t = cfg  # type: ignore[misc]
            single = block_t == 0
            return _ops._StatTiles(c, _ops._pow2(n_tok) if single else block_t, single, warps)

        def run() -> Any:
            with _Patched(_ops, **({} if cfg is None else {"_stat_tiles": tiles})):
                if bare:
                    return torch.ops.mmfuse_triton.zoom_shift(x, guide, 0.5, None, None, 1e-5)
                return mmfuse.zoom_shift(x, guide, alpha=0.5, backend="triton")

        return run

    cands: dict[str, Callable[[], Any]] = {"copy": lambda: x.clone(), "default": call(None),
                                           "default, bare op": call(None, bare=True)}  # fmt: skip
    for cfg in ZOOM_TILES:
        cands[f"C{cfg[0]} w{cfg[1]} " + ("one tile" if cfg[2] == 0 else f"T{cfg[2]}")] = call(cfg)
    errs = {}
    with torch.no_grad():
        for k, fn in cands.items():
            if k != "copy":
                try:
                    errs[k] = _rel_err(fn(), want)
                except Exception as exc:
                    print(f"  {k}: FAILED {type(exc).__name__}: {exc}"[:200])
        cands = {k: fn for k, fn in cands.items() if k == "copy" or k in errs}
        times = time_cuda(cands, repeats=repeats, queue=queue)
    nbytes = x.numel() * x.element_size()
    copy_bw = 2 * nbytes / times["copy"]
    rows = []
    print(f"zoom_shift {ZOOM_SHAPE} float32 (x, guide read, y written; copy {copy_bw / 1e6:.0f} GB/s)")
    for k, ms in sorted(times.items(), key=lambda kv: kv[1]):
        frac = (2 if k == "copy" else 3) * nbytes / ms / copy_bw
        err = f"  err {errs[k]:.1e}" if k in errs else ""
        print(f"  {k:<24} {ms:8.3f} ms  {frac:5.0%} of copy{err}")
        rows.append({"case": "zoom_shift", "cand": k, "ms": ms, "of_copy": frac, "err": errs.get(k)})
    return rows


# the fused backward's (BLOCK_B, warps) at h = 1, R = 4 (16 columns: RANK_P padded to 16)
NARROW_BWD_TILES = [(64, 4), (64, 8), (128, 4), (128, 8), (256, 4), (256, 8)]


def narrow_backward(repeats: int, queue: int) -> list[Case]:
    """h = 1, R = 4, B = 262144 forward+backward: the fused backward's row tiles (its default
    32 rows at 8 warps leave most of a 16-column tile's threads idle), then where one default
    step's device time goes (torch profiler, per kernel)."""
    torch = _torch()
    case = next(c for c in LOWRANK_CASES if c[2] == 1)
    return [(_label("f+b", dtype, *case), partial(_narrow_case, dtype, repeats, queue))
            for dtype in (torch.float32, torch.bfloat16)]  # fmt: skip


def _narrow_case(dtype: Any, repeats: int, queue: int) -> list[dict[str, Any]]:
    torch = _torch()
    import mmfuse
    from mmfuse.backends.triton import _ops

    batch, dims, out_dim, rank = next(c for c in LOWRANK_CASES if c[2] == 1)
    rows = []
    label = _label("f+b", dtype, batch, dims, out_dim, rank)
    print(label)
    xs, factors, w, bias = _lowrank_inputs(torch, batch, dims, out_dim, rank, dtype, "cuda")
    leaves = [t.detach().requires_grad_(True) for t in (*xs, *factors, w, bias)]
    xg, fg, wg, bg = leaves[: len(dims)], leaves[len(dims) : 2 * len(dims)], leaves[-2], leaves[-1]
    default_tiles = _ops._lowrank_tiles

    def step(tile: tuple[int, int] | None = None, path: str = "fused") -> Callable[[], Any]:
        def tiles(rank: int, out_dim: int, n_mod: int, dt: Any, backward: bool) -> Any:
            t = default_tiles(rank, out_dim, n_mod, dt, backward)
            return t._replace(block_b=tile[0], num_warps=tile[1]) if backward and tile else t

        def run() -> Any:
            with _Patched(_ops, LOWRANK_BACKWARD=path, _lowrank_tiles=tiles):
                out = mmfuse.lowrank_fusion(xg, fg, wg, bg, backend="triton")
                return torch.autograd.grad(out.float().sum(), leaves)

        return run

    def lmf() -> Any:
        return torch.autograd.grad(lmf_straightforward(torch, xg, fg, wg[None, :], bg).float().sum(), leaves)

    cands: dict[str, Callable[[], Any]] = {"lmf": lmf, "fused default": step(),
                                           "gemm default": step(path="gemm")}  # fmt: skip
    for tile in NARROW_BWD_TILES:
        cands[f"fused B{tile[0]} w{tile[1]}"] = step(tile)
    want = cands["fused default"]()
    errs = {}
    for k, fn in cands.items():  # a tile that fails (compile, launch) is reported and left out
        try:
            errs[k] = max(_rel_err(a, b) for a, b in zip(fn(), want))
        except Exception as exc:
            print(f"  {k}: FAILED {type(exc).__name__}: {exc}"[:200])
    cands = {k: fn for k, fn in cands.items() if k in errs}
    times = time_cuda(cands, repeats=repeats, queue=queue)
    for k, ms in sorted(times.items(), key=lambda kv: kv[1]):
        print(f"  {k:<26} {ms:8.3f} ms  {times['lmf'] / ms:5.2f}x lmf  grad err {errs[k]:.1e}")
        rows.append({"case": label, "cand": k, "ms": ms, "vs_lmf": times["lmf"] / ms, "grad_err": errs[k]})
    for name in ("fused default", "lmf"):
        rows.append({"case": label, "cand": name, "profile": _kernel_profile(cands[name])})
    return rows


def _kernel_profile(fn: Callable[[], Any], steps: int = 3, top: int = 8) -> list[dict[str, Any]]:
    """Device time per kernel over ``steps`` calls (torch profiler), the largest printed."""
    torch = _torch()
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages()
              if str(getattr(e, "device_type", "")).endswith("CUDA") and getattr(e, "device_time_total", 0) > 0]  # fmt: skip
    events.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in events) / steps
    print(f"    profile: {total / 1e3:.3f} ms device time a step in {sum(e.count for e in events) // steps} kernels")
    out = []
    for e in events[:top]:
        print(f"      {e.device_time_total / steps / 1e3:8.3f} ms  x{e.count // steps:<3} {e.key[:90]}")
        out.append({"kernel": e.key, "ms": e.device_time_total / steps / 1e3, "count": e.count / steps})
    return out


# layer steps on CUDA by batch: (label, torch_cpu setup function's shape, batches)
LAYER_SWEEP = [
    ("LowRankFusion wide", ((32, 32, 128), 128, 16), (32, 1024, 4096, 8192, 16384)),
    ("LowRankFusion narrow", ((8, 16, 64), 1, 4), (32, 4096, 65536)),
    ("WanderAdapter collapsed", ((50, 50, 50), 40, 16, 8, 12), (32, 256, 1024, 4096)),
]
_HUGE = 1 << 60


def layers(repeats: int, queue: int) -> list[Case]:
    """Training steps of the layers on CUDA (benchmarks/torch_cpu.py's candidates) by batch,
    under each path the torch backend's accelerator bounds choose between (set from the
    host-bound steps of one H200 run, not timed between B = 32 and the bounds), the Triton
    kernels, and the plain layer: where the bounds belong.  Each candidate's step is checked
    against the plain layer's before timing (:func:`_check_layer_steps`)."""
    _torch()  # (CUDA present, TF32 off)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch_cpu

    import mmfuse
    # (modules by path: the package's names ``lowrank``/``wander`` are its functions)
    lowrank = importlib.import_module("mmfuse.backends.torch.lowrank")
    wander = importlib.import_module("mmfuse.backends.torch.wander")

    def under(run: Callable[[], Any], backend: str, module: Any = None, **values: Any) -> Callable[[], Any]:
        def step() -> Any:
            with mmfuse.config_context(backend=backend):
                if module is None:
                    return run()
                with _Patched(module, **values):
                    return run()

        step.__dict__.update(run.__dict__)  # its inputs and module, for torch_cpu.step_result
        return step

    def run_case(label: str, shape: tuple[Any, ...], batch: int) -> list[dict[str, Any]]:
        case = f"{label} B={batch}"
        print(case)
        if label.startswith("Wander"):
            lengths, dim, rank, r_h, r_t = shape
            got = torch_cpu.setup_wander("", "cuda", (batch, lengths, dim, rank, r_h, r_t))
            base = "released-layer"
            layer = got["mmfuse-layer"]
            cands = {base: got[base], "mmfuse-layer (auto)": layer,
                     "torch, small path": under(layer, "torch", wander, ACCELERATOR_SMALL_ELEMENTS=_HUGE),
                     "torch, custom ops": under(layer, "torch", wander, ACCELERATOR_SMALL_ELEMENTS=-1,
                                                WHOLE_BATCH_ROWS=-1),
                     "triton": under(layer, "triton")}  # fmt: skip
        else:
            dims, out_dim, rank = shape
            got = torch_cpu.setup("", "cuda", (batch, dims, out_dim, rank))
            base = "lmf-layer"
            layer = got["mmfuse-layer"]
            # (on CUDA one bound serves both small forms: at h = 1 the plain form runs)
            small = "torch, plain form" if out_dim == 1 else "torch, whole batch"
            cands = {base: got[base], "mmfuse-layer (auto)": layer,
                     small: under(layer, "torch", lowrank, ACCELERATOR_WHOLE_BATCH_ELEMENTS=_HUGE),
                     "torch, blocked op": under(layer, "torch", lowrank, ACCELERATOR_WHOLE_BATCH_ELEMENTS=-1),
                     "triton": under(layer, "triton")}  # fmt: skip
        checks = _check_layer_steps(torch_cpu, cands, base)
        rows = [{"case": case, "cand": k, **c} for k, c in checks.items() if "error" in c]
        cands = {k: fn for k, fn in cands.items() if "error" not in checks[k]}
        times = time_cuda(cands, repeats=repeats, queue=queue)
        for k, ms in sorted(times.items(), key=lambda kv: kv[1]):
            c = checks[k]
            err = "" if c["rel_err"] is None else f"  err {c['rel_err']:.1e}{'' if c['ok'] else ' MISMATCH'}"
            print(f"  {k:<26} {ms:8.3f} ms  {times[base] / ms:5.2f}x plain{err}")
            rows.append({"case": case, "cand": k, "ms": ms, "vs_plain": times[base] / ms, **c})
        return rows

    return [(f"{label} B={batch}", partial(run_case, label, shape, batch))
            for label, shape, batches in LAYER_SWEEP for batch in batches]  # fmt: skip


def _layer_rtol(dtype: Any) -> float:
    """A layer step's tolerance against the plain layer's, relative to the largest entry:
    float32 (TF32 off) gpu.py's ``LAYER_RTOL``, for the same comparison (observed: outputs
    ~1e-7, gradients up to ~5e-6); 16-bit steps round each product to 8 (bfloat16) or 11
    bits; a wrong or missing term, or a gradient not reached, is far above either."""
    torch = _torch()
    return {torch.float64: 1e-10, torch.float32: LAYER_RTOL}.get(dtype, 3e-2)


def _check_layer_steps(
    torch_cpu: Any, cands: dict[str, Callable[[], Any]], base: str
) -> dict[str, dict[str, Any]]:
    """One step of each candidate against one of the plain layer ``base``, on the same inputs
    and parameters, before anything is timed (the forced paths run only on CUDA, so no test
    covers them): {candidate: {rel_err, tol, ok}}, ``rel_err`` the largest of the output's and
    every gradient's (inputs' and parameters', the plain layer's mapped onto the mmfuse
    layer's: ``torch_cpu.step_result``) max |got - want| / max |want| (gpu.py's ``_rel_err``),
    null for ``base``.  One past the tolerance is printed as a MISMATCH and marked ``ok``
    false but still timed (a wrong path's time is no reason to lose the others'); one that
    raises gets ``error`` instead and is left out of the timings."""
    want_out, want_grads = torch_cpu.step_result(cands[base])
    tol = _layer_rtol(want_out.dtype)
    checks: dict[str, dict[str, Any]] = {base: {"rel_err": None, "tol": tol, "ok": True}}
    for name, run in cands.items():
        if name == base:
            continue
        try:
            out, grads = torch_cpu.step_result(run)
            if grads.keys() != want_grads.keys():
                raise AssertionError(f"gradients of {sorted(grads)} against {sorted(want_grads)}")
            pairs = [(out, want_out), *((grads[k], want_grads[k]) for k in want_grads)]
            # (_rel_err broadcasts: a result of another shape is a mismatch, not a number)
            errs = [_rel_err(a, b) if a.shape == b.shape else math.inf for a, b in pairs]
            err = max(errs, key=lambda e: math.inf if math.isnan(e) else e)  # a NaN wins
            checks[name] = {"rel_err": err, "tol": tol, "ok": err <= tol}
        except Exception as exc:
            traceback.print_exc()
            checks[name] = {"error": f"{type(exc).__name__}: {exc}"[:300], "ok": False}
    shown = ", ".join(f"{k} {c['rel_err']:.1e}" for k, c in checks.items() if c.get("rel_err") is not None)
    print(f"  check vs {base} (output, gradients), max rel. error: {shown} (tol {tol:.0e})")
    for name, c in checks.items():
        if not c["ok"]:
            if "error" in c:
                print(f"  FAILED {name} (left out of the timings): {c['error']}")
            else:
                print(f"  MISMATCH {name}: rel. error {c['rel_err']:.1e} > {tol:.0e}")
    return checks


def lowrank_forward(repeats: int, queue: int) -> list[Case]:
    """Forward under each tile, beside LMF-style code and the GEMM-only time."""
    torch = _torch()
    return [(_label("fwd", dtype, *case), partial(_forward_case, dtype, *case, repeats=repeats, queue=queue))
            for dtype in (torch.float32, torch.bfloat16) for case in LOWRANK_CASES]  # fmt: skip


def _forward_case(
    dtype: Any, batch: int, dims: tuple[int, ...], out_dim: int, rank: int, *, repeats: int, queue: int
) -> list[dict[str, Any]]:
    torch = _torch()
    import mmfuse
    from mmfuse.backends.triton import _ops

    label = _label("fwd", dtype, batch, dims, out_dim, rank)
    print(label)
    xs, factors, w, bias = _lowrank_inputs(torch, batch, dims, out_dim, rank, dtype, "cuda")

    def triton_fwd(tiles: Any = None) -> Callable[[], Any]:
        patch = {} if tiles is None else {"_lowrank_tiles": lambda *a, **k: tiles}

        def run() -> Any:
            with _Patched(_ops, **patch):
                return mmfuse.lowrank_fusion(xs, factors, w, bias, backend="triton")

        return run

    cands: dict[str, Callable[[], Any]] = {
        "lmf": lambda: lmf_straightforward(torch, xs, factors, w[None, :], bias),
        "gemm-only": lambda: [torch.matmul(x, f[:, :-1, :]) for x, f in zip(xs, factors)],
        "default": triton_fwd(),
    }
    seen = {_name(_ops._lowrank_tiles(rank, out_dim, len(dims), dtype, False))}
    for cfg in FWD_TILES:
        t = _tiles(_ops, rank, out_dim, cfg, dtype)
        if _name(t) not in seen:
            seen.add(_name(t))
            cands[_name(t)] = triton_fwd(t)
    with torch.no_grad():
        want = cands["default"]()
        errs = {k: _rel_err(fn(), want) for k, fn in cands.items() if k not in ("lmf", "gemm-only")}
        times = time_cuda(cands, repeats=repeats, queue=queue)
    rows = []
    for k, ms in sorted(times.items(), key=lambda kv: kv[1]):
        err = f"  err vs default {errs[k]:.1e}" if k in errs else ""
        print(f"  {k:<26} {ms:8.3f} ms  {times['lmf'] / ms:5.2f}x lmf  {ms / times['gemm-only']:5.2f}x gemm{err}")
        rows.append({"case": label, "cand": k, "ms": ms, "vs_lmf": times["lmf"] / ms,
                     "vs_gemm": ms / times["gemm-only"], "err": errs.get(k)})  # fmt: skip
    return rows


# the order sections run in, cheapest first (H200 runs, RESULTS.md): zoom_shift is one case
# of seconds; the compile diagnosis a few graphs; narrow two cases; the layers twelve small
# steps; backward and forward six cases of up to 14 tiles (the forward sweep alone outlasted
# a 10-minute call).  ``--only narrow,layers,zoom`` had run zoom last, and lost it to the budget.
RUN_ORDER = ("zoom", "compile", "narrow", "layers", "backward", "forward")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help="start no timing case after this (default 300)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--queue", type=int, default=4, help="calls between a sample's events (default 4)")
    parser.add_argument("--json", help="write the rows here (default: $OUT/tune.json when $OUT is set)")
    parser.add_argument("--only", default=",".join(RUN_ORDER),
                        help="sections, comma-separated (default: all); they run cheapest first")  # fmt: skip
    args = parser.parse_args()
    only = args.only.split(",")
    if unknown := sorted(set(only) - set(RUN_ORDER)):
        parser.error(f"unknown sections {unknown}: choose from {','.join(RUN_ORDER)}")
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    start = time.monotonic()
    torch = _torch()
    import mmfuse.backends.triton  # noqa: F401

    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    out_json = args.json or (os.path.join(os.environ["OUT"], "tune.json") if os.environ.get("OUT") else None)
    log = _Log(out_json, torch.cuda.get_device_name())
    log.save()  # (a run killed in its first case still leaves a file naming the device)
    sections: dict[str, Callable[[], list[Case]]] = {
        "compile": lambda: [("torch.compile vs eager", compile_diagnosis)],
        "backward": lambda: lowrank_backward(args.repeats, max(1, args.queue // 2)),
        "zoom": lambda: [(f"zoom_shift {ZOOM_SHAPE}", lambda: zoom_shift(args.repeats * 2, args.queue * 2))],
        "forward": lambda: lowrank_forward(args.repeats, args.queue),
        "narrow": lambda: narrow_backward(args.repeats, max(1, args.queue // 2)),
        "layers": lambda: layers(args.repeats * 2, args.queue),
    }
    for name in sorted(set(only), key=RUN_ORDER.index):
        if time.monotonic() - start > args.budget_s:
            print(f"skipped (budget): {name}")
            log.note("skipped", name)
            continue
        t0 = time.monotonic()
        try:
            cases = sections[name]()
        except Exception:
            traceback.print_exc()
            log.note("failed", name)
            continue
        for i, (label, case) in enumerate(cases):
            # the budget is read before every case, not only between sections: a long sweep
            # stops at it instead of running on into the command's time limit (the cheap
            # sections ran first, RUN_ORDER), and what it left out is in the JSON
            if i and time.monotonic() - start > args.budget_s:
                print(f"skipped (budget): {name}: {len(cases) - i} of {len(cases)} cases, from {label}")
                log.note("skipped_cases", *(f"{name}: {left}" for left, _ in cases[i:]))
                break
            try:
                log.add(name, case())
            except Exception:  # report it and go on: the other cases still run
                traceback.print_exc()
                log.note("failed", f"{name}: {label}")
            torch.cuda.empty_cache()
        print(f"  ({name}: {time.monotonic() - t0:.0f} s)")
    for key in ("skipped", "skipped_cases", "failed", "mismatch"):
        if log.results[key]:
            print(f"{key}: {'; '.join(log.results[key])}")
    log.save()
    print(f"total {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
