"""mmfuse's torch namespace: array_api_compat's, with reshape / sum / matrix_transpose calling
torch directly where array_api_compat makes the same call (mmfuse._namespace)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import array_api_compat.torch as compat  # noqa: E402

from mmfuse._core import sequence as core_sequence  # noqa: E402
from mmfuse._namespace import array_namespace, is_torch, namespace_name  # noqa: E402


@pytest.fixture
def xp():
    return array_namespace(torch.ones(2))


def test_it_is_torchs_namespace(xp):
    assert is_torch(xp) and namespace_name(xp) == "torch"
    assert array_namespace(torch.ones(2), torch.zeros(3)) is xp  # the multi-array path too
    for name in ("float32", "finfo", "concat", "astype", "where", "permute_dims"):
        assert getattr(xp, name) is getattr(compat, name)


def _same(a, b):
    assert type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex128, torch.int32, torch.bool])
def test_delegations_give_compats_answers(xp, dtype):
    gen = torch.Generator().manual_seed(20261203)
    a = (10 * torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)).to(dtype)
    views = [a, a[:, ::2], a.transpose(0, 2), a[0, 0, 0:1].reshape(())]
    for v in views:
        for axis in (None, 0, -1, (0, 2), ()):
            if v.ndim == 0 and axis not in (None, ()):
                continue
            for keepdims in (False, True):
                _same(xp.sum(v, axis=axis, keepdims=keepdims), compat.sum(v, axis=axis, keepdims=keepdims))
        if v.ndim >= 2:
            mine, theirs = xp.matrix_transpose(v), compat.matrix_transpose(v)
            _same(mine, theirs)
            assert mine.stride() == theirs.stride() and mine.data_ptr() == v.data_ptr()  # a view
        _same(xp.reshape(v, (-1,)), compat.reshape(v, (-1,)))
    if dtype.is_floating_point:  # dtype= passed through
        _same(xp.sum(a, axis=0, dtype=torch.float64), compat.sum(a, axis=0, dtype=torch.float64))
    # the view / copy rule is the same: a view where the layout allows one
    assert xp.reshape(a, (12, 5)).data_ptr() == a.data_ptr()
    assert xp.reshape(a, (12, 5))._base is a
    assert xp.reshape(a[:, ::2], (-1,))._base is None
    with pytest.raises((ValueError, RuntimeError)):
        xp.reshape(a[:, ::2], (-1,), copy=False)  # array_api_compat's refusal, not ours
    with pytest.raises(ValueError):
        xp.matrix_transpose(a[0, 0])
    # integer and boolean sums promote as torch (and array_api_compat) do
    assert xp.sum(a, axis=1).dtype == compat.sum(a, axis=1).dtype


def test_gradients_flow_through_the_fast_forms(xp):
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, dtype=torch.float64, generator=gen)
    out = (xp.sum(xp.reshape(a, (12, 5)), axis=0, keepdims=True) @ xp.matrix_transpose(a[0]) @ w).sum()
    out.backward()
    b = a.detach().clone().requires_grad_()
    ref = (b.reshape(12, 5).sum(0, keepdim=True) @ b[0].transpose(-1, -2) @ w).sum()
    ref.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def test_the_core_traces_through_it_under_compile(xp):
    """Dynamo inlines the namespace's plain functions: a fullgraph compile of the core's
    collapsed factors (sum, matrix_transpose) and a reshape of a strided tensor gives the
    eager values."""
    gen = torch.Generator().manual_seed(11)
    feature = torch.randn(2, 3, 6, generator=gen)
    token = torch.randn(3, 4, 2, generator=gen)
    h = torch.randn(5, 4, 3, generator=gen)

    def helpers(feature, token, h):
        phi, psi_t = core_sequence._collapsed_factors(xp, feature, token)
        return xp.reshape(h.transpose(0, 1), (20, 3)) @ phi, psi_t

    compiled = torch.compile(helpers, fullgraph=True, backend="eager")
    for got, want in zip(compiled(feature, token, h), helpers(feature, token, h)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
