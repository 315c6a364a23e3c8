"""Makes JAX strict, so that silent dtype or rank promotions fail loudly."""

import jax
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def standard_promotion():
    """For code under test that is not ours (optax, keras) and promotes implicitly."""
    with jax.numpy_dtype_promotion("standard"):
        yield
