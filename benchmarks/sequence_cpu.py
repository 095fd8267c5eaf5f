"""The Wander adapter on CPU: mmfuse collapsed and cp modes vs the released adapter's forward.

Run: ``python benchmarks/sequence_cpu.py [--json FILE] [--quick]``.

Candidates, float32, all cores, the whole adapter forward (down-projection, GELU, fusion,
residual), on the released configurations:

- ``released-torch``: a straightforward torch version of the released adapter's forward:
  ``nn.Linear`` + ``F.gelu`` per modality, rank-summed factors, ``(x @ wd).permute @ wt``,
  product, permute back, residual (feature factors first, as released).
- ``collapsed-torch``: ``mmfuse.wander(..., mode="collapsed", backend="array_api")`` on torch
  CPU tensors (the Array-API core, autograd-capable).
- ``collapsed-numpy``: the same call on NumPy arrays.
- ``released-numpy``: the released forward written plainly in NumPy, the GELU by SciPy's
  ``erf`` (``_baselines.plain_wander``): ``collapsed-numpy``'s plain code in its namespace.
- ``cp-torch``: ``mmfuse.wander(..., mode="cp")`` on torch CPU tensors, the true CP
  contraction; its cost grows with R_h R_t, reported by a sweep over the ranks.

Then (not with ``--quick``) the memory of padding masks: ``mmfuse.sequence_fusion(mode="cp")``
forward and backward on torch CPU float32 tensors needing gradients, three modalities
(B, 128, 32), R_h = R_t = 4, T_out = 64, D = 64, B = 512 and 2048, with masks (each sample
keeps a random number of leading tokens, at least one) and without: peak RSS growth of one
step (gradients set to None first) in a fresh process each, with glibc's mmap threshold fixed
at 64 KiB (``MALLOC_MMAP_THRESHOLD_``) so that large buffers are returned to the system when
freed and runs agree within about 1 MiB.  The baseline is taken after a first step, whose
gradients it holds; the measured step sets them to None before its own, so the growth is the
output (8 MiB at B = 512, 32 at 2048) and the step's temporaries.  A masked step should take
what an unmasked one takes: masking is done block by block, never on whole inputs (RESULTS.md,
forty-first session).

Before timing a case, every candidate is checked against its reference (see :func:`check`); a
mismatch raises and nothing is timed.  The sweep checks its calls likewise, against the
plain forward in float64.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _baselines import plain_gelu, plain_wander
from _harness import arg_parser, check_same, machine, peak_rss_mib, print_table, time_candidates

# name: (B, T_m, d, r, R_h, R_t)
CASES = {
    "MOSI B256 T50,50,50 d40 r16 Rh8 Rt12": (256, (50, 50, 50), 40, 16, 8, 12),
    "Food101 B64 T197,50 d768 r64 Rh8 Rt12": (64, (197, 50), 768, 64, 8, 12),
}
# masked cp-mode forward + backward: name -> B (three modalities (B, 128, 32), R 4 x 4,
# T_out 64, D 64)
MASKED_CASES = {"masked cp fwd+bwd B512": 512, "masked cp fwd+bwd B2048": 2048}
# glibc's mmap threshold for the memory runs (see the module docstring)
MMAP_THRESHOLD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
# R_h x R_t sweep of cp mode (MOSI shapes)
SWEEP = [(1, 1), (2, 2), (4, 3), (8, 6), (8, 12), (16, 12)]
RTOL = 1e-5  # float32 against float32 (observed ~1e-7); a wrong or missing term is far above
CP_ROWS = 4  # samples of the float64 plain references (a sample's output is its own)


def _inputs(case: str, ranks: tuple[int, int] | None = None):
    import torch

    import mmfuse

    batch, lengths, dim, rank, r_h, r_t = CASES[case]
    if ranks is not None:
        r_h, r_t = ranks
    rng = np.random.default_rng(20261122)
    xs = [rng.standard_normal((batch, t, dim), dtype=np.float32) for t in lengths]
    params = mmfuse.init_wander([dim] * len(lengths), lengths, rank=rank, feature_rank=r_h,
                                token_rank=r_t, out_dim=dim, seed=rng, dtype=np.float32)  # fmt: skip
    # non-trivial token factors (the released zeros would make every product trivially 0)
    params["token"] = [rng.standard_normal(t.shape, dtype=np.float32) * 0.1 for t in params["token"]]
    t_xs = [torch.from_numpy(x) for x in xs]
    t_params = {
        "down": [(torch.from_numpy(w), torch.from_numpy(b)) for w, b in params["down"]],
        "feature": [torch.from_numpy(f) for f in params["feature"]],
        "token": [torch.from_numpy(t) for t in params["token"]],
    }
    return xs, params, t_xs, t_params


def setup(case: str) -> dict[str, object]:
    import torch

    import mmfuse

    if case in MASKED_CASES:
        return _masked_setup(MASKED_CASES[case])
    xs, params, t_xs, t_params = _inputs(case)
    # the released module's layout: nn.Linear weight (r, d), factor_dim (R_h, r, D),
    # factor_t (R_t, T, r)
    linears = []
    for w, b in t_params["down"]:
        lin = torch.nn.Linear(w.shape[0], w.shape[1])
        with torch.no_grad():
            lin.weight.copy_(w.T)
            lin.bias.copy_(b)
        linears.append(lin)
    factor_dim = t_params["feature"]
    factor_t = t_params["token"]

    def released_torch():
        with torch.no_grad():
            x = list(t_xs)
            original = torch.cat(x, dim=1)
            for i, lin in enumerate(linears):
                x[i] = torch.nn.functional.gelu(lin(x[i]))
            feats = []
            for i in range(len(x)):
                wd = factor_dim[i].sum(dim=0)
                tmp = torch.matmul(x[i], wd).permute(0, 2, 1)
                wt = factor_t[i].sum(dim=0)
                feats.append(torch.matmul(tmp, wt))
            fusion = feats[0]
            for f in feats[1:]:
                fusion = fusion * f
            fusion = fusion.permute(0, 2, 1)
            return fusion + original[:, : fusion.shape[1], :]

    def collapsed_torch():
        with torch.no_grad():
            return mmfuse.wander(t_xs, t_params, mode="collapsed", backend="array_api")

    def collapsed_numpy():
        return mmfuse.wander(xs, params, mode="collapsed")

    gelu_numpy = plain_gelu(np)

    def released_numpy():
        return plain_wander(np, gelu_numpy, xs, params, "collapsed")

    def cp_torch():
        with torch.no_grad():
            return mmfuse.wander(t_xs, t_params, mode="cp", backend="array_api")

    return {
        "released-torch": released_torch,
        "collapsed-torch": collapsed_torch,
        "collapsed-numpy": collapsed_numpy,
        "released-numpy": released_numpy,
        "cp-torch": cp_torch,
    }


def _masked_setup(batch: int) -> dict[str, object]:
    """One training step's cp-mode sequence fusion with and without padding masks
    (:data:`MASKED_CASES`), torch CPU float32, every input needing its gradient."""
    import torch

    import mmfuse

    gen = torch.Generator().manual_seed(20261206)
    tokens, width, r_h, r_t, t_out, out_dim = 128, 32, 4, 4, 64, 64
    hs = [torch.randn(batch, tokens, width, generator=gen, requires_grad=True) for _ in range(3)]
    feature = [torch.randn(r_h, width, out_dim, generator=gen).div_(width**0.5).requires_grad_() for _ in range(3)]
    token = [torch.randn(r_t, tokens, t_out, generator=gen).div_(tokens**0.5).requires_grad_() for _ in range(3)]
    # each sample keeps its first 1..T tokens of each modality
    masks = [torch.arange(tokens) < torch.randint(1, tokens + 1, (batch, 1), generator=gen) for _ in range(3)]
    leaves = [*hs, *feature, *token]

    def step(masks):
        for t in leaves:
            t.grad = None
        mmfuse.sequence_fusion(hs, feature, token, mode="cp", masks=masks).sum().backward()

    return {"masked": lambda: step(masks), "unmasked": lambda: step(None)}


def masked_memory() -> list[dict[str, object]]:
    """Peak MiB of :data:`MASKED_CASES`' steps, masked and not, a fresh process each."""
    rows = []
    for case, batch in MASKED_CASES.items():
        mem = {n: peak_rss_mib("sequence_cpu", case, n, MMAP_THRESHOLD_ENV) for n in ("masked", "unmasked")}
        rows.append({"B": batch, "masked MiB": f"{mem['masked']:.1f}", "unmasked MiB": f"{mem['unmasked']:.1f}",
                     "masked/unmasked": f"{mem['masked'] / mem['unmasked']:.2f}"})  # fmt: skip
    return rows


