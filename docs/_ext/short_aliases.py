"""Show `jax.typing.ArrayLike` and `jax.typing.DTypeLike` by name in the API reference.

Python expands these aliases into long unions (``Array | ndarray | bool | number | ...``)
before autodoc sees them, and `autodoc_type_aliases` only applies to string annotations.
This puts the names back in the parameter types that autodoc records.
"""

import jax
from sphinx.application import Sphinx
from sphinx.util.typing import stringify_annotation

ALIASES = {
    "jax.typing.ArrayLike": jax.typing.ArrayLike,
    "jax.typing.DTypeLike": jax.typing.DTypeLike,
}


def _shorten(app: Sphinx, *args: object) -> None:
    annotations = app.env.current_document.autodoc_annotations
    for fields in annotations.values():
        for key, text in fields.items():
            for name, alias in ALIASES.items():
                for mode in ("smart", "fully-qualified-except-typing"):
                    text = text.replace(stringify_annotation(alias, mode), f"~{name}")
            fields[key] = text


def setup(app: Sphinx) -> dict:
    """Run after autodoc has recorded the type hints of an object."""
    app.connect("autodoc-process-signature", _shorten, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
