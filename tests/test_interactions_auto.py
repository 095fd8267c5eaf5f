"""The compiled order recursion under "auto" (issue 22): the numba rows of
``lowrank_interactions`` and ``cp_interactions`` take NumPy arrays and torch CPU tensors that
need no gradient; before numba is imported, "auto" takes them only for calls of at least
:data:`mmfuse.backends._table.AUTO_IMPORT_PRODUCTS` recursion products (M^2 B R h for LMF,
M^2 B R for CP), whatever the size of ``xs[0]``.  Values: the kernel runs NumPy's recursion
operation for operation, so the terms equal the NumPy variant's bit for bit, and the float64
reference to rounding."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba")

import mmfuse
from mmfuse import reference
from mmfuse._core import interactions as core
from mmfuse.backends import explain
from mmfuse.testing import assert_close


def _lowrank(rng, dims, batch, rank, out_dim, dtype=np.float32):
    xs = [rng.standard_normal((batch, d)).astype(dtype) for d in dims]
    factors = [(rng.standard_normal((rank, d + 1, out_dim)) / np.sqrt(d + 1)).astype(dtype) for d in dims]
    return xs, factors, rng.standard_normal(rank).astype(dtype)


def test_products_not_the_first_array_decide_in_a_fresh_process():
    """Below the threshold nothing imports numba (the NumPy variant runs); a call of exactly
    AUTO_IMPORT_PRODUCTS products, whose xs[0] is far below numba's element threshold for the
    alignment operators, imports it and runs the kernel; the terms equal the NumPy variant's."""
    from test_align_auto_cpu import _run

    out = _run(
        """
        import sys
        import numpy as np
        import mmfuse
        from mmfuse._core import interactions as core
        from mmfuse.backends import explain
        from mmfuse.backends._table import AUTO_IMPORT_ELEMENTS, AUTO_IMPORT_PRODUCTS as N

        rng = np.random.default_rng()
        def problem(batch, dims, rank, out_dim):
            xs = [rng.standard_normal((batch, d)).astype(np.float32) for d in dims]
            fs = [rng.standard_normal((rank, d + 1, out_dim)).astype(np.float32) for d in dims]
            return xs, fs, rng.standard_normal(rank).astype(np.float32)

        # M = 4: 16 B R h products; B R h = N / 16 exactly, xs[0] has 1024 x 8 elements
        big = problem(1024, (8, 4, 6, 3), 4, N // (16 * 1024 * 4))
        below = problem(1023, (8, 4, 6, 3), 4, N // (16 * 1024 * 4))
        assert big[0][0].size < AUTO_IMPORT_ELEMENTS
        # explain, given the call's arguments, weighs the call by its products as the call does
        print(explain("lowrank_interactions", *below).chosen.variant)
        print(explain("lowrank_interactions", *big).chosen.variant)
        mmfuse.lowrank_interactions(*below)
        cp = (None, [rng.standard_normal((d + 1, 64)).astype(np.float32) for d in (8, 4, 6, 3)]
              + [rng.standard_normal((16, 64)).astype(np.float32)])
        print(explain("cp_interactions", below[0], cp).chosen.variant)
        mmfuse.cp_interactions(below[0], cp)  # 16 x 1023 x 64 products
        print(sorted(m for m in sys.modules if m.split(".")[0] == "numba"))
        print(explain("lowrank_interactions", big[0][0], size=16 * 1024 * 4 * (N // (16 * 1024 * 4))).chosen.variant)
        terms, _ = mmfuse.lowrank_interactions(*big)
        print("numba" in sys.modules, terms.dtype)
        want, _ = core.lowrank_interactions_numpy(*big)
        print(bool(np.array_equal(terms, want)))
        print(explain("cp_interactions", below[0][0]).chosen.variant)
        """
    )
    assert out.splitlines() == [
        "numpy, in-place order recursion", "CPU kernels", "numpy, in-place order recursion",
        "[]", "CPU kernels", "True float32", "True", "CPU kernels",
    ]


