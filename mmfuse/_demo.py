"""``mmfuse demo``: small fusion models trained on the bundled real data, side by side.

Every model is a per-modality encoder, a fusion step, and a linear classifier, trained
full-batch with Adam from fixed seeds on CPU.  The fusion steps are mmfuse's operators; the
table reports test accuracy, trainable parameters and training time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np

__all__ = ["check_models_train", "run_demo"]


def _torch() -> Any:
    from ._console import require

    return require("torch")


# --------------------------------------------------------------------------- models


def _models(
    kind: str, dims: Sequence[int], lengths: Sequence[int] | None, n_classes: int
) -> dict[str, Callable[[], Any]]:
    """Model factories for one data set.  ``lengths`` is None for vector data (mfeat)."""
    from mmfuse import nn as mnn

    from . import _demo_models as dm

    hidden = 16
    tfn_width = 2 if len(dims) > 3 else 8  # keep (width + 1)^M * h small
    models: dict[str, Callable[[], Any]] = {
        f"single: {_VIEW_NAMES[kind][m]}": partial(dm.Single, dims, lengths, n_classes, m, hidden)
        for m in range(len(dims))
    }
    models["concatenation"] = lambda: dm.Concat(dims, lengths, n_classes, hidden)
    models["TFN"] = lambda: dm.Fused(
        dims, lengths, n_classes, tfn_width, mnn.TensorFusion([tfn_width] * len(dims), 16)
    )
    models["LMF (rank 4)"] = lambda: dm.Fused(
        dims, lengths, n_classes, hidden, mnn.LowRankFusion([hidden] * len(dims), 32, 4)
    )
    models["CP fusion (rank 8)"] = lambda: dm.Fused(
        dims, lengths, n_classes, hidden, mnn.CPFusion([hidden] * len(dims), 32, 8)
    )
    if lengths is not None:
        models["Wander (trainable init)"] = lambda: dm.Wander(dims, lengths, n_classes, hidden, "trainable")
        models["Wander (released parity init)"] = lambda: dm.Wander(
            dims, lengths, n_classes, hidden, "parity"
        )
    models["Zoom-and-Shift + concat"] = lambda: dm.ZoomShift(dims, lengths, n_classes, hidden)
    return models


_VIEW_NAMES: dict[str, list[str]] = {}


# --------------------------------------------------------------------------- training


def _train(
    torch: Any,
    model: Any,
    train: tuple[list[Any], Any],
    test: tuple[list[Any], Any],
    epochs: int,
    progress: Any,
) -> tuple[float, int, float]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    model.train()
    for _ in range(epochs):
        opt.zero_grad()
        loss = loss_fn(model(train[0]), train[1])
        loss.backward()
        opt.step()
        progress()
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        acc = float((model(test[0]).argmax(dim=1) == test[1]).float().mean())
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return acc, params, seconds


def _standardise(
    train_views: list[np.ndarray], test_views: list[np.ndarray]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    out_train, out_test = [], []
    for a, b in zip(train_views, test_views):
        axes = tuple(range(a.ndim - 1))
        mu, sd = a.mean(axis=axes), a.std(axis=axes) + 1e-6
        out_train.append((a - mu) / sd)
        out_test.append((b - mu) / sd)
    return out_train, out_test


def _datasets(quick: bool) -> list[dict[str, Any]]:
    from . import datasets

    found = []
    for kind, loader in (("BasicMotions", datasets.load_basic_motions), ("mfeat", datasets.load_mfeat)):
        train, test = loader(split="train"), loader(split="test")
        tr, te = _standardise(
            [np.asarray(v, np.float32) for v in train.views], [np.asarray(v, np.float32) for v in test.views]
        )
        _VIEW_NAMES[kind] = list(train.view_names)
        found.append(
            {
                "kind": kind,
                "train": (tr, train.target),
                "test": (te, test.target),
                "n_classes": train.n_classes,
                "lengths": None if tr[0].ndim == 2 else [v.shape[1] for v in tr],
            }
        )
    return found


def check_models_train() -> None:
    """One forward and backward step of every model the demo trains, on two training samples
    of each data set, the caller's random state kept: a configured backend that cannot train
    mmfuse's layers (``MMFUSE_BACKEND=reference`` takes no tensors that require grad) raises
    its BackendUnsupported here, before ``mmfuse demo`` makes its output folder or trains
    anything.  (It had failed after the plain models of the first data set had trained, and
    left an empty folder; a review's find.)"""
    torch = _torch()
    with torch.random.fork_rng(devices=[]):
        for data in _datasets(quick=True):
            dims = [v.shape[-1] for v in data["train"][0]]
            xs = [torch.from_numpy(v[:2]) for v in data["train"][0]]
            for make in _models(data["kind"], dims, data["lengths"], data["n_classes"]).values():
                make()(xs).sum().backward()


def run_demo(*, quick: bool = False, out: str = "mmfuse-demo", progress: bool = True) -> int:
    torch = _torch()
    # One torch thread, whatever the machine: the printed numbers then do not depend on its
    # core count (sums split over threads round differently, and training amplifies the last
    # bit: two threads printed LMF 0.958 on mfeat where one prints 0.959), and the models are
    # small: on 2 idle cores two threads took 23.8 s against one's 21.9, and beside another
    # busy process 40x one's time (OpenMP's threads waiting on each other; a review's find).
    # The caller's setting is restored.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_demo(torch, quick=quick, out=out, progress=progress)
    finally:
        torch.set_num_threads(threads)


def _run_demo(torch: Any, *, quick: bool, out: str, progress: bool) -> int:
    from ._console import Progress, table

    epochs = {"BasicMotions": 30 if quick else 150, "mfeat": 20 if quick else 120}
    rows: list[dict[str, Any]] = []
    chance: dict[str, float] = {}
    order_shares: dict[str, list[float]] = {}
    start = time.perf_counter()
    for data in _datasets(quick):
        kind = data["kind"]
        chance[kind] = 1 / data["n_classes"]  # predicting one class for all: balanced test sets
        dims = [v.shape[-1] for v in data["train"][0]]
        factories = _models(kind, dims, data["lengths"], data["n_classes"])
        train = (
            [torch.from_numpy(v) for v in data["train"][0]],
            torch.from_numpy(np.asarray(data["train"][1], np.int64)),
        )
        test = (
            [torch.from_numpy(v) for v in data["test"][0]],
            torch.from_numpy(np.asarray(data["test"][1], np.int64)),
        )
        bar = Progress(len(factories) * epochs[kind], f"{kind:<12}", items=len(factories), enabled=progress)
        singles: list[dict[str, Any]] = []
        for name, make in factories.items():
            torch.manual_seed(0)
            model = make()
            acc, n_params, seconds = _train(torch, model, train, test, epochs[kind], partial(bar.step, name))
            if name.startswith("LMF"):
                order_shares[kind] = _order_shares(torch, model, test[0])
            bar.finished(f"{name}: accuracy {acc:.3f} in {seconds:.1f} s")
            row = {"data": kind, "method": name, "accuracy": acc, "params": n_params, "seconds": seconds}
            (singles if name.startswith("single") else rows).append(row)
        best = max(singles, key=lambda r: r["accuracy"])
        rows.insert(
            len(rows) - (len(factories) - len(singles)),
            {**best, "method": f"best single ({best['method'][8:]})"},
        )
    total = time.perf_counter() - start
    text = table(
        [{**r, "accuracy": f"{r['accuracy']:.3f}", "seconds": f"{r['seconds']:.1f}"} for r in rows],
        ["data", "method", "accuracy", "params", "seconds"],
    )
    print(text)
    chances = ", ".join(f"{d} {c:.2f}" for d, c in chance.items())
    note = f" (quick run: {_epochs_text(epochs)}, fewer than the full demo's)" if quick else ""
    summary = f"chance: {chances}; total {total:.1f} s{note}"
    print(f"\n{summary}")
    for kind, shares in order_shares.items():
        # round, then + 0.0: no "-0.00" for a share that is zero to the printed digits
        parts = ", ".join(f"order {k}: {round(s, 2) + 0.0:.2f}" for k, s in enumerate(shares))
        print(f"LMF (rank 4) on {kind}, share of the fused output's variance by interaction order: {parts}")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "demo.txt"), "w") as fh:  # the summary line: a quick run says so
        fh.write(f"{text}\n\n{summary}\n")
    figure = os.path.join(out, "demo.png")
    if _figure(rows, figure, chance=chance, quick_epochs=epochs if quick else None):
        print(f"wrote {figure}")
    return 0


