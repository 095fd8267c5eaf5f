"""Per-call overhead (issue 19): mmfuse against the plain expression of the same maths.

Run: ``python benchmarks/overhead.py [--json FILE] [--quick] [--only TEXT ...]`` (a full
run takes 30-40 s on 2 cores; ``--quick`` a few seconds, for CI-speed checks: fewer rounds,
so wider spreads; the counts are the same).  ``--only TEXT`` (repeatable) runs just the
part-1 cases whose "case xp" label (e.g. ``zoom_shift (4,6,5) to (4,7,5) torch``) contains
one of the texts, and skips parts 2 and 3; ``--layers TEXT`` likewise runs just the part-2
cases whose name (e.g. ``LowRankFusion B32 d8,16,64 h1 R4``) contains one, and skips parts 1
and 3.

Part 1, tiny inputs (where the per-call overhead, not the arithmetic, decides).  Each case
pairs one mmfuse call with the plain expression of the same maths written here in the same
namespace (checked equal to mmfuse's result before timing).  NumPy arrays are float64 (what
``default_rng().standard_normal`` gives), torch CPU tensors float32 (torch's default) and
called under ``torch.no_grad()``; ``backend`` is left at the configured default ("auto"):

- ``lowrank_fusion``, B = 4, dims (3, 4, 5), h = 2, R = 2 (with weights and bias); plain:
  append the constant, one broadcast matmul per modality giving (R, B, h), the product,
  the rank-weighted sum, the bias.
- ``cp_fusion``, the same sizes in TensorLy's layout; plain: ``(w * prod_m hat_m @ A_m) @ C.T + b``.
- ``zoom_shift``, (4, 6, 5) toward (4, 7, 5), alpha = 1, eps = 1e-5; plain: means and
  population variances over the token axis, ``(x - mu) * (s_g / s_x) + mu_g``.
- ``wander``, M = 2, B = 4, T = (6, 5), d = D = 8, r = 4, R_h = 2, R_t = 3, T_out = 4, exact
  GELU, residual "first", in ``mode="collapsed"`` and ``mode="cp"``; plain: ``gelu(x @ W + b)``
  per modality (NumPy: ``scipy.special.erf``, torch: ``F.gelu``), the factors' rank sums (collapsed)
  or all (R_h, R_t) pairs by broadcast matmuls (cp), the product, the first T_out tokens of
  the concatenated inputs.
- ``wander`` collapsed again with ``activation=`` the plain code's GELU (SciPy's ``erf``
  formula, ``F.gelu``), on both sides: a diagnostic row, not one of issue 19's, that takes the
  exact GELU's own cost out of the ratio (what is left is the rest of the call's).
- ``align``, two modalities (4, 6, 5) and (4, 7, 5), rounds = 1 (alpha 1, Gauss-Seidel,
  consensus); plain: ``y0 = zoom_shift(x0, x1)`` then ``y1 = zoom_shift(x1, y0)`` with the plain
  zoom_shift above.
- ``zoom_shift_fusion``, the same two modalities with its defaults (the align round above,
  max pooling over the tokens, concatenation); plain: the plain align above, ``max`` over
  the token axis, concatenation.

Columns: "mmfuse us" and "plain us": median microseconds per call (each sample times a loop
of calls); "mmfuse/plain": their ratio (issue 19's target: at most 1.5); "p10-p90": the 10th
and 90th percentiles of the same ratio measured within single interleaved rounds (see
``_harness.round_ratios``), i.e. how much of it is the machine's drift.  The headline ratio is
the ratio of the two medians of all samples pooled over the rounds, while p10-p90 are
quantiles of the per-round ratios: different statistics, so on a drifting machine the headline
may fall outside its band.  "py calls mmfuse" and
"py calls plain": function calls that cProfile records in one call after warm-up, Python
functions and, in brackets, built-in (C) functions and methods, the timed lambda itself not
counted; they do not depend on the machine's load.

Part 2, layers: one training step (inputs' and parameters' grads set to None, forward,
``out.sum().backward()``) at B = 32 and B = 1 for ``benchmarks/torch_cpu.py``'s three cases:
``LowRankFusion`` (32, 32, 128) h 128 R 16, ``LowRankFusion`` (8, 16, 64) h 1 R 4, and
``WanderAdapter(mode="collapsed")`` at the CMU-MOSI defaults (T = 50, 50, 50, d = 40, r = 16,
R_h = 8, R_t = 12).  float32, all cores.  The plain layers are the same as torch_cpu.py's
(``lmf-layer``: LMF's released fusion; ``released-layer``: the released Wander adapter; both
from ``_baselines.py``), with their parameters copied from the mmfuse layer (outputs checked
equal, and the gradients of the inputs and parameters: ``torch_cpu.check_step``, relative error
at most 1e-4 each, before timing).  Columns: "mmfuse ms" and
"plain ms": median milliseconds per step; "plain/mmfuse": the speed-up of mmfuse over the plain
layer (target: at least 1.2; the ratio of pooled medians, as in part 1) with its per-round
p10-p90; "ops" columns: torch operators in one
step after warm-up, recorded by ``torch.profiler`` (CPU activity; the forward, the
``out.sum()``, and the backward on autograd's thread):

- "ops top": operator calls that are not inside another operator call, i.e. what Python and
  the autograd engine dispatched: events named ``aten::*`` or ``mmfuse::*`` (mmfuse's custom
  ops) with no such event among their profiler parents;
- "aten all": every ``aten::*`` event, nested ones included (composite ops' decompositions,
  the ops run inside mmfuse's custom ops and their backward).

Autograd's own bookkeeping events (``autograd::engine::evaluate_function: ...``) are not
operators and are not counted.  "py calls" as in part 1, for one step.

Part 3, dispatch: the tiny ``zoom_shift`` of part 1 on torch through the backend's eager
binding (``mmfuse.backends._torch_eager.bind``: the op's implementation run directly) against
the registered op through torch's dispatcher (``torch.ops.mmfuse.zoom_shift``, with its
registered autograd when x requires grad), interleaved rounds, median microseconds.
"""

