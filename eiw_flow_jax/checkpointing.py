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

Digests: damage that still decodes (a flipped byte in an array's data) is not caught by the
storage layer. In Orbax 0.12's default layout (OCDBT + zarr v2) TensorStore checks a CRC-32C
of OCDBT's B-tree nodes (a flip there fails to restore), but the values (zarr chunks, zstd
level 1 without zstd's optional frame checksum) carry none: of 27 flips of 8 bytes in a small
checkpoint's data files, 8 restored with changed values. Orbax's zarr v3 layout (`use_zarr3`)
adds crc32c only to the shard index, not to the chunks, and there is no Orbax option to add a
chunk checksum. So every
checkpoint carries a third item, `digests` (JSON): the SHA-256 of each array's bytes, per leaf
and per shard index, computed on the host from the values handed to Orbax. It is part of the
same atomic save (Orbax finalises the step directory only once every item is written), so a
torn save never looks complete. On restore each process hashes the shards it restored and
compares; a mismatch is treated like an unreadable checkpoint (one warning naming the
checkpoint and the array, fallback, quarantine), and every process agrees on the verdict. A
checkpoint without digests (saved by an older version) restores with an info line.

When a background save fails or a damaged checkpoint fails to restore, Orbax's threads log
tracebacks and TensorStore's late callbacks raise "Event loop is closed" (hundreds of
tracebacks); `quiet_background_errors` (installed by the command line) sends them to
`<workdir>/checkpoint_errors.log` instead of the console, so the one-line error stays last.

The workdir may be local or an `etils.epath` URL (`gs://bucket/run`): paths are never made
local. A save that fails (disk full, no permission) raises `storage.StorageError`, one line
naming the directory; the checkpoints saved before stay intact.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging as py_logging
import os
import re
import shutil
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from eiw_flow_jax import data, layouts, storage

STATE = "state"
DATA = "data"
DIGESTS = "digests"
DIGEST_ALGORITHM = "sha256"
DIGEST_FORMAT = 1
CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "checkpoints_corrupt"
# The background save/restore machinery's tracebacks (see BackgroundErrors), in the workdir.
ERROR_LOG = "checkpoint_errors.log"


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
# Digests of the saved values.


def _index_key(index: tuple[slice, ...], shape: tuple[int, ...]) -> str:
  """A shard's position in its array as text: "0:16,0:3" ("" for a scalar)."""
  return ",".join(
      "{}:{}".format(*s.indices(n)[:2]) for s, n in zip(index, shape, strict=True)
  )


def _leaf_shards(leaf: Any) -> list[tuple[str, Any]]:
  """(index key, value) of each distinct shard this process holds (replicas hashed once)."""
  if isinstance(leaf, jax.Array):
    shards: dict[str, Any] = {}
    for shard in leaf.addressable_shards:
      shards.setdefault(_index_key(shard.index, leaf.shape), shard.data)
    return list(shards.items())
  value = np.asarray(leaf)
  return [(_index_key((slice(None),) * value.ndim, value.shape), value)]


def _sha256(value: np.ndarray) -> str:
  data = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
  return hashlib.sha256(data).hexdigest()  # releases the GIL: leaves hash in parallel