def _order_shares(torch: Any, model: Any, xs: list[Any]) -> list[float]:
    """The trained LMF layer's output on the test set split exactly into its interaction
    orders (:func:`mmfuse.lowrank_interactions`); each order's share of the variance."""
    import mmfuse

    layer = model.fusion
    with torch.no_grad():
        terms, _ = mmfuse.lowrank_interactions(model.encode(xs), list(layer.factors), layer.weights)
        return [float(s) for s in mmfuse.interaction_shares(terms)]


def _epochs_text(epochs: dict[str, int]) -> str:
    return ", ".join(f"{kind} {n} epochs" for kind, n in epochs.items())


def _figure(
    rows: list[dict[str, Any]], path: str, *, chance: dict[str, float], quick_epochs: dict[str, int] | None
) -> bool:
    """Write the summary figure to ``path``; False (and a note) when matplotlib is missing."""
    from ._console import MissingDependency, require_pyplot

    try:
        plt = require_pyplot()
    except MissingDependency as exc:  # not installed, or broken (a review's find: a broken
        # one had raised after the whole demo had run and written its results)
        print(f"no figure: {exc}")
        return False

    fig = _draw(rows, chance=chance, quick_epochs=quick_epochs)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _draw(
    rows: list[dict[str, Any]], *, chance: dict[str, float], quick_epochs: dict[str, int] | None
) -> Any:
    """The summary figure: test accuracy per method, one panel per data set.

    Each panel marks the chance level (a bar near it learned nothing).  A quick run says so in
    the title: its accuracies come from fewer epochs and are not the demo's results.
    """
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(r["data"] for r in rows))
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.5), constrained_layout=True)
    for ax, kind in zip(np.atleast_1d(axes), kinds):
        sub = [r for r in rows if r["data"] == kind]
        names = [r["method"] for r in sub]
        accs = [r["accuracy"] for r in sub]
        colours = ["#999999" if n.startswith(("best single", "concat")) else "#3b75af" for n in names]
        ax.barh(names[::-1], accs[::-1], color=colours[::-1])
        for y, (a, r) in enumerate(zip(accs[::-1], sub[::-1])):
            # (three places, as the table: 0.575 stored as 0.57499999 showed 0.57 at two)
            ax.text(a + 0.01, y, f"{a:.3f}  ({r['params']:,} params)", va="center", fontsize=8)
        ax.set_xlim(0, 1.25)
        ax.set_xlabel("test accuracy")
        if kind in chance:
            label = f"chance ({chance[kind]:.2f})"
            ax.axvline(chance[kind], color="#c0392b", linestyle="--", linewidth=1.2, label=label)
            # said in the axis label: a legend box inside the panel covers the bars' value labels
            ax.set_xlabel(f"test accuracy (dashed line: chance, {chance[kind]:.2f})")
        ax.set_title(f"{kind}: test accuracy by fusion method")
    if quick_epochs is not None:
        fig.suptitle(
            f"QUICK RUN (mmfuse demo --quick: {_epochs_text(quick_epochs)}): not the full demo's results",
            color="#c0392b",
        )
    return fig
