"""How fast a tiny ``zoom_shift`` could be through a compiled kernel: a floor for issue 19.

Run: ``python benchmarks/compiled_floor.py [--json FILE] [--quick]`` (needs a C compiler,
``cc``; a few seconds).

Why: ``overhead.py``'s tiny torch ``zoom_shift`` stays near 1.8x the plain torch code, and
``instructions.py`` showed that no single piece of the call accounts for the gap (the plan's
NumPy primitives and torch's operators together).  A kernel compiled ahead of time, called
once per call, is the remaining way under 1.5x.  This script measures what such a path would
cost before anyone builds one, and what the compiled kernels mmfuse already has (numba's, once
numba is imported) give at this size.

What runs (``overhead.py``'s tiny case: (4, 6, 5) toward (4, 7, 5), alpha 1, eps 1e-5; torch
float32 under ``torch.no_grad()`` and NumPy float64, one thread):

- ``plain``: ``overhead.py``'s plain code (``_baselines.plain_zoom_shift``).
- ``mmfuse``: ``mmfuse.zoom_shift`` as configured ("auto").
- ``floor``: what a planned call into a compiled kernel would do: mmfuse's own signature and
  plan-cache lookup of this call (``mmfuse._plan.call_key``, the public function's cache), a
  new output array, the arrays' addresses, and one ``ctypes`` call of a C function (the C
  source below, compiled here with ``cc -O2``: statistics over the token axis in double, then
  the map).  It is NOT mmfuse's code: no checks beyond the key, contiguous (B, T, C) inputs
  only, no masks, alpha 1 only, none of the core's rules for degenerate lanes.  A real kernel
  would add its few per-call tests (layout, contiguity) to this.
- ``in the plan`` (torch only): the public call itself, ``mmfuse.zoom_shift``, whose plan was
  made while that C function stood in for the plan's NumPy path (the torch backend's
  ``_zoom_shift_on_host``, which keeps its layout test; :func:`plan_with_kernel`): what users
  would see, the public function's entry and checks of a planned call included.  It has its
  own signature (eps 2**-20 of itself larger), so that its plan and ``mmfuse``'s are both
  cached; a check before timing proves that it runs the C function.
- then, after ``import numba`` in the same process, ``mmfuse`` again (numba's CPU kernels,
  which "auto" takes at every size once numba is imported) against ``plain``.

Columns: median microseconds per call of interleaved rounds (``_harness.sample_rounds``) and
each one's ratio to ``plain``.  Every candidate's output is checked against the plain code's
before timing (relative error at most 1e-5; the JSON's ``errors`` holds each one's).
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _baselines import plain_zoom_shift
from _harness import arg_parser, check_same, machine, medians, print_table, sample_rounds
from overhead import _tiny_inputs

EPS = 1e-5

# One lane at a time: the mean, then the centred sum of squares (two passes, in double), then
# y = (x - mean) s + mean_g.  REAL is float or double.
C_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#define ZOOM_SHIFT(NAME, REAL)                                                          \
void NAME(const REAL *x, const REAL *g, REAL *y, int64_t batch, int64_t tx, int64_t tg, \
          int64_t channels, double eps) {                                                 \
    for (int64_t b = 0; b < batch; b++)                                                   \
        for (int64_t c = 0; c < channels; c++) {                                          \
            const REAL *xl = x + b * tx * channels + c, *gl = g + b * tg * channels + c;  \
            REAL *yl = y + b * tx * channels + c;                                          \
            double mx = 0, mg = 0, vx = 0, vg = 0;                                         \
            for (int64_t t = 0; t < tx; t++) mx += xl[t * channels];                      \
            for (int64_t t = 0; t < tg; t++) mg += gl[t * channels];                      \
            mx /= tx;                                                                       \
            mg /= tg;                                                                       \
            for (int64_t t = 0; t < tx; t++) { double d = xl[t * channels] - mx; vx += d * d; } \
            for (int64_t t = 0; t < tg; t++) { double d = gl[t * channels] - mg; vg += d * d; } \
            double s = sqrt(vg / tg + eps) / sqrt(vx / tx + eps);                          \
            for (int64_t t = 0; t < tx; t++)                                               \
                yl[t * channels] = (REAL)((xl[t * channels] - mx) * s + mg);               \
        }                                                                                  \
}
ZOOM_SHIFT(zoom_shift_f32, float)
ZOOM_SHIFT(zoom_shift_f64, double)
"""


