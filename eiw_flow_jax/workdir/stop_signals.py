"""Stop signals: preemption (SIGTERM) and Ctrl-C (SIGINT) end a run with one line, nothing lost.

SIGTERM (how TPU VMs, SLURM and Kubernetes announce preemption) and SIGINT finish the current
step; the run then saves a checkpoint and raises `StopRequested` (the command line prints one
line and exits with 128 + the signal number: 143 for SIGTERM, 130 for SIGINT). With several
processes all of them stop at the same step: SIGTERM reaches JAX's preemption service
(`multihost_utils.reached_preemption_sync_point`), which agrees on the step; a Ctrl-C on one
host is forwarded to it as SIGTERM. Work without step boundaries (the final evaluation, the
sample grids, `--mode=eval`) stops at once instead (`StopSignals.stop_at_once`), with a line
saying what is saved and what rerunning the command finishes.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging


class StopRequested(Exception):  # noqa: N818 - not an error: the run stopped as asked
  """The run stopped on SIGTERM/SIGINT with its checkpoints saved; rerun to resume or finish.

  `left`: what the stop left unwritten after training (results.json, the sample grids), which
  rerunning the command writes; `step` is then the checkpoint's step, or None where the
  command did not train (`--mode=eval`).
  """

  def __init__(
      self, signum: int, step: int | None, checkpoint_dir: str, *, left: str | None = None
  ):
    self.signum, self.step, self.checkpoint_dir, self.left = signum, step, checkpoint_dir, left
    name = signal.Signals(signum).name
    if left is None:
      message = (f"Stopped by {name} after step {step}; checkpoint saved in {checkpoint_dir}. "
                 "Run the same command again to resume.")
    elif step is None:
      message = (f"Stopped by {name} before writing {left}; the checkpoints in "
                 f"{checkpoint_dir} are unchanged. Run the same command again to write {left}.")
    else:
      message = (f"Stopped by {name} before writing {left}; training is complete and its "
                 f"checkpoint (step {step}) is saved in {checkpoint_dir}. Run the same command "
                 f"again to finish: it writes {left} from that checkpoint.")
    super().__init__(message)

  @property
  def exit_code(self) -> int:
    """128 + the signal number, as a shell reports a process ended by that signal."""
    return 128 + self.signum


def _preemption_service() -> bool:
  from jax._src import distributed  # noqa: PLC0415 - private, but the documented service's state

  return distributed.global_state.preemption_sync_manager is not None


class StopSignals:
  """Context manager: SIGTERM/SIGINT set a flag read at step boundaries by `should_stop`.

  The previous handlers come back on exit. A second Ctrl-C aborts at once (no save). Handlers
  can only be installed from the main thread; elsewhere signals keep their usual effect.
  """

  def __init__(self) -> None:
    self.received: int | None = None
    self._previous: dict[int, Any] = {}
    self._multi = False
    self._use_service = False
    self._at_once: Callable[[int], BaseException] | None = None

  def __enter__(self) -> StopSignals:
    self._multi = jax.process_count() > 1
    self._use_service = self._multi and _preemption_service()
    if threading.current_thread() is not threading.main_thread():
      logging.warning("Not on the main thread: SIGTERM/SIGINT will not save a checkpoint.")
      return self
    # With JAX's preemption service, SIGTERM is its notice (handled in C++): leave it there.
    signums = [signal.SIGINT] if self._use_service else [signal.SIGTERM, signal.SIGINT]
    for signum in signums:
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc: Any) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def stop_at_once(self, error: Callable[[int], BaseException]) -> None:
    """From now on a signal raises `error(signum)` at once in the main thread, for work with no
    step boundary to stop at; a signal received before raises it now."""
    self._at_once = error
    if self.received is not None:
      raise error(self.received)

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    first = self.received is None
    self.received = signum
    if self._at_once is not None:
      raise self._at_once(signum)
    if not first:
      return
    logging.warning(
        "Received %s: finishing the current step, then saving a checkpoint and stopping%s.",
        signal.Signals(signum).name,
        " (Ctrl-C again aborts without saving)" if signum == signal.SIGINT else "",
    )
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.default_int_handler)
    if self._use_service and signum != signal.SIGTERM:
      # Tell every process through the preemption service, which listens to SIGTERM.
      os.kill(os.getpid(), signal.SIGTERM)

  def should_stop(self, step: int) -> bool:
    """Called by every process after every step with the same `step`; True: save and stop."""
    if not self._multi:
      return self.received is not None
    if self._use_service:
      from jax.experimental import multihost_utils  # noqa: PLC0415

      if multihost_utils.reached_preemption_sync_point(step):
        if self.received is None:
          self.received = signal.SIGTERM
        return True
      return False
    # No preemption service: agree through an all-gather of the flags (a sync every step).
    from jax.experimental import multihost_utils  # noqa: PLC0415

    flags = multihost_utils.process_allgather(np.int32(self.received or 0))
    if np.any(flags):
      if self.received is None:
        self.received = int(np.max(flags))
      return True
    return False
