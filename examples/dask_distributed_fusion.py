"""Fuse a multi-GB multimodal batch on a Dask cluster, generated chunk by chunk.

The batch never exists in one place: every chunk of every modality is drawn on a worker from a
seed derived from its chunk index, fused there by ``mmfuse.lowrank_fusion``, and reduced to
per-output means; the last chunk is then recomputed with NumPy alone as a check.  A second batch,
of sequences (``rows // 20`` samples, each three modalities of 50, 20 and 30 tokens of 64
values: about 1.7 times the first batch's bytes), is aligned, pooled and fused the same way by
Zoom-and-Shift and timed.  Peak memory per worker is a few chunks, whatever the batch size.

Run: ``python examples/dask_distributed_fusion.py [--rows 4000000] [--workers 2]``
(defaults: 4 million rows of (32, 32, 128) float32 features, 3 GiB of input).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import numpy as np

import mmfuse

DIMS = (32, 32, 128)
#: (tokens, channels) of the three sequence modalities for Zoom-and-Shift
SEQUENCES = ((50, 64), (20, 64), (30, 64))


def chunk_seed(seed: int, modality: int, chunk: int) -> np.random.SeedSequence:
    """The seed of one chunk of one modality: reproducible anywhere, independent of workers."""
    return np.random.SeedSequence([seed, modality, chunk])


def make_chunk(
    modality: int, chunk: int, rows: int, shape: int | Sequence[int], seed: int, dtype=np.float32
) -> np.ndarray:
    """Rows ``chunk * rows ...`` of one modality: (rows, *shape), drawn from the chunk's own seed."""
    rng = np.random.default_rng(chunk_seed(seed, modality, chunk))
    tail = (shape,) if isinstance(shape, int) else tuple(shape)
    # modality-specific offset and spread, so that alignment has something to do
    return (modality + (1 + modality) * rng.standard_normal((rows, *tail))).astype(dtype)


def lazy_inputs(
    rows: int, chunk: int, shapes: Sequence[int | Sequence[int]] = DIMS, seed: int = 0, dtype=np.float32
):
    """One lazy (rows, *shape_m) Dask array per modality, each chunk generated where it is used."""
    import dask.array as da

    sizes = tuple([chunk] * (rows // chunk) + ([rows % chunk] if rows % chunk else []))
    xs = []
    for m, shape in enumerate(shapes):
        tail = (shape,) if isinstance(shape, int) else tuple(shape)

        def block(block_info=None, m=m, tail=tail):
            info = block_info[None]
            return make_chunk(m, info["chunk-location"][0], info["chunk-shape"][0], tail, seed, dtype)

        chunks = (sizes, *((n,) for n in tail))
        xs.append(da.map_blocks(block, chunks=chunks, dtype=dtype, meta=np.empty((0,) * len(chunks), dtype)))
    return xs


def aligned_mean(
    rows: int, chunk: int, shapes: Sequence[Sequence[int]] = SEQUENCES, seed: int = 0, alpha: float = 0.5
):
    """Lazy Zoom-and-Shift fusion (closed-form limit, pooled, concatenated) and its batch mean."""
    import dask.array as da

    xs = lazy_inputs(rows, chunk, shapes, seed)
    fused = mmfuse.zoom_shift_fusion(xs, fuse="concat", alpha=alpha, rounds=None)
    return fused, da.mean(fused, axis=0)


def fused_mean(rows: int, chunk: int, params: dict, dims: Sequence[int] = DIMS, seed: int = 0):
    """Lazy per-output mean of ``lowrank_fusion`` over the whole generated batch."""
    import dask.array as da

    xs = lazy_inputs(rows, chunk, dims, seed, dtype=params["weights"].dtype)
    factors = [da.from_array(f, chunks=f.shape) for f in params["factors"]]
    fused = mmfuse.lowrank_fusion(
        xs, factors, da.from_array(params["weights"]), da.from_array(params["bias"])
    )
    return fused, da.mean(fused, axis=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4_000_000)
    parser.add_argument("--chunk", type=int, default=50_000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    if args.rows < 20 or args.chunk < 1 or args.workers < 1:
        parser.error("need --rows >= 20 (the sequence batch is rows // 20), --chunk >= 1, --workers >= 1")
    import dask
    from dask.distributed import Client, LocalCluster

    params = mmfuse.init_lowrank(DIMS, rank=16, out_dim=128, seed=0, dtype=np.float32)
    gib = args.rows * sum(DIMS) * 4 / 2**30
    with (
        LocalCluster(
            n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster),
    ):
        fused, mean = fused_mean(args.rows, args.chunk, params)
        # check: the last chunk (whatever its size) recomputed with NumPy alone, its block
        # computed with the mean in one graph (docs/backends.rst: a block of a result fetched
        # with .blocks[k].compute() after the whole can fail under Dask's task fusion)
        k = fused.numblocks[0] - 1
        t0 = time.perf_counter()
        result, got = dask.compute(mean, fused.blocks[k])
        elapsed = time.perf_counter() - t0
        size = fused.chunks[0][k]
        local = [make_chunk(m, k, size, d, 0) for m, d in enumerate(DIMS)]
        expected = mmfuse.lowrank_fusion(local, **params)
        err = float(np.abs(got - expected).max() / np.abs(expected).max())
        seq_rows = args.rows // 20  # (T, C) per sample: 100 x 64 values, 33x a fusion row's 192
        _, seq_mean = aligned_mean(seq_rows, max(1, args.chunk // 20))
        t0 = time.perf_counter()
        seq_mean.compute()
        seq_elapsed = time.perf_counter() - t0
        seq_gib = seq_rows * sum(t * c for t, c in SEQUENCES) * 4 / 2**30
    print(f"Zoom-and-Shift: {seq_rows} sequences, {seq_gib:.2f} GiB of input: {seq_elapsed:.1f} s")
    print(
        f"{args.rows} rows, {gib:.2f} GiB of input, {args.workers} workers: {elapsed:.1f} s "
        f"({gib / elapsed:.2f} GiB/s); mean of output[:4] = {np.round(result[:4], 4)}; "
        f"chunk {k} vs NumPy: max rel err {err:.1e}"
    )


if __name__ == "__main__":
    main()
