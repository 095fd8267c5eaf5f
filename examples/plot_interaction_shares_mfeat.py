"""
Which interactions does a fused model use? Shares by order and by modality subset (mfeat)
==========================================================================================

Tensor fusion appends a constant 1 to every modality so that its outer product holds every
interaction order at once.  Its output (before the bias) is therefore *exactly* the sum of one
term per subset of the modalities: a constant, one unimodal term per modality, one bimodal term
per pair and one trimodal term (see :doc:`../theory/interactions`).  The same holds for
low-rank fusion (LMF), whose weight is a low-rank TFN weight.

We train two small classifiers on three views of the UCI handwritten digits (mfeat): Fourier
coefficients, Karhunen-Loeve coefficients and Zernike moments.  Each view goes through its own
encoder (linear, ReLU), then the fusion layer (h = 32), ReLU and a linear head:

* **LMF**: :class:`mmfuse.nn.LowRankFusion`, encodings of 16 features, rank 4;
* **TFN**: :class:`mmfuse.nn.TensorFusion` with small encodings (4 features each, so its weight
  has 5 x 5 x 5 x 32 = 4000 entries).

After a short training we split each fusion layer's output on the test digits into its exact
interaction terms (:func:`mmfuse.lowrank_interactions`, :func:`mmfuse.tensor_interactions`) and
report, with :func:`mmfuse.interaction_shares`, the fraction of the output's variance that each
order and each subset of modalities carries.  (One torch thread keeps the run time predictable
on busy machines; the example takes a few seconds.)
"""

import matplotlib.pyplot as plt
import numpy as np
import torch

import mmfuse
from mmfuse.datasets import load_mfeat
from mmfuse.nn import LowRankFusion, TensorFusion

torch.manual_seed(0)
torch.set_num_threads(1)
VIEWS = ("fourier", "karhunen_loeve", "zernike")
SHORT = ("Fou", "KL", "Zer")

train, test = load_mfeat(split="train"), load_mfeat(split="test")


def pick(ds):
    return [ds.views[ds.view_names.index(name)] for name in VIEWS]


# standardise every feature with the training statistics
means = [v.mean(axis=0) for v in pick(train)]
stds = [v.std(axis=0) + 1e-8 for v in pick(train)]


def tensors(ds):
    xs = [torch.tensor((v - mu) / sd, dtype=torch.float32) for v, mu, sd in zip(pick(ds), means, stds)]
    return xs, torch.tensor(ds.target)


(x_train, y_train), (x_test, y_test) = tensors(train), tensors(test)
dims = [x.shape[1] for x in x_train]


class Fused(torch.nn.Module):
    """Per-modality encoders (d_m -> width, ReLU), a fusion layer, ReLU, a linear head."""

    def __init__(self, fuse, width):
        super().__init__()
        self.encoders = torch.nn.ModuleList([torch.nn.Linear(d, width) for d in dims])
        self.fuse = fuse
        self.head = torch.nn.Linear(fuse.out_dim, 10)

    def encode(self, xs):
        return [torch.relu(enc(x)) for enc, x in zip(self.encoders, xs)]

    def forward(self, xs):
        return self.head(torch.relu(self.fuse(self.encode(xs))))


def train_model(model, epochs=6, batch=100, lr=3e-3):
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for rows in torch.randperm(len(y_train), generator=gen).split(batch):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model([x[rows] for x in x_train]), y_train[rows])
            loss.backward()
            opt.step()
    with torch.no_grad():
        return (model(x_test).argmax(dim=1) == y_test).float().mean().item()


models = {
    "LMF (R = 4)": Fused(LowRankFusion([16] * 3, out_dim=32, rank=4), width=16),
    "TFN (4 features each)": Fused(TensorFusion([4] * 3, out_dim=32), width=4),
}
for name, model in models.items():
    print(f"{name:22s}: test accuracy {train_model(model):.3f}")

# %%
# The exact terms of each fusion layer's output on the test digits.  They sum to the layer's
# output minus its bias (checked below), so the shares add up to one.


def terms_of(model, by):
    fuse = model.fuse
    with torch.no_grad():
        enc = model.encode(x_test)
        if isinstance(fuse, LowRankFusion):
            terms, labels = mmfuse.lowrank_interactions(enc, list(fuse.factors), fuse.weights, by=by)
        else:
            terms, labels = mmfuse.tensor_interactions(enc, fuse.weight, by=by)
        gap = (terms.sum(dim=0) + fuse.bias - fuse(enc)).abs().max().item()
    return terms, labels, gap


shares = {}
for name, model in models.items():
    for by in ("order", "subset"):
        terms, labels, gap = terms_of(model, by)
        shares[name, by] = mmfuse.interaction_shares(terms).numpy()
        if by == "order":
            print(f"{name:22s}: max |sum of terms + bias - output| = {gap:.1e}; variance share by order",
                  " ".join(f"{k}: {np.round(s, 2) + 0.0:.2f}" for k, s in zip(labels, shares[name, by])))
subset_names = ["{}" if not s else "+".join(SHORT[m] for m in s) for s in labels]

# %%
# Shares of the fused output's variance, by interaction order (left) and by modality subset
# (right).  The constant (order 0, the empty subset) carries no variance.  A share can be
# negative when a term cancels part of the others.
fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [1, 2]})
width = 0.38
for i, name in enumerate(models):
    order_shares = shares[name, "order"]
    axes[0].bar(np.arange(len(order_shares)) + (i - 0.5) * width, order_shares, width, label=name)
    subset_shares = shares[name, "subset"]
    axes[1].bar(np.arange(len(subset_shares)) + (i - 0.5) * width, subset_shares, width, label=name)
axes[0].set_xticks(range(len(shares[name, "order"])))
axes[0].set_xlabel("interaction order |S|")
axes[1].set_xticks(range(len(subset_names)), subset_names, rotation=30)
axes[1].set_xlabel("modality subset S")
for ax in axes:
    ax.axhline(0, color="k", lw=0.6)
    ax.set_ylabel("share of output variance")
    ax.grid(True, axis="y", alpha=0.3)
axes[1].legend()
fig.suptitle("mfeat: which interactions carry the fused output?")
fig.tight_layout()
plt.show()
