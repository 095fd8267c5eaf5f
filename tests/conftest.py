"""The ``xp`` fixture: every test runs on each array namespace mmfuse promises to support.

Parameters: numpy, read-only numpy, array_api_strict, torch CPU, and (skipped when absent)
cupy and torch CUDA.  ``MMFUSE_TEST_BACKENDS=numpy,torch`` narrows the set.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from hypothesis import settings

# Without a GPU the Triton backend's kernels run under Triton's interpreter on CPU tensors,
# which must be chosen before triton is first imported (by any test, or by torch): so that
# tests/test_triton.py and the registry's parity matrix check the kernels in one session
# (the README's test command), the variable is set for the whole session where no NVIDIA
# driver is installed.  Where one is, the compiled kernels are what tests should check.
if "TRITON_INTERPRET" not in os.environ and shutil.which("nvidia-smi") is None:
    os.environ["TRITON_INTERPRET"] = "1"

# CI (CI=true) draws the same inputs for the property tests on every run, so that whether a
# submission lands never hinges on one unlucky draw; runs elsewhere keep drawing fresh ones
# (which is how the cancellation case in test_fusion.py's tolerances was found).
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI", "").lower() in ("1", "true"):
    settings.load_profile("ci")


@dataclass
class Namespace:
    """How a test makes arrays of one namespace from NumPy data."""

    name: str
    xp: Any
    device: Any = None
    readonly: bool = False
    made: list[tuple[Any, np.ndarray]] = field(default_factory=list)

    def dtype(self, name: str) -> Any:
        return getattr(self.xp, name)

    def asarray(self, a: Any, dtype: str | None = "float64") -> Any:
        """``a`` in this namespace; floating data cast to ``dtype``, booleans kept."""
        a = np.asarray(a)
        if a.dtype != np.bool_ and dtype is not None:
            a = a.astype(dtype)
        if self.name.startswith("numpy"):
            out = np.array(a, copy=True)
            if self.readonly:
                out.setflags(write=False)
        elif self.device is None:  # CuPy's own asarray takes no device argument
            out = self.xp.asarray(np.array(a, copy=True))
        else:
            out = self.xp.asarray(np.array(a, copy=True), device=self.device)
        self.made.append((out, np.array(a, copy=True)))
        return out

    def assert_untouched(self) -> None:
        """Every array this namespace made still holds its original values."""
        from mmfuse._namespace import to_numpy

        for arr, original in self.made:
            np.testing.assert_array_equal(to_numpy(arr, dtype=None), original)
        self.made.clear()


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _cuda_torch() -> bool:
    if not _have("torch"):
        return False
    import torch

    return bool(torch.cuda.is_available())


def _cupy() -> bool:
    if not _have("cupy"):
        return False
    try:
        import cupy

        return bool(cupy.cuda.runtime.getDeviceCount() > 0)
    except Exception:
        return False


def _make(name: str) -> Namespace:
    if name in ("numpy", "numpy-readonly"):
        return Namespace(name, np, readonly=name == "numpy-readonly")
    if name == "array_api_strict":
        import array_api_strict

        return Namespace(name, array_api_strict)
    if name == "torch":
        import torch

        return Namespace(name, torch, device="cpu")
    if name == "torch-cuda":
        import torch

        return Namespace(name, torch, device="cuda")
    if name == "cupy":
        import cupy

        return Namespace(name, cupy)
    raise ValueError(name)


_AVAILABLE = {
    "numpy": lambda: True,
    "numpy-readonly": lambda: True,
    "array_api_strict": lambda: _have("array_api_strict"),
    "torch": lambda: _have("torch"),
    "cupy": _cupy,
    "torch-cuda": _cuda_torch,
}


def _selected() -> list[str]:
    wanted = os.environ.get("MMFUSE_TEST_BACKENDS")
    names = list(_AVAILABLE)
    if wanted:
        names = [n.strip() for n in wanted.split(",") if n.strip()]
        unknown = set(names) - set(_AVAILABLE)
        if unknown:
            raise ValueError(f"MMFUSE_TEST_BACKENDS: unknown {sorted(unknown)}; known {list(_AVAILABLE)}")
    return names


@pytest.fixture(scope="session", params=_selected())
def xp(request: pytest.FixtureRequest) -> Namespace:
    name = request.param
    if not _AVAILABLE[name]():
        pytest.skip(f"{name} is not available here")
    return _make(name)


@pytest.fixture(scope="session", params=["float32", "float64"])
def dtype(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """A fresh generator per test, seeded from the test's id so failures reproduce."""
    import zlib

    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def call_counts(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``call_counts(module, name)`` wraps ``module.name`` for the test so that its calls are
    counted; ``call_counts.calls`` maps each wrapped name to its count (which form of an
    operator a size rule chose)."""
    import collections

    calls: collections.Counter[str] = collections.Counter()

    def wrap(module: Any, name: str) -> None:
        fn = getattr(module, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return fn(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    wrap.calls = calls  # type: ignore[attr-defined]
    return wrap


@pytest.fixture
def custom_align_ops(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Planned ``zoom_shift`` and ``align`` calls that autograd records take the torch
    backend's custom ops at every size (``mmfuse.backends.torch.zoom_shift.AUTOGRAD_CORE_ELEMENTS``;
    small CPU ones otherwise run the core under autograd): for tests of the ops' backwards
    through the public functions.  The rule is read when a call is planned, so the public
    functions' plans are forgotten before and after the test."""
    import importlib

    import mmfuse._align as align_api

    def forget() -> None:
        align_api._ZOOM_SHIFT_PLANS.clear()
        align_api._ALIGN_PLANS.clear()

    forget()
    monkeypatch.setattr(importlib.import_module("mmfuse.backends.torch.zoom_shift"), "AUTOGRAD_CORE_ELEMENTS", -1)
    yield
    forget()  # (the constant itself is restored by monkeypatch's own teardown, after this)


@pytest.fixture
def blocked_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fusions of any size take the paths they take for large problems: NumPy's blocked
    buffers, torch's custom ops (``mmfuse._core.fusion.WHOLE_BATCH_ELEMENTS`` and
    ``NUMPY_WHOLE_BATCH_ROWS``,
    ``mmfuse.backends.torch.wander.WHOLE_BATCH_ROWS``,
    ``mmfuse.backends.torch.lowrank.PLAIN_ELEMENTS`` and ``FORWARD_WHOLE_BATCH_ROWS``,
    ``mmfuse.backends.torch.sequence.CORE_ROWS``, and off the CPU the accelerator
    bounds).  For tests of those paths on small
    inputs: small problems otherwise run whole-batch (rank-major low-rank fusion; on torch, the
    core under autograd for CP fusion and the Wander adapter)."""
    import mmfuse._core.fusion as core_fusion

    monkeypatch.setattr(core_fusion, "WHOLE_BATCH_ELEMENTS", -1)
    monkeypatch.setattr(core_fusion, "NUMPY_WHOLE_BATCH_ROWS", -1)
    import importlib

    try:  # the module (the package's attribute of that name is the function)
        torch_wander = importlib.import_module("mmfuse.backends.torch.wander")
    except ImportError:  # no torch: nothing else to pin
        return
    monkeypatch.setattr(torch_wander, "WHOLE_BATCH_ROWS", -1)
    monkeypatch.setattr(torch_wander, "ACCELERATOR_SMALL_ELEMENTS", -1)  # (off the CPU)
    torch_lowrank = importlib.import_module("mmfuse.backends.torch.lowrank")
    monkeypatch.setattr(torch_lowrank, "ACCELERATOR_WHOLE_BATCH_ELEMENTS", -1)
    monkeypatch.setattr(torch_lowrank, "PLAIN_ELEMENTS", -1)
    monkeypatch.setattr(torch_lowrank, "FORWARD_WHOLE_BATCH_ROWS", -1)
    monkeypatch.setattr(importlib.import_module("mmfuse.backends.torch.sequence"), "CORE_ROWS", -1)
    monkeypatch.setattr(importlib.import_module("mmfuse.backends.torch.cp"), "AUTOGRAD_ON_CPU", False)
