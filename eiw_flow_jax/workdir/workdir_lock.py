"""The workdir lock `<workdir>/LOCK`: one training run per workdir, and restarts that never wait
for a run that is gone.

The lock is a small JSON record of its holder: host, PID, start time, a heartbeat refreshed every
`heartbeat_interval` seconds, and what tells a later process whether that holder can still be
alive (`process_identity`): the kernel's boot id, the PID namespace, the process's start time,
and the SLURM job and restart count. `judge_holder` reads it against the process that finds it:

* gone at once: an empty or unreadable lock (a start that could not write it, e.g. on a full
  disk); an earlier run of the same SLURM job (requeued since); a holder on this host whose boot
  id differs (the machine or VM was restarted or recreated), whose process has ended, whose PID
  now belongs to another process, or whose PID is this very process's (a restarted container
  gets the same hostname and PID 1); a heartbeat older than `stale_after` seconds;
* alive at once: a running process on this host (same boot, same PID namespace);
* otherwise (another host, or another container on this host) the heartbeat is watched for up to
  MISSED_HEARTBEATS intervals: a holder whose heartbeat advances is alive, one whose heartbeat
  stands still is gone. Watching needs no clock shared between hosts.

A lock of a gone holder is taken over with one warning line naming it and why; a live holder
is refused (WorkdirBusyError). `take_over=True` (`--take_over_lock`) takes any lock over, for
the user who knows the holder is gone. A run whose lock was taken over learns it from its
heartbeat and stops before its next checkpoint (`check_held`).

Local locks are created atomically and complete (written to a temporary file, then hard-linked
into place), so a full disk leaves no lock behind; on object stores (`gs://`), which have no
exclusive create, the lock is written and read back (a best effort that catches runs started
seconds apart, the usual accident).
"""

from __future__ import annotations

import contextlib
import errno
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

# Seconds between heartbeats, recorded in the lock: how fast a watcher can tell a gone holder.
HEARTBEAT_INTERVAL = 10.0
# A holder whose heartbeat has not advanced for this many of its intervals is gone.
MISSED_HEARTBEATS = 3
# Locks written before the interval was recorded beat every 60 s.
LEGACY_HEARTBEAT_INTERVAL = 60.0
# A heartbeat this old (by this host's clock) is gone at once, whatever the clocks' skew.
STALE_AFTER = 600.0

# The verdicts of `judge_holder`.
GONE, ALIVE, WATCH = "gone", "alive", "watch"

# Filesystems without hard links answer os.link with one of these: create exclusively instead.
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.ENOSYS,
                  errno.EMLINK, errno.EACCES}


class WorkdirBusyError(RuntimeError):
  """Another training run holds the workdir's lock (or took it over from this one)."""


# ----------------------------------------------------------------------------------------------
# Who holds the lock, and whether it can still be alive.


def _first_line(path: str) -> str | None:
  try:
    with open(path) as f:
      return f.readline().strip() or None
  except OSError:
    return None


def process_start(pid: int) -> int | None:
  """When process `pid` started, in clock ticks since boot (Linux's /proc), or None.

  With the boot id, it tells a process from a later one that got the same PID.
  """
  try:
    with open(f"/proc/{pid}/stat") as f:
      stat = f.read()
    return int(stat[stat.rindex(")") + 2:].split()[19])  # field 22: starttime
  except (OSError, ValueError, IndexError):
    return None


def process_identity() -> dict[str, Any]:
  """What a lock records about the process that holds it (None where the OS does not say)."""
  try:
    namespace = os.readlink("/proc/self/ns/pid")
  except OSError:
    namespace = None
  job = os.environ.get("SLURM_JOB_ID")
  restart = os.environ.get("SLURM_RESTART_COUNT", "0")  # set by SLURM once a job is requeued
  return {
      "host": socket.gethostname(),
      "pid": os.getpid(),
      "boot_id": _first_line("/proc/sys/kernel/random/boot_id"),
      "pid_namespace": namespace,
      "process_start": process_start(os.getpid()),
      "slurm_job": f"{os.environ.get('SLURM_CLUSTER_NAME', '')}/{job}" if job else None,
      "slurm_restart": (int(restart) if restart.isdigit() else None) if job else None,
  }


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _number(value: Any) -> float | None:
  return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def is_record(holder: Any) -> bool:
  """Whether `holder` (a lock file's parsed contents) is a lock record at all."""
  return isinstance(holder, dict) and isinstance(holder.get("token"), str)


