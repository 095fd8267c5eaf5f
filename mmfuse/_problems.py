"""Random problems for every registered operator, shared by ``mmfuse verify`` and ``bench``.

Each generator returns ``(args, kwargs)`` in NumPy float64 (never zeros), ready for the public
function or, unchanged, for its :mod:`mmfuse.reference` twin.  ``scale="verify"`` gives small
problems with odd sizes; ``scale="bench"`` gives sizes where timings mean something.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["OPS", "make_problem"]


def _fusion_sizes(scale: str) -> tuple[int, tuple[int, ...], int, int]:
    if scale == "bench":
        return 4096, (32, 32, 128), 128, 16
    return 7, (3, 5, 2), 4, 3


def _lowrank(rng: np.random.Generator, scale: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    batch, dims, out_dim, rank = _fusion_sizes(scale)
    xs = [rng.standard_normal((batch, d)) for d in dims]
    factors = [rng.standard_normal((rank, d + 1, out_dim)) / np.sqrt(d + 1) for d in dims]
    weights = rng.standard_normal(rank)
    bias = rng.standard_normal(out_dim)
    present = rng.random((batch, len(dims))) < 0.8
    return (xs, factors, weights, bias), {"present": present}


def _cp(rng: np.random.Generator, scale: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    batch, dims, out_dim, rank = _fusion_sizes(scale)
    xs = [rng.standard_normal((batch, d)) for d in dims]
    factors = [rng.standard_normal((d + 1, rank)) / np.sqrt(d + 1) for d in dims]
    factors.append(rng.standard_normal((out_dim, rank)))
    return (xs, (rng.standard_normal(rank), factors), rng.standard_normal(out_dim)), {}


def _tensor(rng: np.random.Generator, scale: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    batch, dims, out_dim = (2048, (16, 16, 32), 32) if scale == "bench" else (7, (3, 5, 2), 4)
    xs = [rng.standard_normal((batch, d)) for d in dims]
    weight = rng.standard_normal((*(d + 1 for d in dims), out_dim)) / np.sqrt(np.prod(dims))
    return (xs, weight, rng.standard_normal(out_dim)), {}


def _tensor_terms(rng: np.random.Generator, scale: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    (xs, weight, _), _ = _tensor(rng, scale)
    return (xs, weight), {"by": "subset"}


def _lowrank_terms(rng: np.random.Generator, scale: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    (xs, factors, weights, _), kwargs = _lowrank(rng, scale)
    return (xs, factors, weights), {**kwargs, "by": "order"}


def _cp_terms(rng: np.random.Generator, scale: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    (xs, cp, _), _ = _cp(rng, scale)
    present = rng.random((xs[0].shape[0], len(xs))) < 0.8
    present[0] = True  # a sample with every modality: the top-order term is not zero everywhere
    return (xs, cp), {"by": "subset", "present": present}


def _sequence(rng: np.random.Generator, scale: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if scale == "bench":
        batch, lengths, ranks, out_len, out_dim, rh, rt = 256, (50, 50, 50), (16, 16, 16), 16, 40, 8, 12
    else:
        batch, lengths, ranks, out_len, out_dim, rh, rt = 3, (4, 6, 5), (3, 2, 4), 3, 5, 2, 3
    hs = [rng.standard_normal((batch, t, r)) for t, r in zip(lengths, ranks)]
    feature = [rng.standard_normal((rh, r, out_dim)) / np.sqrt(r) for r in ranks]
    token = [rng.standard_normal((rt, t, out_len)) / np.sqrt(t) for t in lengths]
    masks = [rng.random((batch, t)) < 0.85 for t in lengths]
    return (hs, feature, token), {"mode": "cp", "masks": masks}


def _wander(rng: np.random.Generator, scale: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    from ._sequence import init_wander

    if scale == "bench":
        batch, lengths, dim, rank, rh, rt = 256, (50, 50, 50), 40, 16, 8, 12
    else:
        batch, lengths, dim, rank, rh, rt = 3, (4, 6, 5), 5, 3, 2, 3
    xs = [rng.standard_normal((batch, t, dim)) for t in lengths]
    params = init_wander(
        [dim] * len(lengths), lengths, rank=rank, feature_rank=rh, token_rank=rt, out_dim=dim, seed=rng
    )
    # the trainable init zeroes one token factor; perturb it so every path is exercised
    params["token"] = [t + 0.1 * rng.standard_normal(t.shape) for t in params["token"]]
    return (xs, params), {"mode": "cp"}


def _stats_input(rng: np.random.Generator, scale: str, tokens: int) -> np.ndarray:
    batch, channels = (64, 256) if scale == "bench" else (3, 5)
    tokens = 512 if scale == "bench" else tokens
    return rng.standard_normal((batch, tokens, channels)) * rng.uniform(
        0.5, 3, channels
    ) + rng.standard_normal(channels)


def _moments(rng: np.random.Generator, scale: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return (_stats_input(rng, scale, 6),), {}


def _zoom_shift(rng: np.random.Generator, scale: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return (_stats_input(rng, scale, 6), _stats_input(rng, scale, 4)), {"alpha": 0.7}


def _align(rng: np.random.Generator, scale: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    xs = [_stats_input(rng, scale, t) for t in (6, 4, 5)]
    return (xs,), {"rounds": 3, "alpha": 0.6}


#: operator name -> problem generator
OPS: dict[str, Callable[[np.random.Generator, str], tuple[tuple[Any, ...], dict[str, Any]]]] = {
    "tensor_fusion": _tensor,
    "lowrank_fusion": _lowrank,
    "cp_fusion": _cp,
    "sequence_fusion": _sequence,
    "wander": _wander,
    "moments": _moments,
    "zoom_shift": _zoom_shift,
    "align": _align,
    "tensor_interactions": _tensor_terms,
    "lowrank_interactions": _lowrank_terms,
    "cp_interactions": _cp_terms,
}


def make_problem(
    op: str, *, seed: int | np.random.Generator | None = None, scale: str = "verify"
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A random problem for ``op`` (see :data:`OPS`)."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; valid ops: {sorted(OPS)}")
    return OPS[op](np.random.default_rng(seed), scale)
