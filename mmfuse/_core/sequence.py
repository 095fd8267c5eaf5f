"""Array-API core of token-level sequence fusion (Wander) and the Wander adapter.

Inputs arrive validated by the public layer (:mod:`mmfuse._sequence`).  Only standard Array-API
functions are used (matmul, reshape, permute_dims, sum, where, exp, broadcasting), so the code
runs on NumPy, array-api-strict, PyTorch (autograd flows through), CuPy, JAX and Dask.  Inputs
are never written to and never passed through ``xp.asarray``.

Per modality the fusion is two contractions of ``H_m`` (B, T_m, r_m): with the token factors
over T_m and with the feature factors over r_m.  Their order is chosen by :func:`plan` from
the shapes alone (cached), and the weight tensor W is never built.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any

from .._namespace import (
    array_namespace,
    block_budget,
    block_slices,
    computed_in,
    device_of,
    in_work_dtype,
    is_dask,
    is_jax,
    is_lazy,
    is_numpy,
    is_torch,
    low_precision,
    mask_tokens,
    traced_by_dynamo,
    widens_float32,
)
from .chunks import one_chunk
from .fusion import Joined

__all__ = [
    "CP_BLOCK_BYTES",
    "SQRT1_2",
    "SequencePlan",
    "activation_fn",
    "aten_gelu_view",
    "erf",
    "erfc_abs",
    "gelu",
    "gelu_torch",
    "in_own_dtype",
    "normal_cdf_torch",
    "plan",
    "sequence_fusion",
    "wander",
    "wander_with",
]

# --------------------------------------------------------------------------- erf and GELU
#
# The Array API has no erf.  We use W. J. Cody's rational Chebyshev approximations ("Rational
# Chebyshev approximations for the error function", Math. Comp. 23 (1969) 631-637; the
# coefficients of his Fortran CALERF in netlib/specfun), which are accurate to a few units in
# the last place of float64 (against 40-digit mpmath, a review measured relative errors up to
# 4.5e-16 for erf on [-7, 7] and 8.1e-16 for erfc_abs on [0.47, 26.5]; the tests check erf
# against math.erf to 1e-15, and the GELU built on them in ulps against mpmath,
# tests/test_gelu_accuracy.py).  exp(-x^2) is evaluated as
# exp(-y^2) exp(-(x - y)(x + y)) with y = x rounded down to 1/16, which avoids the rounding
# error of x * x for large x, as CALERF does.  Torch has erf natively: there we use
# torch.nn.functional.gelu (exact erf GELU, with its autograd) instead.

_THRESH = 0.46875  # |x| <= _THRESH: erf from A/B; above: erfc from C/D, then P/Q beyond 4
_SQRPI = 5.6418958354775628695e-1  # 1 / sqrt(pi)
_XBIG = 26.543  # erfc(x) underflows float64 beyond this
_A = (3.16112374387056560e00, 1.13864154151050156e02, 3.77485237685302021e02,
      3.20937758913846947e03, 1.85777706184603153e-1)  # fmt: skip
_B = (2.36012909523441209e01, 2.44024637934444173e02, 1.28261652607737228e03,
      2.84423683343917062e03)  # fmt: skip
_C = (5.64188496988670089e-1, 8.88314979438837594e00, 6.61191906371416295e01,
      2.98635138197400131e02, 8.81952221241769090e02, 1.71204761263407058e03,
      2.05107837782607147e03, 1.23033935479799725e03, 2.15311535474403846e-8)  # fmt: skip
_D = (1.57449261107098347e01, 1.17693950891312499e02, 5.37181101862009858e02,
      1.62138957456669019e03, 3.29079923573345963e03, 4.36261909014324716e03,
      3.43936767414372164e03, 1.23033935480374942e03)  # fmt: skip
_P = (3.05326634961232344e-1, 3.60344899949804439e-1, 1.25781726111229246e-1,
      1.60837851487422766e-2, 6.58749161529837803e-4, 1.63153871373020978e-2)  # fmt: skip
_Q = (2.56852019228982242e00, 1.87295284992346725e00, 5.27905102951428412e-1,
      6.05183413124413191e-2, 2.33520497626869185e-3)  # fmt: skip


def _erf_small(x: Any) -> Any:
    """erf(x) for |x| <= 0.46875 (any larger x is computed, but not used)."""
    y = x * x
    num = _A[4] * y
    den = y
    for i in range(3):
        num = (num + _A[i]) * y
        den = (den + _B[i]) * y
    return x * (num + _A[3]) / (den + _B[3])


def _exp_neg_square(xp: Any, y: Any, scale: float = 1.0) -> Any:
    """exp(-scale y^2) for y >= 0 without the rounding error of y * y (CALERF's split).

    y = head + tail with head a multiple of 1/16, so head * head is exact; ``scale`` is
    1 or 1/2 (exact too).
    """
    if type(y) is sys.modules["numpy"].ndarray:
        # the same operations in place (the same bits): on a small array a NumPy call's fixed
        # cost, and each new array's, is most of the time (2.3 of the tiny GELU's 14 us)
        np = sys.modules["numpy"]
        head = y * 16.0
        np.floor(head, out=head)
        head *= 0.0625  # (/ 16, exact)
        factor = head * head
        factor *= -scale
        np.exp(factor, out=factor)
        rest = y - head
        head += y
        rest *= head
        rest *= -scale
        np.exp(rest, out=rest)
        rest *= factor
        return rest
    head = xp.floor(y * 16.0) / 16.0
    return xp.exp(-scale * (head * head)) * xp.exp(-scale * ((y - head) * (y + head)))


def _erfc_ratio(xp: Any, y: Any) -> Any:
    """erfc(y) exp(y^2) for y >= 0.46875 (smaller y give finite garbage, to be masked out).

    Every element is evaluated through both CALERF branches (for y <= 4 and y > 4) and the
    right one kept with ``where``, so there is no data-dependent indexing.
    """
    mid = xp.clip(y, _THRESH, 4.0)
    num = _C[8] * mid
    den = mid
    for i in range(7):
        num = (num + _C[i]) * mid
        den = (den + _D[i]) * mid
    r_mid = (num + _C[7]) / (den + _D[7])
    big = xp.clip(y, 4.0, _GELU_XMAX * SQRT1_2)  # past _XBIG the GELU's x G still needs it
    return xp.where(y <= 4.0, r_mid, _big_ratio(big))


def _big_ratio(y: Any) -> Any:
    """erfc(y) exp(y^2) for y >= 4 (CALERF's P/Q approximation in 1 / y^2)."""
    z = 1.0 / (y * y)
    num = _P[5] * z
    den = z
    for i in range(4):
        num = (num + _P[i]) * z
        den = (den + _Q[i]) * z
    return (_SQRPI - z * (num + _P[4]) / (den + _Q[4])) / y


def erfc_abs(xp: Any, y: Any) -> Any:
    """erfc(y) for y >= 0.46875 (smaller y give finite garbage, to be masked out)."""
    capped = xp.clip(y, 0.0, _XBIG)
    out = _exp_neg_square(xp, capped) * _erfc_ratio(xp, y)
    return xp.where(y < _XBIG, out, xp.zeros_like(out))


def erf(xp: Any, x: Any) -> Any:
    """The error function, elementwise, from Array-API operations only (Cody 1969)."""
    a = xp.abs(x)
    small = _erf_small(xp.clip(x, -_THRESH, _THRESH))
    tail = 1.0 - erfc_abs(xp, a)
    return xp.where(a <= _THRESH, small, xp.where(x < 0, -tail, tail))


SQRT1_2 = 0.70710678118654752440


# exp(-x^2 / 2) underflows float64 (below 2**-1074) from |x| ~ 38.6 on, and with it x Phi(x);
# |x| is clamped here only to keep inf out of the Gaussian factor's split.  (Phi alone
# underflows earlier, from |x| ~ 37.5, where x Phi(x) is still a normal number: the GELU's
# lower tail multiplies by x before the small factors, never after.)
_GELU_XMAX = 40.0


def _gelu_generic(xp: Any, x: Any) -> Any:
    """x Phi(x) with Phi(x) = erfc(-x / sqrt 2) / 2, accurate in both tails, from Array-API
    operations.

    The Gaussian factor of the tail is exp(-x^2 / 2) from x itself (split as in CALERF), not
    exp(-u^2) from the rounded u = x / sqrt 2, whose rounding would cost a relative error
    of about x^2 ulp far in the lower tail; the slowly varying rational factor takes u.  In
    the lower tail x multiplies the Gaussian factor first: x Phi(x) is a normal number down to
    x ~ -37.5, where Phi(x) alone is already subnormal (and would lose its last bits).
    """
    u = x * SQRT1_2
    a = xp.abs(u)
    center = x * (0.5 + 0.5 * _erf_small(xp.clip(u, -_THRESH, _THRESH)))
    gauss = _exp_neg_square(xp, xp.clip(xp.abs(x), 0.0, _GELU_XMAX), 0.5)
    ratio = _erfc_ratio(xp, a)
    lower = xp.clip(x, max=0.0) * gauss * ratio * 0.5  # (x G) first; x = -inf stays NaN (0 inf)
    upper = x * (1.0 - 0.5 * gauss * ratio)
    return xp.where(a <= _THRESH, center, xp.where(u < 0, lower, upper))


_GELU_BLOCK = 8192  # elements per block of the NumPy path: its temporaries stay in L1/L2


def _mid_ratio(y: Any) -> Any:
    """erfc(y) exp(y^2) for 0.46875 < y <= 4 (CALERF's C/D approximation)."""
    num = _C[8] * y
    den = y.copy()
    for i in range(7):
        num += _C[i]
        num *= y
        den += _D[i]
        den *= y
    num += _C[7]
    den += _D[7]
    num /= den
    return num


def _gelu_numpy(x: Any) -> Any:
    """NumPy fast path of :func:`gelu`: the same formulas, block by block, each branch only
    on the elements it applies to (most activations need only the small erf branch or the
    mid erfc branch; the far tails are rare).

    Delegation: where the process has imported ``scipy.special`` (mmfuse never imports it: a
    0.2 s import is no price for a call of microseconds), its erfc and erfcx compute Phi
    instead (:func:`_gelu_scipy`), as :func:`gelu_torch` uses torch's: about twenty NumPy
    calls instead of forty on small inputs (12 against 39 us at 176 elements), and one
    SciPy call per element where these formulas take about thirty passes (12 against 15 ms
    at 614400 standard normal elements); the same accuracy (a few float64 ulps; float32
    computed in float64 and rounded once, within half an ulp of its own either way, and
    float16 through float32), last bits that may differ.  (float32 in its own precision had
    taken up to 6 ulps, and 10.0 against 12.8 ms at 614400 elements, 113 against 154 us at
    8192: the price of the wider blocks.)
    """
    import numpy as np

    special = sys.modules.get("scipy.special")
    if special is not None:
        return _gelu_scipy(special, x)

    flat = x.reshape(-1)  # (ndarray's methods: NumPy's function layer costs ~1 us a call)
    out = np.empty(flat.shape, dtype=x.dtype)
    native = x.dtype == np.float64  # (not a big-endian float64, nor long double)
    for start in range(0, flat.shape[0], _GELU_BLOCK):
        xb = flat[start : start + _GELU_BLOCK]
        ob = out[start : start + _GELU_BLOCK]
        if native:
            _gelu_block(xb, ob)
        else:  # this block in float64 (in cache), rounded once into out
            wide = np.empty(xb.shape, dtype=np.float64)
            _gelu_block(xb.astype(np.float64), wide)
            ob[...] = wide
    return out.reshape(x.shape)


def _gelu_block(xb: Any, ob: Any) -> None:
    """:func:`_gelu_numpy` on one float64 block ``xb``, into ``ob``."""
    import numpy as np

    u = xb * SQRT1_2
    a = np.abs(u)
    inner = a <= _THRESH
    if inner.all():
        np.multiply(xb, 0.5 + 0.5 * _erf_small(u), out=ob)
        return
    idx = inner.nonzero()[0]
    ob[idx] = xb[idx] * (0.5 + 0.5 * _erf_small(u[idx]))
    idx = (~inner).nonzero()[0]
    ao = a[idx]
    xo = xb[idx]
    if ao.max() <= 4.0:
        ratio = _mid_ratio(ao)
    else:
        ratio = np.empty_like(ao)
        mid = ao <= 4.0
        ratio[mid] = _mid_ratio(ao[mid])
        ratio[~mid] = _big_ratio(np.minimum(ao[~mid], _GELU_XMAX * SQRT1_2))
    gauss = _exp_neg_square(np, np.minimum(np.abs(xo), _GELU_XMAX), 0.5)
    # lower tail: (x G) ratio / 2, x first (as _gelu_generic); min(x, 0) keeps +inf's
    # unused lower value finite, and x = -inf gives NaN (0 inf), as the reference
    lower = np.minimum(xo, 0.0) * gauss
    lower *= ratio
    lower *= 0.5
    gauss *= ratio
    gauss *= 0.5
    ob[idx] = np.where(xo < 0, lower, xo * (1.0 - gauss))


# Below this x the float64 torch GELU takes its lower-tail formula (:func:`normal_cdf_torch`).
# Measured against 50-digit mpmath (torch 2.13's erfc and erfcx): with the cut here (u > 1)
# the value is within 4 ulps above it (erfc's own) and 5 below, the derivative autograd forms
# within 5 ulps of |Phi| + |x phi| everywhere (29 on [-38, -37.5], where phi is subnormal); a
# cut at -1 took 5 ulps of the value on [-1.2, -1] against 2.
_TORCH_TAIL_X = -1.4142135623730951  # -sqrt 2


def normal_cdf_torch(torch: Any, x: Any, times_x: bool) -> Any:
    """Phi(x) (``times_x``: x Phi(x)) for a float64 tensor x, from torch's operations, so
    that autograd's derivative is as accurate as the value (a few ulps everywhere).

    Above :data:`_TORCH_TAIL_X`: erfc(u) / 2 with u = -x / sqrt 2.  Below it: erfcx(u) G / 2
    with the Gaussian factor G = exp(-x^2 / 2) from x itself, split as in CALERF
    (:func:`_exp_neg_square`), x multiplying G first (x Phi(x) is a normal number down to x ~
    -37.6, where Phi alone is subnormal).  There erfc of the rounded u (about u^2 ulps off)
    took its derivative from exp(-u^2) of that u: up to 490 ulps of the GELU's derivative on
    [-37.5, -20], where the value had been corrected for u's rounding (a review against exact
    arithmetic); the split's derivative is exact, and erfcx varies slowly.  Each formula reads
    x where it applies and the cut elsewhere (selected, not clamped: NaN keeps its NaN
    gradient), so the lanes ``where`` drops stay finite and give no NaN gradients.  Where x
    Phi(x) = x (Phi rounds to 1 from x ~ 8.3) it is x itself: 0.5 erfc(u) is exactly 1 there,
    and it multiplies x after the halving (erfc = 2 times an x past half the float64 range
    would overflow)."""
    tail = x < _TORCH_TAIL_X
    # selected, not clamped: clamp's derivative is 0 at NaN, which dropped a NaN sample's
    # contribution from the gradients (a review's find); where() passes x's own
    below = torch.where(tail, x, _TORCH_TAIL_X)
    above = torch.where(tail, _TORCH_TAIL_X, x)
    capped = torch.clamp(-below, max=_GELU_XMAX)  # (-inf: as generic)
    gauss = _exp_neg_square(torch, capped, 0.5)
    if times_x:
        gauss = below * gauss
    # erfcx reads the capped argument too (where the Gaussian factor is 0, so the value is
    # the same): its derivative overflowed past u ~ 9e307, a NaN gradient for finite x below
    # -1.27e308 where the GELU's derivative is 0, as JAX gives (a review's find).  ``below *
    # 0`` adds -0 to it for finite x and NaN for x = -inf, whose value is NaN (0 inf) and
    # whose gradient stays NaN, as JAX's and every other backend's (and x = +inf's, in erfc)
    lower = gauss * torch.special.erfcx(capped * SQRT1_2 + below * 0.0) * 0.5
    upper = 0.5 * torch.special.erfc(above * (-SQRT1_2))
    return torch.where(tail, lower, above * upper if times_x else upper)


def torch_transformed(*tensors: Any) -> bool:
    """Whether any of the torch tensors is seen by a ``torch.func`` transform (grad, vmap,
    jvp, ...: a functorch wrapper) or batched by autograd's own vmap, or may carry a
    forward-mode tangent (a
    ``torch.autograd.forward_ad.dual_level`` is open).  Neither works with ``out=`` variants,
    custom operators without batching rules, or reuse of intermediate buffers."""
    import torch  # already imported: the arguments are tensors

    if torch.autograd.forward_ad._current_level >= 0:
        return True
    if torch.compiler.is_compiling():
        # Dynamo cannot trace is_functorch_wrapped_tensor (a graph break before any kernel);
        # it traces the transform depth, which says "inside a transform" for every tensor
        # there (never a wrong False: only the buffer-reusing fast paths are given up)
        return bool(torch._C._functorch.get_dynamic_layer_stack_depth() > 0)
    functorch = torch._C._functorch
    # (and the legacy batched tensors of autograd's own vmap: is_grads_batched, vectorized
    # Jacobians, gradcheck's batched-gradient check hand a backward those)
    return any(
        functorch.is_functorch_wrapped_tensor(t) or functorch.is_legacy_batchedtensor(t) for t in tensors
    )


# ATen runs the exact GELU and its derivative through oneDNN for contiguous float32 and bfloat16
# CPU tensors, at a fixed cost per call (primitive set-up: about 9 us forward and 17 us
# backward, on this project's 2-core Intel machine, whatever the size) that its own
# vectorised kernel, which it takes for every other layout, does not pay: on a transposed view
# the pair runs 2.5-4x faster up to 4096 elements, 1.7x at 8192, and about even at 16384, above
# which oneDNN wins (benchmarks/RESULTS.md, twenty-second session).  The same formula either
# way (the two agree within an ulp or two of float32).
_ONEDNN_GELU_MIN = 1 << 14


def aten_gelu_view(x: Any) -> bool:
    """Whether ``x`` (a tensor) should reach ATen's GELU kernels as its transposed view
    ``x.mT`` (small contiguous CPU tensors: ATen's own kernel instead of oneDNN's, see
    ``_ONEDNN_GELU_MIN``).  Never under ``torch.compile``, which generates its own kernel."""
    # the compile test first: a size test on a traced call's symbolic shape guards its graph
    return (
        not sys.modules["torch"].compiler.is_compiling()
        and x.device.type == "cpu"
        and x.dim() >= 2
        and x.shape[-1] > 1
        and x.shape[-2] > 1
        and x.numel() < _ONEDNN_GELU_MIN
        and x.is_contiguous()
    )


def gelu_torch(x: Any) -> Any:
    """Torch path of :func:`gelu`.

    float64: x Phi(x) by :func:`normal_cdf_torch`, within a few ulps relative everywhere,
    and so is the derivative autograd forms.  ``torch.nn.functional.gelu`` computes
    0.5 (1 + erf(x / sqrt 2)) instead, which cancels in the lower tail (relative error 1e-2
    already at x = -7 in float64).

    float32 and half precisions: ``torch.nn.functional.gelu`` itself (the exact erf GELU, not
    the tanh form; vectorised, 2-3x faster than the erfc form on CPU), on small CPU tensors
    through a transposed view (:func:`aten_gelu_view`).  Its error is within
    a few float32 ulps of |x| absolutely (4.2 at most on [-10, 10], against mpmath), about
    float32's own resolution of the pre-activation; only its relative error far in the lower
    tail (where GELU ~ 0) is loose.

    Autograd flows through every step.
    """
    torch = sys.modules["torch"]  # x is a tensor (a lookup: an import statement costs 0.2 us)
    if x.dtype != torch.float64:
        if aten_gelu_view(x):  # (its saved input is that view too: the backward's kernel follows)
            return torch.nn.functional.gelu(x.mT).mT
        return torch.nn.functional.gelu(x)
    return normal_cdf_torch(torch, x, True)


# Below this x the SciPy GELU takes its lower-tail formula (inputs of 64 bits or more).  Above
# it erfc(-x / sqrt 2) of the rounded argument is the more accurate: measured against 40-digit
# mpmath (4000 points per interval), at most 2 float64 ulps of the result for x >= -0.66, 3 on
# [-0.8, -0.66], 4 on [-1, -0.8], where the tail formula took 5-8; below -1 erfc's error grows
# (5 ulps on [-1.2, -1], 12 on [-1.41, -1.2], 550 on [-20, -8]) and the tail formula's stays
# within 5-7.
_SCIPY_TAIL_X = -1.0


def _gelu_scipy(special: Any, x: Any) -> Any:
    """x Phi(x) with SciPy's error functions, on NumPy, block by block (:data:`_GELU_BLOCK`):
    float64, and other float dtypes computed in float64 and rounded once.

    Phi = erfc(u) / 2 with u = -x / sqrt 2, one SciPy call per element.  For x of 64 bits or
    more below :data:`_SCIPY_TAIL_X` (about a sixth of standard normal pre-activations), and on
    those elements only, Phi = erfcx(u) exp(-x^2 / 2) / 2 instead: the Gaussian factor from x itself,
    split as in :func:`_gelu_generic` (erfc's own exp(-u^2) of the rounded u loses about u^2
    ulp: 5e-14 at x = -35), the slowly varying erfcx taking the rounded u; x multiplies the
    Gaussian factor first (Phi alone goes subnormal before x Phi does) and the half comes last
    (its x G erfcx may be subnormal).  Narrower inputs need no tail formula: there the
    rounding of u costs about 2 u^2 float64 ulps of Phi, under 3e-14 relative wherever their
    x Phi(x) is a normal number (x > -13.1 for float32), far below their own half ulp.  The
    upper formula halves erfc (in [0, 2]: exact) before x, which past half the float64 range
    would overflow times 2.
    """
    import numpy as np

    flat = x.reshape(-1)  # (ndarray's methods here: NumPy's function layer costs ~1 us a call)
    native = x.dtype == np.float64  # (not a big-endian float64, nor long double)
    exact_tail = x.dtype.itemsize >= 8  # float64 and long double (computed in float64 too)
    if native and flat.shape[0] <= _GELU_BLOCK:  # one block: no slices, no loop
        return _gelu_scipy_block(special, flat, None, True).reshape(x.shape)
    out = np.empty(flat.shape, dtype=x.dtype)
    for start in range(0, flat.shape[0], _GELU_BLOCK):
        xb = flat[start : start + _GELU_BLOCK]
        if native:
            _gelu_scipy_block(special, xb, out[start : start + _GELU_BLOCK], exact_tail)
        else:  # this block in float64 (in cache), rounded once into out
            wide = _gelu_scipy_block(special, xb.astype(np.float64), None, exact_tail)
            out[start : start + _GELU_BLOCK] = wide
    return out.reshape(x.shape)


def _gelu_scipy_block(special: Any, xb: Any, ob: Any, exact_tail: bool) -> Any:
    """:func:`_gelu_scipy` on one float64 block ``xb``, into ``ob`` (None: a new array), which
    is returned (the tail formula below :data:`_SCIPY_TAIL_X` where ``exact_tail``)."""
    np = sys.modules["numpy"]
    ob = special.erfc(np.multiply(xb, -SQRT1_2), out=ob)
    ob *= 0.5
    ob *= xb
    tail = (xb < _SCIPY_TAIL_X).nonzero()[0] if exact_tail else ()
    if len(tail):
        xt = xb[tail]
        y = np.negative(xt)  # (-inf: clamped, as _gelu_generic; NaN is never below the tail's x)
        np.minimum(y, _GELU_XMAX, out=y)
        gauss = _exp_neg_square(np, y, 0.5)
        gauss *= xt
        lower = special.erfcx(np.multiply(xt, -SQRT1_2))
        lower *= gauss
        lower *= 0.5
        ob[tail] = lower
    return ob


def gelu(xp: Any, x: Any) -> Any:
    """Exact GELU, x Phi(x) with the erf-based normal CDF (not the tanh approximation).

    NumPy and other namespaces use the Cody approximations above, in float32 for float16 /
    bfloat16 inputs (the rational pieces overflow float16), NumPy in float64 (float32 rounded
    once from it; or SciPy's erfc, :func:`_gelu_numpy`); torch its native erfc (in every
    torch mmfuse supports, 2.4 on) so that autograd and devices work; Dask each chunk's own
    namespace's, one task per chunk.
    """
    if not is_torch(xp) and low_precision(xp, x.dtype):
        return in_work_dtype(gelu, xp, x.dtype, xp, x)
    if is_torch(xp):
        return gelu_torch(x)
    if is_numpy(xp):
        return _gelu_numpy(x)
    if is_dask(xp):
        # one task per chunk, each the GELU of its chunk's own namespace (NumPy's blocked path,
        # or CuPy's), instead of the formulas' thirty-odd elementwise Dask operations (about
        # 30 tasks per chunk after Dask's fusion, 200 before it); the same values
        return x.map_blocks(_gelu_chunk, dtype=x.dtype, meta=x._meta)
    if widens_float32(xp, x):
        # float32 in float64, rounded once, as on NumPy: the formulas in float32 took up to
        # 9 ulps (Dask), where rounding the float64 value is within half an ulp
        return computed_in(_gelu_generic, xp, xp.float64, x.dtype, xp, x)
    return _gelu_generic(xp, x)


def _gelu_chunk(block: Any) -> Any:
    """:func:`gelu` of one Dask chunk, in the chunk's own namespace."""
    return gelu(array_namespace(block), block)


def _gelu_tanh(xp: Any, x: Any) -> Any:
    """The tanh approximation 0.5 x (1 + tanh z), z = sqrt(2 / pi) (x + 0.044715 x^3), as the
    same function x sigmoid(2 z): 1 + tanh z cancels for negative x (2e6 float64 ulps at
    x = -5, and 0 for the exact -2.6e-21 at x = -8), the logistic form does not.  What is left
    is z's own rounding, a few |z| ulps far in the lower tail (a review of the oracle).

    NumPy and other namespaces: the reference's form, e = exp(-2 |z|) and e / (1 + e) below 0,
    which never overflows.  (NumPy's x / (1 + e^(-2 z)) had overflowed to 0 where the value is
    still a normal number: x in [-21.2, -21.16] in float64 (values to 1.2e-307), [-10.9, -10.06]
    in float32; a review's find.)  torch: its sigmoid, one kernel with its own derivative (the
    reference's form took 1.5x the time of a small training step's activation), whose
    e^(-2 z) overflows there too: in those bands it gives 0 for values under 1.2e-307 and
    3e-38."""
    z = math.sqrt(2.0 / math.pi) * (x + 0.044715 * (x * x * x))
    if is_torch(xp):
        return x * sys.modules["torch"].sigmoid(2.0 * z)
    e = xp.exp(-2.0 * xp.abs(z))
    return x * xp.where(z >= 0, xp.ones_like(e), e) / (1.0 + e)


def _relu(xp: Any, x: Any) -> Any:
    # NaN stays NaN, as np.maximum(x, 0); x = 0 takes the constant branch, so autograd's
    # derivative there is 0, as torch.relu's (x < 0 gave 1; a review of the fusion)
    return xp.where(x <= 0, xp.zeros_like(x), x)


ACTIVATIONS: dict[str, Callable[[Any, Any], Any]] = {
    "gelu": gelu,
    "gelu_tanh": _gelu_tanh,
    "relu": _relu,
    "identity": lambda xp, x: x,
}


def activation_fn(xp: Any, activation: Any) -> Callable[[Any], Any]:
    """The activation as a one-argument function on arrays of ``xp``."""
    if callable(activation):
        return lambda x: apply_activation(activation, x)
    fn = ACTIVATIONS[activation]
    return lambda x: fn(xp, x)


def in_own_dtype(xp: Any, activation: Any) -> Any:
    """``activation`` for pre-activations computed in a work dtype wider than the inputs'
    (float16 / bfloat16 inputs, computed in float32): a caller's callable that holds floating
    parameters of one dtype (an ``nn.PReLU``; under autocast, the layer casts them with its
    own) is called on the pre-activations in that dtype, its result widened back; any other
    callable, and a named activation (the library's own), in the work dtype.  (A bfloat16
    PReLU had failed on float32 pre-activations, and a float32 one on bfloat16 ones: each is
    called in its own dtype now; a review's find.)"""
    if not callable(activation) or not callable(getattr(activation, "parameters", None)):
        return activation

    def call(h: Any) -> Any:
        # read per call: autocast reparametrises the module's parameters for the call
        dtypes = {p.dtype for p in activation.parameters() if p.is_floating_point()}
        own = dtypes.pop() if len(dtypes) == 1 else h.dtype
        if own == h.dtype:
            return apply_activation(activation, h)
        return xp.astype(apply_activation(activation, xp.astype(h, own)), h.dtype)

    return call


def apply_activation(activation: Callable[[Any], Any], h: Any) -> Any:
    """A caller's ``activation`` on the pre-activations ``h`` (B, T_m, r_m), its result
    checked: an array of h's shape (the activation is elementwise) and dtype, else an error
    naming ``activation`` rather than one from the fusion's GEMMs further on (or, on NumPy, a
    result silently in another dtype)."""
    out = activation(h)
    shape = getattr(out, "shape", None)
    if shape is None:
        raise TypeError(f"activation must return an array, got {type(out).__name__}")
    if tuple(shape) != tuple(h.shape):
        raise ValueError(
            f"activation must be elementwise: it returned shape {tuple(shape)} for "
            f"pre-activations of shape {tuple(h.shape)}"
        )
    dtype = getattr(out, "dtype", None)
    # (namespaces first: dtypes of two libraries are not compared, which array_api_strict
    # warns at; and an array of another library is named as such: its float32 is not
    # "another dtype".  The arrays' namespaces, not their dtypes' libraries: JAX and Dask
    # arrays have NumPy's dtypes, so a NumPy result had passed, forcing JAX's pre-activations
    # to the host and failing in Dask's fusion far from the activation; a review's find)
    if type(out) is not type(h) and not _same_namespace(out, h):
        raise TypeError(
            f"activation must return an array of the pre-activations' library: it returned "
            f"{_qualified(type(out))} for pre-activations of type {_qualified(type(h))}"
        )
    if type(dtype) is not type(h.dtype) or dtype != h.dtype:
        raise TypeError(
            f"activation must keep the pre-activations' dtype: it returned {dtype} for "
            f"pre-activations of dtype {h.dtype}"
        )
    if _devices_checked(h) and device_of(out) != device_of(h):
        # (else the fusion's product failed on the two devices, naming no argument)
        raise ValueError(
            f"activation must keep the pre-activations' device: it returned an array on "
            f"{device_of(out)} for pre-activations on {device_of(h)}"
        )
    return out


def _devices_checked(h: Any) -> bool:
    """Whether :func:`apply_activation` compares its result's device with ``h``'s: for
    torch, array-api-strict, CuPy.  Not NumPy and Dask (one device), nor JAX, whose arrays
    have no device under tracing and whose uncommitted results follow committed data by
    JAX's own rule (comparing them refused valid activations under grad and vmap; a review
    of the session's diff)."""
    xp = array_namespace(h)
    return not (is_numpy(xp) or is_dask(xp) or is_jax(xp))


def _same_namespace(a: Any, b: Any) -> bool:
    """Whether two arrays (``b`` one) are of one array namespace; False for an ``a`` that is
    no array."""
    try:
        return array_namespace(a) is array_namespace(b)
    except TypeError:
        return False


def _qualified(kind: type) -> str:
    """A type's name with its module's (``numpy.ndarray``, ``torch.Tensor``)."""
    return f"{kind.__module__}.{kind.__qualname__}"


# --------------------------------------------------------------------------- the planner


@dataclass(frozen=True)
class SequencePlan:
    """How :func:`sequence_fusion` contracts each modality, decided from shapes alone.

    Attributes
    ----------
    mode : str
        ``"cp"`` or ``"collapsed"``.
    orders : tuple of str
        Per modality, ``"token"`` (contract the token factors first, over T_m, then the
        feature factors over r_m) or ``"feature"`` (the other way round).
    costs : tuple of (int, int)
        Per modality, multiply-adds per sample of the (token-first, feature-first) orders.
    width : int
        Elements per sample of one modality's pairwise terms over all ranks, R_t T_out R_h D
        (ranks 1 when collapsed); cp mode holds them a block at a time (:func:`cp_blocking`).
    """

    mode: str
    orders: tuple[str, ...]
    costs: tuple[tuple[int, int], ...]
    width: int

    @property
    def flops(self) -> int:
        """Multiply-adds per sample of the chosen orders (both contractions, all modalities)."""
        return sum(c[0] if o == "token" else c[1] for o, c in zip(self.orders, self.costs))


@lru_cache(maxsize=512)
def plan(
    mode: str,
    lengths: tuple[int, ...],
    ranks: tuple[int, ...],
    feature_rank: int,
    token_rank: int,
    n_out: int,
    out_dim: int,
) -> SequencePlan:
    """The contraction order of each modality from the shapes (cached on them).

    For modality m, with R_h = R_t = 1 in collapsed mode (the factors are rank-summed first):

    - token first:   Psi^T H   costs R_t T_out T_m r_m, then (.) Phi costs R_t T_out r_m R_h D;
    - feature first: H Phi     costs T_m r_m R_h D,     then Psi^T (.) costs R_t T_out T_m R_h D.

    The cheaper order wins; a tie goes to the rule of thumb "token factors first when
    T_out < T_m, feature factors first otherwise".  In collapsed mode with r_m <= D (every
    released configuration) the count always agrees with the rule when T_out < T_m (each
    term of the token-first cost is at most its feature-first counterpart); otherwise, and
    in cp mode, where the ranks weigh in too, the count decides.  Example: the released
    Food-101 text modality (T_m = 50 < T_out = 64, r = 64, D = 768), collapsed, costs
    3.35M multiply-adds per sample token-first against 4.92M feature-first.
    """
    r_h, r_t = (1, 1) if mode == "collapsed" else (feature_rank, token_rank)
    orders, costs = [], []
    for t_m, r_m in zip(lengths, ranks):
        token_first = r_t * n_out * t_m * r_m + r_t * n_out * r_m * r_h * out_dim
        feature_first = t_m * r_m * r_h * out_dim + r_t * n_out * t_m * r_h * out_dim
        if token_first != feature_first:
            orders.append("token" if token_first < feature_first else "feature")
        else:
            orders.append("token" if n_out < t_m else "feature")
        costs.append((token_first, feature_first))
    return SequencePlan(mode, tuple(orders), tuple(costs), r_t * n_out * r_h * out_dim)


# --------------------------------------------------------------------------- fusion


def _collapsed_factors(xp: Any, feature: Any, token: Any) -> tuple[Any, Any]:
    """(r, D) feature matrix and (T_out, T) token matrix of the released (rank-summed) form."""
    if type(feature) is type(token) is sys.modules["numpy"].ndarray:
        # NumPy: the reduction and the transposed view directly (np.sum's and the namespace
        # wrapper's Python layers cost as much as these sums at small sizes); the same sums
        add = sys.modules["numpy"].add
        return add.reduce(feature, 0), add.reduce(token, 0).T
    phi = xp.sum(feature, axis=0)  # (r_m, D)
    psi_t = xp.matrix_transpose(xp.sum(token, axis=0))  # (T_out, T_m)
    return phi, psi_t


def _cp_factors(xp: Any, feature: Any, token: Any) -> tuple[Any, Any]:
    """Feature factors as one (r, R_h D) matrix, token factors as one (R_t T_out, T) matrix."""
    r_h, r_m, d = feature.shape
    r_t, t_m, t_out = token.shape
    if type(feature) is type(token) is sys.modules["numpy"].ndarray:
        # NumPy: ndarray's own methods (the namespace wrappers' Python layers cost 2.3 of these
        # 3.4 us per modality, a tenth of the tiny cp Wander call); the same copies
        phi = feature.transpose(1, 0, 2).reshape(r_m, r_h * d)
        return phi, token.transpose(0, 2, 1).reshape(r_t * t_out, t_m)
    phi = xp.reshape(xp.permute_dims(feature, (1, 0, 2)), (r_m, r_h * d))
    psi_t = xp.reshape(xp.permute_dims(token, (0, 2, 1)), (r_t * t_out, t_m))
    return phi, psi_t


def _contract(xp: Any, h: Any, phi: Any, psi_t: Any, order: str) -> Any:
    """``psi_t @ h @ phi`` for h (b, T, r): (b, P, Q) with P = rows of psi_t, Q = cols of phi.

    Token first: one broadcast matmul over the batch, then a single GEMM on (b P, r).
    Feature first: a single GEMM on (b T, r), then one broadcast matmul over the batch.
    """
    if order == "token":
        return _times(xp, psi_t @ h, phi)
    return psi_t @ _times(xp, h, phi)


def sequence_fusion(
    hs: list[Any],
    feature_factors: list[Any],
    token_factors: list[Any],
    *,
    mode: str = "cp",
    masks: Any = None,
) -> Any:
    """Fuse M token sequences; W is never built.

    Collapsed: each modality's ranks are summed first, then two matmuls give its (B, T_out, D)
    term and the terms are multiplied.  CP: per batch block, each modality's first
    contraction runs once over all ranks; then, token-rank chunk by token-rank chunk, the
    second gives the (b, jn T_out, R_h D) pairwise terms (one GEMM), which are multiplied
    across modalities and summed over i and j.  Blocks follow :func:`cp_blocking`, so the
    terms stay in cache and the memory held does not grow with B, R_t or T_m.

    float16 / bfloat16 are computed in float32 and rounded once (a product of M terms
    overflows float16's 65504 long before the result does).
    """
    xp = array_namespace(hs[0])
    if low_precision(xp, hs[0].dtype):
        return in_work_dtype(
            sequence_fusion, xp, hs[0].dtype, list(hs), list(feature_factors), list(token_factors),
            mode=mode, masks=masks,
        )  # fmt: skip
    if is_dask(xp):  # parameters in one chunk: the output keeps the inputs' batch chunks
        feature_factors, token_factors = one_chunk(feature_factors), one_chunk(token_factors)
    r_h, _, out_dim = feature_factors[0].shape
    r_t, _, n_out = token_factors[0].shape
    # (traced by torch.compile: the plan itself, which it would trace through the cache anyway,
    # warning at the cache every time)
    the_plan = (plan.__wrapped__ if traced_by_dynamo(hs[0]) else plan)(
        mode,
        tuple([int(h.shape[1]) for h in hs]),
        tuple([int(h.shape[2]) for h in hs]),
        int(r_h),
        int(r_t),
        int(n_out),
        int(out_dim),
    )
    if mode == "collapsed":
        return fuse_collapsed(xp, hs, feature_factors, token_factors, the_plan.orders, masks)
    blocking = cp_block_shape(xp, hs[0], int(r_t), int(n_out), int(r_h), int(out_dim))
    return fuse_cp(xp, hs, feature_factors, token_factors, the_plan.orders, blocking, masks)


def fuse_collapsed(xp: Any, hs: list[Any], feature_factors: list[Any], token_factors: list[Any],
                   orders: tuple[str, ...], masks: Any = None) -> Any:  # fmt: skip
    """:func:`sequence_fusion`'s collapsed mode on the activations ``hs``, their padded
    tokens zeroed where ``masks`` (a list with None entries, or None) says, each modality
    contracted in its planned order (:class:`SequencePlan`).  Each modality is masked just
    before its contraction: one masked copy held at a time, not M."""
    mats = [_collapsed_factors(xp, f, t) for f, t in zip(feature_factors, token_factors)]
    y = None
    numpy = is_numpy(xp)
    for m, (h, (phi, psi_t), order) in enumerate(zip(hs, mats, orders)):
        if masks is not None and masks[m] is not None:
            h = mask_tokens(xp, h, masks[m])
        term = _contract(xp, h, phi, psi_t, order)  # (B, T_out, D)
        if y is None:
            y = term
        elif numpy:
            y *= term  # our own buffer (the first product)
        else:
            y = y * term
    return y


def cp_block_shape(xp: Any, h: Any, r_t: int, n_out: int, r_h: int, out_dim: int) -> tuple[Any, int]:
    """(batch rows, token ranks) per block of cp mode for activations like ``h`` (B, T, r):
    :func:`cp_blocking` within the host's block budget; None rows (the whole batch, one
    block) on lazy namespaces and for a batch traced by ``torch.compile`` or
    ``torch.export`` (:func:`mmfuse._core.fusion.tensor_fusion_blocks` says why)."""
    batch = h.shape[0]
    if type(h) is sys.modules["numpy"].ndarray:  # (the tests below, and finfo, cost a few
        # microseconds of a small call)
        return cp_blocking(batch, r_t, n_out, r_h, out_dim, h.itemsize, CP_BLOCK_BYTES)
    if is_lazy(h) or is_dask(xp) or is_jax(xp) or batch is None or traced_by_dynamo(h):
        return None, r_t  # one block: their schedulers handle memory
    itemsize = int(xp.finfo(h.dtype).bits) // 8
    budget = block_budget(h, CP_BLOCK_BYTES)
    return cp_blocking(int(batch), r_t, n_out, r_h, out_dim, itemsize, budget)


def fuse_cp(xp: Any, hs: list[Any], feature_factors: list[Any], token_factors: list[Any],
            orders: tuple[str, ...], blocking: tuple[Any, int], masks: Any = None) -> Any:  # fmt: skip
    """:func:`sequence_fusion`'s cp mode on the activations ``hs``, their padded tokens
    zeroed block by block where ``masks`` (a list with None entries, or None) says, each
    modality contracted in its planned order, ``blocking`` (batch rows, token ranks) per
    block (:func:`cp_block_shape`).  (Masking the inputs whole first had held a masked copy
    of every input: memory growing with B, where the blocks' does not; a review's find.)

    Dask: one task per batch chunk, each this function on the chunk's NumPy arrays with
    NumPy's blocking (:func:`_fuse_cp_chunk`).  As a graph of Dask's own operations, every
    chunk's first contractions, (b, R_t T_out, R_h D) each, were scheduled before any chunk's
    product, so all of them were held at once: 302 MiB at B = 1024 in chunks of 64, against
    15 MiB for NumPy's whole batch (a review's measurement)."""
    r_h, _, out_dim = feature_factors[0].shape
    r_t, _, n_out = token_factors[0].shape
    if is_dask(xp):
        from .chunks import per_batch_chunk

        present = tuple(masks is not None and k is not None for k in (masks or [None] * len(hs)))
        batched = [*hs, *(k for k, there in zip(masks or (), present) if there)]
        chunk = partial(_fuse_cp_chunk, len(hs), present, tuple(orders))
        return per_batch_chunk(
            chunk, batched, [*feature_factors, *token_factors], (int(n_out), int(out_dim)), hs[0].dtype
        )
    mats = [_cp_factors(xp, f, t) for f, t in zip(feature_factors, token_factors)]
    batch = hs[0].shape[0]
    numpy = type(hs[0]) is sys.modules["numpy"].ndarray
    rows_b, chunk_j = blocking
    blocks = [slice(None)] if rows_b is None or rows_b >= batch > 0 else block_slices(batch, rows_b)
    joined = Joined(xp, batch) if len(blocks) > 1 else None  # (one block: its result itself)
    # One block, or one chunk of token ranks, covering everything takes the arrays whole: an
    # index of all rows would be one more operator per modality on torch
    all_ranks = chunk_j >= r_t
    for blk in blocks:
        block = hs if len(blocks) == 1 else [h[blk, ...] for h in hs]
        if masks is not None:
            whole = len(blocks) == 1
            block = [
                mask_tokens(xp, h, k if whole or k is None else k[blk, ...]) for h, k in zip(block, masks)
            ]
        # the first contraction, once per batch block: (b, R_t T_out, r_m) or (b, T_m, R_h D)
        firsts = [
            psi_t @ h if order == "token" else _times(xp, h, phi)
            for h, (phi, psi_t), order in zip(block, mats, orders)
        ]
        acc = None
        for j0 in range(0, r_t, chunk_j):
            rows = None if all_ranks else slice(j0 * n_out, min(j0 + chunk_j, r_t) * n_out)  # ranks j0..
            prod = None
            for first, (phi, psi_t), order in zip(firsts, mats, orders):
                # (b, jn T_out, R_h D)
                if order == "token":
                    term = _times(xp, first if all_ranks else first[:, rows, :], phi)
                else:
                    term = (psi_t if all_ranks else psi_t[rows, :]) @ first
                if prod is None:
                    prod = term
                elif numpy:
                    prod *= term  # our own buffer
                else:
                    prod = prod * term
            assert prod is not None
            n_b, n_p, _ = prod.shape
            if numpy:
                # over the feature ranks i and the token ranks j at once, (b, j, T_out, i, D)
                # summed over axes 1 and 3: one reduction where one per rank took 1.05-1.3x
                # its time (from 768 to 8.4M elements; ndarray's methods, whose wrappers in
                # the namespace cost a tenth of a tiny sum).  Not on torch, whose CPU
                # reduction over two strided axes took 2-4.6x the two sums' time from 65536
                # elements on.  (add.reduce: ndarray.sum's Python layer over it costs a tenth
                # of a tiny call's reduction)
                by_rank = prod.reshape(n_b, n_p // n_out, n_out, r_h, out_dim)
                summed = sys.modules["numpy"].add.reduce(by_rank, (1, 3))
            else:
                summed = xp.sum(xp.reshape(prod, (n_b, n_p, r_h, out_dim)), axis=2)  # over i
                summed = xp.sum(xp.reshape(summed, (n_b, n_p // n_out, n_out, out_dim)), axis=1)
            acc = summed if acc is None else acc + summed  # over j
        if joined is None:
            return acc
        joined.add(acc)
    assert joined is not None
    return joined.result()


def _fuse_cp_chunk(
    n: int, present: tuple[bool, ...], orders: tuple[str, ...], b: list[Any], p: list[Any]
) -> Any:
    """One batch chunk of :func:`fuse_cp` on Dask (module-level, so that its graph pickles):
    ``b`` the chunk's n activations, then the masks ``present`` says the modalities have;
    ``p`` the n feature factors, then the n token factors."""
    rest = iter(b[n:])
    masks = [next(rest) if there else None for there in present] if any(present) else None
    feature, token = p[:n], p[n:]
    r_h, _, out_dim = feature[0].shape
    r_t, _, n_out = token[0].shape
    xp = array_namespace(b[0])
    blocking = cp_block_shape(xp, b[0], r_t, n_out, r_h, out_dim)
    return fuse_cp(xp, b[:n], feature, token, orders, blocking, masks)


def _times(xp: Any, a: Any, mat: Any) -> Any:
    """(b, p, r) @ (r, q) as one GEMM on (b p, r)."""
    n_b, n_p, r = a.shape
    if type(a) is sys.modules["numpy"].ndarray:  # ndarray's own reshape: np.reshape's layer
        return (a.reshape(n_b * n_p, r) @ mat).reshape(n_b, n_p, mat.shape[1])
    if is_torch(xp) and a.is_contiguous():
        # torch's matmul folds a contiguous (b, p, r) @ (r, q) into that GEMM itself (a view,
        # the same mm): one operator instead of reshape, mm, reshape, about 3 us of a tiny
        # call.  (A strided a it would not fold but broadcast to a bmm: the reshapes below.)
        return a @ mat
    if is_dask(xp):
        # Dask: the broadcast matmul, as in _down: the reshape to (b p, r) rechunks a's token
        # chunks, and fails on an empty batch split in several chunks (a Dask error)
        return a @ mat
    return xp.reshape(xp.reshape(a, (n_b * n_p, r)) @ mat, (n_b, n_p, mat.shape[1]))


# Each (batch block, token-rank chunk) of cp mode materialises per modality one term of
# about this many bytes, (b, jn T_out, R_h D), so that the product and the rank sums run in
# cache; no more than this is ever held per modality.
CP_BLOCK_BYTES = 1 << 21


@lru_cache(maxsize=256)
def cp_blocking(
    batch: int, token_rank: int, n_out: int, feature_rank: int, out_dim: int, itemsize: int,
    budget: int | None = None,
) -> tuple[int, int]:
    """(batch rows, token ranks) per block of cp mode, from the shapes (cached).

    One (sample, token rank) pair costs ``T_out R_h D`` elements per modality; a block holds
    as many pairs as fit ``budget`` bytes (``CP_BLOCK_BYTES`` on the CPU), whole token-rank
    ranges first (fewer, larger GEMMs), and at least one pair.
    """
    per_pair = n_out * feature_rank * out_dim * itemsize
    pairs = max(1, (CP_BLOCK_BYTES if budget is None else budget) // max(1, per_pair))
    chunk_j = max(1, min(token_rank, pairs))
    rows_b = max(1, min(batch, pairs // chunk_j))
    return rows_b, chunk_j


# --------------------------------------------------------------------------- the adapter


def _down(xp: Any, x: Any, w: Any, b: Any) -> Any:
    """x @ W + b for x (B, T, d): one GEMM on (B T, d) on NumPy and torch (one ``addmm``,
    through ``linear`` for a contiguous x), the broadcast matmul elsewhere."""
    batch, t_m, d = x.shape
    if type(x) is sys.modules["numpy"].ndarray:
        # NumPy: ndarray's own reshape (np.reshape's Python layer costs as much as this
        # GEMM at small sizes), and the bias added in place into the product's own buffer
        h = x.reshape(batch * t_m, d) @ w
        if b is not None:
            h += b
        return h.reshape(batch, t_m, w.shape[1])
    if is_torch(xp) and x.is_contiguous():
        # torch's linear runs that addmm on the (B T, d) view of a contiguous x itself (its
        # flattened path; a matmul, which folds the same way, without b): one operator
        # instead of reshape, addmm, reshape.  (torch by lookup: x is a tensor, and an import
        # statement costs 0.2 us)
        if b is None:
            return x @ w
        torch = sys.modules["torch"]
        if torch.compiler.is_compiling():  # compiled under torch.func's grad, linear on a 3-D
            return x @ w + b  # input guards on its batch (a graph per batch size); these do not
        return torch.nn.functional.linear(x, w.mT, b)
    if is_torch(xp):  # a strided x: addmm on its (B T, d) copy
        torch = sys.modules["torch"]
        x2 = xp.reshape(x, (batch * t_m, d))
        h2 = x2 @ w if b is None else torch.addmm(b, x2, w)
        return xp.reshape(h2, (batch, t_m, w.shape[1]))
    # Other namespaces: the standard's broadcast matmul, which their libraries run as one
    # product (JAX's dot_general, CuPy's batched GEMM) and which keeps Dask's token chunks (its
    # reshape to (B T, d) rechunks them, and fails on an empty batch with chunked tokens)
    h = x @ w
    return h if b is None else h + b


# Named activations of many NumPy calls whatever the size (the exact GELU: about twenty)
_ONE_CALL_NUMPY = frozenset({"gelu", "gelu_tanh"})

# Pre-activations of at most this many elements in all take such an activation in one NumPy
# call (_activate).  Measured (float32 GELU, three (B, 50, 16) modalities, 2 cores): the one
# call took 0.83-0.85x the time of three at 2400 elements, 0.85-0.99x at 9600, 1.01-1.03x at
# 19200 and 76800, and 1.30-1.37x at 307200 (the concatenated copy and the result, each a
# fresh allocation of the whole size, no longer in cache)
_ONE_CALL_ELEMENTS = 1 << 14


def _activate(xp: Any, activation: Any, hs: list[Any]) -> list[Any]:
    """The activation on each modality's pre-activations.

    NumPy, with the GELU, up to :data:`_ONE_CALL_ELEMENTS` elements in all: one call on all
    modalities' pre-activations at once (concatenated flat, then split into views), not one
    per modality.  Its fixed cost is most of a small call (15 us of the tiny Wander call's
    30 per modality, ``benchmarks/overhead.py``); the concatenation is one pass against the
    GELU's own twenty.  Elementwise, so the same bits.
    """
    act = activation_fn(xp, activation)
    named = isinstance(activation, str) and activation in _ONE_CALL_NUMPY
    if len(hs) == 1 or not named or not is_numpy(xp) or sum(h.size for h in hs) > _ONE_CALL_ELEMENTS:
        return [act(h) for h in hs]
    import numpy as np

    # ndarray's reshape method: np.reshape's Python layer costs more than a small GELU's ufunc
    flat = act(np.concatenate([h.reshape(-1) for h in hs]))
    out, start = [], 0
    for h in hs:
        out.append(flat[start : start + h.size].reshape(h.shape))
        start += h.size
    return out


def residual_spans(lengths: Sequence[int], n_out: int) -> list[tuple[int, int, int]]:
    """(modality, tokens taken, output offset) of the first ``n_out`` tokens of inputs of
    ``lengths`` tokens concatenated along the token axis; a modality without tokens takes
    none and the next one goes on (the residual's rule, for every implementation)."""
    spans, at = [], 0
    for m, t_m in enumerate(lengths):
        if at >= n_out:
            break
        take = min(n_out - at, t_m)
        if take > 0:
            spans.append((m, take, at))
            at += take
    return spans


def first_tokens(xp: Any, xs: list[Any], n_out: int) -> Any:
    """The first ``n_out`` tokens of the inputs concatenated along the token axis."""
    if xs[0].shape[1] >= n_out:  # the first modality's alone (the released T_out = r <= T_0)
        return xs[0][:, :n_out, :]
    pieces = [xs[m][:, :take, :] for m, take, _ in residual_spans([x.shape[1] for x in xs], n_out)]
    if not pieces:  # (no output token)
        return xs[0][:, :0, :]
    return pieces[0] if len(pieces) == 1 else xp.concat(pieces, axis=1)


def wander(
    xs: list[Any],
    params: dict[str, Any],
    *,
    mode: str = "cp",
    masks: Any = None,
    activation: Any = "gelu",
    residual: str = "first",
) -> Any:
    """Down-project each modality, activate, fuse the token sequences, add the residual."""
    return wander_with(
        sequence_fusion, xs, params, mode=mode, masks=masks, activation=activation, residual=residual
    )


def wander_with(
    fuse: Callable[..., Any],
    xs: list[Any],
    params: dict[str, Any],
    *,
    mode: str,
    masks: Any,
    activation: Any,
    residual: str,
) -> Any:
    """The Wander adapter with the token-level fusion ``fuse`` (:func:`sequence_fusion`'s
    signature: the core's, or a backend's fused kernel): the down-projections, the
    activation and the residual are this function's, whatever runs the fusion.

    float16 / bfloat16: all of it in float32, rounded once (a pre-activation over float16's
    65504 is no overflow where the fused output is not, and every mode and activation gives
    the same values).
    """
    xp = array_namespace(xs[0])
    if low_precision(xp, xs[0].dtype):
        return in_work_dtype(
            wander_with, xp, xs[0].dtype, fuse, list(xs), dict(params), mode=mode, masks=masks,
            activation=in_own_dtype(xp, activation), residual=residual,
        )  # fmt: skip
    # padded tokens are zeroed before the down-projection too: a NaN there would otherwise
    # reach dL/dW as 0 * NaN (the residual still adds the raw tokens)
    inputs = xs if masks is None else [mask_tokens(xp, x, k) for x, k in zip(xs, masks)]
    down = params["down"]
    if is_dask(xp):  # the down-projections in one chunk each, as sequence_fusion's factors
        down = [tuple(one_chunk(pair)) for pair in down]
    feature, token = list(params["feature"]), list(params["token"])
    fused = lambda hs: fuse(hs, feature, token, mode=mode, masks=masks)  # noqa: E731
    return adapter(xp, xs, inputs, down, activation, residual, fused)


def adapter(
    xp: Any, xs: list[Any], inputs: list[Any], down: Any, activation: Any, residual: str,
    fuse: Callable[[list[Any]], Any],
) -> Any:  # fmt: skip
    """The adapter's steps on the token sequences ``inputs`` (``xs``, their padding zeroed):
    each one's down-projection ``down`` and ``activation``, then ``fuse`` (the activations'
    sequence fusion, (B, T_out, D)) and the ``residual`` from the raw ``xs``."""
    hs = [_down(xp, x, w, b) for x, (w, b) in zip(inputs, down)]
    y = fuse(_activate(xp, activation, hs))
    if residual == "first":
        y = y + first_tokens(xp, xs, y.shape[1])
    return y


# --------------------------------------------------------------------------- plans
#
# The public layer plans each call signature once (mmfuse._plan); these are the core's own
# plans for NumPy arrays (:func:`mmfuse._plan.planned_impl`).  A signature fixes the namespace,
# dtype, shapes and options, so the contraction orders are chosen once and a call runs
# fuse_collapsed / fuse_cp (and the adapter's steps) straight, without the entry functions'
# namespace, dtype, Dask and order look-ups (3-8% of benchmarks/overhead.py's tiny Wander call,
# 10-14% of a sequence fusion of its shapes: benchmarks/RESULTS.md, thirty-third session).
# float16 (computed in float32) and masked calls run the entry functions themselves.


def _numpy_plan_applies(h: Any, masks: Any) -> bool:
    """Whether a call on arrays like ``h`` runs planned: unmasked NumPy in its own dtype."""
    return type(h) is sys.modules["numpy"].ndarray and masks is None and h.dtype.itemsize >= 4


def _planned_fusion(
    h: Any, feature_factors: Any, token_factors: Any, mode: str
) -> Callable[[list[Any], Any, Any], Any]:
    """The fusion of NumPy activations of ``h``'s type and dtype, in the factors' shapes (the
    signature's), chosen once: ``fuse(hs, feature_factors, token_factors)``."""
    xp = array_namespace(h)
    r_h, _, out_dim = (int(n) for n in feature_factors[0].shape)
    r_t, _, n_out = (int(n) for n in token_factors[0].shape)
    lengths = tuple(int(t.shape[1]) for t in token_factors)
    ranks = tuple(int(f.shape[1]) for f in feature_factors)
    orders = plan(mode, lengths, ranks, r_h, r_t, n_out, out_dim).orders

    def collapsed(hs: list[Any], feature: Any, token: Any) -> Any:
        return fuse_collapsed(xp, hs, feature, token, orders)

    def cp(hs: list[Any], feature: Any, token: Any) -> Any:
        # the blocks per call (a cached look-up), as the unplanned call: the cache budget
        # CP_BLOCK_BYTES is read when it runs
        return fuse_cp(xp, hs, feature, token, orders, cp_block_shape(xp, hs[0], r_t, n_out, r_h, out_dim))

    return collapsed if mode == "collapsed" else cp


def _plan_sequence_fusion(hs: list[Any], feature_factors: Any, token_factors: Any, *, mode: str,
                          masks: Any = None) -> Callable[..., Any]:  # fmt: skip
    """:func:`sequence_fusion`'s own plan: see this section's comment."""
    if not _numpy_plan_applies(hs[0], masks):
        return sequence_fusion
    fuse = _planned_fusion(hs[0], feature_factors, token_factors, mode)
    return lambda hs, feature, token, *, masks=None, mode=mode: fuse(hs, feature, token)


def _plan_wander(xs: list[Any], params: Any, *, mode: str, masks: Any, activation: Any,
                 residual: str) -> Callable[..., Any]:  # fmt: skip
    """:func:`wander`'s own plan: see this section's comment.  (A pre-activation's shape is
    its input's with the width of its down-projection, which the signature fixes.)"""
    if not _numpy_plan_applies(xs[0], masks):
        return wander
    xp = array_namespace(xs[0])
    fuse = _planned_fusion(xs[0], params["feature"], params["token"], mode)

    def planned(xs: list[Any], params: Any, *, masks: Any, activation: Any, mode: str, residual: str) -> Any:
        feature, token = params["feature"], params["token"]
        return adapter(xp, xs, xs, params["down"], activation, residual, lambda hs: fuse(hs, feature, token))

    return planned


sequence_fusion.plan = _plan_sequence_fusion  # type: ignore[attr-defined]
wander.plan = _plan_wander  # type: ignore[attr-defined]
