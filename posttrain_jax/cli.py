"""Gin at the edge: flags, configurable registration and one-line errors.

Conventions follow t5x: repeatable `--gin_file` (later files override earlier
ones), `--gin_bindings`, and `--gin.NAME=VALUE` as sugar for the binding
`NAME = VALUE` (string values need quotes: --gin.RUN_DIR="'runs/x'").
Included gin files are searched in the repository's `gin/` folder, the current
directory and `--gin_search_paths`.
"""

from __future__ import annotations

import collections.abc
from collections.abc import Callable, Sequence
import dataclasses
import difflib
import gc
import inspect
import os
import re
import sys
import types
import typing

import gin
from gin import config as gin_config_lib
from gin import config_parser

from posttrain_jax import GIN_DIR


class ConfigError(Exception):
  """A configuration problem, reported as one line without a traceback."""

  exit_code = 2


class RunError(ConfigError):
  """A run that stopped for a stated reason (e.g. non-finite losses); exit 1."""

  exit_code = 1


@dataclasses.dataclass
class GinFlags:
  gin_files: list[str]
  bindings: list[str]
  search_paths: list[str]
  rest: list[str]


def parse_flags(argv: Sequence[str]) -> GinFlags:
  """Splits argv into gin files, bindings, search paths and other arguments."""
  flags = GinFlags([], [], [], [])
  args = list(argv)
  i = 0
  while i < len(args):
    arg = args[i]
    name, eq, value = arg.partition("=")
    if name in ("--gin_file", "--gin_bindings", "--gin_search_paths") and not eq:
      if i + 1 >= len(args):
        raise ConfigError(f"{name} needs a value.")
      i += 1
      value = args[i]
    if name == "--gin_file":
      flags.gin_files.append(value)
    elif name == "--gin_bindings":
      flags.bindings.append(value)
    elif name == "--gin_search_paths":
      flags.search_paths.extend(p for p in value.split(",") if p)
    elif name.startswith("--gin."):
      if not eq:
        raise ConfigError(f"{arg}: expected --gin.NAME=VALUE.")
      flags.bindings.append(f"{name[len('--gin.'):]} = {value}")
    else:
      flags.rest.append(arg)
    i += 1
  return flags


def register(fn_or_cls, name: str | None = None):
  """Registers a plain library function/class with gin; returns the gin wrapper."""
  return gin.external_configurable(fn_or_cls, name=name, module="posttrain_jax")


def _registered() -> dict[str, Callable]:
  # gin exposes no public listing of its registry
  return {c.name: c.wrapped
          for _, c in gin_config_lib._REGISTRY.items()}  # pylint: disable=protected-access


def _matches(word: str, options, n: int = 3, cutoff: float = 0.5) -> list[str]:
  """The n options closest to word (difflib ratio >= cutoff), ignoring case."""
  by_lower: dict[str, str] = {}
  for option in options:
    by_lower.setdefault(option.lower(), option)
  return [by_lower[m] for m in
          difflib.get_close_matches(word.lower(), list(by_lower), n=n, cutoff=cutoff)]


def _closest(word: str, options, n: int = 3) -> str:
  matches = _matches(word, options, n)
  return f" Did you mean: {', '.join(matches)}?" if matches else ""


def _closest_configurables(word: str, registry) -> str:
  """Close names (a looser second pass: 'PPOXYZ' -> GRPO, ...), else every
  registered name, so an unknown configurable always comes with choices."""
  matches = _matches(word, registry) or _matches(word, registry, cutoff=0.3)
  if matches:
    return f" Did you mean: {', '.join(matches)}?"
  return f" Registered configurables: {', '.join(sorted(registry, key=str.lower))}."


def _parameters(fn) -> list[str]:
  target = fn.__init__ if inspect.isclass(fn) else fn
  try:
    return [p for p in inspect.signature(target).parameters if p != "self"]
  except (TypeError, ValueError):
    return []