def array_digests(tree: Any) -> dict[str, dict[str, str]]:
  """{leaf name ("params/level0_step0/..."): {shard index: sha256 of its bytes}}.

  Covers the shards this process holds (every array in full for a replicated state). The
  values are copied to the host in one batch, then hashed on a few threads.
  """
  names, keys, values = [], [], []
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = "/".join(_key_name(k) for k in key_path)
    for index, value in _leaf_shards(leaf):
      names.append(name)
      keys.append(index)
      values.append(value)
  host = jax.device_get(values)
  workers = max(1, min(8, os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    hashes = list(pool.map(_sha256, host))
  out: dict[str, dict[str, str]] = {}
  for name, index, digest in zip(names, keys, hashes, strict=True):
    out.setdefault(name, {})[index] = digest
  return out


def digest_record(state: Any) -> dict[str, Any]:
  """The `digests` item of a checkpoint of `state` (Orbax writes it from process 0 only)."""
  if jax.process_index() != 0:
    return {}
  return {"format": DIGEST_FORMAT, "algorithm": DIGEST_ALGORITHM, "arrays": array_digests(state)}


def digest_mismatch(state: Any, record: dict[str, Any]) -> str | None:
  """The first array (with its shard) of `state` whose bytes differ from `record`, or None.

  Each process checks the shards it holds; a shard whose index was not recorded (restored
  with another sharding than it was saved with) cannot be checked and is skipped.
  """
  saved = record.get("arrays", {})
  restored = array_digests(state)
  for name in sorted(set(saved) | set(restored)):
    if name not in restored:
      return f"{name} (recorded in the digests, absent from the restored state)"
    if name not in saved:
      return f"{name} (absent from the digests)"
    for index, digest in restored[name].items():
      expected = saved[name].get(index)
      if expected is not None and expected != digest:
        shown = f" [{index}]" if index and len(saved[name]) > 1 else ""
        return f"{name}{shown}"
  return None


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
    items[DATA] = data.iterator_save_args(data_iterator)
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


def _key_name(entry: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  out = {}
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    shape = getattr(leaf, "shape", None)
    if shape is not None:
      out["/".join(_key_name(k) for k in key_path)] = tuple(shape)
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


# An unrolled Glow flow step's name before the steps of a level were stacked (`level0_step3`),
# and the stacked module's (`level0_steps`).
_UNROLLED_STEP = re.compile(r"^level(\d+)_step(\d+)$")
# DenseFlow's unit layers before they were stacked (`unit0/layer2_coupling`).
_UNROLLED_IN_PATH = re.compile(
    r"(^|/)(level\d+_step\d+|layer\d+_(actnorm|conv1x1|coupling))(/|$)")


def stack_unrolled_steps(tree: Any) -> Any:
  """A pytree of the unrolled Glow layout (`level{l}_step{k}`, k = 0..K-1) in the stacked one.

  Every mapping with keys `level{l}_step{k}` gets, instead, one key `level{l}_steps` whose
  leaves are the K steps' leaves stacked along a new leading axis (what `MultiScaleFlow`
  creates since the steps of a level run under one scan); likewise a DenseFlow unit's
  `layer{j}_actnorm` / `_conv1x1` / `_coupling` become `layers/actnorm`, ... (`DenseUnit`).
  Anything else is kept, recursively through mappings, lists and tuples, so it converts params,
  the EMA params, the optimizer's moments and the constants alike, or a whole raw-restored
  train state.
  """
  if isinstance(tree, Mapping):
    tree = layouts.stack_unit_layers(tree) if any(
        layouts.UNIT_LAYER.match(str(key)) for key in tree) else tree
    steps: dict[int, dict[int, Any]] = {}
    out = {}
    for key, value in tree.items():
      match = _UNROLLED_STEP.match(str(key))
      if match:
        steps.setdefault(int(match.group(1)), {})[int(match.group(2))] = value
      else:
        out[key] = stack_unrolled_steps(value)
    for level, by_index in sorted(steps.items()):
      if sorted(by_index) != list(range(len(by_index))):
        raise ValueError(f"level{level}: expected steps 0..{len(by_index) - 1}, got "
                         f"{sorted(by_index)}.")
      parts = [stack_unrolled_steps(by_index[k]) for k in range(len(by_index))]
      out[f"level{level}_steps"] = jax.tree.map(lambda *leaves: np.stack(leaves), *parts)
    return out
  if isinstance(tree, tuple) and hasattr(tree, "_fields"):
    return type(tree)(*(stack_unrolled_steps(item) for item in tree))
  if isinstance(tree, (list, tuple)):
    return type(tree)(stack_unrolled_steps(item) for item in tree)
  return tree


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


def _unrolled_layout(differences: list[str]) -> bool:
  """Whether the differences are those of a checkpoint saved before the steps were stacked."""
  return any(_UNROLLED_IN_PATH.search(d.split(" ")[0]) and "only in the checkpoint" in d
             for d in differences)


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
    has_digests = (_step_dir(manager, step) / DIGESTS).exists()
    if has_digests:
      items[DIGESTS] = ocp.args.JsonRestore()
    differences = architecture_differences(manager, step, abstract_state)
    if differences and _unrolled_layout(differences):
      raise CheckpointMismatchError(
          f"The checkpoint at step {step} in {manager.directory} holds the unrolled layout "
          "(Glow level{l}_step{k} or DenseFlow layer{j}_*); convert it to the stacked one with "
          "eiw_flow_jax.checkpointing.convert_unrolled_checkpoints(old_workdir, new_workdir).")
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


# ----------------------------------------------------------------------------------------------
# Quiet background failures.


class BackgroundErrors(py_logging.Filter):
  """Keeps the tracebacks of Orbax's background threads off the console.

  When a save fails (a full disk) or a damaged checkpoint fails to restore, Orbax logs each
  failed thread's traceback at ERROR level, asyncio logs "Task exception was never retrieved",
  and TensorStore's completion callbacks, arriving after Orbax closed its event loop, raise
  "RuntimeError: Event loop is closed" as unraisable exceptions (hundreds of tracebacks for one
  failed save). The failure itself reaches the caller as one StorageError/CheckpointError line.
  A save aborted mid-write also leaves TensorStore's write coroutine unawaited, and Python warns
  about it while the interpreter shuts down, after our error line; on a full disk,
  tensorboardX's exit handler retries its failed flush and raises OSError there too.
  This filter (on the absl handler), the unraisable hook and the warning hook append those
  tracebacks to `log_file` (None: nowhere; writing is best effort, the disk may be full) and
  show them on the console only at debug verbosity (`--verbosity=1`). Everything else passes
  unchanged.
  """

  def __init__(self, log_file: str | None):
    super().__init__()
    self.log_file = log_file
    self.count = 0
    self._lock = threading.Lock()
    self._previous_hook = None
    self._previous_showwarning = None
    self._formatter = py_logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")

  def _debug(self) -> bool:
    return logging.level_debug()

  def _write(self, text: str) -> None:
    with self._lock:
      self.count += 1
      if self.log_file is None:
        return
      try:
        with open(self.log_file, "a") as f:
          f.write(text.rstrip("\n") + "\n")
      except OSError:
        pass  # a full disk is usually why we are here

  @staticmethod
  def _is_background(record: py_logging.LogRecord) -> bool:
    if record.levelno < py_logging.ERROR:
      return False
    return (
        f"{os.sep}orbax{os.sep}" in record.pathname
        or record.name == "asyncio"
        or "Event loop is closed" in record.getMessage()
    )

  def filter(self, record: py_logging.LogRecord) -> bool:
    if not self._is_background(record):
      return True
    self._write(self._formatter.format(record))
    return self._debug()

  def _unraisable(self, unraisable: Any) -> None:
    frames = traceback.extract_tb(unraisable.exc_traceback) if unraisable.exc_traceback else []
    from_machinery = (
        isinstance(unraisable.exc_value, RuntimeError)
        and "Event loop is closed" in str(unraisable.exc_value)
    ) or any(
        f"{os.sep}{name}{os.sep}" in frame.filename
        for frame in frames for name in ("orbax", "tensorstore", "asyncio")
    ) or (  # tensorboardX's atexit flush retrying the write that already failed (a full disk)
        isinstance(unraisable.exc_value, OSError)
        and any(f"{os.sep}tensorboardX{os.sep}" in frame.filename for frame in frames)
    )
    if not from_machinery:
      self._previous_hook(unraisable)
      return
    self._write("".join(traceback.format_exception(
        unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback)))
    if self._debug():
      self._previous_hook(unraisable)

  def _showwarning(self, message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, RuntimeWarning) and "was never awaited" in str(message):
      self._write(f"{category.__name__}: {message}")
      if not self._debug():
        return
    self._previous_showwarning(message, category, filename, lineno, file, line)

  def install(self) -> BackgroundErrors:
    logging.get_absl_handler().addFilter(self)
    for handler in py_logging.getLogger().handlers:
      if handler is not logging.get_absl_handler():
        handler.addFilter(self)
    self._previous_hook = sys.unraisablehook
    sys.unraisablehook = self._unraisable
    self._previous_showwarning = warnings.showwarning
    warnings.showwarning = self._showwarning
    return self

  def uninstall(self) -> None:
    for handler in [logging.get_absl_handler(), *py_logging.getLogger().handlers]:
      handler.removeFilter(self)
    if self._previous_hook is not None and sys.unraisablehook == self._unraisable:
      sys.unraisablehook = self._previous_hook
    if self._previous_showwarning is not None and warnings.showwarning == self._showwarning:
      warnings.showwarning = self._previous_showwarning


def quiet_background_errors(workdir: str) -> BackgroundErrors:
  """Installs BackgroundErrors for a run in `workdir` (a local workdir gets ERROR_LOG)."""
  local = bool(workdir and workdir.strip()) and not storage.is_remote(workdir)
  log_file = os.path.join(storage.normalize_dir(workdir, "workdir"), ERROR_LOG) if local else None
  return BackgroundErrors(log_file).install()
