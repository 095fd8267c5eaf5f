"""The plain code the benchmarks compare mmfuse with: the plain torch layers (one home for
``torch_cpu.py`` and ``overhead.py``; ``gpu.py`` reaches them through ``torch_cpu.setup``) and
the plain expressions of each operator's maths in NumPy or torch (``overhead.py``,
``sizes.py``, ``sequence_cpu.py``), written as a user would write them in that namespace."""

from __future__ import annotations

import math
from typing import Any


def _is_numpy(xp: Any) -> bool:
    return xp.__name__ == "numpy"


def plain_lowrank(xp: Any, xs, factors, weights, bias):
    """LMF's forward: append the constant, (R, B, h) per modality by a broadcast matmul, the
    product, the rank-weighted sum, the bias."""
    fused = None
    for x, f in zip(xs, factors):
        hat = xp.concatenate([x, xp.ones((x.shape[0], 1), dtype=x.dtype)], axis=1)
        proj = hat @ f  # (R, B, h)
        fused = proj if fused is None else fused * proj
    return (weights @ fused.reshape(fused.shape[0], -1)).reshape(fused.shape[1:]) + bias


def plain_cp(xp: Any, xs, weights, factors, bias):
    """CP fusion in TensorLy's layout: ``(w * prod_m [x_m, 1] @ A_m) @ C.T + b``."""
    prod = weights
    for x, a in zip(xs, factors):
        hat = xp.concatenate([x, xp.ones((x.shape[0], 1), dtype=x.dtype)], axis=1)
        prod = prod * (hat @ a)  # (B, R)
    return prod @ factors[-1].T + bias


def plain_tensor_fusion(xp: Any, xs, weight, bias):
    """TFN: the outer product of the ``[x_m, 1]`` per sample, flattened, times the flattened
    weight (d_1 + 1, ..., d_M + 1, h), plus the bias."""
    z = None
    for x in xs:
        hat = xp.concatenate([x, xp.ones((x.shape[0], 1), dtype=x.dtype)], axis=1)
        z = hat if z is None else (z[:, :, None] * hat[:, None, :]).reshape(x.shape[0], -1)
    return z @ weight.reshape(-1, weight.shape[-1]) + bias


def plain_moments(xp: Any, x, eps=1e-5):
    """Mean and ``sqrt(var + eps)`` over the token axis (-2), kept."""
    if _is_numpy(xp):
        return x.mean(axis=-2, keepdims=True), xp.sqrt(x.var(axis=-2, keepdims=True) + eps)
    var, mu = xp.var_mean(x, dim=-2, keepdim=True, correction=0)
    return mu, xp.sqrt(var + eps)


def plain_zoom_shift(xp: Any, x, g, eps=1e-5):
    """``(x - mu) * (s_g / s_x) + mu_g`` with means and population variances over axis -2."""
    if _is_numpy(xp):
        mu, var = x.mean(axis=-2, keepdims=True), x.var(axis=-2, keepdims=True)
        mu_g, var_g = g.mean(axis=-2, keepdims=True), g.var(axis=-2, keepdims=True)
        return (x - mu) * xp.sqrt((var_g + eps) / (var + eps)) + mu_g
    var, mu = xp.var_mean(x, dim=-2, keepdim=True, correction=0)
    var_g, mu_g = xp.var_mean(g, dim=-2, keepdim=True, correction=0)
    return (x - mu) * xp.sqrt((var_g + eps) / (var + eps)) + mu_g


def plain_align(xp: Any, xs):
    """One Gauss-Seidel round for two modalities: x0 toward x1, then x1 toward the new x0."""
    y0 = plain_zoom_shift(xp, xs[0], xs[1])
    return [y0, plain_zoom_shift(xp, xs[1], y0)]


def plain_zoom_shift_fusion(xp: Any, xs):
    """Zoom-and-Shift fusion of two modalities written plainly: one Gauss-Seidel round
    (:func:`plain_align`), max pooling over the tokens, concatenation."""
    ys = plain_align(xp, xs)
    if _is_numpy(xp):
        return xp.concatenate([y.max(axis=1) for y in ys], axis=-1)
    return xp.cat([y.amax(dim=1) for y in ys], dim=-1)


def plain_gelu(xp: Any):
    """The exact GELU as plain code writes it: SciPy's ``erf`` on NumPy, ``F.gelu`` on torch."""
    if _is_numpy(xp):
        try:
            from scipy.special import erf
        except ImportError:  # without SciPy: math.erf per element (slow, and then not a fair plain version)
            import numpy as np

            erf = np.vectorize(math.erf)
        return lambda h: 0.5 * h * (1.0 + erf(h / math.sqrt(2.0)))
    return xp.nn.functional.gelu


