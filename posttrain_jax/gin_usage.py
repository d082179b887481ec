"""Which parsed gin bindings and macros a job will read, before it runs.

Library code calls plain functions ("gin at the edge"), so the only gin
configurables a run calls are the binary's `job` and the job function it
selects, and whatever their bindings reference (`@X()`, `@scope/X()`,
`%MACRO`), recursively. Walking those references with gin's own scoping rules
(a binding `scope/X.p` applies when X is called inside `scope`; a scoped
reference replaces the active scope, an unscoped one inherits it; a macro's
value is evaluated in the macro's scope; a more specific scope's value of a
parameter shadows a less specific one) gives the set of bindings the run will
read. Everything else that was parsed -- a `--gin.NUM_STEPS=...` for a gin
file that has no NUM_STEPS, a `train.*` binding when the job is
`distillation_demo`, a macro nobody references -- is unused, and the binary
refuses it (exit 2) unless `--allow_unused_bindings` is given.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
import dataclasses
import re

from gin import config as gin_config_lib
from gin import config_parser

_MACRO = "gin.macro"

# Jobs that run from one configuration: the elastic Lighthouse is started with
# the elastic DiLoCo slices' gin files (launch/elastic_local.py,
# launch/xm_elastic.py), so what either job reads counts as read by both.
SHARES_CONFIGURATION = {"elastic_lighthouse": ("elastic_diloco",),
                        "elastic_diloco": ("elastic_lighthouse",)}

# A gin file that sets shared settings on purpose names them here, e.g.
# `MAY_BE_UNUSED = ['train', 'offline_data/DatasetConfig', 'K']`: a macro, a
# configurable (`train` covers every unscoped `train.*` binding) or a scoped
# configurable; those are not reported when the run leaves them unread.
MAY_BE_UNUSED = "MAY_BE_UNUSED"

# (scope, selector) of a gin binding, and the parameter name ("value" for a macro).
Key = tuple[str, str]


@dataclasses.dataclass(frozen=True)
class Unused:
  """One parsed binding (or macro) that no configurable of the run reads."""

  scope: str
  selector: str
  param: str

  @property
  def is_macro(self) -> bool:
    return self.selector == _MACRO

  def name(self) -> str:
    """As the user writes it: `NUM_STEPS`, `train.num_steps`, `teacher/ModelConfig.num_layers`."""
    if self.is_macro:
      return self.scope
    configurable = gin_config_lib._REGISTRY.get(self.selector)  # pylint: disable=protected-access
    short = configurable.name if configurable is not None else self.selector
    return f"{self.scope + '/' if self.scope else ''}{short}.{self.param}"


def _references(value) -> Iterable[gin_config_lib.ConfigurableReference]:
  return gin_config_lib.iterate_references(value)


def read_bindings(roots: Sequence[str]) -> set[tuple[str, str, str]]:
  """(scope, selector, param) of every binding that calling the configurables
  `roots` (registered names, called unscoped) reads, following references."""
  config = gin_config_lib._CONFIG  # pylint: disable=protected-access
  used: set[tuple[str, str, str]] = set()
  seen: set[tuple[str, tuple[str, ...]]] = set()
  registry = gin_config_lib._REGISTRY  # pylint: disable=protected-access
  todo = [(registry.get_match(root).selector, ()) for root in roots]
  while todo:
    selector, scope = todo.pop()
    if (selector, scope) in seen:
      continue
    seen.add((selector, scope))
    # gin's _get_bindings: partial scopes from the outermost, later ones win.
    effective: dict[str, tuple[str, object]] = {}
    for i in range(len(scope) + 1):
      partial = "/".join(scope[:i])
      for param, value in config.get((partial, selector), {}).items():
        effective[param] = (partial, value)
    for param, (partial, value) in effective.items():
      used.add((partial, selector, param))
      for ref in _references(value):
        inner = tuple(ref.scopes) if ref.scopes else scope
        todo.append((ref.configurable.selector, inner))
  return used


def job_roots(job: str) -> list[str]:
  """The configurables the binary calls for job `job` (main.py: `job`, then the job)."""
  jobs = [job, *SHARES_CONFIGURATION.get(job, ())]
  return ["posttrain_jax.job", *(f"posttrain_jax.{j}" for j in jobs)]


def selected_job() -> str:
  """`job.name` as parsed (the binary's default "train")."""
  bound = gin_config_lib._CONFIG.get(("", "posttrain_jax.job"), {})  # pylint: disable=protected-access
  name = bound.get("name", "train")
  return name if isinstance(name, str) else "train"


def unused_bindings(job_selectors: Sequence[str]) -> list[Unused]:
  """Parsed bindings and macros that running `job_selectors` never reads.

  A macro referenced by some binding is not listed on its own (if that binding
  is unused, the binding is listed): gin files may define shared macros.
  """
  config = gin_config_lib._CONFIG  # pylint: disable=protected-access
  used = read_bindings(job_selectors)
  referenced_macros = {
      ref.scoped_selector.rpartition("/")[0]
      for (_, selector), params in config.items()
      for ref in _references(params)
      if ref.configurable.selector == _MACRO}
  allowed = config.get((MAY_BE_UNUSED, _MACRO), {}).get("value", ())
  if isinstance(allowed, str):
    allowed = (allowed,)
  out = []
  for (scope, selector), params in config.items():
    for param in params:
      if (scope, selector, param) in used:
        continue
      if selector == _MACRO and (scope in referenced_macros or scope == MAY_BE_UNUSED):
        continue
      unused = Unused(scope, selector, param)
      name = unused.name()
      if any(name == a or name.startswith(f"{a}.") for a in allowed):
        continue
      out.append(unused)
  return sorted(out, key=lambda u: (not u.is_macro, u.name()))


def binding_names(bindings: Sequence[str]) -> set[str]:
  """The names (`NUM_STEPS`, `train.num_steps`) the binding strings set, as
  Unused.name() spells them (gin's parser; unknown configurables skipped)."""
  names = set()
  for text in bindings:
    try:
      statements = list(config_parser.ConfigParser(
          text, gin_config_lib.ParserDelegate(skip_unknown=True)))
    except SyntaxError:
      continue
    for statement in statements:
      if not isinstance(statement, config_parser.BindingStatement):
        continue
      if not statement.arg_name:  # a macro
        names.add(f"{statement.scope + '/' if statement.scope else ''}{statement.selector}")
        continue
      configurable = gin_config_lib._REGISTRY.get_match(statement.selector)  # pylint: disable=protected-access
      short = configurable.name if configurable else statement.selector.rpartition(".")[2]
      names.add(f"{statement.scope + '/' if statement.scope else ''}{short}."
                f"{statement.arg_name}")
  return names


def describe(unused: Sequence[Unused], job: str, command_line: Sequence[str],
             jobs: Iterable[str] = (), advice: bool = True) -> str:
  """One line naming every unused binding, where it came from, and (advice)
  the way out."""
  from_flags = binding_names(command_line)
  jobs = set(jobs)
  parts = []
  for u in unused:
    text = u.name()
    notes = []
    if text in from_flags:
      notes.append("command line")
    if not u.is_macro:
      short = text.rpartition("/")[2].partition(".")[0]
      if short in jobs and short != job:
        notes.append(f"a setting of job '{short}'")
    parts.append(f"{text} ({', '.join(notes)})" if notes else text)
  line = f"job '{job}' does not read {', '.join(parts)}"
  if not advice:
    return line
  it = "it" if len(parts) == 1 else "them"
  return (f"{line}. Remove {it}, use the gin file that reads {it}, or pass "
          "--allow_unused_bindings to run anyway (a gin file's shared settings: "
          "MAY_BE_UNUSED = [...]).")


def _macro_name(value) -> str | None:
  if (isinstance(value, gin_config_lib.ConfigurableReference)
      and value.configurable.selector == _MACRO):
    return value.scoped_selector.rpartition("/")[0]
  return None


def macro_settings(job: str, text: str) -> str:
  """"SFT_CHECKPOINT = 'runs/nope': " for each parameter of job `job` that
  `text` (an error of the job) names and that a macro sets, to put before the
  error: it then names what the user set, not only the job's parameter."""
  config = gin_config_lib._CONFIG  # pylint: disable=protected-access
  notes = []
  for param, value in config.get(("", f"posttrain_jax.{job}"), {}).items():
    macro = _macro_name(value)
    if macro is None or not re.search(rf"(?<![\w.]){re.escape(param)}\b", text):
      continue
    final, seen = value, set()
    while _macro_name(final) is not None and _macro_name(final) not in seen:
      seen.add(_macro_name(final))
      final = config.get((_macro_name(final), _MACRO), {}).get("value")
    notes.append(f"{macro} = {final!r}")
  return "".join(f"{note}: " for note in notes)
