"""Import TensorFlow quietly and CPU-only (the data pipeline never needs a GPU).

Import ``tf`` from here inside ``posttrain_jax.data`` so TF does not grab
accelerator memory meant for JAX, and its start-up lines stay off the console
(core/quiet_stderr.py).
"""

import os

from posttrain_jax.core.quiet_stderr import quiet_stderr

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

with quiet_stderr():
  import tensorflow as tf  # noqa: E402  pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], "GPU")
  except (RuntimeError, ValueError):  # already initialised, or no GPU support
    pass

__all__ = ["tf"]
