"""An independent numpy re-implementation of the whole Streaming DiLoCo
schedule (Douillard et al. 2025, arXiv 2501.18512, Algorithm 2), compared with
`StreamingDiLoCo.train_step` (the fused τ >= 1 programs the trainer runs)
step by step: M = 2 replicas, P = 2 strided fragments (offsets 0 and 2),
H = 4, τ = 1, α = 0.5, outer Nesterov SGD (momentum 0.9, lr 0.7), FP4 E3M0
exchange with one scale per tensor, 12 steps of inner SGD on a 2-layer linear
regression. Nothing of the package is used on the numpy side."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain_jax.diloco import streaming_diloco as sd

M, P, H, TAU, ALPHA, MU, OUTER_LR, INNER_LR, STEPS = 2, 2, 4, 1, 0.5, 0.9, 0.7, 0.05, 12
D_IN, D_HID, D_OUT, ROWS = 3, 4, 2, 8


def np_fp4(x):
  """FP4 E3M0 fake quantization, one scale per tensor: |x| / max|x| rounded
  to the nearest of {2^-6, ..., 1} in value (ties up), 0 below 2^-7."""
  x = np.asarray(x, np.float32)
  scale = np.float32(np.max(np.abs(x)))
  if scale == 0:
    return np.zeros_like(x)
  r = np.abs(x) / scale
  mags = 2.0 ** np.arange(-6, 1)
  thresholds = 1.5 * 2.0 ** np.arange(-6, 0)
  q = mags[np.searchsorted(thresholds, r, side="right")]
  q = np.where(r >= 2.0 ** -7, q, 0.0)
  return (np.sign(x) * q * scale).astype(np.float32)


def np_grads(w0, w1, x, y):
  """d/dW of mean((x W0 W1 - y)^2) over rows and outputs."""
  h = x @ w0
  r = 2.0 * (h @ w1 - y) / y.size
  return x.T @ (r @ w1.T), h.T @ r


def numpy_reference(init, batches, quantize=True):
  """[(θ̃, θ_m for every m) after each step], every array float32."""
  outer = [np.array(init[0]), np.array(init[1])]  # fragment p = layer p
  local = [[np.array(w) for w in init] for _ in range(M)]
  momentum = [np.zeros_like(w) for w in init]
  offsets = [int(np.floor(p * H / P + 0.5)) for p in range(P)]
  pending = [None] * P
  history = []
  for t in range(1, STEPS + 1):
    for m in range(M):
      x, y = batches[t - 1][0][m], batches[t - 1][1][m]
      g0, g1 = np_grads(*local[m], x, y)
      local[m] = [local[m][0] - INNER_LR * g0, local[m][1] - INNER_LR * g1]
    for p in range(P):  # exchanges started after step t
      if (t - offsets[p]) % H == 0:
        deltas = [outer[p] - local[m][p] for m in range(M)]
        deltas = [np_fp4(d) if quantize else d for d in deltas]
        pending[p] = sum(deltas) / M
    for p in range(P):  # outer steps tau steps later, then merges
      if t - TAU >= 1 and (t - TAU - offsets[p]) % H == 0:
        momentum[p] = MU * momentum[p] + pending[p]
        outer[p] = outer[p] - OUTER_LR * (pending[p] + MU * momentum[p])
        for m in range(M):
          local[m][p] = ALPHA * local[m][p] + (1 - ALPHA) * outer[p]
    history.append(([w.copy() for w in outer], [[w.copy() for w in l] for l in local]))
  return history


@flax.struct.dataclass
class SGDState:
  params: dict


def inner_sgd(state, batch):
  def loss(params):
    pred = batch["x"] @ params["layer_0"]["w"] @ params["layer_1"]["w"]
    return jnp.mean((pred - batch["y"]) ** 2)
  value, grads = jax.value_and_grad(loss)(state.params)
  params = jax.tree.map(lambda w, g: w - INNER_LR * g, state.params, grads)
  return state.replace(params=params), {"loss": value}


@pytest.mark.parametrize("quantize", [True, False])
def test_schedule_matches_numpy_reference_step_by_step(quantize):
  rng = np.random.default_rng(0)
  init = (rng.normal(size=(D_IN, D_HID)).astype(np.float32) * 0.5,
          rng.normal(size=(D_HID, D_OUT)).astype(np.float32) * 0.5)
  teacher = rng.normal(size=(D_IN, D_OUT)).astype(np.float32)
  batches = []
  for _ in range(STEPS):
    x = rng.normal(size=(M, ROWS, D_IN)).astype(np.float32)
    batches.append((x, x @ teacher))
  expected = numpy_reference(init, batches, quantize)

  config = sd.DiLoCoConfig(num_replicas=M, sync_every=H, num_fragments=P,
                           pattern="strided", overlap=TAU, alpha=ALPHA,
                           outer_lr=OUTER_LR, outer_momentum=MU, nesterov=True,
                           quantization="fp4_e3m0" if quantize else "none")
  params = {"layer_0": {"w": jnp.asarray(init[0])}, "layer_1": {"w": jnp.asarray(init[1])}}
  algo = sd.StreamingDiLoCo(config, inner_sgd, params)
  assert [[s.name for s in f.selectors] for f in algo.fragments] == [
      ["layer_0/w"], ["layer_1/w"]]
  assert algo.schedule.offsets == (0, 2)
  state = algo.init(SGDState(params))
  moved_by_outer = 0
  for t, (x, y) in enumerate(batches):
    state, _ = algo.train_step(state, {"x": jnp.asarray(x), "y": jnp.asarray(y)}, t)
    outer, local = expected[t]
    got = jax.device_get(state)
    for p in range(P):
      np.testing.assert_allclose(got.outer_params[f"layer_{p}"]["w"], outer[p],
                                 rtol=2e-5, atol=2e-6, err_msg=f"θ̃ step {t + 1}")
      for m in range(M):
        np.testing.assert_allclose(got.replicas.params[f"layer_{p}"]["w"][m],
                                   local[m][p], rtol=2e-5, atol=2e-6,
                                   err_msg=f"θ_{m} step {t + 1}")
    moved_by_outer += not np.allclose(outer[0], init[0]) or not np.allclose(outer[1], init[1])
  assert moved_by_outer >= STEPS - 3  # the outer steps really ran (from step 3)
  # the dispatcher ran exchanges fused with the next inner step (τ = 1)
  assert any(k[0] == "fused" for k in algo.dispatches)
