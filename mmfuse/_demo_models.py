"""The small torch models of ``mmfuse demo`` (imported only when the demo runs).

Each is per-modality encoders, a fusion step built from mmfuse's operators, and a linear
classifier.  ``lengths`` is None for vector data (one feature vector per modality) and the token
counts for sequence data, whose encoders work per token and whose fusions pool over tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mmfuse.nn import WanderAdapter
from mmfuse.nn import ZoomShift as ZoomShiftLayer


class Encoders(nn.Module):
    """Per-modality Linear + GELU: vectors -> (B, width); sequences -> (B, T, width)."""

    def __init__(self, dims: Sequence[int], width: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, width) for d in dims)

    def forward(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [nn.functional.gelu(layer(x)) for layer, x in zip(self.layers, xs)]


def _pool(hs: list[torch.Tensor], lengths: Sequence[int] | None) -> list[torch.Tensor]:
    return hs if lengths is None else [h.mean(dim=1) for h in hs]


class Single(nn.Module):
    """One modality only."""

    def __init__(
        self, dims: Sequence[int], lengths: Sequence[int] | None, n_classes: int, m: int, hidden: int
    ) -> None:
        super().__init__()
        self.m, self.lengths = m, lengths
        self.enc = nn.Linear(dims[m], hidden)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        h = nn.functional.gelu(self.enc(xs[self.m]))
        return self.head(_pool([h], self.lengths)[0])


class Concat(nn.Module):
    """Concatenated (pooled) encodings."""

    def __init__(
        self, dims: Sequence[int], lengths: Sequence[int] | None, n_classes: int, hidden: int
    ) -> None:
        super().__init__()
        self.lengths = lengths
        self.enc = Encoders(dims, hidden)
        self.head = nn.Linear(hidden * len(dims), n_classes)

    def forward(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.head(torch.cat(_pool(self.enc(xs), self.lengths), dim=1))


class Fused(nn.Module):
    """Encoders -> an mmfuse.nn fusion layer over the pooled encodings -> classifier."""

    def __init__(
        self, dims: Sequence[int], lengths: Sequence[int] | None, n_classes: int, width: int, layer: Any
    ) -> None:
        super().__init__()
        self.lengths = lengths
        self.enc = Encoders(dims, width)
        self.fusion = layer
        self.head = nn.Linear(layer.out_dim, n_classes)

    def encode(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The pooled per-modality encodings the fusion layer takes."""
        return _pool(self.enc(xs), self.lengths)

    def forward(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.head(nn.functional.gelu(self.fusion(self.encode(xs))))


class Wander(nn.Module):
    """Per-token encoders -> :class:`mmfuse.nn.WanderAdapter` -> mean over tokens -> classifier."""

    def __init__(
        self, dims: Sequence[int], lengths: Sequence[int], n_classes: int, hidden: int, init: str
    ) -> None:
        super().__init__()
        self.enc = Encoders(dims, hidden)
        self.adapter = WanderAdapter([hidden] * len(dims), lengths, 8, 4, 4, init=init)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.head(self.adapter(self.enc(xs)).mean(dim=1))


class ZoomShift(nn.Module):
    """Encoders to token sequences -> :class:`mmfuse.nn.ZoomShift` (the exact limit of the
    alternating rounds, alpha 0.5; max-pooled and concatenated) -> classifier.  Vector
    encodings are split into 4 tokens of ``hidden`` channels."""

    def __init__(
        self, dims: Sequence[int], lengths: Sequence[int] | None, n_classes: int, hidden: int
    ) -> None:
        super().__init__()
        self.hidden, self.vectors = hidden, lengths is None
        self.enc = Encoders(dims, hidden * 4 if self.vectors else hidden)
        self.align = ZoomShiftLayer(hidden, len(dims), fuse="concat", rounds=None, alpha=0.5)
        self.head = nn.Linear(hidden * len(dims), n_classes)

    def forward(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        hs = self.enc(xs)
        if self.vectors:
            hs = [h.reshape(h.shape[0], 4, self.hidden) for h in hs]
        return self.head(self.align(hs))
