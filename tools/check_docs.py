"""Checks the commands that README.md and docs/ show, as written.

  python tools/check_docs.py [--only README.md,docs/launch.md] [-v]
  python tools/check_docs.py --run [--only ...] [--keep DIR] [--timeout S]

Commands are taken from the fenced shell blocks (```bash, ```sh or plain ```)
of README.md, docs/*.md and docs/experiments/*.md -- continuation lines
joined, `a && b` split, `for X in A B ...; do` loops taken at their first value,
`{a,b}` alternatives expanded, `[--optional ...]` groups dropped -- and from
inline code spans that start with `python -m posttrain_jax.main`,
`python tools/`, `python launch/` or `bash tools/`.

Default (what tests/tools/test_check_docs.py runs, a few seconds): every
invocation of the training binary, and the binary arguments of every
launch/local.py and launch/xm_launch.py command, are resolved as the binary
resolves them (`posttrain_jax.main ... --check_config`, in this process):
an unknown configurable or parameter, an ill-typed value, a missing gin file
under gin/ or a binding the job never reads is an error. Tools get their
argument parser run on the documented flags (`parse_args`, where the tool has
one). Templates (F.gin, ..., <...>) and commands that need what an earlier
command writes (a converted checkpoint's model.gin, a user's module) are
listed as skipped, with the reason.

--run executes them in document order in a scratch directory (gin/, tools/,
launch/, tests/ linked; runs/ is new), so later commands find what earlier ones
wrote; the training jobs are shortened through overrides (SHORTEN: e.g.
`--gin.NUM_STEPS=2`, bound through the macro the gin file uses, so an override
the job would not read is refused like any other), xm_launch commands get
--dry_run, and the experiment scripts (bash tools/run_*.sh, hours) and
benchmarks are not run. This takes tens of minutes on a CPU machine.
Exit status 1 when a command fails (each failure is listed), else 0.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import importlib.util
import io
import itertools
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

SHELL_LANGS = ("", "bash", "sh", "shell", "console")
INLINE = re.compile(r"`((?:python3? -m posttrain_jax\.main|python3? (?:tools|launch)/|bash tools/)"
                    r"[^`]*)`")
TEMPLATE = re.compile(r"(\.\.\.|\bF\.gin\b|\bG\.gin\b|<[^>]*>|\$[@*])")

# Step counts a job's shortened run uses (--run): bound through the macro the
# gin file uses for the parameter when there is one.
SHORTEN = {
    "train": {"num_steps": 2, "eval_batches": 1, "log_every": 1},
    "distill": {"num_steps": 2, "log_every": 1},
    "distillation_demo": {"oracle_steps": 4, "teacher_steps": 2, "student_steps": 4,
                          "eval_every": 2, "num_eval_prompts": 8, "log_every": 2},
    "train_reward_model": {"num_steps": 2, "linear_probe_steps": 1},
    "train_policy": {"num_steps": 2, "log_every": 1},
    "train_dpo": {"num_steps": 2, "log_every": 1},
    "cfg_distill": {"num_steps": 2},
    "train_clp": {"num_steps": 2},
    "warp": {"num_steps": 2},
    "elastic_diloco": {"num_steps": 2},
}
# Tools' flags replaced in a shortened run (--run).
TOOL_SHORTEN = {"label_preferences.py": {"--num_prompts": "8"}}
NOT_RUN = ("bench_train.py", "bench_sample.py", "bench_peer_hf.py", "profile_ops.py",
           "train_memory.py", "device_bench.sh", "device_bench_sample.sh")


@dataclasses.dataclass
class Command:
  source: str          # "docs/launch.md:49"
  argv: list[str]
  env: dict[str, str]
  inline: bool = False  # an inline code span (no arguments: a mention of a tool)

  @property
  def text(self) -> str:
    return shlex.join(self.argv)

  @property
  def kind(self) -> str:
    a = self.argv
    if len(a) >= 3 and a[0] in ("python", "python3") and a[1:3] == ["-m", "posttrain_jax.main"]:
      return "binary"
    if len(a) >= 2 and a[0] in ("python", "python3"):
      if a[1] == "launch/local.py":
        return "local"
      if a[1] == "launch/xm_launch.py":
        return "xm_launch"
      if a[1].startswith("tools/") and a[1].endswith(".py"):
        return "tool"
    if len(a) >= 2 and a[0] == "bash" and a[1].startswith("tools/"):
      return "script"
    return "other"


# ---------------------------------------------------------------------------
# Extraction


def _expand_braces(text: str) -> list[str]:
  """`{a,b}` alternatives (words only, not gin dicts) expanded in step: the
  i-th command takes the i-th alternative of every group."""
  groups = list(re.finditer(r"\{([\w.-]+(?:,[\w.-]+)+)\}", text))
  if not groups:
    return [text]
  n = max(len(g.group(1).split(",")) for g in groups)
  out = []
  for i in range(n):
    pieces, last = [], 0
    for g in groups:
      options = g.group(1).split(",")
      pieces += [text[last:g.start()], options[min(i, len(options) - 1)]]
      last = g.end()
    out.append("".join(pieces) + text[last:])
  return out


def _commands_of_line(text: str, source: str, loops: dict[str, str],
                      inline: bool = False) -> list[Command]:
  for name, value in loops.items():
    text = re.sub(rf"\$\{{?{name}\}}?\b", value, text)
  # A table's per-seed / per-member variable ($s, $m): its first value, 0.
  text = re.sub(r"\$\{?([a-z])\}?\b", "0", text)
  text = re.sub(r"\s\[(--[^\[\]]*)\]", "", text)  # [--optional flags]
  out = []
  for piece in re.split(r"\s&&\s|;\s", text):
    for expanded in _expand_braces(piece):
      try:
        argv = shlex.split(expanded, comments=True)
      except ValueError:
        continue
      env = {}
      while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):
        key, _, value = argv.pop(0).partition("=")
        env[key] = value
      if argv and argv[0] == "$":
        argv = argv[1:]
      if argv:
        out.append(Command(source, argv, env, inline))
  return out


def extract(path: str) -> list[Command]:
  """The shell commands of one markdown file, in order."""
  rel = os.path.relpath(path, REPO)
  lines = open(path, encoding="utf-8").read().splitlines()
  commands: list[Command] = []
  fence, loops, pending, start = None, {}, "", 0
  for n, line in enumerate(lines, 1):
    stripped = line.strip()
    if stripped.startswith("```"):
      fence = None if fence is not None else stripped[3:].strip().lower()
      pending = ""
      continue
    if fence is None:
      for m in INLINE.finditer(line):
        commands += _commands_of_line(m.group(1), f"{rel}:{n}", {}, inline=True)
      continue
    if fence not in SHELL_LANGS:
      continue
    if not pending:
      start = n
    if stripped.endswith("\\"):
      pending += stripped[:-1] + " "
      continue
    text, pending = pending + stripped, ""
    loop = re.match(r"for (\w+) in ([^;]+); do\b\s*(.*)", text)
    if loop:
      loops[loop.group(1)] = loop.group(2).split()[0]
      text = loop.group(3)
    if text in ("done", "") or text.startswith("#"):
      if text == "done":
        loops.clear()
      continue
    commands += _commands_of_line(text, f"{rel}:{start}", loops)
  return commands


def documents(only: str | None = None) -> list[str]:
  paths = [os.path.join(REPO, "README.md"),
           *sorted(glob.glob(os.path.join(REPO, "docs", "*.md"))),
           *sorted(glob.glob(os.path.join(REPO, "docs", "experiments", "*.md")))]
  if only:
    wanted = {os.path.normpath(p) for p in only.split(",")}
    paths = [p for p in paths if os.path.relpath(p, REPO) in wanted]
  return paths


# ---------------------------------------------------------------------------
# Resolution (default)


class Skip(Exception):
  """The command cannot be checked here (a template, or needs earlier output)."""


def _load(path: str, name: str):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


def _launch_module(name: str):
  sys.path.insert(0, os.path.join(REPO, "launch"))
  try:
    return _load(os.path.join(REPO, "launch", f"{name}.py"), f"check_docs_{name}")
  finally:
    sys.path.remove(os.path.join(REPO, "launch"))


def binary_args(command: Command) -> list[str]:
  """The training binary's arguments of a binary or launcher command."""
  kind = command.kind
  if kind == "binary":
    return command.argv[3:]
  args = command.argv[2:]
  if kind == "local" and "--" in args:
    raise Skip("runs its own command after `--`")
  own, binary = _launch_module("binary_args").split_binary_args(args)
  if kind == "xm_launch":
    run_dir = [a.partition("=")[2] for a in own if a.startswith("--run_dir=")]
    if run_dir:
      binary.append(f"--gin.RUN_DIR={run_dir[0]!r}")
  return binary


