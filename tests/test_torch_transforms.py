"""torch.func transforms (grad, vmap, jvp, jacrev) and forward-mode AD over the layers and the
torch backend: the custom ops have no batching rule or forward-mode derivative, so under these
the torch backend computes through the Array-API core.  Every result is compared with a path
that does not use the transform (eager autograd through the custom ops, per-slice loops,
double backward), in float64."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")

import torch.autograd.forward_ad as fwad  # noqa: E402
from torch.func import functional_call, grad, jacrev, jvp, vmap  # noqa: E402

import mmfuse  # noqa: E402
from mmfuse.nn import CPFusion, GuidedZoomShift, LowRankFusion, TensorFusion, WanderAdapter, ZoomShift  # noqa: E402

DIMS = (4, 3, 5)
LENGTHS = (5, 4)
F64 = torch.float64


def _cases(seed):
    """(name, layer, inputs) with random parameters and inputs (batch 3)."""
    torch.manual_seed(seed)
    flat = [torch.randn(3, d, dtype=F64) for d in DIMS]
    seqs = [torch.randn(3, t, 6, dtype=F64) for t in LENGTHS]
    layers = [
        ("lowrank", LowRankFusion(DIMS, 5, 2, dtype=F64), flat),
        ("cp", CPFusion(DIMS, 5, 2, dtype=F64), flat),
        ("tensor", TensorFusion(DIMS, 5, dtype=F64), flat),
        ("wander-collapsed", WanderAdapter((6, 6), LENGTHS, 3, 2, 2, mode="collapsed", dtype=F64), seqs),
        ("wander-cp", WanderAdapter((6, 6), LENGTHS, 3, 2, 2, mode="cp", dtype=F64), seqs),
        ("zoomshift", ZoomShift(6, 2, alpha=0.5, dtype=F64), seqs),
        ("guided", GuidedZoomShift(6, 2, dtype=F64), seqs),
    ]
    with torch.no_grad():  # nonzero everywhere (biases and token factors may start at zero)
        for _, layer, _ in layers:
            for p in layer.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return layers


CASES = [name for name, _, _ in _cases(0)]


def _case(name, seed=0):
    return next((layer, xs) for n, layer, xs in _cases(seed) if n == name)


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", CASES)
def test_func_grad_equals_eager_autograd(name, custom_align_ops):
    """Gradients with respect to the parameters and the inputs."""
    layer, xs = _case(name, seed=1)
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss(p, inputs):
        return functional_call(layer, p, (inputs,)).square().sum()

    got_p, got_x = grad(loss, argnums=(0, 1))(params, xs)
    leaves = [x.clone().requires_grad_() for x in xs]
    layer.zero_grad()
    layer(leaves).square().sum().backward()  # the custom ops' own backward
    for k, p in layer.named_parameters():
        _close(got_p[k], p.grad)
    for g, leaf in zip(got_x, leaves):
        _close(g, leaf.grad)


@pytest.mark.parametrize("name", CASES)
def test_vmap_over_a_leading_axis_equals_a_loop(name):
    layer, xs = _case(name, seed=2)
    stacked = [torch.stack([x, 0.5 * x.flip(0) + 1.0]) for x in xs]
    got = vmap(lambda *a: layer(list(a)))(*stacked)
    want = torch.stack([layer([s[v] for s in stacked]) for v in range(2)])
    _close(got, want)


def _double_backward_jvp(layer, xs, tangent):
    """J v through reverse mode twice (the custom ops' differentiable backward): with
    g(u) = J^T u, J v = d(g(u) . v)/du."""
    a = xs[0].clone().requires_grad_()
    out = layer([a, *xs[1:]])
    u = torch.zeros_like(out, requires_grad=True)
    (g,) = torch.autograd.grad(out, a, u, create_graph=True)
    (jv,) = torch.autograd.grad(g, u, tangent)
    return jv


# torch's forward-AD decompositions are TorchScript, which warns on first use (torch >= 2.11)
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name", CASES)
def test_jvp_and_forward_mode_ad_equal_double_backward(name, custom_align_ops):
    layer, xs = _case(name, seed=3)
    tangent = torch.randn_like(xs[0])
    want = _double_backward_jvp(layer, xs, tangent)
    out, got = jvp(lambda a: layer([a, *xs[1:]]), (xs[0],), (tangent,))
    _close(out, layer(xs))
    _close(got, want)
    with fwad.dual_level():
        dual = fwad.make_dual(xs[0], tangent)
        primal, tan = fwad.unpack_dual(layer([dual, *xs[1:]]))
    _close(primal, out)
    _close(tan, want)


def test_per_sample_gradients_by_vmap_of_grad():
    """The usual per-sample-gradient recipe (functional_call + grad + vmap) on LowRankFusion."""
    layer, xs = _case("lowrank", seed=4)
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss(p, *sample):
        return functional_call(layer, p, ([s[None] for s in sample],)).square().sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0, 0))(params, *xs)
    for b in range(xs[0].shape[0]):
        layer.zero_grad()
        layer([x[b : b + 1] for x in xs]).square().sum().backward()
        for k, p in layer.named_parameters():
            _close(per_sample[k][b], p.grad)


@pytest.mark.parametrize("backend", ["torch", "array_api"])
def test_functional_ops_under_jacrev_and_vmap(backend):
    """The functional API with the backend forced: jacrev equals the rows of double backward,
    vmap equals a loop; the float64 GELU path of wander included."""
    torch.manual_seed(5)
    xs = [torch.randn(2, d, dtype=F64) for d in DIMS]
    p = mmfuse.init_lowrank(DIMS, rank=2, out_dim=3, seed=5, dtype="float64")
    params = {k: (torch.as_tensor(v) if not isinstance(v, list) else [torch.as_tensor(f) for f in v]) for k, v in p.items()}
    with torch.no_grad():
        params["bias"] = params["bias"] + 0.3

    def fuse(a):
        return mmfuse.lowrank_fusion([a, *xs[1:]], **params, backend=backend)

    jac = jacrev(fuse)(xs[0])
    a = xs[0].clone().requires_grad_()
    out = fuse(a)
    for i in range(out.shape[0]):
        for k in range(out.shape[1]):
            (row,) = torch.autograd.grad(out[i, k], a, retain_graph=True)
            _close(jac[i, k], row)

    seqs = [torch.randn(2, 2, t, 6, dtype=F64) for t in LENGTHS]
    wp = mmfuse.init_wander((6, 6), LENGTHS, rank=3, feature_rank=2, token_rank=2, out_dim=6, seed=5, dtype="float64")
    wp = {k: [tuple(torch.as_tensor(t) for t in v_m) if isinstance(v_m, tuple) else torch.as_tensor(v_m) for v_m in v]
          for k, v in wp.items()}  # fmt: skip

    def wander(*a):
        return mmfuse.wander(list(a), wp, mode="collapsed", backend=backend)

    _close(vmap(wander)(*seqs), torch.stack([wander(*(s[v] for s in seqs)) for v in range(2)]))


def test_eager_calls_still_run_the_custom_ops(blocked_paths):
    layer, xs = _case("lowrank")
    assert type(layer(xs).grad_fn).__name__ == "_LowRankFusionBackward"
    layer, seqs = _case("wander-collapsed")
    assert type(layer(seqs).grad_fn).__name__ == "_WanderCollapsedBackward"


def test_vmap_over_batched_masks():
    """Masks batched by vmap: the one check of mask values (no sample with every token
    masked) ran on them and failed in torch's "data-dependent control flow"; it is skipped
    for tensors a transform wraps, as for JAX's traced arrays, and each vmapped sample equals
    its own call."""
    torch.manual_seed(5)
    x, g = torch.randn(3, 2, 5, 4, dtype=torch.float64), torch.randn(3, 2, 6, 4, dtype=torch.float64)
    m = torch.rand(3, 2, 5) < 0.7
    m[..., 0] = True
    got = torch.func.vmap(lambda a, b, k: mmfuse.zoom_shift(a, b, mask=k))(x, g, m)
    aligned = torch.func.vmap(lambda a, b, k: mmfuse.align([a, b], masks=[k, None])[0])(x, g, m)
    for i in range(3):
        torch.testing.assert_close(got[i], mmfuse.zoom_shift(x[i], g[i], mask=m[i]))
        torch.testing.assert_close(aligned[i], mmfuse.align([x[i], g[i]], masks=[m[i], None])[0])


def test_generic_align_compiles_with_dynamic_shapes():
    """align / zoom_shift_fusion with backend="array_api" under torch.compile: a second call
    with another token count (dynamic shapes) failed in the block-size check, which read
    ``nbytes`` ("Cannot call numel() on tensor with symbolic sizes")."""
    import mmfuse

    g = torch.Generator().manual_seed(int(torch.randint(0, 1 << 30, ()).item()))

    def call(a, b):
        return mmfuse.align([a, b], backend="array_api")[0], mmfuse.zoom_shift_fusion([a, b], backend="array_api")

    compiled = torch.compile(call, backend="eager")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Dynamo's notes on the public functions' graph breaks
            for t in (6, 9, 11):
                a = torch.randn(2, t, 3, generator=g, dtype=torch.float64)
                b = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
                for got, want in zip(compiled(a, b), call(a, b)):
                    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    finally:
        torch._dynamo.reset()


def test_compiled_layers_inside_torch_func_transforms_take_the_core():
    """torch.compile over torch.func transforms of the layers (grad of a functional_call,
    vmap): the compiled path calls the Array-API core inside a transform, as the eager
    registry does; it called the custom ops, which have no batching rules and whose autograd
    does not run under functorch's grad: a hard error (a review of program capture)."""
    from torch.func import functional_call, grad, vmap

    from mmfuse.nn import LowRankFusion, ZoomShift

    gen = torch.Generator().manual_seed(int(torch.randint(2**31, ())))
    layer = LowRankFusion([8, 16], out_dim=4, rank=3, dtype=torch.float64)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    xs = [torch.randn(6, 8, generator=gen, dtype=torch.float64), torch.randn(6, 16, generator=gen, dtype=torch.float64)]

    def loss(p, xs):
        return functional_call(layer, (p,), (xs,)).square().sum()

    want = grad(loss)(params, xs)
    got = torch.compile(grad(loss), backend="eager", fullgraph=True)(params, xs)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-12)
    zoom = ZoomShift(8, 2)
    seqs = [torch.randn(2, 6, 5, 8, generator=gen, dtype=torch.float64),
            torch.randn(2, 6, 4, 8, generator=gen, dtype=torch.float64)]  # fmt: skip
    torch.testing.assert_close(torch.compile(vmap(zoom), backend="eager")(seqs), vmap(zoom)(seqs), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", ["lowrank", "sequence-cp"])
def test_core_exports_with_an_unbounded_batch(op):
    """The Array-API core's low-rank fusion and cp-mode sequence fusion under torch.export with
    a dynamic batch: a traced batch is one block, as tensor_fusion's.  The low-rank core
    compared the batch with its whole-batch bound (the program held only for B <= 256, and an
    example batch above it fixed the batch); the cp blocks read ``int(batch)`` ("specialized
    it to be a constant") (a review of function transforms)."""
    gen = torch.Generator().manual_seed(int(torch.randint(2**31, ())))
    if op == "lowrank":
        params = mmfuse.init_lowrank([8, 6], rank=16, out_dim=64, seed=int(torch.randint(2**31, ())), xp=torch)

        def call(a, b):
            return mmfuse.lowrank_fusion([a, b], params["factors"], params["weights"], backend="array_api")

        shapes = [(8,), (6,)]
    else:
        feature = [torch.randn(2, r, 6, generator=gen, dtype=F64) for r in (4, 3)]
        token = [torch.randn(3, t, 2, generator=gen, dtype=F64) for t in (3, 5)]

        def call(a, b):
            return mmfuse.sequence_fusion([a, b], feature, token, mode="cp", backend="array_api")

        shapes = [(3, 4), (5, 3)]

    class Module(torch.nn.Module):
        def forward(self, a, b):
            return call(a, b)

    dtype = torch.float32 if op == "lowrank" else F64
    batch = torch.export.Dim("batch")
    example = [torch.randn(8, *shape, generator=gen, dtype=dtype) for shape in shapes]
    program = torch.export.export(Module(), tuple(example), dynamic_shapes=({0: batch}, {0: batch}))
    for size in (3, 700):
        xs = [torch.randn(size, *shape, generator=gen, dtype=dtype) for shape in shapes]
        torch.testing.assert_close(program.module()(*xs), call(*xs))


def test_compiled_grad_of_the_wander_adapter_makes_one_graph_for_every_batch():
    """torch.compile(dynamic=True) of torch.func.grad over a cp-mode WanderAdapter (the core
    inside the transform): one graph for every batch size.  The cp blocks read the batch as
    an int, and torch's ``linear`` on a 3-D input guards on its batch under the transform: a
    graph per batch size (a review of function transforms)."""
    from torch._dynamo.utils import counters

    torch.manual_seed(int(torch.randint(2**31, ())))
    layer = WanderAdapter((6, 6), LENGTHS, 3, 2, 2, mode="cp", dtype=F64)
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss(p, xs):
        return functional_call(layer, p, (xs,)).square().sum()

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(grad(loss), backend="eager", dynamic=True)
    try:
        for size in (8, 9, 10, 40):
            xs = [torch.randn(size, t, 6, dtype=F64) for t in LENGTHS]
            got, want = compiled(params, xs), grad(loss)(params, xs)
            for name in want:
                torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-12)
        assert counters["stats"]["unique_graphs"] == 1
    finally:
        torch._dynamo.reset()


