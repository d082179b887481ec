"""What the launchers share: the binary, its own arguments, its environment, errors."""

from __future__ import annotations

from collections.abc import Sequence
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY_MODULE = "posttrain_jax.main"

# The launcher -> binary environment contract; posttrain_jax/core/distributed.py
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


# Gin arguments of the binary: quoting and checks before a launch.

def gin_string(value: str) -> str:
  """A gin string literal that parses back to exactly `value`."""
  return repr(str(value))


def bindings_of(binary_args: Sequence[str]) -> list[tuple[str, str]]:
  """(argument, gin binding text) for each --gin.NAME=VALUE / --gin_bindings."""
  out = []
  for arg in binary_args:
    name, _, value = arg.partition("=")
    if name.startswith("--gin."):
      out.append((arg, f"{name[len('--gin.'):]} = {value}"))
    elif name == "--gin_bindings":
      out.append((arg, value))
  return out


def check_bindings(binary_args: Sequence[str]) -> None:
  """Gin syntax check of every binding (skipped when gin is not installed)."""
  try:
    from gin import config as gin_config  # pylint: disable=g-import-not-at-top
    from gin import config_parser  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  for arg, binding in bindings_of(binary_args):
    try:
      list(config_parser.ConfigParser(
          binding, gin_config.ParserDelegate(skip_unknown=True)))
    except SyntaxError as e:
      detail = str(e).splitlines()[-1].strip() if str(e) else "syntax error"
      raise LaunchError(
          f"{arg}: not a valid gin binding ({detail}). String values need "
          "quotes inside the shell quotes, e.g. --gin.RUN_DIR=\"'gs://b/x'\"; "
          "tuples ('(\"local\", \"global\")'), references (@ModelConfig()) "
          "and numbers need none.") from e


def binds(binary_args: Sequence[str], macro: str) -> bool:
  return any(re.match(rf"\s*{re.escape(macro)}\s*=", b)
             for _, b in bindings_of(binary_args))


def check_gin_files(binary_args: Sequence[str], source: str) -> None:
  """Gin files are read inside the image: they must be in the source tree."""
  dirs = [source, os.path.join(source, "gin")]
  for arg in binary_args:
    name, _, value = arg.partition("=")
    if name == "--gin_search_paths":
      dirs += [os.path.join(source, p) for p in value.split(",") if p]
  for arg in binary_args:
    name, _, path = arg.partition("=")
    if name != "--gin_file":
      continue
    if os.path.isabs(path):
      raise LaunchError(f"{arg}: give gin files relative to the source "
                        f"directory {source} (the image's working directory).")
    if not any(os.path.isfile(os.path.join(d, path)) for d in dirs):
      raise LaunchError(f"{arg}: not found under {', '.join(dirs)}.")
