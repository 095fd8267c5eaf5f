r"""The exact limit of Zoom-and-Shift rounds (``align(rounds=None)``), with eps > 0.

Every round maps each (sample, channel) of a modality affinely, so the rounds act on the
statistics alone: with :math:`\sigma = \sqrt{v + \varepsilon}` (v the raw, population
variance) a step of modality i towards target statistics :math:`(\mu_t, \sigma_t)` is

.. math:: \mu_i \leftarrow \mu_i + \alpha (\mu_t - \mu_i), \qquad
          v_i \leftarrow v_i\, (\sigma_t / \sigma_i)^{2\alpha},

and the composed map of all the rounds is :math:`y = \mu_i^\ast + S_i (x - \mu_i)` with
:math:`S_i = \sqrt{v_i^\ast / v_i}` (the variance is multiplied by :math:`S^2`).

**The means** follow a linear recursion that does not involve the variances, so their limit is
the eps = 0 closed form :math:`\mu^\ast = \sum_j w_j \mu_j` (:func:`limit_weights`) exactly.

**The variances** do not: sigma is re-measured with eps inside the square root every round.
In the coordinates :math:`y = \log(v / \varepsilon)` a step reads

.. math:: y_i \leftarrow y_i + \alpha (\bar g_{-i} - g(y_i)), \qquad
          g(y) = \log(1 + e^y) = \log(\sigma^2 / \varepsilon)

(:math:`\bar g_{-i}` the mean of the others' g for consensus, :math:`g(y_{hub})` for the hub),
and the rounds stop where all the :math:`g(y_j)`, hence all the variances, are equal.  Which
common variance they reach depends on the path, but each schedule has an exact invariant that
pins it down, so no round needs to be run:

- hub: the hub never moves, and g is increasing, so every modality ends at the hub's raw
  variance, :math:`v^\ast = v_{hub}`;
- Jacobi consensus: the changes of a round add up to zero, so :math:`\sum_j y_j` is
  invariant and :math:`v^\ast = (\prod_j v_j)^{1/M}`, the geometric mean of the raw
  variances (eps drops out);
- Gauss-Seidel consensus: a sweep (modalities in order j = 0..M-1, each seeing the values
  already updated) leaves

  .. math:: \Psi = \sum_j \Big(y_j - \tfrac{\alpha (M - 1 - j)}{M - 1}\, g(y_j)\Big)

  invariant (summing the M steps, the g-terms of every step telescope over a sweep; for
  eps = 0, g(y) = y up to a constant and this is the weighted average of
  :func:`limit_weights`).  At the limit all :math:`y_j = y^\ast` and
  :math:`\sum_j (M - 1 - j)/(M - 1) = M/2`, so :math:`y^\ast` solves the scalar equation

  .. math:: f(y) = y - \tfrac{\alpha}{2}\, g(y) - \Psi / M = 0.

  f is increasing and concave with :math:`f' = 1 - \tfrac\alpha2 \mathrm{sigmoid}(y) \ge
  \tfrac12` and :math:`|f''| \le \alpha / 8 \le \tfrac18`, so a Newton step maps an error e
  to at most :math:`e^2 / 8`.  The start :math:`y_0 = \psi / (1 - \alpha/2)` for
  :math:`\psi = \Psi / M > 0` and :math:`y_0 = \psi` otherwise is within
  :math:`\log 2` of the root (bound g between :math:`\max(y, 0)` and
  :math:`\max(y, 0) + \log 2`), so four steps reach 1e-16 (0.69 -> 0.06 -> 5e-4 -> 3e-8 ->
  1e-16); we take :data:`NEWTON_STEPS` = 6.

**Why a closed form and a fixed Newton count instead of running the recursion until it
stops.**  Near the limit the recursion contracts like the eps = 0 one with alpha replaced by
:math:`\alpha\, v^\ast / (v^\ast + \varepsilon)`: for spreads well below
:math:`\sqrt\varepsilon` it needs of the order of :math:`\varepsilon / (\alpha v^\ast)` rounds
(millions for spreads near 1e-5 at the default eps), and a loop that stops when the values
stop moving cannot run on lazy arrays (Dask, traced JAX), where values cannot be branched on.
The invariants make the limit a fixed, short sequence of elementwise operations on the
(B, 1, C) statistics, the same on every namespace, eager or lazy, and differentiable (torch
autograd flows through the Newton steps; at the root they give the implicit derivative to
rounding).  The NumPy reference runs the recursion itself until it stops moving, which the
tests compare with this.

**Zero variance.**  A (sample, channel) with ``v = 0`` keeps ``v = 0`` and
:math:`\sigma = \sqrt\varepsilon` forever, which pulls the others' sigma to
:math:`\sqrt\varepsilon` (consensus, or a hub with no spread): their raw variance tends to 0
(slowly, like 1/k after k rounds), so the exact limit collapses them, ``S = 0``.  The zero-spread
modality's own S grows without bound but multiplies deviations that are exactly zero; we return
``S = 1`` for it (as :func:`mmfuse._core.align.zoom_scale` does for a channel with no spread), so
its output is its tokens shifted to the common mean, and finite.

Only standard Array-API functions (``log``, ``exp``, ``log1p``, ``sqrt``, ``where``) touch the
statistics; Python branches depend on the options alone.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["NEWTON_STEPS", "limit_maps", "solve_gauss_seidel"]

# Newton steps for the Gauss-Seidel consensus limit: four reach 1e-16 from the start used
# (module docstring); two more cover rounding of a float32 start.
NEWTON_STEPS = 6


def _softplus(xp: Any, y: Any) -> Any:
    """``log(1 + exp(y))`` without overflow: ``max(y, 0) + log1p(exp(-|y|))``."""
    return xp.where(y > 0, y, 0.0) + xp.log1p(xp.exp(-xp.abs(y)))


def solve_gauss_seidel(xp: Any, psi: Any, alpha: float) -> Any:
    r"""The root of :math:`y - \frac\alpha2 \log(1 + e^y) = \psi`, elementwise.

    A fixed number of Newton steps from a start within log 2 of the root (module docstring:
    the error is squared and divided by at least 8 per step), so no value is branched on.
    """
    half = alpha / 2.0
    y = xp.where(psi > 0, psi / (1.0 - half), psi)
    for _ in range(NEWTON_STEPS):
        sp = _softplus(xp, y)
        slope = 1.0 - half * xp.exp(y - sp)  # 1 - (alpha/2) sigmoid(y), in [1/2, 1]
        y = y - (y - half * sp - psi) / slope
    return y


def limit_maps(
    xp: Any,
    means: list[Any],
    variances: list[Any],
    weights: tuple[float, ...],
    *,
    alpha: float,
    schedule: str,
    topology: str,
    hub: int,
    eps: float,
) -> list[tuple[Any, Any, bool]]:
    r"""Per modality ``(S, mu*, moved)``: the limit of the rounds is ``S (x - mu) + mu*``.

    Parameters
    ----------
    xp
        The statistics' namespace.
    means, variances : list of arrays
        Each modality's per-(sample, channel) mean and raw (population) variance, all of one
        shape and dtype.
    weights : tuple of float
        The limit weights of the means, :func:`mmfuse._core.align.limit_weights` (exact for
        the means at every eps).
    alpha, schedule, topology, hub, eps
        The options of :func:`mmfuse.align` (already validated; ``hub`` non-negative).

    Returns
    -------
    list of tuple
        ``(S, mu*, moved)`` per modality, with :math:`S_i = \sqrt{v^\ast / v_i}`; ``moved``
        is False for the hub (``S = 1`` exactly, and its own mean in place of mu*: the
        identity).

    Notes
    -----
    The common limit variance :math:`v^\ast` per (sample, channel) (module docstring):
    :math:`v_{hub}` for the hub topology, :math:`(\prod_j v_j)^{1/M}` for Jacobi consensus,
    and for Gauss-Seidel consensus :math:`\varepsilon e^{y^\ast}` with :math:`y^\ast` the root
    of :math:`y - \frac\alpha2 \log(1 + e^y) = \Psi / M`,
    :math:`\Psi = \sum_j (y_j - \frac{\alpha (M - 1 - j)}{M - 1} \log(1 + e^{y_j}))`,
    :math:`y_j = \log(v_j / \varepsilon)`.  For eps = 0 that root is the weighted average
    :math:`\sum_j w_j \log v_j`, the closed form of the eps = 0 theory, which is used as such.
    """
    n = len(means)
    mu_star: Any = 0.0
    for wj, mu in zip(weights, means):
        # A zero weight under the hub topology must not turn a non-finite mean into NaN (the
        # hub never reads the others).  Consensus rounds read every modality, those of zero
        # weight too (Gauss-Seidel at alpha = 1: the first): a non-finite mean there makes
        # every modality NaN from the first round on, and 0 * mu keeps that.
        if wj != 0.0 or topology != "hub":
            mu_star = mu_star + wj * mu
    dead = [v == 0 for v in variances]  # no spread: such a variance stays 0 in every round
    if topology == "hub":
        collapse = dead[hub]
        # sqrt(v_hub / v_i) as a ratio of spreads (exp of the logs' difference, as below,
        # carried their rounding, an ulp of |log v|: 88 ulps of the output at spreads of 1e100)
        hub_spread = xp.sqrt(xp.where(collapse, 1.0, variances[hub]))

        def scale(i: int) -> Any:
            return hub_spread / xp.sqrt(xp.where(dead[i], 1.0, variances[i]))

    else:
        # log of the variance with 1 where it is 0, so that no -inf or NaN enters (nor, on
        # torch, its gradient); those entries are overwritten below.  NaN variances stay NaN.
        logv = [xp.log(xp.where(d, 1.0, v)) for d, v in zip(dead, variances)]
        collapse = dead[0]
        for d in dead[1:]:
            collapse = xp.logical_or(collapse, d)
        if schedule == "jacobi" or eps == 0:
            # Jacobi: sum_j log v_j is invariant (weights 1/M); eps = 0: the linear theory
            log_w = weights if schedule != "jacobi" else tuple(1.0 / n for _ in range(n))
            log_star: Any = 0.0
            for wj, lv in zip(log_w, logv):
                # (zero weights skipped: a NaN or infinite token already makes mu* NaN above,
                # while an infinite log-variance of finite data, a float32 variance past its
                # range, must not: the rest keep the reference's values)
                if wj != 0.0:
                    log_star = log_star + wj * lv
        else:
            log_eps = math.log(eps)
            ys = [lv - log_eps for lv in logv]
            psi: Any = 0.0
            for j, y in enumerate(ys):
                psi = psi + (y - (alpha * (n - 1 - j) / (n - 1)) * _softplus(xp, y))
            log_star = solve_gauss_seidel(xp, psi / n, alpha) + log_eps

        def scale(i: int) -> Any:
            return xp.exp((log_star - logv[i]) / 2.0)  # sqrt(v* / v_i), without forming the variances

    maps = []
    for i, (mu, d) in enumerate(zip(means, dead)):
        if topology == "hub" and i == hub:
            maps.append((xp.ones_like(mu), mu, False))
            continue
        s = xp.where(d, 1.0, xp.where(collapse, 0.0, scale(i)))
        maps.append((s, mu_star, True))
    return maps