def test_calls_without_the_recursion_never_import_numba_in_a_fresh_process():
    """By subset, or without the appended constant, the terms take the generic path whatever
    row runs, so their size for "auto" is 0: calls past AUTO_IMPORT_PRODUCTS by the
    recursion's count do not import numba (they had, 0.4 s for a kernel never run; a review's
    find).  The same problems by order with the constant still do, and the terms of every
    call equal the array_api backend's."""
    from test_align_auto_cpu import _run

    out = _run(
        """
        import sys
        import numpy as np
        import mmfuse
        from mmfuse.backends._table import AUTO_IMPORT_PRODUCTS as N

        rng = np.random.default_rng()
        dims, batch, rank = (4, 3, 5, 2, 4, 3, 2, 5), 1024, 4
        out_dim = N // (64 * batch * rank) + 1  # M = 8: past N products by 64 B R h
        def lowrank(append_one):
            xs = [rng.standard_normal((batch, d)).astype(np.float32) for d in dims]
            k = 1 if append_one else 0
            fs = [rng.standard_normal((rank, d + k, out_dim)).astype(np.float32) for d in dims]
            return xs, fs, rng.standard_normal(rank).astype(np.float32)
        xs, fs, w = lowrank(True)
        cp_width = N // (64 * batch) + 1
        cp = (None, [rng.standard_normal((d + 1, cp_width)).astype(np.float32) for d in dims]
              + [rng.standard_normal((2, cp_width)).astype(np.float32)])
        cp0 = (None, [a[:-1] for a in cp[1][:-1]] + [cp[1][-1]])
        calls = [
            (mmfuse.lowrank_interactions, (xs, fs, w), {"by": "subset"}),
            (mmfuse.lowrank_interactions, lowrank(False), {"append_one": False}),
            (mmfuse.cp_interactions, (xs, cp), {"by": "subset"}),
            (mmfuse.cp_interactions, (xs, cp0), {"append_one": False}),
        ]
        for fn, args, kw in calls:
            terms, _ = fn(*args, **kw)
            want, _ = fn(*args, **kw, backend="array_api")
            print("numba" in sys.modules, bool(np.array_equal(terms, want)))
        mmfuse.lowrank_interactions(xs, fs, w)
        print("numba" in sys.modules)
        """
    )
    assert out.splitlines() == ["False True"] * 4 + ["True"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("present", [False, True])
def test_numpy_kernel_rows_equal_the_reference(rng, dtype, present):
    import numba  # noqa: F401  (imported: "auto" takes the kernels at every size)

    xs, factors, weights = _lowrank(rng, (5, 3, 7, 2), 130, 3, 6, dtype)
    mask = rng.random((130, 4)) < 0.7 if present else None
    assert explain("lowrank_interactions", xs[0]).chosen.variant == "CPU kernels"
    terms, labels = mmfuse.lowrank_interactions(xs, factors, weights, present=mask)
    want, want_labels = reference.lowrank_interactions(xs, factors, weights, present=mask)
    assert labels == want_labels and terms.dtype == dtype
    assert_close(terms, want, dtype=dtype)
    same, _ = core.lowrank_interactions_numpy(xs, factors, weights, present=mask)
    assert np.array_equal(terms, same)

    cp = (
        rng.standard_normal(9).astype(dtype),
        [rng.standard_normal((d + 1, 9)).astype(dtype) for d in (5, 3, 7, 2)]
        + [rng.standard_normal((6, 9)).astype(dtype)],
    )
    terms, _ = mmfuse.cp_interactions(xs, cp, present=mask)
    assert_close(terms, reference.cp_interactions(xs, cp, present=mask)[0], dtype=dtype)


def test_torch_cpu_without_gradients_takes_the_kernel_with_gradients_autograd(rng):
    torch = pytest.importorskip("torch")
    import numba  # noqa: F401

    xs, factors, weights = _lowrank(rng, (4, 6, 3), 50, 2, 5, np.float64)
    txs = [torch.from_numpy(x) for x in xs]
    tfs = [torch.from_numpy(f) for f in factors]
    tw = torch.from_numpy(weights)
    assert explain("lowrank_interactions", *txs).chosen.variant == "CPU kernels"
    terms, _ = mmfuse.lowrank_interactions(txs, tfs, tw)
    assert isinstance(terms, torch.Tensor) and terms.dtype == torch.float64
    want, _ = reference.lowrank_interactions(xs, factors, weights)
    assert_close(terms.numpy(), want, dtype=np.float64)

    leaf = [f.clone().requires_grad_(True) for f in tfs]
    assert explain("lowrank_interactions", *txs, *leaf).chosen.variant == "autograd"
    terms, _ = mmfuse.lowrank_interactions(txs, leaf, tw)
    terms[2].sum().backward()
    assert all(f.grad is not None and bool(torch.isfinite(f.grad).all()) for f in leaf)
    assert_close(terms.detach().numpy(), want, dtype=np.float64)
