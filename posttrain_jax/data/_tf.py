"""Import TensorFlow quietly and CPU-only (the data pipeline never needs a GPU).

Import ``tf`` from here inside ``posttrain_jax.data`` so the log level is set
before TensorFlow loads and TF does not grab accelerator memory meant for JAX.
"""

import os

# 3 also hides C++ ERROR lines such as "failed call to cuInit" on GPU-less
# hosts; real failures still surface as Python exceptions. Override via env.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

try:
    tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):  # already initialised, or no GPU support
    pass

__all__ = ["tf"]
