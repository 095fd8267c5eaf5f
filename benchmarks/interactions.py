"""Interaction terms by order vs the plain fusion they explain (issue 22), on CPU.

Run: ``OPENBLAS_NUM_THREADS=1 python benchmarks/interactions.py [--json FILE] [--quick] [--rule]``.

The target: ``lowrank_interactions(..., by="order")`` at M = 8 costs at most 2x a plain
``lowrank_fusion`` call at (B, M x d, h, R) = (4096, 8 x 32, 64, 8).  Candidates, float32
(``--dtype float64`` for the other), all side by side in one process:

- ``lowrank_fusion``: the fused output, (B, h), NumPy arrays ("auto": the cache-blocked core).
- ``lowrank_interactions-order``: its M + 1 = 9 terms by order, (9, B, h), by the O(M^2)
  recursion per rank, under "auto": with numba installed, the recursion compiled
  (:mod:`mmfuse.backends._numba_interactions`; these calls are above
  ``AUTO_IMPORT_PRODUCTS``, so "auto" imports numba for them).
- ``lowrank_interactions-order[array_api]``: the same with ``backend="array_api"``, the core's
  NumPy variant (in-place ufuncs): what "auto" runs without numba.
- ``cp_interactions-order`` / ``cp_fusion``: the same for a CP fusion of rank 64 (for context).
- ``lowrank_interactions-subset`` (M = 4 only; by subset is 2^M terms).
- ``torch ...`` (torch installed, M = 8): the same calls on torch CPU tensors ("auto": the
  torch backend's custom op for the fusion; for the terms without gradients the numba kernel
  through NumPy views of the tensors, with ``[grad]`` (factors requiring gradients) the core
  under autograd, forward only).

Before a case is timed, every candidate is checked (:func:`check`: the fusions against their
plain expressions, the terms' sum against the fusion, the terms against the float64 oracle
``mmfuse.reference`` on a few samples); a mismatch raises and nothing is timed.

The ratio column is each candidate's median time over its plain fusion's (same namespace);
"p10-p90" is the spread of that ratio over the interleaved rounds (each round times both
within milliseconds of each other).  On a shared machine, OpenBLAS's and torch's worker
threads spin while other processes hold the cores and every GEMM-heavy call slows down
erratically (the fusion's median can move 10x); there, run with ``OPENBLAS_NUM_THREADS=1``
(torch then runs on one thread too: :func:`main` sets it) for ratios that mean something.

``--rule``: the measurements behind ``AUTO_IMPORT_PRODUCTS`` (docs/backends.rst): the
one-time cost of importing numba and loading the recursion's cached kernel in a fresh process,
then per-call times of the NumPy variant and the kernel by the recursion's products, and the
calls after which the one-time cost is repaid.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _baselines import plain_cp, plain_lowrank
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

# (batch, dims, out_dim, rank)
CASES = {
    "B4096-8x32-h64-R8": (4096, (32,) * 8, 64, 8),
    "B4096-4x32-h64-R8": (4096, (32,) * 4, 64, 8),
}
BASE = {
    "lowrank_interactions-order": "lowrank_fusion",
    "lowrank_interactions-order[array_api]": "lowrank_fusion",
    "lowrank_interactions-subset": "lowrank_fusion",
    "cp_interactions-order": "cp_fusion",
    "cp_interactions-order[array_api]": "cp_fusion",
    "torch lowrank_interactions-order": "torch lowrank_fusion",
    "torch lowrank_interactions-order[grad]": "torch lowrank_fusion",
}
RTOL = {"float32": 1e-5, "float64": 1e-12}  # observed ~5e-7 and ~1e-15; a term moved or lost is far above
REF_ROWS = 2  # samples the oracle (mmfuse.reference: loops over subsets, ranks and samples) checks
HAS_NUMBA = importlib.util.find_spec("numba") is not None
HAS_TORCH = importlib.util.find_spec("torch") is not None
DTYPE = os.environ.get("MMFUSE_BENCH_DTYPE", "float32")


def _inputs(case: str):
    """(xs, LMF factors, LMF weights, CP decomposition) of the case, in ``DTYPE``."""
    import mmfuse

    batch, dims, out_dim, rank = CASES[case]
    dtype = np.dtype(DTYPE)
    rng = np.random.default_rng(20261202)
    xs = [rng.standard_normal((batch, d)).astype(dtype) for d in dims]
    p = mmfuse.init_lowrank(dims, rank=rank, out_dim=out_dim, seed=rng, dtype=dtype)
    cp_rank = 64
    cp = (
        np.ones(cp_rank, dtype),
        [(rng.standard_normal((d + 1, cp_rank)) / np.sqrt(d + 1)).astype(dtype) for d in dims]
        + [(rng.standard_normal((out_dim, cp_rank)) / np.sqrt(cp_rank)).astype(dtype)],
    )
    return xs, p["factors"], p["weights"], cp


def setup(case: str) -> dict[str, object]:
    import mmfuse

    dims = CASES[case][1]
    xs, factors, weights, cp = _inputs(case)
    cands = {
        "lowrank_fusion": lambda: mmfuse.lowrank_fusion(xs, factors, weights),
        "lowrank_interactions-order": lambda: mmfuse.lowrank_interactions(xs, factors, weights)[0],
        "cp_fusion": lambda: mmfuse.cp_fusion(xs, cp),
        "cp_interactions-order": lambda: mmfuse.cp_interactions(xs, cp)[0],
        "lowrank_interactions-order[array_api]": lambda: mmfuse.lowrank_interactions(
            xs, factors, weights, backend="array_api"
        )[0],
        "cp_interactions-order[array_api]": lambda: mmfuse.cp_interactions(xs, cp, backend="array_api")[0],
    }
    if len(dims) <= 4:
        cands["lowrank_interactions-subset"] = lambda: mmfuse.lowrank_interactions(
            xs, factors, weights, by="subset"
        )[0]
    elif HAS_TORCH:
        import torch

        txs = [torch.from_numpy(x) for x in xs]
        tf, tw = [torch.from_numpy(f) for f in factors], torch.from_numpy(weights)
        cands["torch lowrank_fusion"] = lambda: mmfuse.lowrank_fusion(txs, tf, tw)
        cands["torch lowrank_interactions-order"] = lambda: mmfuse.lowrank_interactions(txs, tf, tw)[0]
        tg = [f.clone().requires_grad_(True) for f in tf]
        cands["torch lowrank_interactions-order[grad]"] = lambda: mmfuse.lowrank_interactions(txs, tg, tw)[
            0
        ].detach()
    return cands


def check(case: str, cands: dict[str, object]) -> dict[str, dict[str, float]]:
    """{candidate: {what it was checked against: relative error}}, checked before timing
    (``check_same`` raises past ``RTOL``).  The fusions: against their plain expressions
    (``_baselines.py``).  The terms: summed over the orders (or subsets), against the fused
    output of their namespace, on every sample; and term by term against the float64 oracle
    ``mmfuse.reference.lowrank_interactions`` on the first ``REF_ROWS`` samples (CP's through
    ``cp_to_lowrank``: its own oracle builds the full weight tensor), which the sum cannot
    tell from terms moved between orders."""
    import mmfuse.reference as reference

    rtol = RTOL[DTYPE]
    xs, factors, weights, cp = _inputs(case)

    def plain_torch():
        import torch

        t = torch.from_numpy
        return plain_lowrank(torch, [t(x) for x in xs], [t(f) for f in factors], t(weights), 0.0)

    # the fusions' plain expressions, in the candidate's namespace
    plain = {
        "lowrank_fusion": ("plain lowrank", lambda: plain_lowrank(np, xs, factors, weights, 0.0)),
        "cp_fusion": ("plain cp", lambda: plain_cp(np, xs, cp[0], cp[1], 0.0)),
        "torch lowrank_fusion": ("plain lowrank (torch)", plain_torch),
    }
    errs: dict[str, dict[str, float]] = {}
    for name, (label, fn) in plain.items():
        if name in cands:
            errs[name] = {label: check_same(f"{case} {name} vs {label}", cands[name](), fn(), rtol)}
    head = [x[:REF_ROWS] for x in xs]
    oracle = {"lowrank": reference.lowrank_interactions(head, factors, weights),
              "cp": reference.lowrank_interactions(head, *reference.cp_to_lowrank(cp))}  # fmt: skip
    for name, base in BASE.items():
        if name not in cands:
            continue
        terms = cands[name]()
        errs[name] = {f"sum vs {base}": check_same(f"{case} {name} sum vs {base}", terms.sum(0), cands[base](), rtol)}
        kind = "cp" if name.startswith("cp") else "lowrank"
        by = "subset" if name.endswith("-subset") else "order"
        want = oracle[kind][0] if by == "order" else reference.lowrank_interactions(head, factors, weights, by=by)[0]
        label = f"mmfuse.reference (first {REF_ROWS} samples)"
        errs[name][label] = check_same(f"{case} {name} vs {label}", terms[:, :REF_ROWS], want, rtol)
    return errs


# --------------------------------------------------------------------------- --rule

_COLD = """
import sys, time
import numpy as np
import mmfuse
rng = np.random.default_rng(0)
xs = [rng.standard_normal((1024, 32), dtype=np.float32) for _ in range(4)]
p = mmfuse.init_lowrank([32] * 4, rank=4, out_dim=64, seed=0, dtype=np.float32)
t0 = time.perf_counter()
mmfuse.lowrank_interactions(xs, p["factors"], p["weights"], backend={backend!r})
t1 = time.perf_counter()
print(t1 - t0, "numba" in sys.modules)
"""


def _first_call(backend: str) -> float:
    """Seconds of a first ``lowrank_interactions`` call in a fresh process (numba's on-disk
    cache as the environment has it)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MMFUSE_BACKEND", "MMFUSE_PREFER")}
    out = subprocess.run(
        [sys.executable, "-c", _COLD.format(backend=backend)], capture_output=True, text=True, env=env
    )
    if out.returncode != 0:
        raise RuntimeError(
            f"lowrank_interactions ({backend}) failed in a fresh process:\n{out.stderr[-3000:]}"
        )
    return float(out.stdout.split()[0])


