"""Config precedence, the backend registry and import hygiene."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pytest

import mmfuse
from mmfuse import _config
from mmfuse._core import align as core_align
from mmfuse._core import fusion as core_fusion
from mmfuse.backends import BackendUnsupported, available, explain, lookup, register, unregister
from mmfuse.backends import reference as reference_backend


def _run(code: str, *argv: str, env: dict[str, str] | None = None) -> str:
    """``code`` run by a fresh Python (``argv`` its arguments; ``env`` over this process's
    environment, less ``MMFUSE_BACKEND``), which must succeed: its stdout, stripped."""
    import os

    full_env = {k: v for k, v in os.environ.items() if k != "MMFUSE_BACKEND"}
    full_env.update(env or {})
    res = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *argv], capture_output=True, text=True, env=full_env,
        timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def _broken_numba(tmp_path: Any, *, slow: bool = False) -> dict[str, str]:
    """The environment of a process whose ``numba`` is installed but fails at import, as numba
    refusing a newer NumPy does (a package of that name that raises; ``slow``: after a second)."""
    import os

    fake = tmp_path / "numba"
    fake.mkdir()
    wait = "import time\ntime.sleep(1)\n" if slow else ""
    (fake / "__init__.py").write_text(f'{wait}raise ImportError("Numba needs NumPy 2.3 or less")\n')
    return {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_numpy_calls_while_another_thread_imports_a_framework(framework):
    """sys.modules holds a module from the start of its import, so while another thread
    imported torch (or JAX) every NumPy call failed with "partially initialized module 'torch'
    has no attribute 'compiler'" (or 'jax' ... 'core'), reading the framework's state for any
    call (a review's find).  Such a framework is taken as not imported where no array of it
    can exist yet, or waited for where the call reads its state (planning), as an import
    statement waits; every call runs, with the values of a run without the import."""
    pytest.importorskip(framework)
    out = _run(
        f"""
        import threading, numpy as np, mmfuse
        rng = np.random.default_rng()
        x, g = rng.standard_normal((4, 5, 3)), rng.standard_normal((4, 6, 3))
        xs = [rng.standard_normal((4, 3)), rng.standard_normal((4, 2))]
        p = mmfuse.init_lowrank([3, 2], rank=2, out_dim=2, seed=rng)
        calls = [lambda: mmfuse.lowrank_fusion(xs, **p), lambda: mmfuse.zoom(x, 2.0, center=0.0),
                 lambda: mmfuse.moments(x, backend="reference"), lambda: mmfuse.zoom_shift(x, g)]
        wants = [call() for call in calls]
        # the registry's conditions (explain imports torch, waiting for it: JAX's case only)
        explain = lambda: mmfuse.backends.explain("moments", x)
        if "{framework}" == "jax":
            calls, wants = [explain], [None]
        errors, runs = [], 0

        def check(call, want=None):
            global runs
            try:
                got = call()
                runs += 1
                if want is not None:
                    for a, b in zip(np.atleast_1d(got), np.atleast_1d(want)):
                        assert np.array_equal(a, b)
            except Exception as exc:
                errors.append(f"{{type(exc).__name__}}: {{exc}}")

        importer = threading.Thread(target=lambda: __import__("{framework}"))
        importer.start()
        while importer.is_alive():
            for call, want in zip(calls, wants):
                check(call, want)
        importer.join()
        print(runs > 0, errors[:2])
        """
    )
    assert out == "True []", out


@pytest.mark.parametrize(("framework", "held_at"), [("torch", "torch._C"), ("jax", "jax._src.lib")])
def test_numpy_calls_during_a_held_import_of_a_framework(framework, held_at):
    """The same, deterministically: the other thread's import is held at one of its
    submodules while every kind of NumPy call runs once.  The interaction terms (which never
    plan, so never wait), numba's kernels for them, assert_close and align's staged-rounds
    test still read torch.Tensor or jax.core half built (a diff review's find)."""
    pytest.importorskip(framework)
    out = _run(
        f"""
        import importlib.abc, sys, threading
        import numpy as np, mmfuse, mmfuse.testing
        held, release = threading.Event(), threading.Event()

        class Hold(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "{held_at}" and threading.current_thread() is importer:
                    held.set()
                    release.wait(120)

        sys.meta_path.insert(0, Hold())
        rng = np.random.default_rng()
        xs = [rng.standard_normal((4, 3)), rng.standard_normal((4, 2))]
        x, g = rng.standard_normal((4, 5, 3)), rng.standard_normal((4, 6, 3))
        p = mmfuse.init_lowrank([3, 2], rank=2, out_dim=2, seed=rng)
        weight = rng.standard_normal((4, 3, 2))
        # (calls that never plan: a planned call waits for torch's import, here held by this
        # thread; JAX's is never waited for)
        calls = [lambda: mmfuse.lowrank_interactions(xs, p["factors"], p["weights"]),
                 lambda: mmfuse.lowrank_interactions(xs, p["factors"], by="subset"),
                 lambda: mmfuse.tensor_interactions(xs, weight),
                 lambda: mmfuse.testing.assert_close(x, x),
                 lambda: mmfuse.zoom(x, 2.0, center=0.0)]
        if "{framework}" == "jax":
            calls.append(lambda: mmfuse.align([x, g], rounds=3))
        wants = [call() for call in calls]

        def same(a, b):
            if isinstance(a, (tuple, list)):
                return len(a) == len(b) and all(same(u, v) for u, v in zip(a, b))
            return bool(np.array_equal(a, b))

        importer = threading.Thread(target=__import__, args=("{framework}",))
        importer.start()
        assert held.wait(120)
        errors = []
        for call, want in zip(calls, wants):
            try:
                assert same(call(), want)
            except Exception as exc:
                errors.append(f"{{type(exc).__name__}}: {{exc}}")
        release.set()
        importer.join()
        print(errors)
        """
    )
    assert out == "[]", out


def test_a_numpy_call_inside_torchs_own_import_runs():
    """An mmfuse call made by this thread's own import of torch (an import hook, a plugin
    torch loads): waiting for the import returns the half-built module at once, and the wait
    recursed without end (RecursionError; a diff review's find).  It runs, planned without
    torch."""
    pytest.importorskip("torch")
    out = _run(
        """
        import importlib.abc, sys
        import numpy as np, mmfuse
        x = np.random.default_rng().standard_normal((2, 3, 4))
        want = mmfuse.moments(x)
        seen = []

        class During(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "torch._utils" and not seen:
                    seen.append(mmfuse.moments(x))

        sys.meta_path.insert(0, During())
        import torch
        print(len(seen), all(np.array_equal(a, b) for a, b in zip(seen[0], want)))
        """
    )
    assert out == "1 True", out


def test_import_mmfuse_imports_no_optional_framework():
    out = _run(
        """
        import sys
        before = set(sys.modules)
        import mmfuse, mmfuse.reference, mmfuse.testing, mmfuse.backends
        heavy = ("torch", "cupy", "numba", "tensorly", "dask", "jax", "array_api_strict", "scipy")
        print(sorted(m for m in set(sys.modules) - before if m.split(".")[0] in heavy))
        """
    )
    assert out == "[]"


def test_subpackages_by_attribute_after_import_mmfuse():
    """``mmfuse.reference`` etc. after a bare ``import mmfuse`` (as docs/backends.rst's plugin
    example calls it), each imported on first access: torch only with ``mmfuse.nn``."""
    out = _run(
        """
        import sys
        import mmfuse
        assert "mmfuse.reference" not in sys.modules
        print(mmfuse.reference.lowrank_fusion.__module__, mmfuse.testing.__name__, "torch" in sys.modules)
        print(mmfuse.nn.LowRankFusion.__name__, "torch" in sys.modules)
        try:
            mmfuse.not_a_name
        except AttributeError as err:
            print(err)
        """
    )
    assert out.splitlines() == [
        "mmfuse.reference.fusion mmfuse.testing False",
        "LowRankFusion True",
        "module 'mmfuse' has no attribute 'not_a_name'",
    ]


def test_looking_up_backends_imports_no_numba():
    """available() / unavailable() / implementations() / explain() resolve every row, which
    imported the interaction terms' numba module, and so numba: "auto" then sent small NumPy
    calls to numba's kernels after a mere lookup."""
    out = _run(
        """
        import sys
        import numpy as np
        from mmfuse.backends import available, explain, implementations, unavailable
        available(); unavailable(); implementations("cp_interactions")
        explain("lowrank_interactions", np.ones((2, 3)))
        print("numba" in sys.modules, explain("zoom_shift", np.ones((2, 5, 3))).chosen.backend)
        """
    )
    assert out == "False array_api"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None or importlib.util.find_spec("torch") is None,
                    reason="needs triton and torch installed")
def test_auto_takes_triton_rows_whether_or_not_triton_is_imported():
    """The Triton rows "auto" takes (CUDA tensors of at least TRITON_AUTO_ELEMENTS) do not
    depend on whether triton is imported: a lookup (available(), explain()) imports it, and
    "auto" had then started taking them where, before the lookup, it had not.  A large CPU
    call, which they refuse on metadata, imports nothing for them.  (Metadata only: no GPU
    here, and the interpreter is unset, as on a CUDA machine.)"""
    out = _run(
        """
        import sys
        import torch
        from mmfuse.backends import _registry, available
        from mmfuse.backends._conditions import TRITON_AUTO_ELEMENTS, CallInfo
        from mmfuse._namespace import torch_namespace

        xp = torch_namespace()
        def info(device, size):
            return CallInfo(xp, torch.device(device), torch.float32, True, False, size)
        big, small = TRITON_AUTO_ELEMENTS, TRITON_AUTO_ELEMENTS - 1
        cpu = [_registry._choose(op, "auto", info("cpu", big)).backend for op in ("lowrank_fusion", "zoom_shift")]
        print("triton" in cpu, "triton" in sys.modules)
        before = [_registry._choose(op, "auto", info("cuda", n)).backend
                  for op in ("lowrank_fusion", "zoom_shift") for n in (big, small)]
        print(before, "triton" in sys.modules)
        available()
        after = [_registry._choose(op, "auto", info("cuda", n)).backend
                 for op in ("lowrank_fusion", "zoom_shift") for n in (big, small)]
        print(after == before)
        """,
        env={"TRITON_INTERPRET": "0"},
    )
    assert out.splitlines() == [
        "False False",
        "['triton', 'torch', 'triton', 'torch'] True",
        "True",
    ]


def test_explain_gives_a_refusal_before_a_skip():
    """A row "auto" skips (its framework not imported) because its condition refuses the call
    says why it refuses.  Since "auto" asks an import_at row's condition before importing its
    framework, explain() asked about the skip first would have read, for numba's CPU kernels
    and a large torch tensor needing gradients, "not considered: 'auto' takes it once numba is
    imported, or for calls of size at least ...", which such a call would not get either."""
    out = _run(
        """
        import sys, torch
        from mmfuse.backends import explain
        x = torch.ones(2, 1 << 19, 2, requires_grad=True)  # 2^21 elements: past import_at
        rows = [r for r in explain("moments", x).rows if r[0] == "numba" and r[1] == "CPU kernels"]
        print("numba" in sys.modules, rows[0][3])
        """
    )
    assert out.startswith("False cannot take them: needs NumPy arrays, or torch CPU"), out


def test_import_does_not_read_environment_or_set_state():
    out = _run(
        """
        import mmfuse, mmfuse._config as c
        print(c._state.get())
        """,
        env={"MMFUSE_BACKEND": "not-a-backend"},
    )
    assert out == "None"  # the bad value is only read (and rejected) at first use


def test_a_refusal_says_where_a_backend_the_call_never_named_was_set():
    """A forced backend that refuses a call names the setting that forced it, where the caller
    never wrote ``backend=`` (an environment variable in a shell profile or a CI job was
    nowhere in sight; a review's find); a call naming it says nothing more.  A layer's
    refusal names the layer and the setting too."""
    out = _run(
        """
        import numpy as np, mmfuse
        p = mmfuse.init_lowrank((3, 4), rank=2, out_dim=2, seed=0)
        xs = [np.ones((2, 3)), np.ones((2, 4))]
        for kwargs in ({}, {"backend": "numba"}):
            try:
                mmfuse.lowrank_fusion(xs, **p, **kwargs)
            except mmfuse.backends.BackendUnsupported as exc:
                print(str(exc).partition(" device")[2])
        """,
        env={"MMFUSE_BACKEND": "numba"},
    )
    configured, named = out.splitlines()
    assert configured.endswith(
        "(the backend is set by the environment variable MMFUSE_BACKEND)"
    ), configured
    assert named.endswith("on a CUDA device"), named
    xs = [np.ones((2, 3)), np.ones((2, 4))]
    p = mmfuse.init_lowrank((3, 4), rank=2, out_dim=2, seed=0)
    with mmfuse.config_context(backend="numba"):
        with pytest.raises(BackendUnsupported, match=r"\(the backend is set by mmfuse\.config_context\)$"):
            mmfuse.lowrank_fusion(xs, **p)
        mmfuse.set_config(backend="numba")
        with pytest.raises(BackendUnsupported, match=r"\(the backend is set by mmfuse\.set_config\)$"):
            mmfuse.lowrank_fusion(xs, **p)
    torch = pytest.importorskip("torch")
    from mmfuse.nn import LowRankFusion

    layer = LowRankFusion([3, 4], rank=2, out_dim=2)
    refused = pytest.raises(BackendUnsupported, match=r"^LowRankFusion\.forward: .*\(the backend is set by mmfuse")
    with mmfuse.config_context(backend="reference"), refused:
        layer([torch.ones(2, 3), torch.ones(2, 4)])


def test_env_var_read_at_first_use():
    out = _run(
        "import mmfuse; print(mmfuse.get_config()['backend'], mmfuse._config.config_source()['backend'])",
        env={"MMFUSE_BACKEND": "reference"},
    )
    assert out == "reference environment (MMFUSE_BACKEND)"
    res = subprocess.run(
        [sys.executable, "-c", "import mmfuse; mmfuse.get_config()"],
        capture_output=True,
        text=True,
        env={**os.environ, "MMFUSE_BACKEND": "nope"},
    )
    assert "environment variable MMFUSE_BACKEND: backend must be one of" in res.stderr


def test_blank_environment_value_counts_as_unset():
    """A blank MMFUSE_BACKEND was refused as "got ''" (its stripped value), where an empty one
    counts as unset; surrounding blanks and case are ignored around a name."""
    code = "import mmfuse; print(mmfuse.get_config()['backend'], mmfuse._config.config_source()['backend'])"
    assert _run(code, env={"MMFUSE_BACKEND": "  \t"}) == "auto default"
    assert _run(code, env={"MMFUSE_BACKEND": " Reference "}) == "reference environment (MMFUSE_BACKEND)"


def test_define_op_refuses_what_it_ignored():
    """define_op ignored mmfuse's own operator names silently, took name="" as the function's
    name, and let an operator be redefined with other parameters under implementations
    checked against the old ones."""
    from mmfuse.backends import _registry, define_op, unregister

    def my_norm(x, *, scale, backend=None):
        return x

    def my_norm_v2(x, *, scale, shift, backend=None):
        return x

    with pytest.raises(ValueError, match=r"^'moments' is one of mmfuse's own operators; give yours another name"):
        define_op(my_norm, name="moments")
    with pytest.raises(ValueError, match=r"^name must not be empty$"):
        define_op(my_norm, name="")
    with pytest.raises(TypeError, match=r"^name must be a str or None, got int$"):
        define_op(my_norm, name=3)
    # a callable without a usable name, parameters that cannot be read, no backend keyword
    # (a partial's AttributeError, a builtin's ValueError, nothing; a review's find)
    import functools

    with pytest.raises(TypeError, match=r"^public \(partial\) has no name an operator can take: give one"):
        define_op(functools.partial(my_norm))
    with pytest.raises(TypeError, match=r"^public \(function\) has no name an operator can take"):
        define_op(lambda x, *, backend=None: x)
    with pytest.raises(TypeError, match=r"^public's parameters cannot be read"):
        define_op(max, name="my_max")
    with pytest.raises(TypeError, match=r"^public must take the keyword backend"):
        define_op(lambda x, *, scale: x, name="my_scale")
    with pytest.raises(ValueError, match=r"^name must be an identifier, such as 'my_norm', got 'my op!'$"):
        define_op(my_norm, name="my op!")
    assert "my_scale" not in _registry._EXTRA_OPS and "my_max" not in _registry._EXTRA_OPS
    define_op(functools.partial(my_norm), name="my_norm")  # named: a partial is fine
    with pytest.raises(TypeError, match=r"^numba implementation of my_norm: its parameters cannot be read"):
        register("my_norm", "numba", max)
    define_op(my_norm)
    define_op(my_norm)  # the same parameters again: nothing changes
    register("my_norm", "numba", lambda x, *, scale: x * scale)
    try:
        with pytest.raises(ValueError, match=r"^operator 'my_norm' is defined already with parameters .* and has implementations registered for \['numba'\]; unregister them"):
            define_op(my_norm_v2, name="my_norm")
    finally:
        unregister("my_norm", "numba")
    try:
        define_op(my_norm_v2, name="my_norm")  # nothing registered: redefined
        with pytest.raises(TypeError, match="shift"):
            register("my_norm", "numba", lambda x, *, scale: x * scale)
    finally:
        _registry._EXTRA_OPS.pop("my_norm")  # no public way to undefine: keep other tests' lists


def test_bad_environment_value_stops_only_calls_that_read_it():
    """A bad MMFUSE_BACKEND stopped every call, even one naming its own backend (which the
    environment never decides); a bad MMFUSE_PREFER stops only calls under "auto"."""
    out = _run(
        """
        import numpy as np, mmfuse
        x = np.arange(12.0).reshape(2, 3, 2)
        print(mmfuse.zoom_shift(x, x + 1, backend="array_api").shape)
        with mmfuse.config_context(backend="reference"):
            print(mmfuse.moments(x)[0].shape)
        for call in (lambda: mmfuse.zoom_shift(x, x + 1), mmfuse.get_config):
            try:
                call()
            except ValueError as err:
                print(err)
        """,
        env={"MMFUSE_BACKEND": "nope"},
    )
    lines = out.splitlines()
    assert lines[:2] == ["(2, 3, 2)", "(2, 1, 2)"]
    assert all(line.startswith("environment variable MMFUSE_BACKEND: backend must be one of") for line in lines[2:])
    assert len(lines) == 4
    out = _run(
        """
        import numpy as np, mmfuse
        x = np.arange(12.0).reshape(2, 3, 2)
        print(mmfuse.zoom_shift(x, x + 1, backend="array_api").shape)
        try:
            mmfuse.zoom_shift(x, x + 1, backend="auto")
        except ValueError as err:
            print(err)
        """,
        env={"MMFUSE_PREFER": "nope"},
    )
    assert out.splitlines()[0] == "(2, 3, 2)"
    assert out.splitlines()[1].startswith("environment variable MMFUSE_PREFER: prefer must be None or one of")


def test_precedence_call_over_context_over_set_config():
    assert mmfuse.get_config()["backend"] in ("auto", "reference", "array_api")
    saved = _config._state.get()  # restored as is: values and where they came from
    try:
        mmfuse.set_config(backend="array_api")
        like = np.ones((2, 3))
        assert lookup("lowrank_fusion", like=like) is core_fusion.lowrank_fusion_numpy
        with mmfuse.config_context(backend="reference") as cfg:
            assert cfg == {"backend": "reference", "prefer": None}
            assert lookup("lowrank_fusion", like=like) is reference_backend.lowrank_fusion
            assert lookup("lowrank_fusion", "array_api", like=like) is core_fusion.lowrank_fusion_numpy
        assert mmfuse.get_config()["backend"] == "array_api"
    finally:
        _config._state.set(saved)


def test_a_block_closed_in_another_thread_says_so_and_leaves_this_one_alone():
    """A generator that yields inside a block, finished by another thread: contextvars' own
    ValueError named neither mmfuse nor the cause (a review's find); the closing thread's
    options are untouched."""
    import threading

    def stream():
        with mmfuse.config_context(backend="reference"):
            yield mmfuse.get_config()["backend"]

    saved = _config._state.get()
    gen = stream()
    assert next(gen) == "reference"
    caught = []

    def finish():
        try:
            gen.close()
        except RuntimeError as exc:
            caught.append((str(exc), mmfuse.get_config()["backend"]))

    try:
        worker = threading.Thread(target=finish)
        worker.start()
        worker.join()
        (message, backend_there), = caught
        assert "mmfuse.config_context: the block was closed in another thread or asyncio task" in message
        assert backend_there != "reference"
        # this thread's context keeps the block's options (as contextvars has it: nothing can
        # restore a context from another), as the docstring says
        assert mmfuse.get_config()["backend"] == "reference"
    finally:
        _config._state.set(saved)


def test_config_errors():
    with pytest.raises(ValueError, match=r"backend must be one of \['auto', 'array_api', 'reference', 'numba', 'cupy', 'torch', 'triton'\], got 'fast'"):
        mmfuse.set_config(backend="fast")
    with pytest.raises(TypeError, match=r"unknown mmfuse option 'colour'"):
        mmfuse.set_config(colour="red")
    with pytest.raises(ValueError, match=r"backend must be one of"), mmfuse.config_context(backend=3):
        pass


def test_reference_backend_really_runs():
    """Proves dispatch: the call goes to whatever the registry holds for the name."""
    calls = []

    def spy(xs, cp, bias=None, *, append_one=True, present=None):
        calls.append(len(xs))
        return reference_backend.cp_fusion(xs, cp, bias, append_one=append_one, present=present)

    register("cp_fusion", "reference", spy)
    try:
        xs = [np.ones((2, 3)), np.ones((2, 1))]
        cp = (None, [np.ones((4, 2)), np.ones((2, 2)), np.ones((3, 2))])
        mmfuse.cp_fusion(xs, cp, backend="reference")
        assert calls == [2]
        mmfuse.cp_fusion(xs, cp)  # auto never picks the reference
        assert calls == [2]
    finally:
        unregister("cp_fusion", "reference")
    mmfuse.cp_fusion(xs, cp, backend="reference")  # mmfuse's own reference is back
    assert calls == [2]


def test_available_lists_builtin_backends():
    table = available()
    assert isinstance(table, dict)
    for op in ("tensor_fusion", "lowrank_fusion", "cp_fusion"):
        assert {"array_api", "reference"} <= set(table[op])
    assert "array_api" in available("lowrank_fusion")
    with pytest.raises(ValueError, match=r"unknown operator 'nope'"):
        available("nope")
    with pytest.raises(ValueError, match=r"unknown operator 'lowrank_fuson'; known operators: \['align'"):
        explain("lowrank_fuson", np.ones((4, 3)))  # was an AssertionError


def test_register_checks_signature():
    def wrong(xs, factors):
        return None

    with pytest.raises(TypeError, match=r"must have the public signature \(xs, factors, weights, bias, \*, append_one, present\); got \(xs, factors\)"):
        register("lowrank_fusion", "numba", wrong)

    def positional(xs, factors, weights=None, bias=None, append_one=True, present=None):
        return None

    # the kinds shown: the names alone were two equal lists
    with pytest.raises(TypeError, match=r"signature \(xs, factors, weights, bias, \*, append_one, present\); got \(xs, factors, weights, bias, append_one, present\)$"):
        register("lowrank_fusion", "numba", positional)
    # unregister names what it does not know, as register does (a typo removed nothing, silently)
    with pytest.raises(ValueError, match=r"unknown operator 'lowrank_fusoin'"):
        unregister("lowrank_fusoin", "numba")
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'Numba'"):
        unregister("lowrank_fusion", "Numba")
    unregister("lowrank_fusion", "numba")  # a known pair with nothing registered: nothing happens
    with pytest.raises(ValueError, match=r"backend must be one of"):
        register("lowrank_fusion", "auto", wrong)


def test_register_checks_supports_and_priority():
    """Checked at registration: a string priority or a non-callable supports used to register
    fine and then break every later call of the operator."""
    for bad in ("high", float("nan"), True, None):
        with pytest.raises(TypeError, match=r"^priority must be a finite real number"):
            register("moments", "numba", core_align.moments, priority=bad)
    with pytest.raises(TypeError, match=r"^supports must be None or a callable"):
        register("moments", "numba", core_align.moments, supports=42)
    # a supports of the wrong arity failed at every later call, in a message naming a lambda
    with pytest.raises(TypeError, match=r"^supports must take two arguments \(xp, device\), got .* \(xp\)$"):
        register("moments", "numba", core_align.moments, supports=lambda xp: None)
    assert mmfuse.moments(np.ones((2, 3, 2)))[0].shape == (2, 1, 2)  # nothing was registered


def test_auto_with_no_implementation_taking_the_inputs_says_so():
    """A registration that replaces the generic row with one refusing the inputs leaves "auto"
    nothing: BackendUnsupported with the reasons (an AssertionError before); explain() reports
    no choice rather than raising."""

    def torch_only(xp, device):
        return "needs torch tensors"

    register("lowrank_fusion", "array_api", core_fusion.lowrank_fusion, supports=torch_only)
    try:
        xs = [np.ones((2, 3))]
        p = mmfuse.init_lowrank([3], rank=1, out_dim=1, seed=0)
        with pytest.raises(BackendUnsupported, match=r"^'auto' finds no implementation of lowrank_fusion that takes numpy arrays on device 'cpu': needs .*torch tensors; backends with an implementation of lowrank_fusion: \["):
            mmfuse.lowrank_fusion(xs, **p)
        assert explain("lowrank_fusion", *xs).chosen is None
    finally:
        unregister("lowrank_fusion", "array_api")
    assert mmfuse.lowrank_fusion(xs, **p).shape == (2, 1)


def test_a_preference_that_cannot_serve_imports_nothing():
    """prefer= a backend that cannot take the call falls back to "auto" without loading every
    backend for the refusal's message (it imported torch and Triton: seconds)."""
    out = _run(
        """
        import sys
        import numpy as np
        import mmfuse
        mmfuse.set_config(prefer="cupy")
        mmfuse.moments(np.ones((2, 6, 3)))
        print(sorted(m for m in ("torch", "triton", "numba", "cupy") if m in sys.modules))
        """
    )
    assert out == "[]"


def test_forced_backend_that_cannot_take_inputs_says_why():
    def only_cuda(xp, device):
        return "needs arrays on a CUDA device"

    register("lowrank_fusion", "cupy", core_fusion.lowrank_fusion, supports=only_cuda, priority=10)
    try:
        xs = [np.ones((2, 3))]
        p = mmfuse.init_lowrank([3], rank=1, out_dim=1, seed=0)
        with pytest.raises(BackendUnsupported, match=r"backend 'cupy' cannot take numpy arrays on device 'cpu' for lowrank_fusion: needs arrays on a CUDA device"):
            mmfuse.lowrank_fusion(xs, **p, backend="cupy")
        # auto skips it (it does not support the inputs) and runs the core
        assert mmfuse.lowrank_fusion(xs, **p).shape == (2, 1)
    finally:
        unregister("lowrank_fusion", "cupy")


def test_unknown_backend_for_op():
    xs = [np.ones((2, 3))]
    p = mmfuse.init_lowrank([3], rank=1, out_dim=1, seed=0)
    with pytest.raises(ValueError, match=r"backend must be one of"):
        mmfuse.lowrank_fusion(xs, **p, backend="gpu")


def test_first_lookups_from_many_threads_see_a_fully_loaded_plugin():
    """A thread must not find a plugin half-imported by another (module in sys.modules, its
    implementations not yet registered) and report the backend as lacking the operator."""
    pytest.importorskip("torch")
    out = _run(
        """
        import threading
        import torch
        import mmfuse
        from mmfuse.backends import lookup
        errors, barrier = [], threading.Barrier(8)
        def first_call():
            barrier.wait()
            try:
                lookup("lowrank_fusion", "torch")
            except Exception as exc:
                errors.append(repr(exc))
        threads = [threading.Thread(target=first_call) for _ in range(8)]
        for t in threads: t.start()
        for t in threads: t.join()
        print(errors)
        """
    )
    assert out == "[]"


def test_torch_namespace_fast_path_gives_array_api_compats_answer():
    """All-torch calls skip array_api_compat's generic dispatch (mmfuse._namespace); the
    namespace must be array_api_compat's (with its three direct forms, tests/test_namespaces.py)
    and the devices exactly what array_api_compat reports, subclasses included, and a mix with
    another namespace must still be refused."""
    torch = pytest.importorskip("torch")
    import array_api_compat

    from mmfuse._namespace import array_namespace, device_of

    x = torch.randn(3, dtype=torch.float64)
    p = torch.nn.Parameter(torch.randn(2))
    mine, theirs = array_namespace(x, None, p), array_api_compat.array_namespace(x, p)
    assert mine.__name__ == theirs.__name__ and mine.where is theirs.where and mine.finfo is theirs.finfo
    assert {k for k, v in vars(mine).items() if v is not getattr(theirs, k, None)} == {
        "reshape", "sum", "matrix_transpose"
    }
    assert device_of(x) == array_api_compat.device(x) and device_of(p) == array_api_compat.device(p)
    with pytest.raises(TypeError, match=r"mixed array namespaces: a is torch but b is numpy"):
        array_namespace(x, np.ones(2), names=("a", "b"))


def test_prefer_is_a_soft_preference():
    """prefer= runs the preferred backend where it can take the call and "auto" elsewhere;
    backend= stays strict, and every refusal is BackendUnsupported."""
    pytest.importorskip("numba")

    x = np.random.default_rng(0).standard_normal((2, 5, 3))
    p = mmfuse.init_lowrank([3], rank=1, out_dim=2, seed=0)
    xs = [np.ones((2, 3))]
    with mmfuse.config_context(prefer="numba"):
        assert explain("moments", x).chosen.backend == "numba"  # numba's CPU kernels take it
        # numba has lowrank_fusion for CUDA arrays only: "auto" decides
        assert explain("lowrank_fusion", *xs).chosen.variant == "numpy, cache-blocked"
        assert mmfuse.lowrank_fusion(xs, **p).shape == (2, 2)
        with pytest.raises(BackendUnsupported, match=r"backend 'numba' cannot take numpy arrays"):
            mmfuse.lowrank_fusion(xs, **p, backend="numba")  # a call's backend= is strict
    with mmfuse.config_context(backend="numba", prefer="torch"), pytest.raises(BackendUnsupported):
        mmfuse.lowrank_fusion(xs, **p)  # a strict policy wins
    with pytest.raises(ValueError, match=r"prefer must be None or one of"):
        mmfuse.set_config(prefer="auto")


def test_prefer_from_the_environment():
    out = _run(
        "import numpy as np, mmfuse; from mmfuse.backends import explain; "
        "print(mmfuse.get_config()['prefer'], explain('moments', np.ones((2, 3, 1))).chosen.backend)",
        env={"MMFUSE_PREFER": "reference"},
    )
    assert out == "reference reference"


def test_a_layers_refusal_names_the_layer():
    """A strict global backend that cannot take a layer's call: the error names the layer the
    user called, then the functional operator and the reason (one exception type)."""
    torch = pytest.importorskip("torch")
    import mmfuse.nn as mnn

    layer = mnn.LowRankFusion([3, 4], 2, rank=2)
    xs = [torch.randn(2, 3), torch.randn(2, 4)]
    with mmfuse.config_context(backend="cupy"), pytest.raises(
        BackendUnsupported, match=r"^LowRankFusion\.forward: backend 'cupy' cannot (take|run) .*lowrank_fusion"
    ):
        layer(xs)
    # the method called, too (interactions had been labelled forward)
    for make in (lambda: layer, lambda: mnn.CPFusion([3, 4], 2, rank=2), lambda: mnn.TensorFusion([3, 4], 2)):
        with mmfuse.config_context(backend="cupy"), pytest.raises(
            BackendUnsupported, match=rf"^{type(make()).__name__}\.interactions: backend 'cupy' cannot (take|run) "
        ):
            make().interactions(xs)
    seqs = [torch.randn(2, 4, 3), torch.randn(2, 5, 3)]
    with mmfuse.config_context(backend="cupy"), pytest.raises(BackendUnsupported, match=r"^ZoomShift\.forward: "):
        mnn.ZoomShift(3, 2)(seqs)
    with mmfuse.config_context(backend="torch"):  # torch serves every operator the layers call
        assert mnn.ZoomShift(3, 2)(seqs).shape == (2, 6)
        assert mnn.TensorFusion([3, 4], 2)(xs).shape == (2, 2)
        assert mmfuse.moments(seqs[0])[0].shape == (2, 1, 3)


def test_registry_arguments_are_checked_by_name():
    """Foreign errors before: OverflowError for priority=10**400, "unhashable type: 'list'"
    for op=[], inspect's "None is not a callable object" for func=None, a comparison error
    for size="big" (True accepted), "argument 0" for like=1, AttributeError for a supports
    answer that is not a str and for define_op(None)."""
    from mmfuse.backends._registry import define_op

    x = np.ones((2, 5, 3))

    def mine(x, *, axis, mask, eps):
        return "mine"

    cases = [
        (r"^priority must be a finite real number", lambda: register("moments", "numba", mine, priority=10**400)),
        (r"^op must be an operator's name \(a str\), got list$", lambda: register([], "numba", mine)),
        (r"^op must be an operator's name \(a str\), got list$", lambda: lookup([])),
        (r"^func must be the implementation \(a callable\), got NoneType$", lambda: register("moments", "numba", None)),
        (r"^size must be None or a non-negative int, got 'big'$", lambda: lookup("moments", like=x, size="big")),
        (r"^size must be None or a non-negative int, got True$", lambda: lookup("moments", like=x, size=True)),
        (r"^like must be an array, got int$", lambda: lookup("moments", like=1)),
        (r"^public must be the operator's public function, got NoneType$", lambda: define_op(None)),
    ]
    for match, call in cases:
        with pytest.raises(TypeError, match=match):
            call()
    register("moments", "cupy", mine, supports=lambda xp, device: 3, priority=50)
    try:
        with pytest.raises(TypeError, match=r"supports callable registered for cupy's moments must return None or a str"):
            mmfuse.moments(x, backend="cupy")
    finally:
        unregister("moments", "cupy")


def test_explain_refuses_what_is_not_an_array(rng):
    """explain() of a non-array argument described a call without inputs, silently (every
    row "would run"); it names the argument now, nested lists too."""
    from mmfuse.backends import explain

    x = rng.standard_normal((2, 3))
    assert explain("lowrank_fusion", [x], None).chosen is not None
    with pytest.raises(TypeError, match=r"arrays\[0\] is a str, not an array"):
        explain("lowrank_fusion", "x")
    with pytest.raises(TypeError, match=r"arrays\[1\]\[0\] is a float, not an array"):
        explain("lowrank_fusion", [x], [3.0])


def test_environment_is_read_once_per_process_at_first_use():
    """``import mmfuse.nn`` read MMFUSE_BACKEND / MMFUSE_PREFER (its torch lookups went through
    the configuration), and each new thread read them again: a variable set after the first
    use gave a pool worker another policy than the main thread.  Now the first use reads them,
    once for the process; threads start from that."""
    pytest.importorskip("torch")
    out = _run(
        """
        import os, threading
        import mmfuse.nn, mmfuse._config as c
        print(c._state.get(), c._FROM_ENVIRONMENT)
        os.environ["MMFUSE_BACKEND"] = "reference"  # before the first use: it counts
        import mmfuse
        print(mmfuse.get_config()["backend"])
        os.environ["MMFUSE_BACKEND"] = "array_api"  # after it: no thread sees it
        seen = []
        worker = threading.Thread(target=lambda: seen.append(mmfuse.get_config()["backend"]))
        worker.start(); worker.join()
        print(seen[0])
        """
    )
    assert out.splitlines() == ["None []", "reference", "reference"]


def test_a_bad_preference_stops_only_what_reads_it():
    """A refused MMFUSE_PREFER stopped config_context(backend=...) on entry (it yields the
    configuration), though a named backend never reads the preference."""
    out = _run(
        """
        import numpy as np, mmfuse
        with mmfuse.config_context(backend="array_api") as cfg:
            print(cfg, mmfuse.moments(np.ones((2, 3, 2)))[0].shape)
        try:
            mmfuse.get_config()
        except ValueError as err:
            print(str(err)[:45])
        """,
        env={"MMFUSE_PREFER": "nope"},
    )
    assert out.splitlines() == [
        "{'backend': 'array_api', 'prefer': None} (2, 1, 2)",
        "environment variable MMFUSE_PREFER: prefer mu",
    ]


@pytest.mark.parametrize("how", ["prefer", "backend"])
def test_a_backend_that_refuses_on_metadata_is_not_imported(how):
    """prefer="torch" (or "triton"), or backend="triton", on a NumPy call imported torch and
    Triton (seconds) before their rows refused it; the rows' conditions read metadata only,
    so the refusal (or, for a preference, the fallback to "auto") now imports nothing."""
    pytest.importorskip("torch")
    out = _run(
        f"""
        import sys
        import numpy as np
        import mmfuse
        from mmfuse.backends import BackendUnsupported
        x = np.ones((2, 6, 3))
        p = mmfuse.init_lowrank([3], rank=1, out_dim=1, seed=0)
        for name in ("torch", "triton"):
            if "{how}" == "prefer":
                with mmfuse.config_context(prefer=name):
                    mmfuse.moments(x)
                    mmfuse.lowrank_fusion([np.ones((2, 3))], **p)
            else:
                try:
                    mmfuse.moments(x, backend=name)
                except BackendUnsupported as err:
                    print(str(err)[:40])
        print(sorted(m for m in ("torch", "triton") if m in sys.modules))
        """
    )
    lines = out.splitlines()
    assert lines[-1] == "[]"
    if how == "backend":
        assert lines[:2] == ["backend 'torch' cannot take numpy arrays", "backend 'triton' cannot take numpy array"]


def test_explain_shows_what_a_preference_runs():
    """Under prefer= explain() marked the chosen reference row "not considered" (no row said
    "runs") and called rows above it "would run if the rows above could not"; a forced backend
    without the operator printed the header alone."""
    x = np.ones((2, 6, 3))
    with mmfuse.config_context(prefer="reference"):
        found = explain("moments", x)
    verdicts = {(b, v): verdict for b, v, _, verdict in found.rows}
    assert found.chosen.backend == "reference"
    assert verdicts[("reference", found.chosen.variant)] == "runs"
    assert verdicts[("array_api", "generic")] == "passed over: prefer reference runs first"
    empty = explain("tensor_fusion", [np.ones((2, 3))], np.ones((4, 2)), backend="numba")
    assert empty.chosen is None
    assert [verdict for *_, verdict in empty.rows] == ["cannot run tensor_fusion: it has no implementation of this operator"]


def test_explain_reads_the_call_as_the_call_does():
    """Three review finds: explain() read the first array, not the first floating one (a
    mask given first described a bool call, where the call itself runs by x); under
    prefer="reference" a reference that refused (a tensor requiring grad) was said to be
    "not considered" by "auto", not why it refused; and explain() without arrays answered
    by what happened to be imported, then otherwise once its table had imported the rest."""
    x = np.random.default_rng().standard_normal((2, 6, 3))
    mask = np.ones((2, 6), dtype=bool)
    assert explain("moments", mask, x).chosen == explain("moments", x, mask).chosen
    with pytest.raises(TypeError, match=r"explain: give the call's arrays"):
        explain("moments")
    with pytest.raises(TypeError, match=r"explain: give the call's arrays"):
        explain("moments", [], None)
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(x).requires_grad_()
    with mmfuse.config_context(prefer="reference"):
        found = explain("moments", t)
    verdict = {b: v for b, _, _, v in found.rows}["reference"]
    assert verdict.startswith("cannot take them: needs inputs that require no gradient"), verdict
    assert found.chosen.backend != "reference"


def test_explain_lists_no_loading_error_of_rows_a_registration_replaced():
    """A registration replaces its backend's rows; explain() had listed both the registration
    and the replaced rows' "(not installed)" loading error (a review's find)."""
    pytest.importorskip("numpy")
    if "cupy" not in mmfuse.backends.unavailable():
        pytest.skip("needs a backend that cannot load here (CuPy installed)")

    def mine(x, *, axis=-2, mask=None, eps=1e-5):
        return x.mean(axis=axis, keepdims=True), x.std(axis=axis, keepdims=True)

    x = np.ones((2, 4, 3))
    assert ("cupy", "(not installed)") in [(b, v) for b, v, _, _ in explain("moments", x, backend="cupy").rows]
    register("moments", "cupy", mine)
    try:
        found = explain("moments", x, backend="cupy")
    finally:
        unregister("moments", "cupy")
    assert [(b, v) for b, v, _, _ in found.rows] == [("cupy", "registered")]
    assert found.chosen is not None and found.chosen.func is mine


def test_explain_prints_any_priority_a_registration_takes():
    """register() takes any finite real priority, but the explanation's text formatted it with
    a format spec that a Fraction has not: TypeError from print(explain(...)) (a review's
    find).  Every accepted priority prints, and the choice follows it."""
    from fractions import Fraction

    def mine(x, *, axis=-2, mask=None, eps=1e-5):
        return x.mean(axis=axis, keepdims=True), x.std(axis=axis, keepdims=True)

    x = np.ones((2, 4, 3))
    for priority in (Fraction(1, 2), 2.5, 1000):
        register("moments", "numba", mine, priority=priority)
        try:
            text = str(explain("moments", x))
        finally:
            unregister("moments", "numba")
        row = next(line for line in text.splitlines() if "numba / registered" in line)
        assert f"  {priority}  " in row, row


def test_public_functions_have_the_catalogued_signatures():
    """Every operator's public function takes exactly its catalogued parameters (names, kinds,
    order) plus ``backend=`` last: the registry checks implementations against the catalogue,
    so a public signature that drifted from it would refuse or mis-call every backend."""
    import inspect

    from mmfuse.backends._catalogue import OPERATORS

    for op, signature in OPERATORS.items():
        params = list(inspect.signature(getattr(mmfuse, op)).parameters.values())
        assert params[-1].name == "backend" and params[-1].kind is inspect.Parameter.KEYWORD_ONLY, op
        assert tuple((p.name, p.kind) for p in params[:-1]) == signature, op


_WITHOUT_TORCH = """
import importlib.abc, sys

class NoTorch(importlib.abc.MetaPathFinder):  # torch as if not installed
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "torch":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

if sys.argv[1] == "finder":
    sys.meta_path.insert(0, NoTorch())
else:  # the other usual way of blocking an import
    sys.modules["torch"] = None
import numpy as np
import mmfuse
from mmfuse import backends
table = backends.available()
print(sorted(op for op, names in table.items() if "torch" in names))
print("torch" in backends.unavailable())
# and calls run (a planned call's key asked torch, found as None, for its grad mode)
x = np.random.default_rng(0).standard_normal((2, 5, 3))
print(mmfuse.moments(x)[0].shape == (2, 1, 3), mmfuse.zoom_shift(x, 2.0 * x).shape == x.shape)
"""


@pytest.mark.parametrize("blocked_by", ["finder", "none"])
def test_a_backend_without_its_framework_is_not_available(blocked_by):
    """Without torch, the torch backend's rows that run the core's functions (tensor_fusion,
    moments, the interaction terms, the transforms' rows) still loaded, so available() listed
    torch for every operator while unavailable() listed it too (and ``mmfuse info`` showed
    the backend twice).  A row now needs its backend's framework as well as its module.
    With ``sys.modules["torch"] = None`` every planned call failed (AttributeError in the
    plan's key)."""
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TORCH, blocked_by], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]", "True", "True", "True"]


