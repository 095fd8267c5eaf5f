"""
Parameter counts: TFN vs LMF vs Wander as the number of modalities grows
=========================================================================

Tensor fusion (TFN) maps the outer product of all modalities linearly to the output, so its
weight has :math:`h \\prod_m (d_m + 1)` entries: exponential in the number of modalities M.
Low-rank fusion (LMF) stores :math:`R h \\sum_m (d_m + 1)`: linear in M.  For token sequences,
the explicit weight of Wander's fusion has :math:`r^M D\\, T_{out} \\prod_m T_m` entries, and
the Wander adapter stores a linear number of them.

Here every modality has the same size and the counts come from mmfuse itself
(:func:`mmfuse.init_lowrank`, :func:`mmfuse.lowrank_to_tensor`,
:func:`mmfuse.wander_parameter_count`).
"""

import matplotlib.pyplot as plt
import numpy as np

import mmfuse

d, h, rank = 32, 64, 8  # features per modality, output size, LMF rank
T, r, D = 32, 16, 32  # Wander: tokens per modality, down-projection width, output width
modalities = np.arange(2, 9)

tfn, lmf, wander, wander_full = [], [], [], []
for m in modalities:
    dims = [d] * int(m)
    tfn.append(h * (d + 1) ** int(m))  # the shape of lowrank_to_tensor's output, times nothing
    params = mmfuse.init_lowrank(dims, rank=rank, out_dim=h, seed=0)
    lmf.append(sum(f.size for f in params["factors"]) + params["weights"].size + params["bias"].size)
    counts = mmfuse.wander_parameter_count(
        [D] * int(m), [T] * int(m), rank=r, feature_rank=4, token_rank=8, out_dim=D
    )
    wander.append(counts["total"])
    wander_full.append(counts["full_weight"])

# %%
# A check that the TFN count is the size of the weight LMF stands for (M = 3):
p3 = mmfuse.init_lowrank([d] * 3, rank=rank, out_dim=h, seed=0)
full = mmfuse.lowrank_to_tensor(p3["factors"], p3["weights"])
print("TFN weight for M = 3:", full.shape, "=", full.size, "entries; count used:", tfn[1])

# %%
# The counts, on a log scale:
fig, ax = plt.subplots(figsize=(7, 4))
ax.semilogy(modalities, tfn, "o-", label=f"TFN weight (d = {d}, h = {h})")
ax.semilogy(modalities, lmf, "s-", label=f"LMF, rank {rank}")
ax.semilogy(modalities, wander_full, "v:", label=f"explicit sequence-fusion W (T = {T}, r = {r})")
ax.semilogy(modalities, wander, "^-", label="Wander adapter (stored)")
ax.set_xlabel("number of modalities M")
ax.set_ylabel("parameters")
ax.set_title("Exponential vs linear growth in the number of modalities")
ax.grid(True, alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %%
# The table behind the figure:
header = ["M", "TFN", "LMF", "Wander W", "Wander"]
rows = [header] + [[f"{v:,}" for v in row] for row in zip(modalities, tfn, lmf, wander_full, wander)]
widths = [max(len(r[i]) for r in rows) for i in range(len(header))]  # each column its longest entry
for row in rows:
    print(" ".join(v.rjust(w) for v, w in zip(row, widths)))
