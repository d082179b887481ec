"""Power-law bend detector (Tiapkin et al. 2025, arXiv 2502.02671: hacking shows as a
departure from polynomial convergence; no flag on a power law, flag at a plateau)."""

import numpy as np
import pytest

from posttrain_jax.distillation import hacking_detector as hd


def _curve(bend=None, noise=0.03, alpha=0.5, n=400, seed=0, step_every=25):
  steps = step_every * np.arange(1, n + 1, dtype=np.float64)
  rng = np.random.default_rng(seed)
  clean = 3.0 * steps ** -alpha
  if bend is not None:
    clean = np.where(steps > bend, 3.0 * bend ** -alpha, clean)
  return steps, clean * np.exp(noise * rng.standard_normal(n))


def test_fit_recovers_power_law():
  steps, values = _curve(noise=0.0)
  a, alpha, sigma = hd.fit_power_law(steps, values)
  np.testing.assert_allclose([a, alpha], [np.log(3.0), 0.5], rtol=1e-9)
  assert sigma < 1e-9


@pytest.mark.parametrize("seed", range(20))
def test_pure_power_law_with_noise_not_flagged(seed):
  steps, values = _curve(noise=0.05, seed=seed)
  r = hd.detect_hacking(steps, values)
  assert not r.flagged, r
  assert r.step is None
  assert abs(r.alpha - 0.5) < 0.05


def test_noiseless_power_law_not_flagged():
  r = hd.detect_hacking(*_curve(noise=0.0))
  assert not r.flagged and abs(r.alpha - 0.5) < 1e-9


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("bend", [4000.0, 7000.0])
def test_plateau_flagged_near_bend(seed, bend):
  steps, values = _curve(bend=bend, noise=0.03, seed=seed)
  r = hd.detect_hacking(steps, values)
  assert r.flagged, r
  assert r.fit_end_step < bend
  # flagged after the bend and within 25% of it (the plateau needs time to rise
  # above the noise: alpha * log(step / bend) > 2 sigma for 5 points in a row)
  assert bend <= r.step <= 1.25 * bend, (r.step, bend)


def test_noiseless_plateau_flagged_right_after_bend():
  r = hd.detect_hacking(*_curve(bend=5000.0, noise=0.0))
  assert r.flagged and 5000.0 < r.step <= 5200.0, r


def test_rising_curve_flagged():
  """Golden-style U shape: falls then rises."""
  steps, values = _curve(noise=0.02)
  values = np.where(steps > 6000, values[steps == 6000][0] * (steps / 6000) ** 0.3, values)
  r = hd.detect_hacking(steps, values)
  assert r.flagged and 6000 <= r.step <= 6900, r


def test_unsorted_and_invalid_points_dropped():
  steps, values = _curve(bend=5000.0, noise=0.0)
  ref = hd.detect_hacking(steps, values)
  perm = np.random.default_rng(0).permutation(len(steps))
  s = np.concatenate([[0.0, 10.0], steps[perm]])
  v = np.concatenate([[5.0, -1.0], values[perm]])
  r = hd.detect_hacking(s, v)
  assert (r.flagged, r.step, r.num_points) == (ref.flagged, ref.step, ref.num_points)


def test_config_and_input_errors():
  with pytest.raises(ValueError):
    hd.DetectorConfig(window=1.0)
  with pytest.raises(ValueError):
    hd.DetectorConfig(min_run=0)
  with pytest.raises(ValueError):
    hd.detect_hacking([1, 2, 3], [1.0, 0.5, 0.3])
  with pytest.raises(ValueError):
    hd.detect_hacking([1, 2, 3], [1.0, 0.5])


def test_json_and_numpy_only_imports():
  r = hd.detect_hacking(*_curve(bend=5000.0))
  js = r.to_json()
  assert set(js) >= {"flagged", "step", "alpha"}
  import ast
  import inspect
  tree = ast.parse(inspect.getsource(hd))
  imported = {n.names[0].name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)}
  imported |= {n.module.split(".")[0] for n in ast.walk(tree)
               if isinstance(n, ast.ImportFrom) and n.module}
  assert imported <= {"__future__", "dataclasses", "math", "numpy"}, imported
