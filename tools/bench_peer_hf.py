"""The transformers (torch) peer of tools/bench_train.py: same shape, same weights.

`run_peer` builds `transformers.Gemma2ForCausalLM` from our parameters
(posttrain_jax.interop.hf_gemma2.params_to_hf), then times the same step as ours on the
same numpy batches:

  train    forward, weighted next-token cross-entropy, backward, gradient
           clipping and torch.optim.AdamW with OptimizerConfig's hyperparameters
  distill  a frozen teacher's forward (no_grad) plus the student's train step
           on the token-level forward KL(p_T || p_S)
  forward  forward and cross-entropy under no_grad

Parameters are stored in ModelConfig.param_dtype; when the compute dtype
differs (bf16 compute, fp32 master weights) the forward runs under
torch.autocast, the usual torch mixed-precision recipe. `compile=True` wraps
the model(s) in torch.compile (the forward and, through AOTAutograd, its
backward); the first step, which compiles, is reported as "compile s".
Imported only when `--peer hf` is given (needs torch and transformers).
"""

from __future__ import annotations

import contextlib
import gc
import resource
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
import transformers

from posttrain_jax.interop import hf_gemma2

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                 "float16": torch.float16}


def _torch_dtype(name: str):
  if name not in _TORCH_DTYPES:
    raise ValueError(f"the transformers peer supports dtypes {sorted(_TORCH_DTYPES)}, "
                     f"got {name!r}")
  return _TORCH_DTYPES[name]


def build_model(cfg, host_params, attn: str, device: str):
  """Gemma2ForCausalLM with our weights, in cfg.param_dtype, on `device`."""
  hf_config = hf_gemma2.hf_config_from_model(cfg)
  hf_config.pop("dtype", None)
  config = transformers.Gemma2Config(**{**hf_config, "attn_implementation": attn,
                                        "pad_token_id": 0, "eos_token_id": None,
                                        "bos_token_id": None, "use_cache": False})
  dtype = _torch_dtype(cfg.param_dtype)
  try:  # skip the random init that load_state_dict overwrites anyway
    from transformers.initialization import no_init_weights  # pylint: disable=g-import-not-at-top
  except ImportError:  # older transformers
    no_init_weights = contextlib.nullcontext
  with torch.device(device), no_init_weights():
    model = transformers.Gemma2ForCausalLM(config).to(dtype)
  state = {k: torch.from_numpy(np.array(v, np.float32)).to(dtype)
           for k, v in hf_gemma2.params_to_hf(host_params, cfg).items()}
  missing, unexpected = model.load_state_dict(state, strict=False)
  missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
  if missing or unexpected:
    raise RuntimeError(f"weights did not map: missing {missing}, unexpected {unexpected}")
  model.tie_weights()
  return model


def release_memory():
  """Frees torch's cached device memory (before JAX allocates its own)."""
  torch._dynamo.reset()  # pylint: disable=protected-access  # drops compiled graphs
  gc.collect()
  if torch.cuda.is_available():
    torch.cuda.empty_cache()


def _synchronize(device: str):
  if device.startswith("cuda"):
    torch.cuda.synchronize()


def default_device() -> str:
  return "cuda" if torch.cuda.is_available() else "cpu"


def run_peer(*args, **kwargs) -> dict:
  """Times `steps` peer steps after `warmup` (>= 1 when compiling); returns a
  row. The arguments of peer_windows, whose windows it runs back to back."""
  windows = peer_windows(*args, **kwargs)
  while True:
    try:
      next(windows)
    except StopIteration as done:
      return done.value


