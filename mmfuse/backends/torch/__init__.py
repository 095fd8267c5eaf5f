"""The ``"torch"`` backend: ``torch.library`` custom operators with analytic, memory-lean backwards.

Importing this package imports torch and defines the operators; the registry imports it when
one of its implementations is chosen (``backend="torch"``, or under ``"auto"`` once the user
has imported torch), so ``import mmfuse`` never does.  One module per operator
(:mod:`.lowrank`, :mod:`.cp`, :mod:`.sequence`, :mod:`.wander`, :mod:`.zoom_shift`), the
pieces they share in :mod:`._common`.  The functions below have the public signatures; the
registry's table (:mod:`mmfuse.backends._table`) says when they run (torch tensors outside
``torch.func`` transforms; under transforms the torch backend runs the Array-API core).

Operators (namespace ``mmfuse``), each a ``torch.library.custom_op`` with ``register_fake``
(shape inference for ``torch.compile`` and meta tensors) and ``register_autograd``:

- ``mmfuse::lowrank_fusion(xs, factors, weights, bias, append_one, present)``: LMF Eq. 8,
  returning ``(fusion, kept)``.  Forward: per batch block, one GEMM per modality into a reused
  (rows, R h) buffer, an in-place product and the rank sum; no (B, R h) array is allocated,
  except the (M, B, R h) ``kept`` projections of narrow fusions (see below).
- ``mmfuse::lowrank_fusion_backward``: the blocked analytic backward of the above (opaque to
  autograd, used when no graph of the backward is being built).
- ``mmfuse::cp_fusion(xs, weights, factors, bias, append_one, present)``: CP fusion in
  TensorLy's layout; its backward is plain differentiable torch code (projections are (B, R)).
- ``mmfuse::sequence_fusion(hs, feature_factors, token_factors, mode, masks)``: Wander's
  token-level fusion (both modes; the forward is the Array-API core's blocked algorithm).
- ``mmfuse::sequence_fusion_backward``: its blocked analytic backward, recomputing the
  per-modality terms block by block (see the comment above the op for what is saved).
- ``mmfuse::zoom_shift(x, guide, alpha, axis, mask, guide_mask, eps)``: one Zoom-and-Shift
  step with a closed-form backward that saves only the inputs.
- ``mmfuse::align(xs, rounds, alpha, schedule, topology, hub, axis, masks, eps)``: M-modality
  alignment (rounds or their limit), returning the M aligned tensors, with a closed-form
  backward that saves only the inputs (:mod:`.align`).
- ``mmfuse::wander_collapsed(xs, weights, biases, feature_factors, token_factors, masks,
  residual)``: the whole Wander adapter in the released configuration (collapsed mode, GELU),
  returning ``(y, kept)``; ``mmfuse::wander_collapsed_backward`` is its backward (see the
  comment above the op for what is kept and why).

How the ops are called: the functions registered with the backend registry call each op
through :func:`mmfuse.backends._torch_eager.bind`, a plain ``autograd.Function`` built from
the op's own ``setup_context`` and backward (graph nodes ``_LowRankFusionBackward``,
``_CPFusionBackward``, ``_SequenceFusionBackward``, ``_ZoomShiftBackward``,
``_WanderCollapsedBackward``), which skips ``torch.library``'s per-call Python autograd
wrapper, and runs each op's implementation directly rather than through torch's dispatcher
(without gradients, the implementation alone; the backward ops likewise,
:func:`mmfuse.backends._torch_eager.direct`): one implementation per op serves every device,
so only the dispatch is skipped, with its per-call cost and the import of ``torch._dynamo``
(2-3 s) on a custom op's first dispatch.  Under ``torch.compile`` and dispatch modes (fake
tensors, export), and for direct ``torch.ops.mmfuse`` calls, the registered ops and autograd
run.  The tests check that both give the same values and gradients.

The ``"torch"`` implementation of ``wander`` (:func:`wander_torch`, also used by
:class:`mmfuse.nn.WanderAdapter` under ``torch.compile``) is ``mmfuse::wander_collapsed`` in
that configuration, else the down-projection and activation in torch around
``mmfuse::sequence_fusion``.

Small problems skip the ops: a custom op's fixed costs (and a Python backward) decide a step
of a few microseconds of arithmetic, so below measured sizes the functions run plain torch
operations under autograd instead, each the same maths written once: ``lowrank_fusion`` and
``cp_fusion`` the core's whole-batch form (:func:`.lowrank.whole_batch`), ``lowrank_fusion``
with few outputs, or past that form's bounds, :func:`.lowrank.plain_fusion` (up to its own
bound, :func:`.lowrank.plain_form`; without autograd also few samples with wide outputs,
:func:`.lowrank.wide_forward`); ``wander`` in the released
configuration with modalities of one shape and no masks, at B <= 128 (off the CPU up to an
element bound, :func:`.wander._small_batch`),
:func:`.wander.stacked_adapter` (the modalities stacked along a leading axis);
``sequence_fusion`` on the CPU at B <= 128 with few terms to keep, the core
(:func:`.sequence._on_core`).  The rules and
their measurements are in ``docs/backends.rst``.  The ``zoom_shift`` and ``align`` ops'
forwards run the core's NumPy primitives on CPU float32 / float64 tensors' memory
(:mod:`.zoom_shift`).

What the backward of ``lowrank_fusion`` saves, and why
------------------------------------------------------
LMF's released code (and autograd through the Array-API core) keeps the M per-modality
projections ``hat x_m W_m`` alive from forward to backward: M arrays of B R h elements, the
dominant memory of the layer when R h is large.  Here ``setup_context`` saves the *inputs*
(``xs``, ``factors``, ``weights``, ``present``), which the caller holds anyway, so saving them
costs no memory, and the backward recomputes the projections block by block (one extra GEMM
per modality, the forward's cost).  Narrow fusions are the exception: when the M projections
take at most a quarter of the inputs' elements (``4 M R h <= sum_m d_m``, e.g. dims (8, 16, 64)
with R h = 4), the forward also returns them as a second, non-differentiable output and they
are saved: little memory, and the backward skips the recomputing GEMMs (such fusions past the
plain form's bound below).  (Small batches once kept theirs too, when the M projections held
no more elements than the factors; but a rule on B gave the op's second output a shape that
depends on B, which ``torch.export`` of a dynamic batch cannot take, and in eager mode calls up
to a size run without the op.)  In eager mode on the CPU, calls up to B R h = 2**20 run
:func:`.lowrank.plain_fusion` instead, with the exceptions :func:`.lowrank.plain_form`
states (plain operations, whose autograd keeps the projections and their running products:
at most 4 MiB each in float32; with a ``present`` mask only up to 1024 samples, since autograd
also keeps the masked copies of the inputs).  Fusions that keep
their projections also run forward and backward on the whole batch at once, not in cache-sized
blocks: every per-row array is (B, R h), small per row, so there is little to keep in cache,
while each block costs a dozen op launches.  Per block the backward forms ``G_m = (g w) *
prod_{k != m} P_k`` with prefix and suffix products (no division, so exact zeros in a
projection are harmless).  Peak extra memory is a
few (rows, R h) blocks plus the gradients themselves, independent of the batch size.

When a graph of the backward is requested (``create_graph=True``: double backward,
``gradgradcheck``), or the backward runs under autograd's vmap (batched gradients), the same
formulas run as ordinary differentiable, out-of-place torch operations on the whole batch
(:func:`.lowrank.whole_batch_grads`); that trades memory for differentiability and is only
done when asked for.

float16 / bfloat16 inputs are computed in float32 and the results cast back.
"""

from __future__ import annotations

from ..._namespace import know_torch_and_numpy_types
from .align import align
from .cp import cp_fusion
from .lowrank import lowrank_fusion
from .sequence import sequence_fusion
from .wander import wander, wander_torch
from .zoom_shift import zoom_shift

know_torch_and_numpy_types()  # (before anything is compiled: see there)

__all__ = ["align", "cp_fusion", "lowrank_fusion", "sequence_fusion", "wander", "wander_torch", "zoom_shift"]
