"""What keeps a training run safe on a pod: paths, stop signals, the workdir lock, checks.

* Paths: a workdir or data dir may be local or any `etils.epath` URL (`gs://`, `s3://`); every
  file the project writes goes through `path()`, so nothing turns `gs://b/x` into `./gs:/b/x`.
* Stop signals: SIGTERM (how TPU VMs, SLURM and Kubernetes announce preemption) and SIGINT
  (Ctrl-C) finish the current step; the run then saves a checkpoint and raises `StopRequested`
  (the command line prints one line and exits with 128 + the signal number: 143 for SIGTERM,
  130 for SIGINT). With several processes all of them stop at the same step: SIGTERM reaches
  JAX's preemption service (`multihost_utils.reached_preemption_sync_point`), which agrees on
  the step; a Ctrl-C on one host is forwarded to it as SIGTERM.
* The workdir lock `<workdir>/LOCK` (pid, host, start time, heartbeat): a second training run
  on a busy workdir refuses to start. A lock whose process is gone (same host) or whose
  heartbeat is older than `stale_after` seconds (another host) is stale and taken over.
* Config check: resuming with a config that differs from `<workdir>/config.json` in the model,
  batch size, seed or dataset is refused (naming the fields) unless `allow_config_change`; a
  changed `dataset.worker_count` is refused even then (the saved pipeline position needs it).
* Divergence: a final test bpd that is not finite or far above the initial one is an error.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from eiw_flow_jax import config_lib

LOCK_FILE = "LOCK"
CONFIG_FILE = "config.json"
RUN_INFO_FILE = "run_info.json"

# ----------------------------------------------------------------------------------------------
# Paths.


def is_remote(path: str | os.PathLike[str]) -> bool:
  """True for URLs (`gs://bucket/dir`, `s3://...`): never made absolute or `os`-joined."""
  return "://" in os.fspath(path)


def normalize_dir(value: str | os.PathLike[str], what: str) -> str:
  """A usable directory string: URLs unchanged (minus a trailing '/'), local paths absolute.

  Raises ConfigError for an empty value, which would otherwise mean the current directory.
  """
  value = os.fspath(value) if value is not None else ""
  if not value.strip():
    raise config_lib.ConfigError(f"{what} must name a directory, got {value!r}.")
  if is_remote(value):
    return value.rstrip("/")
  return os.path.abspath(os.path.expanduser(value))


def path(root: str | os.PathLike[str], *parts: str) -> epath.Path:
  """`root / parts` as an `etils.epath.Path` (local, `gs://`, `s3://`)."""
  return epath.Path(os.fspath(root)).joinpath(*parts)


def join(root: str | os.PathLike[str], *parts: str) -> str:
  """String form of `path(root, *parts)`, keeping a URL's `//`."""
  return os.fspath(path(root, *parts))


class StorageError(RuntimeError):
  """A file of the run (checkpoint, lock, config, results) could not be written."""


def storage_error(what: str, where: str | os.PathLike[str], error: BaseException) -> StorageError:
  """One line naming what failed, where, and why (the OS reason when there is one)."""
  cause = error
  while cause is not None and not isinstance(cause, OSError):
    cause = cause.__cause__ or cause.__context__
  if isinstance(cause, OSError) and cause.errno:
    reason = os.strerror(cause.errno)
    if cause.errno == errno.ENOSPC:
      reason += " (free space or use a larger disk / a bucket)"
  else:
    reason = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
  return StorageError(f"Cannot write {what} to {os.fspath(where)}: {reason}.")


@contextlib.contextmanager
def writing(what: str, where: str | os.PathLike[str]) -> Iterator[None]:
  """Turns an OSError while writing `what` to `where` into a one-line StorageError."""
  try:
    yield
  except StorageError:
    raise
  except OSError as e:
    raise storage_error(what, where, e) from e


def write_text(file: epath.Path, text: str, what: str) -> None:
  with writing(what, file):
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(text)