def test_core_lowrank_gradient_never_expands_the_features_by_the_rank():
    """The core's whole-batch projections of a 2-D x against the (R, d + 1, h) factors (the
    path of backend="array_api" and of torch.func transforms): baddbmm of x expanded to
    (R, B, d) formed that view's whole gradient before summing it, R times x's memory (2.2 GB
    at B = 16384, d = 2048, R = 16).  Measured in a fresh process, peak RSS growth of one
    torch.func.grad: x's size plus a few more (B = 2048, d = 2048, R = 16: 256 MiB before)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import resource, torch, mmfuse
        from torch.func import grad
        torch.manual_seed(0)
        B, d, R = 2048, 2048, 16
        x = torch.randn(B, d)
        f = torch.randn(R, d + 1, 1) / d
        grad(lambda x: mmfuse.lowrank_fusion([x], [f]).sum())(x[:8])  # imports and first calls
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        g = grad(lambda x: mmfuse.lowrank_fusion([x], [f]).sum())(x)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        want = (f[:, :d, 0].sum(0)).expand(B, d)
        assert torch.allclose(g, want, rtol=1e-4, atol=1e-5)
        print((after - before) / 1024)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    growth_mib = float(out.stdout.strip().splitlines()[-1])
    assert growth_mib < 100, growth_mib  # x is 16 MiB; its (R, B, d) expansion 256
