"""LowRankFusion and WanderAdapter forward+backward on CPU: mmfuse's custom ops vs
straightforward torch layers in the style of the released code (LMF, Wander).

Run: ``python benchmarks/torch_cpu.py [--json FILE] [--quick]``.

Candidates, float32, all cores, one training step's forward and backward (``out.sum()``
back-propagated to the inputs and all parameters):

- ``mmfuse-layer``: ``mmfuse.nn.LowRankFusion`` under "auto": the wide case the
  ``mmfuse::lowrank_fusion`` custom op (blocked forward, analytic backward that saves only
  the inputs), the narrow second case (B R h = 2**18) the plain form, rank-major GEMMs under
  autograd (``mmfuse.backends.torch.lowrank.plain_fusion``).
- ``mmfuse-core``: the same layer forced onto the Array-API core (autograd through it).
- ``lmf-layer``: a straightforward layer in the style of LMF's released code: concatenate the
  constant, one batched matmul per modality giving (R, B, h), elementwise product, rank-weighted
  sum by a matmul, autograd for the backward.

WanderAdapter at the CMU-MOSI defaults of the released code (B = 256, M = 3, T = (50, 50, 50),
d = 40, r = 16, R_h = 8, R_t = 12, T_out = r), float32, ``out.sum()`` back-propagated to the
inputs and all parameters:

- ``mmfuse-layer``: ``mmfuse.nn.WanderAdapter(mode="collapsed")`` (what the released code
  computes): the whole adapter as the ``mmfuse::wander_collapsed`` custom op (down-projection,
  GELU, fusion, residual; its backward keeps the pre-activations, first contractions and terms).
- ``mmfuse-core``: the same layer forced onto the Array-API core (autograd through it).
- ``mmfuse-cp``: ``WanderAdapter(mode="cp")``, the true CP contraction (R_h R_t = 96 times
  the work of collapsed mode; reported for scale, not a like-for-like comparison), and
  ``mmfuse-cp-core``, the same through the Array-API core: here the custom op's memory-lean
  backward matters (the core keeps M (B, R_t T_out, R_h D) terms for backward).
- ``released-layer``: a straightforward torch version of the released adapter: ``nn.Linear``
  + ``F.gelu`` per modality, rank sums of the factors inside forward, ``(x @ wd).permute @
  wt``, product, permute, residual; autograd for the backward.

CPFusion (not among issue 5's or 19's targets) at the narrow sizes, B = 65536, (8, 16, 64), h 1,
R = 4 and 16: ``mmfuse-layer`` (under "auto": on the CPU at these sizes the core under
autograd, as ``mmfuse-core``; from 8192 to 24576 samples plain operations in rank-major form,
see ``mmfuse.backends.torch.cp.plain_form``), ``mmfuse-core`` (the core under autograd,
batch-major), ``mmfuse-op`` (the
``mmfuse::cp_fusion`` custom op, which CUDA tensors and ``torch.compile`` take; its backward
recomputes the projections) and ``cp-layer``, CP fusion written plainly (one matmul per
modality, the product, the output factor; autograd keeps the projections).

Small batches: the same layers at B = 32 (no target; what a training step of typical size
costs, where per-call overhead rather than memory traffic decides).  Timed only.

``--batches`` runs instead the steps between those and the large batches (LowRankFusion at
B = 256-8192 with h 1, 4, 16 and 128, WanderAdapter at B = 8, 128, 512, CPFusion at
B = 1024 and either side of its plain form's rule, with the core), timed only, the mmfuse layer against the plain one: where the small forms hand
over to each other and to the custom ops (low-rank fusion's plain form, ``plain_fusion``,
runs up to B R h = 2**20 and turns rank-major past 1024 samples with h = 1).

Before a case is timed, every candidate's step is checked against its reference
(:func:`check`): the output and the gradients of the inputs and of the parameters (the plain
layer's mapped onto the mmfuse layer's, :func:`param_grads`), each within ``RTOL`` relative
to its largest entry.  The reference is the case's plain layer, except for ``mmfuse-cp`` and
``mmfuse-cp-core``: the CP contraction written plainly (``_baselines.plain_wander``) on their
own layer's parameters.  A mismatch raises and nothing is timed.

Every time is the median over interleaved rounds; "ratio p10-p90" is the spread of the
speed-up measured within single rounds (see ``_harness.round_ratios``), the machine's drift.

Peak memory is the RSS growth of one forward+backward in a fresh process (see _harness.py).
At the Wander sizes the whole step allocates a few MiB, which glibc serves from memory the
warm-up call freed, so the RSS growth is mostly noise there; the Wander rows therefore also
report "saved MiB": the bytes autograd holds from forward to backward (tensors saved for
backward, inputs and parameters excluded, counted once per storage), measured with
``torch.autograd.graph.saved_tensors_hooks``.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _baselines import cp_layer, lmf_layer, plain_wander, released_wander
from _harness import (
    arg_parser,
    check_same,
    machine,
    medians,
    peak_rss_mib,
    print_table,
    quantile,
    round_ratios,
    sample_rounds,
)

CASES = {
    "B4096-d32,32,128-h128-R16": (4096, (32, 32, 128), 128, 16),
    "B65536-d8,16,64-h1-R4": (65536, (8, 16, 64), 1, 4),
    "B32-d32,32,128-h128-R16": (32, (32, 32, 128), 128, 16),
    "B32-d8,16,64-h1-R4": (32, (8, 16, 64), 1, 4),
}
# WanderAdapter: (B, T_m, d, r, R_h, R_t)
WANDER_CASES = {
    "wander-MOSI-B256-T50,50,50-d40-r16-Rh8-Rt12": (256, (50, 50, 50), 40, 16, 8, 12),
    "wander-MOSI-B32-T50,50,50-d40-r16-Rh8-Rt12": (32, (50, 50, 50), 40, 16, 8, 12),
}
# CPFusion: (B, dims, h, R)
CP_CASES = {
    "cp-B65536-d8,16,64-h1-R4": (65536, (8, 16, 64), 1, 4),
    "cp-B65536-d8,16,64-h1-R16": (65536, (8, 16, 64), 1, 16),
}
# --batches: training steps between the small and the large batches (timed only, the mmfuse
# layer against the plain one), where the small forms' row bounds switch to the custom ops
BATCH_CASES = {
    "B256-d32,32,128-h128-R16": (256, (32, 32, 128), 128, 16),
    "B1024-d32,32,128-h128-R16": (1024, (32, 32, 128), 128, 16),
    "B512-d8,16,64-h1-R4": (512, (8, 16, 64), 1, 4),
    "B1024-d8,16,64-h1-R4": (1024, (8, 16, 64), 1, 4),
    "B2048-d8,16,64-h1-R4": (2048, (8, 16, 64), 1, 4),
    "B8192-d8,16,64-h1-R4": (8192, (8, 16, 64), 1, 4),
    # past the whole-batch function's 256 rows, up to B R h = 2**20: the plain form (plain_fusion)
    "B512-d8,16,64-h4-R16": (512, (8, 16, 64), 4, 16),
    "B4096-d8,16,64-h4-R16": (4096, (8, 16, 64), 4, 16),
    "B4096-d8,16,64-h16-R16": (4096, (8, 16, 64), 16, 16),
    "B512-d32,32,128-h128-R16": (512, (32, 32, 128), 128, 16),
}
BATCH_WANDER_CASES = {
    f"wander-MOSI-B{b}-T50,50,50-d40-r16-Rh8-Rt12": (b, (50, 50, 50), 40, 16, 8, 12) for b in (8, 128, 512)
}
BATCH_CP_CASES = {
    "cp-B1024-d8,16,64-h1-R4": (1024, (8, 16, 64), 1, 4),
    "cp-B1024-d32,32,128-h128-R16": (1024, (32, 32, 128), 128, 16),
    # either side of CP's plain rank-major form (mmfuse.backends.torch.cp.plain_form:
    # 8192 <= B <= 24576, h <= 4, sum d_m <= 128; mmfuse-core is the core's batch-major form it
    # replaces there)
    "cp-B4096-d8,16,64-h1-R4": (4096, (8, 16, 64), 1, 4),
    "cp-B8192-d8,16,64-h1-R4": (8192, (8, 16, 64), 1, 4),
    "cp-B32768-d8,16,64-h1-R4": (32768, (8, 16, 64), 1, 4),
    "cp-B65536-d8,16,64-h4-R4": (65536, (8, 16, 64), 4, 4),
    "cp-B65536-d8,16,64-h16-R4": (65536, (8, 16, 64), 16, 4),
    "cp-B65536-d32,32,128-h1-R16": (65536, (32, 32, 128), 1, 16),
}
SMALL_BATCH = {case for case, shape in (*CASES.items(), *WANDER_CASES.items()) if shape[0] == 32}
BASELINE = {**dict.fromkeys(CASES, "lmf-layer"), **dict.fromkeys(WANDER_CASES, "released-layer"),
            **dict.fromkeys(CP_CASES, "cp-layer"), **dict.fromkeys(BATCH_CASES, "lmf-layer"),
            **dict.fromkeys(BATCH_WANDER_CASES, "released-layer"),
            **dict.fromkeys(BATCH_CP_CASES, "cp-layer")}  # fmt: skip


def setup_wander(case: str, device: str = "cpu", shape: tuple | None = None) -> dict[str, object]:
    """As :func:`setup`; ``shape``: (B, T_m, d, r, R_h, R_t) instead of the case's."""
    import torch

    import mmfuse
    from mmfuse.nn import WanderAdapter

    batch, lengths, dim, rank, r_h, r_t = shape or WANDER_CASES[case]
    torch.manual_seed(20261122)
    xs = [torch.randn(batch, t, dim, device=device, requires_grad=True) for t in lengths]
    dims = (dim,) * len(lengths)
    layer = WanderAdapter(dims, lengths, rank, r_h, r_t, mode="collapsed", device=device)
    cp_layer = WanderAdapter(dims, lengths, rank, r_h, r_t, mode="cp", device=device)

    released = released_wander(layer)

    def plain_cp(inputs):
        # cp mode is other maths than the released (collapsed) layer: its reference is the CP
        # contraction written plainly, on cp_layer's own parameters (so their grads land there)
        params = {"down": list(zip(cp_layer.down_weights, cp_layer.down_biases)),
                  "feature": list(cp_layer.feature_factors), "token": list(cp_layer.token_factors)}  # fmt: skip
        return plain_wander(torch, torch.nn.functional.gelu, inputs, params, "cp")

    def step(module, call=None, **kw):
        def forward():
            with mmfuse.config_context(**kw):
                return (call or module)(xs)

        def run():
            for p in (*xs, *module.parameters()):
                p.grad = None
            out = forward()
            out.sum().backward()
            return out

        run.forward = forward  # type: ignore[attr-defined]
        run.leaves = [*xs, *module.parameters()]  # type: ignore[attr-defined]
        run.inputs, run.module = xs, module  # type: ignore[attr-defined]  (for check_step)
        return run

    cands = {
        "mmfuse-layer": step(layer),
        "mmfuse-core": step(layer, backend="array_api"),
        "mmfuse-cp": step(cp_layer),
        "mmfuse-cp-core": step(cp_layer, backend="array_api"),
        "released-layer": step(released),
    }
    for name in ("mmfuse-cp", "mmfuse-cp-core"):  # checked against it, not timed
        cands[name].reference = ("plain-cp", step(cp_layer, plain_cp))  # type: ignore[attr-defined]
    return cands


