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
    assert "moments  array_api  jax        float32  ok" in out
    assert "moments  array_api  dask       float64  ok" in out
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


def test_bench_reports_any_op_exception_as_an_error_row(monkeypatch, capsys):
    impl = _registry._IMPLS["moments"]["array_api"]

    def broken(*args, **kwargs):
        raise RuntimeError("kaput")

    monkeypatch.setitem(
        _registry._IMPLS["moments"],
        "array_api",
        impl.__class__("moments", "array_api", broken, impl.supports, impl.priority),
    )
    code = _cli.main(
        ["bench", "--quick", "--ops", "moments", "lowrank_fusion", "--backends", "array_api",
         "--namespaces", "numpy", "--repeats", "1", "--no-progress"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 1
    assert "error: RuntimeError: kaput" in out
    assert "lowrank_fusion  array_api  numpy" in out  # the run went on


def test_bench_says_why_a_backend_is_skipped_and_dedupes_namespaces(monkeypatch, capsys):
    from mmfuse import backends

    monkeypatch.setattr(backends, "unavailable", lambda: {"numba": "ImportError: no numba here"})
    monkeypatch.setattr(
        backends,
        "available",
        lambda op=None: ["array_api", "reference"] if op else {},
    )
    code = _cli.main(["bench", "--quick", "--ops", "moments", "--backends", "numba", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "numba: skipped, not available here: ImportError: no numba here" in out
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
    assert capsys.readouterr().out.count("moments  array_api  numpy") == 2  # float32, float64


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
