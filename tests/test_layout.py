"""The package layout: imports flow one way between subpackages, no module is
too large, and every gin file under gin/ parses with the binary's registration."""

import ast
import glob
import os
import sys

import gin
import pytest

from posttrain_jax import cli, main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "posttrain_jax")
# Dependency order (docs/architecture.md): a package may import only packages
# of a lower rank (and itself); equal ranks are independent of each other.
RANK = {"core": 0, "models": 1, "data": 1, "inference": 2, "interop": 2,
        "distillation": 3, "rl": 4, "merging": 5, "diloco": 6, "jobs": 7,
        "aot": 7, "cli": 8, "gin_usage": 8, "main": 9}
MAX_LINES = 550


def _modules():
  for path in sorted(glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True)):
    rel = os.path.relpath(path, PACKAGE)
    yield rel, path


def _package_of(rel: str) -> str | None:
  """'diloco/loop.py' -> 'diloco'; 'main.py' -> 'main'; '__init__.py' -> None."""
  head = rel.split(os.sep)[0]
  return None if head == "__init__.py" else head.removesuffix(".py")


def _imported_packages(path: str) -> set[str]:
  out = set()
  for node in ast.walk(ast.parse(open(path).read())):
    names = []
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    elif isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    for name in names:
      parts = name.split(".")
      if parts[0] == "posttrain_jax" and len(parts) > 1 and parts[1] in RANK:
        out.add(parts[1])
  return out


def upward_imports() -> list[str]:
  bad = []
  for rel, path in _modules():
    pkg = _package_of(rel)
    if pkg is None:
      continue
    assert pkg in RANK, f"posttrain_jax/{rel}: package {pkg!r} has no rank in RANK"
    for dep in _imported_packages(path):
      if dep != pkg and RANK[dep] >= RANK[pkg]:
        bad.append(f"posttrain_jax/{rel} ({pkg}) imports {dep}")
  return bad


def test_imports_flow_one_way():
  assert upward_imports() == []


def test_an_upward_import_is_caught(tmp_path, monkeypatch):
  # The checker itself: a core module importing rl must be reported.
  fake = tmp_path / "posttrain_jax"
  (fake / "core").mkdir(parents=True)
  (fake / "rl").mkdir()
  (fake / "core" / "x.py").write_text("from posttrain_jax.rl import rewards\n")
  (fake / "rl" / "rewards.py").write_text("from posttrain_jax.core import x\n")
  monkeypatch.setattr(sys.modules[__name__], "PACKAGE", str(fake))
  assert upward_imports() == ["posttrain_jax/core/x.py (core) imports rl"]


def test_no_module_is_oversized():
  big = [f"{rel}: {n}" for rel, path in _modules()
         if (n := sum(1 for _ in open(path))) > MAX_LINES]
  assert big == []


GIN_FILES = sorted(os.path.relpath(p, REPO) for p in
                   glob.glob(os.path.join(REPO, "gin", "**", "*.gin"), recursive=True))


@pytest.mark.parametrize("gin_file", GIN_FILES)
def test_every_gin_file_parses_with_the_binary_registration(gin_file):
  main.register_configurables()
  gin.clear_config()
  try:
    cli.configure(cli.GinFlags([os.path.join(REPO, gin_file)], [], [], []),
                  finalize=False)
  finally:
    gin.clear_config()
