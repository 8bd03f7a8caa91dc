"""Orbax checkpoints of the train state together with the input pipeline's position.

Layout: `<workdir>/checkpoints/<step>/{state,data}`; `state` is the train-state pytree
(StandardSave) and `data` the grain iterator's position (one JSON file per process), so a
resumed run sees exactly the batches an uninterrupted run would.

Orbax writes every checkpoint into a temporary directory and renames it only once complete, so
a run killed mid-save leaves the previous checkpoints untouched (the leftover temporary directory
is ignored and cleaned up on the next start). A checkpoint that was finalised but later damaged
(a file truncated or deleted) fails to restore: `restore_latest` logs a warning, falls back to
the previous one and moves the damaged one aside into `<workdir>/checkpoints_corrupt/`.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from eiw_flow_jax import data

STATE = "state"
DATA = "data"
CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "checkpoints_corrupt"


class CheckpointError(RuntimeError):
  """Checkpoints exist but none of them can be restored."""


def make_manager(
    workdir: str, *, keep: int, async_save: bool = True, read_only: bool = False
) -> ocp.CheckpointManager:
  """A manager for `<workdir>/checkpoints` keeping the `keep` newest checkpoints.

  `read_only` (eval, sampling) never writes or deletes anything, so it is safe to use while a
  training run is saving into the same directory.
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      create=not read_only,
      # Leftovers of a save interrupted by a kill; never valid checkpoints. Only the training
      # run may remove them: for a reader they may be a save in progress.
      cleanup_tmp_directories=not read_only,
      enable_async_checkpointing=async_save,
      read_only=read_only,
  )
  return ocp.CheckpointManager(
      checkpoint_dir(workdir),
      options=options,
      item_names=(STATE, DATA),
  )


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    data_iterator: Any | None = None,
    *,
    force: bool = False,
) -> bool:
  """Starts saving `state` (and the iterator's position) as checkpoint `step`; async.

  Orbax copies the arrays to host memory before returning, so the caller may donate or
  overwrite them right away; writing to disk and finalising happen in the background.
  """
  items = {STATE: ocp.args.StandardSave(state)}
  if data_iterator is not None:
    # The grain handler reads the position synchronously here, before training moves on.
    items[DATA] = data.iterator_save_args(data_iterator)
  return manager.save(int(step), args=ocp.args.Composite(**items), force=force)


def _step_dir(manager: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(manager.directory), str(step))


def _quarantine(manager: ocp.CheckpointManager, step: int) -> None:
  """Moves an unreadable checkpoint aside (kept for inspection) so it is not retried."""
  if jax.process_index() == 0:
    source = _step_dir(manager, step)
    target_root = os.path.join(os.path.dirname(str(manager.directory)), CORRUPT_DIR)
    os.makedirs(target_root, exist_ok=True)
    target = os.path.join(target_root, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    if os.path.exists(source):
      shutil.move(source, target)
      logging.warning("Moved unreadable checkpoint %s to %s.", source, target)
  multihost_utils.sync_global_devices(f"eiw_flow_quarantine_{step}")
  manager.reload()


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def restore_latest(
    manager: ocp.CheckpointManager,
    abstract_state: Any,
    data_iterator: Any | None = None,
    *,
    quarantine: bool = True,
) -> tuple[int, Any] | None:
  """(step, state) of the newest readable checkpoint, or None if there is none.

  `abstract_state` is a pytree of `jax.ShapeDtypeStruct` (with shardings) giving the structure
  to restore into. With `data_iterator`, its position is restored in place as well. Unreadable
  checkpoints are reported and skipped (and, with `quarantine`, moved aside once an older one
  restores); if checkpoints exist but none can be read, raises CheckpointError rather than
  starting over.
  """
  manager.wait_until_finished()
  steps = sorted(manager.all_steps(), reverse=True)
  failures = []
  for step in steps:
    items = {STATE: ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items[DATA] = data.iterator_restore_args(data_iterator)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001 - corruption surfaces as many exception types
      failures.append(step)
      logging.warning(
          "Checkpoint at step %d in %s is corrupt or incomplete and cannot be restored "
          "(%s: %s); falling back to the previous checkpoint.",
          step, manager.directory, type(e).__name__, str(e)[:500],
      )
      continue
    if failures:
      logging.warning(
          "Resuming from checkpoint %d instead of the unreadable newer one(s) %s.", step, failures
      )
      # Out of the way, or saving those steps again would collide with them.
      for bad in failures if quarantine else ():
        _quarantine(manager, bad)
    return step, restored[STATE]
  if failures:
    # Left in place: a rerun must not silently start from scratch.
    raise CheckpointError(
        f"None of the checkpoints {failures} in {manager.directory} can be restored; see the "
        "warnings above. Move the damaged step directories aside (or use a fresh workdir)."
    )
  return None