def peer_windows(step: str, cfg, host_params, batches, *, steps: int, warmup: int,
                 repeats: int = 1,
                 optimizer, compile: bool = False, attn: str = "eager",
                 device: str | None = None, threads: int | None = None,
                 teacher_cfg=None, teacher_params=None):
  """Generator: builds and warms up the peer, then yields before each of its
  `repeats` timed windows of `steps` steps and once after the last (the
  caller may run other work in between: tools/bench_train.py alternates these
  windows with its own), then releases torch's memory and returns the row
  (the fastest window) through StopIteration.

  threads: torch.set_num_threads (CPU); on a loaded machine one thread can be
  much faster than torch's default, whose OpenMP workers stall each other.
  """
  device = device or default_device()
  if threads:
    torch.set_num_threads(threads)
  model = build_model(cfg, host_params, attn, device)
  teacher = None
  if step == "distill":
    teacher = build_model(teacher_cfg, teacher_params, attn, device).eval()
    teacher.requires_grad_(False)
  num_params = sum(p.numel() for p in model.parameters())  # tied: counted once
  compute = _torch_dtype(cfg.dtype)
  autocast = torch.autocast(device_type=device.split(":")[0], dtype=compute,
                            enabled=compute != _torch_dtype(cfg.param_dtype))
  fwd = torch.compile(model) if compile else model
  t_fwd = (torch.compile(teacher) if compile else teacher) if teacher is not None else None
  opt = None
  if step != "forward":
    opt = torch.optim.AdamW(model.parameters(), lr=optimizer.learning_rate,
                            betas=(optimizer.b1, optimizer.b2), eps=optimizer.eps,
                            weight_decay=optimizer.weight_decay)
  tensors = [{k: torch.from_numpy(np.asarray(v)).to(device) for k, v in b.items()}
             for b in batches]
  for b in tensors:
    b["decoder_input_tokens"] = b["decoder_input_tokens"].long()
    b["decoder_target_tokens"] = b["decoder_target_tokens"].long()

  def logits_of(m, b):
    with autocast:
      return m(input_ids=b["decoder_input_tokens"]).logits.float()

  def ce(logits, b):
    w = b["decoder_loss_weights"]
    nll = F.cross_entropy(logits.flatten(0, 1), b["decoder_target_tokens"].flatten(),
                          reduction="none")
    return (nll * w.flatten()).sum() / w.sum().clamp(min=1.0)

  def one_step(b):
    if step == "forward":
      with torch.no_grad():
        return ce(logits_of(fwd, b), b)
    if step == "distill":
      with torch.no_grad():
        log_t = F.log_softmax(logits_of(t_fwd, b), -1)
      log_s = F.log_softmax(logits_of(fwd, b), -1)
      kl = (log_t.exp() * (log_t - log_s)).sum(-1)
      w = b["decoder_loss_weights"]
      loss = (kl * w).sum() / w.sum().clamp(min=1.0)
    else:
      loss = ce(logits_of(fwd, b), b)
    loss.backward()
    if optimizer.clip_grad_norm:
      torch.nn.utils.clip_grad_norm_(model.parameters(), optimizer.clip_grad_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()

  if device.startswith("cuda"):
    torch.cuda.reset_peak_memory_stats()
  t0 = time.perf_counter()
  loss = one_step(tensors[0])
  _synchronize(device)
  first_s = time.perf_counter() - t0
  for i in range(1, warmup):
    loss = one_step(tensors[i % len(tensors)])
  _synchronize(device)
  elapsed = float("inf")
  for _ in range(repeats):  # the fastest of `repeats` windows of `steps` steps
    yield
    t0 = time.perf_counter()
    for i in range(steps):
      loss = one_step(tensors[i % len(tensors)])
    _synchronize(device)
    elapsed = min(elapsed, time.perf_counter() - t0)
  yield  # all windows done: release only after every interleaved engine's last window
  loss = float(loss)
  if device.startswith("cuda"):
    mem, mem_source = int(torch.cuda.max_memory_allocated()), "torch"
    kind = torch.cuda.get_device_name()
  else:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mem = int(rss if sys.platform == "darwin" else rss * 1024)
    mem_source = "host RSS, whole process"
    kind = "cpu"
  model = teacher = fwd = t_fwd = opt = tensors = None  # release before JAX runs
  release_memory()
  return {
      "engine": f"transformers {transformers.__version__} ({attn}"
                f"{', torch.compile' if compile else ''})",
      "backend": f"torch {torch.__version__.split('+')[0]}",
      "devices": 1, "device_kind": kind, "mesh": {},
      "params": num_params, "steps": steps, "repeats": repeats, "warmup": warmup,
      "tokens_per_s": None, "step_ms": elapsed / steps * 1e3, "elapsed_s": elapsed,
      "peak_memory_bytes": mem, "peak_memory_source": mem_source,
      "compile_s": first_s if compile else 0.0, "loss": loss,
      "threads": torch.get_num_threads(),
  }