from __future__ import annotations

import contextlib
import cProfile
import json
import math
import os
import pstats
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _baselines import (
    lmf_layer,
    plain_align,
    plain_cp,
    plain_gelu,
    plain_lowrank,
    plain_wander,
    plain_zoom_shift,
    plain_zoom_shift_fusion,
    released_wander,
)
from _harness import (
    arg_parser,
    check_same,
    machine,
    medians,
    print_table,
    quantile,
    round_ratios,
    sample_rounds,
)
from torch_cpu import check_step

SEED = 20261202

# ----------------------------------------------------------------------------- tiny cases


def _tiny_inputs():
    """The tiny cases' inputs as NumPy float64 arrays (``tiny_cases`` converts them)."""
    rng = np.random.default_rng(SEED)
    batch, dims, h, rank = 4, (3, 4, 5), 2, 2
    lr = {
        "xs": [rng.standard_normal((batch, d)) for d in dims],
        "factors": [rng.standard_normal((rank, d + 1, h)) / math.sqrt(d + 1) for d in dims],
        "weights": rng.standard_normal(rank),
        "bias": rng.standard_normal(h),
    }
    cp = {
        "weights": rng.standard_normal(rank),
        "factors": [rng.standard_normal((d + 1, rank)) for d in dims] + [rng.standard_normal((h, rank))],
        "bias": rng.standard_normal(h),
    }
    zs = [rng.standard_normal((4, 6, 5)), 3.0 + 2.0 * rng.standard_normal((4, 7, 5))]
    wx = [rng.standard_normal((4, t, 8)) for t in (6, 5)]
    return lr, cp, zs, wx


