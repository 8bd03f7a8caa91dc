"""The largest per-device batch whose train step fits, by a few compiles."""

from __future__ import annotations

import math
import time

import ml_collections

from eiw_flow_jax.aot import AotError
from eiw_flow_jax.aot.compiler import compile_for_topology
from eiw_flow_jax.aot.report import AotReport, BatchSearch

# One more compile is predicted to take this much longer than the longest so far.
_MARGIN = 1.25


def largest_batch(
    config: ml_collections.ConfigDict,
    topology: str,
    report: AotReport,
    *,
    budget_s: float,
    num_slices: int = 1,
) -> BatchSearch:
  """The largest per-device batch whose train step fits, within about `budget_s` seconds.

  Starts from `report` (one compile at its batch), guesses from memory being affine in the
  batch (the state is fixed, activations grow with it), then bisects between a batch that fits
  and one that does not. A compile is started only while the time spent plus the longest
  compile so far, with a margin (a larger batch compiles longer), stays within the budget; the
  result says whether it is exact.
  """
  started = time.perf_counter()
  # batch -> total bytes (a refusal's from the compiler's message; None: refused, size unknown)
  seen: dict[int, int | None] = {}

  def record(r: AotReport) -> None:
    seen[r.per_device_batch] = r.train_total

  record(report)
  limit = report.hbm_bytes
  longest = report.compile_seconds if math.isfinite(report.compile_seconds) else 0.0
  compiles, guessed = 0, 0

  def bracket() -> tuple[int | None, int | None]:
    fitting = [b for b, t in seen.items() if t is not None and t <= limit]
    lo = max(fitting) if fitting else None
    failing = [b for b, t in seen.items() if (t is None or t > limit) and (lo is None or b > lo)]
    return lo, min(failing, default=None)

  def estimate() -> int | None:
    """The batch where memory, affine in the batch, reaches the limit."""
    known = sorted((b, t) for b, t in seen.items() if t is not None)
    if len(known) >= 2:
      # The two closest to the limit: memory is only roughly affine over a wide range.
      b0, t0 = min(known, key=lambda bt: abs(bt[1] - limit))
      b1, t1 = min((bt for bt in known if bt[0] != b0), key=lambda bt: abs(bt[1] - limit))
      slope = (t1 - t0) / (b1 - b0)
    elif known:
      b0, t0 = known[0]
      slope = (t0 - sum(report.state_bytes.values())) / b0  # the state does not grow
    else:
      return None
    return int(b0 + (limit - t0) / slope) if slope > 0 else None

  while time.perf_counter() - started + _MARGIN * longest <= budget_s:
    lo, hi = bracket()
    if (lo is not None and hi is not None and hi <= lo + 1) or (lo is None and hi == 1):
      break
    guess = estimate()
    if lo is not None and hi is not None:
      # The estimate while it narrows the bracket; every third probe bisects, so that the
      # search ends in logarithmic time even when the memory is not affine in the batch.
      middle = (lo + hi) // 2
      batch = guess if guess is not None and lo < guess < hi and guessed < 2 else middle
      if guess == lo:
        batch = lo + 1
    elif lo is not None:
      batch = max(lo + 1, guess if guess is not None else 2 * lo)
    else:
      batch = max(1, min(hi - 1, guess if guess is not None else hi // 2))
    guessed = guessed + 1 if batch == guess else 0
    if batch in seen:
      break
    t0 = time.perf_counter()
    try:
      r = compile_for_topology(config, topology, batch, num_slices=num_slices, with_eval=False,
                               config_name=report.config_name, with_cost=False)
    except AotError:  # e.g. a global batch the config cannot split: stop searching
      break
    longest = max(longest, time.perf_counter() - t0)
    compiles += 1
    record(r)
  lo, hi = bracket()
  return BatchSearch(fits=lo, fails=hi, compiles=compiles, seconds=time.perf_counter() - started,
                     budget_s=budget_s, compile_seconds=longest)
