"""Compile the backend's kernels for a GPU without having one: a check that CI can run.

The interpreter (``TRITON_INTERPRET=1``) checks what the kernels compute, but not that
Triton's compiler accepts them (the interpreter runs the Python source, so constructs the
compiler refuses would pass there).  :func:`compile_kernels` replays the ops' host code on
small CPU tensors with the launches recorded instead of run, then compiles every recorded
launch ahead of time for a CUDA target (Triton -> PTX -> cubin with the ptxas that ships in
the triton wheel) and reports each kernel's registers, spills and shared memory, read from
``ptxas -v``.  No GPU and no CUDA driver are needed.

Must run in a process where the kernels were *not* built for the interpreter
(``TRITON_INTERPRET`` unset when :mod:`mmfuse.backends.triton` was first imported).
``python -m mmfuse.backends.triton._compile_check [prefix]`` prints one row per kernel, of
the cases whose label starts with ``prefix`` ("sequence", "lowrank", "cp", "align", ...)
when one is given.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource

from . import _align_ops, _ops, _sequence_ops

__all__ = ["compile_kernels", "recorded_launches"]

# launch keywords that are compiler options, not kernel parameters
_LAUNCH_OPTIONS = ("num_warps", "num_stages")


@contextmanager
def recorded_launches() -> Iterator[list[tuple[Any, tuple[Any, ...], dict[str, Any]]]]:
    """Within this context the ops' ``wrap_triton(kernel)[grid](*args, **kw)`` records
    (kernel, args, kw) and launches nothing (outputs stay uninitialised)."""
    seen: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = []

    class _Recorder:
        def __init__(self, kernel: Any) -> None:
            self.kernel = kernel

        def __getitem__(self, grid: Any) -> Callable[..., None]:
            def launch(*args: Any, **kw: Any) -> None:
                seen.append((self.kernel, args, kw))

            return launch

    # every module that launches kernels through its own ``wrap_triton`` name
    with (
        mock.patch.object(_ops, "wrap_triton", _Recorder),
        mock.patch.object(_sequence_ops, "wrap_triton", _Recorder),
        mock.patch.object(_align_ops, "wrap_triton", _Recorder),
    ):
        yield seen


def _signature(
    kernel: Any, args: tuple[Any, ...], kw: dict[str, Any]
) -> tuple[dict[str, str], dict[str, Any], dict[tuple[int, ...], Any]]:
    """(signature, constexprs, attrs) of a launch as Triton's JIT specialises it: its own
    rule for each argument (pointer types from the tensors' dtypes, ``fp32`` for floats, an
    int equal to 1 made a constexpr, 16-divisible ints and 16-byte-aligned pointers marked
    ``tt.divisibility``), so each recorded launch compiles to the kernel a GPU run would
    build (collapsed Wander, with R_h = R_t = 1, is its own specialisation)."""
    names = kernel.arg_names
    sig: dict[str, str] = {}
    constexprs: dict[str, Any] = {}
    attrs: dict[tuple[int, ...], Any] = {}
    for i, (name, value) in enumerate(zip(names, args)):
        kind, attr = native_specialize_impl(BaseBackend, value, False, True, True)
        sig[name] = kind
        if kind == "constexpr":
            constexprs[name] = attr
        elif isinstance(attr, str) and attr:
            attrs[(i,)] = BaseBackend.parse_attr(attr)
    for name, value in kw.items():
        if name not in _LAUNCH_OPTIONS:
            sig[name] = "constexpr"
            constexprs[name] = value
    return sig, constexprs, attrs


def _ptxas_stats(ptx: str, capability: int, arch: str) -> dict[str, int]:
    # the ptxas Triton itself uses for this target (the wheel ships two CUDA versions)
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(capability).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        run = subprocess.run(
            [ptxas, f"-arch={arch}", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
    text = run.stdout + run.stderr
    if run.returncode:
        raise RuntimeError(f"ptxas failed on a kernel Triton compiled: {text.strip()}")
    stats = {}
    for key, pattern in (
        ("registers", r"Used (\d+) registers"),
        ("spill_stores", r"(\d+) bytes spill stores"),
        ("spill_loads", r"(\d+) bytes spill loads"),
        ("smem", r"(\d+) bytes smem"),
    ):
        found = re.search(pattern, text)
        stats[key] = int(found.group(1)) if found else 0
    return stats


# (dims, h, R): the first two sizes (the third shares the first's specialisations),
# M = 8 with the fused backward (R h <= 16) and with the G kernel (R h > 16), and the largest
# rank the kernels take (_ops.MAX_RANK: the most shared memory) at M = 2 and M = 8
_CASES = (((32, 32, 128), 128, 16), ((8, 16, 64), 1, 4), ((5, 3, 2, 7, 1, 2, 3, 4), 3, 2),
          ((5, 3, 2, 7, 1, 2, 3, 4), 16, 2), ((16, 16), 1, _ops.MAX_RANK),
          ((5, 3, 2, 7, 1, 2, 3, 4), 1, _ops.MAX_RANK))  # fmt: skip


def _cases() -> Iterator[tuple[str, Callable[[], Any]]]:
    """Problems that reach every kernel specialisation the benchmarks use (nothing runs:
    the launches are only recorded)."""
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for dims, out_dim, rank in _CASES:
            n_mod = len(dims)
            xs = [torch.randn(33, d, generator=gen).to(dtype).requires_grad_() for d in dims]
            fs = [torch.randn(rank, d + 1, out_dim, generator=gen).to(dtype).requires_grad_() for d in dims]
            w = torch.randn(rank, generator=gen).to(dtype).requires_grad_()
            b = torch.randn(out_dim, generator=gen).to(dtype)
            present = torch.rand(33, n_mod, generator=gen) < 0.7
            label = f"{dtype} dims={dims} h={out_dim} R={rank}"

            def lowrank(xs: Any = xs, fs: Any = fs, w: Any = w, b: Any = b, present: Any = present) -> Any:
                out = torch.ops.mmfuse_triton.lowrank_fusion(xs, fs, w, b, True, present)
                needs = [True] * (2 * len(xs) + 2)
                return torch.ops.mmfuse_triton.lowrank_fusion_backward(out, xs, fs, w, True, present, needs)

            yield f"lowrank {label}", lowrank
            cp = [torch.randn(d + 1, rank, generator=gen).to(dtype) for d in dims]
            cp.append(torch.randn(out_dim, rank, generator=gen).to(dtype))

            def cp_fusion(xs: Any = xs, w: Any = w, cp: Any = cp, b: Any = b) -> Any:
                return torch.ops.mmfuse_triton.cp_fusion(xs, w, cp, b, True, None)

            yield f"cp {label}", cp_fusion
        for shape, gshape in (((256, 512, 512), (256, 512, 512)), ((4, 3000, 40), (4, 700, 40))):
            x = torch.randn(*shape, generator=gen).to(dtype)
            g = torch.randn(*gshape, generator=gen).to(dtype)
            mask = torch.ones(shape[:-1], dtype=torch.bool)
            gmask = torch.ones(gshape[:-1], dtype=torch.bool)

            def stats(x: Any = x, g: Any = g, mask: Any = mask, gmask: Any = gmask) -> Any:
                torch.ops.mmfuse_triton.moments(x, mask, 1e-5)
                torch.ops.mmfuse_triton.zoom_shift(x, g, 0.5, mask, gmask, 1e-5)
                return torch.ops.mmfuse_triton.zoom_shift(x, g, 1.0, None, None, 1e-5)

            yield f"moments/zoom_shift {dtype} x={shape} guide={gshape}", stats
        for lengths, widths, ranks, n_out, out_dim in _SEQ_CASES:
            yield from _sequence_cases(gen, dtype, lengths, widths, ranks, n_out, out_dim)
        for n_mod in _SEQ_GRID_MODALITIES:
            for width in _SEQ_GRID_WIDTHS:
                yield from _sequence_cases(
                    gen, dtype, (9,) * n_mod, (width,) * n_mod, (2, 2), 64, 64, unmasked=False
                )
        for tokens, channels in _ALIGN_CASES:
            yield from _align_cases(gen, dtype, tokens, channels)


# sequence_fusion / wander: (T_m, r_m, (R_h, R_t), T_out, D): the CMU-MOSI adapter (the
# released configuration benchmarks/gpu.py times), odd sizes with several output tiles and
# the K loop, and eight modalities of the widest tile (r_m = 64: the smaller token tile)
_SEQ_CASES = (
    ((50, 50, 50), (16, 16, 16), (8, 12), 16, 40),
    ((37, 50, 19), (16, 8, 20), (3, 2), 33, 70),
    ((9,) * 8, (64,) * 8, (2, 2), 64, 64),
)
# and the tile rule's range (``_sequence_ops._sequence_tiles``): M modalities of width r_m each,
# T_out = D = 64 so that the rule, not the problem, bounds the tiles (masked calls only: the
# unmasked kernel differs by the mask loads alone, and _SEQ_CASES compiles both).  Widths
# above ``_sequence_ops.MAX_WIDTH`` (64) never reach the kernel (the torch backend takes them).
_SEQ_GRID_MODALITIES = (2, 4, 8)
_SEQ_GRID_WIDTHS = (16, 32, 64)
# align: (tokens per modality, channels): benchmarks/gpu.py's (256, 512, 512) pair (one
# statistics tile) and three modalities whose token axes loop over blocks
_ALIGN_CASES = (((512, 512), 512), ((3000, 700, 50), 40))


def _sequence_cases(
    gen: torch.Generator, dtype: torch.dtype, lengths: tuple[int, ...], widths: tuple[int, ...],
    ranks: tuple[int, int], n_out: int, out_dim: int, unmasked: bool = True,
) -> Iterator[tuple[str, Callable[[], Any]]]:  # fmt: skip
    """``sequence_fwd_kernel`` in cp and collapsed mode (R_h = R_t = 1 after the host's rank
    sums), with token masks and (``unmasked``) without."""
    r_h, r_t = ranks
    batch = 3
    hs = [torch.randn(batch, t, r, generator=gen).to(dtype) for t, r in zip(lengths, widths)]
    feats = [torch.randn(r_h, r, out_dim, generator=gen).to(dtype) for r in widths]
    toks = [torch.randn(r_t, t, n_out, generator=gen).to(dtype) for t in lengths]
    masks: list[Any] = [torch.rand(batch, t, generator=gen) < 0.7 for t in lengths]
    label = f"{dtype} T={lengths} r={widths} R={ranks} T_out={n_out} D={out_dim}"
    for mode in ("cp", "collapsed"):

        def run(mode: str = mode) -> Any:
            out = torch.ops.mmfuse_triton.sequence_fusion(hs, feats, toks, mode, masks)
            if unmasked:
                out = torch.ops.mmfuse_triton.sequence_fusion(hs, feats, toks, mode, [None] * len(hs))
            return out

        yield f"sequence {mode} {label}", run


def _align_cases(
    gen: torch.Generator, dtype: torch.dtype, tokens: tuple[int, ...], channels: int
) -> Iterator[tuple[str, Callable[[], Any]]]:
    """``stats_kernel`` (with and without a mask) and ``map_kernel`` (about the pivot, and the
    identity map ``x s + target``) on each modality's shape."""
    xs = [torch.randn(2, t, channels, generator=gen).to(dtype) for t in tokens]

    def run() -> Any:
        for x in xs:
            mask = torch.ones(x.shape[:-1], dtype=torch.bool)
            torch.ops.mmfuse_triton.align_stats(x, mask)
            pivot, _, _ = torch.ops.mmfuse_triton.align_stats(x, None)
            scale = torch.ones_like(pivot)
            torch.ops.mmfuse_triton.align_map(x, pivot, pivot, scale, pivot)
            torch.ops.mmfuse_triton.align_map(x, None, None, scale, pivot)

    yield f"align {dtype} tokens={tokens} C={channels}", run