def heartbeat_interval(holder: dict[str, Any]) -> float:
  interval = _number(holder.get("heartbeat_interval"))
  return interval if interval and interval > 0 else LEGACY_HEARTBEAT_INTERVAL


def judge_holder(
    holder: Any, here: dict[str, Any], now: float, *, stale_after: float = STALE_AFTER
) -> tuple[str, str]:
  """(GONE, ALIVE or WATCH, why) for the lock record `holder`, found by the process `here`
  (`process_identity()`) at time `now`. Pure but for looking at this host's processes."""
  if not is_record(holder):
    return GONE, ("the lock file is empty or unreadable, left by a start that could not write "
                  "it (e.g. on a full disk)")
  age = None if _number(holder.get("heartbeat")) is None else now - holder["heartbeat"]
  missed = MISSED_HEARTBEATS * heartbeat_interval(holder)
  job = holder.get("slurm_job")
  if job and job == here.get("slurm_job"):
    restart, ours = holder.get("slurm_restart"), here.get("slurm_restart")
    if isinstance(restart, int) and isinstance(ours, int) and restart < ours:
      return GONE, (f"it is an earlier run of SLURM job {job.lstrip('/')} (restart {restart}; "
                    f"this is restart {ours}), requeued since")
  if holder.get("host") == here["host"]:
    boot, our_boot = holder.get("boot_id"), here.get("boot_id")
    if boot and our_boot and boot != our_boot:
      return GONE, f"host {here['host']} has restarted since (another boot id)"
    namespace, our_namespace = holder.get("pid_namespace"), here.get("pid_namespace")
    same_namespace = not (namespace and our_namespace and namespace != our_namespace)
    pid, started = holder.get("pid"), holder.get("process_start")
    if pid == here["pid"]:
      if same_namespace and started == here.get("process_start"):
        return ALIVE, "this very process holds it"
      return GONE, (f"it names this process's PID {pid} on this host but not this process: an "
                    "earlier run (e.g. before a container restart)")
    if same_namespace and isinstance(pid, int):
      if not _pid_alive(pid):
        return GONE, f"its process {pid} has ended"
      now_started = process_start(pid)
      if isinstance(started, int) and now_started is not None and now_started != started:
        return GONE, f"its PID {pid} now belongs to another process"
      return ALIVE, f"its process {pid} is running on this host"
    # Another PID namespace (container) on this host: its PID means nothing here, but the
    # clock is this host's.
    if age is not None and age > missed:
      return GONE, f"its heartbeat stopped {age:.0f} s ago"
    return WATCH, "it runs in another container on this host"
  if age is not None and age > stale_after:
    return GONE, f"its last heartbeat is {age:.0f} s old"
  return WATCH, f"it runs on another host ({holder.get('host', '?')})"


def describe(holder: Any, now: float | None = None) -> str:
  """The holder in words, for the user."""
  if not is_record(holder):
    return "an empty or unreadable lock file"
  now = time.time() if now is None else now
  started = _number(holder.get("started"))
  when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if started else "?"
  heartbeat = _number(holder.get("heartbeat"))
  beat = f"last heartbeat {now - heartbeat:.0f} s ago" if heartbeat else "no heartbeat"
  job = f", SLURM job {holder['slurm_job'].lstrip('/')}" if holder.get("slurm_job") else ""
  return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}{job}, started "
          f"{when}, {beat}")


def _parse(text: str | None) -> Any:
  if text is None:
    return None
  try:
    return json.loads(text)
  except ValueError:
    return {}


# ----------------------------------------------------------------------------------------------
# The lock.


def _write_all(fd: int, data: bytes) -> None:
  view = memoryview(data)
  while view:
    view = view[os.write(fd, view):]


def _write_new(path: str, data: bytes) -> None:
  """Creates `path` (which must not exist) holding `data`; removes it again if writing fails."""
  fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  try:
    try:
      _write_all(fd, data)
    finally:
      os.close(fd)
  except OSError:
    with contextlib.suppress(OSError):
      os.unlink(path)
    raise


