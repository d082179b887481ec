"""host_allocator: glibc malloc settings that stop XLA:CPU page-faulting its
temporaries in again every step."""

import json
import os
import platform
import subprocess
import sys

import pytest

from posttrain_jax.core import host_allocator

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_PROBE = r"""
import ctypes, json, resource, sys
from posttrain_jax.core import host_allocator
applied = host_allocator.configure(sys.argv[1])
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
pages = 0
for i in range(20):  # a 64 MiB temporary, written and freed, 20 times
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  block = libc.malloc(64 << 20)
  ctypes.memset(block, 1, 64 << 20)
  libc.free(block)
  if i:
    pages += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": applied, "faults": pages}))
"""


def _probe(mode):
  env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
  env.pop(host_allocator.ENV, None)
  out = subprocess.run([sys.executable, "-c", _PROBE, mode], env=env, cwd=REPO,
                       capture_output=True, text=True, check=True, timeout=120)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="mallopt settings are glibc-only")
def test_tuned_allocator_reuses_freed_memory_instead_of_faulting_it_in():
  default, tuned = _probe("default"), _probe("tuned")
  assert default["applied"] is False and tuned["applied"] is True
  # glibc's defaults: every 64 MiB temporary is a fresh mmap, faulted in again
  # (19 x 16k pages of 4 KiB; fewer where the kernel backs it with huge pages).
  assert default["faults"] > 19 * 8
  # tuned: the freed block is reused from the heap, no new faults.
  assert tuned["faults"] * 10 < default["faults"]


def test_modes_and_cpu_detection(monkeypatch):
  monkeypatch.setattr(host_allocator, "_applied", None)
  with pytest.raises(ValueError, match="POSTTRAIN_JAX_HOST_ALLOCATOR"):
    host_allocator.configure("fast")
  monkeypatch.setattr(host_allocator, "_applied", None)
  assert host_allocator.configure("default") is False
  assert host_allocator.configure("tuned") is False  # first call decides
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert host_allocator.cpu_run()
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert not host_allocator.cpu_run()
  monkeypatch.setattr(host_allocator, "_applied", None)
  assert host_allocator.configure("auto") is False  # a GPU run keeps glibc's settings
  monkeypatch.setattr(host_allocator, "_applied", None)
  monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
  assert host_allocator.configure("tuned") is False  # the user's MALLOC_* settings win