def rule(args) -> None:
    """The one-time cost of numba for the interaction terms and what a call saves, by the
    recursion's products (M^2 B R h)."""
    import mmfuse
    from mmfuse.backends._table import AUTO_IMPORT_PRODUCTS

    print(f"machine: {machine()}; AUTO_IMPORT_PRODUCTS = 2**{int(np.log2(AUTO_IMPORT_PRODUCTS))}")
    repeats = 3 if args.quick else 5
    _first_call("numba")  # fills numba's on-disk cache
    core = [_first_call("array_api") for _ in range(repeats)]
    kernel = [_first_call("numba") for _ in range(repeats)]
    extra = statistics.median(kernel) - statistics.median(core)
    print(
        f"fresh process, first call (M = 4, B = 1024, R = 4, h = 64): NumPy variant "
        f"{statistics.median(core):.3f} s, kernel {statistics.median(kernel):.3f} s; one-time extra {extra:.3f} s"
    )
    rng = np.random.default_rng(1)
    rows = []
    for m, batch, rank, h in ((4, 256, 4, 16), (4, 1024, 4, 16), (4, 1024, 4, 64), (8, 1024, 4, 32),
                              (8, 1024, 8, 64), (8, 4096, 8, 64)):  # fmt: skip
        xs = [rng.standard_normal((batch, 32)).astype(np.float32) for _ in range(m)]
        p = mmfuse.init_lowrank([32] * m, rank=rank, out_dim=h, seed=rng, dtype=np.float32)
        f, w = p["factors"], p["weights"]
        cands = {
            "numpy": lambda xs=xs, f=f, w=w: mmfuse.lowrank_interactions(xs, f, w, backend="array_api"),
            "numba": lambda xs=xs, f=f, w=w: mmfuse.lowrank_interactions(xs, f, w, backend="numba"),
        }
        times = medians(sample_rounds(cands, repeats=6 if args.quick else 12))
        saved = times["numpy"] - times["numba"]
        products = m * m * batch * rank * h
        rows.append({
            "(M, B, R, h)": f"({m}, {batch}, {rank}, {h})",
            "products": f"2**{np.log2(products):.1f}",
            "numpy ms": f"{times['numpy'] * 1e3:.3f}",
            "numba ms": f"{times['numba'] * 1e3:.3f}",
            "saved ms": f"{saved * 1e3:.3f}",
            "ns saved / product": f"{saved / products * 1e9:.3f}",
            "repaid after calls": f"{extra / saved:.0f}" if saved > 0 else "never",
        })  # fmt: skip
    print_table(rows, list(rows[0]))


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--dtype", default=DTYPE, choices=["float32", "float64"])
    parser.add_argument("--rule", action="store_true", help="the measurements behind AUTO_IMPORT_PRODUCTS")
    args = parser.parse_args()
    if args.rule:
        rule(args)
        return
    os.environ["MMFUSE_BENCH_DTYPE"] = args.dtype  # the memory runs' subprocesses too
    globals()["DTYPE"] = args.dtype
    if HAS_TORCH and os.environ.get("OPENBLAS_NUM_THREADS") == "1":
        import torch

        torch.set_num_threads(1)
    print(
        f"machine: {machine()}; {args.dtype}; OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}"
    )
    rows, results = [], []
    for case in CASES:
        cands = setup(case)
        errs = check(case, cands)
        rounds = sample_rounds(cands, repeats=8 if args.quick else 24)
        times = {name: float(np.median([t for r in rs for t in r])) for name, rs in rounds.items()}
        mem = {} if args.quick else {n: peak_rss_mib("interactions", case, n) for n in cands}
        for name, t in times.items():
            base = BASE.get(name)
            ratio = t / times[base] if base else 1.0
            spread, lo, hi = "", None, None
            if base:
                per_round = [1 / r for r in round_ratios(rounds, base, name)]
                lo, hi = quantile(per_round, 0.1), quantile(per_round, 0.9)
                spread = f"{lo:.2f}-{hi:.2f}"
            rows.append(
                {
                    "case": case,
                    "candidate": name,
                    "ms": f"{t * 1e3:.2f}",
                    "this/fusion": f"{ratio:.2f}",
                    "p10-p90": spread,
                    "peak MiB": f"{mem[name]:.1f}" if name in mem else "-",
                }
            )
            results.append(
                {
                    "case": case,
                    "candidate": name,
                    "dtype": args.dtype,
                    "seconds": t,
                    "ratio_to_fusion": ratio,
                    "ratio_p10": lo,
                    "ratio_p90": hi,
                    "peak_mib": mem.get(name),
                    "rel_err": errs[name],  # {this row's reference: its error}
                }
            )
        print(f"{case}: max relative error, each candidate vs its references: "
              f"{max(e for row in errs.values() for e in row.values()):.1e}")  # fmt: skip
    print_table(rows, ["case", "candidate", "ms", "this/fusion", "p10-p90", "peak MiB"])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine(), "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
