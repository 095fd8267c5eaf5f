"""Sphinx configuration of the mmfuse documentation.

Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html`` (``tox -e docs``).
Everything that shows numbers (worked examples, support table, gallery) is computed at build
time from the installed package; math is rendered by a vendored copy of MathJax 3
(``_static/mathjax``), so the pages need no network when they are viewed.
"""

from __future__ import annotations

import os
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(HERE, "_ext"))
sys.path.insert(0, ROOT)  # a source checkout documents itself even before ``pip install -e .``

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import mmfuse  # noqa: E402

# --------------------------------------------------------------------------- project

project = "mmfuse"
author = "the mmfuse developers"
copyright = "the mmfuse developers, BSD-3-Clause"
version = release = mmfuse.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
    "matplotlib.sphinxext.plot_directive",
    "mmfuse_docs",
]

exclude_patterns = ["_build", "performance/*", "**.ipynb_checkpoints", "gallery/*.py", "gallery/*.zip"]
root_doc = "index"
nitpicky = False
suppress_warnings: list[str] = []

# --------------------------------------------------------------------------- math (offline)

# MathJax 3.2.2 from the npm registry (``npm pack mathjax@3``): es5/tex-chtml.js plus the
# woff-v2 fonts it loads relative to itself.  No CDN at view time.
mathjax_path = "mathjax/tex-chtml.js"
mathjax3_config = {"options": {"enableMenu": False}}

# --------------------------------------------------------------------------- API reference

autosummary_generate = True
autosummary_imported_members = True
autodoc_default_options = {"members": False}
autodoc_typehints = "none"
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
numpydoc_validation_checks: set[str] = set()
add_module_names = False

intersphinx_mapping: dict[str, tuple[str, str | None]] = {}  # offline build: no inventories

# --------------------------------------------------------------------------- gallery

sphinx_gallery_conf = {
    "examples_dirs": os.path.join(ROOT, "examples"),
    "gallery_dirs": "gallery",
    # Only the plot_*.py files are gallery examples; ddp_lowrank.py and
    # dask_distributed_fusion.py (launchers for several processes) are neither executed nor
    # listed.
    "filename_pattern": r"/plot_",
    "ignore_pattern": r"^(?!.*plot_)",
    "download_all_examples": False,
    "remove_config_comments": True,
    "within_subsection_order": "FileNameSortKey",
    "plot_gallery": "True",
    "abort_on_example_error": True,
    "only_warn_on_example_error": False,
    "min_reported_time": 1,
    "matplotlib_animations": False,
    "reference_url": {"mmfuse": None},
    "show_memory": False,
    "image_scrapers": ("matplotlib",),
}

# --------------------------------------------------------------------------- plots

plot_include_source = True
plot_html_show_source_link = False
plot_html_show_formats = False
plot_formats = [("png", 100)]
plot_rcparams = {"figure.figsize": (6.4, 3.6), "font.size": 10}
plot_pre_code = "import numpy as np\nimport matplotlib.pyplot as plt\nimport mmfuse\n"

# --------------------------------------------------------------------------- HTML

html_theme = "furo"
html_title = f"mmfuse {release}"
html_static_path = ["_static"]
html_css_files = ["mmfuse.css"]
html_show_sourcelink = False
html_theme_options = {"navigation_with_keys": True}

# Deprecation chatter from third-party packages must not fail a -W build; our own warnings
# (and every Sphinx warning) still do.
warnings.filterwarnings("ignore", category=DeprecationWarning, module="(?!mmfuse)")