def _gin_files_exist(args: list[str]) -> None:
  from posttrain_jax import GIN_DIR  # pylint: disable=g-import-not-at-top
  for arg in args:
    name, _, path = arg.partition("=")
    if name != "--gin_file":
      continue
    if os.path.exists(os.path.join(REPO, path)) or os.path.exists(os.path.join(GIN_DIR, path)):
      continue
    if path.startswith("gin/") or path.split("/")[0] in ("experiments", "models", "runs", "data"):
      raise ValueError(f"no gin file {path}")
    raise Skip(f"needs {path} (written by an earlier command)")


def resolve(args: list[str]) -> str:
  """The job the binary would run with `args`; raises the binary's ConfigError."""
  import gin  # pylint: disable=g-import-not-at-top
  from posttrain_jax import cli, main  # pylint: disable=g-import-not-at-top
  _gin_files_exist(args)
  if any(re.search(r"\$\w", a) for a in args):
    raise Skip("uses a shell variable")
  gin.clear_config()
  out = io.StringIO()
  cwd = os.getcwd()
  os.chdir(REPO)
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
      main.main([*args, "--check_config"])
  except cli.ConfigError as e:
    if "--module_import=" in str(e):
      raise Skip(f"needs a user's module ({e})") from e
    raise
  finally:
    os.chdir(cwd)
  return re.search(r"job '(\w+)'", out.getvalue()).group(1)