def saved_mib(run) -> float:
    """MiB autograd keeps from forward to backward (saved tensors, leaves excluded)."""
    import torch

    leaves = {t.untyped_storage().data_ptr() for t in run.leaves}
    storages: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in leaves:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run.forward()
    del out
    return sum(storages.values()) / 2**20


def setup(case: str, device: str = "cpu", shape: tuple | None = None) -> dict[str, object]:
    """The candidates of one case, as callables running one forward+backward step on ``device``
    (benchmarks/gpu.py times the same candidates on CUDA); ``shape``: a LowRankFusion case's
    (B, dims, h, R) instead of the case's (benchmarks/gpu_tune.py's batch sweep)."""
    import torch

    if case in WANDER_CASES:
        return setup_wander(case, device)

    import mmfuse
    from mmfuse.nn import CPFusion, LowRankFusion

    batch, dims, out_dim, rank = shape or (CASES[case] if case in CASES else CP_CASES[case])
    torch.manual_seed(20261122)
    xs = [torch.randn(batch, d, device=device, requires_grad=True) for d in dims]
    if case in CP_CASES:
        layer = CPFusion(dims, out_dim, rank, device=device)
        baseline = ("cp-layer", cp_layer(layer))
    else:
        layer = LowRankFusion(dims, out_dim, rank, device=device)
        baseline = ("lmf-layer", lmf_layer(layer))

    def step(module, **kw):
        def run():
            for p in (*xs, *module.parameters()):
                p.grad = None
            if kw:
                with mmfuse.config_context(**kw):
                    out = module(xs)
            else:
                out = module(xs)
            out.sum().backward()
            return out

        run.inputs, run.module = xs, module  # type: ignore[attr-defined]  (for check_step)
        return run

    cands = {"mmfuse-layer": step(layer), "mmfuse-core": step(layer, backend="array_api")}
    if case in CP_CASES:
        cands["mmfuse-op"] = _custom_op_step(step(layer))
    cands[baseline[0]] = step(baseline[1])
    return cands