# ----------------------------------------------------------------------------------------------
# Stop signals (preemption, Ctrl-C).


class StopRequested(Exception):  # noqa: N818 - not an error: the run stopped as asked
  """Training stopped on SIGTERM/SIGINT after saving a checkpoint; rerun to resume."""

  def __init__(self, signum: int, step: int, checkpoint_dir: str):
    self.signum, self.step, self.checkpoint_dir = signum, step, checkpoint_dir
    name = signal.Signals(signum).name
    super().__init__(
        f"Stopped by {name} after step {step}; checkpoint saved in {checkpoint_dir}. "
        "Run the same command again to resume."
    )

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

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    first = self.received is None
    self.received = signum
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


# ----------------------------------------------------------------------------------------------
# The workdir lock.


class WorkdirBusyError(RuntimeError):
  """Another training run holds the workdir's lock."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkdirLock:
  """`<workdir>/LOCK`, held by one training run; refreshed by a heartbeat thread.

  Local workdirs are locked atomically (O_CREAT | O_EXCL); on object stores (`gs://`), which
  have no exclusive create, the lock is written and read back (a best effort that catches runs
  started seconds apart, the usual accident).
  """

  def __init__(self, workdir: str, *, stale_after: float = 600.0):
    self.file = path(workdir, LOCK_FILE)
    self.stale_after = float(stale_after)
    self.token = uuid.uuid4().hex
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self.held = False

  def _record(self) -> dict[str, Any]:
    now = time.time()
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": getattr(self, "_started", now),
        "heartbeat": now,
        "token": self.token,
    }

  def _describe(self, holder: dict[str, Any]) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if started else "?"
    age = time.time() - float(holder.get("heartbeat", 0) or 0)
    return (
        f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {when}, "
        f"last heartbeat {age:.0f} s ago"
    )

  def _read(self) -> dict[str, Any] | None:
    try:
      return json.loads(self.file.read_text())
    except FileNotFoundError:
      return None
    except (ValueError, OSError):
      return {}  # unreadable or half-written: judged by the file's age below

  def _is_stale(self, holder: dict[str, Any]) -> bool:
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
      if not _pid_alive(holder["pid"]):
        return True
    heartbeat = holder.get("heartbeat")
    if not isinstance(heartbeat, (int, float)):
      try:
        heartbeat = self.file.stat().mtime
      except (OSError, AttributeError):
        return True
    return time.time() - heartbeat > self.stale_after

  def _create(self) -> bool:
    """Writes the lock if there is none; False if one exists."""
    self._started = time.time()
    text = json.dumps(self._record())
    with writing("the workdir lock", self.file):
      self.file.parent.mkdir(parents=True, exist_ok=True)
      if not is_remote(self.file):
        try:
          fd = os.open(os.fspath(self.file), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
          return False
        with os.fdopen(fd, "w") as f:
          f.write(text)
        return True
      if self.file.exists():
        return False
      self.file.write_text(text)
    time.sleep(0.5)  # a racing writer shows up here
    holder = self._read()
    return bool(holder) and holder.get("token") == self.token

  def acquire(self) -> None:
    for _ in range(3):
      if self._create():
        self.held = True
        break
      holder = self._read()
      if holder is None:
        continue  # released in between
      if not self._is_stale(holder):
        raise WorkdirBusyError(
            f"Workdir is in use by another training run ({self._describe(holder)}): lock file "
            f"{self.file}. Wait for it to finish, use another --workdir, or delete the lock "
            "file if that run is gone."
        )
      logging.warning("Taking over the stale lock %s (%s).", self.file, self._describe(holder))
      with contextlib.suppress(FileNotFoundError):
        self.file.unlink()
    else:
      raise WorkdirBusyError(f"Could not take the workdir lock {self.file}; try again.")
    interval = max(0.5, min(60.0, self.stale_after / 10))
    self._thread = threading.Thread(
        target=self._heartbeat, args=(interval,), name="eiw-flow-lock-heartbeat", daemon=True
    )
    self._thread.start()

  def _heartbeat(self, interval: float) -> None:
    while not self._stop.wait(interval):
      try:
        holder = self._read()
        if holder and holder.get("token") != self.token:
          logging.error("The workdir lock %s was taken by another run: %s", self.file, holder)
          return
        self._rewrite()
      except OSError as e:  # a full disk must not kill training from this thread
        logging.warning("Could not refresh the workdir lock %s: %s", self.file, e)

  def _rewrite(self) -> None:
    """Refreshes the heartbeat; locally via rename, so a reader never sees half a file."""
    text = json.dumps(self._record())
    if is_remote(self.file):
      self.file.write_text(text)
      return
    temporary = f"{os.fspath(self.file)}.{self.token}.tmp"
    with open(temporary, "w") as f:
      f.write(text)
    os.replace(temporary, os.fspath(self.file))

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
    if self.held:
      with contextlib.suppress(OSError):
        holder = self._read()
        if holder is not None and holder.get("token") in (self.token, None):
          self.file.unlink()
      self.held = False

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc: Any) -> None:
    self.release()


def acquire_workdir_lock(workdir: str, *, stale_after: float = 600.0) -> WorkdirLock | None:
  """Process 0 takes the lock; every process learns whether it did (no process hangs)."""
  lock, error = None, None
  if jax.process_index() == 0:
    lock = WorkdirLock(workdir, stale_after=stale_after)
    try:
      lock.acquire()
    except (WorkdirBusyError, StorageError) as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415

    failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if jax.process_index() != 0 and int(failed):
      raise WorkdirBusyError(
          f"Process 0 could not take the workdir lock {path(workdir, LOCK_FILE)}; see its log."
      )
  if error is not None:
    raise error
  return lock


# ----------------------------------------------------------------------------------------------
# Resuming: the saved config and the restored state.

# Fields that must match the saved config.json to resume (prefixes of dotted names).
RESUME_FIELDS = ("model", "batch_size", "seed", "dataset.name", "dataset.train_split",
                 "dataset.worker_count")
# ... of which these cannot change even on purpose: the checkpoint cannot be restored otherwise
# (grain saves the input pipeline's position in a layout that depends on its worker count).
UNCHANGEABLE_FIELDS = ("dataset.worker_count",)


class ConfigMismatchError(config_lib.ConfigError):
  """The config differs from the one the workdir's checkpoints were trained with."""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def config_differences(
    saved: dict[str, Any], config: ml_collections.ConfigDict
) -> list[tuple[str, Any, Any]]:
  """(field, saved value, current value) for every RESUME_FIELDS field that differs.

  Fields absent from the saved config (added by a newer version of the code) are not compared.
  """
  now = _flatten(json.loads(config.to_json()))
  before = _flatten(saved)
  out = []
  for name in sorted(now):
    if not any(name == f or name.startswith(f + ".") for f in RESUME_FIELDS):
      continue
    if name in before and before[name] != now[name]:
      out.append((name, before[name], now[name]))
  return out


