"""PyTorch layers over mmfuse's fusion operators.

Each layer owns its parameters (registered ``nn.Parameter`` / ``nn.ParameterList``), takes
``device`` and ``dtype`` like ``torch.nn.Linear``, has ``reset_parameters`` and an
``extra_repr``, and its ``forward`` takes a sequence of per-modality tensors.  Inputs are checked
at the layer boundary (count, shapes, dtypes; the message names the modality).

In eager mode ``forward`` calls the functional API (:func:`mmfuse.lowrank_fusion`, ...), so the
backend policy (``backend=`` config, ``MMFUSE_BACKEND``) applies; under ``"auto"`` the
``mmfuse::*`` custom operators of :mod:`mmfuse.backends.torch` run.  Under ``torch.compile``
the layers call those custom operators directly (the functional layer's namespace dispatch is
Python that Dynamo need not trace), so ``torch.compile(layer, fullgraph=True)`` works.

Importing this module imports torch.

Examples
--------
>>> import torch
>>> from mmfuse.nn import LowRankFusion
>>> layer = LowRankFusion([32, 16], out_dim=8, rank=4)
>>> layer([torch.randn(5, 32), torch.randn(5, 16)]).shape
torch.Size([5, 8])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from . import _fusion
from ._fusion import DEFAULT_MAX_ELEMENTS
from .backends import torch as _ops  # registers the mmfuse::* custom operators

__all__ = ["CPFusion", "LowRankFusion", "TensorFusion"]


def _compiling() -> bool:
    return bool(torch.compiler.is_compiling())


def _fmt(shape: Sequence[Any]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _check_dims(in_dims: Sequence[int]) -> tuple[int, ...]:
    if isinstance(in_dims, int) or not isinstance(in_dims, Sequence):
        raise TypeError(
            f"in_dims must be a sequence of ints (one per modality), got {type(in_dims).__name__}"
        )
    dims = tuple(int(d) for d in in_dims)
    if not dims:
        raise ValueError("in_dims must hold at least 1 modality, got 0")
    for m, d in enumerate(dims):
        if d < 1:
            raise ValueError(f"in_dims[{m}] must be a positive integer, got {d}")
    return dims


def _check_positive(name: str, value: int) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_inputs(
    xs: Any, in_dims: tuple[int, ...], dtype: torch.dtype, present: Any, layer: str
) -> list[torch.Tensor]:
    """Layer-boundary checks: count, tensor-ness, 2-D shape, feature sizes, dtype, batch."""
    if isinstance(xs, torch.Tensor) or not isinstance(xs, (list, tuple)):
        raise TypeError(
            f"{layer}: xs must be a list or tuple of tensors (one per modality), got {type(xs).__name__}"
        )
    n = len(in_dims)
    if len(xs) != n:
        raise ValueError(
            f"{layer}: expected {n} modalities (in_dims={list(in_dims)}), got {len(xs)} input tensors"
        )
    for m, x in enumerate(xs):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{layer}: xs[{m}] must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != in_dims[m]:
            raise ValueError(
                f"{layer}: xs[{m}] must have shape (B, {in_dims[m]}), got {_fmt(x.shape)}"
            )
        if x.dtype != dtype:
            raise TypeError(
                f"{layer}: xs[{m}] has dtype {x.dtype} but the layer's parameters have dtype "
                f"{dtype}; cast the input or the layer (layer.to(dtype))"
            )
    batch = xs[0].shape[0]
    for m, x in enumerate(xs):
        if x.shape[0] != batch:
            raise ValueError(
                f"{layer}: xs[{m}] has batch size {x.shape[0]} (shape {_fmt(x.shape)}) but xs[0] "
                f"has batch size {batch} (shape {_fmt(xs[0].shape)})"
            )
    if present is not None:
        if not isinstance(present, torch.Tensor) or present.dtype != torch.bool:
            raise TypeError(f"{layer}: present must be a boolean tensor of shape (B, M)")
        if tuple(present.shape) != (batch, n):
            raise ValueError(
                f"{layer}: present must have shape (B, M) = ({batch}, {n}), got {_fmt(present.shape)}"
            )
    return list(xs)


def _factory(device: Any, dtype: Any) -> dict[str, Any]:
    return {"device": device, "dtype": dtype}


# --------------------------------------------------------------------------- LowRankFusion


class LowRankFusion(nn.Module):
    r"""Low-rank Multimodal Fusion (LMF, Liu et al. 2018, Eq. 8) as a layer.

    Parameters
    ----------
    in_dims : sequence of int
        Feature sizes d_m of the M modalities.
    out_dim : int
        Output size h.
    rank : int
        R.
    append_one : bool, default True
        Append the constant 1 to each modality (last); factors then have d_m + 1 rows.
    bias : bool, default True
        Learn an additive bias (h,).
    device, dtype : optional
        Of the parameters.

    Attributes
    ----------
    factors : nn.ParameterList of M tensors, shapes (R, d_m + 1, h)
    weights : nn.Parameter, shape (R,)
    bias : nn.Parameter, shape (h,), or None

    Notes
    -----
    ``forward(xs, present=None)`` returns
    :math:`\sum_r w_r \prod_m (\hat x_m W_m^{(r)}) + b`, shape (B, h); see
    :func:`mmfuse.lowrank_fusion`.  ``reset_parameters`` draws factors
    :math:`\mathcal N(0, 1/(d_m+1))`, sets weights to 1/R and the bias to zero, the scheme of
    :func:`mmfuse.init_lowrank` (LMF's released code uses Xavier-normal factors and weights).
    Load LMF's released weights with :meth:`from_lmf`.
    """

    def __init__(
        self,
        in_dims: Sequence[int],
        out_dim: int,
        rank: int,
        *,
        append_one: bool = True,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        fk = _factory(device, dtype)
        self.in_dims = _check_dims(in_dims)
        self.out_dim = _check_positive("out_dim", out_dim)
        self.rank = _check_positive("rank", rank)
        self.append_one = bool(append_one)
        extra = int(self.append_one)
        self.factors = nn.ParameterList(
            [nn.Parameter(torch.empty(self.rank, d + extra, self.out_dim, **fk)) for d in self.in_dims]
        )
        self.weights = nn.Parameter(torch.empty(self.rank, **fk))
        if bias:
            self.bias: nn.Parameter | None = nn.Parameter(torch.empty(self.out_dim, **fk))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for f in self.factors:
                nn.init.normal_(f, 0.0, 1.0 / math.sqrt(f.shape[1]))
            self.weights.fill_(1.0 / self.rank)
            if self.bias is not None:
                self.bias.zero_()

    def extra_repr(self) -> str:
        return (
            f"in_dims={list(self.in_dims)}, out_dim={self.out_dim}, rank={self.rank}, "
            f"append_one={self.append_one}, bias={self.bias is not None}"
        )

    def forward(self, xs: Sequence[torch.Tensor], present: torch.Tensor | None = None) -> torch.Tensor:
        xs = _check_inputs(xs, self.in_dims, self.weights.dtype, present, type(self).__name__)
        factors = list(self.factors)
        if _compiling():
            return torch.ops.mmfuse.lowrank_fusion(
                xs, factors, self.weights, self.bias, self.append_one, present
            )
        return _fusion.lowrank_fusion(
            xs, factors, self.weights, self.bias, append_one=self.append_one, present=present
        )

    @classmethod
    def from_lmf(
        cls,
        factors: Sequence[torch.Tensor],
        fusion_weights: torch.Tensor,
        fusion_bias: torch.Tensor,
        *,
        device: Any = None,
        dtype: Any = None,
    ) -> LowRankFusion:
        r"""A layer computing exactly the fusion of LMF's released code (Liu et al., 2018).

        Parameters
        ----------
        factors : sequence of M tensors, shapes (R, d_m + 1, h)
            LMF's modality factors in its order of modalities, e.g.
            ``[state["audio_factor"], state["video_factor"], state["text_factor"]]``.  In LMF's
            layout the constant's row is row 0 (LMF prepends the 1); it is moved to the end.
        fusion_weights : tensor, shape (1, R)
        fusion_bias : tensor, shape (1, h)
        device, dtype : optional
            Default: those of ``factors[0]``.

        Returns
        -------
        LowRankFusion
            With ``append_one=True``; ``layer(xs)`` equals LMF's
            ``matmul(fusion_weights, prod_m matmul([1, x_m], factor_m).permute(1, 0, 2))
            .squeeze() + fusion_bias`` viewed as (B, h).

        Raises
        ------
        ValueError
            Shapes not in LMF's layout.
        """
        factors = list(factors)
        if not factors:
            raise ValueError("factors must hold at least 1 modality factor, got 0")
        for m, f in enumerate(factors):
            if f.dim() != 3 or f.shape[1] < 2:
                raise ValueError(
                    f"factors[{m}] must have LMF's shape (R, d_m + 1, h), got {_fmt(f.shape)}"
                )
        rank, _, out_dim = factors[0].shape
        for m, f in enumerate(factors):
            if f.shape[0] != rank or f.shape[2] != out_dim:
                raise ValueError(
                    f"factors[{m}] has shape {_fmt(f.shape)} but factors[0] has {_fmt(factors[0].shape)}; "
                    "rank R and output size h must match"
                )
        if tuple(fusion_weights.shape) != (1, rank):
            raise ValueError(
                f"fusion_weights must have shape (1, R) = (1, {rank}), got {_fmt(fusion_weights.shape)}"
            )
        if tuple(fusion_bias.shape) != (1, out_dim):
            raise ValueError(
                f"fusion_bias must have shape (1, h) = (1, {out_dim}), got {_fmt(fusion_bias.shape)}"
            )
        device = factors[0].device if device is None else device
        dtype = factors[0].dtype if dtype is None else dtype
        layer = cls([f.shape[1] - 1 for f in factors], int(out_dim), int(rank), device=device, dtype=dtype)
        with torch.no_grad():
            for mine, f in zip(layer.factors, factors):
                # LMF's row 0 multiplies its prepended constant; ours is the last row.
                mine.copy_(torch.cat([f[:, 1:, :], f[:, :1, :]], dim=1))
            layer.weights.copy_(fusion_weights.reshape(rank))
            assert layer.bias is not None
            layer.bias.copy_(fusion_bias.reshape(out_dim))
        return layer


# --------------------------------------------------------------------------- CPFusion


class CPFusion(nn.Module):
    r"""TFN whose weight tensor is a learned CP decomposition (TensorLy layout) as a layer.

    Parameters
    ----------
    in_dims : sequence of int
        Feature sizes d_m.
    out_dim : int
        h.
    rank : int
        R.
    append_one : bool, default True
    bias : bool, default True
    device, dtype : optional

    Attributes
    ----------
    weights : nn.Parameter, shape (R,)
    factors : nn.ParameterList, ``[A_1 (d_1 + 1, R), ..., A_M (d_M + 1, R), C (h, R)]``
    bias : nn.Parameter (h,) or None

    Notes
    -----
    ``forward(xs, present=None)`` returns :math:`C (w \odot \prod_m A_m^\top \hat x_m) + b`
    (:func:`mmfuse.cp_fusion`).  ``reset_parameters``: :math:`A_m \sim \mathcal N(0, 1/(d_m+1))`,
    :math:`C \sim \mathcal N(0, 1/R)`, weights one, bias zero.  :meth:`from_cp` loads a
    ``tensorly`` CPTensor or a ``(weights, factors)`` pair.
    """

    def __init__(
        self,
        in_dims: Sequence[int],
        out_dim: int,
        rank: int,
        *,
        append_one: bool = True,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        fk = _factory(device, dtype)
        self.in_dims = _check_dims(in_dims)
        self.out_dim = _check_positive("out_dim", out_dim)
        self.rank = _check_positive("rank", rank)
        self.append_one = bool(append_one)
        extra = int(self.append_one)
        self.weights = nn.Parameter(torch.empty(self.rank, **fk))
        self.factors = nn.ParameterList(
            [nn.Parameter(torch.empty(d + extra, self.rank, **fk)) for d in self.in_dims]
            + [nn.Parameter(torch.empty(self.out_dim, self.rank, **fk))]
        )
        if bias:
            self.bias: nn.Parameter | None = nn.Parameter(torch.empty(self.out_dim, **fk))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for a in self.factors[:-1]:
                nn.init.normal_(a, 0.0, 1.0 / math.sqrt(a.shape[0]))
            nn.init.normal_(self.factors[-1], 0.0, 1.0 / math.sqrt(self.rank))
            self.weights.fill_(1.0)
            if self.bias is not None:
                self.bias.zero_()

    def extra_repr(self) -> str:
        return (
            f"in_dims={list(self.in_dims)}, out_dim={self.out_dim}, rank={self.rank}, "
            f"append_one={self.append_one}, bias={self.bias is not None}"
        )

    def forward(self, xs: Sequence[torch.Tensor], present: torch.Tensor | None = None) -> torch.Tensor:
        xs = _check_inputs(xs, self.in_dims, self.weights.dtype, present, type(self).__name__)
        factors = list(self.factors)
        if _compiling():
            return torch.ops.mmfuse.cp_fusion(xs, self.weights, factors, self.bias, self.append_one, present)
        return _fusion.cp_fusion(
            xs, (self.weights, factors), self.bias, append_one=self.append_one, present=present
        )

    @classmethod
    def from_cp(
        cls,
        cp: Any,
        bias: torch.Tensor | None = None,
        *,
        append_one: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> CPFusion:
        """A layer holding the CP decomposition ``cp`` (CPTensor or ``(weights, factors)``).

        ``factors`` are ``[A_1 (d_1 + 1, R), ..., A_M, C (h, R)]`` as torch tensors (or
        anything ``torch.as_tensor`` takes); ``weights`` may be None (ones).
        """
        weights, factors = _fusion._as_cp(cp)
        factors = [torch.as_tensor(f) for f in factors]
        rank = factors[0].shape[1]
        extra = int(append_one)
        device = factors[0].device if device is None else device
        dtype = factors[0].dtype if dtype is None else dtype
        layer = cls(
            [f.shape[0] - extra for f in factors[:-1]],
            factors[-1].shape[0],
            rank,
            append_one=append_one,
            bias=bias is not None,
            device=device,
            dtype=dtype,
        )
        with torch.no_grad():
            for mine, f in zip(layer.factors, factors):
                mine.copy_(f)
            layer.weights.copy_(torch.ones(rank) if weights is None else torch.as_tensor(weights))
            if bias is not None and layer.bias is not None:
                layer.bias.copy_(torch.as_tensor(bias))
        return layer


# --------------------------------------------------------------------------- TensorFusion


def _tensor_fusion_torch(
    xs: list[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None, append_one: bool
) -> torch.Tensor:
    """Mode-by-mode contraction (the Array-API core's algorithm) in plain torch, for compile."""
    batch = xs[0].shape[0]
    dims = weight.shape[:-1]
    t = _ops._affine(xs[0], weight.reshape(dims[0], -1), append_one)
    for m in range(1, len(xs)):
        t = t.reshape(batch, dims[m], -1)
        t = _ops._affine(xs[m].unsqueeze(1), t, append_one).squeeze(1)
    return t if bias is None else t + bias


class TensorFusion(nn.Module):
    r"""Tensor Fusion (TFN, Zadeh et al. 2017) as a layer: a linear map of the outer product.

    Parameters
    ----------
    in_dims : sequence of int
    out_dim : int
    append_one : bool, default True
    bias : bool, default True
    max_elements : int, default ``mmfuse.DEFAULT_MAX_ELEMENTS``
        Refuse (ValueError, at construction) a weight with more elements than this.
    device, dtype : optional

    Attributes
    ----------
    weight : nn.Parameter, shape (d_1 + 1, ..., d_M + 1, h)
    bias : nn.Parameter (h,) or None

    Notes
    -----
    ``forward(xs)`` is :func:`mmfuse.tensor_fusion`; the outer product is never built.
    ``reset_parameters`` draws :math:`W \sim \mathcal N(0, 1/\prod_m (d_m+1))` (unit output
    variance for unit-variance inputs) and zeroes the bias.
    """

    def __init__(
        self,
        in_dims: Sequence[int],
        out_dim: int,
        *,
        append_one: bool = True,
        bias: bool = True,
        max_elements: int = DEFAULT_MAX_ELEMENTS,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        fk = _factory(device, dtype)
        self.in_dims = _check_dims(in_dims)
        self.out_dim = _check_positive("out_dim", out_dim)
        self.append_one = bool(append_one)
        self.max_elements = _check_positive("max_elements", max_elements)
        shape = (*(d + int(self.append_one) for d in self.in_dims), self.out_dim)
        size = math.prod(shape)
        if size > self.max_elements:
            raise ValueError(
                f"TensorFusion: weight of shape {_fmt(shape)} has {size} elements, over "
                f"max_elements={self.max_elements}; use LowRankFusion, or raise max_elements"
            )
        self.weight = nn.Parameter(torch.empty(shape, **fk))
        if bias:
            self.bias: nn.Parameter | None = nn.Parameter(torch.empty(self.out_dim, **fk))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            fan_in = math.prod(self.weight.shape[:-1])
            nn.init.normal_(self.weight, 0.0, 1.0 / math.sqrt(fan_in))
            if self.bias is not None:
                self.bias.zero_()

    def extra_repr(self) -> str:
        return (
            f"in_dims={list(self.in_dims)}, out_dim={self.out_dim}, "
            f"append_one={self.append_one}, bias={self.bias is not None}"
        )

    def forward(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        xs = _check_inputs(xs, self.in_dims, self.weight.dtype, None, type(self).__name__)
        if _compiling():
            return _tensor_fusion_torch(xs, self.weight, self.bias, self.append_one)
        return _fusion.tensor_fusion(
            xs, self.weight, self.bias, append_one=self.append_one, max_elements=self.max_elements
        )