class WorkdirLock:
  """`<workdir>/LOCK`, held by one training run; refreshed by a heartbeat thread.

  `lost` is set (to the new holder, in words) when another run took the lock over.
  """

  def __init__(
      self, workdir: str, *, heartbeat_interval: float = HEARTBEAT_INTERVAL,
      stale_after: float = STALE_AFTER, take_over: bool = False,
  ):
    self.file = storage.path(workdir, LOCK_FILE)
    self.heartbeat_interval = float(heartbeat_interval)
    self.stale_after = float(stale_after)
    self.take_over = take_over
    self.token = uuid.uuid4().hex
    self.identity = process_identity()
    self.started = time.time()
    self.lost: str | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self.held = False

  def _record(self) -> bytes:
    return json.dumps({
        **self.identity, "started": self.started, "heartbeat": time.time(),
        "heartbeat_interval": self.heartbeat_interval, "token": self.token,
    }).encode()

  def _read_text(self) -> str | None:
    """The lock file's text, None if there is none ("" if it cannot be read)."""
    try:
      return self.file.read_text()
    except FileNotFoundError:
      return None
    except (OSError, UnicodeDecodeError):
      return ""

  def _create(self) -> bool:
    """Writes the lock if there is none; False if one exists."""
    data = self._record()
    with storage.writing("the workdir lock", self.file):
      self.file.parent.mkdir(parents=True, exist_ok=True)
      if not storage.is_remote(self.file):
        return self._create_local(data)
      if self.file.exists():
        return False
      self.file.write_bytes(data)
    time.sleep(0.5)  # a racing writer shows up here
    holder = _parse(self._read_text())
    return is_record(holder) and holder["token"] == self.token

  def _create_local(self, data: bytes) -> bool:
    target = os.fspath(self.file)
    temporary = f"{target}.{self.token}.tmp"
    _write_new(temporary, data)  # a full disk fails here, before LOCK exists
    try:
      os.link(temporary, target)  # atomic, and never replaces a lock
      return True
    except FileExistsError:
      return False
    except OSError as e:
      if e.errno not in _NO_HARD_LINKS:
        raise
    finally:
      with contextlib.suppress(OSError):
        os.unlink(temporary)
    try:
      _write_new(target, data)
    except FileExistsError:
      return False
    return True

  def _remove(self, text: str) -> None:
    """Removes the lock judged gone, unless another run replaced it meanwhile (locally: moved
    aside atomically and compared; put back if it is not the one judged)."""
    if storage.is_remote(self.file):
      with contextlib.suppress(FileNotFoundError):
        self.file.unlink()
      return
    target = os.fspath(self.file)
    aside = f"{target}.{self.token}.stale"
    try:
      os.rename(target, aside)
    except FileNotFoundError:
      return
    try:
      with open(aside) as f:
        moved = f.read()
    except (OSError, UnicodeDecodeError):
      moved = ""
    if moved != text:
      with contextlib.suppress(OSError):
        os.link(aside, target)
    with contextlib.suppress(OSError):
      os.unlink(aside)

  def _watch(self, text: str, holder: dict[str, Any]) -> tuple[str, str, str | None]:
    """Watches a lock whose holder may be alive: (ALIVE or GONE, why, text) once its heartbeat
    advances or has stood still for MISSED_HEARTBEATS intervals; ("changed", "", text) if it was
    replaced or removed meanwhile."""
    interval = heartbeat_interval(holder)
    wait = MISSED_HEARTBEATS * interval
    logging.info(
        "The workdir lock %s is held by %s; watching its heartbeat for up to %.0f s to see "
        "whether that run is alive.", self.file, describe(holder), wait)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
      time.sleep(min(1.0, interval / 4))
      now_text = self._read_text()
      if now_text == text:
        continue
      now_holder = _parse(now_text)
      if is_record(now_holder) and now_holder["token"] == holder["token"]:
        return ALIVE, "its heartbeat advanced while watched", now_text
      return "changed", "", now_text
    why = f"its heartbeat has not advanced for {wait:.0f} s (it beats every {interval:g} s)"
    return GONE, why, text

  def acquire(self) -> None:
    """Takes the lock, taking over one whose holder is gone; WorkdirBusyError if it is alive."""
    for _ in range(5):
      if self._create():
        self.held = True
        break
      text = self._read_text()
      if text is None:
        continue  # released in between
      holder = _parse(text)
      verdict, why = judge_holder(holder, self.identity, time.time(),
                                  stale_after=self.stale_after)
      if self.take_over:
        verdict, why = GONE, "taken over on request (take_over_lock)"
      elif verdict == WATCH:
        verdict, why, text = self._watch(text, holder)
        if verdict == "changed":
          continue
      if verdict == ALIVE:
        raise WorkdirBusyError(
            f"Workdir is in use by another training run ({describe(holder)}; {why}): lock file "
            f"{self.file}. Wait for it to finish, use another --workdir, or pass "
            "--take_over_lock if that run is gone."
        )
      whose = f" of {describe(holder)}" if is_record(holder) else ""
      logging.warning("Taking over the workdir lock %s%s: %s.", self.file, whose, why)
      self._remove(text)
    else:
      raise WorkdirBusyError(f"Could not take the workdir lock {self.file}; try again.")
    self._thread = threading.Thread(
        target=self._heartbeat, name="eiw-flow-lock-heartbeat", daemon=True
    )
    self._thread.start()

  def _heartbeat(self) -> None:
    failing = False
    while not self._stop.wait(self.heartbeat_interval):
      try:
        holder = _parse(self._read_text())
        if is_record(holder) and holder["token"] != self.token:
          self.lost = describe(holder)
          logging.error("The workdir lock %s was taken over by another run (%s); this run "
                        "stops before its next checkpoint.", self.file, self.lost)
          return
        with storage.writing("the workdir lock", self.file):
          self._rewrite()
        failing = False
      except storage.StorageError as e:  # a full disk must not kill training from this thread
        if not failing:
          logging.warning("Could not refresh the workdir lock: %s", e)
        failing = True

  def _rewrite(self) -> None:
    """Refreshes the heartbeat; locally via rename, so a reader never sees half a file."""
    if storage.is_remote(self.file):
      self.file.write_bytes(self._record())
      return
    temporary = f"{os.fspath(self.file)}.{self.token}.tmp"
    with contextlib.suppress(FileNotFoundError):
      os.unlink(temporary)  # left by a refresh that failed to rename
    _write_new(temporary, self._record())
    os.replace(temporary, os.fspath(self.file))

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
    if self.held:
      with contextlib.suppress(OSError):
        holder = _parse(self._read_text())
        if is_record(holder) and holder["token"] == self.token:
          self.file.unlink()
      self.held = False

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc: Any) -> None:
    self.release()


