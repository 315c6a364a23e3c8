"""Runnable examples: ``python -m adamax_jax.examples.<name>``."""
