"""The static table of mmfuse's built-in implementations: the one place dispatch is decided.

Each row says: operator, backend (the policy name a user forces with ``backend=``), variant
(what distinguishes it from the backend's other rows), where the function lives
(``"module:attribute"``, imported only when the row is chosen), the condition on the call
(:data:`mmfuse.backends._conditions.CONDITIONS`) and the priority.  The registry
(:mod:`mmfuse.backends._registry`) reads this table and nothing else, so what runs depends on
the inputs, the policy and, for "auto", on which optional frameworks the process has imported
(a row's ``import_at`` size aside, "auto" takes numba's, CuPy's and Triton's rows only once
their framework is imported; a lookup imports none (a call's choice of a row past its
``import_at`` imports its framework: numba), while the listings ``available()``
and ``explain()`` import the backends' modules, torch, Triton and CuPy among them, never numba:
no choice of "auto" changes with them, as the Triton rows' comment below says).

How a row is chosen:

- a forced backend: its rows, highest priority first; the first whose condition holds runs;
  none: :class:`~mmfuse.backends.BackendUnsupported` with every row's reason;
- ``"auto"``: every row but the reference's, highest priority first, skipping rows of an
  optional framework the process has not imported (``import mmfuse`` never imports one),
  except rows with an ``import_at`` element count, which "auto" also takes for calls of at
  least that many elements that the row's condition accepts (read from the call's metadata,
  before anything is imported) when the framework is installed (the first such call imports it;
  :data:`AUTO_IMPORT_ELEMENTS` says why numba's CPU kernels have one); the Array-API core's
  generic row takes anything, so something always runs.

Why the priorities are what they are: fused device kernels first (CuPy's cuBLAS path 20 above
numba's 10: benchmarks/RESULTS.md, H100), then the torch custom ops (15, above numba so that
torch CUDA tensors keep the memory-lean backward), the compiled CPU kernels (numba 10), the
torch backend's rows for operators without a custom op (``tensor_fusion``, ``moments`` and
the interaction terms: 5, the core's algorithm on torch, there so that ``backend="torch"``
serves every operator), the Array-API core's specialised
paths (NumPy's cache-blocked buffers and Dask's per-chunk tasks, 1) and the generic core (0).
"Fallback" rows say what a backend does with a call its kernels cannot serve: the torch
backend's custom ops have no batching rule or forward-mode derivative, so under
``torch.func`` transforms the torch backend runs the core's autograd path (14; ``align``'s
custom op and transforms rows are 9 and 8, see below); numba's CUDA
kernels are forward-only, so CUDA arrays needing gradients also take the core (9).
numba's CPU kernels also serve torch CPU tensors, through NumPy views of their memory:
``moments`` and ``align`` when no gradient is needed (10, above the torch backend's
``moments`` autograd row at 5 and its ``align`` custom op at 9; with gradients those run:
the core under autograd for ``moments``, ``mmfuse::align`` and its closed-form backward for
``align``), and ``zoom_shift`` inside the torch op
``mmfuse::zoom_shift_numba``, which has the analytic backward of ``mmfuse::zoom_shift`` (16,
above that op's row at 15, which it replaces on CPU: same backward, a forward about 10x faster).
"""

from __future__ import annotations

from typing import NamedTuple

from ._conditions import TRITON_AUTO_ELEMENTS

__all__ = ["AUTO_IMPORT_ELEMENTS", "AUTO_IMPORT_PRODUCTS", "FRAMEWORKS", "ROWS", "Row"]


class Row(NamedTuple):
    op: str
    backend: str
    variant: str
    target: str
    condition: str
    priority: int
    #: "auto" takes the row before its framework is imported for calls of at least this size
    #: (0: only once the framework is imported); the size is the first floating array's
    #: element count, or what the public function passes instead (the interaction terms:
    #: their recursion's products)
    import_at: int = 0


#: Calls of at least this many elements (of ``x``, or ``xs[0]`` for ``align``) let "auto" import
#: numba for its CPU kernels (``moments``, ``zoom_shift``, ``align``) when numba is installed;
#: smaller calls never import it (once imported, "auto" uses the kernels at every size).
#: Measured on the 2-core CI machine (``benchmarks/align_cpu.py --rule``; docs/backends.rst,
#: "numba's CPU kernels under auto"): importing numba and loading its cached kernels costs
#: 0.6-0.7 s once per process; a zoom_shift call saves 0.9-1.8 ms at 2**20 elements (repaid
#: within 330-620 calls), 13-20 ms at (64, 512, 256) (within 30-45), but 0.2-0.3 ms at 2**18
#: (1900-3800 calls) and 0.05-0.08 ms at 2**14.
AUTO_IMPORT_ELEMENTS = 1 << 20