def _from_process_0(failed: bool) -> bool:
  """Whether process 0 reported `failed` (every process gets the answer; no process hangs)."""
  if jax.process_count() == 1:
    return failed
  from jax.experimental import multihost_utils  # noqa: PLC0415

  return bool(int(multihost_utils.broadcast_one_to_all(np.int32(failed))))


def acquire_workdir_lock(workdir: str, *, take_over: bool = False) -> WorkdirLock | None:
  """Process 0 takes the lock (`take_over`: whoever holds it); every process learns whether it
  did."""
  lock, error = None, None
  if jax.process_index() == 0:
    lock = WorkdirLock(workdir, take_over=take_over)
    try:
      lock.acquire()
    except (WorkdirBusyError, storage.StorageError) as e:
      error = e
  if _from_process_0(error is not None) and error is None:
    raise WorkdirBusyError(
        f"Process 0 could not take the workdir lock {storage.path(workdir, LOCK_FILE)}; "
        "see its log."
    )
  if error is not None:
    raise error
  return lock


def check_held(lock: WorkdirLock | None, workdir: str) -> None:
  """WorkdirBusyError on every process if process 0's lock was taken over by another run: called
  before each checkpoint, so two runs never write into one workdir."""
  lost = lock.lost if lock is not None else None
  if _from_process_0(lost is not None):
    holder = lost or "named in process 0's log"
    raise WorkdirBusyError(
        f"The workdir lock {storage.path(workdir, LOCK_FILE)} was taken over by another run "
        f"({holder}); this run stopped without saving. The checkpoints saved so far stay for "
        "the run that holds the lock now."
    )