def check_resume_config(
    config: ml_collections.ConfigDict, workdir: str, *, has_checkpoints: bool,
    allow_change: bool = False,
) -> None:
  """Raises ConfigMismatchError if resuming `workdir` with `config` changes RESUME_FIELDS."""
  file = path(workdir, CONFIG_FILE)
  if not has_checkpoints:
    return
  try:
    saved = json.loads(file.read_text())
  except FileNotFoundError:
    return
  except (OSError, ValueError) as e:
    logging.warning("Cannot read %s (%s); not comparing configs.", file, e)
    return
  differences = config_differences(saved, config)
  if not differences:
    return
  listed = "; ".join(f"{name}: saved {old!r}, now {new!r}" for name, old, new in differences)
  differ = f"The config differs from the one this workdir was trained with ({file}) in: {listed}. "
  fixed = [name for name, _, _ in differences if name in UNCHANGEABLE_FIELDS]
  if fixed:
    raise ConfigMismatchError(
        differ + f"{', '.join(fixed)} cannot change on resume, not even with "
        "--allow_config_change: the checkpoints hold the input pipeline's position in a layout "
        "that depends on it. Resume with the saved value, or start a new run in another --workdir."
    )
  if allow_change:
    logging.warning("Resuming %s with a changed config (allowed): %s", workdir, listed)
    return
  raise ConfigMismatchError(
      differ + "Use the same config to resume, another --workdir for a new run, or "
      "--allow_config_change to resume with the change on purpose."
  )