def explain(error: Exception) -> str:
  """Turns a gin/Python configuration error into one clear line."""
  text = str(error)
  first = text.splitlines()[0] if text else type(error).__name__
  where = ""
  m = re.search(r"\n\s+In (?:file \"([^\"]+)\", line (\d+)|bindings string line (\d+))\n\s*(.*)", text)
  if m:
    source = f"{m.group(1)}:{m.group(2)}" if m.group(1) else "command line"
    where = f" (in {source}: `{m.group(4).strip()}`)"
  registry = _registered()
  m = re.match(r"No configurable matching (?:reference )?'@?([\w./]+?)(?:\(\))?'", first)
  if m:
    name = m.group(1).split("/")[-1]
    return f"Unknown configurable '{name}'{where}.{_closest_configurables(name, registry)}"
  m = re.match(r"Configurable '([\w.]+)' doesn't have a parameter named '(\w+)'", first)
  if m:
    fn = registry.get(m.group(1).split(".")[-1])
    params = _parameters(fn) if fn else []
    return (f"Unknown parameter '{m.group(2)}' of '{m.group(1)}'{where}."
            f"{_closest(m.group(2), params)}")
  m = re.match(r"([\w./]+)/macro\.value set to `%gin.REQUIRED`", first)
  if m:
    macro = m.group(1).split("/")[-1]
    return (f"Required macro {macro} is not set: add `{macro} = ...` to a gin file "
            f"or pass --gin.{macro}=VALUE.")
  m = re.match(r"([\w./]+) set to `%gin.REQUIRED`", first)
  if m:
    return (f"Required setting {m.group(1)} is not set: pass "
            f"--gin.{m.group(1)}=VALUE.")
  m = re.match(r"No bindings specified for '([\w./]+)/gin.macro'", first)
  if m:
    macro = m.group(1).split("/")[-1]
    return f"Macro %{macro} is used but never defined: add `{macro} = ...` or pass --gin.{macro}=VALUE."
  m = re.search(r"missing \d+ required (?:keyword-only |positional )?arguments?: (.*)", first)
  if m:
    return f"Missing required setting(s) {m.group(1)}{where}: bind them in a gin file or with --gin.NAME=VALUE."
  if isinstance(error, SyntaxError) or "Failed to parse" in text or "malformed" in first:
    token = re.search(r"Failed to parse token '([^']*)'", text)
    hint = " String values need quotes, e.g. --gin.RUN_DIR=\"'runs/x'\"."
    location = ""
    if getattr(error, "filename", None) and error.filename != "<string>":
      location = f" (in {error.filename}:{error.lineno})"
    return (f"invalid value{where or location}"
            f"{' at ' + repr(token.group(1)) if token else ''}.{hint}")
  if isinstance(error, OSError) or "Unable to open file" in text:
    return f"Gin file not found: {first}"
  return f"{type(error).__name__}: {first}{where}"


def strip_gin_context(text: str) -> str:
  """Drops the "In call to configurable ..." lines gin appends to exceptions."""
  return re.split(r"\n\s*In call to configurable", text)[0].strip()


def configure(flags: GinFlags, finalize: bool = True) -> None:
  """Parses gin files then bindings (later wins); raises ConfigError.

  finalize=False skips gin's finalize hooks (the check that every
  %gin.REQUIRED value is set): parsing alone, e.g. to check a gin file.
  """
  for path in [GIN_DIR, os.path.join(os.getcwd(), "gin"), os.getcwd(),
               *flags.search_paths]:
    gin.add_config_file_search_path(path)
  for path in flags.gin_files:
    if not os.path.exists(path) and not any(
        os.path.exists(os.path.join(d, path)) for d in [GIN_DIR, *flags.search_paths]):
      raise ConfigError(f"Gin file not found: {path} (searched ., {GIN_DIR}"
                        f"{', ' + ', '.join(flags.search_paths) if flags.search_paths else ''}).")
  for binding in flags.bindings:
    try:  # syntax only: nothing is bound yet
      list(config_parser.ConfigParser(
          binding, gin_config_lib.ParserDelegate(skip_unknown=True)))
    except SyntaxError as e:
      raise ConfigError(
          f"Could not parse the binding `{binding}`: {explain(e)}") from e
  # gin also registers a reader that resolves "a/b.gin" as a resource of a
  # Python package "a": with a directory such as ./runs/ (our run directories)
  # in the working directory, `include 'runs/train.gin'` then crashes inside
  # gin. Our gin files are plain files found through the search paths, so keep
  # only the plain-file reader.
  gin_config_lib._FILE_READERS[:] = [  # pylint: disable=protected-access
      (reader, exists) for reader, exists in gin_config_lib._FILE_READERS  # pylint: disable=protected-access
      if reader is open]
  try:
    # Finalizing runs gin's checks for unset %gin.REQUIRED values and unknown
    # references now, before any work starts.
    gin.parse_config_files_and_bindings(flags.gin_files, flags.bindings,
                                        finalize_config=finalize)
  except (ValueError, SyntaxError, OSError, TypeError) as e:
    raise ConfigError(explain(e)) from e
  check_binding_types()


# ---------------------------------------------------------------------------
# Bound values against the configurables' annotations, before any work starts.

_MACRO = "gin.macro"


def _resolve_macros(value, depth: int = 0):
  """`%NAME` references replaced by the macro's bound value (recursively)."""
  if depth > 20:
    return value
  if isinstance(value, gin_config_lib.ConfigurableReference):
    if value.configurable.selector == _MACRO:
      scope = value.scoped_selector.rpartition("/")[0]
      bound = gin_config_lib._CONFIG.get((scope, _MACRO), {})  # pylint: disable=protected-access
      if "value" in bound:
        return _resolve_macros(bound["value"], depth + 1)
    return value
  if isinstance(value, (list, tuple)):
    return type(value)(_resolve_macros(v, depth + 1) for v in value)
  if isinstance(value, dict):
    return {k: _resolve_macros(v, depth + 1) for k, v in value.items()}
  return value


