"""The install hints (:mod:`mmfuse._extras`) name extras that exist and install the module."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mmfuse._extras import EXTRAS, PACKAGES, install_command, install_hint

tomllib = pytest.importorskip("tomllib")  # (Python 3.11 on; 3.10 skips these checks)
PYPROJECT = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
OPTIONAL = PYPROJECT["project"]["optional-dependencies"]

# the distribution that provides each optional module (where its name differs)
DISTRIBUTION = {"numba_cuda": "numba-cuda", "cupy": "cupy-cuda12x"}


def _names(requirements):
    return {r.split(";")[0].split("[")[0].split(">")[0].split("=")[0].strip() for r in requirements}


@pytest.mark.parametrize("module", sorted(EXTRAS))
def test_each_extra_exists_and_installs_its_module(module):
    extra = EXTRAS[module]
    assert extra in OPTIONAL, f"{module}: no extra {extra!r} in pyproject.toml"
    assert DISTRIBUTION.get(module, module) in _names(OPTIONAL[extra])
    assert f"mmfuse[{extra}]" in install_command(f"{module}.submodule")


def test_plain_packages_and_numba():
    assert install_command("triton.language") == "pip install triton"
    assert install_command("array_api_strict") == "pip install array-api-strict"
    # numba alone for the CPU kernels, the extra for the CUDA ones too
    assert install_command("numba").startswith("pip install numba, or pip install 'mmfuse[numba]'")
    assert set(EXTRAS).isdisjoint(PACKAGES)


def test_install_hint_only_for_a_missing_optional_module(monkeypatch):
    assert install_hint(ModuleNotFoundError("No module named 'jax'", name="jax")) == " (pip install 'mmfuse[jax]')"
    assert install_hint(ModuleNotFoundError("x", name="dask.array")) == " (pip install 'mmfuse[dask]')"
    assert install_hint(ModuleNotFoundError("x", name="requests")) == ""  # not one of ours
    assert install_hint(ImportError("x", name="jax")) == ""  # broken, not missing
    assert install_hint(ValueError("jax")) == ""
    monkeypatch.setitem(sys.modules, "jax", None)  # blocked: installing would not lift it
    assert install_hint(ModuleNotFoundError("x", name="jax")) == ""


def test_the_docs_extra_is_what_the_docs_build_installs():
    """``pip install -e .[docs]`` builds the docs: the extra states what tox and CI install from
    docs/requirements.txt (it had lacked furo, the theme, and torch, which the pages' cells
    run; a docs review's find)."""
    lines = (Path(__file__).parents[1] / "docs" / "requirements.txt").read_text().splitlines()
    wanted = [line.split("#")[0].strip() for line in lines]
    assert sorted(OPTIONAL["docs"]) == sorted(r for r in wanted if r)