@jax.jit
def _finite_leaves(tree: Any) -> list[jax.Array]:
  return [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]


def nonfinite_leaves(tree: Any) -> list[str]:
  """Names ("['params']['level0_steps']['layers_2']... (steps 3, 7)") of the leaves that hold
  a NaN or an infinity; for stacked flow steps, which steps."""
  flags = jax.device_get(_finite_leaves(tree))
  out = []
  for (path, leaf), ok in zip(jax.tree_util.tree_flatten_with_path(tree)[0], flags):
    if bool(ok):
      continue
    name = jax.tree_util.keystr(path)
    if re.search(r"\['level\d+_steps'\]", name) and np.ndim(leaf) >= 1:
      values = np.asarray(jax.device_get(leaf)).reshape(np.shape(leaf)[0], -1)
      steps = np.flatnonzero(~np.all(np.isfinite(values), axis=1))
      name += f" (steps {', '.join(map(str, steps))})"
    out.append(name)
  return out


# ----------------------------------------------------------------------------------------------
# The initial and final bpd.


class DivergedError(RuntimeError):
  """The final test bpd is not finite, or far above where training started."""


# "Far above": more than this many bits/dim above the initial train bpd.
DIVERGENCE_MARGIN_BPD = 0.5


def record_initial_bpd(workdir: str, bpd: float) -> None:
  """Stores the first step's train bpd (process 0), for `check_final_bpd` after resumes."""
  if jax.process_index() == 0:
    write_text(
        path(workdir, RUN_INFO_FILE), json.dumps({"initial_train_bpd": bpd}, indent=2),
        "run info",
    )


def read_initial_bpd(workdir: str) -> float | None:
  try:
    value = json.loads(path(workdir, RUN_INFO_FILE).read_text()).get("initial_train_bpd")
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


# ----------------------------------------------------------------------------------------------
# TensorBoard event files on object stores.


class _EpathRecordWriter:
  """tensorboardX record writer for a URL: buffers the events, rewrites the object on flush.

  Object stores have no append, so each flush uploads the whole (small) event file.
  """

  def __init__(self, url: str):
    self.file = epath.Path(url)
    self.buffer = bytearray()
    self.closed = False

  def write(self, data: bytes) -> None:
    self.buffer.extend(data)

  def flush(self) -> None:
    with writing("TensorBoard events", self.file), self.file.open("wb") as f:
      f.write(bytes(self.buffer))

  def close(self) -> None:
    if not self.closed:
      self.flush()
      self.closed = True


class _EpathWriterFactory:
  def open(self, url: str) -> _EpathRecordWriter:
    return _EpathRecordWriter(url)

  def directory_check(self, url: str) -> None:
    with writing("TensorBoard events", url):
      epath.Path(url).mkdir(parents=True, exist_ok=True)


def register_tensorboard_schemes(*schemes: str) -> None:
  """Routes tensorboardX's event files for `scheme://` logdirs through etils.epath.

  tensorboardX's own gs:// writer needs google-cloud-storage; epath already reaches every store
  the checkpoints use (gs://, s3://, and any scheme registered with epath).
  """
  from tensorboardX import record_writer  # noqa: PLC0415

  for scheme in schemes or ("gs", "s3"):
    record_writer.register_writer_factory(scheme, _EpathWriterFactory())
