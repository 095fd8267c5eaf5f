"""Pieces the torch backend's operators share: dtypes, factor layouts, masked rows, the
blocked reductions of the backwards, and saving a fusion's inputs for backward.

Public names of a private module: the operator modules of this package use them, nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = [
    "BLOCK_BYTES",
    "LOW_PRECISION",
    "NARROW_WIDTH",
    "affine",
    "autograd_grads",
    "cast",
    "column_sums",
    "compute_dtype",
    "flat_factor",
    "flat_rows",
    "gram",
    "load_fusion_inputs",
    "masked_rows",
    "project_into",
    "save_fusion_inputs",
    "store",
    "store_gram",
]

# Per batch block on the CPU, the working set is kept near this many bytes: small enough to stay
# in the last-level cache, large enough that per-op overhead (and OpenMP start-up) stays
# negligible.  CUDA tensors get far larger blocks (mmfuse._namespace.block_budget).
BLOCK_BYTES = 1 << 23
LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in LOW_PRECISION else dtype


def flat_rows(t: torch.Tensor) -> torch.Tensor:
    """A (B, T, r) tensor as its (B T, r) rows, the row count named: ``reshape(-1, r)``
    cannot resolve -1 for r = 0 (a modality of width 0 failed its backward)."""
    return t.reshape(t.shape[0] * t.shape[1], t.shape[2])


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, skipping the dispatcher when there is nothing to do (the usual case:
    these ops are called per layer per step, and ~3 us per no-op cast adds up at small sizes)."""
    return t if t.dtype == dtype else t.to(dtype)


# Projections at most this wide are stored transposed (see _flat).
NARROW_WIDTH = 8


