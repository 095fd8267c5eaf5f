"""The mmfuse command: info, verify, bench, demo; exit codes, tables, JSON schema, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mmfuse import _cli
from mmfuse.backends import _registry


def test_info(capsys):
    assert _cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for section in ("array namespaces:", "backends:", "devices:", "config:"):
        assert section in out
    assert "numpy             found" in out
    assert "array_api  " in out and "reference  " in out
    assert "backend = 'auto'  (from default)" in out


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
    assert "lowrank_fusion   array_api" in out or "lowrank_fusion  array_api" in out
    assert "vs tensorly.cp_to_tensor" in out
    assert " 0 failed" in out


def test_verify_exits_non_zero_on_mismatch(monkeypatch, capsys):
    impl = _registry._IMPLS["cp_fusion"]["array_api"]

    def broken(xs, cp, bias=None, *, append_one=True, present=None):
        return impl.func(xs, cp, bias, append_one=append_one, present=present) * 1.01

    monkeypatch.setitem(
        _registry._IMPLS["cp_fusion"],
        "array_api",
        impl.__class__("cp_fusion", "array_api", broken, impl.supports, impl.priority),
    )
    code = _cli.main(
        ["verify", "--ops", "cp_fusion", "--namespaces", "numpy", "--backends", "array_api", "--no-progress"]
    )
    out = capsys.readouterr().out
    assert code == 1
    assert "MISMATCH" in out


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
    assert set(data) == {"mmfuse", "machine", "scale", "results"}
    assert data["scale"] == "verify"
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


def test_missing_dependency_names_the_extra(monkeypatch):
    with pytest.raises(_cli.MissingDependency, match=r"pip install 'mmfuse\[all\]'"):
        _cli.require("surely_not_a_module_xyz")
    monkeypatch.setitem(sys.modules, "cupy", None)  # importing cupy fails, installed or not
    with pytest.raises(_cli.MissingDependency, match=r"pip install 'mmfuse\[cupy\]'"):
        _cli.require("cupy")


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    assert _cli.main(["demo", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "demo.png").read_bytes()[:4] == b"\x89PNG"
    rows = [line.split() for line in (tmp_path / "demo.txt").read_text().splitlines()[2:]]
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
