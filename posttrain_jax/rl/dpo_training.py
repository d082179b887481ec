"""DPO training: the optimizer_step loss, the partitioned DPOTrainer and the
reference log-probs, on the fly or precomputed.

The loss (`dpo.dpo_sums`, Rafailov et al. 2023, arXiv 2305.18290) needs the
sequence log-probs of both responses of every pair under the policy and under
the frozen reference pi_ref (the SFT model). Chosen and rejected rows go
through the model as one [2B, L] batch; log pi(y|x) sums the response tokens
(`policy_gradient.sequence_logprobs` with the pair's response_mask). The
reference comes in one of two ways (`reference`):

* "on_the_fly": the reference params are `optimizer_step`'s aux (sharded like
  the policy, no gradient, no optimizer state) and the step runs their forward
  on each microbatch. Costs one forward per pair per step and the reference's
  memory on device for the whole run.
* "precomputed": the batch carries ref_logp_chosen / ref_logp_rejected and the
  step runs no reference forward and holds no reference params (the job drops
  them after the precompute). The values are matched to their pairs by batch
  index: the pair iterator is deterministic (seqio shuffle seed, fixed files),
  so batch k of the run is batch k of a fresh iterator. Before training, a
  separate jitted reference forward (`DPOTrainer.reference_logprobs`) scores
  batches 0 .. K-1 of a fresh iterator, where K covers the run's last step,
  and `ReferenceCache` stores them in run_dir (one atomic .npz with a
  fingerprint of the data configuration and the reference checkpoint). At
  step t the job reads row `data.batches_consumed` (the index of the batch
  that next(data) returns). A resumed run reuses the file (and extends it if
  num_steps grew), so values and pairs stay matched across restarts; a file
  whose fingerprint differs is recomputed. The values are global batches
  (every process computes and keeps the same [K, B, 2] array; process 0 writes
  the file), attached to the step's batch with the batch's sharding. The
  precompute costs the same reference forwards as on_the_fly, once, in
  advance; it assumes the data files do not change under a run (as the
  iterator's resume position already does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from posttrain_jax.core import partitioning
from posttrain_jax.core.trainer import (TrainState, _MeshRules, optimizer_step,
                                         train_state_shardings)
from posttrain_jax.models import ModelConfig, Transformer
from posttrain_jax.rl import policy_gradient as pg
from posttrain_jax.rl.dpo import check_dpo_args, dpo_sums
from posttrain_jax.rl.reward_training import shard_pairs

REFERENCES = ("on_the_fly", "precomputed")
REF_KEYS = ("ref_logp_chosen", "ref_logp_rejected")


def check_reference(reference: str) -> None:
  if reference not in REFERENCES:
    raise ValueError(f"Unknown DPO reference {reference!r}; choose one of "
                     f"{list(REFERENCES)}.")


def pair_logprobs(model: nn.Module, params, batch) -> tuple[jax.Array, jax.Array]:
  """([b] log pi(y_w|x), [b] log pi(y_l|x)): one forward over [2b, L] rows."""
  cat = lambda k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], 0)
  tokens = cat("tokens")
  logits = model.apply({"params": params}, tokens, positions=cat("positions"),
                       segment_ids=cat("segment_ids"))
  chosen, rejected = jnp.split(pg.sequence_logprobs(logits, tokens, cat("response_mask")), 2)
  return chosen, rejected


def dpo_objective(model: nn.Module, *, beta: float, loss_type: str = "sigmoid",
                  label_smoothing: float = 0.0, ipo_tau: float = 0.1):
  """optimizer_step loss_fn(params, batch, ref_params): the DPO sums.

  batch: the pair features with pair_weights [b, 1] (shard_pairs' layout); the
  reference log-probs are batch[REF_KEYS] ([b, 1]) when present, else a forward
  of ref_params.
  """
  check_dpo_args(beta, label_smoothing, loss_type, ipo_tau)

  def loss_fn(params, batch, ref_params):
    chosen, rejected = pair_logprobs(model, params, batch)
    if REF_KEYS[0] in batch:
      ref_chosen, ref_rejected = (batch[k][:, 0] for k in REF_KEYS)
    else:
      ref_chosen, ref_rejected = pair_logprobs(model, ref_params, batch)
    return dpo_sums(chosen, rejected, ref_chosen, ref_rejected, batch["pair_weights"][:, 0],
                    beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                    ipo_tau=ipo_tau)
  return loss_fn


class DPOTrainer:
  """Jitted, partitioned DPO step / eval / reference forward (Trainer-style shardings).

  The policy's TrainState is sharded by the model's logical axes (optimizer
  state following its params); the reference params, when passed, are sharded
  like the policy's.
  """

  def __init__(self, model_config: ModelConfig, tx, schedule, mesh, *, beta: float = 0.1,
               loss_type: str = "sigmoid", label_smoothing: float = 0.0,
               ipo_tau: float = 0.1, reference: str = "on_the_fly",
               num_microbatches: int = 1, rules=partitioning.DEFAULT_RULES):
    check_reference(reference)
    self.model, self.mesh, self.rules, self.reference = (
        Transformer(model_config), mesh, rules, reference)
    abstract, self.param_shardings = partitioning.params_and_shardings(
        lambda: self.model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"],
        mesh, rules)
    self.abstract_state, self.state_shardings = train_state_shardings(
        abstract, self.param_shardings, tx, mesh)
    self.abstract_params = self.abstract_state.params
    self.batch_sharding = partitioning.batch_sharding(mesh, rules)
    replicated = partitioning.replicated(mesh)
    loss_fn = dpo_objective(self.model, beta=beta, loss_type=loss_type,
                            label_smoothing=label_smoothing, ipo_tau=ipo_tau)
    ref = self.param_shardings if reference == "on_the_fly" else None
    self._step = jax.jit(
        functools.partial(optimizer_step, loss_fn=loss_fn, tx=tx, schedule=schedule,
                          num_microbatches=num_microbatches),
        in_shardings=(self.state_shardings, self.batch_sharding, ref),
        out_shardings=(self.state_shardings, replicated), donate_argnums=(0,))
    self._eval = jax.jit(lambda p, b, r: loss_fn(p, b, r)[1],
                         in_shardings=(self.param_shardings, self.batch_sharding, ref),
                         out_shardings=replicated)
    self._reference = jax.jit(
        lambda r, b: jnp.stack(pair_logprobs(self.model, r, b), -1),
        in_shardings=(self.param_shardings, self.batch_sharding), out_shardings=replicated)
    copy = lambda t: jax.tree.map(lambda x: x * 1, t)
    self._fresh = jax.jit(
        lambda p: TrainState(jnp.zeros((), jnp.int32), copy(p), tx.init(p)),
        in_shardings=(self.param_shardings,), out_shardings=self.state_shardings)

  def context(self):
    return _MeshRules(self.mesh, self.rules)

  def init_state(self, ref_params) -> TrainState:
    """Step 0: the policy is a copy of the reference (SFT) params, fresh optimizer."""
    with self.context():
      return self._fresh(ref_params)

  def _ref_arg(self, ref_params):
    if self.reference == "on_the_fly" and ref_params is None:
      raise ValueError("DPO with reference='on_the_fly' needs the reference params.")
    return ref_params if self.reference == "on_the_fly" else None

  def step(self, state: TrainState, batch, ref_params=None) -> tuple[TrainState, dict]:
    """One DPO optimizer step on a global batch (`shard_batch`)."""
    with self.context():
      return self._step(state, batch, self._ref_arg(ref_params))

  def eval_sums(self, params, batch, ref_params=None) -> dict[str, jax.Array]:
    with self.context():
      return self._eval(params, batch, self._ref_arg(ref_params))

  def reference_logprobs(self, ref_params, batch) -> np.ndarray:
    """[B, 2] host array (chosen, rejected) of log pi_ref for a global batch;
    the same global values on every process."""
    with self.context():
      out = self._reference(ref_params, batch)
    return np.asarray(out.addressable_shards[0].data)

  def shard_batch(self, local: Mapping[str, np.ndarray], reference: np.ndarray | None = None):
    """This process's pair rows as global arrays; `reference` ([B, 2], global
    values, as `reference_logprobs` returns) becomes batch[REF_KEYS]."""
    batch = shard_pairs(local, self.mesh, self.rules)
    if reference is not None:
      for i, key in enumerate(REF_KEYS):
        column = np.asarray(reference[:, i:i + 1], np.float32)
        batch[key] = jax.make_array_from_callback(column.shape, self.batch_sharding,
                                                  lambda index, c=column: c[index])
    return batch


class ReferenceCache:
  """Precomputed reference log-probs of a run's training batches, by batch index.

  run_dir/reference_logprobs.npz holds `values` [K, B, 2] (batch k's chosen /
  rejected log pi_ref) and the fingerprint it was computed for; a file with
  another fingerprint is ignored (and replaced on the next `extend`).
  """

  FILE = "reference_logprobs.npz"

  def __init__(self, run_dir: str, fingerprint: Mapping):
    self.path = os.path.join(run_dir, self.FILE)
    self.fingerprint = json.dumps(dict(fingerprint), sort_keys=True)
    self.values = None
    self.stale = False
    if os.path.exists(self.path):
      with np.load(self.path) as f:
        if str(f["fingerprint"]) == self.fingerprint:
          self.values = f["values"]
        else:
          self.stale = True

  def __len__(self) -> int:
    return 0 if self.values is None else len(self.values)

  def __getitem__(self, batch_index: int) -> np.ndarray:
    if batch_index >= len(self):
      raise ValueError(f"No precomputed reference log-probs for batch {batch_index} "
                       f"({len(self)} in {self.path}).")
    return self.values[batch_index]

  def extend(self, rows: np.ndarray) -> None:
    """Appends rows [n, B, 2] and rewrites the file atomically (process 0)."""
    rows = np.asarray(rows, np.float32)
    self.values = rows if self.values is None else np.concatenate([self.values, rows])
    if jax.process_index() == 0:
      tmp = self.path + ".tmp.npz"
      np.savez(tmp, values=self.values, fingerprint=np.asarray(self.fingerprint))
      os.replace(tmp, self.path)


def precompute_reference(trainer: DPOTrainer, ref_params, cache: ReferenceCache,
                         num_batches: int,
                         batches_from: Callable[[int], Iterator[Mapping[str, np.ndarray]]]
                         ) -> int:
  """Extends `cache` to cover batches 0 .. num_batches - 1; batches_from(k)
  yields this process's local batches from batch k on. Returns how many were
  computed (the data may end first: finite epochs)."""
  start = len(cache)
  if start >= num_batches:
    return 0
  rows = []
  for local in batches_from(start):
    rows.append(trainer.reference_logprobs(ref_params, trainer.shard_batch(local)))
    if start + len(rows) == num_batches:
      break
  if rows:
    cache.extend(np.stack(rows))
  return len(rows)
