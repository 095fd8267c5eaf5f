"""Run a per-sample NumPy kernel on each batch chunk of Dask arrays (lazily, no reduction).

The Array-API core already works on Dask arrays, but Dask then schedules each standard call
(matmul, multiply, sum) as its own task with its own full-chunk intermediate.  For ops whose
intermediates are much larger than their inputs (LMF's (rows, R h) projections), running the
NumPy fast path once per chunk keeps worker memory at a few chunks and lets that path block
the chunk for cache.  The graph gets one task per batch chunk; nothing is computed here.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

from .._namespace import is_dask

__all__ = ["dask_max", "elementwise_per_chunk", "one_chunk", "per_batch_chunk", "reshaped"]


def one_chunk(params: Sequence[Any]) -> list[Any]:
    """Dask parameters (arrays or ``None``) each in one chunk; other arrays as they are.

    Parameters have no batch axis: a chunked one, contracted with the batched inputs through
    reshapes that merge the batch with it, fragmented the output's batch chunks (one sample a
    chunk, many more tasks; an empty batch failed in Dask's reshape).  They are small, so
    one chunk each costs nothing."""
    return [None if p is None else _whole(p, from_axis=0) for p in params]


def reshaped(xp: Any, x: Any, shape: tuple[Any, ...]) -> Any:
    """``xp.reshape(x, shape)``, also for a Dask array without elements: Dask's reshape only
    merges or splits existing axes, and refuses to split an empty one (an output width h = 0
    crashed the interaction terms and tensor_fusion on Dask; a review's find).  An empty
    array's reshape is a new empty array: nothing of ``x`` is lost."""
    if 0 in shape and is_dask(xp):
        return xp.zeros(shape, dtype=x.dtype)
    return xp.reshape(x, shape)


def dask_max(x: Any, axis: int | None = None) -> Any:
    """The maximum of Dask array ``x`` over ``axis`` (None: all), lazily, from its chunks' own.

    Dask's own max gives a chunk with no elements the maximum of shape (1, ..., 1, 0) (its
    rule for empty pieces of a whole-array reduction), which does not fit beside the other
    chunks' where the chunk is empty along a kept axis: a batch chunk emptied by boolean
    filtering and ``compute_chunk_sizes()`` failed on compute (a review's find).  Here such a
    chunk gives its own empty maximum, and one empty along a reduced axis -inf, the identity
    of max (it never wins beside a value; a NaN still does)."""
    import dask.array as da

    return da.reduction(x, _chunk_max, _chunk_max, axis=axis, dtype=x.dtype, meta=x._meta)


def _chunk_max(block: Any, axis: tuple[int, ...], keepdims: bool) -> Any:
    """One chunk's (or one combining step's) part of :func:`dask_max`."""
    if all(block.shape[a] for a in axis):
        return block.max(axis=axis, keepdims=keepdims)
    from .._namespace import array_namespace, pinned_device

    xp = array_namespace(block)  # (a CuPy chunk's -inf is a CuPy array)
    shape = tuple(1 if a in axis else n for a, n in enumerate(block.shape) if keepdims or a not in axis)
    return xp.full(shape, -math.inf, dtype=block.dtype, device=pinned_device(block))


def per_batch_chunk(
    func: Callable[[list[Any], list[Any]], Any],
    batched: Sequence[Any],
    params: Sequence[Any],
    tail: tuple[int, ...],
    dtype: Any,
) -> Any:
    """``func(batched_chunks, params)`` per batch chunk, as a lazy Dask array (B, *tail).

    ``batched`` are Dask arrays sharing their batch chunks (axis 0); every other axis is
    handed whole to ``func``.  ``params`` (arrays or ``None``) are handed whole to every task.
    ``func`` should pickle (a module-level function, or a ``functools.partial`` of one), so
    that the lazy result does.
    """
    import dask.array as da
    import numpy as np

    # Every axis but the batch is handed whole to each task, and the params are small: give
    # them one chunk each up front.  Left to ``blockwise``, chunked non-batch axes multiply its
    # count of block combinations (it warns "Increasing number of chunks by factor of ...",
    # an error under filterwarnings=error) before ``concatenate=True`` joins them again.
    batched = [_without_empty_batch_chunks(_whole(x, from_axis=1)) for x in batched]
    params = one_chunk(params)
    # one index name per non-batch axis of every array: tuples of names, not strings of
    # letters, which ran out at eight modalities (26 letters for all axes of all arrays)
    names = (f"a{i}" for i in itertools.count())
    args: list[Any] = []
    for x in batched:
        args += [x, ("b", *(next(names) for _ in range(x.ndim - 1)))]
    n_batched = len(batched)
    for p in params:
        args += [None, None] if p is None else [p, tuple(next(names) for _ in range(p.ndim))]
    out_index = ("b", *(next(names) for _ in tail))
    return da.blockwise(
        functools.partial(_per_batch_task, func, n_batched),
        out_index,
        *args,
        new_axes=dict(zip(out_index[1:], tail)),
        concatenate=True,
        dtype=dtype,
        meta=np.empty((0,) * (1 + len(tail)), dtype=dtype),
    )


def _per_batch_task(func: Callable[[list[Any], list[Any]], Any], n_batched: int, *arrays: Any) -> Any:
    """One task of :func:`per_batch_chunk`.  Tasks are module-level functions bound with
    ``functools.partial`` (and so are the ``func`` they run), not closures: the lazy results
    then pickle with the standard ``pickle`` (a multiprocessing queue, joblib), not only with
    Dask's cloudpickle (a review's find)."""
    return func(list(arrays[:n_batched]), list(arrays[n_batched:]))


def elementwise_per_chunk(
    func: Callable[[list[Any]], list[Any]], arrays: Sequence[Any], n_out: int
) -> list[Any]:
    """``func(blocks)`` per chunk of Dask arrays of one shape and dtype: ``n_out`` lazy
    arrays of that shape and dtype, chunked as ``arrays[0]``.

    ``func`` maps the arrays' corresponding NumPy blocks to ``n_out`` arrays of the blocks'
    shape (broadcastable to it): an elementwise computation, however long, is then one task
    per chunk (and one slice per output) rather than a task per call per chunk.
    """
    import dask.array as da
    import numpy as np

    first = arrays[0]
    chunks = first.chunks
    arrays = [a if a.chunks == chunks else a.rechunk(chunks) for a in arrays]
    stacked = da.map_blocks(
        functools.partial(_elementwise_task, func),
        *arrays,
        new_axis=0,
        chunks=((n_out,), *chunks),
        dtype=first.dtype,
        meta=np.empty((0,) * (first.ndim + 1), dtype=first.dtype),
    )
    return [stacked[k] for k in range(n_out)]


def _elementwise_task(func: Callable[[list[Any]], list[Any]], *blocks: Any) -> Any:
    """One task of :func:`elementwise_per_chunk` (module-level: see :func:`_per_batch_task`)."""
    import numpy as np

    shape = blocks[0].shape
    return np.stack([np.broadcast_to(a, shape) for a in func(list(blocks))])


def _without_empty_batch_chunks(x: Any) -> Any:
    """``x`` with no batch chunk of size 0 (one of size 0 where the batch is empty).  Dask's
    ``blockwise`` handed such a chunk's task a one-row chunk's block, as if broadcasting it
    (Dask 2026.8: batch chunks (0, 1) gave 2 rows of a 1-row result, (0, 0, 1) 3, and (0, 0)
    a missing dependency at compute; a fuzzing review's find), so ``per_batch_chunk`` never
    gives it one."""
    sizes = x.chunks[0]
    if len(sizes) == 1 or 0 not in sizes:
        return x
    return x.rechunk({0: tuple(n for n in sizes if n) or (0,)})


def _whole(x: Any, *, from_axis: int) -> Any:
    """``x`` with axes ``from_axis`` onwards in one chunk each (``x`` itself if they are)."""
    numblocks = getattr(x, "numblocks", None)
    if numblocks is None or all(n == 1 for n in numblocks[from_axis:]):
        return x
    return x.rechunk(dict.fromkeys(range(from_axis, x.ndim), -1))
