"""The `warp` job: WARP's iterations of M RL runs, SLERP and LITI (arXiv 2406.16768).

  python -m posttrain_jax.main --gin_file=gin/experiments/warp/warp.gin

For i = 1..I (`rl.warp`): M `train_policy` runs from theta_init^i that differ
only in prompt order (PromptConfig.seed = `rl.warp.prompt_seed`), each with its
own EMA anchor (the train_policy settings: `warp.train_run = @train_policy`
takes every `train_policy.*` binding); then theta_slerp^i, the recursive
per-tensor SLERP of their task vectors (one angle per layer and parameter,
whether the checkpoints are scanned or not), and theta_init^{i+1} = LITI(eta).

The M runs of an iteration run one after the other, each on the whole mesh
(not as M replicas on the replica axis: the runs are independent, so the
sequential form gives identical results and keeps every run an ordinary
train_policy run directory, resumable on its own).

Layout under run_dir:
  iteration_<i>/run_<m>/   a train_policy run directory (checkpoints, TensorBoard)
  iteration_<i>/slerp/     theta_slerp^i (model directory) + angles.json (per layer tensor,
                           keyed by its unscanned path)
  iteration_<i>/liti/      theta_init^{i+1} (model directory)
  warp.json                the plan, the directories, the angle summaries
  (TensorBoard events)     warp/angle_{mean,min,max}_deg per iteration

Every finished run and merge leaves a `WARP_DONE.json` marker; a restarted job
skips them, resumes a half-finished run from its checkpoints and redoes a
half-written merge. The deliverable front {(1 - eta) theta_sft + eta
theta_slerp^I} is traced by tools/eval_front.py.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import json
import os
import shutil
import sys

from clu import metric_writers
import jax

from posttrain_jax.data.dataset_config import PromptConfig
from posttrain_jax.jobs.train_policy import train_policy
from posttrain_jax.merging import model_dirs
from posttrain_jax.merging.interpolation import liti, slerp_many, task_vector_angles
from posttrain_jax.models import params_checkpoint
from posttrain_jax.rl import warp as warp_lib


def _log(text: str) -> None:
  if jax.process_index() == 0:
    print(text, file=sys.stdout, flush=True)


def _fresh(directory: str) -> None:
  """Removes a half-written merge (no done marker) before it is redone."""
  if os.path.exists(directory):
    shutil.rmtree(directory)


def _pairwise_angles(init, params: list) -> dict[str, dict[str, float]]:
  """Per-tensor angles (degrees) between the task vectors of every pair of runs."""
  return {f"{a}-{b}": task_vector_angles(init, params[a], params[b])
          for a in range(len(params)) for b in range(a + 1, len(params))}


def warp(*, run_dir: str, initial_checkpoint: str, num_runs: int = 2,
         steps_per_iteration=(100,), eta: float = 0.3, slerp_lambda: float | None = None,
         prompts: PromptConfig | None = None,
         train_run: Callable[..., object] = train_policy,
         operative_config: str | None = None) -> dict:
  """WARP from an SFT model; returns the summary also written to run_dir/warp.json.

  Args:
    run_dir: the WARP job's directory (layout in the module docstring).
    initial_checkpoint: theta_sft, the init of iteration 1 (model or run directory).
    num_runs: M RL runs per iteration (paper: 2).
    steps_per_iteration: RL steps of each run, per iteration; I = its length
      (paper: 9k, 7k, 7k, 5k, 5k).
    eta: LITI's step theta_init <- (1 - eta) theta_init + eta theta_slerp (paper: 0.3).
    slerp_lambda: SLERP's lambda for M = 2 (None: 1/m recursively).
    prompts: the training prompts; run m of iteration i reads them shuffled
      with seed `rl.warp.prompt_seed(prompts.seed, i, m, M)`. None: train_run
      gets no prompts (tests give their own source).
    train_run: one RL run, called with run_dir, initial_checkpoint, num_steps,
      operative_config and prompts (gin: `warp.train_run = @train_policy`, whose
      bindings give every other setting: reward, beta, anchor, ema_rate, optimizer...).
  """
  plan = warp_lib.WarpPlan(num_runs, tuple(steps_per_iteration), eta, slerp_lambda)
  if not initial_checkpoint or not os.path.exists(initial_checkpoint):
    raise FileNotFoundError(f"warp.initial_checkpoint {initial_checkpoint!r} does not exist: "
                            "give the SFT model directory.")
  os.makedirs(run_dir, exist_ok=True)
  if operative_config:
    with open(os.path.join(run_dir, "config.gin"), "w") as f:
      f.write(operative_config)
  todo = warp_lib.pending(plan, run_dir)
  done_count = plan.num_iterations * (plan.num_runs + 2) - len(todo)
  _log(f"WARP: M={plan.num_runs} runs x I={plan.num_iterations} iterations "
       f"(steps {list(plan.steps_per_iteration)}), eta {plan.eta}, lambda "
       f"{plan.slerp_lambda or '1/m'} | {len(todo)} stage(s) to do"
       + (f", resuming ({done_count} done)" if todo and done_count else "") + f" | {run_dir}")
  writer = metric_writers.create_default_writer(run_dir, just_logging=jax.process_index() > 0)
  try:
    for iteration, stage, m in todo:
      init = warp_lib.init_of(run_dir, iteration, initial_checkpoint)
      if stage == "run":
        _run(plan, run_dir, iteration, m, init, prompts, train_run, operative_config)
      elif stage == "slerp":
        _slerp(plan, run_dir, iteration, init, writer)
      else:
        _liti(plan, run_dir, iteration, init)
  finally:
    writer.close()
  return _summary(plan, run_dir, initial_checkpoint)


def _run(plan, root, iteration, m, init, prompts, train_run, operative_config):
  directory = warp_lib.run_dir(root, iteration, m)
  steps = plan.steps_per_iteration[iteration - 1]
  kwargs = {}
  seed = None
  if prompts is not None:
    seed = warp_lib.prompt_seed(prompts.seed, iteration, m, plan.num_runs)
    kwargs["prompts"] = dataclasses.replace(prompts, seed=seed)
  _log(f"== WARP iteration {iteration}, run {m}: {steps} steps from {init} "
       f"(prompt seed {seed}) -> {directory}")
  result = train_run(run_dir=directory, initial_checkpoint=init, num_steps=steps,
                     operative_config=operative_config, **kwargs)
  if getattr(result, "preempted", False):
    raise SystemExit(f"WARP: run {directory} was preempted at step {result.final_step}; "
                     "restart the job to resume it.")
  model_gin = os.path.join(directory, params_checkpoint.MODEL_GIN)
  if not os.path.exists(model_gin):  # the run's architecture is its init's (for the merges)
    cfg = params_checkpoint.model_config_of(params_checkpoint.locate(init))
    with open(model_gin, "w") as f:
      f.write(params_checkpoint.model_gin(cfg, header=f"Architecture of WARP run {directory}"))
  warp_lib.mark_done(directory, {"iteration": iteration, "run": m, "num_steps": steps,
                                 "init": os.path.abspath(init), "prompt_seed": seed})


def _slerp(plan, root, iteration, init, writer):
  runs = [warp_lib.run_dir(root, iteration, m) for m in range(plan.num_runs)]
  out = warp_lib.slerp_dir(root, iteration)
  _fresh(out)
  models = model_dirs.load_models([init, *runs])
  theta_init, params = models[0].params, [m.params for m in models[1:]]
  angles = _pairwise_angles(theta_init, params)
  summaries = {pair: warp_lib.angle_summary(a) for pair, a in angles.items()}
  merged = slerp_many(theta_init, params, plan.slerp_lambda)
  info = {"merged_from": [os.path.abspath(r) for r in runs], "init": os.path.abspath(init),
          "merge": "slerp", "lambda": plan.slerp_lambda}
  model_dirs.write_model(out, models[1], merged, info)
  with open(os.path.join(out, "angles.json"), "w") as f:
    json.dump({"per_tensor_degrees": angles, "summary": summaries}, f, indent=1)
  first = summaries["0-1"]
  writer.write_scalars(iteration, {f"warp/angle_{k}_deg": v for k, v in first.items()
                                   if k != "count"})
  writer.flush()
  for pair, s in summaries.items():
    _log(f"== WARP iteration {iteration}: SLERP angle between task vectors {pair}: mean "
         f"{s['mean']:.1f} deg (min {s['min']:.1f}, max {s['max']:.1f}, {s['count']} tensors)")
  warp_lib.mark_done(out, {"iteration": iteration, "angles": summaries})


def _liti(plan, root, iteration, init):
  out = warp_lib.liti_dir(root, iteration)
  _fresh(out)
  merged_dir = warp_lib.slerp_dir(root, iteration)
  models = model_dirs.load_models([init, merged_dir])
  params = liti(models[0].params, models[1].params, plan.eta)
  info = {"merged_from": [os.path.abspath(merged_dir)], "init": os.path.abspath(init),
          "merge": "liti", "eta": plan.eta}
  model_dirs.write_model(out, models[1], params, info)
  _log(f"== WARP iteration {iteration}: LITI eta {plan.eta} -> {out}")
  warp_lib.mark_done(out, {"iteration": iteration, "eta": plan.eta})


def _summary(plan, root, sft) -> dict:
  iterations = []
  for i in range(1, plan.num_iterations + 1):
    slerp = warp_lib.slerp_dir(root, i)
    iterations.append({
        "iteration": i, "num_steps": plan.steps_per_iteration[i - 1],
        "init": os.path.abspath(warp_lib.init_of(root, i, sft)),
        "runs": [os.path.abspath(warp_lib.run_dir(root, i, m)) for m in range(plan.num_runs)],
        "slerp": os.path.abspath(slerp), "liti": os.path.abspath(warp_lib.liti_dir(root, i)),
        "angles": warp_lib.read_done(slerp).get("angles")})
  summary = {"sft": os.path.abspath(sft), "num_runs": plan.num_runs, "eta": plan.eta,
             "slerp_lambda": plan.slerp_lambda,
             "steps_per_iteration": list(plan.steps_per_iteration),
             "final_slerp": iterations[-1]["slerp"], "iterations": iterations}
  with open(os.path.join(root, "warp.json"), "w") as f:
    json.dump(summary, f, indent=1)
  _log(f"== WARP done: front endpoints {summary['sft']} and {summary['final_slerp']}")
  return summary
