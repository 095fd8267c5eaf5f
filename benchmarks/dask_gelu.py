"""The exact GELU on Dask arrays: one task per chunk against the formulas' elementwise graph.

Run: ``python benchmarks/dask_gelu.py [--json FILE] [--quick]`` (about a minute on 2 cores).

mmfuse's GELU on a Dask array maps each chunk through its own namespace's GELU (NumPy's blocked
path): one task per chunk.  Before, it ran the Array-API formulas (Cody's rational pieces, the
exactly split Gaussian factor) as Dask operations: about thirty elementwise Dask operations, so
as many tasks per chunk.  Candidates, on the same float64 input (standard normal times 3),
computed with Dask's ``threads`` scheduler:

- ``per chunk``: ``mmfuse._core.sequence.gelu`` (what ``wander`` runs);
- ``elementwise``: the formulas as Dask operations (``_gelu_generic``, the previous path; the
  same values within a few float64 ulps);
- ``plain``: ``0.5 x (1 + erf(x / sqrt 2))`` with SciPy's ``erf`` mapped over the chunks,
  what a user would write (less accurate in the lower tail).

Before timing, each candidate's result is checked against the float64 oracle
``mmfuse.reference.gelu`` (relative error at most ``RTOL``); a mismatch raises.

Columns: median milliseconds per ``compute()``, the speed-up of ``per chunk`` over each other
candidate with its per-round p10-p90, and the graphs' task counts (before Dask's
optimisation).  SciPy is imported (for ``plain``), so NumPy's GELU inside ``per chunk`` takes
SciPy's erfc, as in any process that has imported ``scipy.special``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
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

RTOL = 1e-13  # float64, relative to the largest |GELU| (observed ~2e-16); a wrong formula is far above
CASES = {
    "(64, 6, 8) in 4 chunks": ((64, 6, 8), 16),
    "(8192, 50, 64) in 16 chunks": ((8192, 50, 64), 512),
}


def main() -> None:
    args = arg_parser(__doc__).parse_args()
    import dask.array as da
    import scipy.special

    import mmfuse.reference
    from mmfuse._core.sequence import _gelu_generic, gelu
    from mmfuse._namespace import array_namespace

    rows, full = [], []
    for case, (shape, chunk) in CASES.items():
        x_np = 3.0 * np.random.default_rng(0).standard_normal(shape)
        x = da.from_array(x_np, chunks=(chunk, *shape[1:]))
        xp = array_namespace(x)
        graphs = {
            "per chunk": gelu(xp, x),
            "elementwise": _gelu_generic(xp, x),
            "plain": 0.5 * x * (1.0 + da.map_blocks(scipy.special.erf, x / math.sqrt(2.0), dtype=x.dtype)),
        }
        # every candidate against the float64 oracle before timing (raises past RTOL)
        want = mmfuse.reference.gelu(x_np)
        errs = {name: check_same(f"{case} {name} vs mmfuse.reference.gelu", g.compute(), want, RTOL)
                for name, g in graphs.items()}  # fmt: skip
        rounds = sample_rounds(
            {name: (lambda g=g: g.compute(scheduler="threads")) for name, g in graphs.items()},
            repeats=4 if args.quick else 10,
        )
        times = medians(rounds)
        for other in ("elementwise", "plain"):
            ratios = round_ratios(rounds, other, "per chunk")
            rows.append({
                "case": case,
                "vs": other,
                "per chunk ms": f"{1e3 * times['per chunk']:.1f}",
                "other ms": f"{1e3 * times[other]:.1f}",
                "speed-up": f"{times[other] / times['per chunk']:.2f}",
                "p10-p90": f"{quantile(ratios, 0.1):.2f}-{quantile(ratios, 0.9):.2f}",
                "tasks (ours / other)": f"{len(dict(graphs['per chunk'].__dask_graph__()))} / "
                f"{len(dict(graphs[other].__dask_graph__()))}",
            })  # fmt: skip
        full.append({"case": case, "seconds": times, "rel_err_vs_reference": errs,
                     "tasks": {k: len(dict(g.__dask_graph__())) for k, g in graphs.items()}})  # fmt: skip
    print(f"machine: {machine()}")
    print_table(rows, ["case", "vs", "per chunk ms", "other ms", "speed-up", "p10-p90", "tasks (ours / other)"])
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "results": full}, indent=2))


if __name__ == "__main__":
    main()
