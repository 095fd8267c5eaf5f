"""
Wander: trainable vs parity initialisation, measured by gradients
=================================================================

The released Wander code initialises every token factor to zero.  The fused term is then a
product of M >= 2 zero matrices, and every adapter parameter gets **exactly zero gradient** at
every step: the adapter never trains.  mmfuse keeps that scheme as ``init="parity"`` and
defaults to ``init="trainable"`` (all factors small and random, see
:func:`mmfuse.init_wander`).

We fuse the two BasicMotions sensors (accelerometer and gyroscope, 100 steps x 3 channels) with
a Wander adapter, mean-pool its output tokens and classify the four activities with a linear
head, training both variants identically and recording the gradient norm of the adapter's
parameters at every step.
"""

import matplotlib.pyplot as plt
import numpy as np
import torch

import mmfuse
from mmfuse.datasets import load_basic_motions

torch.manual_seed(0)
torch.set_num_threads(1)

train = load_basic_motions(split="train")
mu = [v.mean(axis=(0, 1)) for v in train.views]
sd = [v.std(axis=(0, 1)) for v in train.views]
xs = [torch.tensor((v - m) / s, dtype=torch.float64) for v, m, s in zip(train.views, mu, sd)]
y = torch.tensor(train.target)
print([tuple(x.shape) for x in xs], "classes:", train.target_names)


def run(init, steps=60):
    params = mmfuse.init_wander([3, 3], [100, 100], rank=8, feature_rank=2, token_rank=2, out_dim=3,
                                n_out=16, seed=0, xp=torch, dtype=torch.float64, init=init)
    adapter = [a for w, b in params["down"] for a in (w, b)] + params["feature"] + params["token"]
    for a in adapter:
        a.requires_grad_()
    head = torch.nn.Linear(3, 4, dtype=torch.float64)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.Adam([*adapter, *head.parameters()], lr=1e-2)
    grad_norms, losses = [], []
    for _ in range(steps):
        opt.zero_grad()
        fused = mmfuse.wander(xs, params)  # (B, T_out, D)
        loss = torch.nn.functional.cross_entropy(head(fused.mean(dim=1)), y)
        loss.backward()
        grad_norms.append(torch.sqrt(sum((a.grad**2).sum() for a in adapter)).item())
        losses.append(loss.item())
        opt.step()
    return np.array(grad_norms), np.array(losses), params


results = {init: run(init) for init in ("parity", "trainable")}
for init, (g, loss, _) in results.items():
    print(f"{init:9s}: adapter gradient norm first/last step {g[0]:.3g} / {g[-1]:.3g}; "
          f"loss {loss[0]:.3f} -> {loss[-1]:.3f}")

# %%
# With ``init="parity"`` the adapter's gradient is exactly zero at every step (only the linear
# head learns); with ``init="trainable"`` every adapter parameter learns from the first step.
fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
for init, (g, loss, _) in results.items():
    a.plot(g, label=f'init="{init}"')
    b.plot(loss, label=f'init="{init}"')
a.set_yscale("symlog", linthresh=1e-6)
a.set_xlabel("step")
a.set_ylabel("adapter gradient norm")
a.set_title("gradient reaching the adapter")
b.set_xlabel("step")
b.set_ylabel("training loss")
b.set_title("BasicMotions, train split")
for ax in (a, b):
    ax.grid(True, alpha=0.3)
    ax.legend()
fig.tight_layout()
plt.show()

# %%
# Per parameter array, after training: which ones moved at all?
for init, (_, _, params) in results.items():
    token_zero = all(bool(torch.all(t == 0)) for t in params["token"])
    print(f"{init:9s}: token factors still all zero: {token_zero}")
