"""Model family: Gemma-2-like decoders with logical axis names."""

from posttrain_jax.models.config import ModelConfig
from posttrain_jax.models.gemma2 import Transformer

__all__ = ["ModelConfig", "Transformer"]
