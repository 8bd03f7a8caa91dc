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
One of an older parameter layout is read as saved and migrated by the caller's `migrate` (the
run assembly passes the flow's `migrate_layout`): this module reads names and shapes, never
what they mean.

Digests (`digests`): every checkpoint carries the SHA-256 of each array's bytes and of each
process's input position, verified by every read (training, eval, `load`, conversions);
conversions write fresh ones. Background tracebacks of a failed save or restore go to a log
file (`background_errors`).

The workdir may be local or an `etils.epath` URL (`gs://bucket/run`): paths are never made
local. A save that fails (disk full, no permission) raises `storage.StorageError`, one line
naming the directory; the checkpoints saved before stay intact.
"""

from __future__ import annotations

import contextlib
import logging as py_logging
import re
import shutil
import time
from collections.abc import Callable, Iterator
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from eiw_flow_jax.workdir import storage
from eiw_flow_jax.workdir.digests import (
    digest_mismatch,
    digest_record,
    key_name,
    position_digests,
    position_mismatch,
)

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
      # A reader keeps and saves nothing (what Orbax would otherwise set, with a warning each).
      max_to_keep=None if read_only else keep,
      save_interval_steps=0 if read_only else 1,
      create=not read_only,
      # Leftovers of a save interrupted by a kill; never valid checkpoints. Only the training
      # run may remove them: for a reader they may be a save in progress.
      cleanup_tmp_directories=not read_only,
      enable_async_checkpointing=async_save,
      read_only=read_only,
  )
  with _dropping(_READ_ONLY_NOTICE if read_only else None):
    return ocp.CheckpointManager(
        checkpoint_dir(workdir),
        options=options,
        item_names=(STATE, DATA, DIGESTS),
    )


# Orbax logs this at WARNING level for every read-only manager (eval, sampling, `load`), which
# read-only is meant for; a reader that warns on every read teaches users to ignore warnings.
_READ_ONLY_NOTICE = "Given directory is read only"


class _Dropping(py_logging.Filter):
  def __init__(self, prefix: str):
    super().__init__()
    self.prefix = prefix

  def filter(self, record: py_logging.LogRecord) -> bool:
    return not record.getMessage().startswith(self.prefix)


@contextlib.contextmanager
def _dropping(prefix: str | None) -> Iterator[None]:
  """Drops the absl log records starting with `prefix` while inside (None: none)."""
  if prefix is None:
    yield
    return
  logger, dropping = logging.get_absl_logger(), _Dropping(prefix)
  logger.addFilter(dropping)
  try:
    yield
  finally:
    logger.removeFilter(dropping)


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
  positions = position_digests(data_iterator) if data_iterator is not None else None
  items = {
      STATE: ocp.args.StandardSave(state),
      # Hashed now, from the values Orbax copies: the caller may donate them after this call.
      DIGESTS: ocp.args.JsonSave(digest_record(state, positions)),
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


# ----------------------------------------------------------------------------------------------
# What a checkpoint holds, by leaf name ("params/level0_steps/..."), against what is restored.

# The top-level entries whose leaves are the model's: their names and shapes say which
# architecture a checkpoint holds. The EMA mirrors `params`, so it is compared only when
# `params` is not read (`load` reads the EMA alone).
_MODEL_GROUPS = ("params", "ema_params", "constants")


def _leaf_name(key_path: Any) -> str:
  return "/".join(key_name(k) for k in key_path)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  out = {}
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    shape = getattr(leaf, "shape", None)
    if shape is not None:
      out[_leaf_name(key_path)] = tuple(shape)
  return out


def _model_groups(names: Any) -> tuple[str, ...]:
  present = {name.split("/")[0] for name in names}
  groups = [group for group in _MODEL_GROUPS if group in present]
  if "params" in groups and "ema_params" in groups:
    groups.remove("ema_params")
  return tuple(groups)


def _differences(saved: dict[str, tuple[int, ...]], now: dict[str, tuple[int, ...]]) -> list[str]:
  """Model leaves (`_MODEL_GROUPS` of `now`) present in only one of the two, or shaped apart."""
  groups = _model_groups(now)
  saved = {k: v for k, v in saved.items() if k.split("/")[0] in groups}
  now = {k: v for k, v in now.items() if k.split("/")[0] in groups}
  out = []
  for name in sorted(set(saved) | set(now)):
    if name not in now:
      out.append(f"{name} only in the checkpoint")
    elif name not in saved:
      out.append(f"{name} only in the model")
    elif saved[name] != now[name]:
      out.append(f"{name}: {saved[name]} in the checkpoint, {now[name]} in the model")
  return out


def _saved_tree_metadata(manager: ocp.CheckpointManager, step: int) -> Any:
  """The saved train state's tree of array metadata (shape, dtype), as saved.

  Read by the item's handler: a Checkpointer would also look for the step's own metadata file
  in the item's directory, where the manager never writes one, and warn on every read.
  """
  handler = ocp.PyTreeCheckpointHandler()
  try:
    metadata = handler.metadata(_step_dir(manager, step) / STATE)
  finally:
    handler.close()
  return getattr(metadata, "tree", metadata)


def architecture_differences(
    manager: ocp.CheckpointManager, step: int, target: Any
) -> list[str] | None:
  """The model's leaves whose presence or shape differ between checkpoint `step` and `target`
  (a train state or a part of one, as arrays or ShapeDtypeStructs).

  None when the checkpoint's metadata cannot be read (then it is treated as possibly corrupt).
  """
  try:
    saved = _shapes(_saved_tree_metadata(manager, step))
  except Exception:  # noqa: BLE001 - damaged metadata surfaces as many exception types
    return None
  now = _shapes(target)
  if not any(name.split("/")[0] in _model_groups(now) for name in saved):
    return None
  return _differences(saved, now)


def _mismatch_error(
    manager: ocp.CheckpointManager, step: int, differences: list[str]
) -> CheckpointMismatchError:
  shown = "; ".join(differences[:4]) + (
      f"; and {len(differences) - 4} more" if len(differences) > 4 else ""
  )
  return CheckpointMismatchError(
      f"The checkpoint at step {step} in {manager.directory} holds another architecture "
      f"than the config builds ({len(differences)} parameters differ: {shown}). The "
      "checkpoints are intact: resume with the config they were trained with "
      "(config.json in the workdir), or train the new architecture in another --workdir."
  )


# ----------------------------------------------------------------------------------------------
# Reading a checkpoint: as the target lays it out, or as saved (an older layout, to migrate).

Migrate = Callable[[Any], Any]


def _read_as_saved(manager: ocp.CheckpointManager, step: int) -> Any:
  """Checkpoint `step`'s train state as it was saved (nested dicts and lists of numpy arrays):
  the names the digests were computed with, whatever layout the model has now."""
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                          _saved_tree_metadata(manager, step))
  with ocp.PyTreeCheckpointer() as checkpointer:
    return checkpointer.restore(_step_dir(manager, step) / STATE,
                                args=ocp.args.PyTreeRestore(restore_args=as_numpy))


def _read_part(manager: ocp.CheckpointManager, step: int, target: Any) -> Any:
  """Checkpoint `step`'s train state, only `target`'s entries read from disk."""
  with ocp.PyTreeCheckpointer() as checkpointer:
    return checkpointer.restore(
        _step_dir(manager, step) / STATE,
        args=ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True))


def _read(
    manager: ocp.CheckpointManager, step: int, target: Any, data_iterator: Any | None, *,
    partial: bool, as_saved: bool, digests: bool,
) -> tuple[Any, dict[str, Any] | None]:
  """(state, digest record or None) of checkpoint `step`; the iterator's position restored."""
  items = {}
  # As saved or in part, the state is read below, outside the manager: the manager keeps the
  # handler of an item's first use, and saving through it later needs the standard one.
  if not (as_saved or partial):
    items[STATE] = ocp.args.StandardRestore(target)
  if data_iterator is not None:
    items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
  if digests:
    items[DIGESTS] = ocp.args.JsonRestore()
  restored = manager.restore(step, args=ocp.args.Composite(**items)) if items else {}
  if as_saved:
    state = _read_as_saved(manager, step)
  elif partial:
    state = _read_part(manager, step, target)
  else:
    state = restored[STATE]
  return state, (restored[DIGESTS] if digests else None)