def compile_kernels(folder: str) -> ctypes.CDLL:
    """The C source above as a shared library in ``folder``, loaded, its functions typed."""
    source, library = os.path.join(folder, "zoom_shift.c"), os.path.join(folder, "zoom_shift.so")
    with open(source, "w") as fh:
        fh.write(C_SOURCE)
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", library, source, "-lm"], check=True)
    lib = ctypes.CDLL(library)
    for fn in (lib.zoom_shift_f32, lib.zoom_shift_f64):
        fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4 + [ctypes.c_double]
        fn.restype = None
    return lib


def torch_kernel(lib: ctypes.CDLL, x, g, eps: float):
    """The C kernel on contiguous (B, T, C) CPU tensors ``x`` toward ``g``: a new tensor."""
    torch = sys.modules["torch"]  # (x is a tensor; an import statement per timed call costs 0.2 us)
    y = torch.empty(x.shape, dtype=x.dtype)
    kernel = lib.zoom_shift_f32 if x.dtype == torch.float32 else lib.zoom_shift_f64
    kernel(x.data_ptr(), g.data_ptr(), y.data_ptr(), x.shape[0], x.shape[1], g.shape[1], x.shape[2], eps)
    return y


def floor_call(lib: ctypes.CDLL, xp_name: str):
    """The ``floor`` candidate for arrays of ``xp_name`` (see the module docstring)."""
    from mmfuse._align import _ZOOM_SHIFT_PLANS
    from mmfuse._plan import call_key

    def torch_call(x, g):
        _ZOOM_SHIFT_PLANS.get(call_key(None, (1.0, -2, EPS), x, g, None, None))
        return torch_kernel(lib, x, g, EPS)

    def numpy_call(x, g):
        _ZOOM_SHIFT_PLANS.get(call_key(None, (1.0, -2, EPS), x, g, None, None))
        y = np.empty(x.shape, dtype=x.dtype)
        kernel = lib.zoom_shift_f32 if x.dtype == np.float32 else lib.zoom_shift_f64
        address = [a.__array_interface__["data"][0] for a in (x, g, y)]
        kernel(*address, x.shape[0], x.shape[1], g.shape[1], x.shape[2], EPS)
        return y

    return torch_call if xp_name == "torch" else numpy_call


# The "in the plan" candidate's eps: its own signature, so that its plan (made while the kernel
# stands in for the NumPy path) and the unchanged public call's plan are both cached and can be
# timed in the same rounds
EPS_IN_PLAN = EPS * (1 + 2**-20)


def plan_with_kernel(lib: ctypes.CDLL) -> list[int]:
    """Plan the public call on torch tensors with eps :data:`EPS_IN_PLAN` while the kernel
    stands in for the plan's NumPy path (``_zoom_shift_on_host`` of the torch backend): the
    plan keeps the kernel, every other signature keeps mmfuse's path (restored at once).  The
    stand-in keeps the path's own per-call layout test and leaves other calls to it.  Returns
    a one-element list counting the stand-in's kernel calls (proof that the plan runs it)."""
    import torch

    import mmfuse

    backend = importlib.import_module("mmfuse.backends.torch.zoom_shift")  # (the package's
    # own name zoom_shift is the function)
    original = backend._zoom_shift_on_host
    kernel_calls = [0]

    def kernel_on_host(x, guide, *, alpha, axis, mask=None, guide_mask=None, eps):
        if (
            backend.host_layout((x, guide)) and alpha == 1.0 and mask is None and guide_mask is None
            and x.dim() == 3 and axis % 3 == 1
        ):  # fmt: skip
            kernel_calls[0] += 1
            return torch_kernel(lib, x, guide, eps)
        return original(x, guide, alpha=alpha, axis=axis, mask=mask, guide_mask=guide_mask, eps=eps)

    x, g = inputs("torch")
    backend._zoom_shift_on_host = kernel_on_host
    try:
        with torch.no_grad():
            mmfuse.zoom_shift(x, g, eps=EPS_IN_PLAN)
    finally:
        backend._zoom_shift_on_host = original
    return kernel_calls


def inputs(xp_name: str):
    """``overhead.py``'s tiny zoom_shift pair: torch float32 or NumPy float64."""
    import torch

    x, g = _tiny_inputs()[2]
    if xp_name == "torch":
        return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(g.astype(np.float32))
    return x, g


