"""What the launchers share: the binary, its own arguments, its environment, errors."""

from __future__ import annotations

from collections.abc import Sequence
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY_MODULE = "posttrain_jax.main"

# The launcher -> binary environment contract; posttrain_jax/distributed.py
# reads these (the launchers do not import jax, so the names are repeated there).
ENV_COORDINATOR = "POSTTRAIN_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "POSTTRAIN_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "POSTTRAIN_JAX_PROCESS_ID"
ENV_DISTRIBUTED = "POSTTRAIN_JAX_DISTRIBUTED"

# Arguments that belong to the training binary (posttrain_jax.cli.parse_flags).
BINARY_FLAGS = ("--gin_file", "--gin_bindings", "--gin_search_paths", "--module_import")


class LaunchError(Exception):
  """A usage or configuration problem, reported as one line."""


def is_binary_arg(arg: str) -> bool:
  name = arg.partition("=")[0]
  return name.startswith("--gin.") or name in BINARY_FLAGS


def split_binary_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separates the training binary's arguments (order kept) from the rest.

  `--gin_file F` (space-separated) becomes `--gin_file=F`; every other
  argument is passed through unchanged, as one list element.
  """
  own, binary = [], []
  args = list(argv)
  i = 0
  while i < len(args):
    arg = args[i]
    name, eq, _ = arg.partition("=")
    if is_binary_arg(arg):
      if not eq:
        if name.startswith("--gin."):
          raise LaunchError(f"{arg}: expected --gin.NAME=VALUE (one argument).")
        if i + 1 >= len(args):
          raise LaunchError(f"{name} needs a value.")
        i += 1
        arg = f"{name}={args[i]}"
      binary.append(arg)
    else:
      own.append(arg)
    i += 1
  return own, binary
