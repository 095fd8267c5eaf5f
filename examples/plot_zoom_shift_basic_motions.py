"""
Zoom-and-Shift on BasicMotions: distributions before and after alignment
========================================================================

BasicMotions records a smartwatch's 3-axis accelerometer and 3-axis gyroscope (100 steps each)
during four activities.  The two sensors measure different physical quantities, so their values
sit at different offsets and scales.  :func:`mmfuse.align` moves each modality's per-sample,
per-channel mean and spread toward the other's (mmfuse's formalisation of Zoom-and-Shift, see
the theory page).  With ``alpha=0.5`` and ``rounds=None`` both sensors meet at the fixed
point of the alternating rounds (their exact limit).
"""

import matplotlib.pyplot as plt
import numpy as np

import mmfuse
from mmfuse.datasets import load_basic_motions

data = load_basic_motions()
acc, gyr = data.views  # (80, 100, 3) each: (samples, tokens, channels)
print(data)

aligned_acc, aligned_gyr = mmfuse.align([acc, gyr], rounds=None, alpha=0.5)


def stats(x):
    mean, std = mmfuse.moments(x)
    return mean[:, 0, :], np.log(std[:, 0, :])  # (samples, channels)


# %%
# Per-sample statistics of each channel before and after.  Each point is one recording; after
# alignment the two sensors' points coincide channel by channel (the alignment is per sample
# and channel), while the recordings still differ from one another.
fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharex=False, sharey=False)
for ax, (a, g), title in (
    (axes[0], (acc, gyr), "before"),
    (axes[1], (aligned_acc, aligned_gyr), "after align(alpha=0.5, rounds=None)"),
):
    for x, style, name in (
        (a, {"marker": "o", "facecolors": "none", "edgecolors": "tab:blue", "s": 40}, "accelerometer"),
        (g, {"marker": "x", "color": "tab:orange", "s": 18}, "gyroscope"),
    ):
        mu, log_sd = stats(x)
        ax.scatter(mu[:, 0], log_sd[:, 0], label=f"{name}, channel 0", **style)
    ax.set_xlabel("per-sample mean")
    ax.set_ylabel("per-sample log std")
    ax.set_title(title)
    ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %%
# The distribution of all values of channel 0, pooled over recordings and time steps:
fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
bins = 60
for ax, (a, g), title in (
    (axes[0], (acc, gyr), "before"),
    (axes[1], (aligned_acc, aligned_gyr), "after"),
):
    ax.hist(a[:, :, 0].ravel(), bins=bins, alpha=0.6, density=True, label="accelerometer")
    ax.hist(g[:, :, 0].ravel(), bins=bins, alpha=0.6, density=True, label="gyroscope")
    ax.set_title(f"channel 0, {title}")
    ax.set_xlabel("value")
    ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %%
# The numbers: the largest gap between the two sensors' statistics over all recordings and
# channels, before and after.
for name, (a, g) in (("before", (acc, gyr)), ("after", (aligned_acc, aligned_gyr))):
    (mu_a, ls_a), (mu_g, ls_g) = stats(a), stats(g)
    print(f"{name:6s}: max |mean gap| = {np.abs(mu_a - mu_g).max():.3g}, "
          f"max |log-std gap| = {np.abs(ls_a - ls_g).max():.3g}")

# %%
# Alignment keeps each recording's shape over time: within a sample and channel it is an
# affine map with a positive scale, so correlations over time are unchanged.
before = np.corrcoef(acc[0, :, 0], gyr[0, :, 0])[0, 1]
after = np.corrcoef(aligned_acc[0, :, 0], aligned_gyr[0, :, 0])[0, 1]
print(f"correlation of the two sensors in recording 0, channel 0: {before:.6f} -> {after:.6f}")
