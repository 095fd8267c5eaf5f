"""``mmfuse demo``'s pieces: the splits and their standardisation, what the training step
reports, and the run's bookkeeping (seeds, chance levels, the best single modality) with the
training replaced by a stub.  The end-to-end run is in test_cli.py; its only check of the
numbers is that each beats chance, which a demo scoring the training split, standardising the
test split with its own statistics or naming the worst single modality "best" would pass too
(a mutation review)."""

from __future__ import annotations

import numpy as np
import pytest

from mmfuse import _demo, datasets

torch = pytest.importorskip("torch")


def test_standardise_scales_both_splits_by_the_training_statistics():
    rng = np.random.default_rng(np.random.SeedSequence().entropy)
    train = [rng.normal(3.0, 2.0, (40, 7, 3)), rng.normal(-1.0, 0.5, (40, 5))]
    test = [rng.normal(5.0, 1.0, (9, 7, 3)), rng.normal(2.0, 3.0, (9, 5))]
    got_train, got_test = _demo._standardise(train, test)
    for a, b, ga, gb in zip(train, test, got_train, got_test):
        axes = tuple(range(a.ndim - 1))
        mu, sd = a.mean(axis=axes), a.std(axis=axes) + 1e-6
        np.testing.assert_allclose(ga, (a - mu) / sd, rtol=1e-12)
        np.testing.assert_allclose(gb, (b - mu) / sd, rtol=1e-12)  # not the test split's own
        np.testing.assert_allclose(ga.mean(axis=axes), 0.0, atol=1e-12)


def test_datasets_pair_each_split_with_its_own_targets():
    found = {d["kind"]: d for d in _demo._datasets(quick=True)}
    for kind, load in (("BasicMotions", datasets.load_basic_motions), ("mfeat", datasets.load_mfeat)):
        data, train, test = found[kind], load(split="train"), load(split="test")
        np.testing.assert_array_equal(data["train"][1], train.target)
        np.testing.assert_array_equal(data["test"][1], test.target)
        assert data["n_classes"] == train.n_classes
        for got, raw_test, raw_train in zip(data["test"][0], test.views, train.views):
            raw_train = np.asarray(raw_train, np.float32)
            axes = tuple(range(raw_train.ndim - 1))
            mu, sd = raw_train.mean(axis=axes), raw_train.std(axis=axes) + 1e-6
            np.testing.assert_allclose(got, (np.asarray(raw_test, np.float32) - mu) / sd, rtol=1e-4, atol=1e-4)


class _Fixed(torch.nn.Module):
    """Logits that are the first modality itself (one-hot rows), plus one trainable weight
    that does not change them: its accuracy is whatever the split's one-hot rows say."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))
        self.frozen = torch.nn.Parameter(torch.ones(5), requires_grad=False)

    def forward(self, xs):
        return xs[0] + 0.0 * self.w.sum()


def test_train_reports_the_test_splits_accuracy_and_the_trainable_parameters():
    eye = torch.eye(4)
    train_y = torch.tensor([0, 1, 2, 3, 0, 1])
    test_y = torch.tensor([0, 1, 2, 3])
    train = ([eye[train_y]], train_y)  # all right on the training split
    test = ([eye[torch.tensor([0, 1, 3, 2])]], test_y)  # half right on the test split
    steps = []
    acc, n_params, seconds = _demo._train(torch, _Fixed(), train, test, 3, lambda: steps.append(1))
    assert acc == 0.5 and n_params == 3 and seconds >= 0.0 and len(steps) == 3


def _stub_run(monkeypatch, tmp_path, capsys, quick=True):
    """``run_demo`` with ``_train`` replaced: each model's initial parameters are recorded, a
    single-modality model is checked to read its own modality only, and the accuracies are
    fixed per name (the best single modality neither the first nor the last of mfeat's)."""
    record = {}
    kinds = {2: "BasicMotions", 6: "mfeat"}
    loaders = {"BasicMotions": datasets.load_basic_motions, "mfeat": datasets.load_mfeat}

    def stub(torch_, model, train, test, epochs, progress):
        xs = test[0]
        kind = kinds[len(xs)]
        name = next(n for n, m in current.items() if m is model)
        record[kind, name] = torch.cat([p.detach().flatten() for p in model.parameters()])
        record[kind, "epochs"] = epochs
        for split, (_, target) in (("train", train), ("test", test)):
            np.testing.assert_array_equal(target.numpy(), loaders[kind](split=split).target)
        if name.startswith("single: "):
            m = _demo._VIEW_NAMES[kind].index(name[len("single: ") :])
            poisoned = [x if k == m else torch.full_like(x, float("nan")) for k, x in enumerate(xs)]
            with torch.no_grad():
                assert torch.isfinite(model(poisoned)).all(), name
            acc = 0.5 + 0.01 * ((m + 1) % len(xs))
        else:
            acc = 0.9
        return acc, 1, 0.0

    current = {}
    models = _demo._models

    def tracked(*args, **kwargs):
        factories = models(*args, **kwargs)

        def making(name, make):
            def made():
                current[name] = model = make()
                return model

            return made

        return {name: making(name, make) for name, make in factories.items()}

    monkeypatch.setattr(_demo, "_train", stub)
    monkeypatch.setattr(_demo, "_models", tracked)
    assert _demo.run_demo(quick=quick, out=str(tmp_path), progress=False) == 0
    return record, capsys.readouterr().out


def test_demo_seeds_each_model_names_chance_and_the_best_single_modality(monkeypatch, tmp_path, capsys):
    first, out = _stub_run(monkeypatch, tmp_path / "a", capsys)
    again, _ = _stub_run(monkeypatch, tmp_path / "b", capsys)
    assert first.keys() == again.keys() and len(first) > 10
    for key in first:  # every model starts from the same seed on every run
        torch.testing.assert_close(first[key], again[key], rtol=0, atol=0, msg=str(key))
    assert "chance: BasicMotions 0.25, mfeat 0.10" in out
    views = _demo._VIEW_NAMES
    best = {"BasicMotions": views["BasicMotions"][0], "mfeat": views["mfeat"][4]}
    for kind, view in best.items():
        row = next(line for line in out.splitlines() if line.startswith(kind) and "best single" in line)
        assert f"best single ({view})" in row and "0.5" in row.split(")")[-1], row


def test_demo_trains_the_full_epochs_unless_quick(monkeypatch, tmp_path, capsys):
    quick, _ = _stub_run(monkeypatch, tmp_path / "q", capsys)
    full, _ = _stub_run(monkeypatch, tmp_path / "f", capsys, quick=False)
    assert (quick["BasicMotions", "epochs"], quick["mfeat", "epochs"]) == (30, 20)
    assert (full["BasicMotions", "epochs"], full["mfeat", "epochs"]) == (150, 120)


def test_the_pre_flight_check_leaves_the_callers_random_state_alone():
    torch.manual_seed(3)
    before = torch.random.get_rng_state()
    _demo.check_models_train()
    assert torch.equal(torch.random.get_rng_state(), before)
