"""The one place that talks to ``array_api_compat``.

Everything else in mmfuse asks this module which namespace an array lives in, on which
device, and how to move data between the caller's namespace and NumPy.  No optional
framework is imported here: ``array_api_compat`` itself only imports a framework once an
array of that framework has been handed to it.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Sequence
from typing import Any

import array_api_compat
import numpy as np

__all__ = [
    "array_namespace",
    "device_key",
    "device_of",
    "fake_tensors",
    "first_floating",
    "first_of",
    "from_numpy",
    "half_imported",
    "has_float64",
    "is_array",
    "is_cupy",
    "is_dask",
    "is_jax",
    "is_lazy",
    "is_numpy",
    "is_torch",
    "is_torch_tensor",
    "jit_tracing",
    "namespace_name",
    "native_dtype",
    "not_an_array",
    "pinned_device",
    "python_dispatched",
    "real_floating",
    "tensor_memory",
    "to_numpy",
    "torch_namespace",
    "torch_values_hidden",
    "tree_map",
    "widens_float32",
]

Array = Any
Namespace = Any


def array_namespace(*arrays: Array, names: tuple[str, ...] | None = None) -> Namespace:
    """Return the Array-API namespace shared by ``arrays`` (``None`` entries are skipped).

    Raises
    ------
    TypeError
        If an argument is not an array, or the arrays come from different namespaces.
        The message names the offending arguments when ``names`` is given.
    """
    if len(arrays) == 1:  # the core's per-call question: answered by type once known
        xp = _BY_TYPE.get(type(arrays[0]))
        if xp is not None:
            return xp
    present = [(i, a) for i, a in enumerate(arrays) if a is not None]
    if not present:
        raise TypeError("expected at least one array, got none")
    torch_xp = _all_torch([a for _, a in present])
    if torch_xp is not None:
        kind = type(present[0][1])
        # plain tensors and parameters only: tensor subclasses are what tracing makes
        # (FunctionalTensor, FakeTensor), and Dynamo, reading this dict, guards on its keys
        # and fails on such a class ("DictGetItemSource index must be a ConstDictKeySource")
        torch = sys.modules["torch"]
        if len(present) == 1 and kind in (torch.Tensor, torch.nn.Parameter):
            if torch.compiler.is_compiling():  # (no import while Dynamo traces)
                _BY_TYPE[kind] = torch_xp
            else:  # all three at once: the table then stays as it is
                know_torch_and_numpy_types()
        return torch_xp
    spaces = []
    for i, a in present:
        label = names[i] if names is not None else f"argument {i}"
        if not is_array(a):
            raise not_an_array(label, a)
        if type(a) is not np.ndarray and isinstance(a, np.ndarray):
            _check_ndarray_subclass(a, label)
        elif type(meta := getattr(a, "_meta", None)) is not np.ndarray and isinstance(meta, np.ndarray):
            # a Dask array's chunks are of its meta's type: masked chunks would be honoured by
            # some code paths and ignored by others, as a masked array itself (a review's find)
            _check_ndarray_subclass(meta, label, "a Dask array of numpy.ma.MaskedArray chunks")
        spaces.append((label, _ours(array_api_compat.array_namespace(a))))
    first_label, xp = spaces[0]
    for label, other in spaces[1:]:
        if other is not xp:
            raise TypeError(
                "mixed array namespaces: "
                f"{first_label} is {namespace_name(xp)} but {label} is {namespace_name(other)}; "
                "convert all inputs to one namespace"
            )
    # (not a Dask array: its namespace is one type's, but its chunks' type is checked per call)
    if len(present) == 1 and not hasattr(present[0][1], "_meta"):
        if len(_BY_TYPE) >= 256:  # a few types per program; classes made on the fly must not
            _BY_TYPE.clear()  # pile up (nor be kept alive) for good
            _BY_TYPE.update(_KNOWN)  # (NumPy's and torch's stay: see know_torch_and_numpy_types)
        _BY_TYPE[type(present[0][1])] = xp
    return xp


def _namespace_with(base: Any, **fast: Callable[..., Any]) -> Namespace:
    """array_api_compat's namespace ``base`` as a plain module with every name of ``base`` but
    ``fast``'s functions in place of base's own.

    A plain module whose attributes are plain functions: a lookup stays one dict read, and
    Dynamo, which traces the core on torch under ``torch.compile``, reads a module's
    attributes and inlines plain functions.  It keeps base's ``__name__``, so ``is_numpy`` /
    ``is_torch`` and the error messages' namespace names read it as base's, which it is.
    """
    ns = types.ModuleType(base.__name__, base.__doc__)
    ns.__dict__.update(vars(base))
    ns.__dict__.update(fast)
    return ns


def _numpy_namespace(base: Any) -> Namespace:
    """``array_api_compat.numpy`` with ``reshape``, ``sum``, ``matrix_transpose`` and
    ``permute_dims`` answered by ndarray's own methods.

    The core calls them a few times per operation.  On NumPy arrays array_api_compat's versions
    go through NumPy's Python-level function layer (``np.reshape``, ``np.sum``,
    ``np.swapaxes``, ``np.transpose``): 1.2, 3.7, 1.2 and about 1.5 us a call on the CI
    machine, against 0.25 us for ``a.reshape``, ``a.swapaxes`` and ``a.transpose`` and about
    1 us for ``np.add.reduce``: the whole of a tiny call's gap to plain NumPy code in places.
    Each delegation is taken only where its answer is the same array (a plain ndarray; for
    ``sum`` a floating one without ``dtype=`` or other arguments, where ``np.sum`` itself calls
    ``np.add.reduce``); every other call is array_api_compat's.
    """
    add_reduce: Any = np.add.reduce
    compat_sum, compat_reshape, compat_transpose = base.sum, base.reshape, base.matrix_transpose
    compat_permute = base.permute_dims

    def reshape(a: Any, /, shape: Any, order: str = "C", *, copy: Any = None) -> Any:
        if copy is None and order == "C" and type(a) is np.ndarray:
            return a.reshape(shape)
        # (order by keyword: before array_api_compat 1.16 / NumPy 2.1 its reshape was a wrapper
        # taking xp third, where a positional order landed: "multiple values for argument
        # 'xp'" for every ndarray subclass; a review's find)
        return compat_reshape(a, shape, order=order, copy=copy)

    def sum(
        a: Any, /, axis: Any = None, dtype: Any = None, *args: Any, keepdims: bool = False, **kwargs: Any
    ) -> Any:
        if dtype is None and not args and not kwargs and type(a) is np.ndarray and a.dtype.kind in "fc":
            return add_reduce(a, axis=axis, keepdims=keepdims)
        return compat_sum(a, axis, dtype, *args, keepdims=keepdims, **kwargs)

    def matrix_transpose(x: Any, /) -> Any:
        if type(x) is np.ndarray and x.ndim >= 2:
            return x.swapaxes(-1, -2)
        return compat_transpose(x)

    def permute_dims(x: Any, /, axes: tuple[int, ...]) -> Any:
        if type(x) is np.ndarray:
            return x.transpose(axes)
        return compat_permute(x, axes)

    return _namespace_with(
        base, reshape=reshape, sum=sum, matrix_transpose=matrix_transpose, permute_dims=permute_dims
    )


def _strict_namespace(base: Any) -> Namespace:
    """``array_api_strict`` with a ``where`` that takes a Python scalar for either branch.

    The core passes scalars there (``where(live, ratio, 1.0)``), which the standard allows
    from its 2024.12 version on; array_api_strict run at an earlier version (its default
    before its 2.3 release, or ``set_array_api_strict_flags(api_version="2023.12")``)
    refuses them.  The scalar becomes a 0-d array of the other branch's dtype and device, as
    2024.12 defines it; arrays pass straight through.  And a ``clip`` (a 2023.12 function)
    from ``where``, for the 2022.12 version: the same values, NaN kept (comparisons with NaN
    are false).  And a ``sum`` that keeps float32 and complex64: at 2022.12 the standard gave
    a floating sum the default floating dtype (float64), which every later version dropped,
    and mmfuse returns its inputs' dtype.
    """
    base_where, asarray, base_sum = base.where, base.asarray, base.sum
    narrow = (base.float32, base.complex64)
    scalars = (bool, int, float, complex)

    def where(condition: Any, x1: Any, x2: Any, /) -> Any:
        if isinstance(x1, scalars) and not isinstance(x2, scalars):
            x1 = asarray(x1, dtype=x2.dtype, device=x2.device)
        elif isinstance(x2, scalars) and not isinstance(x1, scalars):
            x2 = asarray(x2, dtype=x1.dtype, device=x1.device)
        return base_where(condition, x1, x2)

    def clip(x: Any, /, min: Any = None, max: Any = None) -> Any:  # the standard's names
        if min is not None:
            x = where(x < min, min, x)
        if max is not None:
            x = where(x > max, max, x)
        return x

    def sum(x: Any, /, *, axis: Any = None, dtype: Any = None, keepdims: bool = False) -> Any:
        if dtype is None and x.dtype in narrow:
            dtype = x.dtype
        return base_sum(x, axis=axis, dtype=dtype, keepdims=keepdims)

    return _namespace_with(base, where=where, clip=clip, sum=sum)


_COMPAT_TORCH = "array_api_compat.torch"

# array_api_compat's namespace name -> the namespace mmfuse uses in its place (made once each)
_REPLACEMENTS: dict[str, Callable[[Any], Namespace]] = {
    "array_api_compat.numpy": _numpy_namespace,
    _COMPAT_TORCH: lambda base: _torch_namespace(base, sys.modules["torch"]),
    "array_api_strict": _strict_namespace,
}
_OURS: dict[str, Namespace] = {}


def _ours(xp: Namespace) -> Namespace:
    """mmfuse's namespace in place of array_api_compat's answer ``xp``: NumPy's and torch's
    fast ones (:func:`_numpy_namespace`, :func:`_torch_namespace`), array_api_strict's with
    scalars in ``where`` (:func:`_strict_namespace`), ``xp`` itself for every other."""
    name = str(getattr(xp, "__name__", ""))
    make = _REPLACEMENTS.get(name)
    if make is None:
        return xp
    ours = _OURS.get(name)
    if ours is None:
        # setdefault: concurrent first calls keep the first object stored, so every caller
        # gets the same one (the namespace checks compare namespaces by identity: two objects
        # for NumPy made one call's arrays "mixed")
        ours = _OURS.setdefault(name, make(xp))
    return ours


# Array type -> its namespace, filled by array_namespace once a type has passed its checks.
# array_api_compat answers by type (every NumPy ndarray, every torch.Tensor, ... maps to one
# namespace), so the answer can be kept: it is what einops does, and it saves the core a
# generic inference (a few microseconds) per call.
_BY_TYPE: dict[type, Namespace] = {}
# ... and its entries for NumPy's and torch's types, once known (know_torch_and_numpy_types)
_KNOWN: dict[type, Namespace] = {}


def know_torch_and_numpy_types() -> None:
    """Fill :data:`_BY_TYPE` for NumPy arrays and torch's plain tensors and parameters at
    once, as :func:`array_namespace` would on their first calls, and keep them there; called
    where torch's operators are defined (the torch backend's import) and on the first answer
    for a torch tensor, whichever comes first.  Dynamo guards a compiled graph on the table,
    which it reads: a table that grew after the trace recompiled it, and the torch ops' own
    NumPy paths grew it on the first run of a compiled ``ZoomShift``, which so recompiled on
    its second, identical call (a review's find).  (A process whose first torch call is
    compiled, before any import of mmfuse's torch backend, still fills it while Dynamo
    traces: one recompile.)  Not at ``import mmfuse``: array_api_compat's NumPy namespace
    takes 0.1 s to import."""
    if _KNOWN:
        return
    import array_api_compat.numpy as compat_numpy

    torch = sys.modules["torch"]
    xp = torch_namespace()
    known = {torch.Tensor: xp, torch.nn.Parameter: xp, np.ndarray: _ours(compat_numpy)}
    _BY_TYPE.update(known)
    _KNOWN.update(known)


def not_an_array(label: str, obj: Any) -> TypeError:
    """The error for an argument that is not an array (``numpy.matrix`` explained: it is an
    ndarray subclass that array_api_compat, and so mmfuse, does not count as an array)."""
    if isinstance(obj, np.matrix):
        return TypeError(
            f"{label} is a numpy.matrix, whose * and indexing differ from ndarray's; "
            "pass a plain array (numpy.asarray(x))"
        )
    return TypeError(f"{label} must be an array, got {type(obj).__name__}")


def check_array(obj: Any, label: str) -> None:
    """Refuse ``obj`` unless it is an array (:func:`not_an_array`'s error)."""
    if not is_array(obj):
        raise not_an_array(label, obj)


def _check_ndarray_subclass(a: np.ndarray, label: str, kind: str = "a numpy.ma.MaskedArray") -> None:
    """Refuse the NumPy subclasses whose arithmetic differs from ndarray's.

    ``numpy.ma.MaskedArray``: its reductions skip masked entries but divide by the full count
    (``np.sum(..., out=)`` dispatches to ``MaskedArray.sum``), while the reference and the
    compiled kernels read the raw data, so each path would give a different answer.
    ``numpy.matrix``: ``*`` is a matrix product and indexing keeps two dimensions (today
    array_api_compat already counts it as no array at all, see :func:`not_an_array`).  Other
    subclasses (``numpy.memmap``, ...) compute like ndarray and pass.  Only reached for
    subclasses, so plain arrays pay one ``type`` comparison.
    """
    ma = sys.modules.get("numpy.ma")  # not imported: no MaskedArray can exist
    if ma is not None and isinstance(a, ma.MaskedArray):
        raise TypeError(
            f"{label} is {kind}, which mmfuse does not take: its mask would be "
            "honoured by some code paths and ignored by others. Pass a plain array "
            "(numpy.ma.getdata(x), or x.filled(value)) and mark missing entries with the "
            "operation's mask / masks / present argument"
        )
    if isinstance(a, np.matrix):  # array_api_compat refuses it before this; in case that changes
        raise not_an_array(label, a)


def namespace_name(xp: Namespace) -> str:
    """A short human name for a namespace (``"numpy"``, ``"torch"``, ``"jax.numpy"``,
    ``"dask.array"``, ...): array_api_compat's wrappers named as what they wrap."""
    name: str = getattr(xp, "__name__", repr(xp))
    prefix = "array_api_compat."
    return name[len(prefix) :] if name.startswith(prefix) else name


def _named(*names: str) -> Callable[[Namespace], bool]:
    """A test of a namespace by its module name, as array_api_compat's ``is_*_namespace``
    tests it (they never import the framework), without their ``functools.lru_cache``:
    ``torch.compile`` warns at every cached function it traces, and the public functions'
    checks run under it.  The core asks these several times per call."""
    wanted = frozenset(names)

    def test(xp: Namespace) -> bool:
        return getattr(xp, "__name__", None) in wanted

    return test


_COMPAT = array_api_compat.__name__
is_numpy = _named("numpy", f"{_COMPAT}.numpy")
is_torch = _named("torch", f"{_COMPAT}.torch")
is_jax = _named("jax.numpy", "jax.experimental.array_api")
is_dask = _named("dask.array", f"{_COMPAT}.dask.array")
is_cupy = _named("cupy", f"{_COMPAT}.cupy")


# Python's own containers and scalars: never arrays (array_api_compat says so too)
_NOT_ARRAYS = frozenset({list, tuple, dict, str, bytes, int, float, complex, bool, type(None)})


def is_array(obj: Any) -> bool:
    """``array_api_compat.is_array_api_obj(obj)``, answered by type for NumPy arrays, torch
    tensors and Python's containers and scalars: the same answers, without array_api_compat's
    ``lru_cache``-d class tests, at which ``torch.compile`` warns every time it traces a
    public function's checks."""
    kind = type(obj)
    if kind is np.ndarray:
        return True
    if kind in _NOT_ARRAYS:
        return False
    # (not imported, or still being imported by another thread without its Tensor class yet:
    # no tensor can exist; see half_imported)
    tensor = getattr(sys.modules.get("torch"), "Tensor", None)
    if tensor is not None and isinstance(obj, tensor):
        return True
    if callable(obj) and not hasattr(obj, "__array_namespace__"):
        # a function or a module (a Wander activation, in the arguments a 16-bit call widens):
        # no array library's arrays are callable (Dynamo warned at the class tests below)
        return False
    return bool(array_api_compat.is_array_api_obj(obj))


def is_lazy(x: Array) -> bool:
    """True for arrays whose values are not known until computed (Dask, traced JAX)."""
    if type(x) is np.ndarray:
        return False
    tensor = getattr(sys.modules.get("torch"), "Tensor", None)  # (as is_array's)
    if tensor is not None and isinstance(x, tensor):
        # array_api_compat's answer for every tensor, without its lru_cache'd class test,
        # which Dynamo traces through with a warning (the core under a compiled layer in a
        # torch.func transform)
        return False
    return bool(array_api_compat.is_lazy_array(x))


# Batch blocks keep a CPU's intermediates in its caches.  An accelerator has no cache of that
# size to fit, and every block costs a few kernel launches (tens of microseconds each from
# Python), so there a block only bounds the memory held: this many bytes.  With the CPU budgets
# the torch ops ran 6-15x slower than one-shot torch code on an H100 (benchmarks/RESULTS.md).
ACCELERATOR_BLOCK_BYTES = 1 << 28


def half_imported(module: Any) -> bool:
    """Whether ``module``, an entry of ``sys.modules``, is still being imported: another thread
    imports it, and it sits in ``sys.modules`` from the start, so the names it has not yet
    defined raise AttributeError.  None of its arrays can exist before its import ends, so a
    call made meanwhile takes it as not imported where it reads the framework for any call
    (torch's state when planning, JAX's Tracer class): every NumPy call had failed while
    another thread imported torch or JAX (a review's find)."""
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def torch_intercepts(torch: Any) -> bool:
    """Whether something intercepts or records torch operations now (``torch`` the imported
    module): Dynamo tracing, a TorchDispatchMode (fake tensors, export, logging modes), or
    ``torch.jit.trace``, which records dispatched operators only.  There the custom ops must
    be called as ops, and nothing may read the tensors' memory behind torch's back (NumPy, a
    kernel launch): it would run on fake data, or leave nothing in a traced graph.

    Also in the frames a compiled call runs eagerly at a graph break (:func:`_dynamo_frame_hook`),
    where ``is_compiling()`` says False: what is decided there (a plan, an implementation) is
    used by the frame Dynamo traces next.  A graph break inside a compiled call's planning had
    chosen the NumPy path or the reference there, which Dynamo then traced on fake tensors
    and failed (a compiled zoom_shift or align after a configuration change, or under
    ``prefer="reference"``; a review's find)."""
    return bool(
        torch.compiler.is_compiling() or _dynamo_frame_hook(torch) or torch._C._len_torch_dispatch_stack()
        or jit_tracing(torch)
    )  # fmt: skip


def torch_values_hidden(torch: Any) -> bool:
    """Whether a copy of torch tensors' values now would be wrong, not merely unseen
    (:func:`torch_intercepts` says more: any dispatch mode, a counting or logging one too):
    Dynamo traces, or runs a compiled call's frames eagerly, ``torch.jit.trace`` or
    ``make_fx`` records (a copy is no operator, so the trace keeps the values as constants),
    or torch's fake or functional tensors are made (they have none): one of torch's own
    tracing modes (``FakeTensorMode``, the proxy mode of ``make_fx`` and export, the
    functionalization of AOTAutograd) is active.  A mode of the caller's is taken as one
    that observes (``FlopCounterMode``, logging)."""
    if torch.compiler.is_compiling() or _dynamo_frame_hook(torch) or jit_tracing(torch):
        return True
    keys = getattr(torch._C, "_TorchDispatchModeKey", None)
    if keys is None:
        return False
    return any(torch._C._get_dispatch_mode(key) is not None for key in _tracing_mode_keys(keys))


def _tracing_mode_keys(keys: Any) -> list[Any]:
    """torch's own tracing modes among its dispatch-mode keys (those this torch has)."""
    return [key for name in ("FAKE", "PROXY", "FUNCTIONAL") if (key := getattr(keys, name, None)) is not None]


def is_torch_tensor(x: Any) -> bool:
    """Whether ``x`` is a torch tensor (False while torch is not imported, or is still being
    imported by another thread without its Tensor class yet: none can exist; see
    :func:`half_imported`)."""
    tensor = getattr(sys.modules.get("torch"), "Tensor", None)
    return tensor is not None and isinstance(x, tensor)


def tensor_memory(a: Any) -> Any:
    """A torch CPU tensor's memory as a NumPy array (no copy, but for a tensor with the
    negative bit, which ``numpy()`` refuses: resolved into a copy); None stays None.  Detached
    only where it requires grad, and resolved only where it has the bit: each is a tensor made
    and dispatched, about a microsecond of a tiny call's four views."""
    if a is None:
        return None
    if a.requires_grad:
        a = a.detach()
    return (a.resolve_neg() if a.is_neg() else a).numpy()


def python_dispatched(torch: Any, tensors: Any) -> bool:
    """Whether any of the ``tensors`` is of a class that runs its operations in Python (its
    own ``__torch_dispatch__``): torch's fake tensors (also after their mode has exited),
    wrapper subclasses (``TwoTensor``, ``MaskedTensor``, ``DTensor``) and logging tensors.
    Their memory, where they have any, is not their values (``Tensor.numpy()`` refuses them):
    they compute through torch's operators only, nothing may read their memory (a wrapper's
    NumPy copy was uninitialised memory; a review's find).  Plain subclasses (``Parameter``,
    ones overriding ``__torch_function__`` only) keep the plain tensor's dispatch."""
    plain = torch._C._disabled_torch_dispatch_impl
    return any(getattr(type(t), "__torch_dispatch__", plain) is not plain for t in tensors)


def fake_tensors(torch: Any, tensors: Any) -> bool:
    """Whether any of the ``tensors`` is one of torch's fake tensors (shapes without values),
    also after its ``FakeTensorMode`` has exited."""
    fake = sys.modules.get("torch._subclasses.fake_tensor")  # (none exist before it loads)
    return fake is not None and any(isinstance(t, fake.FakeTensor) for t in tensors)


# torch's getter of Dynamo's frame hook (None: a torch without it), looked up once
_FRAME_HOOK_GETTER: list[Any] = []


def _dynamo_frame_hook(torch: Any) -> bool:
    """Whether Dynamo's frame hook is set: from a ``torch.compile``-d function's start to its
    end, but for the compiled graphs' own runs (and ``torch.compiler.disable``-d code), so in
    the frames it runs eagerly at graph breaks; never in plain eager code.  (Not traceable by
    Dynamo, so asked only after ``is_compiling()``, which is True where it traces.)"""
    if not _FRAME_HOOK_GETTER:
        eval_frame = getattr(getattr(torch._C, "_dynamo", None), "eval_frame", None)
        _FRAME_HOOK_GETTER.append(getattr(eval_frame, "get_eval_frame_callback", None))
    getter = _FRAME_HOOK_GETTER[0]
    return getter is not None and getter() is not None


def traced_by_dynamo(x: Any) -> bool:
    """Whether ``x`` is a tensor seen by ``torch.compile``'s tracer (isinstance: Dynamo
    traces it; its is_compiling is True only there)."""
    tensor = getattr(sys.modules.get("torch"), "Tensor", None)  # (as is_array's)
    return tensor is not None and isinstance(x, tensor) and bool(sys.modules["torch"].compiler.is_compiling())


def jit_tracing(torch: Any) -> bool:
    """Whether ``torch.jit.trace`` records now (``torch`` the imported module).  Besides what
    :func:`torch_intercepts` says of it, the tracer cannot record an op taking a list of
    optional tensors (the ``align`` and ``sequence_fusion`` ops' masks: "unsupported input
    list type: Tensor?"), so those run the core's algorithm in torch operations there, which
    it records (the same algorithm, differentiated by autograd)."""
    return torch._C._get_tracing_state() is not None


def widens_float32(xp: Namespace, like: Array) -> bool:
    """Whether a float32 computation on arrays like ``like`` runs in float64, rounded once:
    ``like`` is float32 and its device has float64 (:func:`has_float64`)."""
    if like.dtype != xp.float32:
        return False
    return type(like) is np.ndarray or has_float64(xp, device_of(like))


def has_float64(xp: Namespace, device: Any) -> bool:
    """Whether arrays of namespace ``xp`` on ``device`` can be float64 (the one answer to it):
    not torch tensors on Apple's MPS, nor JAX outside its 64-bit mode (which would keep float32
    silently: asked as the initialisers' :func:`mmfuse._validation.check_jax_width` asks);
    elsewhere the standard's inspection API says, for ``device`` (array-api-strict has a device
    without float64)."""
    if is_numpy(xp):
        return True
    if is_jax(xp):
        return bool(sys.modules["jax"].dtypes.canonicalize_dtype(np.float64) == np.float64)
    if is_torch(xp):  # (a torch.device, or its name: "mps", "mps:0")
        return str(getattr(device, "type", device)).split(":")[0] != "mps"
    return _inspected_dtype(xp, device, "float64", "real floating")


def has_int64(xp: Namespace, device: Any) -> bool:
    """Whether arrays of namespace ``xp`` on ``device`` can be int64 (the datasets' labels):
    not JAX outside its 64-bit mode (which would keep int32); elsewhere the standard's
    inspection API says, for ``device`` (array-api-strict has a device without 64-bit
    types)."""
    if is_numpy(xp) or is_torch(xp):
        return True
    if is_jax(xp):
        return bool(sys.modules["jax"].dtypes.canonicalize_dtype(np.int64) == np.int64)
    return _inspected_dtype(xp, device, "int64", "signed integer")


def _inspected_dtype(xp: Namespace, device: Any, name: str, kind: str) -> bool:
    """Whether the standard's inspection API lists dtype ``name`` (of ``kind``) for ``device``;
    True where it cannot say (a namespace before the 2023.12 standard, where float64 and int64
    are required, or an inspection API that cannot answer for this device)."""
    info = getattr(xp, "__array_namespace_info__", None)
    if info is None:
        return True
    try:
        return name in info().dtypes(device=device, kind=kind)
    except Exception:
        return True


def on_accelerator(x: Array) -> bool:
    """Whether ``x`` lives on an accelerator (a CuPy array, a torch tensor off the CPU)."""
    if array_api_compat.is_cupy_array(x):
        return True
    tensor = getattr(sys.modules.get("torch"), "Tensor", None)  # (as is_array's)
    return tensor is not None and isinstance(x, tensor) and x.device.type not in ("cpu", "meta")


def mask_tokens(xp: Namespace, x: Array, mask: Array | None) -> Array:
    """``x`` (B, T, ...) with the tokens where ``mask`` (B, T) is False set to 0, by ``where``
    (a new array), so NaN or inf padding never leaks; ``x`` itself when ``mask`` is None."""
    if mask is None:
        return x
    zero = xp.zeros((), dtype=x.dtype, device=pinned_device(x))
    return xp.where(xp.reshape(mask, (*mask.shape, *(1,) * (x.ndim - mask.ndim))), x, zero)


def is_host_device(device: Any) -> bool:
    """Whether ``device`` names the CPU however spelt: ``"cpu"`` (any case), ``"cpu:0"``,
    ``torch.device("cpu")``, a JAX CPU device, array_api_strict's ``CPU_DEVICE``."""
    if isinstance(device, str):
        return device.lower() in ("cpu", "cpu:0")
    if getattr(device, "type", None) == "cpu":  # torch.device: the CPU is one device
        return getattr(device, "index", None) in (None, 0)
    if getattr(device, "platform", None) == "cpu":  # JAX
        return True
    return repr(device).endswith("('CPU_DEVICE')")  # array_api_strict


def dask_devices() -> tuple[Any, ...]:
    """The devices array_api_compat's Dask namespace lists (its ``DASK_DEVICE`` among them,
    which its own ``asarray`` takes)."""
    import array_api_compat.dask.array as compat_dask

    return tuple(compat_dask.__array_namespace_info__().devices())


def check_host_device(device: Any) -> None:
    """NumPy arrays live on the CPU: refuse any other ``device`` (None and the CPU pass)."""
    if device is not None and not is_host_device(device):
        raise ValueError(f"device={device!r}: NumPy arrays live on the CPU only; pass another xp")


def _host_device_of(xp: Namespace, device: Any) -> Any:
    """The string ``"cpu"`` as namespace ``xp``'s own CPU device where it has one under another
    name (a JAX CPU device, whatever the default backend; array_api_strict's ``CPU_DEVICE``),
    so that ``device="cpu"`` means the CPU in every namespace; anything else unchanged."""
    if not (isinstance(device, str) and is_host_device(device)) or is_torch(xp) or is_dask(xp):
        return device
    if is_jax(xp):  # its info() lists the default backend's devices only (a GPU machine: no CPU)
        import jax

        return jax.devices("cpu")[0]
    info = getattr(xp, "__array_namespace_info__", None)
    try:
        devices = () if info is None else info().devices()
    except RuntimeError:  # array_api_strict before the 2023.12 standard, which has no info()
        devices = ()
    for candidate in devices:
        if is_host_device(candidate):
            return candidate
    strict = sys.modules.get("array_api_strict")
    if strict is not None and namespace_name(xp) == "array_api_strict":
        return strict.Device("CPU_DEVICE")  # its name for the host (no public constant)
    return device  # no CPU device (CuPy): the namespace's own error names it


def native_dtype(dtype: Any) -> Any:
    """A NumPy dtype in native byte order (``>f8`` is float64 read from a big-endian file: the
    same numbers, which NumPy's operations mix freely, but which its reductions refuse as
    ``dtype=``); other libraries' dtypes as they are."""
    if isinstance(dtype, np.dtype) and not dtype.isnative:
        return dtype.newbyteorder("=")
    return dtype


def in_native_order(func: Callable[..., Any], arrays: Sequence[Any]) -> Callable[..., Any]:
    """``func`` itself, or, where a NumPy array among ``arrays`` is in non-native byte order
    (``>f8`` read from a big-endian file), ``func`` with its NumPy array arguments (also
    inside lists) copied to native order first: NumPy's own operations return native
    results, and the alignment's buffers followed their input (``>f8`` statistics and maps,
    where the fusions returned native float64).  Chosen once, when a call is planned.  Also
    for ndarray subclasses (``np.memmap`` of such a file: a type test for ndarray itself had
    passed it through, and ``align`` returned one ``>f4`` and one ``<f4`` modality; a review's
    find), copied into plain ndarrays."""
    if not any(isinstance(a, np.ndarray) and not a.dtype.isnative for a in arrays):
        return func

    def native(a: Any) -> Any:
        if isinstance(a, np.ndarray) and not a.dtype.isnative:
            return np.asarray(a, dtype=native_dtype(a.dtype))
        return [native(v) for v in a] if isinstance(a, list) else a

    def call(*args: Any, **kwargs: Any) -> Any:
        return func(*(native(a) for a in args), **{k: native(v) for k, v in kwargs.items()})

    return call


def work_dtype(xp: Namespace, dtype: Any) -> Any:
    """The dtype to compute in: float32 for float16 / bfloat16 (their range and precision are
    too small for sums and products of many terms), else ``dtype`` itself."""
    return dtype if xp.finfo(dtype).bits >= 32 else xp.float32


_LOW_PRECISION: dict[tuple[type, Any], bool] = {}


def low_precision(xp: Namespace, dtype: Any) -> bool:
    """Whether ``dtype`` computes in a wider one (:func:`work_dtype`); kept by dtype (``finfo``
    costs about a microsecond, a twentieth of a tiny fusion).  Keyed by the dtype's type first,
    so that dtypes of two libraries are never compared (array_api_strict warns).

    NumPy's and torch's dtypes (JAX's, CuPy's and Dask's are NumPy's) answer from their
    ``itemsize`` (a float's bits are 8 times it) without the table: Dynamo guarded a traced
    layer's graph on the table not holding its dtype, which the trace itself then added, so
    a process's first compiled call compiled twice (a review's find)."""
    size = getattr(dtype, "itemsize", None)
    if size is not None:
        return bool(size < 4)
    key = (type(dtype), dtype)
    low = _LOW_PRECISION.get(key)
    if low is None:
        low = _LOW_PRECISION[key] = bool(work_dtype(xp, dtype) != dtype)
    return low


def in_work_dtype(func: Callable[..., Any], xp: Namespace, dtype: Any, *args: Any, **kwargs: Any) -> Any:
    """``func(*args, **kwargs)`` computed in :func:`work_dtype` of ``dtype``, rounded once back
    to ``dtype`` (:func:`computed_in`): how float16 / bfloat16 accumulate in float32 (a
    modality's projection, or a sum of squares, overflows float16's 65504 long before the
    result does).  A non-native NumPy ``dtype`` (">f2") is rounded to in native order, as
    NumPy's own operations return (:func:`native_dtype`; its ">f2" result was refused by
    ``torch.from_numpy``, where ">f4" and ">f8" inputs gave native ones: a review's find)."""
    return computed_in(func, xp, work_dtype(xp, dtype), native_dtype(dtype), *args, **kwargs)


def computed_in(
    func: Callable[..., Any], xp: Namespace, wide: Any, dtype: Any, *args: Any, **kwargs: Any
) -> Any:
    """``func(*args, **kwargs)`` with every floating array in ``wide`` (other arrays, masks
    say, as they are), the floating arrays of its result (an array, or arrays nested in
    lists, tuples and dicts beside other values) rounded once to ``dtype``
    (:func:`rounded_to`)."""
    args_up, kwargs_up = rounded_to(xp, wide, (args, kwargs))
    return rounded_to(xp, dtype, func(*args_up, **kwargs_up))


def rounded_to(xp: Namespace, dtype: Any, obj: Any) -> Any:
    """``obj`` with every floating array in it (nested in lists, tuples and dicts) cast to
    ``dtype``, other values as they are."""
    return tree_map(lambda a: xp.astype(a, dtype) if xp.isdtype(a.dtype, "real floating") else a, obj)


def block_budget(x: Array, host_bytes: int) -> int:
    """Bytes per batch block for arrays like ``x``: ``host_bytes`` (cache-sized) on the CPU,
    :data:`ACCELERATOR_BLOCK_BYTES` on an accelerator."""
    return ACCELERATOR_BLOCK_BYTES if on_accelerator(x) else host_bytes


def block_slices(batch: int, rows: int) -> list[slice]:
    """Consecutive batch blocks of ``rows`` samples (the last one may be shorter).

    An empty batch gets one empty block, so that code looping over blocks runs once and
    builds its (empty) results the way it does for any other batch, rather than finding no
    block at all (an empty list to concatenate, a zero step, a max over nothing).
    """
    if batch == 0:
        return [slice(0, 0)]
    return [slice(start, min(start + rows, batch)) for start in range(0, batch, rows)]


def device_of(x: Array) -> Any:
    """``x``'s device: what the checks compare and the registry's conditions read; None where
    there is no single one (a traced JAX value, a JAX array sharded over several devices).
    Constants for computations with ``x`` take :func:`pinned_device`."""
    tensor = getattr(sys.modules.get("torch"), "Tensor", None)  # (as is_array's)
    if tensor is not None and isinstance(x, tensor):
        return x.device  # what array_api_compat.device returns, without its generic dispatch
    device = array_api_compat.device(x)
    # A JAX array sharded over several devices reports its Sharding, whose partition spec
    # cannot place a constant of another shape (a 0-d one raised IndexError inside JAX), and
    # which differs between layouts JAX combines freely (a batch-sharded input, replicated
    # parameters).  No device: constants stay uncommitted, placed by the computation.
    if len(getattr(device, "device_set", ())) > 1:
        return None
    return device


def pinned_device(x: Array) -> Any:
    """The device ``x`` is bound to: :func:`device_of`, but None for a JAX array made without a
    device, which follows the committed arrays it meets, as in JAX's own operations.  What the
    device checks compare, and what constants for computations with ``x`` are created on (None:
    no device given, uncommitted, so they follow too: created on its default device they were
    committed there, and met parameters or masks committed elsewhere, or sharded, inside JAX
    ("incompatible devices"), and an all-uncommitted call returned a result committed to
    device 0; a review's find)."""
    if type(x) is not np.ndarray and committed(x) is False:
        return None
    return device_of(x)


def committed(x: Any) -> Any:
    """A JAX array's ``committed`` flag: False for one made without a device, which follows
    the committed arrays it meets, as in JAX's own operations (the device checks compare only
    the others, and the plan keys keep the flag: a plan made with an uncommitted array must
    not pass a committed one on another device); None for other arrays and for tracers,
    which raise for it (ConcretizationTypeError)."""
    try:
        return getattr(x, "committed", None)
    except Exception:
        return None


def device_key(device: Any) -> Any:
    """``device`` as it can enter a dict key (the registry's choices, the plan caches): the
    device itself, or, where it has no hash, its type and ``repr``.

    CuPy's ``cupy.cuda.Device`` defines equality but no hash, so a key holding it raised
    ``TypeError: unhashable type`` in the registry (every CuPy call failed) and made the
    plan caches skip every CuPy call.  The repr names the device ("<CUDA Device 0>").
    """
    try:
        hash(device)
    except TypeError:
        return (type(device), repr(device))
    return device


def _all_torch(arrays: list[Array]) -> Namespace | None:
    """array_api_compat's torch namespace when every array is a torch tensor, else None.

    The common case of the layers' per-step calls; it skips array_api_compat's generic
    per-array dispatch (tens of microseconds per call at small sizes), with the same answer:
    array_api_compat maps every ``torch.Tensor`` (subclasses included) to that namespace.
    """
    # (None: no torch, or one another thread is still importing, whose classes may not exist
    # yet; no tensor can exist before they do: NumPy calls failed with AttributeError
    # meanwhile, a review's find; see half_imported)
    tensor = getattr(sys.modules.get("torch"), "Tensor", None)
    if tensor is None or not all(isinstance(a, tensor) for a in arrays):
        return None
    return _OURS.get(_COMPAT_TORCH) or torch_namespace()


def torch_namespace() -> Namespace:
    """mmfuse's torch namespace (:func:`_torch_namespace`), built on first use (it imports
    torch): what :func:`array_namespace` returns for torch tensors, and what the torch
    backend's ops hand the core, so that one torch namespace object exists."""
    import array_api_compat.torch as compat_torch

    return _ours(compat_torch)


def _torch_namespace(base: Any, torch: Any) -> Namespace:
    """``array_api_compat.torch`` with ``reshape``, ``sum`` and ``matrix_transpose`` calling
    torch directly where array_api_compat would make that same call.

    The counterpart of :func:`_numpy_namespace`: array_api_compat's wrappers add about 0.5-1.5
    us a call (argument handling, and for ``matrix_transpose`` its namespace lookup), a few
    percent of a tiny sequence fusion, which calls them 7-12 times.  Each fast form is taken
    only for the arguments where array_api_compat's own code path ends in the same torch call
    (``reshape`` without ``copy=``, ``sum`` over one int axis without ``dtype=``,
    ``matrix_transpose`` of a tensor of at least two dimensions); the rest go to
    array_api_compat.
    """
    tensor = torch.Tensor
    torch_sum, torch_reshape, swapaxes = torch.sum, torch.reshape, torch.swapaxes
    compat_sum, compat_reshape, compat_transpose = base.sum, base.reshape, base.matrix_transpose

    def reshape(x: Any, /, shape: Any, *, copy: Any = None, **kwargs: Any) -> Any:
        if copy is None and not kwargs:
            return torch_reshape(x, shape)
        return compat_reshape(x, shape, copy=copy, **kwargs)

    def sum(x: Any, /, *, axis: Any = None, dtype: Any = None, keepdims: bool = False, **kwargs: Any) -> Any:
        if type(axis) is int and dtype is None and not kwargs:
            return torch_sum(x, axis, keepdim=keepdims)
        return compat_sum(x, axis=axis, dtype=dtype, keepdims=keepdims, **kwargs)

    def matrix_transpose(x: Any, /) -> Any:
        if isinstance(x, tensor) and x.ndim >= 2:
            return swapaxes(x, -1, -2)
        return compat_transpose(x)

    return _namespace_with(base, reshape=reshape, sum=sum, matrix_transpose=matrix_transpose)


def to_numpy(x: Array, dtype: Any = np.float64) -> np.ndarray:
    """Copy ``x`` into a new NumPy array (detaching torch tensors, leaving ``x`` untouched).

    ``dtype=None`` keeps ``x``'s dtype, except that bfloat16 and the float8 types (which NumPy
    lacks: torch's, and JAX's or NumPy's through ml_dtypes) come back as float32, which holds
    every value of those types exactly.
    """
    out = _to_numpy(x, dtype)
    if dtype is None and out.dtype.kind == "V" and out.dtype.name.startswith(("bfloat16", "float8")):
        # ml_dtypes' floats have NumPy kind "V": no comparison or reduction treats them as numbers
        return out.astype(np.float32)
    return out


def _to_numpy(x: Array, dtype: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return np.array(x, dtype=dtype, copy=True)
    tensor = getattr(sys.modules.get("torch"), "Tensor", None)  # (as is_array's)
    if tensor is not None and isinstance(x, tensor):
        # the negative and conjugate bits resolved: DLPack exports the raw memory without them
        # (a torch._neg_view tensor came back negated)
        x = x.detach().cpu().resolve_neg().resolve_conj()
        if x.dtype == sys.modules["torch"].bfloat16 or (x.dtype.is_floating_point and x.dtype.itemsize == 1):
            # neither DLPack to NumPy nor __array__ take bfloat16 or the float8 types; float32
            # holds their values exactly (as JAX's, through ml_dtypes, below)
            x = x.float()
    elif array_api_compat.is_cupy_array(x):
        x = x.get()
    elif hasattr(x, "compute") and array_api_compat.is_dask_array(x):
        x = x.compute()
    try:
        return np.array(np.from_dlpack(x), dtype=dtype, copy=True)
    except (TypeError, AttributeError, BufferError, RuntimeError, ValueError):
        # ValueError: array_api_strict at a standard version before 2023.12 refuses the
        # max_version NumPy passes to __dlpack__; its __array__ still copies, from its CPU
        # device only (an array on another of its devices is moved there first)
        device = getattr(x, "device", None)
        if device is not None and not is_host_device(device) and hasattr(x, "to_device"):
            x = x.to_device(_host_device_of(array_namespace(x), "cpu"))
        return np.array(x, dtype=dtype, copy=True)


def from_numpy(a: np.ndarray, xp: Namespace, *, dtype: Any = None, device: Any = None) -> Array:
    """Move a NumPy array into namespace ``xp`` (on ``device``, as ``dtype``; a wider float
    array rounded once to a 16-bit ``dtype``: :func:`rounded_once_for`).

    Raises
    ------
    ValueError
        If ``xp`` is NumPy and ``device`` is neither None nor ``"cpu"`` (NumPy arrays only
        live on the CPU).
    """
    if is_numpy(xp):
        check_host_device(device)
        return np.asarray(a, dtype=dtype)
    a = rounded_once_for(a, dtype)
    if is_cupy(xp):
        # CuPy's own asarray takes no device argument; array_api_compat's wrapper of it does
        import array_api_compat.cupy as xp
    elif is_dask(xp):  # dask.array's too (xp=dask.array passed by a user)
        # one chunk, as the docs say of the reference backend's results (the initialisers'
        # parameters and the data sets are small; make_inputs says so): asarray chunks by
        # dask's "array.chunk-size" (a result of 300000 x 8 x 8 came back in two batch chunks;
        # a review's find), and its automatic chunking divides by zero on some empty shapes
        # (an empty batch's interaction terms)
        import dask.array as da

        return da.from_array(np.asarray(a, dtype=dtype), chunks=-1)
    return xp.asarray(a, dtype=dtype, device=_host_device_of(xp, device))


def rounded_once_for(a: np.ndarray, dtype: Any) -> np.ndarray:
    """``a`` prepared in NumPy so that another namespace's conversion to the 16-bit float
    ``dtype`` rounds it once, correctly; other arrays and dtypes as they are.

    torch converts float64 to float16 and bfloat16 through float32, rounding twice: about one
    value in 20000 came out an ulp off the nearest (the initialisers' "same draw in every
    namespace" failed for torch's 16-bit dtypes, and the reference backend's 16-bit results
    were not its float64 answers correctly rounded; a review's find).  float16 is rounded by
    NumPy itself (correctly), then passed on exactly; for bfloat16, which NumPy lacks, a
    float32 rounded to odd (:func:`_float32_rounded_to_odd`) is passed, whose rounding to
    bfloat16's 8 bits is the correct rounding of ``a`` (Boldo and Melquiond, "Emulation of FMA
    and correctly rounded sums: proved algorithms using rounding to odd", IEEE TC 57, 2008).
    """
    if dtype is None or a.dtype.kind != "f" or a.dtype.itemsize <= 4:
        return a
    try:  # NumPy's and JAX's dtypes and scalar types (np.float16, jnp.bfloat16: classes)
        name = np.dtype(dtype).name
    except TypeError:  # torch.float16, torch.bfloat16, ...
        name = str(dtype)
    # (past the range: infinity, as the conversion gives; a signalling NaN: a NaN, quietly)
    with np.errstate(over="ignore", invalid="ignore"):
        if name.endswith("bfloat16"):
            return _float32_rounded_to_odd(a)
        if name.endswith("float16"):
            return np.asarray(a, dtype=np.float16)
    return a


def _float32_rounded_to_odd(a: np.ndarray) -> np.ndarray:
    """``a`` (float64) rounded to float32 by rounding to odd: truncated toward zero, and the
    last bit set where that lost anything.  Infinities, NaN and exact values as they are; a
    finite value past float32's range goes to infinity, as every later rounding of it would."""
    t = np.asarray(a).astype(np.float32)  # (asarray: a NumPy scalar, too, comes back an array)
    with np.errstate(invalid="ignore"):
        lost = np.isfinite(t) & (t != a)
        over = lost & (np.abs(t.astype(np.float64)) > np.abs(a))
    t[over] = np.nextafter(t[over], np.float32(0))
    bits = t.view(np.uint32)
    bits[lost] |= np.uint32(1)
    return t


def real_floating(xp: Namespace, dtype: Any) -> bool:
    """Whether ``dtype`` is a real floating dtype of ``xp``: False also for a dtype the
    namespace does not know (``np.isdtype`` refuses ml_dtypes' bfloat16 in a NumPy array with
    its own TypeError, which named no argument)."""
    try:
        return bool(xp.isdtype(dtype, "real floating"))
    except TypeError:
        return False


def first_floating(obj: Any) -> Any:
    """The first array of a real floating dtype inside nested lists, tuples and dicts (the
    array a call's namespace, device and dtype are read from: not a mask or an index array
    that comes first), or None."""
    return first_of(obj, lambda a: a if real_floating(array_namespace(a), a.dtype) else None)


def first_of(obj: Any, pick: Callable[[Any], Any]) -> Any:
    """The first ``pick(a)`` that is not None over the arrays ``a`` inside nested lists, tuples
    and dicts (in :func:`tree_map`'s order), or None; ``pick`` is not called past it."""
    found: list[Any] = []

    def visit(a: Any) -> Any:
        if not found and (value := pick(a)) is not None:
            found.append(value)
        return a

    tree_map(visit, obj)
    return found[0] if found else None


def tree_map(func: Callable[[Any], Any], obj: Any) -> Any:
    """Apply ``func`` to every array inside nested lists, tuples and dicts (same structure back).

    A namedtuple comes back as its own type, built from its fields positionally (its
    constructor takes them so; built from one iterable, as a tuple or TensorLy's CPTensor is,
    it had raised: modalities in a namedtuple, which the operators take, crashed the reference
    backend and ``explain``; a mutation review's find)."""
    if is_array(obj):
        return func(obj)
    if isinstance(obj, (list, tuple)):
        items = [tree_map(func, o) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, dict):
        return {k: tree_map(func, v) for k, v in obj.items()}
    return obj
