"""The exact GELU's accuracy in float64 ulps against 40-digit mpmath, on the inputs where each
branch and path decides (a mutation review of its numerics: the other tests' relative
tolerances, 2e-15 to 4e-15, let through errors twice the documented ones, and every test had
inputs past |x| = 8.5 in the same call, so the Cody path's block that stays in its middle
branch was never checked).

Paths: the Cody approximations (NumPy without SciPy imported; ``_gelu_numpy``), SciPy's erfc
and erfcx where the process has imported ``scipy.special`` (``_gelu_scipy``, its lower-tail
formula below ``_SCIPY_TAIL_X``), and the fused Wander op's GELU derivative at the ends of the
float64 range.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from exact_gelu import exact_gelu as _exact
from exact_gelu import ulps as _ulps

from mmfuse._core import sequence as core


@pytest.fixture
def without_scipy(monkeypatch):
    """The Cody path: scipy.special out of sys.modules for the test (never imported by it)."""
    monkeypatch.delitem(sys.modules, "scipy.special", raising=False)


@pytest.mark.parametrize("interval", [(-8.4, -5.66), (-5.7, -5.6), (-3.0, -0.5)])
def test_cody_path_within_a_few_ulps_where_a_block_stays_below_the_far_tail(interval, without_scipy):
    """Inputs only in [-8.4, -5.66] (|u| up to 5.94, past the middle branch's 4 but below
    the far tail's): a block-wide branch test moved from 4 to 6 gave 4992 ulps there."""
    x = np.linspace(*interval, 1201)  # (a fixed grid: the bound is a maximum, checked once)
    got = core.gelu(np, x)
    assert "scipy.special" not in sys.modules
    assert _ulps(got, _exact(x)) <= 8  # (30000 random points: at most 4, 5 and 6 ulps)


def test_cody_path_over_several_blocks_equals_each_element(without_scipy):
    """More than one _GELU_BLOCK, the last one ragged: every element as computed alone."""
    rng = np.random.default_rng(np.random.SeedSequence().entropy)
    x = 4.0 * rng.standard_normal(2 * core._GELU_BLOCK + 17)
    got = core.gelu(np, x)
    spot = rng.integers(0, x.size, 64)
    spot[:2] = (x.size - 1, core._GELU_BLOCK)  # (the ragged last block's, the second's first)
    for i in spot:
        assert got[i] == core.gelu(np, x[i : i + 1])[0]


@pytest.mark.parametrize(("interval", "bound"), [((-1.0, -0.5), 6), ((-1.0, -0.8), 4), ((-1.5, -1.0), 8),
                                               ((-3.0, -1.5), 8), ((-37.615, -37.3), 7)])  # fmt: skip
def test_scipy_path_near_and_past_its_tail_cut(interval, bound):
    """SciPy's erfc above _SCIPY_TAIL_X, its lower-tail formula below: within the 5-7 ulps the
    comment above _SCIPY_TAIL_X measures (4000 points: 4, 7, 6 and 5 ulps on these intervals;
    the cut moved to -1.5 gave 13 on [-1.5, -1], and x multiplied in after erfcx times the
    Gaussian factor, there subnormal, 10 near x = -37.6).  [-1, -0.8] on its own (3 ulps on
    this grid): the cut moved to -0.9 gave 5 there, within the wider interval's 6 (a
    mutation review)."""
    special = pytest.importorskip("scipy.special")
    x = np.linspace(*interval, 2003)  # (a fixed grid: the bounds are maxima, checked once)
    assert _ulps(core._gelu_scipy(special, x), _exact(x)) <= bound


def test_gelu_uses_scipy_only_where_the_process_imported_it():
    """mmfuse never imports scipy.special for the GELU (0.2 s), and takes it where it is."""
    code = textwrap.dedent(
        """
        import sys
        import numpy as np
        from mmfuse._core import sequence as core
        core.gelu(np, np.linspace(-3.0, 3.0, 7))
        assert "scipy.special" not in sys.modules
        import scipy.special
        seen = []
        real = core._gelu_scipy
        core._gelu_scipy = lambda special, x: seen.append(1) or real(special, x)
        core.gelu(np, np.linspace(-3.0, 3.0, 7))
        assert seen == [1]
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_fused_wander_gelu_derivative_at_the_ends_of_the_float64_range():
    """The fused op's dGELU/dx for pre-activations up to float64's largest: 0 far below, 1
    far above (the split Gaussian factor's 16 y overflowed to NaN from about 1.1e307 without
    the clamp its autograd twin has)."""
    torch = pytest.importorskip("torch")
    from mmfuse.backends.torch.wander import _gelu_backward

    pre = torch.tensor([-1.7e308, -1.2e307, -1e300, 1.2e307, 1.7e308], dtype=torch.float64)
    got = _gelu_backward(torch.ones_like(pre), pre)
    assert torch.equal(got, torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("path", ["cody", "scipy", "array_api"])
def test_far_below_the_clamp_gelu_is_minus_zero(path, monkeypatch):
    """Inputs far below _GELU_XMAX (to float64's largest): x Phi(x) is -0.0, not NaN.  The
    split Gaussian factor's 16 y overflows from about 1.1e307 without the clamp; -inf gives
    NaN (0 times inf) with or without it, so it cannot tell (a mutation review: the SciPy
    path's clamp removed passed every test)."""
    x = np.array([-1.7e308, -1.2e307, -1e300, -41.0])
    if path == "scipy":
        got = core._gelu_scipy(pytest.importorskip("scipy.special"), x)
    elif path == "cody":
        monkeypatch.delitem(sys.modules, "scipy.special", raising=False)
        got = core.gelu(np, x)
    else:
        xp = pytest.importorskip("array_api_strict")
        got = np.asarray(core._gelu_generic(xp, xp.asarray(x)))
    assert not np.isnan(got).any(), got
    assert (got == 0).all() and np.signbit(got).all(), got


def test_array_api_path_far_in_the_lower_tail_within_a_few_ulps():
    """The Array-API path where x Phi(x) is about to go subnormal (x near -37.5): x times the
    Gaussian factor first, then the rational factor: 5 ulps on this grid, where x times the
    product of the two factors gave 11 (a mutation review; the SciPy path's own test has this
    interval too, and its bound)."""
    xp = pytest.importorskip("array_api_strict")
    x = np.linspace(-37.615, -37.3, 2003)
    got = np.asarray(core._gelu_generic(xp, xp.asarray(x)))
    assert _ulps(got, _exact(x)) <= 7
