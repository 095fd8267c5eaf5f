"""mmfuse against the plain code of the same maths at the sizes people train and run with.

Run: ``python benchmarks/sizes.py [--json FILE] [--quick] [--only TEXT ...] [--steps]`` (about
two minutes on 2 cores; ``--quick`` fewer rounds).  ``--only TEXT`` (repeatable) runs just the
cases whose "case xp" label contains one of the texts.

``overhead.py`` holds the tiny calls, where the per-call overhead decides; ``fusion_cpu.py``,
``sequence_cpu.py`` and ``torch_cpu.py`` compare with the released codes' algorithms.  This
script checks the mission's "faster than the plain code at every size" in between: each case
pairs one mmfuse call (backend "auto", as a user calls it) with the plain expression of the
same maths in the same namespace (``_baselines.py``: ``plain_lowrank``, ``plain_cp``,
``plain_tensor_fusion``, ``plain_moments``, ``plain_zoom_shift``, ``plain_align``, ``plain_wander`` with
``plain_gelu``), float32 NumPy arrays and torch CPU tensors under ``torch.no_grad()``, the
outputs checked equal (relative to their largest magnitude) before timing.

- ``lowrank_fusion`` and ``cp_fusion``: (B, dims, h, R) = (1024, (32, 32, 128), 128, 16),
  (4096, (8, 16, 64), 1, 4), (256, (64, 64, 64), 32, 8), (16, (32, 32, 32), 64, 512),
  (512, (16, 16, 16), 32, 8);
- ``tensor_fusion`` (TFN's full weight): (B, dims, h) = (256, (8, 8, 8), 16),
  (4096, (4, 8, 16), 4);
- ``moments``, ``zoom_shift`` (toward a guide of another mean and spread), ``align(rounds=1)``
  (two modalities): (32, 50, 64), (256, 100, 128), (64, 4096, 1) and (64, 4096, 4) (few
  channels over many tokens, which NumPy's broadcasting and sums run slowly, the plain code too);
- ``wander``: the CMU-MOSI adapter (T = 50, 50, 50, d = D = 40, r = 16, R_h = 8, R_t = 12,
  exact GELU, residual "first") at B = 32 and 256 in collapsed mode, B = 32 in cp mode.

Part 2 (``--steps``, or any ``--only`` text matching "step"): torch training steps, forward
and backward of the output's sum with every input and parameter requiring grad, against the
plain expression under autograd, where a review of the forty-third session found mmfuse's
step 1.4-2.2x the plain one's: ``moments``, ``zoom_shift`` and ``align(rounds=1)`` at
(4, 6, 5) (``overhead.py``'s tiny case), (512, 8, 16) and (32, 50, 64) (the statistics'
var_mean, slow past 2048 elements on the CPU),
``sequence_fusion`` (``plain_sequence``) in both modes at (8, 8) tokens, r 4, R_h 2, R_t 2,
D 16, T_out 4, B = 8 and 128, and collapsed at the CMU-MOSI shapes, B = 8 (the custom op's
fixed costs at small batches).

Columns: median milliseconds per call of each, "mmfuse/plain" (below 1: mmfuse faster), the
10th-90th percentiles of that ratio within interleaved rounds (``_harness.round_ratios``),
whether numba was imported when the case ran, and for the steps the torch operators each
dispatches ("ops top" of ``overhead.py``: operator calls not inside another one, forward and
backward).  The order matters there, as in any process:
the first Zoom-and-Shift call of at least ``AUTO_IMPORT_ELEMENTS`` elements (here NumPy's
(256, 100, 128)) lets "auto" import numba, whose CPU kernels then serve ``moments``,
``zoom_shift`` and ``align`` at every size, on NumPy arrays and torch CPU tensors alike; run
``--only "(32,50,64)"`` to see the medium sizes without them.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _baselines import (
    plain_align,
    plain_cp,
    plain_gelu,
    plain_lowrank,
    plain_moments,
    plain_sequence,
    plain_tensor_fusion,
    plain_wander,
    plain_zoom_shift,
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

SEED = 20261204
# the last two: a performance review's crossovers of the forty-second session (a small batch
# with a wide R h: NumPy's blocked form copied every factor per call; narrow ranks at B = 512:
# torch's constant-row fold)
FUSION = [(1024, (32, 32, 128), 128, 16), (4096, (8, 16, 64), 1, 4), (256, (64, 64, 64), 32, 8),
          (16, (32, 32, 32), 64, 512), (512, (16, 16, 16), 32, 8)]  # fmt: skip
TENSOR = [(256, (8, 8, 8), 16), (4096, (4, 8, 16), 4)]  # (B, dims, h): TFN's full weight
# the last: one channel (the review's crossover of numba's CPU kernels, which serve it once the
# (256, 100, 128) case has imported numba)
ALIGN = [(32, 50, 64), (256, 100, 128), (64, 4096, 1), (64, 4096, 4)]
WANDER = [("collapsed", 32), ("collapsed", 256), ("cp", 32)]  # (mode, B) at the MOSI sizes


def cases(xp_name: str) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    """{case: (mmfuse call, plain call)} on float32 inputs of namespace ``xp_name``."""
    import torch

    import mmfuse

    xp: Any = np if xp_name == "numpy" else torch

    def conv(a: np.ndarray) -> Any:
        a = np.ascontiguousarray(a, dtype=np.float32)
        return a if xp is np else torch.from_numpy(a)

    rng = np.random.default_rng(SEED)
    out: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {}
    for batch, dims, h, rank in FUSION:
        xs = [conv(rng.standard_normal((batch, d))) for d in dims]
        p = mmfuse.init_lowrank(dims, rank=rank, out_dim=h, seed=rng, dtype=np.float32)
        fa, w, b = [conv(f) for f in p["factors"]], conv(p["weights"]), conv(rng.standard_normal(h))
        cw = conv(rng.standard_normal(rank))
        cf = [conv(rng.standard_normal((d + 1, rank)) / np.sqrt(d + 1)) for d in dims] + [conv(rng.standard_normal((h, rank)))]
        label = f"B{batch} d{','.join(map(str, dims))} h{h} R{rank}"
        out[f"lowrank_fusion {label}"] = (
            lambda xs=xs, fa=fa, w=w, b=b: mmfuse.lowrank_fusion(xs, fa, w, b),
            lambda xs=xs, fa=fa, w=w, b=b: plain_lowrank(xp, xs, fa, w, b),
        )
        out[f"cp_fusion {label}"] = (
            lambda xs=xs, cw=cw, cf=cf, b=b: mmfuse.cp_fusion(xs, (cw, cf), b),
            lambda xs=xs, cw=cw, cf=cf, b=b: plain_cp(xp, xs, cw, cf, b),
        )
    for batch, dims, h in TENSOR:
        xs = [conv(rng.standard_normal((batch, d))) for d in dims]
        weight = conv(rng.standard_normal((*(d + 1 for d in dims), h)) / 8.0)
        b = conv(rng.standard_normal(h))
        label = f"B{batch} d{','.join(map(str, dims))} h{h}"
        out[f"tensor_fusion {label}"] = (
            lambda xs=xs, weight=weight, b=b: mmfuse.tensor_fusion(xs, weight, b),
            lambda xs=xs, weight=weight, b=b: plain_tensor_fusion(xp, xs, weight, b),
        )
    for shape in ALIGN:
        x = conv(rng.standard_normal(shape))
        g = conv(3.0 + 2.0 * rng.standard_normal(shape))
        label = str(shape).replace(" ", "")
        out[f"moments {label}"] = (lambda x=x: mmfuse.moments(x), lambda x=x: plain_moments(xp, x))
        out[f"zoom_shift {label}"] = (lambda x=x, g=g: mmfuse.zoom_shift(x, g), lambda x=x, g=g: plain_zoom_shift(xp, x, g))
        out[f"align rounds=1 {label} x2"] = (
            lambda x=x, g=g: mmfuse.align([x, g], rounds=1),
            lambda x=x, g=g: plain_align(xp, [x, g]),
        )
    gelu = plain_gelu(xp)
    for mode, batch in WANDER:
        xs = [conv(rng.standard_normal((batch, 50, 40))) for _ in range(3)]
        p = mmfuse.init_wander([40] * 3, [50] * 3, rank=16, feature_rank=8, token_rank=12, out_dim=40,
                               seed=rng, dtype=np.float32)  # fmt: skip
        # non-trivial token factors (the released initialisation's zeros make every term 0)
        p["token"] = [0.1 * rng.standard_normal(t.shape).astype(np.float32) for t in p["token"]]
        params = {"down": [(conv(w), conv(b)) for w, b in p["down"]], "feature": [conv(f) for f in p["feature"]],
                  "token": [conv(t) for t in p["token"]]}  # fmt: skip
        out[f"wander {mode} MOSI B{batch}"] = (
            lambda xs=xs, params=params, mode=mode: mmfuse.wander(xs, params, mode=mode),
            lambda xs=xs, params=params, mode=mode: plain_wander(xp, gelu, xs, params, mode),
        )
    return out


# part 2: (B, T, C) of the statistics' steps; (lengths, r, R_h, R_t, D, T_out, B, mode) of the
# sequence fusion's
STEP_ALIGN = [(4, 6, 5), (512, 8, 16), (32, 50, 64)]
STEP_SEQUENCE = [((8, 8), 4, 2, 2, 16, 4, 8, "collapsed"), ((8, 8), 4, 2, 2, 16, 4, 128, "collapsed"),
                 ((8, 8), 4, 2, 2, 16, 4, 8, "cp"), ((50, 50, 50), 16, 8, 12, 40, 16, 8, "collapsed")]  # fmt: skip


def step_cases() -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    """{case: (mmfuse step, plain step)}: torch float32 training steps (see the docstring)."""
    import torch

    import mmfuse

    rng = np.random.default_rng(SEED + 1)

    def leaf(a: np.ndarray) -> Any:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).requires_grad_()

    def step(fn: Callable[[], Any], *leaves: Any) -> Callable[[], Any]:
        def run() -> Any:
            y = fn()
            total = sum(t.sum() for t in y) if isinstance(y, (list, tuple)) else y.sum()
            total.backward()
            return [t.detach() for t in y] if isinstance(y, (list, tuple)) else y.detach()

        run.fn, run.leaves = fn, leaves  # type: ignore[attr-defined]  (what check_step compares)
        return run

    out: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {}
    for shape in STEP_ALIGN:
        x, g = leaf(rng.standard_normal(shape)), leaf(3.0 + 2.0 * rng.standard_normal(shape))
        label = str(shape).replace(" ", "")
        out[f"moments step {label}"] = (
            step(lambda x=x: mmfuse.moments(x), x), step(lambda x=x: plain_moments(torch, x), x)
        )
        out[f"zoom_shift step {label}"] = (
            step(lambda x=x, g=g: mmfuse.zoom_shift(x, g), x, g),
            step(lambda x=x, g=g: plain_zoom_shift(torch, x, g), x, g),
        )
        out[f"align rounds=1 step {label} x2"] = (
            step(lambda x=x, g=g: mmfuse.align([x, g], rounds=1), x, g),
            step(lambda x=x, g=g: plain_align(torch, [x, g]), x, g),
        )
    for lengths, r, r_h, r_t, d, t_out, batch, mode in STEP_SEQUENCE:
        hs = [leaf(rng.standard_normal((batch, t, r))) for t in lengths]
        feats = [leaf(rng.standard_normal((r_h, r, d)) / np.sqrt(r)) for _ in lengths]
        toks = [leaf(rng.standard_normal((r_t, t, t_out)) / t) for t in lengths]
        label = f"{mode} T{','.join(map(str, lengths))} r{r} Rh{r_h} Rt{r_t} D{d} B{batch}"
        out[f"sequence_fusion step {label}"] = (
            step(lambda hs=hs, f=feats, t=toks, m=mode: mmfuse.sequence_fusion(hs, f, t, mode=m), *hs, *feats, *toks),
            step(lambda hs=hs, f=feats, t=toks, m=mode: plain_sequence(torch, hs, f, t, m), *hs, *feats, *toks),
        )
    return out


def check_step(case: str, mm: Callable[[], Any], plain: Callable[[], Any], rtol: float) -> float:
    """The largest relative difference of mmfuse's step from the plain one: the outputs, then
    every leaf's gradient on its own (each against its own scale), raising past ``rtol``
    (``check_same``).  The outputs alone had let a step whose backward is wrong, or does less
    work, be timed.  The gradients are of the outputs against random weights, not of their
    sum, whose gradient is zero for x in zoom_shift and align (a centred x's sum): two noises
    compared with each other."""
    import torch

    def run(step: Any) -> list[Any]:
        for t in step.leaves:
            t.grad = None
        y = step.fn()
        ys = list(y) if isinstance(y, (list, tuple)) else [y]
        gen = torch.Generator().manual_seed(SEED)
        weights = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in ys]
        sum((t * w).sum() for t, w in zip(ys, weights)).backward()
        return [torch.cat([t.detach().reshape(-1) for t in ys]), *(t.grad for t in step.leaves)]

    got, want = run(mm), run(plain)
    names = ["output", *(f"gradient {i}" for i in range(len(want) - 1))]
    return max(check_same(f"{case}: {name}", g, w, rtol) for name, g, w in zip(names, got, want))


def run(quick: bool, only: list[str] | None, steps: bool) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    import torch

    rows, results = [], []
    groups = [(xp_name, cases, torch.no_grad) for xp_name in ("numpy", "torch")]
    if steps:
        groups.append(("torch", step_cases, torch.enable_grad))
    for xp_name, make, grad_mode in groups:
        for case, (mm, plain) in make(*(() if make is step_cases else (xp_name,))).items():
            if only is not None and not any(text in f"{case} {xp_name}" for text in only):
                continue
            ops = ("-", "-")
            with grad_mode():
                if make is step_cases:
                    from overhead import op_counts

                    err = check_step(f"{case} ({xp_name})", mm, plain, 1e-4)
                    ops = (str(op_counts(mm)[0]), str(op_counts(plain)[0]))
                else:
                    err = check_same(f"{case} ({xp_name})", mm(), plain(), 1e-4)
                rounds = sample_rounds({"mmfuse": mm, "plain": plain}, repeats=5 if quick else 15, warmup=2)
            times = medians(rounds)
            ratios = round_ratios(rounds, "mmfuse", "plain")
            ratio = times["mmfuse"] / times["plain"]
            spread = (quantile(ratios, 0.1), quantile(ratios, 0.9))
            numba = "numba" in sys.modules  # (see the module docstring)
            rows.append({"case": case, "xp": xp_name, "mmfuse ms": f"{times['mmfuse'] * 1e3:.3f}",
                         "plain ms": f"{times['plain'] * 1e3:.3f}", "mmfuse/plain": f"{ratio:.2f}",
                         "p10-p90": f"{spread[0]:.2f}-{spread[1]:.2f}", "numba": "yes" if numba else "no",
                         "ops mmfuse": ops[0], "ops plain": ops[1]})  # fmt: skip
            results.append({"case": case, "namespace": xp_name, "mmfuse_seconds": times["mmfuse"],
                            "plain_seconds": times["plain"], "ratio_mmfuse_over_plain": ratio,
                            "ratio_p10": spread[0], "ratio_p90": spread[1], "numba_imported": numba,
                            "rel_err": err, "ops_top": ops})  # fmt: skip
    return rows, results


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--only", action="append", help="run only the cases whose 'case xp' contains this (repeatable)")
    parser.add_argument("--steps", action="store_true", help="also part 2, torch training steps")
    args = parser.parse_args()
    import torch

    print(f"machine: {machine()}; torch {torch.__version__}, threads {torch.get_num_threads()}; numpy {np.__version__}")
    steps = args.steps or any("step" in text for text in args.only or [])
    rows, results = run(args.quick, args.only, steps)
    print("\nfloat32, backend 'auto', no gradients (\"step\" rows: a training step; mmfuse/plain below 1: mmfuse faster)")
    print_table(rows, ["case", "xp", "mmfuse ms", "plain ms", "mmfuse/plain", "p10-p90", "numba", "ops mmfuse",
                       "ops plain"])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine(), "torch": torch.__version__, "numpy": np.__version__,
                       "quick": args.quick, "results": results}, fh, indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
