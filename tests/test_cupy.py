"""The CuPy backend and the numba backend on real CUDA arrays, against ``mmfuse.reference``.

Needs CuPy and a CUDA device; skips cleanly otherwise (CI has no GPU).  On the GPU machine
this module covers what the CUDA simulator cannot: cuBLAS projections, the CuPy kernels, the
numba kernels reached from CuPy arrays and torch CUDA tensors, poisoned outputs, bit-identical
repeats and inputs left untouched.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import mmfuse
from mmfuse import reference
from mmfuse.testing import assert_close


def _gpu() -> bool:
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy

        return bool(cupy.cuda.runtime.getDeviceCount() > 0)
    except Exception:
        return False


if not _gpu():
    pytest.skip("needs CuPy and a CUDA device", allow_module_level=True)

import cupy  # noqa: E402

pytestmark = pytest.mark.gpu

_BACKENDS = ["cupy"]
if importlib.util.find_spec("numba_cuda") is not None:
    _BACKENDS.append("numba")


def _align_ref():
    import importlib

    return importlib.import_module("mmfuse.reference.align")


SHAPES = [
    # (B, dims, R, h)
    (1, [3, 5], 2, 4),
    (7, [1, 9, 4], 3, 5),
    (33, [17, 2, 8, 3, 1, 6, 5, 4], 4, 3),
    (300, [31, 16], 5, 19),
    (1025, [64, 33, 7], 16, 33),
]


@pytest.fixture(params=_BACKENDS)
def backend(request):
    return request.param


@pytest.mark.parametrize("case", SHAPES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("with_present", [False, True])
def test_lowrank_and_cp_match_reference(backend, case, dtype, with_present):
    batch, dims, rank, out_dim = case
    rng = np.random.default_rng(batch + rank)
    xs = [rng.standard_normal((batch, d)) for d in dims]
    present = None
    if with_present:
        present = rng.random((batch, len(dims))) > 0.3
        for m, x in enumerate(xs):
            x[~present[:, m]] = np.nan
    factors = [rng.standard_normal((rank, d + 1, out_dim)) / np.sqrt(d + 1) for d in dims]
    weights, bias = rng.standard_normal(rank), rng.standard_normal(out_dim)
    c = [cupy.asarray(a.astype(dtype)) for a in xs]
    cf = [cupy.asarray(f.astype(dtype)) for f in factors]
    cw, cb = cupy.asarray(weights.astype(dtype)), cupy.asarray(bias.astype(dtype))
    cp_pres = None if present is None else cupy.asarray(present)
    originals = [a.copy() for a in (*c, *cf, cw, cb)]
    got = mmfuse.lowrank_fusion(c, cf, cw, cb, present=cp_pres, backend=backend)
    again = mmfuse.lowrank_fusion(c, cf, cw, cb, present=cp_pres, backend=backend)
    want = reference.lowrank_fusion(xs, factors, weights, bias, present=present)
    assert isinstance(got, cupy.ndarray) and got.dtype == dtype
    assert bool(cupy.all(cupy.isfinite(got)))
    assert_close(got, want, dtype=np.dtype(dtype))
    assert got.tobytes() == again.tobytes()
    for a, o in zip((*c, *cf, cw, cb), originals):
        assert bool(cupy.array_equal(a, o, equal_nan=True))
    cp_factors = [rng.standard_normal((d + 1, rank)) for d in dims] + [rng.standard_normal((out_dim, rank))]
    ccp = (cw, [cupy.asarray(a.astype(dtype)) for a in cp_factors])
    got = mmfuse.cp_fusion(c, ccp, cb, present=cp_pres, backend=backend)
    want = reference.cp_fusion(xs, (weights, cp_factors), bias, present=present)
    assert_close(got, want, dtype=np.dtype(dtype))


def test_non_contiguous_and_half_inputs(backend):
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((9, 10)), rng.standard_normal((9, 4))]
    p = mmfuse.init_lowrank([5, 4], rank=3, out_dim=6, seed=1)
    c = [cupy.asarray(xs[0])[:, ::2], cupy.asarray(xs[1])]
    cp_p = {k: ([cupy.asarray(f) for f in v] if isinstance(v, list) else cupy.asarray(v)) for k, v in p.items()}
    got = mmfuse.lowrank_fusion(c, **cp_p, backend=backend)
    assert_close(got, reference.lowrank_fusion([xs[0][:, ::2], xs[1]], **p))
    half = [a.astype(cupy.float16) for a in c]
    cp_h = {k: ([f.astype(cupy.float16) for f in v] if isinstance(v, list) else v.astype(cupy.float16)) for k, v in cp_p.items()}
    got = mmfuse.lowrank_fusion(half, **cp_h, backend=backend)
    assert got.dtype == cupy.float16
    want = reference.lowrank_fusion([cupy.asnumpy(a) for a in half], **{k: ([cupy.asnumpy(f) for f in v] if isinstance(v, list) else cupy.asnumpy(v)) for k, v in cp_h.items()})
    assert_close(got, want, dtype=np.dtype("float16"))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(1, 5, 3), (4, 129, 70), (3, 2, 2, 33)])
def test_moments_and_zoom_shift_match_reference(backend, dtype, shape):
    ref = _align_ref()
    rng = np.random.default_rng(len(shape))
    x = 2.0 + 3.0 * rng.standard_normal(shape)
    guide = -1.0 + 0.5 * rng.standard_normal(shape)
    mask = rng.random(shape[:-1]) > 0.3
    mask[..., 0] = True
    cx, cg, cm = cupy.asarray(x.astype(dtype)), cupy.asarray(guide.astype(dtype)), cupy.asarray(mask)
    for alpha in (1.0, 0.4):
        got = mmfuse.zoom_shift(cx, cg, alpha=alpha, mask=cm, guide_mask=cm, backend=backend)
        want = ref.zoom_shift(x.astype(dtype), guide.astype(dtype), alpha=alpha, mask=mask, guide_mask=mask)
        assert_close(got, want, dtype=np.dtype(dtype))
        again = mmfuse.zoom_shift(cx, cg, alpha=alpha, mask=cm, guide_mask=cm, backend=backend)
        assert got.tobytes() == again.tobytes()


def test_torch_cuda_through_numba():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available() or "numba" not in _BACKENDS:
        pytest.skip("needs torch CUDA and numba-cuda")
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((11, d)) for d in (3, 7)]
    p = mmfuse.init_lowrank([3, 7], rank=4, out_dim=5, seed=2)
    t = [torch.as_tensor(x, device="cuda") for x in xs]
    tp = {k: ([torch.as_tensor(f, device="cuda") for f in v] if isinstance(v, list) else torch.as_tensor(v, device="cuda")) for k, v in p.items()}
    got = mmfuse.lowrank_fusion(t, **tp, backend="numba")
    assert got.device.type == "cuda"
    assert_close(got, reference.lowrank_fusion(xs, **p))
    # With gradients needed the numba backend defers to the Array-API core (autograd works).
    t[0].requires_grad_(True)
    out = mmfuse.lowrank_fusion(t, **tp, backend="numba")
    out.sum().backward()
    assert t[0].grad is not None