_UNBLOCKED_NUMBA = """
import os, sys
import numpy as np
sys.modules["numba"] = None  # blocked, as a test suite or a user does, then unblocked
import mmfuse
from mmfuse.backends import explain, unavailable

ran = []

def spy(frame, event, arg):
    if event == "call" and frame.f_code.co_name == "moments_cpu":
        ran.append(frame.f_code.co_filename.endswith(os.path.join("backends", "numba.py")))

x = np.random.default_rng(0).standard_normal((2, 6, 3))
# The registry asked whether numba is unavailable before the blocked call, or after it (as a
# user would): a question between the two calls let a plan key that took blocked numba for
# imported pass (a mutation review's find), so the first run leaves nothing between them but
# the unblocking
between = sys.argv[1:] == ["between"]
if not between:
    blocked_unavailable = "numba" in unavailable()
mmfuse.moments(x)
if between:
    blocked_unavailable = "numba" in unavailable()
del sys.modules["numba"]
import numba
sys.setprofile(spy)
mmfuse.moments(x)  # the signature seen while blocked
sys.setprofile(None)
print(blocked_unavailable)
print(ran == [True], explain("moments", x).chosen.backend, "numba" in unavailable())
if "cupy" in unavailable():  # a backend with the operator that cannot load: no "(none)" row
    print([row[1] for row in explain("zoom_shift", x, backend="cupy").rows])
else:
    print(["(not installed)"])
"""