def _custom_op_step(run):
    """``run`` with CPFusion held on its custom op (which "auto" leaves for the core under
    autograd on the CPU at these sizes: ``mmfuse.backends.torch.cp.AUTOGRAD_ON_CPU``)."""
    import importlib

    cp = importlib.import_module("mmfuse.backends.torch.cp")

    def on_op():
        saved, cp.AUTOGRAD_ON_CPU = cp.AUTOGRAD_ON_CPU, False
        try:
            return run()
        finally:
            cp.AUTOGRAD_ON_CPU = saved

    on_op.__dict__.update(run.__dict__)  # its inputs and module, for check_step
    return on_op


def _mem_ratio(this: float | None, base: float | None) -> str:
    """this/base peak RSS growth; "n/a" where the baseline grew by less than 0.1 MiB (the
    Wander step's few MiB come from memory the warm-up freed, so there is nothing to divide by)."""
    if this is None or base is None:
        return "-"
    return f"{this / base:.2f}" if base >= 0.1 else "n/a"


# float32 steps against float32 steps (observed: outputs ~1e-7, gradients up to ~5e-6 of their
# largest entry); a wrong or missing term, or a gradient not reached, is far above
RTOL = 1e-4


def param_grads(module) -> dict[str, object]:
    """The gradients of ``module``'s parameters by the mmfuse layer's names and in its layout:
    the plain layers of ``_baselines.py`` hold copies of the mmfuse layer's parameters, some
    rearranged (LMF's constant first, its weights and bias (1, n); ``nn.Linear``'s transposed
    weight); ``cp_layer``'s and the mmfuse layers' names agree.  A gradient not reached is 0."""
    import torch

    def grad(p):
        return torch.zeros_like(p) if p.grad is None else p.grad

    kind = type(module).__name__
    if kind == "LMFLayer":
        grads = {f"factors.{i}": torch.cat([grad(f)[:, 1:], grad(f)[:, :1]], dim=1) for i, f in enumerate(module.factors)}
        return {**grads, "weights": grad(module.fusion_weights)[0], "bias": grad(module.fusion_bias)[0]}
    if kind == "ReleasedWander":
        grads = {}
        for i, lin in enumerate(module.linears):
            grads[f"down_weights.{i}"], grads[f"down_biases.{i}"] = grad(lin.weight).T, grad(lin.bias)
        grads.update({f"feature_factors.{i}": grad(f) for i, f in enumerate(module.factor_dim)})
        return {**grads, **{f"token_factors.{i}": grad(t) for i, t in enumerate(module.factor_t)}}
    return {name: grad(p) for name, p in module.named_parameters()}


