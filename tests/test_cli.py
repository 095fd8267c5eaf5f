"""The mmfuse command: info, verify, bench, demo; exit codes, tables, JSON schema, errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import mmfuse
from mmfuse import _cli, _console
from mmfuse._namespace import tree_map
from mmfuse.backends import BackendUnsupported


def test_info(capsys):
    assert _cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for section in ("array namespaces:", "backends:", "devices:", "config:"):
        assert section in out
    assert "numpy             found" in out
    assert "array_api  " in out and "reference  " in out
    assert "backend = 'auto'  (from default)" in out


def test_info_says_a_backend_with_registrations_misses_only_its_own(capsys, monkeypatch):
    """A registration for a backend whose own implementations cannot load (CuPy here) is
    listed under it, and the load error reads as its own implementations missing, not the
    backend missing (it had read as both working and missing; a review's find)."""
    from mmfuse.backends import register, unregister

    monkeypatch.setattr("mmfuse.backends.unavailable", lambda: {"cupy": "ImportError: no CuPy here"})
    register("moments", "cupy", lambda x, *, axis=-2, mask=None, eps=1e-5: (x, x),
             supports=lambda xp, device: "never", priority=0)  # fmt: skip
    try:
        assert _cli.main(["info"]) == 0
    finally:
        unregister("moments", "cupy")
    out = capsys.readouterr().out
    assert "  cupy       moments" in out
    assert "  cupy       own implementations missing: ImportError: no CuPy here" in out
    assert "  cupy       missing:" not in out


def test_info_says_why_a_refused_preference_is_not_in_force():
    """With MMFUSE_BACKEND=torch and a bad MMFUSE_PREFER, info printed "prefer = None (from
    environment (MMFUSE_PREFER))" and never the refused value."""
    import os

    env = {**os.environ, "MMFUSE_BACKEND": "torch", "MMFUSE_PREFER": "bogus"}
    res = subprocess.run([sys.executable, "-m", "mmfuse", "info"], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    line = next(ln for ln in res.stdout.splitlines() if ln.strip().startswith("prefer ="))
    assert "got 'bogus'; not in force while the backend is named" in line, line


def test_python_dash_m_runs_the_command():
    res = subprocess.run([sys.executable, "-m", "mmfuse", "info"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("mmfuse ")


def test_verify_passes_and_prints_table(capsys):
    code = _cli.main(
        [
            "verify",
            "--ops",
            "lowrank_fusion",
            "cp_fusion",
            "zoom_shift",
            "--namespaces",
            "numpy",
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "op " in out and "status" in out
    assert re.search(r"^lowrank_fusion +array_api ", out, re.M)
    assert re.search(r"^lowrank_fusion \(append_one=False, weights=None, bias=None\) +array_api .* ok ", out, re.M)
    assert "vs tensorly.cp_to_tensor" in out
    assert " 0 failed" in out


def test_verify_names_its_backends_whatever_the_configured_one(capsys):
    """With MMFUSE_BACKEND=torch (here its in-process equivalent) verify ran every row, then
    its TensorLy cross-check called cp_fusion on NumPy arrays under that policy: the refusal
    discarded the table and the command exited 2."""
    pytest.importorskip("tensorly")
    with mmfuse.config_context(backend="torch"):
        code = _cli.main(["verify", "--ops", "cp_fusion", "--namespaces", "numpy", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "vs tensorly.cp_to_tensor" in out


def test_verify_runs_the_tensorly_check_only_where_the_filters_allow(capsys):
    """The TensorLy cross-check (cp_fusion under "auto" on NumPy) ran whatever the filters:
    ``--backends reference``, which checks nothing (the reference is the oracle), exited 0 on
    its pass, and ``--namespaces dask`` got a NumPy row (a review's find)."""
    pytest.importorskip("tensorly")
    code = _cli.main(["verify", "--ops", "cp_fusion", "--backends", "reference", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 1 and "vs tensorly" not in captured.out
    assert "the reference is the oracle" in captured.err
    pytest.importorskip("dask")
    code = _cli.main(["verify", "--ops", "cp_fusion", "--namespaces", "dask", "--backends", "array_api", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "vs tensorly" not in out and "numpy" not in out


def _verify_planted(monkeypatch, capsys, op, planted, namespace="numpy"):
    """``mmfuse verify`` of ``op`` on the array_api backend with ``planted`` in place of the
    public function (the command calls the public op by name, so a wrong answer is planted
    there, not in the registry's private tables, which are not the command's business):
    (exit code, output)."""
    monkeypatch.setattr(mmfuse, op, planted)
    code = _cli.main(["verify", "--ops", op, "--namespaces", namespace, "--backends", "array_api", "--no-progress"])
    return code, capsys.readouterr().out


def test_verify_exits_non_zero_on_mismatch(monkeypatch, capsys):
    op = mmfuse.cp_fusion

    def broken(*args, **kwargs):
        return op(*args, **kwargs) * 1.01

    code, out = _verify_planted(monkeypatch, capsys, "cp_fusion", broken)
    assert code == 1
    assert "MISMATCH" in out


@pytest.mark.parametrize("op", ["lowrank_fusion", "sequence_fusion"])
def test_verify_catches_float32_computed_at_tf32_precision(monkeypatch, capsys, op):
    """Inputs rounded to TF32's 10-bit mantissa (a GPU matmul with TF32 on) are 2e-4 to 9e-4
    off: verify's float32 tolerance had been 1e-3 and passed them.  float64 rows are untouched."""
    public = getattr(mmfuse, op)

    def tf32(a):
        if not isinstance(a, np.ndarray) or a.dtype != np.float32:
            return a
        bits = a.copy().view(np.uint32)
        bits += np.uint32(0x1000)  # round to nearest at the 13th bit, then drop 13 bits
        bits &= np.uint32(0xFFFFE000)
        return bits.view(np.float32)

    def planted(*args, **kwargs):
        return public(*tree_map(tf32, args), **tree_map(tf32, kwargs))

    code, out = _verify_planted(monkeypatch, capsys, op, planted)
    rows = [line for line in out.splitlines() if " ok " in line or "MISMATCH" in line]
    assert code == 1
    assert rows and all(("MISMATCH" in r) == ("float32" in r) for r in rows), out


def test_verify_counts_a_missing_output_as_a_mismatch(monkeypatch, capsys):
    """An implementation giving fewer outputs than the reference (moments: the mean without the
    spread) is a MISMATCH: comparing pairwise alone would check the outputs it gave."""
    op = mmfuse.moments

    def half(*args, **kwargs):
        return op(*args, **kwargs)[:1]

    code, out = _verify_planted(monkeypatch, capsys, "moments", half)
    assert code == 1
    assert "MISMATCH" in out and "1 outputs where the reference gives 2" in out


def test_verify_catches_nan_in_a_later_output(monkeypatch, capsys):
    """A NaN spread after a right mean is a MISMATCH (max() of the outputs' errors had dropped
    a NaN that was not first)."""
    op = mmfuse.moments

    def nan_spread(*args, **kwargs):
        mean, std = op(*args, **kwargs)
        return mean, std * np.nan

    code, out = _verify_planted(monkeypatch, capsys, "moments", nan_spread)
    assert code == 1
    assert "MISMATCH" in out and "max rel err nan" in out


def test_verify_compares_labels_with_their_grouping(monkeypatch, capsys):
    """Interaction labels regrouped with the same integers in the same order (the order-1 term
    of modality 0 called (0, 1)) are a MISMATCH."""
    op = mmfuse.tensor_interactions

    def regrouped(*args, **kwargs):
        terms, labels = op(*args, **kwargs)
        flat = [m for label in labels for m in label]
        sizes = [len(label) for label in labels]
        sizes[1], sizes[2] = sizes[1] + sizes[2], 0  # the same integers, grouped otherwise
        out, start = [], 0
        for size in sizes:
            out.append(tuple(flat[start : start + size]))
            start += size
        return terms, out

    code, out = _verify_planted(monkeypatch, capsys, "tensor_interactions", regrouped)
    assert code == 1
    assert "labels differ from the reference's" in out


def test_verify_checks_the_outputs_namespace_and_dtype(monkeypatch, capsys):
    """An implementation answering NumPy float64 to torch float32 inputs, with the right values,
    is a MISMATCH naming what it returned."""
    pytest.importorskip("torch")
    import mmfuse.reference as ref
    from mmfuse._namespace import to_numpy

    def host(a):
        return tree_map(to_numpy, a)

    def on_host(xs, factors, weights=None, bias=None, *, append_one=True, present=None):
        return ref.lowrank_fusion(host(xs), host(factors), host(weights), host(bias), append_one=append_one,
                                  present=None if present is None else host(present))  # fmt: skip

    code, out = _verify_planted(monkeypatch, capsys, "lowrank_fusion", lambda *a, backend=None, **k: on_host(*a, **k),
                                "torch")  # fmt: skip
    assert code == 1
    assert "output 0 is numpy float64 for torch float32 inputs" in out


def test_verify_catches_float64_computed_in_float32(monkeypatch, capsys):
    """An implementation that computes float64 calls in float32 and widens the result is 1e-7
    off: a MISMATCH at verify's float64 tolerance, while its float32 rows pass (a mutation
    review: the tolerance loosened 1000x had gone unnoticed)."""
    public = mmfuse.lowrank_fusion

    def narrow(a):
        return a.astype(np.float32) if isinstance(a, np.ndarray) and a.dtype == np.float64 else a

    def in_float32(*args, **kwargs):
        wide = args[0][0].dtype == np.float64
        out = public(*tree_map(narrow, args), **tree_map(narrow, kwargs))
        return out.astype(np.float64) if wide else out

    code, out = _verify_planted(monkeypatch, capsys, "lowrank_fusion", in_float32)
    rows = [line for line in out.splitlines() if " ok " in line or "MISMATCH" in line]
    assert code == 1
    assert rows and all(("MISMATCH" in r) == ("float64" in r) for r in rows), out


def test_verify_checks_the_dtype_within_the_namespace(monkeypatch, capsys):
    """NumPy float64 outputs for NumPy float32 inputs are a MISMATCH (the namespace's test alone
    would pass them; a mutation review)."""
    public = mmfuse.lowrank_fusion

    def widened(*args, **kwargs):
        return public(*args, **kwargs).astype(np.float64)

    code, out = _verify_planted(monkeypatch, capsys, "lowrank_fusion", widened)
    assert code == 1
    assert "output 0 is numpy float64 for numpy float32 inputs" in out
    assert all(" ok " in r for r in out.splitlines() if "float64  " in r and "lowrank_fusion" in r), out


def test_verify_names_an_output_of_the_wrong_shape(monkeypatch, capsys):
    """An output with an extra leading axis broadcasts against the reference's and read as
    "max rel err inf" (or, had the shapes not been compared at all, passed): the row names both
    shapes."""
    public = mmfuse.cp_fusion
    args, kwargs = __import__("mmfuse._problems", fromlist=["make_problem"]).make_problem("cp_fusion", seed=0)
    batch, out_dim = public(*args, **kwargs).shape
    code, out = _verify_planted(monkeypatch, capsys, "cp_fusion", lambda *a, **k: public(*a, **k)[None])
    assert code == 1
    assert f"output 0 has shape (1, {batch}, {out_dim}) where the reference's has ({batch}, {out_dim})" in out


def test_verify_runs_the_backend_it_names(capsys):
    """Each row calls its own backend: a registration 1% off for the torch backend is caught on
    NumPy inputs (a verify that ran every row on one backend would pass it)."""
    pytest.importorskip("torch")
    from mmfuse.backends import register, unregister

    core = mmfuse.moments

    def off(x, *, axis=-2, mask=None, eps=1e-5):
        mean, std = core(x, axis=axis, mask=mask, eps=eps, backend="array_api")
        return mean * 1.01, std

    register("moments", "torch", off, supports=lambda xp, device: None, priority=0)
    try:
        code = _cli.main(["verify", "--ops", "moments", "--namespaces", "numpy", "--backends", "torch",
                          "--no-progress"])  # fmt: skip
    finally:
        unregister("moments", "torch")
    out = capsys.readouterr().out
    assert code == 1
    assert "MISMATCH" in out and "max rel err 1.0e-02" in out, out


def test_verify_tensorly_cross_check_can_fail(monkeypatch, capsys):
    """The cross-check against TensorLy's cp_to_tensor reports a MISMATCH (and verify fails)
    where the two disagree in the 7th digit: its 1e-10 bound is checked, not assumed."""
    tl = pytest.importorskip("tensorly")
    real = tl.cp_to_tensor
    monkeypatch.setattr(tl, "cp_to_tensor", lambda cp: real(cp) * (1 + 1e-7))
    code = _cli.main(["verify", "--ops", "cp_fusion", "--namespaces", "numpy", "--no-progress"])
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "vs tensorly.cp_to_tensor" in ln)
    assert code == 1 and "MISMATCH" in line, out


@pytest.mark.parametrize("namespace", ["numpy", "torch"])
def test_verify_catches_an_op_that_writes_to_its_inputs(monkeypatch, capsys, namespace):
    """The reference runs on its own copy of the problem, so an op that overwrote an input
    (here: its result written over xs[0]'s first row after computing it) with the right
    values passed (a review of the command); it is a MISMATCH naming the input."""
    if namespace == "torch":
        pytest.importorskip("torch")
    op = mmfuse.lowrank_fusion

    def scribbling(xs, *args, **kwargs):
        out = op(xs, *args, **kwargs)
        xs[0][0] = xs[0][0] * 2.0 + 1.0
        return out

    code, out = _verify_planted(monkeypatch, capsys, "lowrank_fusion", scribbling, namespace)
    assert code == 1
    assert "MISMATCH" in out and "input 0 was written to" in out


@pytest.mark.parametrize(
    ("op", "ignored"),
    [("cp_fusion", "present"), ("wander", "residual"), ("align", "schedule"), ("sequence_fusion", "mode")],
)
def test_verify_catches_an_op_that_ignores_an_option(monkeypatch, capsys, op, ignored):
    """verify checks each op on its default problem and on the options an implementation
    could ignore and pass it (a review of the command: a cp_fusion ignoring ``present``, a
    wander ignoring ``residual``, an align ignoring ``schedule`` all passed): the case's
    rows are MISMATCHes, the default problem's pass."""
    real = getattr(mmfuse, op)

    def ignoring(*args, **kwargs):
        kwargs.pop(ignored, None)
        return real(*args, **kwargs)

    code, out = _verify_planted(monkeypatch, capsys, op, ignoring)
    assert code == 1, out
    assert re.search(rf"^{op} \(.*{ignored}.* MISMATCH ", out, re.M), out
    assert not re.search(rf"^{op} +array_api .* MISMATCH ", out, re.M), out


def _off_without(name):
    """A planted bug: the op's (first) output 1% off where option ``name`` is None or not given."""

    def plant(real, *args, **kwargs):
        out = real(*args, **kwargs)
        if kwargs.get(name) is not None:
            return out
        return (out[0] * 1.01, *out[1:]) if isinstance(out, tuple) else out * 1.01

    return plant


def _given(change):
    """A planted bug: the op called with its keywords changed by ``change`` (a dict to a dict)."""
    return lambda real, *args, **kwargs: real(*args, **change(dict(kwargs)))


def _without(name):
    """A planted bug: option ``name`` ignored (the default used instead)."""
    return _given(lambda kwargs: {k: v for k, v in kwargs.items() if k != name})


def _replaced(name, old, new):
    """A planted bug: option ``name`` taken for ``new`` where it is ``old``."""
    return _given(lambda kwargs: {**kwargs, name: new} if name in kwargs and kwargs[name] == old else kwargs)


@pytest.mark.parametrize(
    ("op", "case", "plant"),
    [
        ("sequence_fusion", "masks=None", _off_without("masks")),
        ("cp_interactions", "present=None", _off_without("present")),
        ("moments", "4-D, axis=1, mask", _without("axis")),
        ("zoom_shift", "4-D, axis=1, mask, guide_mask", _without("axis")),
        ("align", "4-D, axis=1, masks", _without("axis")),
        ("zoom_shift", "eps=0.5", _without("eps")),
        ("align", "rounds=None, eps=0.5", _without("eps")),
        ("align", "rounds=None, eps=0.5", _replaced("rounds", None, 1)),
        ("wander", "activation=relu", _replaced("activation", "relu", "gelu")),
        ("wander", "activation=identity", _replaced("activation", "identity", "gelu")),
        # (a mutation review of the problems: each option below had been drawn so that
        # ignoring it changed nothing, and verify passed: ``present`` all True, masks all True,
        # eps and hub at their defaults, gelu_tanh as "gelu")
        ("lowrank_fusion", None, _without("present")),
        ("lowrank_interactions", None, _without("present")),
        ("sequence_fusion", (None, "mode=collapsed"), _without("masks")),
        ("moments", "mask, eps=0.1", _without("eps")),
        ("align", "topology=hub, hub=1", _without("hub")),
        ("wander", "mode=collapsed, masks, gelu_tanh, residual=none", _replaced("activation", "gelu_tanh", "gelu")),
    ],
    ids=["masks=None", "present=None", "moments-axis", "zoom_shift-axis", "align-axis", "zoom_shift-eps",
         "align-eps", "rounds=None-as-1", "relu", "identity", "lowrank-present", "lowrank_interactions-present",
         "sequence-masks", "moments-eps", "align-hub", "gelu_tanh"],
)  # fmt: skip
def test_verify_catches_a_wrong_answer_to_an_option_it_had_never_tried(monkeypatch, capsys, op, case, plant):
    """A second review of the command planted these bugs and verify passed each: a
    sequence_fusion wrong only without masks, a cp_interactions wrong only without
    ``present``, moments, zoom_shift and align ignoring ``axis`` (every problem used the
    default axis), zoom_shift and align ignoring ``eps``, align's exact limit (rounds=None)
    run as one round, wander's "relu" and "identity" taken for "gelu".  Each is now a failed
    row of the case that tries the option (a MISMATCH, or an ERROR where the mask's shape no
    longer fits), and of no other (``case``: one case, None for the default problem, or a
    tuple of them where several try the option)."""
    real = getattr(mmfuse, op)
    code, out = _verify_planted(monkeypatch, capsys, op, lambda *args, **kwargs: plant(real, *args, **kwargs))
    assert code == 1, out
    rows = re.findall(r"^(\S.*?) {2,}array_api +numpy +float(?:32|64) +(\S+) ", out, re.M)
    expected = {op if c is None else f"{op} ({c})" for c in (case if isinstance(case, tuple) else (case,))}
    failed = {name for name, status in rows if status in ("MISMATCH", "ERROR")}
    assert failed == expected, out
    assert all(status == "ok" for name, status in rows if name not in expected), out


def _arrays(tree):
    """The arrays in a problem's arguments (the project's walker of lists, tuples and dicts)."""
    found: list = []
    tree_map(found.append, tree)
    return found


def test_every_problem_is_float64_and_never_zeros():
    """What mmfuse._problems promises the commands: float64 data (a mutant drawing one op's
    inputs in float32 passed), never an all-zero array (nor one for tensor_fusion's inputs),
    finite values; every case's ``key=value`` label says what its keywords hold."""
    from mmfuse._problems import CASES, OPS, make_problem

    problems = [(op, None) for op in OPS] + [(op, case) for op, cases in CASES.items() for case in cases]
    for op, case in problems:
        args, kwargs = make_problem(op, seed=3, case=case)
        floats = [a for a in _arrays([args, kwargs]) if a.dtype.kind == "f"]
        assert floats, (op, case)
        for a in floats:
            assert a.dtype == np.float64 and np.all(np.isfinite(a)) and np.any(a != 0), (op, case, a.dtype)
        for part in (case or "").split(", "):
            key, _, value = part.partition("=")
            if value and key in kwargs:
                assert str(kwargs[key]) == value, (op, case, key, kwargs[key])


def test_bench_problems_are_larger_than_verify_problems():
    """``mmfuse bench`` times the bench-scale problems (a mutant giving the fusions verify's
    seven rows at bench scale passed: the command's test sees only the scale it asks for)."""
    from mmfuse._problems import make_problem

    for op in ("tensor_fusion", "lowrank_fusion", "cp_fusion", "sequence_fusion", "wander", "moments",
               "lowrank_interactions", "cp_interactions"):  # fmt: skip  (zoom_shift's, align's: 130-400 MB)
        small = sum(a.size for a in _arrays(make_problem(op, seed=1, scale="verify")))
        large = sum(a.size for a in _arrays(make_problem(op, seed=1, scale="bench")))
        assert large >= 100 * small, (op, small, large)


def test_make_problem_names_what_it_takes():
    """An unknown case or scale is refused naming the valid ones (a case was a bare KeyError;
    an unknown scale gave verify's sizes)."""
    from mmfuse._problems import make_problem

    with pytest.raises(ValueError, match=r"unknown case 'nope' of moments; valid cases: \['4-D, axis=1, mask'"):
        make_problem("moments", case="nope")
    with pytest.raises(ValueError, match=r"unknown case 'x' of lowrank_fusion"):
        make_problem("lowrank_fusion", case="x")
    with pytest.raises(ValueError, match=r"scale must be 'verify' or 'bench', got 'Bench'"):
        make_problem("moments", scale="Bench")


def test_verify_cp_interactions_problem_has_a_top_order_term():
    """The verified cp_interactions problem holds a sample with every modality present, so
    its highest-order term is not zero everywhere (an op dropping it had passed)."""
    from mmfuse._problems import make_problem

    args, kwargs = make_problem("cp_interactions", seed=0)
    terms, labels = mmfuse.cp_interactions(*args, **kwargs)
    assert labels[-1] == tuple(range(len(args[0])))
    assert np.abs(terms[-1]).max() > 0


def test_verify_and_bench_cover_the_interaction_terms(monkeypatch, capsys):
    """The interaction operators (numba and torch rows) are verified against the reference,
    labels included, and timed; wrong labels are a MISMATCH."""
    ops = ["tensor_interactions", "lowrank_interactions", "cp_interactions"]
    code = _cli.main(["verify", "--ops", *ops, "--namespaces", "numpy", "--backends", "array_api", "--no-progress"])
    out = capsys.readouterr().out
    # two dtypes of a default problem and one of other options each, and cp_interactions'
    # present=None
    assert code == 0 and out.count(" ok ") == 14, out
    code = _cli.main(["bench", "--quick", "--ops", *ops, "--namespaces", "numpy", "--backends", "array_api",
                      "--repeats", "1", "--no-progress"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and all(re.search(rf"{op} +array_api +numpy +[0-9.]+ ", out) for op in ops), out
    op = mmfuse.lowrank_interactions

    def relabelled(*args, **kwargs):
        terms, labels = op(*args, **kwargs)
        return terms, labels[::-1]

    monkeypatch.setattr(mmfuse, "lowrank_interactions", relabelled)
    code = _cli.main(["verify", "--ops", "lowrank_interactions", "--namespaces", "numpy", "--backends", "array_api",
                      "--no-progress"])  # fmt: skip
    assert code == 1 and "labels differ from the reference's" in capsys.readouterr().out


def test_bench_json_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    code = _cli.main(
        [
            "bench",
            "--quick",
            "--ops",
            "lowrank_fusion",
            "moments",
            "--namespaces",
            "numpy",
            "--repeats",
            "2",
            "--json",
            str(js),
            "--plot",
            str(png),
            "--no-progress",
        ]
    )
    assert code == 0
    data = json.loads(js.read_text())
    assert set(data) == {"mmfuse", "machine", "scale", "problems", "results"}
    assert data["scale"] == "verify"
    # what was timed: the arguments with each array as its shape
    from mmfuse._problems import make_problem

    args, kwargs = make_problem("lowrank_fusion", seed=0, scale="verify")
    xs, factors, weights, bias = args
    assert data["problems"]["lowrank_fusion"] == {
        "args": [[list(x.shape) for x in xs], [list(f.shape) for f in factors], list(weights.shape), list(bias.shape)],
        "kwargs": {"present": list(kwargs["present"].shape)},
    }
    assert set(data["problems"]) == {"lowrank_fusion", "moments"}
    ran = [r for r in data["results"] if r["status"] == "ok"]
    assert {r["op"] for r in ran} == {"lowrank_fusion", "moments"}
    for r in ran:
        assert set(r) >= {"op", "backend", "namespace", "dtype", "status", "seconds"}
        assert r["seconds"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "speed-up" in capsys.readouterr().out


def test_unknown_op_or_backend_lists_valid_ones():
    with pytest.raises(SystemExit, match=r"unknown op 'nope'; valid ops: tensor_fusion, lowrank_fusion"):
        _cli.main(["bench", "--ops", "nope"])
    with pytest.raises(SystemExit, match=r"unknown backend 'fast'; valid backends: array_api, reference"):
        _cli.main(["bench", "--backends", "fast"])
    for command in ("verify", "bench"):  # each names what it checks, whatever the other did
        with pytest.raises(SystemExit, match=r"unknown op 'nope'; valid ops: tensor_fusion, lowrank_fusion"):
            _cli.main([command, "--ops", "nope"])
        with pytest.raises(SystemExit, match=r"unknown backend 'fast'; valid backends: array_api, reference"):
            _cli.main([command, "--backends", "fast"])


@pytest.fixture
def problems_asked(monkeypatch):
    """The (seed, scale) of every problem the command asks ``mmfuse._problems.make_problem``
    for, in order; each is built at verify scale whatever was asked (timing the bench-scale
    problems themselves takes minutes)."""
    import mmfuse._problems as problems

    asked, make = [], problems.make_problem

    def recorded(op, *, seed=None, scale="verify", case=None):
        asked.append((seed, scale))
        return make(op, seed=seed, scale="verify", case=case)

    monkeypatch.setattr(problems, "make_problem", recorded)
    return asked


def test_verify_checks_the_problems_of_the_seed_it_is_given(problems_asked, capsys):
    """``--seed`` reaches every problem verify makes, its reference answers' too."""
    argv = ["verify", "--ops", "moments", "--namespaces", "numpy", "--backends", "array_api", "--no-progress"]
    for seed in (0, 7):  # (0, the default, is a seed one may also give)
        problems_asked.clear()
        assert _cli.main([*argv, "--seed", str(seed)]) == 0
        assert problems_asked and {s for s, _ in problems_asked} == {seed}
    capsys.readouterr()


def test_python_dash_m_exits_with_the_commands_status():
    """``python -m mmfuse`` exits with main's status (a verify that checked nothing: 1)."""
    res = subprocess.run([sys.executable, "-m", "mmfuse", "verify", "--ops", "moments", "--backends", "reference",
                          "--no-progress"], capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 1, res.stderr


def test_tables_have_no_trailing_spaces():
    text = _console.table([{"a": "x", "b": "1"}, {"a": "longer", "b": ""}], ["a", "b"])
    lines = text.splitlines()
    assert all(line == line.rstrip() for line in lines), lines
    assert lines[-1] == "longer"


def test_missing_dependency_names_the_extra(monkeypatch):
    with pytest.raises(_console.MissingDependency, match=r"pip install 'mmfuse\[all\]'"):
        _console.require("surely_not_a_module_xyz")
    monkeypatch.setitem(sys.modules, "cupy", None)  # importing cupy fails, installed or not
    with pytest.raises(_console.MissingDependency, match=r"pip install 'mmfuse\[cupy\]'"):
        _console.require("cupy")
    # numba alone serves the CPU kernels: its extra adds numba-cuda and the CUDA bindings
    # (a review measured a 380 MB environment on a CPU-only machine)
    monkeypatch.setitem(sys.modules, "numba", None)
    with pytest.raises(
        _console.MissingDependency,
        match=r"install it with: pip install numba, or pip install 'mmfuse\[numba\]' for the CUDA kernels too$",
    ):
        _console.require("numba")


def test_demo_without_torch_leaves_no_folder(tmp_path, monkeypatch, capsys):
    """The demo made its output folder before finding torch missing, and left it empty."""
    monkeypatch.setitem(sys.modules, "torch", None)  # importing torch fails, installed or not
    out = tmp_path / "demo-out"
    assert _cli.main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 2
    assert "mmfuse[torch]" in capsys.readouterr().err
    assert not out.exists()


class _BrokenImport:
    """A meta-path finder whose modules fail to import with OSError, as a CUDA build of torch
    missing a shared library does."""

    def __init__(self, *names):
        self.names = names

    def find_spec(self, name, path=None, target=None):
        if name in self.names:
            raise OSError(f"lib{name}_cuda.so: cannot open shared object file")
        return None


def test_a_broken_installation_is_one_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    """An optional module whose import fails with something other than ImportError (a CUDA
    wheel missing a shared library: OSError) gave the demo a traceback and exit 1, where
    ``mmfuse info`` named it; and a broken matplotlib gave one after the whole demo had run
    (a review's find), as it did where only pyplot failed (its compiled Agg backend).  A
    one-line message and exit 2, no folder left, no timing done; no figure, a note."""
    from mmfuse import _demo

    monkeypatch.setattr(sys, "meta_path", [_BrokenImport("torch", "matplotlib.pyplot"), *sys.meta_path])
    for name in ("torch", "matplotlib.pyplot"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(_console.MissingDependency, match=r"^torch is needed for this command but its import failed \(OSError: libtorch_cuda"):
        _console.require("torch")
    out = tmp_path / "demo-out"
    assert _cli.main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "its import failed (OSError" in err and "Traceback" not in err
    assert not out.exists()
    assert _demo._figure([], str(tmp_path / "f.png"), chance={}, quick_epochs=None) is False
    assert "no figure: matplotlib.pyplot is needed for this command but its import failed (OSError" in capsys.readouterr().out
    report = tmp_path / "t.json"
    argv = ["bench", "--quick", "--ops", "moments", "--plot", str(tmp_path / "p.png"), "--json", str(report)]
    assert _cli.main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "matplotlib.pyplot is needed for this command but its import failed (OSError" in err
    assert "Traceback" not in err and not report.exists()


def test_demo_refuses_a_backend_that_cannot_train_before_any_work(tmp_path, monkeypatch, capsys):
    """MMFUSE_BACKEND=reference (no autograd): the demo had failed at its first mmfuse layer,
    after the plain models of the first data set had trained, and left an empty folder."""
    pytest.importorskip("torch")
    from mmfuse import _demo

    def boom(*a, **k):
        raise AssertionError("a model trained before the backend was checked")

    monkeypatch.setattr(_demo, "_train", boom)
    out = tmp_path / "demo-out"
    with mmfuse.config_context(backend="reference"):
        assert _cli.main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "backend 'reference' cannot take torch arrays" in err and "needs inputs that require no gradient" in err
    assert not out.exists()


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, capsys, monkeypatch):
    torch = pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    from mmfuse import _demo

    # it trains on one torch thread (numbers that do not depend on the core count), and gives
    # the caller's setting back
    seen, train = set(), _demo._train
    monkeypatch.setattr(_demo, "_train", lambda *a: seen.add(torch.get_num_threads()) or train(*a))
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert _cli.main(["demo", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
        assert seen == {1} and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out
    assert (tmp_path / "demo.png").read_bytes()[:4] == b"\x89PNG"
    table_text, summary = (tmp_path / "demo.txt").read_text().split("\n\n")
    assert summary.startswith("chance: ") and "(quick run: " in summary  # the file says so too
    rows = [line.split() for line in table_text.splitlines()[2:]]
    chance = {"BasicMotions": 0.25, "mfeat": 0.10}
    methods = set()
    for row in rows:
        data, accuracy = row[0], float(row[-3])
        methods.add(" ".join(row[1:-3]))
        assert accuracy > chance[data], row
    assert any(m.startswith("best single") for m in methods)
    for name in (
        "concatenation",
        "TFN",
        "LMF (rank 4)",
        "CP fusion (rank 8)",
        "Wander (trainable init)",
        "Wander (released parity init)",
        "Zoom-and-Shift + concat",
    ):
        assert name in methods
    assert "chance:" in out
    assert "quick run" in out.split("chance:")[1]
    for data, n_modalities in (("BasicMotions", 2), ("mfeat", 6)):  # the trained LMF by order (#22)
        line = next(li for li in out.splitlines() if li.startswith(f"LMF (rank 4) on {data}, share"))
        shares = [float(p.split(": ")[1]) for p in line.split(": ", 1)[1].split(", ")]
        assert len(shares) == n_modalities + 1 and abs(sum(shares) - 1) < 0.05, line


# --------------------------------------------------------------------------- CLI defects fixed


def test_verify_and_bench_run_on_jax_and_dask(capsys):
    pytest.importorskip("jax")
    pytest.importorskip("dask.array")
    code = _cli.main(
        ["verify", "--ops", "moments", "--backends", "array_api", "--namespaces", "jax", "dask", "--no-progress"]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "ERROR" not in out and "MISMATCH" not in out
    assert re.search(r"^moments +array_api +jax +float32 +ok ", out, re.M)
    assert re.search(r"^moments +array_api +dask +float64 +ok ", out, re.M)
    assert re.search(r"^moments \(mask, eps=0.1\) +array_api +dask +float64 +ok ", out, re.M)
    code = _cli.main(
        ["bench", "--quick", "--ops", "moments", "--backends", "array_api", "--namespaces", "jax", "dask",
         "--repeats", "1", "--no-progress"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.count(" ok") == 2


@pytest.mark.parametrize(
    "argv",
    [
        ["verify", "--seed", "-1"],
        ["bench", "--repeats", "0"],
        ["bench", "--repeats", "-3"],
        ["bench", "--repeats", "x"],
    ],
)
def test_bad_seed_or_repeats_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        _cli.main(argv)
    assert exc.value.code == 2
    assert "must be at least" in capsys.readouterr().err or argv[-1] == "x"


def test_unwritable_outputs_fail_up_front(tmp_path, capsys, monkeypatch):
    def boom(*a, **k):  # the work must not start
        raise AssertionError("work started before the output path was checked")

    monkeypatch.setattr("mmfuse._demo.run_demo", boom)
    afile = tmp_path / "f"
    afile.write_text("x")
    (tmp_path / "d" / "demo.png").mkdir(parents=True)
    cases = [
        ["bench", "--quick", "--json", str(tmp_path / "nope" / "x.json")],
        ["bench", "--quick", "--json", str(tmp_path)],
        ["bench", "--quick", "--plot", str(tmp_path / "nope" / "x.png")],
        ["demo", "--out", str(afile)],
        ["demo", "--out", str(tmp_path / "d")],
        ["demo", "--out", str(afile / "sub")],
    ]
    for argv in cases:
        with pytest.raises(SystemExit) as exc:
            _cli.main([*argv, "--no-progress"])
        assert exc.value.code == 2, argv
        assert capsys.readouterr().err.startswith("mmfuse: cannot "), argv
    # a trailing slash names a folder: it had passed the check (dirname drops it), and the
    # bench failed only after all its timing, saying "Is a directory" of a path that was none
    for argv in (["bench", "--json", f"{tmp_path / 'new'}/"], ["bench", "--json", f"{afile}/"]):
        with pytest.raises(SystemExit) as exc:
            _cli.main([*argv, "--no-progress"])
        assert exc.value.code == 2, argv
        assert "a trailing '/' names a directory, not a file" in capsys.readouterr().err, argv
    # a file where a folder is needed is named as such (it was "directory ... does not exist")
    with pytest.raises(SystemExit):
        _cli.main(["bench", "--quick", "--json", str(afile / "x.json"), "--no-progress"])
    assert "is a file, not a directory" in capsys.readouterr().err


@pytest.mark.skipif(not hasattr(os, "statvfs"), reason="no statvfs here")
@pytest.mark.parametrize("read_only", [True, False])
def test_an_unwritable_output_says_why(tmp_path, capsys, monkeypatch, read_only):
    """A folder on a read-only file system was said to deny permission, which sends the user
    to the file's mode (a review's find): the checks of an output file and of a folder to
    create name a read-only file system, and permissions otherwise."""
    real_statvfs = os.statvfs

    class Flags:
        def __init__(self, result):
            self.f_flag = result.f_flag | (os.ST_RDONLY if read_only else 0)

    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    monkeypatch.setattr(os, "statvfs", lambda p: Flags(real_statvfs(p)))
    with pytest.raises(SystemExit) as exc:
        _cli.main(["bench", "--quick", "--json", str(tmp_path / "x.json"), "--no-progress"])
    assert exc.value.code == 2
    why = "read-only file system" if read_only else "permission denied"
    assert capsys.readouterr().err.strip() == f"mmfuse: cannot write {str(tmp_path / 'x.json')!r}: {why}"
    folder = tmp_path / "new" / "out"  # a folder to create, in one that exists
    with pytest.raises(SystemExit) as exc:
        _cli.main(["demo", "--quick", "--out", str(folder), "--no-progress"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == f"mmfuse: cannot create folder {str(folder)!r}: {why} in {str(tmp_path)!r}"


def test_an_unknown_option_names_its_subcommand(capsys):
    """A misspelt option of a subcommand is reported with that subcommand's usage (argparse's
    parse_args gave the top-level usage, which lists no option of it); status 2."""
    for argv, usage in (
        (["demo", "--quik"], "usage: mmfuse demo [-h] [--quick]"),
        (["bench", "--repeatz", "3"], "usage: mmfuse bench [-h]"),
        (["info", "--probe"], None),  # an abbreviation argparse accepts: no error
    ):
        if usage is None:
            assert _cli.build_parser().parse_known_args(argv)[1] == []
            continue
        with pytest.raises(SystemExit) as exc:
            _cli.main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(usage), err
        assert f"mmfuse {argv[0]}: error: unrecognized arguments: {' '.join(argv[1:])}" in err
    # before the subcommand: the top level's (it had blamed the subcommand; a final review)
    with pytest.raises(SystemExit) as exc:
        _cli.main(["--quik", "verify"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: mmfuse [-h]") and "mmfuse: error: unrecognized arguments: --quik" in err, err


def test_bench_reports_the_median_and_the_speed_up_over_array_api(monkeypatch, tmp_path, capsys):
    """A row's seconds are the median of its timed calls and its speed-up the array_api NumPy
    row's median over its own (above 1: faster), on a clock this test sets: 3, 1, 2 units for
    array_api (median 2, min 1) and 1, 0.25, 0.5 for the reference (median 0.5), so 4.00x
    (a mutation review: min for median, or the ratio inverted, had passed every test)."""
    units = {"array_api": [3.0, 1.0, 2.0], "reference": [1.0, 0.25, 0.5]}
    clock = [0.0]
    calls = dict.fromkeys(units, -1)  # the first call of each row is its untimed warm-up

    def timed(func, backend, args, kwargs):
        calls[backend] += 1
        if calls[backend] > 0:
            clock[0] += units[backend][calls[backend] - 1]
        return np.zeros(1)

    monkeypatch.setattr(_cli, "_call", timed)
    monkeypatch.setattr(_cli.time, "perf_counter", lambda: clock[0])
    js = tmp_path / "b.json"
    code = _cli.main(["bench", "--quick", "--ops", "moments", "--namespaces", "numpy", "--backends", "array_api",
                      "reference", "--repeats", "3", "--json", str(js), "--no-progress"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    rows = {r["backend"]: r for r in json.loads(js.read_text())["results"]}
    assert rows["array_api"]["seconds"] == 2.0 and rows["reference"]["seconds"] == 0.5
    assert rows["array_api"]["vs_array_api_numpy"] == 1.0 and rows["reference"]["vs_array_api_numpy"] == 4.0
    assert "4.00x" in out


def test_bench_times_the_bench_scale_problems_unless_quick(problems_asked, tmp_path, capsys):
    """Without --quick the timed problems are the bench-scale ones (and the JSON says so);
    with it, the verify-scale ones (seen through make_problem's scale argument)."""
    for quick, scale in ((False, "bench"), (True, "verify")):
        problems_asked.clear()
        js = tmp_path / f"{scale}.json"
        argv = ["bench", "--ops", "moments", "--namespaces", "numpy", "--backends", "array_api", "--repeats", "1",
                "--json", str(js), "--no-progress"]  # fmt: skip
        assert _cli.main(argv + (["--quick"] if quick else [])) == 0
        assert problems_asked and {a for _, a in problems_asked} == {scale}
        assert json.loads(js.read_text())["scale"] == scale
    capsys.readouterr()


def test_bench_reports_any_op_exception_as_an_error_row(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("kaput")

    monkeypatch.setattr(mmfuse, "moments", broken)
    code = _cli.main(
        ["bench", "--quick", "--ops", "moments", "lowrank_fusion", "--backends", "array_api",
         "--namespaces", "numpy", "--repeats", "1", "--no-progress"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 1
    assert "error: RuntimeError: kaput" in out
    assert "lowrank_fusion  array_api  numpy" in out  # the run went on


def test_bench_output_names_refused_up_front(tmp_path, monkeypatch, capsys):
    """--plot writes a PNG (another extension failed in matplotlib after all the work, exit 1),
    and an empty --json name is an error rather than nothing written, both before any work."""
    monkeypatch.setattr(_cli, "_call", lambda *a, **k: (_ for _ in ()).throw(AssertionError("work started")))
    for argv, message in (
        (["--plot", str(tmp_path / "p.xyz")], "--plot writes a PNG: give a file name ending in .png"),
        (["--json", ""], "--json needs a file name, got an empty one"),
        # one file for both: the PNG had replaced the report (a review's find)
        (["--json", str(tmp_path / "b.png"), "--plot", str(tmp_path / "." / "b.png")],
         "--json and --plot name the same file"),
    ):  # fmt: skip
        with pytest.raises(SystemExit) as exc:
            _cli.main(["bench", "--quick", "--ops", "moments", "--no-progress", *argv])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


def test_bench_says_the_reference_is_skipped_at_bench_scale(capsys):
    code = _cli.main(["bench", "--ops", "moments", "--backends", "reference", "--namespaces", "numpy", "--no-progress"])
    captured = capsys.readouterr()
    assert "reference: skipped at bench scale" in captured.out
    # and a run that timed nothing is no success (it exited 0, as verify's "nothing was checked")
    assert code == 1
    assert "mmfuse bench: nothing was timed for namespace numpy, backend reference" in captured.err


def test_bench_fails_where_a_named_backend_or_namespace_timed_nothing(monkeypatch, capsys):
    """Exit 1 when nothing was timed, or nothing for a namespace or backend named on the
    command line; the default namespaces (numpy, torch) are not named, so a machine without
    torch still benches NumPy with exit 0."""
    argv = ["bench", "--quick", "--ops", "moments", "--repeats", "1", "--no-progress"]
    monkeypatch.setattr(_cli, "_converter", lambda ns, dtype: None if ns in ("torch", "cupy") else (lambda a: a))
    assert _cli.main([*argv, "--backends", "array_api"]) == 0  # torch (a default) skipped: fine
    assert "nothing was timed" not in capsys.readouterr().err
    assert _cli.main([*argv, "--backends", "array_api", "--namespaces", "numpy", "cupy"]) == 1
    captured = capsys.readouterr()
    assert "mmfuse bench: nothing was timed for namespace cupy (see the lines above)" in captured.err
    # ... and the lines above say why, as verify's detail column
    assert re.search(r"moments +array_api +cupy +- +- +skipped +cupy not available", captured.out)


def test_bench_times_lazy_and_asynchronous_results_to_completion():
    """A Dask result is computed and a JAX one waited for inside the timed call (the time was
    the graph's construction, or JAX's dispatch, alone)."""
    da = pytest.importorskip("dask.array")
    from dask.callbacks import Callback

    ran = []

    class Count(Callback):
        def _pretask(self, key, dsk, state):
            ran.append(key)

    with Count():
        _cli._sync([da.ones((4, 3), chunks=2) * 2.0])
    assert ran, "the Dask graph was not computed"
    jnp = pytest.importorskip("jax.numpy")
    waited = []

    class Pending:  # stands for a JAX array: block_until_ready is what bench must call
        def block_until_ready(self):
            waited.append(True)

    _cli._sync((jnp.ones(2), Pending()))
    assert waited == [True]


def test_bench_says_why_a_backend_is_skipped_and_dedupes_namespaces(monkeypatch, capsys):
    from mmfuse import backends

    monkeypatch.setattr(backends, "unavailable", lambda: {"numba": "ImportError: no numba here"})
    monkeypatch.setattr(
        backends,
        "available",
        lambda op=None: ["array_api", "reference"] if op else {},
    )
    code = _cli.main(["bench", "--quick", "--ops", "moments", "--backends", "numba", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 1  # a backend named that timed nothing
    assert "numba: skipped, not available here: ImportError: no numba here" in captured.out
    assert "nothing was timed for backend numba" in captured.err
    code = _cli.main(
        ["bench", "--quick", "--ops", "moments", "--backends", "array_api", "--namespaces", "numpy", "numpy",
         "--repeats", "1", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    assert capsys.readouterr().out.count("moments  array_api  numpy") == 1
    code = _cli.main(
        ["verify", "--ops", "moments", "--backends", "array_api", "--namespaces", "numpy", "numpy", "--no-progress"]
    )
    assert code == 0
    # float32 and float64 of the default problem, the masked one and the 4-D one, the namespace once
    assert len(re.findall(r"^moments.* +array_api +numpy ", capsys.readouterr().out, re.M)) == 6


def test_bad_env_backend_info_reports_it_others_exit_2():
    import os

    env = {**os.environ, "MMFUSE_BACKEND": "bogus"}
    res = subprocess.run([sys.executable, "-m", "mmfuse", "info"], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert "MMFUSE_BACKEND" in res.stdout.split("config:")[1] and "'bogus'" in res.stdout
    res = subprocess.run(
        [sys.executable, "-m", "mmfuse", "verify", "--ops", "moments", "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and "MMFUSE_BACKEND" in res.stderr


_INFO_WITHOUT = """
import importlib.abc, sys

class Absent(importlib.abc.MetaPathFinder):  # torch and jax as if not installed
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "jax"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Absent())
sys.modules["dask"] = None  # blocked: installing it would not help, so no hint
from mmfuse import _cli
_cli.main(["info"])
"""


def test_info_says_how_to_install_a_missing_framework():
    """A framework missing from the machine gets its install command in ``info``'s namespace
    and backend lines (only CuPy's and numba's backends said one; torch's and Triton's gave
    the bare ModuleNotFoundError; a review's find); an import blocked by ``sys.modules[name] =
    None`` gets none."""
    res = subprocess.run([sys.executable, "-c", _INFO_WITHOUT], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    missing = [line.split()[0] for line in res.stdout.splitlines() if "missing:" in line]
    hinted = [line.split()[0] for line in res.stdout.splitlines()
              if line.endswith("No module named 'torch' (pip install 'mmfuse[torch]')")]  # fmt: skip
    assert hinted == ["torch", "torch", "triton"], res.stdout  # the namespace, the two backends
    assert "No module named 'jax' (pip install 'mmfuse[jax]')\n" in res.stdout
    assert "dask" in missing and "'dask' is not a package\n" in res.stdout and "mmfuse[dask]" not in res.stdout


def test_output_characters_the_stdout_cannot_encode_are_escaped(tmp_path):
    """An ASCII or cp1252 stdout (Windows' redirected output, PYTHONIOENCODING, a C locale)
    raised UnicodeEncodeError at a report naming a non-ASCII setting or path, after the work
    was done (a review's find); it writes them as escapes now, as stderr does, with status 0."""
    env = {**os.environ, "PYTHONIOENCODING": "ascii", "MMFUSE_BACKEND": "caf\u00e9"}
    res = subprocess.run([sys.executable, "-m", "mmfuse", "info"], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert "invalid:" in res.stdout and "caf\\xe9" in res.stdout, res.stdout
    out = tmp_path / "r\u00e9sultats \u0436" / "b.json"
    out.parent.mkdir()
    env = {**os.environ, "PYTHONIOENCODING": "cp1252"}
    args = ["bench", "--quick", "--ops", "moments", "--backends", "array_api", "--namespaces", "numpy", "--json", str(out)]
    res = subprocess.run([sys.executable, "-m", "mmfuse", *args], capture_output=True, encoding="cp1252", timeout=300, env=env)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert json.loads(out.read_text())["results"] and "r\u00e9sultats \\u0436" in res.stdout, res.stdout


_ESCAPING_IN_PROCESS = """
import io, sys
from mmfuse import _cli
for errors in ("strict", "surrogateescape"):
    stream = io.TextIOWrapper(io.BytesIO(), encoding="ascii", errors=errors)
    sys.stdout = stream
    status = _cli.main(["info"])
    sys.stdout = sys.__stdout__
    print(status, stream.errors, "caf\\\\xe9" in stream.buffer.getvalue().decode("ascii"))
"""


def test_the_escaping_stdout_is_put_back_after_an_in_process_call():
    """main() switches stdout to escaping only while a command runs: a program calling it
    in-process gets its stream back as it was (strict, or surrogateescape).  (A fresh process:
    the environment's settings are read once per process.)"""
    env = {**os.environ, "MMFUSE_BACKEND": "caf\u00e9"}
    res = subprocess.run([sys.executable, "-c", _ESCAPING_IN_PROCESS], capture_output=True, text=True, env=env,
                         timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["0 strict True", "0 surrogateescape True"], res.stdout


def test_a_failing_file_on_another_drive_is_not_taken_for_the_output(monkeypatch):
    """On Windows ``commonpath`` of paths on two drives raises ValueError, which buried the
    error being reported (a file read under C: failing while --out is on D:; a review's
    find): such a file is simply not inside the output."""
    import ntpath

    monkeypatch.setattr(_cli.os.path, "commonpath", ntpath.commonpath)
    assert not _cli._inside("C:\\Users\\me\\data.npz", "D:\\res")
    assert _cli._inside("D:\\res\\b.json", "D:\\res") and _cli._inside("D:\\res", "D:\\res")


def test_info_queries_cuda_devices_only_with_probe_gpu():
    # a stand-in cupy, already imported (as dask.array does when CuPy is installed)
    code = """
import importlib.machinery, sys, types
probed = []
def count():
    probed.append(1)
    return 0
fake = types.ModuleType("cupy")
fake.__spec__ = importlib.machinery.ModuleSpec("cupy", None)
fake.ndarray = type("ndarray", (), {})
fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=count))
sys.modules["cupy"] = fake
from mmfuse import _cli
_cli.main(["info"])
assert not probed, "info queried CUDA devices without --probe-gpu"
_cli.main(["info", "--probe-gpu"])
assert probed, "--probe-gpu did not query CUDA devices"
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


# --------------------------------------------------------------------------- layering, CLI polish


def _imported_modules(path):
    """Every module a source file imports, at module or function level (relative ones resolved)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ("mmfuse." if node.level else "") + (node.module or "")
            found.add(base.rstrip("."))
            found.update(f"{base.rstrip('.')}.{alias.name}" for alias in node.names)
    return found


def test_demo_and_console_never_import_the_cli():
    from pathlib import Path

    package = Path(_cli.__file__).parent
    assert "mmfuse._cli" not in _imported_modules(package / "_demo.py")
    assert not {"mmfuse._cli", "mmfuse._demo"} & _imported_modules(package / "_console.py")


def test_version_flag_and_info_show_the_version(capsys):
    with pytest.raises(SystemExit) as exc:
        _cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"mmfuse {mmfuse.__version__}\n"
    assert _cli.main(["info"]) == 0
    assert capsys.readouterr().out.startswith(f"mmfuse {mmfuse.__version__}  (Python ")


def test_bench_says_what_speed_up_is_relative_to(capsys):
    argv = ["bench", "--quick", "--ops", "moments", "--namespaces", "numpy", "--repeats", "1", "--no-progress"]
    assert _cli.main([*argv, "--backends", "array_api", "reference"]) == 0
    out = capsys.readouterr().out
    assert "1.00x" in out  # the baseline's own row
    assert out.splitlines()[-1].startswith("speed-up: relative to the array_api backend on numpy")
    # without the baseline the column is empty, and the line says why and how to get it
    assert _cli.main([*argv, "--backends", "reference"]) == 0
    out = capsys.readouterr().out
    assert "x " not in out.split("-\n", 1)[1]
    assert "its baseline (the array_api backend on numpy) was not timed" in out


def test_shorten_cuts_between_words():
    text = "needs NumPy arrays (CPU kernels) or CuPy arrays or torch CUDA tensors"
    assert _console.shorten(text, 100) == text
    short = _console.shorten(text, 60)
    assert len(short) <= 60 and short.endswith(" ...")
    assert text.startswith(short[: -len(" ...")] + " ")  # whole words only
    assert _console.shorten("a   b\n c", 10) == "a b c"  # one line
    assert _console.shorten("x" * 30, 10) == "xxxxxxx..."  # one word longer than the width


def test_verify_catches_refusals_by_type_and_keeps_whole_words(monkeypatch, capsys):
    reason = (
        "needs NumPy arrays (CPU kernels) or CuPy arrays or torch CUDA tensors, and a long tail "
        "of further explanation that does not fit in the detail column of the table"
    )

    def refuse(*args, **kwargs):  # no "cannot take" in it: the type alone makes it a refusal
        raise BackendUnsupported(f"backend 'array_api' will not run moments here: {reason}")

    monkeypatch.setattr(mmfuse, "moments", refuse)
    argv = ["verify", "--ops", "moments", "--backends", "array_api", "--namespaces", "numpy", "--no-progress"]
    assert _cli.main(argv) == 1  # a refusal is no failure, but a backend named and never checked is
    captured = capsys.readouterr()
    assert "nothing was checked for namespace numpy, backend array_api" in captured.err
    lines = [line for line in captured.out.splitlines() if line.startswith("moments")]
    assert len(lines) == 6 and all(" n/a " in line for line in lines)  # the default problem and 2 others
    detail = lines[0].split(" n/a ", 1)[1].strip()
    assert detail.endswith(" ...") and len(detail) <= 100
    assert reason.startswith(detail[: -len(" ...")] + " ")  # cut between words: "... torch CUDA", never "CUD"

    def fail(*args, **kwargs):
        raise RuntimeError("kaput " + "word " * 40)

    monkeypatch.setattr(mmfuse, "moments", fail)
    assert _cli.main(argv) == 1
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("moments")]
    assert all(line.rstrip().endswith("word ...") for line in lines), lines


def test_bench_counts_a_refusal_as_not_applicable(monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise BackendUnsupported("needs something this machine lacks")

    monkeypatch.setattr(mmfuse, "moments", refuse)
    code = _cli.main(
        ["bench", "--quick", "--ops", "moments", "--backends", "array_api", "--namespaces", "numpy",
         "--repeats", "1", "--no-progress"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 1, captured.out  # not an error, but what was named timed nothing (as verify)
    assert re.search(r"moments +array_api +numpy +- +- +n/a +needs something this machine lacks", captured.out)
    assert "nothing was timed for namespace numpy, backend array_api" in captured.err


def test_verify_checks_every_installed_namespace_by_default(monkeypatch, capsys):
    seen = []

    def rows(ops, backends_wanted, namespaces, seed, progress):
        seen.append(namespaces)
        return [{"op": "moments", "backend": "array_api", "namespace": ns, "dtype": "float64", "status": "ok",
                 "detail": ""} for ns in namespaces]  # fmt: skip

    monkeypatch.setattr(_cli, "verify_rows", rows)
    monkeypatch.setattr(_cli, "_installed", lambda ns: ns != "cupy")
    assert _cli.main(["verify", "--ops", "moments", "--no-progress"]) == 0
    assert seen[-1] == ["numpy", "array_api_strict", "torch", "jax", "dask"]
    assert "not installed here, so not checked: cupy" in capsys.readouterr().out
    assert _cli.main(["verify", "--ops", "moments", "--namespaces", "torch", "cupy", "--no-progress"]) == 0
    assert seen[-1] == ["torch", "cupy"]  # named ones are checked (or shown skipped) as asked
    assert "not installed" not in capsys.readouterr().out


class _Terminal:
    """A stream that says it is a terminal."""

    def __init__(self):
        self.text = ""

    def write(self, text):
        self.text += text

    def flush(self):
        pass

    def isatty(self):
        return True


def test_progress_redraws_on_a_terminal_and_writes_lines_elsewhere():
    import io

    term = _Terminal()
    bar = _console.Progress(4, "demo", items=2, stream=term)
    for item in ("a", "b"):
        bar.step(item)
        bar.step(item)
        bar.finished(item)
    assert term.text.count("\r") == 4 and term.text.endswith("\n")
    log = io.StringIO()
    bar = _console.Progress(4, "demo", items=2, stream=log)
    for item in ("a", "b"):
        bar.step(item)
        bar.step(item)
        bar.finished(f"{item} done")
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert [line.split(" (")[0] for line in lines] == ["demo: a done", "demo: b done"]
    assert lines[1].startswith("demo: b done (2/2, ")
    quiet = io.StringIO()
    bar = _console.Progress(1, "demo", stream=quiet, enabled=False)
    bar.step()
    bar.finished("x")
    assert quiet.getvalue() == ""


def test_verify_progress_in_a_log_is_one_line_per_op(capsys):
    # under capsys stderr is not a terminal, as in CI
    argv = ["verify", "--ops", "moments", "zoom_shift", "--backends", "array_api", "--namespaces", "numpy"]
    assert _cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    assert [line.split(":")[:2] for line in err.splitlines()] == [
        ["verify", " moments checked"],
        ["verify", " zoom_shift checked"],
    ]


def test_demo_figure_marks_a_quick_run_and_the_chance_level():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mmfuse import _demo

    rows = [
        {"data": kind, "method": method, "accuracy": acc, "params": 10, "seconds": 0.1}
        for kind in ("BasicMotions", "mfeat")
        for method, acc in (("concatenation", 0.9), ("TFN", 0.8))
    ]
    chance = {"BasicMotions": 0.25, "mfeat": 0.1}
    for quick in (None, {"BasicMotions": 30, "mfeat": 20}):
        fig = _demo._draw(rows, chance=chance, quick_epochs=quick)
        try:
            title = fig._suptitle.get_text() if fig._suptitle is not None else ""
            assert ("QUICK RUN" in title) == (quick is not None), title
            for ax, kind in zip(fig.axes, ("BasicMotions", "mfeat")):
                lines = [line for line in ax.get_lines() if line.get_label().startswith("chance")]
                assert len(lines) == 1
                assert list(lines[0].get_xdata()) == [chance[kind]] * 2
        finally:
            plt.close(fig)


def test_bench_figure_marks_a_quick_run():
    """As the demo's figure: a quick run's chart says its problems are tiny (a new user's
    report: the title was the same as a full run's)."""
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [
        {"op": op, "backend": "array_api", "namespace": "numpy", "seconds": 1e-4, "status": "ok"}
        for op in ("moments", "zoom_shift")
    ]
    for quick in (False, True):
        fig = _cli._bench_figure(results, quick=quick)
        try:
            title = fig.axes[0].get_title()
            assert title.startswith("mmfuse bench: lower is better")
            assert ("QUICK RUN" in title) == quick, title
        finally:
            plt.close(fig)
    assert _cli._bench_figure([{**results[0], "seconds": None}], quick=True) is None


def test_an_os_error_writing_the_outputs_is_one_line_with_status_2(capsys, monkeypatch):
    """The up-front checks cannot see every unwritable path (under /proc, even root's
    os.access says yes); the OSError at creation or writing is reported like them."""

    def boom(*a, **k):  # the folder is created before the work starts
        raise AssertionError("work started before the output folder was created")

    monkeypatch.setattr("mmfuse._demo.run_demo", boom)
    cases = [
        (["demo", "--quick", "--out", "/proc/mmfuse-forbidden"], "create folder '/proc/mmfuse-forbidden'"),
        (["bench", "--quick", "--ops", "zoom_shift", "--backends", "array_api", "--namespaces", "numpy",
          "--json", "/proc/mmfuse-x.json"], "write '/proc/mmfuse-x.json'"),
    ]  # fmt: skip
    for argv, what in cases:
        with pytest.raises(SystemExit) as exc:
            _cli.main([*argv, "--no-progress"])
        assert exc.value.code == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"mmfuse: cannot {what}: "), err
        assert len(err.strip().splitlines()) == 1, err


def test_an_os_error_inside_the_demo_names_the_output_file(tmp_path, capsys, monkeypatch):
    def unwritable(quick, out, progress):
        path = f"{out}/demo.txt"
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr("mmfuse._demo.run_demo", unwritable)
    with pytest.raises(SystemExit) as exc:
        _cli.main(["demo", "--quick", "--out", str(tmp_path / "o"), "--no-progress"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.startswith(f"mmfuse: cannot write '{tmp_path / 'o' / 'demo.txt'}': Permission denied")

    def elsewhere(quick, out, progress):  # an OSError not about the output is not hidden
        raise FileNotFoundError(2, "No such file or directory", "/nonexistent/data.csv")

    monkeypatch.setattr("mmfuse._demo.run_demo", elsewhere)
    with pytest.raises(FileNotFoundError):
        _cli.main(["demo", "--quick", "--out", str(tmp_path / "o"), "--no-progress"])


def test_a_configured_backend_the_work_cannot_use_is_one_line_exit_2(monkeypatch, capsys, tmp_path):
    """demo under MMFUSE_BACKEND=cupy (no CuPy rows for its layers) stopped in a traceback,
    exit 1; it is one line naming the backend in force and where it came from, exit 2."""

    def refused(*args, **kwargs):
        raise BackendUnsupported("backend 'cupy' cannot run tensor_fusion: it has no implementation")

    monkeypatch.setattr("mmfuse._demo.run_demo", refused)
    with mmfuse.config_context(backend="cupy"):
        code = _cli.main(["demo", "--quick", "--no-progress", "--out", str(tmp_path / "d")])
    assert code == 2
    err = capsys.readouterr().err  # (the refusal of the demo's check of its layers, before any work)
    assert err.startswith("mmfuse: ") and len(err.strip().splitlines()) == 1, err
    assert "backend 'cupy' cannot run tensor_fusion" in err and "backend='cupy' from config_context" in err


def test_a_configured_backend_refusal_says_what_is_in_force_once(capsys, tmp_path):
    """The registry's refusal of a configured backend notes where it was set (for callers of
    the functions and layers); the command says what is in force its own way, once."""
    with mmfuse.config_context(backend="reference"):
        code = _cli.main(["demo", "--quick", "--no-progress", "--out", str(tmp_path / "d")])
    assert code == 2
    err = capsys.readouterr().err
    assert "backend='reference' from config_context" in err, err
    assert "the backend is set by" not in err, err


def test_bench_shows_a_named_backend_without_the_op_as_not_applicable(capsys):
    """``bench --backends numba`` for an op numba has no implementation of: a row saying so,
    as verify's.  The op had vanished from the table, and with no other op there was no
    table at all under "see the lines above"."""
    from mmfuse import backends

    if "numba" in backends.unavailable():
        pytest.skip("numba is not available here")
    argv = ["bench", "--quick", "--backends", "numba", "--namespaces", "numpy", "--repeats", "1", "--no-progress"]
    assert _cli.main([*argv, "--ops", "moments", "tensor_fusion"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"moments +numba +numpy +[0-9.]+ .* ok", out)
    assert re.search(r"tensor_fusion +numba +- +- +- +n/a +numba has no implementation of tensor_fusion", out)
    named_twice = ["bench", "--quick", "--backends", "numba", "numba", "--namespaces", "numpy", "--repeats", "1"]
    assert _cli.main([*named_twice, "--no-progress", "--ops", "tensor_fusion"]) == 1
    captured = capsys.readouterr()
    assert captured.out.count("numba has no implementation of tensor_fusion") == 1
    assert "nothing was timed for namespace numpy, backend numba" in captured.err


def test_verify_calls_failed_checks_failed_not_unchecked(monkeypatch, capsys):
    """A named backend whose every row was checked and failed: "N failed", exit 1, and no
    "nothing was checked" (which is for rows skipped or not applicable)."""
    op = mmfuse.moments

    def off(*args, **kwargs):
        mu, var = op(*args, **kwargs)
        return mu * 1.01, var

    monkeypatch.setattr(mmfuse, "moments", off)
    code = _cli.main(["verify", "--ops", "moments", "--namespaces", "numpy", "--backends", "array_api", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 1
    assert re.search(r"\n0 passed, [1-9][0-9]* failed, 0 skipped", captured.out)
    assert "nothing was checked" not in captured.err


def test_verify_takes_labels_returned_as_an_array_for_a_mismatch(monkeypatch, capsys):
    """An implementation giving its labels as an array (``np.asarray(labels)``) is a
    MISMATCH row; the comparison with the reference's labels had ended verify in a
    traceback ("The truth value of an array ... is ambiguous")."""
    op = mmfuse.lowrank_interactions

    def as_array(*args, **kwargs):
        terms, labels = op(*args, **kwargs)
        return terms, np.asarray(labels)

    code, out = _verify_planted(monkeypatch, capsys, "lowrank_interactions", as_array)
    assert code == 1
    assert "labels differ from the reference's" in out


def test_verify_tally_counts_each_status():
    """Errors count as failed beside mismatches; rows skipped for any reason (the remainder)
    as skipped; "n/a" rows as not applicable."""
    rows = [{"status": s} for s in ("ok", "ok", "MISMATCH", "ERROR", "ERROR", "skipped", "n/a", "n/a", "n/a")]
    assert _cli.tally(rows) == "2 passed, 3 failed, 1 skipped, 3 not applicable"


def test_verify_counts_rows_a_backend_cannot_take_apart_from_skipped(capsys):
    """Rows of a backend that takes no such arrays (status "n/a", e.g. the Triton kernels
    with NumPy arrays) are counted as not applicable, in the summary and in the progress line,
    apart from skipped ones (a namespace or dtype not available): the progress said "12 of 24
    rows ok" and the summary counted those rows as skipped, which a new user read as problems."""
    code = _cli.main(["verify", "--ops", "moments", "--namespaces", "numpy"])
    captured = capsys.readouterr()
    assert code == 0
    statuses = re.findall(r"^moments.*?  (ok|n/a|skipped|MISMATCH|ERROR)  ", captured.out, re.MULTILINE)
    na = statuses.count("n/a")
    assert na > 0 and statuses.count("ok") > 0
    summary = f"{statuses.count('ok')} passed, 0 failed, {statuses.count('skipped')} skipped, {na} not applicable"
    assert f"\n{summary}\n" in captured.out
    assert f"moments checked: {summary} (" in captured.err


def test_verify_that_checked_nothing_fails(capsys):
    """``verify --namespaces cupy`` without CuPy (or a backend that cannot run) printed
    "0 passed" and exited 0: a machine whose GPU stack is broken passed its check."""
    code = _cli.main(["verify", "--ops", "moments", "--namespaces", "cupy", "--no-progress"])
    captured = capsys.readouterr()
    if "cupy" in sys.modules or "ok" in captured.out.split("skipped")[0]:
        pytest.skip("CuPy runs here")
    assert code == 1
    assert "nothing was checked for namespace cupy" in captured.err
    assert "(see the rows above that were skipped or not applicable)" in captured.err
    code = _cli.main(["verify", "--ops", "moments", "--namespaces", "numpy", "--backends", "array_api",
                      "reference", "--no-progress"])  # fmt: skip
    assert code == 0, capsys.readouterr().err  # the reference is the oracle: never itself checked


def test_a_closed_pipe_ends_quietly_with_the_shells_status():
    """``mmfuse info | head -1`` printed a BrokenPipeError traceback and exited 1 (verify's
    "mismatch" status); now nothing on stderr and 128 + SIGPIPE, as the shell's tools."""
    script = (
        "import os, sys\n"
        "from mmfuse import _cli\n"
        "r, w = os.pipe(); os.close(r); os.dup2(w, 1)\n"  # a pipe whose reader is gone
        "sys.exit(_cli.main(['info']))\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_buffered_env())
    assert res.returncode == 141, res.stderr
    assert "Traceback" not in res.stderr


def _buffered_env() -> dict[str, str]:
    """The environment without PYTHONUNBUFFERED: stdout to a pipe or a file then buffers as a
    user's does, and is written at exit unless main() writes it (the tests passed only with
    the variable set; a review's find)."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_an_output_with_no_room_is_one_line_not_a_traceback():
    """``mmfuse info > /dev/full`` ended in an OSError traceback; now one line on stderr
    naming the failure, and status 1."""
    with open("/dev/full", "w") as full:
        res = subprocess.run(
            [sys.executable, "-m", "mmfuse", "info"], stdout=full, stderr=subprocess.PIPE, text=True, env=_buffered_env()
        )
    assert res.returncode == 1
    assert res.stderr.strip() == "mmfuse: cannot write the output: No space left on device"


def test_an_error_about_a_file_is_not_taken_for_the_output(monkeypatch):
    """The output's write error has no file name; an OSError naming a file (one read, say)
    propagates whole, whatever its errno."""
    import errno

    def fails(args):
        raise OSError(errno.EIO, "Input/output error", "/data/input.npz")

    monkeypatch.setattr(_cli, "cmd_info", fails)
    with pytest.raises(OSError, match=r"/data/input\.npz"):
        _cli.main(["info"])


def test_bench_plot_needs_matplotlib_before_timing(monkeypatch, tmp_path, capsys):
    """It failed only after every row was timed (minutes at bench scale), and after the JSON."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "t.json"
    code = _cli.main(["bench", "--quick", "--ops", "moments", "--plot", str(tmp_path / "p.png"),
                      "--json", str(out), "--no-progress"])  # fmt: skip
    assert code == 2
    assert "matplotlib is needed" in capsys.readouterr().err
    assert not out.exists()


def test_demo_refuses_an_empty_output_folder_name(capsys):
    with pytest.raises(SystemExit) as exc:
        _cli.main(["demo", "--quick", "--out", ""])
    assert exc.value.code == 2
    assert "--out needs a folder name" in capsys.readouterr().err


def test_verify_of_the_reference_alone_says_it_is_never_checked(capsys):
    argv = ["verify", "--ops", "moments", "--backends", "reference", "--namespaces", "numpy", "--no-progress"]
    assert _cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "nothing was checked for namespace numpy (" in err
    assert "the reference is the oracle the others are checked against, never checked itself" in err


def test_a_repeated_option_adds_to_the_first(capsys):
    """``--ops moments --ops align`` checked align alone (argparse's default replaces), and
    exited 0 having left moments out silently (a review's find)."""
    code = _cli.main(["verify", "--ops", "moments", "--ops", "align", "--backends", "array_api",
                      "--namespaces", "numpy", "--no-progress"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "\nmoments" in out and "\nalign" in out


def test_prefer_none_from_the_environment_is_none():
    """MMFUSE_PREFER=None was lower-cased and refused as "prefer must be None ..., got 'none'"
    (a review's find)."""
    res = subprocess.run(
        [sys.executable, "-c", "import mmfuse; print(mmfuse.get_config()['prefer'])"],
        capture_output=True, text=True, env={**os.environ, "MMFUSE_PREFER": "None"},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "None"


def test_ctrl_c_is_one_line_and_the_demo_leaves_no_folder(monkeypatch, tmp_path, capsys):
    """Ctrl-C ended in a traceback deep in autograd and left the demo's folder (and any parent
    it made) empty behind (review finds): one line, the shell's status 130, no folder."""
    pytest.importorskip("torch")
    import mmfuse._demo

    def interrupted(**kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mmfuse._demo, "run_demo", interrupted)
    out = tmp_path / "made" / "demo"
    assert _cli.main(["demo", "--out", str(out), "--no-progress"]) == 130
    assert capsys.readouterr().err.strip() == "mmfuse: interrupted"
    assert not (tmp_path / "made").exists()


def test_a_ctrl_c_swallowed_in_a_finaliser_still_interrupts(monkeypatch, capsys):
    """JAX's garbage-collection callback swallowed a Ctrl-C that landed while it ran (CPython
    "ignores" an exception raised in a finaliser or a gc callback): verify finished and exited
    0 (a review's find).  Here a finaliser in the op's call gets the SIGINT; the run stops at
    once, with one line and the shell's status."""
    import signal

    from mmfuse import _problems

    monkeypatch.setitem(_problems.CASES, "moments", {})  # the default problem alone: 2 jobs
    ignored = []  # (pytest's own hook would report the ignored exception as an error)
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: ignored.append(unraisable.exc_type))
    real = mmfuse.moments

    class Finaliser:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)

    def collected(*args, **kwargs):
        Finaliser()  # dropped at once: its __del__ runs here, as a gc callback would
        return real(*args, **kwargs)

    monkeypatch.setattr(mmfuse, "moments", collected)
    argv = ["verify", "--ops", "moments", "--backends", "array_api", "--namespaces", "numpy", "--no-progress"]
    code = _cli.main(argv)
    captured = capsys.readouterr()
    assert code == 130, captured.out
    assert captured.err.strip() == "mmfuse: interrupted"
    assert ignored == [KeyboardInterrupt]  # swallowed where it was raised, and the first job was the last
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_a_ctrl_c_after_the_last_step_still_interrupts(monkeypatch, capsys):
    """A Ctrl-C swallowed after the last step of work (no Progress.step to see it) ends the
    command as interrupted too, not with the command's status."""
    import signal

    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: None)

    class Finaliser:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)

    def info(args):
        Finaliser()
        return 0

    monkeypatch.setattr(_cli, "cmd_info", info)
    assert _cli.main(["info"]) == 130
    assert capsys.readouterr().err.strip() == "mmfuse: interrupted"


def test_the_sigint_handler_is_installed_only_over_the_default_and_put_back(monkeypatch):
    """main() handles SIGINT itself while a command runs (see the test above), only in the main
    thread (``signal.signal`` raises ValueError in any other), only over Python's default
    handler (a program that ignores SIGINT keeps ignoring it), and puts the handler back."""
    import signal
    import threading

    seen = []
    monkeypatch.setattr(_cli, "cmd_info", lambda args: seen.append(signal.getsignal(signal.SIGINT)) or 0)
    assert _cli.main(["info"]) == 0
    assert seen[-1] is not signal.default_int_handler  # its own, while the command ran
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert _cli.main(["info"]) == 0
        assert seen[-1] is signal.SIG_IGN and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    status = []
    thread = threading.Thread(target=lambda: status.append(_cli.main(["info"])))
    thread.start()
    thread.join()
    assert status == [0] and seen[-1] is signal.default_int_handler


@pytest.mark.skipif(os.name != "posix", reason="closes stdout with the shell's >&-")
@pytest.mark.parametrize(
    "argv",
    [
        ["info"],
        ["--version"],
        ["verify", "--ops", "moments", "--backends", "array_api", "--namespaces", "numpy"],
    ],
)
def test_a_closed_stdout_is_no_traceback(argv):
    """``mmfuse info >&-`` (stdout closed at startup: sys.stdout is None) ended in an
    AttributeError traceback at main's flush of stdout (a review's find); print() writes
    nothing there, and the command's status is its own."""
    import shlex

    command = shlex.join([sys.executable, "-m", "mmfuse", *argv]) + " >&-"
    res = subprocess.run(
        command, shell=True, stderr=subprocess.PIPE, text=True, env=_buffered_env(), timeout=300
    )
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr and "Exception ignored" not in res.stderr, res.stderr


_UNBUFFERED = "unbuffered"


def _env(buffering: str) -> dict[str, str]:
    """The environment with stdout block-buffered (a pipe's or a file's as a user's is), or
    unbuffered (PYTHONUNBUFFERED=1)."""
    return {**_buffered_env(), "PYTHONUNBUFFERED": "1"} if buffering == _UNBUFFERED else _buffered_env()


@pytest.mark.parametrize("buffering", ["buffered", _UNBUFFERED])
@pytest.mark.parametrize("flag", ["--version", "--help"])
def test_help_and_version_to_a_closed_pipe_end_quietly(buffering, flag):
    """``mmfuse --version | true``: argparse prints and exits inside its parsing, outside main's
    handlers, and the block-buffered text failed at exit ("Exception ignored ...
    BrokenPipeError", status 120); unbuffered, argparse dropped the error (status 0).  Now as
    ``info``: nothing on stderr and 128 + SIGPIPE (a review's find)."""
    script = (
        "import os, sys\n"
        "from mmfuse import _cli\n"
        "r, w = os.pipe(); os.close(r); os.dup2(w, 1)\n"  # a pipe whose reader is gone
        f"sys.exit(_cli.main([{flag!r}]))\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(buffering))
    assert res.returncode == 141, res.stderr
    assert res.stderr == ""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("buffering", ["buffered", _UNBUFFERED])
@pytest.mark.parametrize("flag", ["--version", "--help"])
def test_help_and_version_to_a_full_disk_are_one_line(buffering, flag):
    """``mmfuse --help > /dev/full`` printed "Exception ignored ..." and exited 120 (block-
    buffered), or exited 0 having written nothing (unbuffered: argparse drops the error);
    now one line and status 1, as ``info``."""
    with open("/dev/full", "w") as full:
        res = subprocess.run(
            [sys.executable, "-m", "mmfuse", flag], stdout=full, stderr=subprocess.PIPE, text=True,
            env=_env(buffering),
        )  # fmt: skip
    assert res.returncode == 1, res.stderr
    assert res.stderr.strip() == "mmfuse: cannot write the output: No space left on device"


def test_verify_computes_each_reference_answer_once(monkeypatch, capsys):
    """verify ran the reference once a job (20 to 40 times per problem, skipped rows included:
    7.7 s of a 30 s run; a review's find): once per problem now, never for a problem whose
    rows all skip, while each job still gets inputs of its own (NumPy's boolean masks reach
    the op uncopied: a shared one written to by one job would be the next one's input)."""
    import functools

    import mmfuse.reference as ref
    from mmfuse._problems import CASES

    calls, masks = [], []
    real_ref, real_op, real_converter = ref.moments, mmfuse.moments, _cli._converter

    @functools.wraps(real_ref)  # (the registry checks the reference's signature)
    def counted(*args, **kwargs):
        calls.append(1)
        return real_ref(*args, **kwargs)

    monkeypatch.setattr(ref, "moments", counted)
    monkeypatch.setattr(mmfuse, "moments", lambda *a, **k: masks.append(k.get("mask")) or real_op(*a, **k))
    monkeypatch.setattr(
        _cli, "_converter", lambda ns, dtype: None if ns == "cupy" else real_converter(ns, dtype)
    )
    argv = ["verify", "--ops", "moments", "--backends", "array_api", "--no-progress", "--namespaces"]
    assert _cli.main([*argv, "numpy", "array_api_strict"]) == 0
    assert len(calls) == 1 + len(CASES["moments"]) > 1  # 4 jobs each: 2 namespaces, 2 dtypes
    masked = [m for m in masks if m is not None]
    assert masked and len({id(m) for m in masked}) == len(masked)  # (all alive: no id is reused)
    calls.clear()
    assert _cli.main([*argv, "cupy"]) == 1  # every row skipped: nothing was checked
    assert calls == []
    capsys.readouterr()