def tiny_cases(xp_name: str) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    """{case: (mmfuse call, plain call)} in namespace ``xp_name`` ("numpy" or "torch")."""
    import mmfuse

    lr, cp, zs, wx = _tiny_inputs()
    if xp_name == "numpy":
        xp = np

        def conv(a):
            return a
    else:
        import torch

        xp = torch

        def conv(a):
            return torch.from_numpy(np.asarray(a, dtype=np.float32))

    xs, factors, weights, bias = [conv(x) for x in lr["xs"]], [conv(f) for f in lr["factors"]], conv(lr["weights"]), conv(lr["bias"])
    cw, cf, cb = conv(cp["weights"]), [conv(f) for f in cp["factors"]], conv(cp["bias"])
    x, g = conv(zs[0]), conv(zs[1])
    wxs = [conv(a) for a in wx]
    p = mmfuse.init_wander([8, 8], [6, 5], rank=4, feature_rank=2, token_rank=3, out_dim=8, seed=SEED)
    wparams = {
        "down": [(conv(w), conv(b)) for w, b in p["down"]],
        "feature": [conv(f) for f in p["feature"]],
        "token": [conv(t) for t in p["token"]],
    }
    gelu = plain_gelu(xp)
    cases = {
        "lowrank_fusion B4 d3,4,5 h2 R2": (
            lambda: mmfuse.lowrank_fusion(xs, factors, weights, bias),
            lambda: plain_lowrank(xp, xs, factors, weights, bias),
        ),
        "cp_fusion B4 d3,4,5 h2 R2": (
            lambda: mmfuse.cp_fusion(xs, (cw, cf), cb),
            lambda: plain_cp(xp, xs, cw, cf, cb),
        ),
        "zoom_shift (4,6,5) to (4,7,5)": (
            lambda: mmfuse.zoom_shift(x, g),
            lambda: plain_zoom_shift(xp, x, g),
        ),
        "wander collapsed B4 T6,5 d8 r4 Rh2 Rt3": (
            lambda: mmfuse.wander(wxs, wparams, mode="collapsed"),
            lambda: plain_wander(xp, gelu, wxs, wparams, "collapsed"),
        ),
        "wander cp B4 T6,5 d8 r4 Rh2 Rt3": (
            lambda: mmfuse.wander(wxs, wparams, mode="cp"),
            lambda: plain_wander(xp, gelu, wxs, wparams, "cp"),
        ),
        "wander collapsed B4 T6,5 d8 r4 Rh2 Rt3 plain GELU": (
            lambda: mmfuse.wander(wxs, wparams, mode="collapsed", activation=gelu),
            lambda: plain_wander(xp, gelu, wxs, wparams, "collapsed"),
        ),
        "align rounds=1 (4,6,5),(4,7,5)": (
            lambda: mmfuse.align([x, g], rounds=1),
            lambda: plain_align(xp, [x, g]),
        ),
        "zoom_shift_fusion (4,6,5),(4,7,5)": (
            lambda: mmfuse.zoom_shift_fusion([x, g]),
            lambda: plain_zoom_shift_fusion(xp, [x, g]),
        ),
    }
    return cases


def py_calls(fn: Callable[[], Any]) -> tuple[int, int]:
    """(Python function calls, built-in calls) cProfile records in one call of ``fn`` after a
    warm-up call; the call of ``fn`` itself is not counted."""
    fn()
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    python = builtin = 0
    for (filename, _, funcname), (_, ncalls, *_rest) in stats.items():
        if filename == "~":
            if funcname != "<method 'disable' of '_lsprof.Profiler' objects>":  # the profiler's own
                builtin += ncalls
        else:
            python += ncalls
    return python - 1, builtin


def _loop(fn: Callable[[], Any], inner: int) -> Callable[[], Any]:
    def run():
        for _ in range(inner):
            out = fn()
        return out

    return run


def run_tiny(quick: bool, only: list[str] | None = None) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    import torch

    rows, results = [], []
    inner = 10 if quick else 25
    repeats = 10 if quick else 120
    for xp_name in ("numpy", "torch"):
        for case, (mm, plain) in tiny_cases(xp_name).items():
            if only is not None and not any(text in f"{case} {xp_name}" for text in only):
                continue
            with torch.no_grad():
                err = check_same(f"{case} ({xp_name})", mm(), plain(), 1e-10 if xp_name == "numpy" else 2e-5)
                calls = {"mmfuse": py_calls(mm), "plain": py_calls(plain)}
                rounds = sample_rounds({"mmfuse": _loop(mm, inner), "plain": _loop(plain, inner)}, repeats=repeats, warmup=3)
            times = {k: v / inner for k, v in medians(rounds).items()}
            ratios = round_ratios(rounds, "mmfuse", "plain")  # per round: mmfuse / plain
            spread = (quantile(ratios, 0.1), quantile(ratios, 0.9))
            ratio = times["mmfuse"] / times["plain"]
            rows.append({
                "case": case, "xp": xp_name,
                "mmfuse us": f"{times['mmfuse'] * 1e6:.1f}", "plain us": f"{times['plain'] * 1e6:.1f}",
                "mmfuse/plain": f"{ratio:.2f}", "p10-p90": f"{spread[0]:.2f}-{spread[1]:.2f}",
                "py calls mmfuse": f"{calls['mmfuse'][0]} ({calls['mmfuse'][1]})",
                "py calls plain": f"{calls['plain'][0]} ({calls['plain'][1]})",
            })  # fmt: skip
            results.append({
                "part": "tiny", "case": case, "namespace": xp_name, "mmfuse_seconds": times["mmfuse"],
                "plain_seconds": times["plain"], "ratio_mmfuse_over_plain": ratio, "ratio_p10": spread[0],
                "ratio_p90": spread[1], "rounds": len(ratios), "calls_per_sample": inner,
                "py_calls_mmfuse": calls["mmfuse"][0], "builtin_calls_mmfuse": calls["mmfuse"][1],
                "py_calls_plain": calls["plain"][0], "builtin_calls_plain": calls["plain"][1],
                "rel_err": err,
            })  # fmt: skip
    return rows, results