_CHECKED_AGAINST = {
    "collapsed-torch": "released-torch",
    "collapsed-numpy": "released-torch",
    "released-numpy": "released-torch",
    "cp-torch": f"plain cp, float64, first {CP_ROWS} samples",
}


def _released(candidate: str) -> str:
    """The released forward in ``candidate``'s namespace."""
    return "released-numpy" if candidate.endswith("numpy") else "released-torch"


def check(case: str, cands: dict[str, object]) -> dict[str, float]:
    """Relative difference of each candidate from its reference (``check_same``: raises past
    ``RTOL``, before anything is timed): collapsed mode (torch and numpy) and the plain NumPy
    forward from the released torch forward; cp mode, other maths, from the plain CP
    contraction (``_baselines.plain_wander(mode="cp")``) in float64 on the first ``CP_ROWS``
    samples (all of them would take GiBs at the Food101 sizes)."""
    ref = cands["released-torch"]()
    errs = {name: check_same(f"{case} {name} vs released-torch", cands[name](), ref, RTOL)
            for name in ("collapsed-torch", "collapsed-numpy", "released-numpy")}  # fmt: skip
    errs["cp-torch"] = check_same(f"{case} cp-torch vs plain cp (float64)", cands["cp-torch"]()[:CP_ROWS],
                                  _plain64(case, None, "cp"), RTOL)  # fmt: skip
    return errs


