"""WARP's procedure, its pure parts: the plan, the directory layout, resume state.

WARP (Ramé et al., 2024, "WARP: On the Benefits of Weight Averaged Rewarded
Policies", arXiv 2406.16768, Sec. 3 and Algorithm 1) iterates I times:

  for i = 1..I:
    M RL runs from theta_init^i that differ only in prompt order, each a
      KL-regularised REINFORCE with its own EMA anchor
      (r_beta = r - beta log(pi_theta / pi_ema), theta_ema <- (1 - mu) theta_ema + mu theta);
    theta_slerp^i = recursive SLERP of their task vectors delta_m = theta_m - theta_init^i,
      tensor by tensor with its own angle (slerp_m = slerp(init, slerp_{m-1}, theta_m, 1/m);
      one angle per layer and parameter, also in the scanned layout);
    theta_init^{i+1} = (1 - eta) theta_init^i + eta theta_slerp^i        (LITI)

and delivers the front {(1 - eta) theta_sft + eta theta_slerp^I : eta in [0, 1]}.

The M runs of one iteration run one after the other (each on the whole mesh),
so a WARP job is resumable at run granularity: a finished run or merge leaves
a marker (`is_done`) and is not redone; a run killed midway resumes from its
own checkpoints. The merges themselves live in `merging.interpolation`
(`slerp_many`, `liti`, `task_vector_angles`) and the job in `jobs.warp`.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import json
import math
import os

DONE_FILE = "WARP_DONE.json"


@dataclasses.dataclass(frozen=True)
class WarpPlan:
  """WARP's settings (paper defaults: M = 2, lambda = 1/2, eta = 0.3, I = 5 with
  9k, 7k, 7k, 5k, 5k steps).

  num_runs: M RL runs per iteration (M >= 2).
  steps_per_iteration: RL steps of each run, one entry per iteration (I = len).
  eta: LITI's step towards the merge, in (0, 1].
  slerp_lambda: SLERP's lambda for M = 2 (None: 1/m recursively, 1/2 for M = 2).
  """
  num_runs: int
  steps_per_iteration: tuple[int, ...]
  eta: float = 0.3
  slerp_lambda: float | None = None

  def __post_init__(self):
    object.__setattr__(self, "steps_per_iteration", tuple(int(s) for s in self.steps_per_iteration))
    if self.num_runs < 2:
      raise ValueError(f"WARP needs num_runs (M) >= 2 RL runs per iteration to merge, got "
                       f"{self.num_runs}; set warp.num_runs = 2 (the paper's M).")
    if not self.steps_per_iteration or min(self.steps_per_iteration) < 1:
      raise ValueError("steps_per_iteration needs one positive step count per iteration, got "
                       f"{list(self.steps_per_iteration)}; e.g. warp.steps_per_iteration = "
                       "[9000, 7000, 7000, 5000, 5000] (the paper's I = 5).")
    if not 0.0 < self.eta <= 1.0:
      raise ValueError(f"LITI eta must be in (0, 1], got {self.eta} (eta = 0 never leaves "
                       "the init); the paper uses 0.3.")
    if self.slerp_lambda is not None:
      if self.num_runs != 2:
        raise ValueError(f"slerp_lambda applies to num_runs = 2 only, got M = {self.num_runs}: "
                         "with more runs model m is merged in with lambda = 1/m; leave "
                         "slerp_lambda = None.")
      if not 0.0 <= self.slerp_lambda <= 1.0:
        raise ValueError(f"slerp_lambda must be in [0, 1], got {self.slerp_lambda}.")

  @property
  def num_iterations(self) -> int:
    return len(self.steps_per_iteration)


def prompt_seed(base_seed: int, iteration: int, run: int, num_runs: int) -> int:
  """The prompt-order seed of run `run` (0-based) of iteration `iteration`
  (1-based): distinct for every run of the job, the only difference between
  the M runs of an iteration."""
  return base_seed + (iteration - 1) * num_runs + run


def iteration_dir(root: str, iteration: int) -> str:
  return os.path.join(root, f"iteration_{iteration}")


def run_dir(root: str, iteration: int, run: int) -> str:
  """The train_policy run directory of run `run` of iteration `iteration`."""
  return os.path.join(iteration_dir(root, iteration), f"run_{run}")


def slerp_dir(root: str, iteration: int) -> str:
  """theta_slerp^i: the SLERP of iteration i's runs (a model directory)."""
  return os.path.join(iteration_dir(root, iteration), "slerp")


def liti_dir(root: str, iteration: int) -> str:
  """theta_init^{i+1} = (1 - eta) theta_init^i + eta theta_slerp^i (a model directory)."""
  return os.path.join(iteration_dir(root, iteration), "liti")


def init_of(root: str, iteration: int, sft: str) -> str:
  """theta_init^i: the SFT model for i = 1, else the previous iteration's LITI."""
  return sft if iteration == 1 else liti_dir(root, iteration - 1)


def is_done(directory: str) -> bool:
  return os.path.exists(os.path.join(directory, DONE_FILE))


def mark_done(directory: str, info: dict) -> None:
  """Writes `directory`'s completion marker atomically (write, then rename)."""
  path = os.path.join(directory, DONE_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump(info, f, indent=1, sort_keys=True)
  os.replace(path + ".tmp", path)


def read_done(directory: str) -> dict:
  with open(os.path.join(directory, DONE_FILE)) as f:
    return json.load(f)


def angle_summary(angles: dict[str, float]) -> dict[str, float]:
  """Mean / min / max (degrees) of per-tensor angles, ignoring NaN (zero task vectors)."""
  values = [v for v in angles.values() if not math.isnan(v)]
  if not values:
    return {"mean": float("nan"), "min": float("nan"), "max": float("nan"), "count": 0}
  return {"mean": sum(values) / len(values), "min": min(values), "max": max(values),
          "count": len(values)}


def pending(plan: WarpPlan, root: str) -> list[tuple[int, str, int | None]]:
  """What a (resumed) WARP job still has to do, in order: (iteration, "run", m),
  (iteration, "slerp", None), (iteration, "liti", None), by the done markers."""
  todo = []
  for i in range(1, plan.num_iterations + 1):
    todo += [(i, "run", m) for m in range(plan.num_runs) if not is_done(run_dir(root, i, m))]
    todo += [(i, s, None) for s, d in (("slerp", slerp_dir(root, i)), ("liti", liti_dir(root, i)))
             if not is_done(d)]
  return todo


def check_sequence(values: Sequence[float], name: str, low: float, high: float) -> list[float]:
  """A grid of interpolation coefficients in [low, high] (eval tools)."""
  out = [float(v) for v in values]
  if not out or any(not low <= v <= high for v in out):
    raise ValueError(f"{name} must be a non-empty list of values in [{low}, {high}], got {out}.")
  return out