def test_a_framework_unblocked_is_used_and_no_longer_unavailable():
    """``sys.modules["numba"] = None`` counted as imported in the plans' and the registry's
    keys, so a signature first seen while numba was blocked kept the core after it was
    unblocked and imported (explain said numba runs); unavailable() and explain kept its load
    error.  And explain(backend="cupy") of an operator CuPy has, without CuPy, said "no
    implementation of this operator" beside "not installed" (review finds)."""
    pytest.importorskip("numba")
    for when in ("before", "between"):
        done = subprocess.run(
            [sys.executable, "-c", _UNBLOCKED_NUMBA, when], capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split("\n")[:3] == ["True", "True numba False", "['(not installed)']"], (when, done.stdout)


def test_a_backend_module_that_cannot_load_stays_unavailable():
    """numba's rows span several modules; the first fix for errors that no longer stand
    dropped the backend's recorded error when any of its rows loaded, so a kernel module that
    cannot load vanished from unavailable() once a core-function row of numba had loaded (a
    review of the session's diff).  Only the failed module's loading clears it now."""
    pytest.importorskip("numba")
    code = (
        "import sys\n"
        "sys.modules['mmfuse.backends.numba'] = None\n"
        "import mmfuse\n"
        "from mmfuse import backends\n"
        "print(backends.unavailable().get('numba', ''))\n"
    )
    out = _run(code)
    assert "mmfuse.backends.numba" in out, out


_BROKEN_NUMBA = """
import numpy as np
import mmfuse
from mmfuse import backends
from mmfuse.backends import BackendUnsupported
rng = np.random.default_rng()
x, g = rng.standard_normal((64, 128, 128)), rng.standard_normal((64, 100, 128))  # past import_at
print(backends.explain("zoom_shift", x, g).chosen.backend)  # (a question: imports nothing)
y = mmfuse.zoom_shift(x, g)
print(np.array_equal(y, mmfuse.zoom_shift(x, g, backend="array_api")), mmfuse.moments(x)[0].shape)
print("numba" in backends.available("zoom_shift"), backends.unavailable()["numba"])
try:
    mmfuse.zoom_shift(x[:1, :4], g[:1, :4], backend="numba")
except BackendUnsupported as err:
    print(err)
"""


def test_a_framework_whose_import_fails_is_refused_not_raised(tmp_path):
    """numba installed but failing at import (numba refusing a newer NumPy, emulated by a
    package of that name that raises as it does): "auto" took its rows for large calls on the
    installed check alone, and the import's error rose from inside the call; ``backend=
    "numba"`` raised it too, and ``available()`` kept listing numba (a review's find).  The
    import is tried when a row needing it is chosen: a failure is a refusal ("auto" runs the
    core) and the backend counts as not installed from then on."""
    lines = _run(_BROKEN_NUMBA, env=_broken_numba(tmp_path)).splitlines()
    why = "numba is installed but its import fails (ImportError: Numba needs NumPy 2.3 or less)"
    assert lines[:3] == ["numba", "True (64, 1, 128)", f"False ImportError: {why}"], lines
    assert lines[3].startswith(f"backend 'numba' cannot run zoom_shift: ImportError: {why}"), lines


_BROKEN_NUMBA_FIRST = """
import sys, threading, time
import numpy as np
import mmfuse
from mmfuse import backends
from mmfuse.backends import BackendUnsupported
rng = np.random.default_rng()
x, g = rng.standard_normal((64, 128, 128)), rng.standard_normal((64, 100, 128))  # past import_at
if sys.argv[1] == "named":  # the first call names numba: the same message as later ones
    for _ in range(2):
        try:
            mmfuse.zoom_shift(x[:1, :4], g[:1, :4], backend="numba")
        except BackendUnsupported as err:
            print(str(err).split(";")[0])
elif sys.argv[1] == "preferred":  # a preference: 'auto' decides, the core runs
    with mmfuse.config_context(prefer="numba"):
        print(np.array_equal(mmfuse.zoom_shift(x, g), mmfuse.zoom_shift(x, g, backend="array_api")))
else:  # another thread calls while the (slow) failing import runs: it waits, then refuses
    out = {}
    def call(name, a, b):
        try:
            mmfuse.zoom_shift(a, b)
            out[name] = "ok"
        except Exception as exc:
            out[name] = f"{type(exc).__name__}: {exc}"
    first = threading.Thread(target=call, args=("first", x, g))
    first.start()
    while "numba" not in sys.modules:
        time.sleep(0.01)
    call("second", x, g)
    first.join()
    print(out["first"], out["second"])
"""


@pytest.mark.parametrize("first", ["named", "preferred", "racing"])
def test_a_framework_whose_import_fails_first_met_by_name_preference_or_two_threads(tmp_path, first):
    """The same broken numba, met first by ``backend="numba"`` (its first refusal listed the
    import's failure among the other rows' refusals of the arrays, unlike later calls'), by
    ``prefer="numba"``, or by a thread calling while another thread's (slow) import fails (it
    took the half-imported module for imported, and met the ImportError inside the call; a
    diff review's finds)."""
    out = _run(_BROKEN_NUMBA_FIRST, first, env=_broken_numba(tmp_path, slow=True))
    why = "numba is installed but its import fails (ImportError: Numba needs NumPy 2.3 or less)"
    want = {
        "named": [f"backend 'numba' cannot run zoom_shift: ImportError: {why}"] * 2,
        "preferred": ["True"],
        "racing": ["ok ok"],
    }
    assert out.splitlines() == want[first], out


def test_a_blocked_framework_is_refused_by_the_rows_that_loaded_before():
    """numba's rows loaded, then its import blocked (``sys.modules["numba"] = None``) before
    numba was imported: "auto" refuses them for a large call and runs the core, and
    ``explain`` says the same (it chose numba's kernels, and the call then raised; a diff
    review's find)."""
    pytest.importorskip("numba")
    code = (
        "import sys\n"
        "import numpy as np, mmfuse\n"
        "from mmfuse import backends\n"
        "backends.available('moments')\n"
        "sys.modules['numba'] = None\n"
        "x = np.random.default_rng().standard_normal((64, 128, 128))\n"
        "print(backends.explain('moments', x).chosen.backend)\n"
        "print(np.array_equal(mmfuse.moments(x)[1], mmfuse.moments(x, backend='array_api')[1]))\n"
    )
    out = _run(code)
    assert out.split() == ["array_api", "True"], out


def test_the_triton_interpreter_setting_is_read_per_call():
    """``backend="triton"`` takes CPU tensors only while TRITON_INTERPRET is on, and the
    conditions read it per call: a plan (and a cached registry choice) made with it set was
    kept after it was unset, so CPU calls kept running the interpreter (a review's find).
    Triton's own reading of the variable decides: "2" and "off" are off, "yes" is on."""
    pytest.importorskip("triton")
    out = _run(
        """
        import os, torch, mmfuse
        from mmfuse.backends import BackendUnsupported
        xs = [torch.randn(4, 3), torch.randn(4, 2)]
        factors = [torch.randn(2, 4, 5), torch.randn(2, 3, 5)]
        def call():
            try:
                mmfuse.lowrank_fusion(xs, factors, backend="triton")
                return "ran"
            except BackendUnsupported:
                return "refused"
        seen = [call()]
        for value in ("1", None, "yes", "2", "off", "1"):
            if value is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = value
            seen.append(call())
        print(" ".join(seen))
        """,
        env={"TRITON_INTERPRET": "0"},
    )
    assert out == "refused ran refused ran refused refused ran"


def test_triton_whose_language_was_built_before_the_variable_changed_is_refused():
    """Triton builds its language helpers (``tl.cdiv``, ...) at its own first import: with
    triton imported (here by torch._dynamo, as torch.compile does) before TRITON_INTERPRET=1
    was set, the backend said it could run and every kernel failed inside Triton ("Cannot call
    @triton.jit'd outside of the scope of a kernel"; a review's find).  Refused now, naming the
    cause; "auto" runs the torch op."""
    pytest.importorskip("triton")
    out = _run(
        """
        import os, torch, mmfuse
        import torch._dynamo  # imports triton, built for a GPU: the variable is off
        from mmfuse.backends import BackendUnsupported
        os.environ["TRITON_INTERPRET"] = "1"
        x, f = torch.randn(5, 3), torch.randn(2, 4, 3)
        for call in (lambda: mmfuse.lowrank_fusion([x, x], [f, f], backend="triton"),
                     lambda: mmfuse.zoom_shift(f, f, backend="triton")):
            try:
                call()
                print("ran")
            except BackendUnsupported as exc:
                print("first imported before TRITON_INTERPRET=1" in str(exc))
        import mmfuse.backends.triton as tb  # its kernels built for the interpreter now
        print("new process" in tb.supports(torch, torch.device("cpu")))
        want = mmfuse.lowrank_fusion([x, x], [f, f], backend="torch")
        print(torch.equal(mmfuse.lowrank_fusion([x, x], [f, f]), want))
        """,
        env={"TRITON_INTERPRET": "0"},
    )
    assert out == "True\nTrue\nTrue\nTrue"


def test_forced_triton_calls_the_built_kernels_cannot_take_are_refused():
    """The registry asked only TRITON_INTERPRET, not the backend, whose kernels are built once
    (for a GPU, or for the interpreter) at its first import: with GPU-built kernels, setting
    the variable (as the refusal advised) ran them on CPU tensors ("0 active drivers"), and the
    interpreter took meta tensors ("Cannot copy out of meta tensor").  Both are refused by the
    backend's own words now (a review's find)."""
    pytest.importorskip("triton")
    out = _run(
        """
        import os, torch, mmfuse
        import mmfuse.backends.triton as tb  # built for a GPU: the variable is off
        from mmfuse.backends import BackendUnsupported
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            mmfuse.lowrank_fusion([torch.randn(3, 2)], [torch.randn(1, 3, 2)], backend="triton")
            print("ran")
        except BackendUnsupported as exc:
            print("built for a GPU" in str(exc), "in a new process" in str(exc))
        """,
        env={"TRITON_INTERPRET": "0"},
    )
    assert out == "True True"
    out = _run(
        """
        import torch, mmfuse
        from mmfuse.backends import BackendUnsupported
        x = torch.randn(2, 5, 3, device="meta")
        for call in (lambda: mmfuse.zoom_shift(x, x, backend="triton"),
                     lambda: mmfuse.lowrank_fusion([x[:, 0]], [torch.randn(1, 4, 2, device="meta")], backend="triton")):
            try:
                call()
                print("ran")
            except BackendUnsupported as exc:
                print("device 'meta'" in str(exc))
        """,
        env={"TRITON_INTERPRET": "1"},
    )
    assert out == "True\nTrue"


def test_compiled_layers_run_a_torch_implementation_registered_after_their_import():
    """Under torch.compile the layers call the torch backend's implementation directly; one
    registered after ``mmfuse.nn`` was imported is the one they call, as the eager layers
    (through the registry) do.  The table resolved at import had kept mmfuse's own, so the
    result depended on import order (a review of the plan state); unregistering brings it back."""
    torch = pytest.importorskip("torch")
    from mmfuse.nn import LowRankFusion

    def constant(xs, factors, weights=None, bias=None, *, append_one=True, present=None):
        return torch.full((xs[0].shape[0], factors[0].shape[-1]), 42.0, dtype=xs[0].dtype)

    layer = LowRankFusion([3, 2], rank=2, out_dim=5)
    xs = [torch.randn(4, 3), torch.randn(4, 2)]
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    with mmfuse.config_context(backend="torch"):
        own = compiled(xs)
        register("lowrank_fusion", "torch", constant, priority=100)
        try:
            assert bool((layer(xs) == 42).all())
            assert bool((compiled(xs) == 42).all())
        finally:
            unregister("lowrank_fusion", "torch")
        again = compiled(xs)
    torch.testing.assert_close(again, own, rtol=0, atol=0)
    assert not bool((own == 42).any())


def test_compiled_layers_drop_a_registration_made_before_their_import_once_unregistered():
    """``mmfuse.nn`` keeps mmfuse's own torch and core implementations from its import; a
    registration made before that import had been kept as if it were mmfuse's own, and the
    compiled layers kept calling it after ``unregister`` (a review's find).  In a fresh
    interpreter, where the registration can come first."""
    import subprocess
    import sys
    import textwrap

    pytest.importorskip("torch")
    code = textwrap.dedent(
        """
        import sys, warnings, torch, mmfuse
        from mmfuse.backends import register, unregister
        assert "mmfuse.nn" not in sys.modules
        def constant(xs, factors, weights=None, bias=None, *, append_one=True, present=None):
            return torch.full((xs[0].shape[0], factors[0].shape[-1]), 42.0, dtype=xs[0].dtype)
        for backend in ("torch", "array_api"):
            register("lowrank_fusion", backend, constant, priority=100)
        import mmfuse.nn as nn
        for backend in ("torch", "array_api"):
            unregister("lowrank_fusion", backend)
        layer = nn.LowRankFusion([3, 2], rank=2, out_dim=5)
        xs = [torch.randn(4, 3), torch.randn(4, 2)]
        want = layer(xs)
        assert not bool((want == 42).any())
        got = torch.compile(layer, backend="eager", fullgraph=True)(xs)
        torch.testing.assert_close(got, want)
        grad = torch.func.grad(lambda x0: torch.compile(layer, backend="eager")([x0, xs[1]]).sum())(xs[0])
        assert torch.isfinite(grad).all() and not bool((grad == 0).all())
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


def test_a_registration_made_while_a_refusal_is_written_does_not_break_it(monkeypatch):
    """The refusal's list of backends reads a snapshot of the registrations (as the choice
    does): a register / unregister in another thread had raised "dictionary changed size
    during iteration" in place of BackendUnsupported, and broke a soft preference's fallback.
    Here the registration is made from inside the reading of the registrations (a registered
    op name whose comparison registers), standing in for the other thread, so the test is
    deterministic."""
    from mmfuse._core import align, fusion
    from mmfuse.backends import _registry

    armed = []

    class Registering(str):
        def __eq__(self, other):
            if armed and ("moments", "cupy") not in _registry._REGISTERED:
                register("moments", "cupy", align.moments, supports=lambda xp, device: False)
            return str.__eq__(self, other)

        __hash__ = str.__hash__

    register(Registering("tensor_fusion"), "cupy", fusion.tensor_fusion, supports=lambda xp, device: False)
    try:
        armed.append(True)
        message = _registry._backends_for("tensor_fusion")
    finally:
        unregister("tensor_fusion", "cupy")
        if ("moments", "cupy") in _registry._REGISTERED:
            unregister("moments", "cupy")
    assert "cupy" in message and "backends with an implementation of tensor_fusion" in message


def test_concurrent_first_calls_share_one_namespace_object(monkeypatch):
    """mmfuse's replacement of a namespace is made once: a first call racing another (which
    stores its own object meanwhile, simulated here inside the making) gets the stored one,
    since the namespace checks compare namespaces by identity (two NumPy namespace objects
    had made one call's arrays "mixed")."""
    import array_api_compat

    from mmfuse import _namespace

    compat = array_api_compat.array_namespace(np.ones(1))
    name = compat.__name__
    monkeypatch.delitem(_namespace._OURS, name, raising=False)
    make = _namespace._REPLACEMENTS[name]
    other = make(compat)

    def racing(xp):
        _namespace._OURS[name] = other  # the other thread's object, stored first
        return make(xp)

    monkeypatch.setitem(_namespace._REPLACEMENTS, name, racing)
    first = _namespace._ours(compat)
    assert first is other and _namespace._ours(compat) is other


def test_reference_functions_have_the_public_signatures():
    """The oracle's functions take the public functions' parameters (names, kinds, order)
    without ``backend=``, as mmfuse.reference's docstring says (lowrank_to_tensor lacked
    ``max_elements``)."""
    import inspect

    from mmfuse import reference

    names = [n for n in reference.__all__ if callable(getattr(mmfuse, n, None))]
    assert len(names) >= 15
    for name in names:
        public = [(p.name, p.kind) for p in inspect.signature(getattr(mmfuse, name)).parameters.values()]
        ours = [(p.name, p.kind) for p in inspect.signature(getattr(reference, name)).parameters.values()]
        assert ours == [p for p in public if p[0] != "backend"], name


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_does_not_inherit_a_held_registry_lock():
    """A thread of the parent holding the registry's lock at the fork (registering a backend,
    say) left it held in the child, whose first dispatch then waited for ever (a review's
    find); the child gets a lock of its own.  In a fresh interpreter: a fork of the test
    process (its threads, its other libraries' at-fork handlers) is no clean parent."""
    code = textwrap.dedent(
        """
        import os, threading, time, warnings
        import numpy as np
        from mmfuse.backends import _registry, explain

        held, release = threading.Event(), threading.Event()

        def hold():
            with _registry._lock:
                held.set()
                release.wait()

        holder = threading.Thread(target=hold)
        holder.start()
        held.wait()
        with warnings.catch_warnings():  # (3.12 warns of a fork with threads: the point here)
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # the child: explain reads the registry's rows under its lock
            explain("lowrank_fusion", np.ones((13, 3)))
            os._exit(0)
        deadline = time.monotonic() + 60
        while not os.waitpid(pid, os.WNOHANG)[0]:
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                print("hung")
                break
            time.sleep(0.05)
        else:
            print("finished")
        release.set()
        holder.join()
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "finished", res.stdout


def test_a_forced_backend_without_the_operator_says_so_after_its_load_failed():
    """A forced backend with no rows for the operator was refused with its recorded load
    error ("the cupy backend needs CuPy (pip install ...)") once something had tried to load
    it, and with "no implementation of this operator" before: installing it would not help
    (a review's find)."""
    if "cupy" not in mmfuse.backends.unavailable():  # (records CuPy's load error)
        pytest.skip("needs a backend that cannot load here (CuPy installed)")
    xs = [np.random.default_rng(3).standard_normal((2, 5, 3)) for _ in range(2)]
    assert not [row for row in mmfuse.backends._table.ROWS if row.op == "align" and row.backend == "cupy"]
    with pytest.raises(BackendUnsupported, match=r"backend 'cupy' cannot run align: it has no implementation of this operator;"):
        mmfuse.align(xs, backend="cupy")


def test_explain_takes_a_cp_tensor_as_the_operators_do():
    """cp_fusion and cp_interactions take TensorLy's CPTensor for ``cp``; explain() refused
    it ("arrays[1] is a CPTensor, not an array"), where the docs say to give it the call's
    arrays (a review's find).  It reads the pair, and sizes the call from it."""
    tl = pytest.importorskip("tensorly")
    rng = np.random.default_rng(4)
    xs = [rng.standard_normal((6, d)) for d in (3, 4)]
    # (weights, factors): C (h, R) last, the inputs' factors with their constant row
    pair = (rng.standard_normal(2), [rng.standard_normal((4, 2)), rng.standard_normal((5, 2)), rng.standard_normal((3, 2))])
    cpt = tl.cp_tensor.CPTensor(pair)
    for op in ("cp_fusion", "cp_interactions"):
        found = explain(op, xs, cpt)
        assert found.rows == explain(op, xs, pair).rows, op
        assert found.chosen is not None, op


_UNBLOCKED_NOT_IMPORTED = """
import os, sys
import numpy as np
sys.modules["numba"] = None  # blocked, then unblocked, and not imported by the caller
import mmfuse

ran = []

def spy(frame, event, arg):
    if event == "call" and frame.f_code.co_name == "moments_cpu":
        ran.append(frame.f_code.co_filename.endswith(os.path.join("backends", "numba.py")))

x = np.random.default_rng(0).standard_normal((2, 6, 3))
with mmfuse.config_context(prefer="numba"):
    mmfuse.moments(x)
    del sys.modules["numba"]
    sys.setprofile(spy)
    mmfuse.moments(x)  # the signature seen while blocked: numba is importable now
    sys.setprofile(None)
print(ran == [True], sys.modules.get("numba") is not None)
"""


def test_a_framework_unblocked_is_taken_before_anyone_imports_it():
    """The plans' and the registry's keys held "numba imported or not", the same for an
    import blocked and one merely not done: a signature seen while numba was blocked kept
    its fallback after the unblocking, where ``prefer="numba"`` (or "auto" on a large call)
    imports it (a review's find)."""
    pytest.importorskip("numba")
    done = subprocess.run([sys.executable, "-c", _UNBLOCKED_NOT_IMPORTED], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True"], done.stdout


_UNHASHABLE_MODULE = """
import importlib.machinery, sys, types
import numpy as np

class ProxyModule(types.ModuleType):  # compares by name: __eq__ without __hash__, unhashable
    def __eq__(self, other):
        return isinstance(other, types.ModuleType) and other.__name__ == self.__name__

name = sys.argv[1]
module = ProxyModule(name)
module.__spec__ = importlib.machinery.ModuleSpec(name, None)
sys.modules[name] = module
import mmfuse
xs = [np.ones((2, 3)), np.ones((2, 4))]
factors = [np.ones((2, 4, 5)), np.ones((2, 5, 5))]
print(mmfuse.lowrank_fusion(xs, factors).shape, mmfuse.lowrank_fusion(xs, factors).shape)
"""


@pytest.mark.parametrize("name", ["triton", "cupy"])
def test_an_unhashable_module_entry_is_no_crash(name):
    """The plan and registry keys hold each optional framework's sys.modules entry; an entry
    of a module class that is unhashable crashed every call in the registry's look-up (a
    review of the session's diff).  Such a call is chosen, not remembered."""
    done = subprocess.run([sys.executable, "-c", _UNHASHABLE_MODULE, name], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == "(2, 5) (2, 5)", done.stdout


def test_explain_answers_and_reference_implementations_pickle():
    """explain()'s answer held each table row's ``supports``, a closure, and the reference
    backend's functions carried the reference module's names (functools.wraps), under which
    pickle found other objects: neither pickled, so a multiprocessing pool could not return
    them (a review's find).  The answer compares equal after a round trip."""
    import pickle

    x = np.random.default_rng(6).standard_normal((4, 3))
    found = explain("lowrank_fusion", x)
    assert pickle.loads(pickle.dumps(found)) == found
    for impl in mmfuse.backends.implementations("moments"):
        assert pickle.loads(pickle.dumps(impl)) == impl
    for op in ("lowrank_fusion", "zoom_shift", "wander"):
        func = lookup(op, "reference", like=x)
        assert pickle.loads(pickle.dumps(func)) is func, op


def test_config_context_restores_the_settings_when_an_exception_leaves_the_block():
    before = mmfuse.get_config()
    # (pytest.raises outside: the exception leaves the config block, as a caller's would)
    with pytest.raises(KeyError), mmfuse.config_context(backend="reference", prefer="array_api"):
        raise KeyError("leaves the block")
    assert mmfuse.get_config() == before


def test_an_explicit_auto_reads_the_preference_and_leaves_the_configured_policy_alone():
    """backend="auto" named in a call reads the configured preference as the default does,
    and a later call without backend= still reads the configured backend (a policy cached
    for the explicit "auto" had stood in for it; a mutation review)."""
    x = np.random.default_rng().standard_normal((2, 5, 3))
    with mmfuse.config_context(prefer="reference"):
        assert explain("moments", x, backend="auto").chosen.backend == "reference"
    with mmfuse.config_context(backend="reference"):
        assert _config.backend_policy(None) == ("reference", None)
        assert _config.backend_policy("auto")[0] == "auto"
        assert _config.backend_policy(None) == ("reference", None)
        assert explain("moments", x).chosen.backend == "reference"


def test_layer_sizes_given_as_numpy_integers_are_kept_as_python_ints():
    torch = pytest.importorskip("torch")
    from mmfuse.nn import LowRankFusion

    layer = LowRankFusion([np.int64(4), 3], out_dim=np.int64(2), rank=np.int32(2), max_elements=np.int64(10**6))
    assert all(type(v) is int for v in (*layer.in_dims, layer.out_dim, layer.rank, layer.max_elements))
    assert layer([torch.randn(3, 4), torch.randn(3, 3)]).shape == (3, 2)
