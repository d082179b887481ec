"""Test session setup: 8 virtual CPU devices for sharding tests, and one
persistent compilation cache for the session.

XLA reads the flag when jax initialises its backend, so it is set here, before
any test module imports jax. The compilation cache is a fresh directory per
session (unless JAX_COMPILATION_CACHE_DIR is already set), passed through the
environment so that the subprocesses of the binary, launch and multi-process
tests share it: the resume tests compile the same programs two or three times
and many tests build identical tiny models, so most of their compile time
becomes a cache read (the gin-configured DiLoCo distillation test: 212 s ->
~90 s).
"""

import atexit
import os
import shutil
import tempfile

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  _cache_dir = tempfile.mkdtemp(prefix="posttrain_jax_test_jit_cache_")
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

# The binaries' malloc settings for XLA:CPU (posttrain_jax/core/host_allocator.py),
# applied before any test starts a JAX computation.
from posttrain_jax.core import host_allocator  # pylint: disable=wrong-import-position

host_allocator.configure()


def pytest_xdist_auto_num_workers(config):
  """`-n auto` (pytest.ini): one worker per core, at most 4. Most tests compile
  and run small programs on one thread, so two workers on two cores nearly
  halve the suite's time; each worker holds its own 8 virtual devices and
  models, hence the cap. `-n 0` runs in one process (e.g. to debug a test)."""
  del config
  return max(1, min(os.cpu_count() or 1, 4))


def pytest_sessionfinish(session, exitstatus):
  """AutoGraph's generated files (posttrain_jax/data/_tf.py): each process
  removes its own directory at exit; those of the subprocesses the tests
  killed are removed here."""
  del session, exitstatus
  import sys  # pylint: disable=g-import-not-at-top
  tf_module = sys.modules.get("posttrain_jax.data._tf")
  if tf_module is not None:
    tf_module.clean_stale_autograph_dirs()
