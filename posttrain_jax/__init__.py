"""posttrain_jax: post-training (distillation, RLHF, DiLoCo) of Gemma-2-like models in JAX.

Subpackages, in dependency order (each imports only those before it):
core, models and data, inference and interop, distillation, rl, merging, diloco,
jobs; the binary (`main`, `cli`) sits on top. See docs/architecture.md.
"""

import os as _os

__version__ = "0.1.0"

# The repository's gin/ folder (model presets, experiments), searched for
# `--gin_file` and gin `include`s.
GIN_DIR = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "gin")

# No TPU probe (and no libtpu error lines) on hosts without a TPU when libtpu is
# installed (the `tpu` extra): JAX_PLATFORMS without "tpu" unless it is set.
from posttrain_jax.core import platforms as _platforms  # pylint: disable=g-import-not-at-top

_platforms.skip_absent_tpu()