def compile_kernels(
    capability: int = 90, arch: str = "sm_90a", only: str | None = None
) -> list[dict[str, Any]]:
    """Compile every kernel specialisation of :func:`_cases` (those whose label starts with
    ``only``, when given: "sequence", "lowrank", "align", ...) for ``capability`` and return
    one row per compiled kernel: case, kernel, registers, spill bytes, shared memory, and
    the launch options and tile constexprs (``BLOCK_*``, ``RANK_P``) it was compiled with."""
    if _ops.INTERPRETED:
        raise RuntimeError("the kernels were built for the interpreter; run without TRITON_INTERPRET=1")
    target = GPUTarget("cuda", capability, 32)
    rows: list[dict[str, Any]] = []
    done: set[tuple[Any, ...]] = set()
    for label, run in _cases():
        if only is not None and not label.startswith(only):
            continue
        with recorded_launches() as seen, torch.no_grad():
            run()
        for kernel, args, kw in seen:
            sig, constexprs, attrs = _signature(kernel, args, kw)
            key = (kernel.fn.__name__, tuple(sorted(sig.items())), tuple(sorted(kw.items())),
                   tuple(sorted(constexprs.items())), tuple(sorted(attrs)))  # fmt: skip
            if key in done:
                continue
            done.add(key)
            options = {k: kw[k] for k in _LAUNCH_OPTIONS if k in kw}
            src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
            compiled = triton.compile(src, target=target, options=options)
            stats = _ptxas_stats(compiled.asm["ptx"], capability, arch)
            tiles = {k: v for k, v in kw.items() if k.startswith("BLOCK") or k == "RANK_P"}
            # ptxas's smem is the static shared memory; Triton's (pipelined loads, layout
            # conversions) is dynamic, allocated at launch: the compiled kernel's metadata
            stats["dynamic_smem"] = int(compiled.metadata.shared)
            rows.append({"case": label, "kernel": kernel.fn.__name__, **options, **tiles, **stats})
    return rows


if __name__ == "__main__":
    # python -m mmfuse.backends.triton._compile_check [label prefix, e.g. sequence]
    import sys

    for row in compile_kernels(only=sys.argv[1] if len(sys.argv) > 1 else None):
        print(row)
