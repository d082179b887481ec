"""posttrain_jax: post-training (distillation, RLHF, DiLoCo) of Gemma-2-like models in JAX."""

__version__ = "0.1.0"
