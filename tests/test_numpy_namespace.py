"""mmfuse's NumPy namespace: array_api_compat's, with reshape / sum / matrix_transpose answered
by ndarray's own methods where the answer is the same array (mmfuse._namespace)."""

from __future__ import annotations

import array_api_compat.numpy as compat
import numpy as np
import pytest

from mmfuse._namespace import array_namespace, is_numpy, namespace_name


@pytest.fixture
def xp():
    return array_namespace(np.ones(2))


def test_it_is_numpys_namespace(xp):
    assert is_numpy(xp) and namespace_name(xp) == "numpy"
    assert array_namespace(np.ones(2), np.zeros(3)) is xp  # the multi-array path too
    for name in ("float32", "finfo", "concat", "astype", "where", "permute_dims"):
        assert getattr(xp, name) is getattr(compat, name)


def _same(a, b):
    assert type(a) is type(b) and a.dtype == b.dtype and np.shape(a) == np.shape(b)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", ["float32", "float64", "complex128", "int64", "bool"])
def test_delegations_give_compats_answers(xp, rng, dtype):
    a = (10 * rng.standard_normal((3, 4, 5))).astype(dtype)
    views = [a, a[:, ::2], np.asfortranarray(a), a[0, 0, 0:1].reshape(()) if a.ndim else a]
    for v in views:
        for axis in (None, 0, -1, (0, 2), ()):
            if v.ndim == 0 and axis not in (None, ()):
                continue
            for keepdims in (False, True):
                _same(xp.sum(v, axis=axis, keepdims=keepdims), compat.sum(v, axis=axis, keepdims=keepdims))
        if v.ndim >= 2:
            _same(xp.matrix_transpose(v), compat.matrix_transpose(v))
        _same(xp.reshape(v, (-1,)), compat.reshape(v, (-1,)))
    if dtype != "complex128":  # dtype= passed through (complex -> float64 would warn)
        _same(xp.sum(a, axis=0, dtype=np.float64), compat.sum(a, axis=0, dtype=np.float64))
    # the view / copy rule is the same: a view where the layout allows one
    assert np.shares_memory(xp.reshape(a, (12, 5)), a)
    assert not np.shares_memory(xp.reshape(a[:, ::2], (-1,)), a)
    with pytest.raises(ValueError):
        xp.reshape(a[:, ::2], (-1,), copy=False)  # array_api_compat's refusal, not ours
    with pytest.raises(ValueError):
        xp.matrix_transpose(a[0, 0])