def check_tool(command: Command) -> None:
  path = os.path.join(REPO, command.argv[1])
  if not os.path.isfile(path):
    raise ValueError(f"no such tool {command.argv[1]}")
  name = os.path.basename(path)[:-3]
  if name.startswith("bench_peer"):
    return
  module = _load(path, f"check_docs_tool_{name}")
  parse = getattr(module, "parse_args", None)
  if parse is None:
    return
  args = command.argv[2:]
  if hasattr(module, "_split_flags"):  # gin flags first, then its own (bench_train)
    args = module._split_flags(args).rest  # pylint: disable=protected-access
  err = io.StringIO()
  try:
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
      parse(args)
  except SystemExit as e:
    if e.code:
      raise ValueError(err.getvalue().strip().splitlines()[-1]) from e


def _is_template(command: Command) -> bool:
  """Placeholders: `...`, `<...>`, F.gin, or an all-capitals word (NAME.json,
  MODE, RUN.gin, --reward_model DIR) outside gin bindings."""
  if TEMPLATE.search(command.text):
    return True
  for token in command.argv[1:]:
    if token.startswith("--gin.") or token.startswith("--gin_bindings"):
      continue
    if re.fullmatch(r"[A-Z]", token):  # --batch B
      return True
    if any(re.fullmatch(r"[A-Z][A-Z0-9_]+", part) for part in re.split(r"[=/.,:]", token)):
      return True
  return False


def check(command: Command) -> str:
  """'ok: ...' or raises Skip / an error, without running anything."""
  kind = command.kind
  if kind == "other":
    raise Skip("not a project command")
  if _is_template(command):
    raise Skip("a template (placeholders)")
  if command.inline and kind == "tool" and len(command.argv) == 2:
    if not os.path.isfile(os.path.join(REPO, command.argv[1])):
      raise ValueError(f"no such tool {command.argv[1]}")
    raise Skip("a mention of the tool (no arguments)")
  if kind in ("binary", "local", "xm_launch"):
    return f"job {resolve(binary_args(command))}"
  if kind == "tool":
    check_tool(command)
    return "flags parse"
  if not os.path.isfile(os.path.join(REPO, command.argv[1])):
    raise ValueError(f"no such script {command.argv[1]}")
  return "script exists"


def check_all(paths: list[str], verbose: bool = False, stream=sys.stdout) -> list[str]:
  """Resolves every command; returns the failures ('source: command: error')."""
  from posttrain_jax import cli  # pylint: disable=g-import-not-at-top
  failures = []
  for path in paths:
    for command in extract(path):
      try:
        what = check(command)
        if verbose:
          print(f"ok    {command.source}: {what}: {command.text}", file=stream)
      except Skip as e:
        if verbose:
          print(f"skip  {command.source}: {e}: {command.text}", file=stream)
      except (cli.ConfigError, ValueError) as e:
        failures.append(f"{command.source}: {command.text}: {e}")
        print(f"FAIL  {failures[-1]}", file=stream)
  return failures


