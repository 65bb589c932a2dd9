"""unifer_jax: a multimodal LLM for facial expression recognition, in JAX/Flax."""

__version__ = '0.1.0'
