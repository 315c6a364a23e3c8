"""Fail the build when a public name of `adamax_jax` has no entry in the API reference.

Every name in `adamax_jax.__all__` must be documented as a Python object
`adamax_jax.<name>` (by an `autofunction`, `autoclass`, ... directive). A name that is
missing is reported as a warning, which `sphinx-build -W` turns into an error.
"""

from collections.abc import Iterable

from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.util import logging

import adamax_jax

logger = logging.getLogger(__name__)


def undocumented(public: Iterable[str], documented: Iterable[str]) -> list[str]:
    """The public names without a documented object `adamax_jax.<name>`, sorted."""
    have = set(documented)
    return sorted(name for name in public if f"adamax_jax.{name}" not in have)


def _check(app: Sphinx, env: BuildEnvironment) -> None:
    documented = env.get_domain("py").objects  # type: ignore[attr-defined]
    for name in undocumented(adamax_jax.__all__, documented):
        logger.warning(
            "public name `adamax_jax.%s` (in `adamax_jax.__all__`) has no entry in the "
            "API reference (docs/api.md)",
            name,
        )


def setup(app: Sphinx) -> dict:
    """Check the API reference against `adamax_jax.__all__` once every page is read."""
    app.connect("env-check-consistency", _check)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
