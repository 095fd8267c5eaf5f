"""zoom_shift and align on CPU: mmfuse vs a straightforward torch version vs a NumPy copy.

Run: ``python benchmarks/align_cpu.py [--json FILE] [--quick] [--auto] [--rule] [--small] [--grad]
[--channels]``.

Inputs (B, T, C) = (64, 512, 256) float32 per modality, all cores; ``zoom_shift`` runs at
alpha = 1, ``align`` at ``ALPHA`` = 0.5.  Candidates per case:

- ``auto-numpy`` / ``auto-torch``: the public function under ``backend="auto"`` on NumPy
  arrays / torch CPU tensors (no gradient): what a user gets by default.  With numba installed
  these are numba's CPU kernels (the inputs have more than ``AUTO_IMPORT_ELEMENTS``; torch
  tensors through NumPy views, zoom_shift inside the op ``mmfuse::zoom_shift_numba``); the
  script prints which implementation "auto" chose.
- ``mmfuse-numba``: the same call on NumPy arrays with ``backend="numba"`` (the CPU kernels).
- ``mmfuse-numpy``: the Array-API core's NumPy fast path (``backend="array_api"``;
  cache-blocked: each input is read from memory once for its statistics; zoom_shift maps
  each block while in cache); what "auto" runs without numba.
- ``mmfuse-torch``: the Array-API core on torch CPU tensors (``backend="array_api"``: what
  "auto" runs for align / moments when gradients are needed).
- ``torch-op`` (zoom_shift): ``backend="torch"``, the custom op ``mmfuse::zoom_shift`` (the
  core's statistics in torch): what "auto" ran on torch CPU tensors before numba's rows.
- ``torch-straight``: the straightforward torch version: mean, then std, then the affine map as
  separate ops (align: the rounds literally, re-measuring every array each round).
- ``numpy-copy``: ``np.copy`` of one input: the bandwidth yardstick (timed in both groups).

Before a case is timed, every candidate is checked (:func:`check`: against the torch version,
which is checked against the float64 oracle ``mmfuse.reference`` on a few samples); a mismatch
raises and nothing is timed.

Effective bandwidth = (bytes of every input read once + bytes of every output written once) /
time; ``bw/copy`` divides it by the copy's (2 x nbytes / time).  Targets: issue 4, mmfuse at
least 1.5x faster than ``torch-straight`` and at least 50% of copy bandwidth; issue 19, the
"auto" rows (NumPy and torch) at least 0.5 of copy bandwidth for zoom_shift and align(rounds=1).
The closing lines give each "auto" fraction as the median over rounds with its p10-p90 spread
(per round: the candidate's median time against the copy's in the same round).

``--auto``: only zoom_shift and align-r1, only the "auto" candidates and the copy (quick).
``--rule``: the measurements behind ``AUTO_IMPORT_ELEMENTS`` (docs/backends.rst): in fresh
processes, the one-time cost of importing numba and loading its kernels (with the on-disk
cache, and with an empty one), then per-call times of the NumPy core and the kernels by size
and the calls after which the one-time cost is repaid.
``--small``: what "auto" runs at small sizes once numba is imported (its kernels, at every
size) against what it runs before (the core on NumPy arrays; on torch CPU tensors the op
``mmfuse::zoom_shift``, ``mmfuse::align`` and the autograd row of ``moments``): microseconds
per call, one thread, float32, no gradient, and kernels / core with its p10-p90 over rounds.
``--grad``: the measurements behind ``AUTOGRAD_CORE_ELEMENTS``
(``mmfuse/backends/torch/zoom_shift.py``): a training step (forward, then the backward of
the outputs' sum weighted by fixed random numbers) of two float32 torch CPU modalities (x
and a guide of one more token, both requiring grad) by the torch backend's custom op
(``mmfuse::zoom_shift``, ``mmfuse::align``) and by the core's algorithm under autograd
(``backend="array_api"``), ``zoom_shift`` and ``align(rounds=1)``, by size, at one torch
thread and at torch's default; microseconds per step and core / op with its p10-p90 over
rounds (each candidate's gradients checked against the other's first); "kept": the bytes each
keeps from forward to backward beyond the inputs (``torch.autograd.graph.saved_tensors_hooks``),
in units of the inputs' bytes, core / op.  A second table gives the memory behind ``align``'s
second bound, ``AUTOGRAD_CORE_ROUND_LANES``: what the core keeps for two (512, 8, 16) and two
(4, 64, 64) modalities by rounds, in units of the inputs' bytes and in bytes per lane (a
sample's channel), modality and round (the limit counted as two rounds).
``--channels``: few channels over many tokens, NumPy float32 (64, 4096, C) for C = 1, 2, 4,
8 and 16 (the guide of 3072 tokens), no gradient, ``moments``, ``zoom_shift`` and
``align(rounds=1)``: the core's NumPy path (``backend="array_api"``, what "auto" runs before
numba is imported; ``core``), the same with its fold of tokens into rows turned off
(``unfolded``: ``mmfuse._core.align._FOLD_ELEMENTS`` set past any size, in the same process),
numba's kernels (``kernels``) and the plain NumPy code (``plain``, ``_baselines.py``),
milliseconds per call, medians of interleaved rounds, and the ratios to the plain code; each
candidate checked against the plain code first.
"""

