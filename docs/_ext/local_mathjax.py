"""Serve MathJax from the local `jupyter-server-mathjax` package instead of a CDN.

The files are copied into the built site's `_static/mathjax/`, so the pages render their
maths with no network, at build time or when they are read.
"""

import shutil
from pathlib import Path

import jupyter_server_mathjax
from sphinx.application import Sphinx

MATHJAX = Path(jupyter_server_mathjax.__file__).resolve().parent / "static"


def _copy(app: Sphinx, exception: Exception | None) -> None:
    if exception is None and app.builder.format == "html":
        shutil.copytree(MATHJAX, Path(app.outdir) / "_static" / "mathjax", dirs_exist_ok=True)


def setup(app: Sphinx) -> dict:
    """Copy the local MathJax 2.7 into the site; `conf.py` sets `mathjax_path` to it."""
    if not (MATHJAX / "MathJax.js").is_file():
        raise RuntimeError(f"MathJax.js not found in {MATHJAX}")
    app.connect("build-finished", _copy)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