def time_rows(candidates: dict[str, dict], repeats: int) -> list[dict]:
    """One row per namespace: each candidate's median microseconds and its ratio to plain."""
    import torch

    rows = []
    for xp_name, calls in candidates.items():
        with torch.no_grad():
            us = {k: v * 1e6 for k, v in medians(sample_rounds(calls, repeats=repeats, burst=20)).items()}
        row = {"xp": xp_name, "plain us": f"{us['plain']:.1f}"}
        for name in calls:
            if name != "plain":
                row[f"{name} us"] = f"{us[name]:.1f}"
                row[f"{name}/plain"] = f"{us[name] / us['plain']:.2f}"
        rows.append(row)
    return rows


def main() -> None:
    args = arg_parser(__doc__).parse_args()
    if shutil.which("cc") is None:
        sys.exit("compiled_floor.py needs a C compiler (cc)")
    if "numba" in sys.modules:
        sys.exit("run compiled_floor.py in a fresh process: numba must not be imported yet")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    import mmfuse

    torch.set_num_threads(1)
    repeats = 300 if args.quick else 3000  # samples per candidate, in rounds of 19
    with tempfile.TemporaryDirectory() as folder:
        lib = compile_kernels(folder)
        first: dict[str, dict] = {}
        errors: dict[str, float] = {}  # "xp candidate": relative error against the plain code
        for xp_name in ("torch", "numpy"):
            x, g = inputs(xp_name)
            xp = torch if xp_name == "torch" else np
            floor = floor_call(lib, xp_name)
            first[xp_name] = {
                "plain": lambda x=x, g=g, xp=xp: plain_zoom_shift(xp, x, g),
                "mmfuse": lambda x=x, g=g: mmfuse.zoom_shift(x, g),
                "floor": lambda x=x, g=g, floor=floor: floor(x, g),
            }
            if xp_name == "torch":
                kernel_calls = plan_with_kernel(lib)
                first[xp_name]["in the plan"] = lambda x=x, g=g: mmfuse.zoom_shift(x, g, eps=EPS_IN_PLAN)
            with torch.no_grad():  # (as timed)
                want = first[xp_name]["plain"]()
                for name in [n for n in first[xp_name] if n != "plain"]:
                    got = first[xp_name][name]()
                    errors[f"{xp_name} {name}"] = check_same(f"zoom_shift {xp_name} {name}", got, want, 1e-5)
            if xp_name == "torch":
                before = kernel_calls[0]
                with torch.no_grad():  # (the plan's signature: grad mode is in it)
                    first[xp_name]["in the plan"]()
                if kernel_calls[0] != before + 1:
                    raise AssertionError("zoom_shift torch in the plan: the planned call did not run the kernel")
        rows = time_rows(first, repeats)

        import numba  # noqa: F401  (from here on "auto" takes numba's kernels at every size)

        later = {
            xp_name: {"plain": calls["plain"], "mmfuse with numba": calls["mmfuse"]} for xp_name, calls in first.items()
        }
        for xp_name, calls in later.items():
            with torch.no_grad():
                errors[f"{xp_name} mmfuse with numba"] = check_same(
                    f"zoom_shift {xp_name} with numba", calls["mmfuse with numba"](), calls["plain"](), 1e-5
                )
        numba_rows = time_rows(later, repeats)

    print(f"machine: {machine()}; torch {torch.__version__}, threads 1; numpy {np.__version__}")
    print("\nTiny zoom_shift (4,6,5) to (4,7,5), per call; floor: key, lookup and a compiled kernel")
    print_table(rows, ["xp", "plain us", "mmfuse us", "mmfuse/plain", "in the plan us", "in the plan/plain",
                       "floor us", "floor/plain"])
    print("\nThe same after import numba (mmfuse then runs numba's CPU kernels)")
    print_table(numba_rows, ["xp", "plain us", "mmfuse with numba us", "mmfuse with numba/plain"])
    if args.json:
        with open(args.json, "w") as fh:
            record = {
                "machine": machine(), "torch": torch.__version__, "numpy": np.__version__, "quick": args.quick,
                "default": rows, "numba": numba_rows, "errors": errors,
            }  # fmt: skip
            json.dump(record, fh, indent=1)


if __name__ == "__main__":
    main()