from __future__ import annotations

import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
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

SHAPE = (64, 512, 256)
EPS = 1e-5
ALPHA = 0.5  # align's; zoom_shift runs at alpha 1 (setup)
RTOL = 1e-5  # float32 against float32 or float64 (observed ~2e-7); a wrong map is far above
REF_ROWS = 2  # samples the float64 oracle (mmfuse.reference, literal and slow) checks
# case -> (number of modalities, what runs); bytes moved = 2 inputs + outputs
CASES = {
    "zoom_shift": (2, "zoom_shift"),
    "align-r1": (2, "align", 1),
    "align-r3": (2, "align", 3),
    "align-limit-M3": (3, "align", None),
}


def _torch_zoom_shift(torch, x, guide, alpha):
    """The straightforward version: mean, std, then the affine map, each a separate op."""
    mx = x.mean(dim=1, keepdim=True)
    sx = torch.sqrt(x.var(dim=1, correction=0, keepdim=True) + EPS)
    mg = guide.mean(dim=1, keepdim=True)
    sg = torch.sqrt(guide.var(dim=1, correction=0, keepdim=True) + EPS)
    return mx + (x - mx) * (sg / sx) ** alpha + alpha * (mg - mx)


def _inputs(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(20261122)
    return [
        (float(m) + (1.0 + m) * rng.standard_normal(SHAPE, dtype=np.float32)).astype(np.float32)
        for m in range(n)
    ]


def setup(case: str) -> dict[str, object]:
    import torch

    import mmfuse

    n, op, *extra = CASES[case]
    xs = _inputs(n)
    ts = [torch.from_numpy(x) for x in xs]
    cands: dict[str, object] = {}
    if op == "zoom_shift":
        alpha = 1.0

        def run(arrays, backend):
            return lambda: mmfuse.zoom_shift(arrays[0], arrays[1], alpha=alpha, eps=EPS, backend=backend)

        def straight():
            return _torch_zoom_shift(torch, ts[0], ts[1], alpha)

    else:
        rounds = extra[0]
        opts = {"rounds": rounds, "alpha": ALPHA, "eps": EPS}

        def run(arrays, backend):
            return lambda: mmfuse.align(arrays, backend=backend, **opts)

        def straight():
            ys = list(ts)
            for _ in range(rounds if rounds is not None else 0):
                for i in range(n):  # Gauss-Seidel, consensus (M = 2: toward the other)
                    ys[i] = _torch_zoom_shift(torch, ys[i], ys[1 - i], ALPHA)
            return ys

    cands["auto-numpy"] = run(xs, "auto")
    cands["auto-torch"] = run(ts, "auto")
    cands["mmfuse-numba"] = run(xs, "numba")
    cands["mmfuse-numpy"] = run(xs, "array_api")
    cands["mmfuse-torch"] = run(ts, "array_api")
    if op == "zoom_shift":
        cands["torch-op"] = run(ts, "torch")
    if op == "zoom_shift" or extra[0] is not None:
        cands["torch-straight"] = straight
    cands["numpy-copy"] = lambda: xs[0].copy()
    return cands


def chosen(case: str) -> dict[str, str]:
    """What "auto" runs for the case's NumPy and torch inputs (backend / variant)."""
    import torch

    from mmfuse.backends import explain

    n, op, *_ = CASES[case]
    x = np.zeros(SHAPE, dtype=np.float32)
    out = {}
    for name, a in (("numpy", x), ("torch", torch.from_numpy(x))):
        impl = explain(op, *[a] * n).chosen
        out[name] = f"{impl.backend} / {impl.variant}"
    return out


def moved_bytes(case: str) -> int:
    n, op, *_ = CASES[case]
    nbytes = int(np.prod(SHAPE)) * 4
    outputs = 1 if op == "zoom_shift" else n
    return (n + outputs) * nbytes


def check(case: str, cands: dict[str, object]) -> dict[str, tuple[str, float]]:
    """{candidate: (its reference, relative error)}, checked before timing (``check_same``
    raises past ``RTOL``): every mmfuse candidate against the torch version on the whole input
    (or, without one, against mmfuse on torch through the core), and that reference against
    the float64 oracle ``mmfuse.reference`` on the first ``REF_ROWS`` samples (each sample's
    statistics are its own).  The copy computes nothing to compare: not checked."""
    import mmfuse.reference

    n, op, *extra = CASES[case]
    ref = "torch-straight" if "torch-straight" in cands else "mmfuse-torch"
    want = cands[ref]()
    errs = {name: (ref, check_same(f"{case} {name} vs {ref}", fn(), want, RTOL))
            for name, fn in cands.items() if name not in (ref, "numpy-copy")}  # fmt: skip
    xs = [np.asarray(x[:REF_ROWS], dtype=np.float64) for x in _inputs(n)]
    if op == "zoom_shift":
        oracle = mmfuse.reference.zoom_shift(xs[0], xs[1], alpha=1.0, eps=EPS)
    else:
        oracle = mmfuse.reference.align(xs, rounds=extra[0], alpha=ALPHA, eps=EPS)
    got = want[:REF_ROWS] if op == "zoom_shift" else [y[:REF_ROWS] for y in want]
    label = f"mmfuse.reference (float64, first {REF_ROWS} samples)"
    errs[ref] = (label, check_same(f"{case} {ref} vs {label}", got, oracle, RTOL))
    return errs


# Candidates timed in one group with the copy; two groups, NumPy first: torch's OpenMP workers
# spin for a while after each parallel region, and interleaved with them NumPy's block threads
# lose a core (measured: 0.62 vs 0.44 of copy bandwidth for zoom_shift).  Each group is still
# round-robin, and each holds the copy, so that per-round fractions compare like with like.
NUMPY_GROUP = ("auto-numpy", "mmfuse-numba", "mmfuse-numpy", "numpy-copy")
TORCH_GROUP = ("auto-torch", "mmfuse-torch", "torch-op", "torch-straight")
AUTO = ("auto-numpy", "auto-torch")


def fractions(case: str, rounds: dict[str, list[list[float]]], name: str, copy: str) -> list[float]:
    """Per round, the candidate's fraction of copy bandwidth (median times in that round)."""
    nbytes = int(np.prod(SHAPE)) * 4
    return [
        (moved_bytes(case) / statistics.median(t)) / (2 * nbytes / statistics.median(c))
        for t, c in zip(rounds[name], rounds[copy])
    ]


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--auto", action="store_true", help='only the "auto" rows of zoom_shift and align-r1')
    parser.add_argument("--rule", action="store_true", help="the measurements behind AUTO_IMPORT_ELEMENTS")
    parser.add_argument("--small", action="store_true", help="numba's kernels against the core at small sizes")
    parser.add_argument("--grad", action="store_true", help="the measurements behind AUTOGRAD_CORE_ELEMENTS")
    parser.add_argument("--channels", action="store_true", help="few channels over many tokens, NumPy")
    args = parser.parse_args()
    if args.channels:
        channels(args)
        return
    if args.grad:
        grad_rule(args)
        return
    if args.rule:
        rule(args)
        return
    if args.small:
        small(args)
        return
    import torch

    print(f"machine: {machine()}; torch threads {torch.get_num_threads()}")
    rows, results, summary = [], [], []
    nbytes = int(np.prod(SHAPE)) * 4
    cases = ("zoom_shift", "align-r1") if args.auto else tuple(CASES)
    for case in cases:
        cands = setup(case)
        print(f"{case}: 'auto' runs {chosen(case)}")
        errs = check(case, cands)
        if args.auto:
            cands = {k: v for k, v in cands.items() if k in (*AUTO, "numpy-copy")}
        repeats = 3 if args.quick else (15 if args.auto else 9)
        numpy_group = {n: c for n, c in cands.items() if n in NUMPY_GROUP}
        torch_group = {n: c for n, c in cands.items() if n in TORCH_GROUP}
        torch_group["numpy-copy/t"] = cands["numpy-copy"]
        rounds = {**sample_rounds(numpy_group, repeats=repeats), **sample_rounds(torch_group, repeats=repeats)}
        times = medians(rounds)
        mem = {} if args.quick or args.auto else {n: peak_rss_mib("align_cpu", case, n) for n in cands}
        for name in cands:
            t = times[name]
            bw = (2 * nbytes if name == "numpy-copy" else moved_bytes(case)) / t
            # the copy timed in the candidate's own group, as the summary's fractions (the
            # torch rows had been divided by the NumPy group's copy)
            copy_bw = 2 * nbytes / times["numpy-copy/t" if name in TORCH_GROUP else "numpy-copy"]
            row = {
                "case": case,
                "candidate": name,
                "ms": f"{t * 1e3:.2f}",
                "straight/this": f"{times['torch-straight'] / t:.2f}" if "torch-straight" in times else "-",
                "GB/s": f"{bw / 1e9:.1f}",
                "bw/copy": f"{bw / copy_bw:.2f}",
                "peak MiB": f"{mem[name]:.1f}" if name in mem else "-",
            }
            rows.append(row)
            checked_against, err = errs.get(name, (None, None))  # (None: the copy)
            results.append(
                {"case": case, "candidate": name, "seconds": t, "bytes": moved_bytes(case),
                 "bw_fraction_of_copy": bw / copy_bw, "peak_mib": mem.get(name),
                 "checked_against": checked_against, "rel_err": err}
            )
        for name in AUTO:
            if name in cands and case in ("zoom_shift", "align-r1"):
                per = fractions(case, rounds, name, "numpy-copy" if name in NUMPY_GROUP else "numpy-copy/t")
                summary.append((case, name, statistics.median(per), quantile(per, 0.1), quantile(per, 0.9)))
        print(f"{case}: max relative difference, each candidate vs its reference: "
              f"{max(err for _, err in errs.values()):.2e}")  # fmt: skip
    print_table(rows, ["case", "candidate", "ms", "straight/this", "GB/s", "bw/copy", "peak MiB"])
    print('\n"auto" at (64, 512, 256) float32, fraction of copy bandwidth (target >= 0.5):')
    for case, name, med, p10, p90 in summary:
        print(f"  {case:<11} {name:<11} {med:.2f}  (p10-p90 {p10:.2f}-{p90:.2f})")
    if args.json:
        with open(args.json, "w") as fh:
            auto = [{"case": c, "candidate": n, "median": m, "p10": a, "p90": b} for c, n, m, a, b in summary]
            json.dump({"machine": machine(), "shape": SHAPE, "results": results, "auto": auto}, fh, indent=2)


# --------------------------------------------------------------------------- --rule

_COLD = """
import sys, time
t0 = time.perf_counter()
import numpy as np
{torch_import}
import mmfuse
rng = np.random.default_rng(0)
x = rng.standard_normal({shape}, dtype=np.float32)
g = rng.standard_normal({shape}, dtype=np.float32)
{to_torch}
t1 = time.perf_counter()
mmfuse.{op}({args}, backend={backend!r})
t2 = time.perf_counter()
mmfuse.{op}({args}, backend={backend!r})
t3 = time.perf_counter()
print(t2 - t1, t3 - t2, "numba" in sys.modules)
"""


def _cold(op: str, backend: str, *, torch: bool, cache_dir: str | None, shape: tuple[int, ...]) -> tuple[float, float]:
    """(first call, second call) seconds of ``op`` in a fresh process."""
    args = {"zoom_shift": "x, g", "align": "[x, g]", "moments": "x"}[op]
    code = _COLD.format(
        torch_import="import torch" if torch else "",
        to_torch="x, g = torch.from_numpy(x), torch.from_numpy(g)" if torch else "",
        op=op, args=args, backend=backend, shape=shape,
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("MMFUSE_BACKEND", "MMFUSE_PREFER")}
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = cache_dir
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{op} ({backend}) failed in a fresh process:\n{out.stderr[-3000:]}")
    first, second, _ = out.stdout.split()
    return float(first), float(second)


def rule(args) -> None:
    """The one-time cost of numba under "auto" and what a call saves, by size."""
    import mmfuse
    from mmfuse.backends._table import AUTO_IMPORT_ELEMENTS

    print(f"machine: {machine()}; AUTO_IMPORT_ELEMENTS = 2**{int(np.log2(AUTO_IMPORT_ELEMENTS))}")
    repeats = 1 if args.quick else 3
    big = (4, 512, 512)  # 2**20 elements: above the threshold, "auto" imports numba
    print(f"\nfresh process, first and second call at {big} float32 (median of {repeats}; seconds):")
    rows = []
    one_time = []
    for op in ("zoom_shift", "align", "moments"):
        for torch in (False, True):
            cells = {"op": op, "arrays": "torch" if torch else "numpy"}
            core = "array_api"
            base = [_cold(op, core, torch=torch, cache_dir=None, shape=big) for _ in range(repeats)]
            warm = [_cold(op, "auto", torch=torch, cache_dir=None, shape=big) for _ in range(repeats)]
            with tempfile.TemporaryDirectory() as empty:
                cold = [_cold(op, "auto", torch=torch, cache_dir=os.path.join(empty, str(i)), shape=big)
                        for i in range(1)]  # fmt: skip
            first_core = statistics.median(b[0] for b in base)
            first_warm = statistics.median(w[0] for w in warm)
            cells["core first"] = f"{first_core:.3f}"
            cells["core second"] = f"{statistics.median(b[1] for b in base):.4f}"
            cells["auto first (disk cache)"] = f"{first_warm:.3f}"
            cells["auto first (no cache)"] = f"{cold[0][0]:.2f}"
            cells["auto second"] = f"{statistics.median(w[1] for w in warm):.4f}"
            cells["one-time extra"] = f"{first_warm - first_core:.3f}"
            one_time.append(first_warm - first_core)
            rows.append(cells)
    print_table(rows, list(rows[0]))
    extra = statistics.median(one_time)
    print(f"median one-time extra (import numba + load cached kernels): {extra:.2f} s")

    print("\nper call by size, (B, T, 256) float32, NumPy (ms; medians):")
    rng = np.random.default_rng(1)
    rows = []
    for b, t in ((1, 64), (4, 64), (4, 256), (8, 512), (16, 512), (64, 512)):
        x = (1e4 + rng.standard_normal((b, t, 256))).astype(np.float32)
        g = rng.standard_normal((b, t, 256)).astype(np.float32)
        cands = {
            "zs core": lambda x=x, g=g: mmfuse.zoom_shift(x, g, backend="array_api"),
            "zs numba": lambda x=x, g=g: mmfuse.zoom_shift(x, g, backend="numba"),
            "align core": lambda x=x, g=g: mmfuse.align([x, g], alpha=0.5, backend="array_api"),
            "align numba": lambda x=x, g=g: mmfuse.align([x, g], alpha=0.5, backend="numba"),
        }
        for op in ("zs", "align"):  # the kernels against the core, before either is timed
            check_same(f"--rule {op} at {x.shape}", cands[f"{op} numba"](), cands[f"{op} core"](), RTOL)
        times = medians(sample_rounds(cands, repeats=6 if args.quick else 12))
        saved = times["zs core"] - times["zs numba"]
        rows.append({
            "elements": f"2**{np.log2(x.size):.0f}",
            **{k: f"{v * 1e3:.3f}" for k, v in times.items()},
            "zs saved ns/elem": f"{saved / x.size * 1e9:.2f}",
            "calls to repay": f"{extra / saved:.0f}" if saved > 0 else "never",
        })  # fmt: skip
    print_table(rows, list(rows[0]))


# --------------------------------------------------------------------------- --small

#: (B, T, C): overhead.py's tiny zoom_shift, then few lanes of many tokens, many lanes of few
SMALL_SHAPES = ((4, 6, 5), (4, 16, 16), (1, 64, 4), (8, 8, 256), (8, 64, 32), (16, 128, 16))


def small(args) -> None:
    """Per call at small sizes: numba's kernels (what "auto" runs once numba is imported)
    against the rows "auto" runs before it is."""
    import numba  # noqa: F401  (imported: "auto" would run the kernels at every size)
    import torch

    import mmfuse

    torch.set_num_threads(1)
    print(f"machine: {machine()}; one torch thread; numba imported")
    rng = np.random.default_rng(3)
    calls = {
        "zoom_shift": lambda x, g, be: mmfuse.zoom_shift(x, g, backend=be),
        "align": lambda x, g, be: mmfuse.align([x, g], backend=be),
        "moments": lambda x, g, be: mmfuse.moments(x, backend=be),
    }
    rows = []
    for shape in SMALL_SHAPES:
        x = (1.0 + rng.standard_normal(shape)).astype(np.float32)
        g = rng.standard_normal((shape[0], shape[1] + 3, shape[2])).astype(np.float32)
        for kind, (a, b, core) in {
            "numpy": (x, g, "array_api"),
            "torch": (torch.from_numpy(x), torch.from_numpy(g), "torch"),
        }.items():
            for op, call in calls.items():
                cands = {
                    "core": lambda call=call, a=a, b=b, core=core: call(a, b, core),
                    "kernels": lambda call=call, a=a, b=b: call(a, b, "numba"),
                }
                check_same(f"{op} {shape} {kind}", cands["kernels"](), cands["core"](), RTOL)
                rounds = sample_rounds(cands, repeats=40 if args.quick else 200, burst=21)
                times = medians(rounds)
                ratios = round_ratios(rounds, "kernels", "core")  # kernels / core, per round
                rows.append({
                    "shape": str(shape), "arrays": kind, "op": op,
                    "core us": f"{times['core'] * 1e6:.1f}", "kernels us": f"{times['kernels'] * 1e6:.1f}",
                    "kernels/core": f"{statistics.median(ratios):.2f} "
                                    f"({quantile(ratios, 0.1):.2f}-{quantile(ratios, 0.9):.2f})",
                })  # fmt: skip
    print_table(rows, list(rows[0]))


# --------------------------------------------------------------------------- --channels

CHANNEL_COUNTS = (1, 2, 4, 8, 16)


def channels(args) -> None:
    """Few channels over many tokens: the core folded and unfolded, the kernels, the plain
    code (see the module docstring)."""
    import numba  # noqa: F401  (the kernels' row, asked by name)
    from _baselines import plain_align, plain_moments, plain_zoom_shift

    import mmfuse
    from mmfuse._core import align as core_align

    print(f"machine: {machine()}; NumPy float32, no gradient")
    rng = np.random.default_rng(5)
    fold_elements = core_align._FOLD_ELEMENTS

    def unfolded(call: Any) -> Any:
        core_align._FOLD_ELEMENTS = 1 << 62
        try:
            return call()
        finally:
            core_align._FOLD_ELEMENTS = fold_elements

    rows = []
    for c in CHANNEL_COUNTS:
        x = (3.0 + 2.0 * rng.standard_normal((64, 4096, c))).astype(np.float32)
        g = (rng.standard_normal((64, 3072, c)) - 1.0).astype(np.float32)
        ops = {
            "moments": (lambda be, x=x: mmfuse.moments(x, backend=be), lambda x=x: plain_moments(np, x)),
            "zoom_shift": (
                lambda be, x=x, g=g: mmfuse.zoom_shift(x, g, backend=be), lambda x=x, g=g: plain_zoom_shift(np, x, g)
            ),
            "align-r1": (
                lambda be, x=x, g=g: mmfuse.align([x, g], rounds=1, backend=be), lambda x=x, g=g: plain_align(np, [x, g])
            ),
        }
        for op, (call, plain) in ops.items():
            cands = {
                "core": lambda call=call: call("array_api"),
                "unfolded": lambda call=call: unfolded(lambda: call("array_api")),
                "kernels": lambda call=call: call("numba"),
                "plain": plain,
            }
            for name in ("core", "unfolded", "kernels"):
                check_same(f"{op} C {c} {name}", cands[name](), cands["plain"](), RTOL)
            times = medians(sample_rounds(cands, repeats=3 if args.quick else 9))
            rows.append({
                "C": c, "op": op, **{f"{n} ms": f"{t * 1e3:.2f}" for n, t in times.items()},
                **{f"{n}/plain": f"{times[n] / times['plain']:.2f}" for n in ("core", "unfolded", "kernels")},
            })  # fmt: skip
    print_table(rows, list(rows[0]))


# --------------------------------------------------------------------------- --grad


def kept_bytes(call: Any, inputs: list[Any]) -> int:
    """Bytes that autograd keeps from ``call()``'s forward for its backward, beyond the
    ``inputs`` themselves (each saved tensor counted once, by its memory)."""
    import torch

    own = {t.data_ptr() for t in inputs}
    saved: dict[tuple[int, int], int] = {}

    def pack(t: Any) -> Any:
        if t.data_ptr() not in own:
            saved[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        call()
    return sum(saved.values())

#: (B, T, C) of x (the guide has T + 1 tokens): from overhead.py's tiny case to 2**18 elements,
#: with many tokens of few channels and few tokens of many among them
GRAD_SHAPES = (
    (4, 6, 5), (8, 16, 16), (16, 32, 32), (8, 512, 8), (32, 64, 32), (64, 64, 32), (16, 64, 128),
    (32, 128, 64), (8, 1024, 32),
)  # fmt: skip


def grad_rule(args) -> None:
    """Training steps: the torch backend's custom ops against the core under autograd."""
    import torch

    import mmfuse

    op_align = importlib.import_module("mmfuse.backends.torch.align")  # (the modules: the
    op_zoom_shift = importlib.import_module("mmfuse.backends.torch.zoom_shift")  # package's names are functions)
    default_threads = torch.get_num_threads()
    print(f"machine: {machine()}; numba {'imported' if 'numba' in sys.modules else 'not imported'}")
    rng = np.random.default_rng(4)

    def leaf(a: np.ndarray) -> Any:
        return torch.from_numpy(a.astype(np.float32)).requires_grad_()

    rows = []
    for threads in sorted({1, default_threads}):
        torch.set_num_threads(threads)
        for shape in GRAD_SHAPES:
            x = leaf(1.0 + rng.standard_normal(shape))
            g = leaf(3.0 + 2.0 * rng.standard_normal((shape[0], shape[1] + 1, shape[2])))
            # the loss: the outputs weighted by random numbers (a plain sum's gradient for x is
            # zero, a centred x's sum, so its rounding noise would be compared)
            w = torch.from_numpy(rng.standard_normal((shape[0], shape[1] + 1, shape[2])).astype(np.float32))
            calls = {  # (the op: the torch backend's function itself, which the rule never reaches)
                "zoom_shift": (
                    lambda x=x, g=g: [op_zoom_shift.zoom_shift(x, g)],
                    lambda x=x, g=g: [mmfuse.zoom_shift(x, g, backend="array_api")],
                ),
                "align": (
                    lambda x=x, g=g: op_align.align([x, g], rounds=1, alpha=1.0, schedule="gauss-seidel",
                                                    topology="consensus", hub=0, axis=-2, masks=None, eps=EPS),
                    lambda x=x, g=g: mmfuse.align([x, g], rounds=1, backend="array_api"),
                ),
            }  # fmt: skip
            for op, pair in calls.items():

                def step(call: Any, x=x, g=g, w=w) -> list[Any]:
                    x.grad = g.grad = None
                    sum((y * w[:, : y.shape[1]]).sum() for y in call()).backward()
                    return [x.grad, g.grad]

                cands = {"op": lambda c=pair[0]: step(c), "core": lambda c=pair[1]: step(c)}
                for got, want in zip(cands["core"](), cands["op"]()):
                    check_same(f"{op} {shape} gradients", got.numpy(), want.numpy(), 1e-4)
                rounds = sample_rounds(cands, repeats=10 if args.quick else 40, burst=5)
                times = medians(rounds)
                ratios = round_ratios(rounds, "core", "op")
                in_bytes = (x.numel() + g.numel()) * x.element_size()
                kept = {k: kept_bytes(pair[i], [x, g]) / in_bytes for i, k in enumerate(("op", "core"))}
                rows.append({
                    "threads": str(threads), "shape": str(shape), "elements": str(x.numel()), "op": op,
                    "custom op us": f"{times['op'] * 1e6:.0f}", "core us": f"{times['core'] * 1e6:.0f}",
                    "core/op": f"{statistics.median(ratios):.2f} "
                               f"({quantile(ratios, 0.1):.2f}-{quantile(ratios, 0.9):.2f})",
                    "kept core/op": f"{kept['core']:.1f} / {kept['op']:.1f}",
                })  # fmt: skip
    torch.set_num_threads(default_threads)
    print_table(rows, list(rows[0]))
    print()
    rows = []
    for shape in ((512, 8, 16), (4, 64, 64)):
        xs = [leaf(k + (k + 1.0) * rng.standard_normal(shape)) for k in range(2)]
        in_bytes = sum(t.numel() * t.element_size() for t in xs)
        lanes = 2 * shape[0] * shape[2]  # (both modalities')
        for n_rounds in (1, 4, 16, None):
            kept = kept_bytes(lambda r=n_rounds, xs=xs: mmfuse.align(xs, rounds=r, alpha=0.5, backend="array_api"), xs)
            rows.append({
                "align, two modalities": str(shape), "rounds": str(n_rounds),
                "kept / inputs": f"{kept / in_bytes:.1f}",
                "bytes per lane, modality, round": f"{kept / (lanes * (n_rounds or 2)):.0f}",
                "lanes x modalities x rounds": str(lanes * (n_rounds or 2)),
            })  # fmt: skip
    print_table(rows, list(rows[0]))


if __name__ == "__main__":
    main()