# ----------------------------------------------------------------------------- layers

LAYER_CASES = {
    # LowRankFusion: (B, dims, h, R); WanderAdapter: (B, lengths, d, r, R_h, R_t)
    "LowRankFusion B32 d32,32,128 h128 R16": ("lmf", (32, (32, 32, 128), 128, 16)),
    "LowRankFusion B1 d32,32,128 h128 R16": ("lmf", (1, (32, 32, 128), 128, 16)),
    "LowRankFusion B32 d8,16,64 h1 R4": ("lmf", (32, (8, 16, 64), 1, 4)),
    "LowRankFusion B1 d8,16,64 h1 R4": ("lmf", (1, (8, 16, 64), 1, 4)),
    "WanderAdapter collapsed MOSI B32": ("wander", (32, (50, 50, 50), 40, 16, 8, 12)),
    "WanderAdapter collapsed MOSI B1": ("wander", (1, (50, 50, 50), 40, 16, 8, 12)),
}


def layer_steps(case: str) -> dict[str, Callable[[], Any]]:
    """{"mmfuse": step, "plain": step}: one training step each, on the same inputs."""
    import torch

    from mmfuse.nn import LowRankFusion, WanderAdapter

    kind, shape = LAYER_CASES[case]
    torch.manual_seed(SEED)
    if kind == "lmf":
        batch, dims, out_dim, rank = shape
        xs = [torch.randn(batch, d, requires_grad=True) for d in dims]
        layer = LowRankFusion(dims, out_dim, rank)
        with torch.no_grad():
            layer.bias.normal_()
        plain = lmf_layer(layer)
    else:
        batch, lengths, dim, rank, r_h, r_t = shape
        xs = [torch.randn(batch, t, dim, requires_grad=True) for t in lengths]
        layer = WanderAdapter((dim,) * len(lengths), lengths, rank, r_h, r_t, mode="collapsed")
        plain = released_wander(layer)

    def step(module):
        def run():
            for p in (*xs, *module.parameters()):
                p.grad = None
            out = module(xs)
            out.sum().backward()
            return out

        run.inputs, run.module = xs, module  # type: ignore[attr-defined]  (for check_step)
        return run

    return {"mmfuse": step(layer), "plain": step(plain)}


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2: some torch builds' profiler prints a line to it at every start
    and stop (``SyncActivityProfilerHandler.cpp ... profiler_start``)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def op_counts(run: Callable[[], Any]) -> tuple[int, int]:
    """("ops top", "aten all") of one step after two warm-up steps (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    run()
    run()
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
        run()

    def is_op(e) -> bool:
        return e.name.startswith(("aten::", "mmfuse::"))

    top = aten = 0
    for e in prof.events():
        if not is_op(e):
            continue
        aten += e.name.startswith("aten::")
        parent = e.cpu_parent
        while parent is not None and not is_op(parent):
            parent = parent.cpu_parent
        top += parent is None
    return top, aten


def run_layers(quick: bool, only: list[str] | None = None) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    rows, results = [], []
    for case in LAYER_CASES:
        if only is not None and not any(text in case for text in only):
            continue
        steps = layer_steps(case)
        # the output and every gradient (inputs, parameters), as torch_cpu.py checks its steps
        err = check_step(case, steps["mmfuse"], steps["plain"], 1e-4)
        ops = {k: op_counts(f) for k, f in steps.items()}
        calls = {k: py_calls(f) for k, f in steps.items()}
        rounds = sample_rounds(steps, repeats=10 if quick else 200, warmup=3)
        times = medians(rounds)
        ratios = round_ratios(rounds, "plain", "mmfuse")  # per round: plain / mmfuse
        spread = (quantile(ratios, 0.1), quantile(ratios, 0.9))
        speedup = times["plain"] / times["mmfuse"]
        rows.append({
            "case": case, "mmfuse ms": f"{times['mmfuse'] * 1e3:.3f}", "plain ms": f"{times['plain'] * 1e3:.3f}",
            "plain/mmfuse": f"{speedup:.2f}", "p10-p90": f"{spread[0]:.2f}-{spread[1]:.2f}",
            "ops top mmfuse": str(ops["mmfuse"][0]), "ops top plain": str(ops["plain"][0]),
            "aten all mmfuse": str(ops["mmfuse"][1]), "aten all plain": str(ops["plain"][1]),
            "py calls mmfuse": f"{calls['mmfuse'][0]} ({calls['mmfuse'][1]})",
            "py calls plain": f"{calls['plain'][0]} ({calls['plain'][1]})",
        })  # fmt: skip
        results.append({
            "part": "layers", "case": case, "mmfuse_seconds": times["mmfuse"], "plain_seconds": times["plain"],
            "ratio_plain_over_mmfuse": speedup, "ratio_p10": spread[0], "ratio_p90": spread[1],
            "rounds": len(ratios), "ops_top_mmfuse": ops["mmfuse"][0], "ops_top_plain": ops["plain"][0],
            "aten_all_mmfuse": ops["mmfuse"][1], "aten_all_plain": ops["plain"][1],
            "py_calls_mmfuse": calls["mmfuse"][0], "builtin_calls_mmfuse": calls["mmfuse"][1],
            "py_calls_plain": calls["plain"][0], "builtin_calls_plain": calls["plain"][1],
            "rel_err": err,
        })  # fmt: skip
    return rows, results


def run_dispatch(quick: bool) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    """Part 3: the eager binding against torch's dispatcher, without and with gradients."""
    import importlib

    import torch

    import mmfuse

    zs = importlib.import_module("mmfuse.backends.torch.zoom_shift")
    x, g = (torch.from_numpy(np.asarray(a, dtype=np.float32)) for a in _tiny_inputs()[2])  # as part 1
    xr = x.clone().requires_grad_(True)
    cands = {
        "binding, no grad": lambda: zs._zoom_shift_eager(x, g, 1.0, -2, None, None, 1e-5),
        "torch.ops, no grad": lambda: torch.ops.mmfuse.zoom_shift(x, g, 1.0, -2, None, None, 1e-5),
        "binding, grad": lambda: zs._zoom_shift_eager(xr, g, 1.0, -2, None, None, 1e-5),
        "torch.ops, grad": lambda: torch.ops.mmfuse.zoom_shift(xr, g, 1.0, -2, None, None, 1e-5),
    }
    want = mmfuse.zoom_shift(x, g)  # every call the public one's result, before any is timed
    for name, call in cands.items():
        check_same(f"dispatch: {name}", call(), want, 0.0)
    times = medians(sample_rounds(cands, repeats=10 if quick else 60, burst=25))
    rows = [{"call": name, "us": f"{t * 1e6:.1f}"} for name, t in times.items()]
    results = [{"part": "dispatch", "call": name, "seconds": t} for name, t in times.items()]
    return rows, results


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--only", action="append", help="run only the part-1 cases whose 'case xp' contains this (repeatable)")
    parser.add_argument("--layers", action="append", help="run only the part-2 cases whose name contains this (repeatable)")
    args = parser.parse_args()
    only, layers = args.only, args.layers
    import torch

    print(f"machine: {machine()}; torch {torch.__version__}, threads {torch.get_num_threads()}; numpy {np.__version__}")
    tiny_results: list[dict[str, Any]] = []
    if layers is None:
        tiny_rows, tiny_results = run_tiny(args.quick, only)
        print("\nTiny inputs, per call (target: mmfuse/plain <= 1.5); py calls: Python (built-in)")
        print_table(tiny_rows, ["case", "xp", "mmfuse us", "plain us", "mmfuse/plain", "p10-p90", "py calls mmfuse", "py calls plain"])
    if only is not None:
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"machine": machine(), "torch": torch.__version__, "numpy": np.__version__,
                           "torch_threads": torch.get_num_threads(), "quick": args.quick, "only": only,
                           "results": tiny_results}, fh, indent=2)  # fmt: skip
        return
    layer_rows, layer_results = run_layers(args.quick, layers)
    print("\nLayers, one training step forward+backward, float32 (target: plain/mmfuse >= 1.2)")
    print_table(layer_rows, ["case", "mmfuse ms", "plain ms", "plain/mmfuse", "p10-p90", "ops top mmfuse", "ops top plain",
                             "aten all mmfuse", "aten all plain", "py calls mmfuse", "py calls plain"])  # fmt: skip
    dispatch_results: list[dict[str, Any]] = []
    if layers is None:
        dispatch_rows, dispatch_results = run_dispatch(args.quick)
        print("\nDispatch: the tiny zoom_shift through the eager binding and through torch.ops")
        print_table(dispatch_rows, ["call", "us"])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine(), "torch": torch.__version__, "numpy": np.__version__,
                       "torch_threads": torch.get_num_threads(), "quick": args.quick,
                       "results": [*tiny_results, *layer_results, *dispatch_results]}, fh, indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
