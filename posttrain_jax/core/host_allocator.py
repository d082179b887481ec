"""Host (glibc malloc) settings for XLA:CPU: keep freed memory for reuse.

XLA:CPU allocates each step's temporaries (logits, attention scores, their
gradients: tens of MB each) with malloc and frees them at the end of the step.
With glibc's defaults, blocks above the dynamic mmap threshold (at most 32 MB)
are fresh mmaps, and the per-thread arenas give freed pages back to the kernel,
so every step page-faults its working set in again: on the tiny model's train
step at 8 x 512 that was ~140k page faults per step and 0.7 of the 1.8 busy
cores in the kernel (docs/performance.md). With one arena and mmap/trim
thresholds of 2 GiB, freed blocks stay in the heap and are reused: the same
step ran 1.5x faster. The cost is that the process keeps its peak heap
(resident memory does not shrink after a large temporary is freed).

`configure()` applies this with `mallopt` before XLA's thread pool starts
(call it before the first JAX computation: the binaries, tools and tests do).
It only acts on Linux with glibc, and only when the run is on CPU: mode "auto"
(the default) applies it when JAX_PLATFORMS names cpu first or when no TPU/GPU
plugin is installed. Environment variable POSTTRAIN_JAX_HOST_ALLOCATOR:
"auto" | "tuned" (always) | "default" (never; glibc's own settings). Settings
given by the user through glibc's MALLOC_* variables are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import platform

ENV = "POSTTRAIN_JAX_HOST_ALLOCATOR"
MODES = ("auto", "tuned", "default")
# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_THRESHOLD = 2**31 - 1  # largest int mallopt takes: blocks up to 2 GiB stay in the heap
_USER_VARS = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_ACCELERATOR_PLUGINS = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm_plugin")

_applied: bool | None = None


def cpu_run() -> bool:
  """Whether JAX will compute on the CPU: JAX_PLATFORMS names cpu first, or
  (JAX_PLATFORMS unset) no TPU or GPU plugin is installed."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not any(importlib.util.find_spec(p) for p in _ACCELERATOR_PLUGINS)


def configure(mode: str | None = None) -> bool:
  """Applies the host allocator settings once per process; True if applied.

  mode: "auto" | "tuned" | "default"; None reads POSTTRAIN_JAX_HOST_ALLOCATOR
  (default "auto"). Later calls return the first call's result.
  """
  global _applied
  if _applied is not None:
    return _applied
  mode = mode or os.environ.get(ENV, "auto")
  if mode not in MODES:
    raise ValueError(f"{ENV}={mode!r}: expected one of {', '.join(MODES)}.")
  _applied = False
  if mode == "default" or (mode == "auto" and not cpu_run()):
    return False
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  if any(v in os.environ for v in _USER_VARS):
    return False  # the user's own malloc settings win
  libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  ok = all(libc.mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, _THRESHOLD), (_M_TRIM_THRESHOLD, _THRESHOLD)))
  _applied = ok
  return ok