def _migrated(
    manager: ocp.CheckpointManager, step: int, saved: Any, target: Any, migrate: Migrate
) -> Any:
  """The tree read as saved, through `migrate`, checked against and placed like `target`."""
  try:
    tree = migrate(saved)
  except ValueError as e:  # the migration's LayoutError, or a malformed tree
    raise CheckpointMismatchError(
        f"The checkpoint at step {step} in {manager.directory} holds a parameter layout that "
        f"cannot be migrated to the current one: {' '.join(str(e).split())[:300]} The "
        "checkpoints are intact: resume with the version of the code that wrote them, or start "
        "in another --workdir."
    ) from None
  leaves = {_leaf_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
  now = _shapes(target)
  differences = _differences({name: np.shape(leaf) for name, leaf in leaves.items()}, now)
  differences += [  # the optimizer's moments and counters, which the model check leaves out
      f"{name} only in the model" if name not in leaves
      else f"{name}: {np.shape(leaves[name])} in the checkpoint, {shape} in the model"
      for name, shape in now.items()
      if name.split("/")[0] not in _model_groups(now)
      and (name not in leaves or np.shape(leaves[name]) != shape)
  ]
  if differences:
    raise _mismatch_error(manager, step, differences)
  logging.warning(
      "Checkpoint at step %d in %s holds an older parameter layout: migrated to the current one "
      "(checkpoints saved from here on are in it).", step, manager.directory)

  def placed(path: Any, spec: jax.ShapeDtypeStruct) -> jax.Array:
    value = np.asarray(leaves[_leaf_name(path)], dtype=spec.dtype)
    return jax.make_array_from_callback(spec.shape, spec.sharding, lambda index: value[index])

  return jax.tree_util.tree_map_with_path(placed, target)


def restore_latest(
    manager: ocp.CheckpointManager,
    target: Any,
    data_iterator: Any | None = None,
    *,
    quarantine: bool = True,
    migrate: Migrate | None = None,
    partial: bool = False,
) -> tuple[int, Any] | None:
  """(step, state) of the newest readable checkpoint, or None if there is none.

  `target` is a pytree of `jax.ShapeDtypeStruct` (with shardings) giving the structure to
  restore into: the whole train state, or with `partial` some of its top-level entries (only
  those are read from disk). With `data_iterator`, its position is restored in place as well.

  Every checkpoint read is verified against the digests saved with it (with `partial`, the
  leaves read); one without digests (saved before they existed) restores with a warning.
  Unreadable or damaged checkpoints are reported and skipped (and, with `quarantine`, moved
  aside once an older one restores); if checkpoints exist but none can be read, raises
  CheckpointError rather than starting over.

  A checkpoint whose parameters differ from `target`'s is read as saved, verified, and passed
  through `migrate(tree) -> tree` (an older parameter layout into the current one; ValueError
  if it cannot); if they still differ (or without `migrate`), CheckpointMismatchError names
  them and every checkpoint stays in place.
  """
  manager.wait_until_finished()
  steps = sorted(manager.all_steps(), reverse=True)
  failures = []
  for step in steps:
    has_digests = (_step_dir(manager, step) / DIGESTS).exists()
    differences = architecture_differences(manager, step, target)
    as_saved = bool(differences) and migrate is not None
    if differences and not as_saved:
      raise _mismatch_error(manager, step, differences)
    error, mismatch, record = None, None, None
    try:
      state, record = _read(manager, step, target, data_iterator, partial=partial,
                            as_saved=as_saved, digests=has_digests)
      if record is not None:
        mismatch = digest_mismatch(state, record, partial=partial and not as_saved)
        mismatch = None if mismatch is None else f"array {mismatch}"
        if mismatch is None and data_iterator is not None:
          key = position_mismatch(data_iterator, record)
          mismatch = None if key is None else f"the input position {DATA}/{key}.json"
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
            "Checkpoint at step %d in %s is corrupt: %s does not match the digest saved with "
            "it (its stored bytes changed after saving); falling back to the previous "
            "checkpoint.", step, manager.directory, mismatch or "an item (on another process)",
        )
      continue
    if not has_digests:
      logging.warning(
          "Checkpoint at step %d in %s has no digests (saved by an older version): its values "
          "are not verified.", step, manager.directory,
      )
    elif data_iterator is not None and "positions" not in record:
      logging.warning(
          "Checkpoint at step %d in %s has no digest of its input position (saved by an older "
          "version): the position is not verified.", step, manager.directory,
      )
    if as_saved:
      state = _migrated(manager, step, state, target, migrate)
    if failures:
      logging.warning(
          "Resuming from checkpoint %d instead of the corrupt newer one(s) %s.", step, failures
      )
      # Out of the way, or saving those steps again would collide with them.
      for bad in failures if quarantine else ():
        _quarantine(manager, bad)
    return step, state
  if failures:
    # Left in place: a rerun must not silently start from scratch.
    raise CheckpointError(
        f"None of the checkpoints {failures} in {manager.directory} can be restored; see the "
        "warnings above. Move the damaged step directories aside (or use a fresh workdir)."
    )
  return None