#: The same for the interaction terms' compiled order recursion (``lowrank_interactions``,
#: ``cp_interactions``), whose call size is the recursion's products, M^2 B R h (LMF) or
#: M^2 B R (CP), not an array's elements.  Measured on the 2-core CI machine
#: (``benchmarks/interactions.py --rule``, float32): the one-time import costs 0.48 s; a call
#: saves 0.14-0.43 ns per product (more at M = 8 than at M = 4), so 2**23 products (e.g. M = 8,
#: B = 1024, R = 4, h = 32: 2.2 ms saved) repay it within about 220 calls; 2**22 (M = 4) would
#: take about 800, 2**27 (issue 22's benchmark case) 23.
AUTO_IMPORT_PRODUCTS = 1 << 23


_CORE_FUSION = "mmfuse._core.fusion"
_CORE_SEQ = "mmfuse._core.sequence"
_CORE_ALIGN = "mmfuse._core.align"
_REF = "mmfuse.backends.reference"
_TORCH = "mmfuse.backends.torch"
_NUMBA = "mmfuse.backends.numba"
_CUPY = "mmfuse.backends.cupy"
_TRITON = "mmfuse.backends.triton"

#: backend -> the framework whose import lets "auto" consider its rows (None: always)
FRAMEWORKS: dict[str, str | None] = {
    "array_api": None,
    "reference": None,
    "torch": "torch",
    "numba": "numba",
    "cupy": "cupy",
    "triton": "triton",
}