def flat_factor(factor: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """(R, D, h) factor -> (D, R h) matrix, optionally scaling rank r by scale[r].

    Wide projections get a row-major (D, R h) copy.  Narrow ones (R h <= NARROW_WIDTH) get the
    transpose of a row-major (R h, D) copy: MKL's GEMMs with a handful of output columns run
    1.3-2x faster with the weights in that layout (x @ W^T, as torch.nn.Linear stores them),
    for the forward projection and for dL/dx alike, while wide ones run faster row-major
    (measured on the benchmarks' shapes).  Callers see the same (D, R h) shape either way.
    """
    rank, rows, out = factor.shape
    if scale is not None:
        factor = factor * scale[:, None, None]
    if rank * out <= NARROW_WIDTH:
        return factor.permute(0, 2, 1).reshape(rank * out, rows).contiguous().t()
    return factor.permute(1, 0, 2).reshape(rows, rank * out).contiguous()




def masked_rows(x: torch.Tensor, present: torch.Tensor | None, m: int, blk: slice) -> torch.Tensor:
    x = x[blk]
    if present is None:
        return x
    # where, not multiply: NaNs in absent samples must not leak into the result
    return torch.where(present[blk, m : m + 1], x, torch.zeros((), dtype=x.dtype, device=x.device))


def project_into(out: torch.Tensor, x: torch.Tensor, mat: torch.Tensor, append_one: bool) -> None:
    """``out = [x, 1] @ mat`` (``x @ mat`` without the constant), written into ``out``.

    The constant row is ``addmm``'s bias, except for long narrow outputs on the CPU (see
    :func:`_row_add_fold`): there it is added over the output's folded view (:func:`_folded`)
    after a plain ``mm`` (the same sums: the row is added last either way).
    """
    if not append_one:
        torch.mm(x, mat, out=out)
        return
    # (mat is (d + 1, width): its constant row is the last, read as -1, as in affine)
    folded = _folded(out) if _row_add_fold(out.shape[0], out.shape[1], out.device) else None
    if folded is None:
        torch.addmm(mat[-1], x, mat[:-1], out=out)
        return
    torch.mm(x, mat[:-1], out=out)
    folded.add_(_tiled(mat[-1], folded.shape[1]))


# project_into and affine add the constant row after the GEMM (over the output's folded view)
# for outputs of 2 to _ROW_ADD_WIDTH columns and at least _ROW_ADD_ROWS rows; else it is
# addmm's bias.  Why the fold: on the Intel machine of RESULTS.md's twenty-second session
# MKL's GEMM with an accumulated output (beta = 1) ran about 200 us slower than without at
# (65536, 8 or 16) x (., 4) (308 against 88 us at d = 8), and the mm plus the row's add
# over the folded view took 119-131; at d = 64 they were even, at 16 columns addmm was
# faster.  Why only from _ROW_ADD_ROWS rows (a review's find and measurement, on the 2-core
# AMD EPYC machine, torch 2.13 with MKL, float32, one thread, d 8 and 16, both factor
# layouts, fold and addmm interleaved in one process, medians of 15-31 rounds): the fold's
# view, tiled row and extra pass cost 20-45 us a call whatever the size, which never paid
# back there.  Fold over addmm at 2 to 8 columns: 1.2-4.6x at B = 64 to 1024 (mostly 2-3.3x;
# a narrow CP fusion's forward at B = 512 took 2.4-2.7x the plain torch code's time, 1.8-1.9x
# with addmm), 1.0-3.7x at 4096, within the noise at 16384 and 65536 (medians and minima
# scattered both ways, 0.6-1.3x); at one column (MKL's GEMV path) 1.1-1.4x slower even there,
# hence 2 columns and up, as the Intel rule's "2 to 8".  From 16384 rows on the fold costs
# nothing measurable there and keeps the Intel machine's gain.
_ROW_ADD_WIDTH = 8
_ROW_ADD_ROWS = 16384


def _row_add_fold(n: int, width: int, device: torch.device) -> int:
    """k of the folded view over which :func:`project_into` and :func:`affine` add the
    constant row of an (n, width) projection on ``device`` (see the constants above), or 0
    where it is ``addmm``'s bias."""
    # the compile test before the rows test: a size test on symbolic shapes guards the graph
    if not 2 <= width <= _ROW_ADD_WIDTH or torch.compiler.is_compiling() or n < _ROW_ADD_ROWS:
        return 0
    return _fold_rows(n, width, device)


def _tiled(row: torch.Tensor, width: int) -> torch.Tensor:
    """``row`` repeated to ``width`` elements (a folded view's row; expand and reshape:
    2.7 us where ``repeat`` took 6.2)."""
    return row.expand(width // row.shape[0], -1).reshape(-1)


def gram(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``g^T x`` for a (n, k) ``g`` and (n, d) ``x``: the factor gradient, whose GEMM reduces
    over the long batch axis.

    (G^T x), not x^T G: much faster for narrow k (measured), the same for wide.  When k is
    narrow and n long, one GEMM of shape (k, n) x (n, d) leaves most cores idle (its output is
    tiny, and MKL splits a GEMM over its output); the batch is then cut into ``c`` equal
    chunks, one batched GEMM computes their (k, d) partial products in parallel, and the
    partials are summed in a fixed order (so the result does not depend on the thread count).
    Measured on the 2-core CI machine at (65536, 4) x (65536, 64): 0.8-1.2 ms against 2.1-4 ms.
    """
    n, k = g.shape
    # under torch.compile the plain product: the chunk count would guard a graph on the batch
    # size (so, as column_sums, eager and compiled results agree to rounding, not bits)
    if torch.compiler.is_compiling():
        return g.t() @ x
    chunks = min(16, n // _GRAM_CHUNK_ROWS)
    if k > NARROW_WIDTH or chunks < 2:
        return g.t() @ x
    per = n // chunks
    head = chunks * per
    d = x.shape[1]
    out = torch.bmm(g[:head].reshape(chunks, per, k).transpose(1, 2), x[:head].reshape(chunks, per, d)).sum(0)
    if head < n:
        out.add_(g[head:].t() @ x[head:])
    return out


def store(acc: torch.Tensor, value: torch.Tensor, first: bool) -> None:
    """A blocked reduction's step: ``acc = value`` for the first block, ``acc += value`` after
    (no zero fill and no extra pass over ``acc`` when there is one block)."""
    if first:
        acc.copy_(value)
    else:
        acc.add_(value)


def store_gram(acc: torch.Tensor, g: torch.Tensor, x: torch.Tensor, first: bool) -> None:
    """:func:`store` of ``x^T g`` into the (d, k) ``acc``.  Wide ``g``: one GEMM writing (or
    adding into) ``acc`` itself, no temporary; narrow: :func:`gram`'s chunked product."""
    if g.shape[1] <= NARROW_WIDTH:
        store(acc, gram(g, x).t(), first)
    elif first:
        torch.mm(x.t(), g, out=acc)
    else:
        acc.addmm_(x.t(), g)


def autograd_grads(
    compute: Callable[[], torch.Tensor],
    inputs: Sequence[torch.Tensor],
    needs: Sequence[bool],
    grad: torch.Tensor,
) -> list[torch.Tensor | None]:
    """The gradients of ``compute()``, a function of ``inputs``, for upstream ``grad`` with
    respect to the inputs flagged in ``needs`` (None for the others), by autograd: a custom
    op's backward where its own formulas cannot run.  With a graph of the backward wanted
    (double backward) that graph is recorded; under autograd's vmap (batched gradients)
    only the values are (the opaque backwards' buffers have no batching rule there)."""
    graph = torch.is_grad_enabled()
    wanted = [t for t, need in zip(inputs, needs) if need]
    with torch.enable_grad():
        found = iter(torch.autograd.grad(compute(), wanted, grad, create_graph=graph, allow_unused=True))
    return [next(found) if need else None for need in needs]


def _folded(a: torch.Tensor) -> torch.Tensor | None:
    """A contiguous narrow (n, W) CPU tensor (W < 64) as its (n / k, k W) view with
    k = 64 // W (k rows side by side), or None where there is none (other devices, under
    ``torch.compile``, wide or strided tensors, n not a multiple of k).  torch runs
    row-broadcast and column reductions over a narrow matrix element by element, several times
    slower than over this view.  (Under ``torch.compile`` None: measured in eager mode only,
    and with dynamic shapes the test of ``n % k`` would guard the graph on the row count, a
    recompile per remainder.)"""
    n, width = a.shape
    k = _fold_rows(n, width, a.device)
    if not k or not a.is_contiguous():
        return None
    return a.view(n // k, k * width)


def _fold_rows(n: int, width: int, device: torch.device) -> int:
    """k of :func:`_folded`'s view of a contiguous (n, width) tensor on ``device``, or 0 where
    there is none."""
    if device.type != "cpu" or torch.compiler.is_compiling() or not 0 < width < 64:
        return 0
    k = 64 // width
    return 0 if k == 1 or n % k else k


def column_sums(a: torch.Tensor) -> torch.Tensor:
    """``a.sum(dim=0)`` of a (n, W) tensor.  A narrow CPU one is summed over its folded view
    (:func:`_folded`), then the k partial rows: torch reduces the rows of a narrow matrix
    element by element, 5x slower (52 against 11 us at (65536, 4)).  Other summation order,
    same sum to rounding."""
    folded = _folded(a)
    if folded is None:
        return a.sum(dim=0)
    return folded.sum(dim=0).view(-1, a.shape[1]).sum(dim=0)


# Fewest rows per chunk of gram's batched GEMM.
_GRAM_CHUNK_ROWS = 2048



def affine(x: torch.Tensor, mat: torch.Tensor, append_one: bool) -> torch.Tensor:
    """``[x, 1] @ mat`` (``x @ mat`` without the constant) for a (n, d) ``x``, out of place
    and differentiable: :func:`project_into`'s rule, for a backward that recomputes the
    projections its forward wrote (long narrow outputs with a folded view,
    :func:`_row_add_fold`: ``mm``, then the constant row over that view; all others:
    ``addmm``), so both round alike."""
    if not append_one:
        return x @ mat
    # mat is (d + 1, width), its constant row the last: read as -1, not as d = x.shape[1],
    # an index that fixed d in a compiled graph with dynamic shapes (a recompile per feature
    # size of cp_fusion's backward; a review's find)
    width = mat.shape[1]
    k = _row_add_fold(x.shape[0], width, x.device)
    if not k:
        return torch.addmm(mat[-1], x, mat[:-1])
    y = x @ mat[:-1]  # contiguous: its folded view exists
    return (y.view(-1, k * width) + _tiled(mat[-1], k * width)).view(y.shape)


def save_fusion_inputs(
    ctx: Any, xs: Any, factors: Any, weights: Any, present: Any, append_one: bool, *kept: Any
) -> None:
    """Save the inputs of a fusion op (the caller holds them anyway) and, last, what the
    forward chose to keep (narrow low-rank fusions: their projections; see the module
    docstring)."""
    ctx.n_mod = len(xs)
    ctx.append_one = append_one
    ctx.has_weights = weights is not None
    ctx.has_present = present is not None
    extra = [t for t in (weights, present) if t is not None]
    ctx.save_for_backward(*xs, *factors, *extra, *kept)


def load_fusion_inputs(ctx: Any, n_factors: int) -> tuple[list[Any], list[Any], Any, Any, list[Any]]:
    """The inverse of :func:`save_fusion_inputs`: (xs, factors, weights, present, kept).

    ``ctx.saved_tensors`` is read once, here: each read unpacks every saved tensor again,
    which runs saved-tensor hooks twice and which non-reentrant activation checkpointing
    refuses (``CheckpointError``: a tensor unpacked twice; a review's find, when the kept
    projections were read by a second read)."""
    n_mod = ctx.n_mod
    saved = ctx.saved_tensors
    xs, factors = list(saved[:n_mod]), list(saved[n_mod : n_mod + n_factors])
    rest = list(saved[n_mod + n_factors :])
    weights = rest.pop(0) if ctx.has_weights else None
    present = rest.pop(0) if ctx.has_present else None
    return xs, factors, weights, present, rest