# ---------------------------------------------------------------------------
# Running (--run)


def shortened(command: Command) -> list[str]:
  """The command with SHORTEN / TOOL_SHORTEN applied (its binary arguments
  last, so they win)."""
  import gin  # pylint: disable=g-import-not-at-top
  from gin import config as gin_config  # pylint: disable=g-import-not-at-top
  argv = [sys.executable if a in ("python", "python3") and i == 0 else a
          for i, a in enumerate(command.argv)]
  if command.kind == "tool":
    replace = TOOL_SHORTEN.get(os.path.basename(argv[1]), {})
    return [replace.get(argv[i - 1], a) if i else a for i, a in enumerate(argv)]
  if command.kind not in ("binary", "local", "xm_launch"):
    return argv
  job = resolve(binary_args(command))
  bound = gin_config._CONFIG.get(("", f"posttrain_jax.{job}"), {})  # pylint: disable=protected-access
  extra = []
  for param, value in SHORTEN.get(job, {}).items():
    ref = bound.get(param)
    if isinstance(ref, gin_config.ConfigurableReference) and ref.configurable.selector == "gin.macro":
      extra.append(f"--gin.{ref.scoped_selector.rpartition('/')[0]}={value}")
    else:
      extra.append(f"--gin.{job}.{param}={value}")
  gin.clear_config()
  if command.kind == "xm_launch" and "--dry_run" not in argv:
    extra.append("--dry_run")
  return argv + extra


def run_all(paths: list[str], scratch: str, timeout: float, stream=sys.stdout) -> list[str]:
  for name in ("gin", "tools", "launch", "tests", "posttrain_jax", "constraints.txt",
               "setup.py", "pyproject.toml"):
    if os.path.exists(os.path.join(REPO, name)) and not os.path.exists(
        os.path.join(scratch, name)):
      os.symlink(os.path.join(REPO, name), os.path.join(scratch, name))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
  failures = []
  for path in paths:
    for command in extract(path):
      try:
        check(command)
        if command.kind == "script" or os.path.basename(command.argv[1]) in NOT_RUN:
          raise Skip("an experiment script or benchmark (not run)")
        if command.kind != "xm_launch" and "gs://" in command.text:
          raise Skip("writes to Cloud Storage")
        argv = shortened(command)
      except Skip as e:
        print(f"skip  {command.source}: {e}: {command.text}", file=stream)
        continue
      except Exception as e:  # pylint: disable=broad-except
        failures.append(f"{command.source}: {command.text}: {e}")
        print(f"FAIL  {failures[-1]}", file=stream)
        continue
      began = time.time()
      try:
        proc = subprocess.run(argv, cwd=scratch, env={**env, **command.env},
                              capture_output=True, text=True, timeout=timeout)
        code, tail = proc.returncode, (proc.stderr.strip().splitlines() or [""])[-1]
      except subprocess.TimeoutExpired:
        code, tail = 124, f"timed out after {timeout:.0f} s"
      took = time.time() - began
      if code:
        failures.append(f"{command.source}: {shlex.join(argv)}: exit {code}: {tail}")
        print(f"FAIL  {failures[-1]}", file=stream, flush=True)
      else:
        print(f"ok    {command.source} ({took:.0f} s): {shlex.join(argv)}", file=stream,
              flush=True)
  return failures


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="check_docs.py", description=__doc__.split("\n")[0])
  p.add_argument("--only", default=None, help="comma-separated markdown files (repo-relative)")
  p.add_argument("--run", action="store_true", help="run the commands (shortened)")
  p.add_argument("--keep", default=None, help="scratch directory for --run (kept)")
  p.add_argument("--timeout", type=float, default=900.0, help="seconds per command (--run)")
  p.add_argument("-v", "--verbose", action="store_true")
  args = p.parse_args(argv)
  paths = documents(args.only)
  if args.run:
    scratch = args.keep or tempfile.mkdtemp(prefix="check_docs_")
    os.makedirs(scratch, exist_ok=True)
    print(f"scratch directory {scratch}")
    failures = run_all(paths, scratch, args.timeout)
  else:
    failures = check_all(paths, args.verbose)
  n = sum(len(extract(p)) for p in paths)
  print(f"{len(failures)} of {n} commands failed" if failures else f"{n} commands: no failure")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