def _rows() -> tuple[Row, ...]:
    rows: list[Row] = []

    def add(
        op: str, backend: str, variant: str, target: str, condition: str, priority: int, import_at: int = 0
    ) -> None:
        rows.append(Row(op, backend, variant, target, condition, priority, import_at))

    for op in ("tensor_fusion", "lowrank_fusion", "cp_fusion"):
        add(op, "array_api", "generic", f"{_CORE_FUSION}:{op}", "any", 0)
        add(op, "reference", "float64 NumPy oracle", f"{_REF}:{op}", "values, no grad", 0)
    add(
        "lowrank_fusion",
        "array_api",
        "numpy, cache-blocked",
        f"{_CORE_FUSION}:lowrank_fusion_numpy",
        "numpy",
        1,
    )
    add(
        "lowrank_fusion",
        "array_api",
        "dask, one task per chunk",
        f"{_CORE_FUSION}:lowrank_fusion_dask",
        "dask",
        1,
    )
    # TFN has no custom op: the torch backend runs the core's contraction under autograd (5:
    # the same function the core's row runs; a row so that backend="torch" serves it)
    add("tensor_fusion", "torch", "autograd", f"{_CORE_FUSION}:tensor_fusion", "torch", 5)
    for op in ("lowrank_fusion", "cp_fusion"):
        add(op, "torch", "custom op", f"{_TORCH}:{op}", "torch, no transform", 15)
        add(op, "torch", "autograd (transforms)", f"{_CORE_FUSION}:{op}", "torch, under a transform", 14)
        add(op, "numba", "CUDA kernels", f"{_NUMBA}:{op}", "CUDA arrays, no gradient", 10)
        add(op, "numba", "autograd (gradients)", f"{_CORE_FUSION}:{op}", "CUDA arrays needing gradients", 9)
        add(op, "cupy", "cuBLAS + fused kernel", f"{_CUPY}:{op}", "cupy", 20)

    for op in ("sequence_fusion", "wander"):
        add(op, "array_api", "generic", f"{_CORE_SEQ}:{op}", "any", 0)
        add(op, "reference", "float64 NumPy oracle", f"{_REF}:{op}", "values, no grad", 0)
        add(op, "torch", "custom op", f"{_TORCH}:{op}", "torch, no transform", 15)
        add(op, "torch", "autograd (transforms)", f"{_CORE_SEQ}:{op}", "torch, under a transform", 14)

    for op in ("moments", "zoom_shift", "align"):
        add(op, "array_api", "generic", f"{_CORE_ALIGN}:{op}", "any", 0)
        add(op, "array_api", "numpy, cache-blocked", f"{_CORE_ALIGN}:{op}_numpy", "numpy float32/float64", 1)
        add(op, "reference", "float64 NumPy oracle", f"{_REF}:{op}", "values, no grad", 0)
        # NumPy arrays; for moments and align also torch CPU tensors needing no gradient
        cpu = "numpy (CPU kernels)" if op == "zoom_shift" else "numpy or torch CPU, no gradient (CPU kernels)"
        add(op, "numba", "CPU kernels", f"{_NUMBA}:{op}_cpu", cpu, 10, AUTO_IMPORT_ELEMENTS)
    # torch CPU tensors: the kernels as the forward of the op mmfuse::zoom_shift_numba, whose
    # backward is mmfuse::zoom_shift's (gradients too); above that op's row (15)
    add(
        "zoom_shift",
        "numba",
        "CPU kernels in a torch op",
        f"{_NUMBA}:zoom_shift_cpu",
        "torch CPU (CPU kernels)",
        16,
        AUTO_IMPORT_ELEMENTS,
    )
    for op in ("moments", "zoom_shift"):
        add(op, "numba", "CUDA kernels", f"{_NUMBA}:{op}_cuda", "CUDA arrays, no gradient", 10)
        add(op, "numba", "autograd (gradients)", f"{_CORE_ALIGN}:{op}", "CUDA arrays needing gradients", 9)
        add(op, "cupy", "fused kernel", f"{_CUPY}:{op}", "cupy", 20)
    add("zoom_shift", "torch", "custom op", f"{_TORCH}:zoom_shift", "torch, no transform", 15)
    add(
        "zoom_shift",
        "torch",
        "autograd (transforms)",
        f"{_CORE_ALIGN}:zoom_shift",
        "torch, under a transform",
        14,
    )
    # no custom op: the core's algorithm (statistics, rounds, one map) on torch, with autograd;
    # below numba's CUDA kernels (10), which "auto" keeps for torch CUDA tensors without grad
    add("moments", "torch", "autograd", f"{_CORE_ALIGN}:moments", "torch", 5)
    # align's custom op (the core's forward, the closed-form backward saving only the inputs)
    # at 9: below numba's CPU kernels (10), which "auto" keeps for torch CPU tensors needing
    # no gradient (faster forward, no backward needed); align has no forward-only CUDA row
    # that the op would have to beat (contrast the other custom ops at 15).  Its transforms
    # row at 8, under the op as for the other operators (14 under 15): the two conditions
    # exclude each other, and the torch backend's top row is what lookup("align", "torch")
    # returns without inputs (the nn layers' compiled path)
    add("align", "torch", "custom op", f"{_TORCH}:align", "torch, no transform", 9)
    add("align", "torch", "autograd (transforms)", f"{_CORE_ALIGN}:align", "torch, under a transform", 8)
    # Interaction terms: the core (its NumPy variant runs the order recursion in place), and
    # the torch backend's row so that backend="torch" serves them (the core under autograd)
    _CORE_INTER = "mmfuse._core.interactions"
    for op in ("tensor_interactions", "lowrank_interactions", "cp_interactions"):
        add(op, "array_api", "generic", f"{_CORE_INTER}:{op}", "any", 0)
        add(op, "reference", "float64 NumPy oracle", f"{_REF}:{op}", "values, no grad", 0)
        add(op, "torch", "autograd", f"{_CORE_INTER}:{op}", "torch", 5)
    for op in ("lowrank_interactions", "cp_interactions"):
        add(op, "array_api", "numpy, in-place order recursion", f"{_CORE_INTER}:{op}_numpy", "numpy", 1)
        # the order recursion compiled (NumPy arrays, or torch CPU tensors through NumPy views
        # when no gradient is needed); "auto" imports numba for it by the recursion's products
        add(
            op,
            "numba",
            "CPU kernels",
            f"mmfuse.backends._numba_interactions:{op}_cpu",
            "numpy or torch CPU, no gradient (CPU kernels)",
            10,
            AUTO_IMPORT_PRODUCTS,
        )

    # Fused Triton kernels for torch CUDA tensors (CPU tensors under TRITON_INTERPRET=1), at 4:
    # below every row "auto" picked before them (the torch backend's autograd rows are 5), so
    # backend="triton" runs them and "auto" does not, except where an H200 measured them
    # faster than the torch backend's custom ops (benchmarks/gpu_tune.py, RESULTS.md): the
    # low-rank forward+backward (9.1 / 1.7 / 12.9 ms against 13.6 / 3.2 / 13.4 at issue 21's
    # sizes, float32; 7.96 / 2.00 / 11.80 against 13.78 / 2.54 / 13.00 in a later run) and
    # zoom_shift (0.29 against 1.0 ms at (256, 512, 512)).  Those rows,
    # at 16 over the ops' 15, take CUDA tensors of at least TRITON_AUTO_ELEMENTS (layer steps
    # of B = 32 and 4096 ran slower through them: host-bound), never the interpreter, whether
    # or not triton is imported (their import_at: the first such call imports it, and compiles
    # the kernels once).  Not "once triton is imported": mmfuse's own lookups (available(),
    # explain()) import it, and torch.compile does, so "auto" would have changed with them.
    # The Wander and sequence kernels measured slower than the torch ops; cp, moments and
    # align are not measured against them.
    for op in ("lowrank_fusion", "cp_fusion", "moments", "zoom_shift", "sequence_fusion", "wander", "align"):
        add(op, "triton", "fused kernels", f"{_TRITON}:{op}", "torch CUDA tensors", 4)
    for op in ("lowrank_fusion", "zoom_shift"):
        add(op, "triton", "fused kernels, measured faster", f"{_TRITON}:{op}",
            "torch CUDA tensors, compiled kernels", 16, TRITON_AUTO_ELEMENTS)  # fmt: skip
    return tuple(rows)


#: every built-in implementation, in no meaningful order (priorities decide)
ROWS: tuple[Row, ...] = _rows()
