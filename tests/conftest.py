"""Test session setup: 8 virtual CPU devices for sharding tests.

XLA reads the flag when jax initialises its backend, so it is set here, before
any test module imports jax.
"""

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# The binaries' malloc settings for XLA:CPU (posttrain_jax/host_allocator.py),
# applied before any test starts a JAX computation.
from posttrain_jax import host_allocator  # pylint: disable=wrong-import-position

host_allocator.configure()