def conforms(value, annotation) -> bool:
  """Whether a gin literal fits a parameter annotation. References to other
  configurables (`@X()`) and unknown typing constructs are not judged."""
  if isinstance(value, gin_config_lib.ConfigurableReference) or value is gin.REQUIRED:
    return True
  if annotation in (inspect.Parameter.empty, typing.Any):
    return True
  origin, args = typing.get_origin(annotation), typing.get_args(annotation)
  if origin in (typing.Union, types.UnionType):
    return any(conforms(value, a) for a in args)
  if annotation is type(None):
    return value is None
  if origin is typing.Literal:
    return value in args
  if annotation is bool:
    return isinstance(value, bool)
  if annotation is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if annotation is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if annotation is str:
    return isinstance(value, str)
  if origin in (dict, collections.abc.Mapping):
    if not isinstance(value, collections.abc.Mapping):
      return False
    key, val = args or (typing.Any, typing.Any)
    return all(conforms(k, key) and conforms(v, val) for k, v in value.items())
  if origin is tuple:
    if not isinstance(value, (tuple, list)):
      return False
    if len(args) == 2 and args[1] is Ellipsis:
      return all(conforms(v, args[0]) for v in value)
    return not args or (len(args) == len(value) and
                        all(conforms(v, a) for v, a in zip(value, args)))
  if origin in (list, collections.abc.Sequence):
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
      return False
    return not args or all(conforms(v, args[0]) for v in value)
  if origin is collections.abc.Callable or annotation is collections.abc.Callable:
    return callable(value)
  if isinstance(annotation, type) and origin is None:
    return isinstance(value, annotation)
  return True


def _type_hints(fn) -> dict[str, typing.Any]:
  try:
    if inspect.isclass(fn) and not dataclasses.is_dataclass(fn):
      fn = fn.__init__
    return typing.get_type_hints(fn)
  except Exception:  # pylint: disable=broad-except  # unresolvable annotations: no check
    return {}


def _type_name(annotation) -> str:
  if isinstance(annotation, type) and not typing.get_args(annotation):
    return annotation.__name__
  return re.sub(r"\b(typing|collections\.abc|builtins)\.", "", str(annotation)).replace(
      "NoneType", "None")


def check_binding_types() -> None:
  """Raises ConfigError naming every bound value that does not fit its
  parameter's annotation (e.g. `train.num_steps = %NUM_STEPS` with NUM_STEPS =
  2.5, or ModelConfig.embed_dim = 128.5), so an ill-typed setting fails before
  any work starts instead of deep inside a run."""
  registry = gin_config_lib._REGISTRY  # pylint: disable=protected-access
  problems = []
  for (scope, selector), params in gin_config_lib._CONFIG.items():  # pylint: disable=protected-access
    if selector == _MACRO or selector not in registry:
      continue
    configurable = registry[selector]
    hints = _type_hints(configurable.wrapped)
    for name, raw in params.items():
      if name not in hints:
        continue
      value = _resolve_macros(raw)
      if conforms(value, hints[name]):
        continue
      where = f"{scope}/" if scope else ""
      binding = f"{where}{configurable.name}.{name} = {raw!r}"
      if repr(raw) != repr(value):  # through a macro
        binding += f" (= {value!r})"
      problems.append(f"{binding}: expected {_type_name(hints[name])}, got "
                      f"{type(value).__name__}")
  if problems:
    raise ConfigError("Ill-typed setting(s): " + "; ".join(problems) +
                      ". Fix the value (strings need quotes, numbers none: "
                      "--gin.NUM_STEPS=100, --gin.RUN_DIR=\"'runs/x'\").")


def call(fn: Callable, *args, **kwargs):
  """Calls a gin-configured function, converting configuration errors."""
  try:
    return fn(*args, **kwargs)
  except (ValueError, TypeError) as e:
    text = str(e)
    if ("%gin.REQUIRED" in text or "No bindings specified" in text
        or "missing" in text and "required" in text and "argument" in text):
      raise ConfigError(explain(e)) from e
    raise


def run_main(main: Callable[[Sequence[str]], int | None],
             argv: Sequence[str] | None = None) -> None:
  """Runs `main(argv)`; a ConfigError prints one line and exits with status 2.

  First applies host_allocator.configure() (XLA:CPU's malloc settings), before
  any JAX computation starts.
  """
  from posttrain_jax.core import distributed, host_allocator  # pylint: disable=g-import-not-at-top
  host_allocator.configure()
  argv = sys.argv[1:] if argv is None else argv
  try:
    code = main(argv) or 0
  except ConfigError as e:
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if prog in ("", "main.py", "__main__.py", "-c"):
      prog = "posttrain_jax"
    print(f"{prog}: error: {e}", file=sys.stderr)
    code = e.exit_code
  except BaseException:  # a crash in one process of a multi-process job
    if distributed.is_initialized():
      import traceback  # pylint: disable=g-import-not-at-top
      traceback.print_exc()
      distributed.exit_now(1)
    raise
  if code and distributed.is_initialized():
    distributed.exit_now(code)
  # The interpreter's teardown garbage-collects TF's and JAX's ~10^6 objects:
  # seconds per process (elastic DiLoCo's launcher waited on each slice and the
  # Lighthouse). Frozen, they are left to the OS; exit handlers still run.
  gc.freeze()
  sys.exit(code)
