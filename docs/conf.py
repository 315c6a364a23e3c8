"""Sphinx configuration: the adamax_jax documentation, built offline."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent / "_ext"))

import adamax_jax  # noqa: E402

project = "adamax_jax"
author = "The adamax_jax authors"
copyright = "2026, The adamax_jax authors"  # noqa: A001
version = release = adamax_jax.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "local_mathjax",
    "public_api",
    "short_aliases",
]

exclude_patterns = ["_build", "**.ipynb_checkpoints"]
# `adamax_tour.ipynb` is a link to the notebook in `notebooks/`, so there is one copy.
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}

myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3
# MyST would configure MathJax 3 and mark every page `tex2jax_ignore`; MathJax 2 (below)
# then typesets nothing. Without it, MathJax 2 typesets Sphinx's \( \) and \[ \] spans.
myst_update_mathjax = False

# The notebook runs at every build: a cell that raises fails the build.
nb_execution_mode = "force"
nb_execution_raise_on_error = True
nb_execution_timeout = 600
nb_execution_show_tb = True

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# Nothing is fetched from the network, at build time or when a page is read:
# MathJax is served from the `jupyter-server-mathjax` package (see `_ext/local_mathjax.py`).
html_theme = "sphinx_book_theme"
html_title = f"adamax_jax {release}"
html_theme_options = {
    "show_toc_level": 2,
    "home_page_in_toc": True,
}
html_static_path: list[str] = []
mathjax_path = "mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full"
html_last_updated_fmt = None
