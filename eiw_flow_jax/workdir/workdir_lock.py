"""The workdir lock `<workdir>/LOCK` (pid, host, start time, heartbeat).

A second training run on a busy workdir refuses to start. A lock whose process is gone (same
host) or whose heartbeat is older than `stale_after` seconds (another host) is stale and taken
over.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from typing import Any

import jax
import numpy as np
from absl import logging

from eiw_flow_jax.workdir import storage

LOCK_FILE = "LOCK"


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
    self.file = storage.path(workdir, LOCK_FILE)
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
    with storage.writing("the workdir lock", self.file):
      self.file.parent.mkdir(parents=True, exist_ok=True)
      if not storage.is_remote(self.file):
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
    if storage.is_remote(self.file):
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
    except (WorkdirBusyError, storage.StorageError) as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415

    failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if jax.process_index() != 0 and int(failed):
      raise WorkdirBusyError(
          f"Process 0 could not take the workdir lock {storage.path(workdir, LOCK_FILE)}; "
          "see its log."
      )
  if error is not None:
    raise error
  return lock
