"""Run the examples of every public docstring as doctests.

Collected: each object of ``mmfuse.__all__`` (they are defined in private modules, so they are
collected one by one), the modules ``mmfuse``, ``mmfuse.reference`` (and its submodules),
``mmfuse.backends``, ``mmfuse.testing``, ``mmfuse.datasets`` and, when torch is importable,
``mmfuse.nn`` -- with everything their docstrings document (functions, classes, methods).
One test per docstring with examples, so a failure names the object.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import inspect

import numpy as np
import pytest

import mmfuse

MODULES = [
    "mmfuse",
    "mmfuse.reference",
    "mmfuse.reference.fusion",
    "mmfuse.reference.sequence",
    "mmfuse.reference.align",
    "mmfuse.backends",
    "mmfuse.backends._registry",
    "mmfuse.testing",
    "mmfuse.datasets",
]
if importlib.util.find_spec("torch") is not None:
    MODULES.append("mmfuse.nn")

OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _collect() -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(exclude_empty=True)
    tests: dict[str, doctest.DocTest] = {}

    def add(found: list[doctest.DocTest]) -> None:
        for t in found:
            if t.examples and t.name not in tests:
                tests[t.name] = t

    for name in mmfuse.__all__:
        obj = getattr(mmfuse, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            add(finder.find(obj, f"mmfuse.{name}", module=inspect.getmodule(obj), globs={}))
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        add(finder.find(module, module_name, globs={}))
        for attr in getattr(module, "__all__", []):
            obj = getattr(module, attr, None)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__ != module_name:
                add(finder.find(obj, f"{module_name}.{attr}", module=inspect.getmodule(obj), globs={}))
    return sorted(tests.values(), key=lambda t: t.name)


DOCTESTS = _collect()


def test_doctests_were_found() -> None:
    """Guard against a collector that silently finds nothing."""
    names = {t.name for t in DOCTESTS}
    for expected in ("mmfuse.lowrank_fusion", "mmfuse.tensor_fusion", "mmfuse.align"):
        assert expected in names, f"no doctest collected for {expected}; found {sorted(names)}"


@pytest.mark.parametrize("test", DOCTESTS, ids=[t.name for t in DOCTESTS])
def test_docstring_examples(test: doctest.DocTest, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MMFUSE_BACKEND", raising=False)
    test.globs = {}  # every example must run as written, with its own imports
    out: list[str] = []
    runner = doctest.DocTestRunner(optionflags=OPTIONFLAGS)
    with np.printoptions(legacy=False):
        result = runner.run(test, out=out.append, clear_globs=True)
    if result.failed:
        pytest.fail(f"{result.failed} of {result.attempted} examples failed in {test.name}:\n" + "".join(out))
