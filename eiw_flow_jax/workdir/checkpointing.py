"""Orbax checkpoints of the train state together with the input pipeline's position.

Layout: `<workdir>/checkpoints/<step>/{state,data}`; `state` is the train-state pytree
(StandardSave) and `data` the grain iterator's position (one JSON file per process), so a
resumed run sees exactly the batches an uninterrupted run would.

Orbax writes every checkpoint into a temporary directory and renames it only once complete, so
a run killed mid-save leaves the previous checkpoints untouched (the leftover temporary directory
is ignored and cleaned up on the next start). A checkpoint that was finalised but later damaged
(a file truncated or deleted) fails to restore: `restore_latest` logs a warning, falls back to
the previous one and moves the damaged one aside into `<workdir>/checkpoints_corrupt/`.
A checkpoint of another architecture (the config changed) is not corrupt: restoring raises
CheckpointMismatchError naming the differing parameters and leaves every checkpoint in place.

Digests (`digests`): every checkpoint carries the SHA-256 of each array's bytes, verified on
restore. Background tracebacks of a failed save or restore go to a log file
(`background_errors`).

The workdir may be local or an `etils.epath` URL (`gs://bucket/run`): paths are never made
local. A save that fails (disk full, no permission) raises `storage.StorageError`, one line
naming the directory; the checkpoints saved before stay intact.
"""

from __future__ import annotations

import re
import shutil
import time
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from eiw_flow_jax.model.backbones import stack_unrolled_steps, unrolled_layout
from eiw_flow_jax.workdir import storage
from eiw_flow_jax.workdir.digests import digest_mismatch, digest_record, key_name

STATE = "state"
DATA = "data"
DIGESTS = "digests"
CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "checkpoints_corrupt"


class CheckpointError(RuntimeError):
  """Checkpoints exist but none of them can be restored."""


class CheckpointMismatchError(CheckpointError):
  """A checkpoint holds another architecture than the one built from the config."""


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
      item_names=(STATE, DATA, DIGESTS),
  )


# ----------------------------------------------------------------------------------------------

def _any_process(flag: bool) -> bool:
  """True on every process if `flag` is True on any (all take the same fallback)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


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
  if not force and not manager.should_save(int(step)):
    return False
  items = {
      STATE: ocp.args.StandardSave(state),
      # Hashed now, from the values Orbax copies: the caller may donate them after this call.
      DIGESTS: ocp.args.JsonSave(digest_record(state)),
  }
  if data_iterator is not None:
    # The grain handler reads the position synchronously here, before training moves on.
    items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
  # An earlier async save that failed surfaces here or in `check_saves`; either way as one line.
  with _saving(manager, step):
    return manager.save(int(step), args=ocp.args.Composite(**items), force=force)


class _saving:  # noqa: N801 - used as a context manager
  """Turns a failed (sync or background) save into storage.StorageError naming the directory."""

  def __init__(self, manager: ocp.CheckpointManager, step: int | None):
    self.manager, self.step = manager, step

  def __enter__(self) -> None:
    return None

  def __exit__(self, kind: Any, error: BaseException | None, tb: Any) -> bool:
    if error is None or isinstance(error, storage.StorageError):
      return False
    if not isinstance(error, Exception) or isinstance(error, CheckpointError):
      return False
    step = _failed_step(error, self.step)
    what = "a checkpoint" if step is None else f"the checkpoint of step {step}"
    raise storage.storage_error(what, self.manager.directory, error) from error


def _failed_step(error: BaseException, default: int | None) -> int | None:
  """The step whose save failed: a background save's error names its temporary directory
  (`<step>.orbax-checkpoint-tmp`), and surfaces at a later save or check."""
  cause: BaseException | None = error
  while cause is not None:
    found = re.search(r"(\d+)\.orbax-checkpoint-tmp", str(cause))
    if found:
      return int(found.group(1))
    cause = cause.__cause__ or cause.__context__
  return default


def check_saves(manager: ocp.CheckpointManager) -> None:
  """Raises StorageError if a background save has failed (cheap; call often)."""
  with _saving(manager, None):
    manager.check_for_errors()


def wait(manager: ocp.CheckpointManager) -> None:
  """Waits for the background save; StorageError if it failed."""
  with _saving(manager, None):
    manager.wait_until_finished()


def _step_dir(manager: ocp.CheckpointManager, step: int):
  return storage.path(manager.directory, str(step))


def _quarantine(manager: ocp.CheckpointManager, step: int) -> None:
  """Moves an unreadable checkpoint aside (kept for inspection) so it is not retried."""
  if jax.process_index() == 0:
    source = _step_dir(manager, step)
    target_root = storage.path(manager.directory).parent / CORRUPT_DIR
    target_root.mkdir(parents=True, exist_ok=True)
    target = target_root / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    if source.exists():
      source.rename(target)
      logging.warning("Moved unreadable checkpoint %s to %s.", source, target)
  multihost_utils.sync_global_devices(f"eiw_flow_quarantine_{step}")
  manager.reload()


def checkpoint_dir(workdir: str) -> str:
  """`<workdir>/checkpoints`; a URL workdir (gs://...) stays a URL."""
  return storage.join(storage.normalize_dir(workdir, "workdir"), CHECKPOINT_DIR)


def has_checkpoints(workdir: str) -> bool:
  """Whether `<workdir>/checkpoints` holds a finalised step directory."""
  directory = storage.path(checkpoint_dir(workdir))
  try:
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())
  except OSError:
    return False



