"""Teacher-hacking detector: where a power-law training curve starts to flatten.

Tiapkin et al. 2025 ("On Teacher Hacking in Language Model Distillation",
arXiv 2502.02671) observe that in healthy (online) distillation runs
the proxy metric and the training loss are straight lines on log-log axes,

    metric(t) ~= C * t^(-alpha),  i.e.  log metric = a - alpha * log t,

and that in offline runs the curve flattens once the student starts to hack
the teacher (coinciding with the minimum of the golden metric). The exact fit
window and flag rule are not given in the paper; this module's rule is a
reconstruction [M], with every knob configurable:

 1. Keep points with step > 0 and metric > 0; sort by step. The fit window is
    the first `window` fraction of the points (at least `min_fit_points`).
 2. Least squares on the window: log m = a - alpha log t. Noise sigma = the
    residual standard deviation (ddof = 2).
 3. For every later point, residual r = log m - (a - alpha log t) and a
    one-sided threshold tau = max(num_sigmas * sigma * sqrt(1 + h), min_threshold),
    where h = 1/n + (x - x_bar)^2 / S_xx is the OLS leverage of the
    extrapolated point (prediction-interval width grows away from the window).
 4. Flag at the first point of the first run of `min_run` consecutive points
    with r > tau (the curve lies systematically above the extrapolated power
    law); `step` is that point's step.

Calibration of the defaults (num_sigmas 2, min_run 5, window 0.3) on synthetic
curves of 400 evenly spaced steps (metric = 3 t^-0.5 times log-normal
noise): 0 flags in 1000 pure power laws at 5% noise; with a plateau from step b
at 3% noise, flagged in 300/300 runs at 1.04-1.25 b (median 1.17 b). The lag
is inherent: the plateau's residual alpha log(t / b) must clear the noise.

Pure numpy: no JAX, no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class DetectorConfig:
  window: float = 0.3          # fraction of points in the early fit window [M]
  min_fit_points: int = 5
  num_sigmas: float = 2.0      # residual threshold in noise standard deviations [M]
  min_run: int = 5             # consecutive residuals above threshold to flag [M]
  min_threshold: float = 0.01  # floor on the log-space threshold (~1% relative) [M]

  def __post_init__(self):
    if not 0.0 < self.window < 1.0:
      raise ValueError(f"window must be in (0, 1), got {self.window}")
    if self.min_fit_points < 3:
      raise ValueError(f"min_fit_points must be >= 3, got {self.min_fit_points}")
    if self.min_run < 1:
      raise ValueError(f"min_run must be >= 1, got {self.min_run}")


@dataclasses.dataclass(frozen=True)
class DetectionResult:
  flagged: bool
  step: float | None        # first step of the flagged run (None if not flagged)
  alpha: float              # fitted power-law exponent (metric ~ C t^-alpha)
  log_c: float              # fitted intercept a = log C
  noise: float              # residual std on the fit window (log space)
  fit_end_step: float       # last step in the fit window
  num_points: int
  num_fit_points: int
  residuals: np.ndarray = dataclasses.field(repr=False)   # all points, log space
  thresholds: np.ndarray = dataclasses.field(repr=False)  # inf inside the window

  def to_json(self) -> dict:
    return {"flagged": self.flagged, "step": self.step, "alpha": self.alpha,
            "log_c": self.log_c, "noise": self.noise, "fit_end_step": self.fit_end_step,
            "num_points": self.num_points, "num_fit_points": self.num_fit_points}


def fit_power_law(steps, values) -> tuple[float, float, float]:
  """Least squares log v = a - alpha log s; returns (a, alpha, residual std)."""
  x = np.log(np.asarray(steps, np.float64))
  y = np.log(np.asarray(values, np.float64))
  slope, a = np.polyfit(x, y, 1)
  res = y - (a + slope * x)
  dof = max(len(x) - 2, 1)
  return float(a), float(-slope), float(math.sqrt(np.sum(res ** 2) / dof))


def detect_hacking(steps, values, config: DetectorConfig = DetectorConfig()) -> DetectionResult:
  """Apply the rule of the module docstring to one metric curve."""
  steps = np.asarray(steps, np.float64).reshape(-1)
  values = np.asarray(values, np.float64).reshape(-1)
  if steps.shape != values.shape:
    raise ValueError(f"steps and values differ in length: {steps.shape} vs {values.shape}")
  keep = (steps > 0) & (values > 0) & np.isfinite(values)
  order = np.argsort(steps[keep], kind="stable")
  steps, values = steps[keep][order], values[keep][order]
  n = len(steps)
  n_fit = max(config.min_fit_points, int(math.ceil(config.window * n)))
  if n < n_fit + 1:
    raise ValueError(f"need more than {n_fit} positive points to fit and test, got {n}")
  a, alpha, sigma = fit_power_law(steps[:n_fit], values[:n_fit])
  x = np.log(steps)
  residuals = np.log(values) - (a - alpha * x)
  x_fit = x[:n_fit]
  sxx = float(np.sum((x_fit - x_fit.mean()) ** 2))
  leverage = 1.0 / n_fit + (x - x_fit.mean()) ** 2 / max(sxx, 1e-300)
  thresholds = np.maximum(config.num_sigmas * sigma * np.sqrt(1.0 + leverage),
                          config.min_threshold)
  thresholds[:n_fit] = np.inf
  above = residuals > thresholds
  flag_step, run = None, 0
  for i in range(n_fit, n):
    run = run + 1 if above[i] else 0
    if run == config.min_run:
      flag_step = float(steps[i - config.min_run + 1])
      break
  return DetectionResult(flagged=flag_step is not None, step=flag_step, alpha=alpha,
                         log_c=a, noise=sigma, fit_end_step=float(steps[n_fit - 1]),
                         num_points=n, num_fit_points=n_fit, residuals=residuals,
                         thresholds=thresholds)
