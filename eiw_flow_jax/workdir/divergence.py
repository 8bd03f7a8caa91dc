"""Divergence: a final test bpd that is not finite or far above the initial one is an error.

The first step's train bpd is kept in `<workdir>/run_info.json`, so the check also holds
after resumes.
"""

from __future__ import annotations

import json
import math

import jax

from eiw_flow_jax.workdir import storage

RUN_INFO_FILE = "run_info.json"


class DivergedError(RuntimeError):
  """The final test bpd is not finite, or far above where training started."""


# "Far above": more than this many bits/dim above the initial train bpd.
DIVERGENCE_MARGIN_BPD = 0.5


def record_initial_bpd(workdir: str, bpd: float) -> None:
  """Stores the first step's train bpd (process 0), for `check_final_bpd` after resumes."""
  if jax.process_index() == 0:
    storage.write_text(
        storage.path(workdir, RUN_INFO_FILE), json.dumps({"initial_train_bpd": bpd}, indent=2),
        "run info",
    )


def read_initial_bpd(workdir: str) -> float | None:
  try:
    value = json.loads(storage.path(workdir, RUN_INFO_FILE).read_text()).get("initial_train_bpd")
  except (FileNotFoundError, ValueError, OSError):
    return None
  return float(value) if isinstance(value, (int, float)) else None


def check_final_bpd(final: float, initial: float | None, where: str) -> None:
  """Raises DivergedError if `final` is not finite or > initial + DIVERGENCE_MARGIN_BPD."""
  if not math.isfinite(final):
    raise DivergedError(
        f"The final test bpd is {final} (not finite): training diverged. Results and "
        f"checkpoints are in {where}; consider a lower config.optimizer.learning_rate."
    )
  if initial is not None and math.isfinite(initial) and final > initial + DIVERGENCE_MARGIN_BPD:
    raise DivergedError(
        f"The final test bpd {final:.4f} is far above the initial train bpd {initial:.4f} "
        f"(by more than {DIVERGENCE_MARGIN_BPD}): training diverged. Results and checkpoints "
        f"are in {where}; consider a lower config.optimizer.learning_rate."
    )
