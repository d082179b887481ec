"""AutoGraph's generated files stay in a directory of the process (data/_tf.py):
removed at exit, and after a killed process by the next one."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHILD = """
import os, sys
from posttrain_jax.data._tf import tf

@tf.function
def absolute(x):  # a Python `if` on a tensor: AutoGraph converts it (one file)
  if x > 0:
    return x
  return -x

assert int(absolute(tf.constant(-3))) == 3
if sys.argv[1] == "die":
  os._exit(0)  # as a multi-process job's os._exit or a SIGKILL: no atexit
"""


def _child(tmp_path, how):
  env = dict(os.environ, PYTHONPATH=REPO, TMPDIR=str(tmp_path / "tmp"))
  proc = subprocess.run([sys.executable, str(tmp_path / "child.py"), how], env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  return sorted(os.listdir(tmp_path / "tmp"))


def test_autograph_files_never_pile_up_in_the_temporary_directory(tmp_path):
  (tmp_path / "tmp").mkdir()
  (tmp_path / "child.py").write_text(CHILD)
  # A process that dies without atexit leaves its one directory (and nothing
  # loose in the temporary directory) ...
  [left] = _child(tmp_path, "die")
  assert left.startswith("posttrain_jax_autograph_")
  files = os.listdir(tmp_path / "tmp" / left)
  assert files and all(f.startswith("__autograph_generated_file") for f in files)
  # ... which the next process removes; its own goes at its normal exit.
  assert _child(tmp_path, "exit") == []