def step_result(run) -> tuple[object, dict[str, object]]:
    """One step of ``run`` (a candidate of :func:`setup`): its output and the gradients of its
    inputs and parameters (:func:`param_grads`), copied: the next step overwrites them."""
    out = run()
    grads = {f"inputs.{i}": x.grad for i, x in enumerate(run.inputs)}
    grads.update(param_grads(run.module))
    return out.detach().clone(), {k: g.detach().clone() for k, g in grads.items()}


def check_step(case: str, got, want, rtol: float = RTOL) -> float:
    """The largest relative error of one step of ``got`` against one of ``want``: the output
    and every gradient compared on its own (``check_same``, which raises past ``rtol``)."""
    out, grads = step_result(got)
    want_out, want_grads = step_result(want)
    if grads.keys() != want_grads.keys():
        raise AssertionError(f"{case}: gradients of {sorted(grads)} against {sorted(want_grads)}")
    errs = [check_same(f"{case} output", out, want_out, rtol)]
    errs += [check_same(f"{case} grad {name}", grads[name], want_grads[name], rtol) for name in want_grads]
    return max(errs)


def check(
    cands: dict[str, object], baseline: str = "lmf-layer", case: str = "", rtol: float = RTOL
) -> dict[str, tuple[str, float]]:
    """{candidate: (its reference, relative error)} of every candidate but ``baseline``, checked
    (:func:`check_step`: output and gradients; raises on a mismatch) before anything is timed:
    against the plain layer ``baseline``, or a candidate's own ``reference`` (the cp-mode
    Wander candidates: other maths, on a layer of their own)."""
    errs = {}
    for name, run in cands.items():
        if name == baseline:
            continue
        ref_name, ref = getattr(run, "reference", (baseline, cands[baseline]))
        errs[name] = (ref_name, check_step(f"{case} {name} vs {ref_name}", run, ref, rtol))
    return errs


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--batches", action="store_true",
                        help="only the training steps at intermediate batches (BATCH_CASES), timed, mmfuse-layer "
                             "against the plain layer")  # fmt: skip
    args = parser.parse_args()
    import torch

    print(f"machine: {machine()}; torch {torch.__version__}, threads {torch.get_num_threads()}")
    rows, results = [], []
    cases: tuple[str, ...] = (*CASES, *WANDER_CASES, *CP_CASES)
    if args.batches:
        CASES.update(BATCH_CASES)
        WANDER_CASES.update(BATCH_WANDER_CASES)
        CP_CASES.update(BATCH_CP_CASES)
        cases = (*BATCH_CASES, *BATCH_WANDER_CASES, *BATCH_CP_CASES)
        SMALL_BATCH.update(cases)
    for case in cases:
        base = BASELINE[case]
        cands = setup(case)
        if args.batches:  # (CPFusion with the core too: the form its rule weighs against)
            names = ("mmfuse-layer", "mmfuse-core", base) if case in BATCH_CP_CASES else ("mmfuse-layer", base)
            cands = {name: cands[name] for name in names}
        errs = check(cands, base, case)
        rounds = sample_rounds(cands, repeats=5 if args.quick else 15)
        times = medians(rounds)
        timed_only = args.quick or case in SMALL_BATCH
        mem = {} if timed_only else {n: peak_rss_mib("torch_cpu", case, n) for n in cands}
        saved = {n: saved_mib(f) for n, f in cands.items() if hasattr(f, "forward")}
        for name, t in times.items():
            ratios = round_ratios(rounds, base, name)
            spread = (quantile(ratios, 0.1), quantile(ratios, 0.9))
            row = {
                "case": case,
                "candidate": name,
                "fwd+bwd ms": f"{t * 1e3:.2f}",
                "base/this time": f"{times[base] / t:.2f}",
                "ratio p10-p90": f"{spread[0]:.2f}-{spread[1]:.2f}",
                "peak MiB": f"{mem[name]:.1f}" if name in mem else "-",
                "this/base mem": _mem_ratio(mem.get(name), mem.get(base)),
                "saved MiB": f"{saved[name]:.1f}" if name in saved else "-",
                "this/base saved": f"{saved[name] / max(saved[base], 1e-9):.2f}" if name in saved else "-",
            }
            rows.append(row)
            # each row its own check (output and gradients): None for the baseline, the
            # reference of the others
            checked_against, err = errs.get(name, (None, None))
            results.append({"case": case, "candidate": name, "baseline": base, "seconds": t,
                            "ratio_p10": spread[0], "ratio_p90": spread[1], "rounds": len(ratios),
                            "peak_mib": mem.get(name), "saved_mib": saved.get(name),
                            "checked_against": checked_against, "rel_err": err})  # fmt: skip
        print(f"{case}: max rel. error (output and gradients) "
              + ", ".join(f"{name} vs {ref} {err:.1e}" for name, (ref, err) in errs.items()))  # fmt: skip
    print("base = lmf-layer (LowRankFusion cases), released-layer (WanderAdapter cases), cp-layer (CPFusion cases)")
    print_table(rows, ["case", "candidate", "fwd+bwd ms", "base/this time", "ratio p10-p90", "peak MiB", "this/base mem",
                       "saved MiB", "this/base saved"])  # fmt: skip
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine(), "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
