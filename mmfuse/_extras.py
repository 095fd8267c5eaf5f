"""What installs each optional module: the ``mmfuse`` command's "install it with" messages and
the backends' "not installed" reasons take it from here (:func:`install_command`)."""

from __future__ import annotations

import sys

__all__ = ["install_command", "install_hint"]

#: optional top-level module -> the pip extra (pyproject.toml) that installs it
EXTRAS = {
    "torch": "torch",
    "numba": "numba",
    "numba_cuda": "numba",  # (the numba extra installs numba-cuda with numba)
    "cupy": "cupy",
    "jax": "jax",
    "dask": "dask",
    "tensorly": "tensorly",
    "matplotlib": "plot",
}
#: optional top-level modules no extra of ours is for: their own package
PACKAGES = {
    "triton": "triton",  # (it comes with torch's CUDA builds)
    "array_api_strict": "array-api-strict",
}


def install_command(module: str) -> str:
    """The pip command that installs ``module`` (a dotted name: its top-level package's), or
    for numba two, in one sentence.

    numba's: numba alone for the CPU kernels, since the numba extra also installs numba-cuda
    and its CUDA bindings (a few hundred MB a CPU-only machine has no use for); ask for
    ``numba_cuda`` where the CUDA kernels are what is missing."""
    top = module.split(".")[0]
    if top in PACKAGES:
        return f"pip install {PACKAGES[top]}"
    if top == "numba":
        return "pip install numba, or pip install 'mmfuse[numba]' for the CUDA kernels too"
    return f"pip install 'mmfuse[{EXTRAS.get(top, 'all')}]'"


def install_hint(exc: BaseException) -> str:
    """`` (pip install ...)`` for an import error that says an optional module is not installed,
    else "" (another error, or an import blocked by ``sys.modules[name] = None``, which
    installing would not lift)."""
    name = getattr(exc, "name", None)
    top = name.split(".")[0] if isinstance(name, str) else None
    if not isinstance(exc, ModuleNotFoundError) or top not in {*EXTRAS, *PACKAGES}:
        return ""
    if sys.modules.get(top, 0) is None:
        return ""
    return f" ({install_command(top)})"
