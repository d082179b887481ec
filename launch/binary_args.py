"""What the launchers share: the training binary's own arguments and errors."""

from __future__ import annotations

from collections.abc import Sequence

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
