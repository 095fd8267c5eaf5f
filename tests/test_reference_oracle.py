"""The float64 reference (``mmfuse.reference``, the oracle) against computations that share
nothing with it or with the core: hand-written loops over samples, ranks and tokens,
TensorLy's ``cp_to_tensor``, the naive sequence fusion of ``naive_sequence``, ``np.var`` and
closed forms.  Elsewhere most reference functions are only compared with the core, so a
misreading of the maths shared by the two would go unnoticed (a mutation review's find)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import tensorly as tl
from naive_sequence import naive_sequence_fusion

import mmfuse.reference as ref

RTOL, ATOL = 1e-12, 1e-12


def _close(got, want):
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------- fusion


def _naive_lmf(xs, factors, weights, present=None):
    """sum_r w_r prod_m ([x_m; 1] . F_m[r]) per sample; an absent modality as [0, ..., 0, 1]."""
    batch, (rank, _, out_dim) = xs[0].shape[0], factors[0].shape
    out = np.zeros((batch, out_dim))
    for b in range(batch):
        for r in range(rank):
            term = weights[r] * np.ones(out_dim)
            for m, (x, f) in enumerate(zip(xs, factors)):
                feats = x[b] if present is None or present[b, m] else np.zeros_like(x[b])
                term = term * (np.append(feats, 1.0) @ f[r])
            out[b] += term
    return out


def _lmf_problem(rng, dims=(2, 3, 1), rank=3, out_dim=2, batch=4):
    xs = [rng.standard_normal((batch, d)) for d in dims]
    factors = [rng.standard_normal((rank, d + 1, out_dim)) for d in dims]
    weights = rng.standard_normal(rank)
    present = rng.random((batch, len(dims))) > 0.5
    present[0] = [True, False, True]  # at least one absent and one present modality
    present[1] = [False, True, False]
    return xs, factors, weights, present


def test_lowrank_fusion_matches_a_naive_loop_with_weights_and_present(rng):
    """LMF's rank weights multiply every rank's product, and an absent modality enters as
    [0, ..., 0, 1] (a mutation review's find: the reference dropping the weights or ignoring
    ``present`` went unnoticed)."""
    xs, factors, weights, present = _lmf_problem(rng)
    bias = rng.standard_normal(2)
    _close(ref.lowrank_fusion(xs, factors, weights, bias, present=present),
           _naive_lmf(xs, factors, weights, present) + bias)
    _close(ref.lowrank_fusion(xs, factors, weights), _naive_lmf(xs, factors, weights))
    _close(ref.lowrank_fusion(xs, factors), _naive_lmf(xs, factors, np.ones(3)))


def test_lowrank_to_tensor_matches_tensorly_slices(rng):
    """W[..., k] is TensorLy's CP tensor of the rank weights and the factors' k-th slices
    (a mutation review's find: the weights dropped from ``lowrank_to_tensor``)."""
    _, factors, weights, _ = _lmf_problem(rng)
    out_dim = factors[0].shape[-1]
    want = np.stack(
        [tl.cp_to_tensor((weights, [f[:, :, k].T for f in factors])) for k in range(out_dim)], axis=-1
    )
    _close(ref.lowrank_to_tensor(factors, weights), want)
    _close(ref.cp_to_tensor((weights, [f[:, :, 0].T for f in factors])), want[..., 0])


def test_cp_to_lowrank_rebuilds_tensorlys_tensor(rng):
    """lowrank_to_tensor(cp_to_lowrank(cp)) is tl.cp_to_tensor(cp), with the CP weights kept and
    the output factor taken once (a mutation review's find: the weights dropped, or c_r in every
    modality's factor)."""
    rank = 3
    cp = (rng.standard_normal(rank), [rng.standard_normal((n, rank)) for n in (3, 2, 4, 2)])
    factors, weights = ref.cp_to_lowrank(cp)
    _close(ref.lowrank_to_tensor(factors, weights), tl.cp_to_tensor(cp))
    _close(ref.cp_to_tensor(cp), tl.cp_to_tensor(cp))


# --------------------------------------------------------------------------- interactions


def _naive_lowrank_subset(xs, factors, weights, s, b, present=None):
    """T_S[b] = sum_r w_r prod_{m in S} (x_m . F_m[r, :d_m]) prod_{m not in S} F_m[r, d_m]."""
    rank, _, out_dim = factors[0].shape
    total = np.zeros(out_dim)
    for r in range(rank):
        term = weights[r] * np.ones(out_dim)
        for m, (x, f) in enumerate(zip(xs, factors)):
            d = x.shape[1]
            if m in s:
                feats = x[b] if present is None or present[b, m] else np.zeros(d)
                term = term * (feats @ f[r, :d])
            else:
                term = term * f[r, d]
        total += term
    return total


def test_lowrank_interactions_match_naive_terms_and_sum_to_naive_lmf(rng):
    """Each LMF subset term by hand (the constant's row is each factor's LAST), and the terms'
    sum is the naive LMF with rank weights and ``present`` (a mutation review's find: the
    constant's row, the rank weights and ``present`` unchecked in the reference's terms)."""
    xs, factors, weights, present = _lmf_problem(rng)
    labels = list(itertools.chain.from_iterable(itertools.combinations(range(3), k) for k in range(4)))
    for pres in (None, present):
        terms, got_labels = ref.lowrank_interactions(xs, factors, weights, by="subset", present=pres)
        assert [tuple(s) for s in got_labels] == labels
        want = np.array([[_naive_lowrank_subset(xs, factors, weights, s, b, pres) for b in range(4)]
                         for s in labels])
        _close(terms, want)
        orders, _ = ref.lowrank_interactions(xs, factors, weights, by="order", present=pres)
        _close(orders.sum(axis=0), _naive_lmf(xs, factors, weights, pres))
        _close(orders[0][0], sum(weights[r] * np.prod([f[r, -1] for f in factors], axis=0) for r in range(3)))


def _sub_block_term(weight, xs, s, b):
    """W's sub-block (the modes of S over the features, the others at the constant's index,
    the last) contracted with the features of S."""
    index = tuple(slice(0, x.shape[1]) if m in s else -1 for m, x in enumerate(xs))
    block = weight[index]
    for m in s:
        block = np.tensordot(xs[m][b], block, axes=(0, 0))
    return block


def test_tensor_and_cp_interactions_are_weight_sub_blocks(rng):
    """T_S of TFN is W's sub-block contracted with the features of S, and of CP the same for
    TensorLy's tensor with absent modalities' features zeroed (a mutation review's find: the
    constant read from the first row went unnoticed in the reference)."""
    dims, batch = (2, 1, 3), 3
    xs = [rng.standard_normal((batch, d)) for d in dims]
    weight = rng.standard_normal((*(d + 1 for d in dims), 2))
    terms, labels = ref.tensor_interactions(xs, weight, by="subset")
    for s, t in zip(labels, terms):
        _close(t, np.stack([_sub_block_term(weight, xs, s, b) for b in range(batch)]))
    cp = (rng.standard_normal(2), [rng.standard_normal((d + 1, 2)) for d in dims] + [rng.standard_normal((2, 2))])
    present = np.array([[True, False, True], [False, True, True], [True, True, False]])
    zeroed = [np.where(present[:, m : m + 1], x, 0.0) for m, x in enumerate(xs)]
    full = tl.cp_to_tensor(cp)
    terms, labels = ref.cp_interactions(xs, cp, by="subset", present=present)
    for s, t in zip(labels, terms):
        _close(t, np.stack([_sub_block_term(full, zeroed, s, b) for b in range(batch)]))


# --------------------------------------------------------------------------- sequence


def _sequence_problem(rng, tokens=(3, 2), ranks=(2, 3), out_tokens=3, out_dim=4, batch=2):
    hs = [rng.standard_normal((batch, t, r)) for t, r in zip(tokens, ranks)]
    feature = [rng.standard_normal((2, r, out_dim)) for r in ranks]
    token = [rng.standard_normal((3, t, out_tokens)) for t in tokens]
    masks = [rng.random((batch, t)) > 0.4 for t in tokens]
    for m in masks:
        m[:, 0] = True
        m[0, -1] = False  # a padded token in every modality
    return hs, feature, token, masks


@pytest.mark.parametrize("mode", ["cp", "collapsed"])
def test_sequence_fusion_matches_naive_sequence(mode, rng):
    """Both modes, with masks, against the term-by-term definition: ranks summed (not averaged)
    in collapsed mode, token axes in order (a mutation review's find: the reference was only
    compared with the core)."""
    hs, feature, token, masks = _sequence_problem(rng)
    _close(ref.sequence_fusion(hs, feature, token, mode=mode, masks=masks),
           naive_sequence_fusion(hs, feature, token, masks, mode))
    _close(ref.sequence_fusion(hs, feature, token, mode=mode), naive_sequence_fusion(hs, feature, token, None, mode))


def _gelu(v):
    return v * 0.5 * (1.0 + math.erf(v / math.sqrt(2.0)))


def test_wander_matches_a_hand_loop(rng):
    """Down-project, add the bias, exact GELU (math.erf), fuse, add the first T_out tokens of
    the concatenated inputs (a mutation review's find: the bias after the activation and the
    residual's last tokens went unnoticed)."""
    dims, tokens, ranks, out_tokens, batch = (4, 4), (3, 2), (2, 3), 3, 2
    xs = [rng.standard_normal((batch, t, d)) for t, d in zip(tokens, dims)]
    down = [(rng.standard_normal((d, r)), rng.standard_normal(r)) for d, r in zip(dims, ranks)]
    feature = [rng.standard_normal((2, r, dims[0])) for r in ranks]
    token = [rng.standard_normal((2, t, out_tokens)) for t in tokens]
    masks = [np.array([[True, True, False], [True, False, True]]), np.array([[True, False], [True, True]])]
    hs = []
    for x, (w, bias), mask in zip(xs, down, masks):
        h = np.zeros((batch, x.shape[1], w.shape[1]))
        for b in range(batch):
            for t in range(x.shape[1]):
                if mask[b, t]:
                    h[b, t] = [_gelu(v) for v in x[b, t] @ w + bias]
        hs.append(h)
    want = naive_sequence_fusion(hs, feature, token)
    for b in range(batch):
        stacked = [x[b, t] for x in xs for t in range(x.shape[1])]  # the tokens concatenated
        for t in range(out_tokens):
            want[b, t] += stacked[t]
    got = ref.wander(xs, {"down": down, "feature": feature, "token": token}, masks=masks)
    _close(got, want)


# --------------------------------------------------------------------------- alignment


EPS = 1e-5


def _mom(a, mask=None, eps=EPS):
    """Per sample and channel over unmasked tokens: mean and sqrt(np.var(ddof=0) + eps)."""
    mu, sd = np.zeros((a.shape[0], 1, a.shape[2])), np.zeros((a.shape[0], 1, a.shape[2]))
    for b in range(a.shape[0]):
        v = a[b] if mask is None else a[b][mask[b]]
        mu[b, 0], sd[b, 0] = v.mean(axis=0), np.sqrt(np.var(v, axis=0, ddof=0) + eps)
    return mu, sd


def _zs(x, mu_t, sd_t, alpha, mask=None):
    """mu_x + (x - mu_x) (sigma_t / sigma_x)^alpha + alpha (mu_t - mu_x)."""
    mu, sd = _mom(x, mask)
    return mu + (x - mu) * (sd_t / sd) ** alpha + alpha * (mu_t - mu)


def _align_data(rng, tokens=(6, 5, 4), batch=2, channels=3):
    return [rng.standard_normal((batch, 1, channels)) * 2 + rng.uniform(0.3, 3.0, (batch, 1, channels))
            * rng.standard_normal((batch, t, channels)) for t in tokens]


def _align_mask(batch=2, t=6):
    mask = np.ones((batch, t), dtype=bool)
    mask[0, 4:] = False
    mask[1, 0] = False
    return mask


@pytest.mark.parametrize("eps", [EPS, 0.3])
def test_moments_with_masks_match_np_var(eps, rng):
    """mean over unmasked tokens, sqrt(np.var(ddof=0) + eps): eps inside the square root
    (a mutation review's find)."""
    x = _align_data(rng)[0]
    mask = _align_mask()
    mu, sd = ref.moments(x, mask=mask, eps=eps)
    want_mu, want_sd = _mom(x, mask, eps)
    _close(mu, want_mu)
    _close(sd, want_sd)


def test_zoom_shift_at_alpha_below_one_is_its_closed_form(rng):
    """zoom_shift(x, g, alpha) = mu_x + (x - mu_x) (sigma_g / sigma_x)^alpha + alpha (mu_g - mu_x)
    at alpha = 0.3 (a mutation review's find: a full shift, or the power dropped, went unnoticed)."""
    x, g, _ = _align_data(rng)
    mg, sg = _mom(g)
    _close(ref.zoom_shift(x, g, alpha=0.3), _zs(x, mg, sg, 0.3))


def test_one_round_of_align_with_two_modalities_by_hand(rng):
    """Gauss-Seidel: x toward g, then g toward the new x; Jacobi: both toward the other's old
    statistics (a mutation review's find: the two schedules swapped went unnoticed)."""
    x, g, _ = _align_data(rng)
    a = 0.3
    mx, sx = _mom(x)
    mg, sg = _mom(g)
    x1 = _zs(x, mg, sg, a)
    m1, s1 = _mom(x1)
    got = ref.align([x, g], rounds=1, alpha=a)
    _close(got[0], x1)
    _close(got[1], _zs(g, m1, s1, a))
    got = ref.align([x, g], rounds=1, alpha=a, schedule="jacobi")
    _close(got[0], x1)
    _close(got[1], _zs(g, mx, sx, a))


@pytest.mark.parametrize("schedule", ["gauss-seidel", "jacobi"])
def test_one_consensus_round_of_three_modalities_by_hand(schedule, rng):
    """Each modality toward the arithmetic mean of the others' means and the geometric mean of
    their sigmas, reading the latest (Gauss-Seidel) or the previous round's (Jacobi) values
    (a mutation review's find: an arithmetic mean of the sigmas went unnoticed)."""
    xs = _align_data(rng)
    a = 0.6
    cur = list(xs)
    for i in range(3):
        read = cur if schedule == "gauss-seidel" else xs
        stats = [_mom(read[j]) for j in range(3) if j != i]
        mu_t = (stats[0][0] + stats[1][0]) / 2
        sd_t = np.sqrt(stats[0][1] * stats[1][1])
        cur[i] = _zs(xs[i], mu_t, sd_t, a)
    got = ref.align(xs, rounds=1, alpha=a, schedule=schedule)
    for y, want in zip(got, cur):
        _close(y, want)


def test_zoom_shift_fusion_mean_pools_unmasked_tokens_and_averages(rng):
    """Mean pooling over each sample's unmasked tokens and fuse="mean" the average of the
    pooled modalities, after one aligned round by hand (a mutation review's find)."""
    x, g, _ = _align_data(rng)
    mask = _align_mask()
    mg, sg = _mom(g)
    y0 = _zs(x, mg, sg, 1.0, mask)
    m0, s0 = _mom(y0, mask)
    y1 = _zs(g, m0, s0, 1.0)
    p0 = np.stack([np.mean(y0[b][mask[b]], axis=0) for b in range(2)])
    p1 = np.stack([np.mean(y1[b], axis=0) for b in range(2)])
    got = ref.zoom_shift_fusion([x, g], fuse="mean", pool="mean", rounds=1, alpha=1.0, masks=[mask, None])
    _close(got, (p0 + p1) / 2)
    got = ref.zoom_shift_fusion([x, g], fuse="sum", pool="max", rounds=1, alpha=1.0, masks=[mask, None])
    _close(got, np.stack([np.max(y0[b][mask[b]], axis=0) for b in range(2)]) + y1.max(axis=1))
