"""The CuPy backend's CUDA C++ kernel source compiles, without CuPy or a GPU.

CuPy compiles the statistics kernel at its first call on the device (NVRTC), so an error in
the source would surface only there.  This test compiles the same source and template
instantiations with NVRTC from the ``nvidia-cuda-nvrtc-cu12`` wheel (about 90 MB, not in the
test extras) for an H100/H200 target; it skips where that wheel is not installed.  The source
is read from the module's text: importing :mod:`mmfuse.backends.cupy` needs CuPy.
"""

from __future__ import annotations

import ast
import ctypes
import importlib.util
from pathlib import Path

import pytest

import mmfuse


def _nvrtc_dir() -> Path | None:
    try:
        spec = importlib.util.find_spec("nvidia.cuda_nvrtc")
    except ModuleNotFoundError:  # (no "nvidia" package at all)
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    lib = Path(next(iter(spec.submodule_search_locations))) / "lib"
    return lib if (lib / "libnvrtc.so.12").exists() else None


def _module_constants(names: tuple[str, ...]) -> dict[str, object]:
    source = Path(mmfuse.__file__).parent / "backends" / "cupy.py"
    found = {}
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and node.targets[0].id in names:
            found[node.targets[0].id] = ast.literal_eval(node.value)
    return found


def _compile(code: str, names: list[str]) -> tuple[int, str]:
    lib = _nvrtc_dir()
    assert lib is not None
    for builtins in sorted(lib.glob("libnvrtc-builtins.so.*")):
        ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
    nvrtc = ctypes.CDLL(str(lib / "libnvrtc.so.12"))
    prog = ctypes.c_void_p()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(prog), code.encode(), b"stats.cu", 0, None, None) == 0
    for name in names:
        assert nvrtc.nvrtcAddNameExpression(prog, name.encode()) == 0
    options = [b"--gpu-architecture=compute_90", b"-std=c++14"]  # (CuPy's own option)
    rc = nvrtc.nvrtcCompileProgram(prog, len(options), (ctypes.c_char_p * len(options))(*options))
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    return int(rc), log.value.decode(errors="replace")


@pytest.mark.skipif(_nvrtc_dir() is None, reason="needs NVRTC (pip install nvidia-cuda-nvrtc-cu12)")
def test_statistics_kernel_compiles_for_sm90():
    const = _module_constants(("_STATS_SOURCE", "STAT_CHANNELS", "STAT_LANES"))
    names = [f"stats_map<{t},double,{const['STAT_CHANNELS']},{const['STAT_LANES']}>" for t in ("float", "double")]
    rc, log = _compile(str(const["_STATS_SOURCE"]), names)
    assert rc == 0, log
    # the check can fail: a planted error is reported
    bad, log = _compile(str(const["_STATS_SOURCE"]).replace("A scale = 1,", "A scale = undefined_name,"), names)
    assert bad != 0 and "undefined_name" in log