def _plain64(case: str, ranks: tuple[int, int] | None, mode: str):
    """The plain forward (``_baselines.plain_wander``) in float64 on the case's first
    ``CP_ROWS`` samples."""
    xs, params, _, _ = _inputs(case, ranks)
    xs = [x[:CP_ROWS].astype(np.float64) for x in xs]
    params = {"down": [(w.astype(np.float64), b.astype(np.float64)) for w, b in params["down"]],
              "feature": [f.astype(np.float64) for f in params["feature"]],
              "token": [t.astype(np.float64) for t in params["token"]]}  # fmt: skip
    return plain_wander(np, plain_gelu(np), xs, params, mode)


def sweep(repeats: int) -> list[dict[str, object]]:
    """cp-mode time against R_h R_t on the MOSI shapes (collapsed mode as the unit)."""
    import torch

    import mmfuse

    case = next(iter(CASES))
    rows = []
    for ranks in SWEEP:
        _, _, t_xs, t_params = _inputs(case, ranks)

        def cp(t_xs=t_xs, t_params=t_params):
            with torch.no_grad():
                return mmfuse.wander(t_xs, t_params, mode="cp", backend="array_api")

        def collapsed(t_xs=t_xs, t_params=t_params):
            with torch.no_grad():
                return mmfuse.wander(t_xs, t_params, mode="collapsed", backend="array_api")

        for name, fn in (("cp", cp), ("collapsed", collapsed)):  # checked before timing, as in check()
            check_same(f"sweep {ranks} {name} vs plain (float64)", fn()[:CP_ROWS], _plain64(case, ranks, name), RTOL)
        times = time_candidates({"cp": cp, "collapsed": collapsed}, repeats=repeats, warmup=1)
        rows.append({"R_h x R_t": f"{ranks[0]} x {ranks[1]}", "R_h*R_t": ranks[0] * ranks[1],
                     "cp ms": f"{times['cp'] * 1e3:.2f}",
                     "collapsed ms": f"{times['collapsed'] * 1e3:.2f}",
                     "cp/collapsed": f"{times['cp'] / times['collapsed']:.1f}"})  # fmt: skip
    return rows


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--threads", type=int, help="torch and BLAS threads (default: all)")
    args = parser.parse_args()
    if args.threads and os.environ.get("OPENBLAS_NUM_THREADS") != str(args.threads):
        # NumPy's BLAS sized its thread pool at import: start again with the limits set
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(args.threads)
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine()}; torch threads {torch.get_num_threads()}")
    repeats = 5 if args.quick else 15
    rows, results = [], []
    for case in CASES:
        cands = setup(case)
        errs = check(case, cands)
        # cp mode is 30-300x slower: timed on its own, with fewer repeats
        fast = {k: v for k, v in cands.items() if k != "cp-torch"}
        times = time_candidates(fast, repeats=repeats)
        times.update(time_candidates({"cp-torch": cands["cp-torch"]}, repeats=3, warmup=1))
        mem = {} if args.quick else {n: peak_rss_mib("sequence_cpu", case, n) for n in cands}
        for name, t in times.items():
            rows.append({
                "case": case,
                "candidate": name,
                "ms": f"{t * 1e3:.2f}",
                "released/this": f"{times['released-torch'] / t:.2f}",
                # against the plain code in this candidate's own namespace
                "released same xp/this": f"{times[_released(name)] / t:.2f}",
                "this/collapsed-torch": f"{t / times['collapsed-torch']:.2f}",
                "peak MiB": f"{mem[name]:.1f}" if name in mem else "-",
            })  # fmt: skip
            # each row its own check (None for released-torch, the reference); cp-torch's is
            # against the plain CP contraction, not the released (collapsed) forward
            results.append({"case": case, "candidate": name, "seconds": t,
                            "peak_mib": mem.get(name), "rel_err": errs.get(name),
                            "checked_against": _CHECKED_AGAINST.get(name)})  # fmt: skip
    print_table(rows, ["case", "candidate", "ms", "released/this", "released same xp/this", "this/collapsed-torch",
                       "peak MiB"])  # fmt: skip
    print()
    print("cp mode vs R_h * R_t (MOSI shapes, torch):")
    sweep_rows = sweep(max(3, repeats // 2))
    print_table(sweep_rows, ["R_h x R_t", "R_h*R_t", "cp ms", "collapsed ms", "cp/collapsed"])
    memory_rows = []
    if not args.quick:
        print()
        print("masked cp mode, forward + backward, torch CPU float32, (B, 128, 32) x 3, peak RSS growth:")
        memory_rows = masked_memory()
        print_table(memory_rows, ["B", "masked MiB", "unmasked MiB", "masked/unmasked"])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine(), "results": results, "sweep": sweep_rows,
                       "masked_memory": memory_rows}, fh, indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
