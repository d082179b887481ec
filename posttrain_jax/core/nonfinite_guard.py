"""Host-side policy for steps whose loss or gradient is NaN/inf.

The train step itself never applies a non-finite update (it keeps the old
parameters and reports metrics["nonfinite"] = 1); this guard decides whether
the run goes on: "skip" tolerates up to `max_consecutive` such steps in a row,
"halt" stops at the first one.
"""

from __future__ import annotations

POLICIES = ("skip", "halt")


class NonFiniteError(RuntimeError):
  """Training stopped on non-finite losses or gradients."""


class NonFiniteGuard:
  """Counts skipped steps and raises NonFiniteError when the policy says stop."""

  def __init__(self, policy: str = "skip", max_consecutive: int = 10):
    if policy not in POLICIES:
      raise ValueError(f"nonfinite_policy must be one of {POLICIES}, got {policy!r}.")
    if max_consecutive < 1:
      raise ValueError(f"max_consecutive_nonfinite must be >= 1, got {max_consecutive}.")
    self.policy, self.max_consecutive = policy, max_consecutive
    self.skipped = 0
    self.consecutive = 0

  def observe(self, step: int, nonfinite: bool) -> None:
    if not nonfinite:
      self.consecutive = 0
      return
    self.skipped += 1
    self.consecutive += 1
    if self.policy == "halt":
      raise NonFiniteError(
          f"Non-finite loss or gradient at step {step}; the update was not applied. "
          "Lower the learning rate, check the data, or set nonfinite_policy='skip'.")
    if self.consecutive >= self.max_consecutive:
      raise NonFiniteError(
          f"{self.consecutive} consecutive steps with non-finite loss or gradient "
          f"(steps {step - self.consecutive + 1}-{step}, {self.skipped} skipped in "
          "all); halting. The parameters are those of the last finite step.")