def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  out = {}
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    shape = getattr(leaf, "shape", None)
    if shape is not None:
      out["/".join(key_name(k) for k in key_path)] = tuple(shape)
  return out


def architecture_differences(
    manager: ocp.CheckpointManager, step: int, abstract_state: Any
) -> list[str] | None:
  """Parameters whose presence or shape differ between checkpoint `step` and the model.

  None when the checkpoint's metadata cannot be read (then it is treated as possibly corrupt).
  """
  try:
    metadata = ocp.StandardCheckpointer().metadata(_step_dir(manager, step) / STATE)
    tree = getattr(metadata, "item_metadata", metadata)
    saved = {k: v for k, v in _shapes(tree).items() if k.split("/")[0] in ("params", "constants")}
  except Exception:  # noqa: BLE001 - damaged metadata surfaces as many exception types
    return None
  now = {
      f"{group}/{name}": shape
      for group in ("params", "constants")
      for name, shape in _shapes(getattr(abstract_state, group)).items()
  }
  if not saved:
    return None
  out = []
  for name in sorted(set(saved) | set(now)):
    if name not in now:
      out.append(f"{name} only in the checkpoint")
    elif name not in saved:
      out.append(f"{name} only in the model")
    elif saved[name] != now[name]:
      out.append(f"{name}: {saved[name]} in the checkpoint, {now[name]} in the model")
  return out



def convert_unrolled_checkpoints(workdir: str, new_workdir: str) -> list[int]:
  """Copies `workdir`'s checkpoints of the unrolled Glow layout into `new_workdir`, stacked.

  Each checkpoint's train state is read as saved (no target), converted by
  `stack_unrolled_steps` and written anew; the input pipeline's position and the workdir's
  other files (config.json, ...) are copied as they are. `workdir` is not changed. Returns
  the steps converted. Then resume with `--workdir=<new_workdir>`.
  """
  source = ocp.CheckpointManager(checkpoint_dir(workdir), options=ocp.CheckpointManagerOptions(
      read_only=True), item_names=(STATE, DATA))
  steps = sorted(source.all_steps())
  if not steps:
    raise CheckpointError(f"No checkpoints in {source.directory} to convert.")
  shutil.copytree(workdir, new_workdir, ignore=shutil.ignore_patterns(CHECKPOINT_DIR))
  target = ocp.CheckpointManager(checkpoint_dir(new_workdir), item_names=(STATE, DATA),
                                 options=ocp.CheckpointManagerOptions(create=True))
  checkpointer = ocp.StandardCheckpointer()
  try:
    for step in steps:
      state = checkpointer.restore(_step_dir(source, step) / STATE)
      step_dir = _step_dir(target, step)
      shutil.copytree(_step_dir(source, step), step_dir,
                      ignore=shutil.ignore_patterns(STATE))
      checkpointer.save(step_dir / STATE, stack_unrolled_steps(state))
      checkpointer.wait_until_finished()
  finally:
    checkpointer.close()
    source.close()
    target.close()
  return steps


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
      items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
    has_digests = (_step_dir(manager, step) / DIGESTS).exists()
    if has_digests:
      items[DIGESTS] = ocp.args.JsonRestore()
    differences = architecture_differences(manager, step, abstract_state)
    if differences and unrolled_layout(differences):
      raise CheckpointMismatchError(
          f"The checkpoint at step {step} in {manager.directory} holds the unrolled layout "
          "(Glow level{l}_step{k} or DenseFlow layer{j}_*); convert it to the stacked one with "
          "eiw_flow_jax.workdir.checkpointing.convert_unrolled_checkpoints(old_workdir, "
          "new_workdir).")
    if differences:
      shown = "; ".join(differences[:4]) + (
          f"; and {len(differences) - 4} more" if len(differences) > 4 else ""
      )
      raise CheckpointMismatchError(
          f"The checkpoint at step {step} in {manager.directory} holds another architecture "
          f"than the config builds ({len(differences)} parameters differ: {shown}). The "
          "checkpoints are intact: resume with the config they were trained with "
          "(config.json in the workdir), or train the new architecture in another --workdir."
      )
    error, mismatch = None, None
    try:
      restored = manager.restore(step, args=ocp.args.Composite(**items))
      if has_digests:
        mismatch = digest_mismatch(restored[STATE], restored[DIGESTS])
    except Exception as e:  # noqa: BLE001 - corruption surfaces as many exception types
      error = e
    # Every process takes the same fallback, even if only one of them read damaged bytes.
    if _any_process(error is not None or mismatch is not None):
      failures.append(step)
      if error is not None:
        logging.warning(
            "Checkpoint at step %d in %s is corrupt or incomplete and cannot be restored "
            "(%s: %s); falling back to the previous checkpoint.",
            step, manager.directory, type(error).__name__, " ".join(str(error).split())[:500],
        )
      else:
        logging.warning(
            "Checkpoint at step %d in %s is corrupt: array %s does not match the digest saved "
            "with it (its stored bytes changed after saving); falling back to the previous "
            "checkpoint.", step, manager.directory, mismatch or "(on another process)",
        )
      continue
    if not has_digests:
      logging.info(
          "Checkpoint at step %d in %s has no digests (saved by an older version): its values "
          "are not verified.", step, manager.directory,
      )
    if failures:
      logging.warning(
          "Resuming from checkpoint %d instead of the corrupt newer one(s) %s.", step, failures
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
