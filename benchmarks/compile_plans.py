"""torch.compile's tracing time for a function calling public mmfuse operators, with empty plan
caches and after many eager calls of other shapes have filled them.

Calls are not planned under torch.compile, and their None keys never reach a plan cache's
dict (mmfuse._plan.PlanCache): Dynamo guards on every entry of a dict it reads, so caches
holding the plans of many eager calls once made tracing several times slower.  Both
compilations run in this process after a warm-up one (Dynamo reset before each), on the same
function and inputs; the ratio is filled / empty (about 1 when the caches stay out of tracing).
"""

from __future__ import annotations

import json
import time
import warnings
from typing import Any

from _harness import arg_parser, machine, print_table


def _compile_seconds(fn: Any, args: tuple[Any, ...]) -> float:
    import torch

    torch._dynamo.reset()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Dynamo's notes on the public functions' graph breaks
        torch.compile(fn, backend="eager")(*args)
    seconds = time.perf_counter() - start
    torch._dynamo.reset()
    return seconds


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--calls", type=int, default=1000, help="eager calls of other shapes (default 1000)")
    args = parser.parse_args()
    import torch

    import mmfuse

    calls = 100 if args.quick else args.calls
    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(4, 6, 5, generator=gen), torch.randn(4, 7, 5, generator=gen)

    def fused(x: Any, g: Any) -> Any:
        ys = mmfuse.align([x, g], rounds=1)
        return ys[0].sum() + mmfuse.zoom_shift(x, g).sum()

    _compile_seconds(fused, (x, g))  # warm-up: Dynamo's own one-time costs (its imports, caches)
    empty = _compile_seconds(fused, (x, g))
    for i in range(calls):  # other shapes: each call plans a new signature
        a = torch.randn(2, 3 + i % 50, 4, generator=gen)
        b = torch.randn(2, 5 + i // 50, 4, generator=gen)
        mmfuse.align([a, b], rounds=1)
        mmfuse.zoom_shift(a, b)
    filled = _compile_seconds(fused, (x, g))
    print(f"machine: {machine()}; torch {torch.__version__}")
    rows = [{"plan caches": "empty", "compile s": f"{empty:.2f}", "filled/empty": ""},
            {"plan caches": f"after {calls} eager calls", "compile s": f"{filled:.2f}",
             "filled/empty": f"{filled / empty:.2f}"}]  # fmt: skip
    print_table(rows, ["plan caches", "compile s", "filled/empty"])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine(), "torch": torch.__version__, "calls": calls,
                       "empty_seconds": empty, "filled_seconds": filled}, fh, indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
