"""tools/check_docs.py: every command README.md and docs/ show resolves as the
binary resolves it (the cheap default; `--run` executes them, tens of minutes)."""

import importlib.util
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("check_docs",
                                               os.path.join(REPO, "tools", "check_docs.py"))
check_docs = importlib.util.module_from_spec(_spec)
sys.modules["check_docs"] = check_docs
_spec.loader.exec_module(check_docs)


def test_every_documented_command_resolves(capsys):
  failures = check_docs.check_all(check_docs.documents())
  assert failures == [], "\n".join(failures)
  del capsys


DOC = """# A page

```bash
python -m posttrain_jax.main --gin_file=gin/experiments/quickstart.gin \\
  --gin.NUM_STEPS=50   # the demo reads no NUM_STEPS
for m in 0 1 2; do
  python -m posttrain_jax.main --gin_file=gin/experiments/warm/member_$m.gin
done
python tools/merge.py average --outptu runs/x runs/a
python -m posttrain_jax.main --gin_file=gin/experiments/nope.gin
python -m posttrain_jax.main --gin_file=F.gin [--gin.NAME=VALUE ...]
```

| stage | command |
|---|---|
| train | `python -m posttrain_jax.main --gin_file=gin/experiments/lm_quickstart.gin --gin.train.num_stpes=3` |
"""


def test_the_checker_fails_on_what_a_user_would_meet(tmp_path, capsys):
  page = tmp_path / "page.md"
  page.write_text(DOC)
  commands = check_docs.extract(str(page))
  assert [c.argv[-1] for c in commands if c.kind == "binary"][:2] == [
      "--gin.NUM_STEPS=50", "--gin_file=gin/experiments/warm/member_0.gin"]
  failures = check_docs.check_all([str(page)])
  assert len(failures) == 4, failures
  assert "does not read NUM_STEPS (command line)" in failures[0]
  assert "merge.py average: error: the following arguments are required: --output" in failures[1]
  assert "no gin file gin/experiments/nope.gin" in failures[2]
  assert "Unknown parameter 'num_stpes' of 'train'" in failures[3]
  assert "page.md:16" in failures[3]  # the table row's line
  del capsys


def test_shortened_runs_bind_steps_through_the_file_s_macro():
  demo = check_docs.Command("x", ["python", "-m", "posttrain_jax.main",
                                  "--gin_file=gin/experiments/lm_quickstart.gin",
                                  "--gin.NUM_STEPS=2000"], {})
  argv = check_docs.shortened(demo)
  assert argv[0] == sys.executable and argv[-3:] == [
      "--gin.NUM_STEPS=2", "--gin.train.eval_batches=1", "--gin.train.log_every=1"]
  xm = check_docs.Command("x", ["python", "launch/xm_launch.py", "--accelerator=v5p-8",
                                "--gin_file=gin/experiments/lm_quickstart.gin"], {})
  assert check_docs.shortened(xm)[-1] == "--dry_run"
