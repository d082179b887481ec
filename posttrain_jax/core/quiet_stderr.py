"""Keep the start-up noise of C++ libraries (TensorFlow, via seqio or clu) off the console.

TensorFlow prints "All log messages before absl::InitializeLog() ...", "Could
not find cuda drivers" and, on GPU-less hosts, "failed call to cuInit" from C++
before any log level applies. `quiet_stderr()` runs a block (an import, a
device setup) with the process's stderr, file descriptor 2, pointed at
/dev/null and restores it afterwards; a real failure still surfaces as the
Python exception it raises. POSTTRAIN_JAX_TF_LOGS=1 shows everything.
"""

import contextlib
import os
import sys

VERBOSE_ENV = "POSTTRAIN_JAX_TF_LOGS"


@contextlib.contextmanager
def quiet_stderr(path: str | None = None):
  """path: append stderr to this file instead (whatever VERBOSE_ENV says),
  e.g. a C++/Rust service's log that belongs in a run's directory."""
  if path is None and os.environ.get(VERBOSE_ENV):
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  try:
    with open(path or os.devnull, "a") as target:
      os.dup2(target.fileno(), 2)
    yield
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
