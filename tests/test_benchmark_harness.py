"""The benchmarks' statistics (``benchmarks/_harness.py``): what every reported ratio and
spread is computed with.  No test timed anything; a ratio upside down, a burst's first call
kept, an off-by-one quantile or a check relative to the wrong array would all have gone
into benchmarks/RESULTS.md unseen (a review of the benchmarks' own correctness)."""

from __future__ import annotations

import importlib.util
import types
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="module")
def harness():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "_harness.py"
    spec = importlib.util.spec_from_file_location("mmfuse_benchmarks_harness", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _clocked(harness, monkeypatch, costs, burst):
    """Candidates on a fake clock: each call of ``name`` advances it by ``costs[name]``, the
    first call of each of its bursts by 100 more (what sample_rounds must discard)."""
    now = [0.0]
    monkeypatch.setattr(harness, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))

    def candidate(name):
        calls = [0]

        def run():
            now[0] += costs[name] + (100.0 if calls[0] % burst == 0 else 0.0)
            calls[0] += 1

        return run

    return {name: candidate(name) for name in costs}


def test_rounds_discard_each_bursts_first_call(harness, monkeypatch):
    cands = _clocked(harness, monkeypatch, {"a": 1.0, "b": 2.0}, burst=3)
    rounds = harness.sample_rounds(cands, repeats=15, warmup=0, burst=3)
    assert [len(r) for r in rounds["a"]] == [2] * 8  # 16 samples for 15, two a round
    assert all(t == 1.0 for r in rounds["a"] for t in r) and all(t == 2.0 for r in rounds["b"] for t in r)
    assert harness.medians(rounds) == {"a": 1.0, "b": 2.0}


def test_medians_ratios_and_quantiles(harness):
    assert harness.medians({"a": [[1.0, 2.0], [3.0, 10.0]]}) == {"a": 2.5}  # over every round's samples
    # per round, the median of base over that of name: the speed-up of name
    rounds = {"plain": [[2.0, 2.0], [3.0, 3.0]], "mmfuse": [[1.0, 1.0], [6.0, 6.0]]}
    assert harness.round_ratios(rounds, "plain", "mmfuse") == [2.0, 0.5]
    values = list(np.random.default_rng().permutation(np.random.default_rng().random(11)))
    for q in (0.0, 0.1, 0.5, 0.9, 1.0):
        assert harness.quantile(values, q) == pytest.approx(np.quantile(values, q), rel=1e-12)


def test_check_same_is_relative_to_the_expected_result(harness):
    assert harness.check_same("ok", np.array([1.0, 2.0]), np.array([1.0, 2.0 + 1e-9]), 1e-8) <= 1e-9
    with pytest.raises(AssertionError, match="the results differ"):
        harness.check_same("large", np.array([1000.0]), np.array([1.0]), 1.0)  # 999 of want, 0.999 of got
    with pytest.raises(AssertionError, match=r"rel\. err nan"):
        harness.check_same("nan", np.array([np.nan, 1.0]), np.array([1.0, 1.0]), 1.0)
    with pytest.raises(AssertionError, match=r"shapes \(2,\), \(1, 2\)"):
        harness.check_same("shape", np.array([1.0, 1.0]), np.array([[1.0, 1.0]]), 1.0)
