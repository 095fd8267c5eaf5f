"""LMF on a dask.distributed LocalCluster of 2 worker processes, input generated chunk by chunk."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

import mmfuse
from mmfuse.testing import assert_close

dask = pytest.importorskip("dask")
pytest.importorskip("dask.distributed")


def _example():
    path = Path(__file__).resolve().parents[1] / "examples" / "dask_distributed_fusion.py"
    spec = importlib.util.spec_from_file_location("dask_distributed_fusion", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    import cloudpickle

    cloudpickle.register_pickle_by_value(module)  # workers cannot import examples/
    return module


@pytest.mark.slow
def test_local_cluster_lowrank_equals_numpy_on_sampled_chunks():
    from dask.distributed import Client, LocalCluster

    ex = _example()
    dims, rows, chunk = (6, 5, 9), 4_000, 700  # 6 chunks, the last one short
    params = mmfuse.init_lowrank(dims, rank=4, out_dim=3, seed=1)
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster),
    ):
        fused, mean = ex.fused_mean(rows, chunk, params, dims=dims, seed=5)
        assert fused.chunks[0] == (700,) * 5 + (500,)
        total = mean.compute()
        sampled = {k: fused.blocks[k].compute() for k in (0, 5)}
    everything = []
    for k, n in enumerate(fused.chunks[0]):
        local = [ex.make_chunk(m, k, n, d, 5, dtype=np.float64) for m, d in enumerate(dims)]
        everything.append(mmfuse.lowrank_fusion(local, **params))
        if k in sampled:
            assert_close(sampled[k], everything[-1])
    assert_close(total, np.concatenate(everything).mean(axis=0))


@pytest.mark.slow
def test_local_cluster_zoom_shift_fusion_equals_numpy_on_sampled_chunks():
    from dask.distributed import Client, LocalCluster

    ex = _example()
    shapes, rows, chunk = ((6, 4), (3, 4), (5, 4)), 500, 90
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster),
    ):
        fused, mean = ex.aligned_mean(rows, chunk, shapes, seed=3, alpha=0.4)
        assert fused.chunks[0] == (90,) * 5 + (50,)
        # One compute for all: a later graph that shares keys with a finished one can fail on
        # the distributed scheduler with a KeyError (dask/dask#9888, fused blockwise layers
        # reuse key names), whichever way the alignment's graph is written
        total, *blocks = dask.compute(mean, *(fused.blocks[k] for k in (1, 5)))
        sampled = dict(zip((1, 5), blocks))
    everything = []
    for k, n in enumerate(fused.chunks[0]):
        local = [ex.make_chunk(m, k, n, s, 3) for m, s in enumerate(shapes)]
        everything.append(mmfuse.zoom_shift_fusion(local, fuse="concat", alpha=0.4, rounds=None))
        if k in sampled:
            assert_close(sampled[k], everything[-1])
    assert_close(total, np.concatenate(everything).mean(axis=0))
