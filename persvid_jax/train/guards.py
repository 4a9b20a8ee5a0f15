"""Non-finite guards of the training loop: a diverged run stops with one line, at its last good checkpoint.

The train step reports ``metrics['skipped']`` when ``config.train.max_nonfinite_skips``
lets it skip a non-finite step; ``SkipCounter`` sums those on device (nothing is
fetched per step) and ``verified`` checks the limit and finiteness whenever the
loop fetches metrics anyway (log and save steps).
"""

from __future__ import annotations

import logging

import jax
import numpy as np

log = logging.getLogger(__name__)


def verified(metrics: dict, skips: "SkipCounter", step: int, manager) -> dict:
  """``metrics`` (a dict of device scalars, shape ``()``) fetched to the host as floats,
  after the checks every log and save step needs: the skip limit (``SkipCounter``)
  and finiteness (``check_finite``). Raises ``FloatingPointError`` if either fails."""
  host = {k: float(v) for k, v in jax.device_get(metrics).items()}
  skips.check(step, manager)
  check_finite(host, step, manager)
  return host


def max_skips(train_config) -> int:
  """``config.train.max_nonfinite_skips`` (0, the default: stop at the first)."""
  n = int(train_config.get("max_nonfinite_skips", 0) or 0)
  if n < 0:
    raise ValueError(f"config.train.max_nonfinite_skips={n} must be >= 0")
  return n


class SkipCounter:
  """Counts the steps the train step skipped (``metrics['skipped']``) on device,
  so that nothing is fetched per step; checked when metrics are fetched."""

  def __init__(self, limit: int):
    self.limit, self.total, self.reported = limit, None, 0

  def add(self, metrics) -> None:
    if self.limit:
      s = metrics["skipped"]
      self.total = s if self.total is None else self.total + s

  def check(self, step: int, manager) -> None:
    """Warns about newly skipped steps; raises past the limit (like ``check_finite``)."""
    if not self.limit or self.total is None:
      return
    total = int(jax.device_get(self.total))
    if total > self.reported:
      log.warning("step %d: %d non-finite step(s) skipped so far in this run (limit %d, "
                  "config.train.max_nonfinite_skips)", step, total, self.limit)
      self.reported = total
    if total > self.limit:
      raise FloatingPointError(
          f"training diverged: {total} steps up to step {step} had a non-finite loss or "
          f"gradient, over config.train.max_nonfinite_skips={self.limit}; "
          f"{last_good(manager)}; lower config.train.learning_rate or "
          "config.train.grad_clip_norm")


def finite_part(metrics: dict) -> dict:
  """The metrics that must be finite: all of them, unless the step was skipped
  (then its loss and norms are the bad step's, and the state did not take them)."""
  if metrics.get("skipped", 0.0) > 0:
    return {k: v for k, v in metrics.items() if k not in ("loss", "grad_norm")}
  return metrics


def check_finite(metrics: dict, step: int, manager) -> None:
  """Raises ``FloatingPointError`` (one line: the step, the values, the last good
  checkpoint and what to do) if a metric of ``step`` is NaN or infinite.

  Checked at every logged step and before every save. The loss is computed
  before the update, so an infinite ``grad_norm`` (NaN params from now on)
  counts too, unless the step was skipped (``finite_part``; ``SkipCounter``
  counts those).
  """
  bad = {k: v for k, v in finite_part(metrics).items() if not np.isfinite(v)}
  if not bad:
    return
  values = ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
  raise FloatingPointError(f"training diverged at step {step} ({values}); "
                           f"{last_good(manager)}; lower config.train.learning_rate or "
                           "config.train.grad_clip_norm")


def last_good(manager) -> str:
  """Where a diverged run resumes: its newest complete checkpoint (saves finished)."""
  manager.wait_until_finished()
  last = manager.latest_step()
  return (f"the last good checkpoint is step {last} in {manager.directory}; rerunning "
          "resumes there" if last is not None else "there is no checkpoint yet")
