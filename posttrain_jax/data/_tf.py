"""Import TensorFlow quietly and CPU-only (the data pipeline never needs a GPU).

Import ``tf`` from here inside ``posttrain_jax.data`` so TF does not grab
accelerator memory meant for JAX, and its start-up lines stay off the console
(core/quiet_stderr.py).

AutoGraph (every `tf.data` map function) writes one `__autograph_generated_file*.py`
per converted function into the system temporary directory and deletes them
only at a normal interpreter exit, so every killed, preempted or `os._exit`ed
process (multi-process jobs, timeouts) left hundreds behind. Here they go into
one directory of this process, `posttrain_jax_autograph_<pid>_*` under the
temporary directory, removed at exit; the directories of processes that no
longer run are removed when the next process imports TensorFlow here.
"""

import atexit
import functools
import glob
import os
import shutil
import tempfile

from posttrain_jax.core.quiet_stderr import quiet_stderr

AUTOGRAPH_PREFIX = "posttrain_jax_autograph_"


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


def clean_stale_autograph_dirs() -> list[str]:
  """Removes the AutoGraph directories of processes that no longer run."""
  removed = []
  for path in glob.glob(os.path.join(tempfile.gettempdir(), AUTOGRAPH_PREFIX + "*")):
    pid = os.path.basename(path)[len(AUTOGRAPH_PREFIX):].partition("_")[0]
    if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
      shutil.rmtree(path, ignore_errors=True)
      removed.append(path)
  return removed


class _TempfileIn:
  """The `tempfile` module as AutoGraph's loader uses it, writing into one directory."""

  def __init__(self, directory: str):
    self.NamedTemporaryFile = functools.partial(tempfile.NamedTemporaryFile, dir=directory)  # pylint: disable=invalid-name

  def __getattr__(self, name):
    return getattr(tempfile, name)


def _own_autograph_files() -> None:
  try:
    from tensorflow.python.autograph.pyct import loader  # pylint: disable=g-import-not-at-top,g-direct-tensorflow-import
  except ImportError:  # another TF layout: leave AutoGraph as it is
    return
  if isinstance(loader.tempfile, _TempfileIn):
    return
  clean_stale_autograph_dirs()
  directory = tempfile.mkdtemp(prefix=f"{AUTOGRAPH_PREFIX}{os.getpid()}_")
  atexit.register(shutil.rmtree, directory, ignore_errors=True)
  loader.tempfile = _TempfileIn(directory)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

with quiet_stderr():
  import tensorflow as tf  # noqa: E402  pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], "GPU")
  except (RuntimeError, ValueError):  # already initialised, or no GPU support
    pass
  _own_autograph_files()

__all__ = ["tf"]
