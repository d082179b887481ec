"""Which JAX platforms a process initialises: no TPU probe where no TPU exists.

With libtpu installed (the `tpu` extra, which the `test` extra pulls in for the
compile-only TPU plans of posttrain_jax/aot), jax initialises the TPU backend at
start-up unless JAX_PLATFORMS is set: on a host without a TPU, libtpu looks for
the chips and the TPU metadata, fails, and prints several error lines to
stderr before jax falls back to the CPU. `skip_absent_tpu` (applied when
posttrain_jax is imported) removes "tpu" from the platforms in that case only:
JAX_PLATFORMS already set, a TPU device present (/dev/accel*, /dev/vfio/*) or
libtpu not installed leave everything as it was. Compile-only TPU devices
(jax.experimental.topologies) need no TPU backend, so they work under
JAX_PLATFORMS=cpu.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys


def tpu_device_present() -> bool:
  """A TPU chip on this host: /dev/accel* (v4, v5e, v6e) or /dev/vfio/* (v5p)."""
  return bool(glob.glob("/dev/accel*") or
              [p for p in glob.glob("/dev/vfio/*") if os.path.basename(p) != "vfio"])


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):
    return False


def platforms_without_tpu() -> str:
  """The platforms jax would try, minus TPU: a GPU plugin whose device exists, then cpu."""
  platforms = []
  if (any(_installed(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin")) and
      os.path.exists("/dev/nvidiactl")):
    platforms.append("cuda")
  if _installed("jax_rocm60_plugin") and os.path.exists("/dev/kfd"):
    platforms.append("rocm")
  return ",".join(platforms + ["cpu"])


def skip_absent_tpu() -> str | None:
  """Sets JAX_PLATFORMS (and jax's flag, if jax is already imported) to the
  platforms without TPU when libtpu is installed, no TPU device exists and
  JAX_PLATFORMS is unset. Returns the value set, or None (nothing changed)."""
  if "JAX_PLATFORMS" in os.environ or tpu_device_present() or not _installed("libtpu"):
    return None
  value = platforms_without_tpu()
  os.environ["JAX_PLATFORMS"] = value
  jax = sys.modules.get("jax")
  if jax is not None:  # imported before posttrain_jax: jax read the environment already
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    if not xla_bridge.backends_are_initialized():
      jax.config.update("jax_platforms", value)
  return value
