"""Proxy and golden metrics of a distillation run (teacher hacking, Tiapkin et al. 2025).

On held-out prompts x, with the student pi_S:

    proxy  = KL(pi_T || pi_S) = E_x E_{y ~ pi_T(.|x)} [log pi_T(y|x) - log pi_S(y|x)]
    golden = KL(pi* || pi_S)  = E_x E_{y ~ pi*(.|x)}  [log pi*(y|x)  - log pi_S(y|x)]

Both are estimated on sequences sampled once, at the start of the run, from the
teacher (proxy) and the oracle pi* (golden) at temperature 1 (so the samples
follow the models' own distributions), and re-scored by the current student at
every evaluation: the Monte Carlo estimator (summed per-token log-ratios of the
sampled tokens) and the per-token exact variant (full-vocabulary KL summed along
the sampled prefixes), see `sequence_kl`. Fixing the samples makes successive
evaluations differ only through the student. Every reference model samples
batch b with the same key, so a teacher equal to the oracle gives identical
proxy and golden metrics (common random numbers). "Teacher hacking" is the proxy
falling while the golden rises (arXiv 2502.02671, Sec. 4).
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from posttrain_jax.core import partitioning
from posttrain_jax.distillation import sequence_kl
from posttrain_jax.inference.sampling import SamplingConfig, generate, left_pad
from posttrain_jax.models import ModelConfig, Transformer
from posttrain_jax.models import params_checkpoint


def _put(array: np.ndarray, sharding) -> jax.Array:
  """Global array from a value every process holds in full."""
  return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])


def _model_shardings(config: ModelConfig, mesh, rules):
  model = Transformer(config)
  _, shardings = partitioning.params_and_shardings(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"],
      mesh, rules)
  return model, shardings


def restore_frozen(checkpoint: str, config: ModelConfig, mesh: jax.sharding.Mesh,
                   rules=partitioning.DEFAULT_RULES):
  """A frozen model's parameters (teacher, oracle) on the mesh's shardings."""
  _, shardings = _model_shardings(config, mesh, rules)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          params_checkpoint.abstract_params(config), shardings)
  return params_checkpoint.restore_params(checkpoint, abstract, config)


class ProxyGoldenEvaluator:
  """Samples the reference sequences once; `__call__(student_params)` scores them.

  References: {"proxy": (teacher config, params), "golden": (oracle config,
  params)}; any name works, each gives metrics "<name>_kl" (Monte Carlo),
  "<name>_kl_token_sum" (the exact per-token KL summed over each sequence; nats per
  sequence, like "<name>_kl") and "<name>_kl_stderr".

  Paired errors: every evaluation scores the same samples, so a change of the
  metric between two evaluations is a mean of per-prompt differences, whose
  standard error is far below that of either value. "<name>_kl_change_stderr"
  is the standard error of (this evaluation - the first one of this process);
  "<name>_kl_rise" and "<name>_kl_rise_stderr" are this evaluation minus the
  lowest one so far (of this process; a resumed run starts afresh) and the
  paired standard error of that rise. A rise larger than a few of its standard
  errors is a real turn of the curve, not a re-draw of the prompts.
  `per_prompt` holds the last call's per-prompt values ({name: [num_prompts]}),
  which the distillation job saves per evaluation so that any two evaluations
  can be compared pairwise afterwards (`paired_stderr`).
  """

  def __init__(self, student_config: ModelConfig,
               references: dict[str, tuple[ModelConfig, object]],
               prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
               batch_size: int, mesh: jax.sharding.Mesh,
               rules=partitioning.DEFAULT_RULES, seed: int = 0, eos_id: int | None = 1):
    if not prompts:
      raise ValueError("ProxyGoldenEvaluator needs at least one held-out prompt.")
    if batch_size < 1:
      raise ValueError(f"Evaluation batch_size must be >= 1, got {batch_size}.")
    self.mesh, self.rules = mesh, rules
    self.student, student_shardings = _model_shardings(student_config, mesh, rules)
    batch = partitioning.batch_sharding(mesh, rules)
    replicated = partitioning.replicated(mesh)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0,
                              eos_id=eos_id)
    # Pad the prompt list to whole batches by repeating prompts; the repeats get
    # weight 0, so every prompt counts once.
    n = len(prompts)
    rows = -(-n // batch_size) * batch_size
    padded = [prompts[i % n] for i in range(rows)]
    tokens, lengths = left_pad(padded, student_config.vocab_size, sampling.pad_id)
    real = (np.arange(rows) < n).astype(np.float32)
    self.num_prompts = n
    self.samples = {}  # name -> list of per-batch dicts of global arrays
    self._first = {}  # name -> per-prompt values of the first evaluation
    self._lowest = {}  # name -> (mean, per-prompt values) of the lowest so far
    self.per_prompt = {}  # name -> per-prompt Monte Carlo values of the last call
    self._score = {}
    models = {name: _model_shardings(config, mesh, rules)
              for name, (config, _) in references.items()}
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      for name, (_, params) in sorted(references.items()):
        model, shardings = models[name]
        sample_fn = jax.jit(
            lambda p, t, l, r, model=model: generate(model, p, t, l[:, 0], r, sampling),
            in_shardings=(shardings, batch, batch, None))
        batches = []
        for b, start in enumerate(range(0, rows, batch_size)):
          sl = slice(start, start + batch_size)
          out = sample_fn(params, _put(tokens[sl], batch), _put(lengths[sl, None], batch),
                          jax.random.fold_in(jax.random.key(seed), b))
          batches.append({
              "tokens": out.tokens, "positions": out.positions,
              "segments": (out.prompt_mask | out.generated_mask).astype(jnp.int32),
              "mask": out.generated_mask.astype(jnp.float32)
                      * _put(real[sl, None], batch)})
        self.samples[name] = (params, batches)
        self._score[name] = jax.jit(
            functools.partial(_score_sums, self.student, model),
            in_shardings=(student_shardings, shardings, batch, batch, batch, batch),
            out_shardings=replicated)

  def __call__(self, student_params) -> dict[str, float]:
    metrics = {}
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      for name, (params, batches) in self.samples.items():
        totals, per_prompt = None, []
        for b in batches:
          sums = self._score[name](student_params, params, b["tokens"], b["positions"],
                                   b["segments"], b["mask"])
          per_prompt.append(sums.pop("mc"))
          totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        totals = jax.device_get(totals)
        values = np.concatenate(jax.device_get(per_prompt))[:self.num_prompts]
        count = float(totals["count"])
        mean = float(totals["mc_sum"]) / count
        var = max(float(totals["mc_sum_sq"]) / count - mean ** 2, 0.0) * count / max(
            count - 1, 1)
        metrics[f"{name}_kl"] = mean
        metrics[f"{name}_kl_stderr"] = float(np.sqrt(var / count))
        metrics[f"{name}_kl_token_sum"] = float(totals["per_token_sum"]) / count
        self.per_prompt[name] = values
        first = self._first.setdefault(name, values)
        if name not in self._lowest or mean < self._lowest[name][0]:
          self._lowest[name] = (mean, values)
        lowest_mean, lowest = self._lowest[name]
        metrics[f"{name}_kl_change_stderr"] = paired_stderr(values, first)
        metrics[f"{name}_kl_rise"] = mean - lowest_mean
        metrics[f"{name}_kl_rise_stderr"] = paired_stderr(values, lowest)
    return metrics


def paired_stderr(values: np.ndarray, reference: np.ndarray) -> float:
  """Standard error of mean(values - reference) over prompts (paired samples)."""
  diff = np.asarray(values, np.float64) - np.asarray(reference, np.float64)
  if diff.size < 2:
    return 0.0
  return float(np.std(diff, ddof=1) / np.sqrt(diff.size))


def _score_sums(student: Transformer, reference: Transformer, student_params,
                reference_params, tokens, positions, segments, mask):
  """Sums over the batch's real rows of both sequence-KL estimators."""
  apply = lambda m, p: m.apply({"params": p}, tokens, positions=positions,
                               segment_ids=segments)
  ref_logits = apply(reference, reference_params)
  student_logits = apply(student, student_params)
  kl = sequence_kl.sequence_kl_metrics(tokens, mask, ref_logits, student_logits)
  real = (jnp.sum(mask, axis=-1) > 0).astype(jnp.float32)
  mc, per_token = kl["mc"]["per_sequence"], kl["per_token"]["per_sequence"]
  return {"mc_sum": jnp.sum(real * mc), "mc_sum_sq": jnp.sum(real * mc ** 2),
          "per_token_sum": jnp.sum(real * per_token), "count": jnp.sum(real),
          "mc": mc}


PER_PROMPT_DIR = "eval_per_prompt"


def save_per_prompt(run_dir: str, step: int, values: dict) -> None:
  """Writes RUN_DIR/eval_per_prompt/step_<step>.npz ({metric name: per-prompt
  values}) atomically, for paired comparisons of two evaluations afterwards."""
  out = os.path.join(run_dir, PER_PROMPT_DIR)
  os.makedirs(out, exist_ok=True)
  tmp = os.path.join(out, f".step_{step}.tmp.npz")
  np.savez(tmp, **{k: np.asarray(v) for k, v in values.items()})
  os.replace(tmp, os.path.join(out, f"step_{step}.npz"))


def load_per_prompt(run_dir: str) -> dict[int, dict[str, np.ndarray]]:
  """{step: {metric name: per-prompt values}} saved by `save_per_prompt`."""
  out = os.path.join(run_dir, PER_PROMPT_DIR)
  if not os.path.isdir(out):
    return {}
  steps = {}
  for f in os.listdir(out):
    if f.startswith("step_") and f.endswith(".npz"):
      with np.load(os.path.join(out, f)) as z:
        steps[int(f[len("step_"):-len(".npz")])] = {k: z[k] for k in z.files}
  return dict(sorted(steps.items()))