def plain_sequence(xp: Any, hs, feature, token, mode):
    """Wander's token-level fusion of the activations ``hs`` (B, T_m, r_m) written plainly in
    namespace ``xp`` (NumPy or torch), as the released code does (collapsed: rank sums, then
    two products per modality; cp: every pair of feature and token ranks)."""
    numpy = _is_numpy(xp)
    fused = None
    for h, phi, psi in zip(hs, feature, token):
        if mode == "collapsed":
            term = psi.sum(0).T @ (h @ phi.sum(0))  # (B, T_out, D)
        else:
            g = h[None] @ phi[:, None]  # (R_h, B, T, D)
            term = psi.transpose(0, 2, 1)[:, None, None] if numpy else psi.transpose(1, 2)[:, None, None]
            term = term @ g[None]  # (R_t, R_h, B, T_out, D)
        fused = term if fused is None else fused * term
    return fused.sum((0, 1)) if mode == "cp" else fused


def plain_wander(xp: Any, gelu, xs, params, mode):
    """The Wander adapter's forward written plainly in namespace ``xp`` (NumPy or torch), as
    the released code does: the down-projections with ``gelu`` (from :func:`plain_gelu`),
    :func:`plain_sequence`, the residual of the first tokens."""
    hs = [gelu(x @ w + b) for x, (w, b) in zip(xs, params["down"])]  # (B, T, r) each
    fused = plain_sequence(xp, hs, params["feature"], params["token"], mode)
    n_out = fused.shape[1]
    cat = xp.concatenate(xs, axis=1) if _is_numpy(xp) else xp.cat(xs, dim=1)
    return fused + cat[:, :n_out]


def lmf_layer(layer):
    """The ``lmf-layer`` baseline: LMF's released fusion (constant prepended), parameters
    copied from the mmfuse ``LowRankFusion`` ``layer``."""
    import torch

    out_dim = layer.out_dim

    class LMFLayer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.factors = torch.nn.ParameterList(
                [torch.nn.Parameter(torch.cat([f[:, -1:], f[:, :-1]], dim=1).detach().clone()) for f in layer.factors]
            )
            self.fusion_weights = torch.nn.Parameter(layer.weights.detach().clone()[None, :])
            self.fusion_bias = torch.nn.Parameter(layer.bias.detach().clone()[None, :])

        def forward(self, inputs):
            n = inputs[0].shape[0]
            fused = None
            for x, f in zip(inputs, self.factors):
                hat = torch.cat([torch.ones(n, 1, dtype=x.dtype, device=x.device), x], dim=1)
                proj = torch.matmul(hat, f)  # (R, B, h)
                fused = proj if fused is None else fused * proj
            out = torch.matmul(self.fusion_weights, fused.permute(1, 0, 2)).squeeze(1) + self.fusion_bias
            return out.view(-1, out_dim)

    return LMFLayer()


def released_wander(layer):
    """The ``released-layer`` baseline: the released Wander adapter's forward (nn.Linear,
    F.gelu, rank sums inside forward), parameters copied from the mmfuse ``WanderAdapter``."""
    import torch

    class ReleasedWander(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linears = torch.nn.ModuleList()
            for w, b in zip(layer.down_weights, layer.down_biases):
                lin = torch.nn.Linear(w.shape[0], w.shape[1], device=w.device)
                with torch.no_grad():
                    lin.weight.copy_(w.T)
                    lin.bias.copy_(b)
                self.linears.append(lin)
            self.factor_dim = torch.nn.ParameterList(
                [torch.nn.Parameter(f.detach().clone()) for f in layer.feature_factors]
            )
            self.factor_t = torch.nn.ParameterList(
                [torch.nn.Parameter(t.detach().clone()) for t in layer.token_factors]
            )

        def forward(self, inputs):
            x = list(inputs)
            original = torch.cat(x, dim=1)
            for i, lin in enumerate(self.linears):
                x[i] = torch.nn.functional.gelu(lin(x[i]))
            fusion = None
            for i in range(len(x)):
                wd = torch.sum(self.factor_dim[i], dim=0)
                tmp = torch.matmul(x[i], wd).permute(0, 2, 1)
                wt = torch.sum(self.factor_t[i], dim=0)
                feat = torch.matmul(tmp, wt)
                fusion = feat if fusion is None else fusion * feat
            fusion = fusion.permute(0, 2, 1)
            return fusion + original[:, : fusion.shape[1], :]

    return ReleasedWander()


def cp_layer(layer):
    """The ``cp-layer`` baseline: CP fusion written plainly (the constant appended, one matmul
    per modality into (B, R), the product, the weights, the output factor, the bias; autograd
    for the backward, which keeps the projections), parameters copied from the mmfuse
    ``CPFusion`` ``layer``."""
    import torch

    class CPLayer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.factors = torch.nn.ParameterList([torch.nn.Parameter(f.detach().clone()) for f in layer.factors])
            self.weights = torch.nn.Parameter(layer.weights.detach().clone())
            self.bias = torch.nn.Parameter(layer.bias.detach().clone())

        def forward(self, inputs):
            prod = None
            for x, a in zip(inputs, self.factors[:-1]):
                proj = x @ a[:-1] + a[-1]  # [x, 1] A_m
                prod = proj if prod is None else prod * proj
            return (prod * self.weights) @ self.factors[-1].t() + self.bias

    return CPLayer()