def migrate_checkpoints(workdir: str, new_workdir: str, migrate: Migrate) -> list[int]:
  """Writes `workdir`'s checkpoints into `new_workdir`, each passed through `migrate`.

  The offline form of what restoring does for an older parameter layout: each checkpoint's
  train state is read as saved, verified against its digests, migrated and written anew with
  fresh digests of what was written; the input pipeline's position and the workdir's other
  files (config.json, ...) are copied as they are. A checkpoint that does not verify is not
  converted (a warning names it). `workdir` is not changed; both are local directories.
  Returns the steps converted.
  """
  source = make_manager(workdir, keep=1, read_only=True)
  try:
    steps = sorted(source.all_steps())
    if not steps:
      raise CheckpointError(f"No checkpoints in {source.directory} to convert.")
    shutil.copytree(workdir, new_workdir, ignore=shutil.ignore_patterns(CHECKPOINT_DIR))
    converted = []
    for step in steps:
      has_digests = (_step_dir(source, step) / DIGESTS).exists()
      saved, record = _read(source, step, None, None, partial=False, as_saved=True,
                            digests=has_digests)
      mismatch = digest_mismatch(saved, record) if record is not None else None
      if mismatch is not None:
        logging.warning("Checkpoint at step %d in %s is corrupt: array %s does not match the "
                        "digest saved with it; not converted.", step, source.directory, mismatch)
        continue
      tree = migrate(saved)
      step_dir = storage.path(checkpoint_dir(new_workdir), str(step))
      shutil.copytree(_step_dir(source, step), step_dir,
                      ignore=shutil.ignore_patterns(STATE, DIGESTS))
      with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(step_dir / STATE, tree)
      positions = record.get("positions") if record is not None else None  # copied as is
      with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
        checkpointer.save(step_dir / DIGESTS,
                          args=ocp.args.JsonSave(digest_record(tree, positions)))
      converted.append(step)
  finally:
    source.close()
  return converted
