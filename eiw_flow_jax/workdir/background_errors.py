"""Keeping the tracebacks of background threads (Orbax's, tensorboardX's) off the console.

When a background save fails or a damaged checkpoint fails to restore, Orbax's threads log
tracebacks and TensorStore's late callbacks raise "Event loop is closed" (hundreds of
tracebacks); on a full disk tensorboardX's writer thread dies with a traceback.
`quiet_background_errors` (installed by the command line) sends them to
`<workdir>/checkpoint_errors.log` instead of the console, so the one-line error stays last.
"""

from __future__ import annotations

import logging as py_logging
import os
import sys
import threading
import traceback
import warnings
from typing import Any

from absl import logging

from eiw_flow_jax.workdir import storage

# The background save/restore machinery's tracebacks (see BackgroundErrors), in the workdir.
ERROR_LOG = "checkpoint_errors.log"



class BackgroundErrors(py_logging.Filter):
  """Keeps the tracebacks of Orbax's background threads off the console.

  When a save fails (a full disk) or a damaged checkpoint fails to restore, Orbax logs each
  failed thread's traceback at ERROR level, asyncio logs "Task exception was never retrieved",
  and TensorStore's completion callbacks, arriving after Orbax closed its event loop, raise
  "RuntimeError: Event loop is closed" as unraisable exceptions (hundreds of tracebacks for one
  failed save). The failure itself reaches the caller as one StorageError/CheckpointError line.
  A save aborted mid-write also leaves TensorStore's write coroutine unawaited, and Python warns
  about it while the interpreter shuts down, after our error line; on a full disk,
  tensorboardX's writer thread dies with an OSError traceback (threading's excepthook), and its
  exit handler retries the failed flush and raises OSError there too.
  This filter (on the absl handler), the unraisable hook, the thread exception hook and the
  warning hook append those tracebacks to `log_file` (None: nowhere; writing is best effort,
  the disk may be full) and show them on the console only at debug verbosity
  (`--verbosity=1`). Everything else passes unchanged.
  """

  def __init__(self, log_file: str | None):
    super().__init__()
    self.log_file = log_file
    self.count = 0
    self._lock = threading.Lock()
    self._previous_hook = None
    self._previous_thread_hook = None
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

  @staticmethod
  def _from_machinery(error: BaseException | None, tb: Any) -> bool:
    """Whether an exception is one of the background machinery's (see the class docstring)."""
    frames = traceback.extract_tb(tb) if tb else []
    return (
        isinstance(error, RuntimeError) and "Event loop is closed" in str(error)
    ) or any(
        f"{os.sep}{name}{os.sep}" in frame.filename
        for frame in frames for name in ("orbax", "tensorstore", "asyncio")
    ) or (  # tensorboardX's writes onto a full disk (its thread, its atexit flush)
        isinstance(error, OSError)
        and any(f"{os.sep}tensorboardX{os.sep}" in frame.filename for frame in frames)
    )

  def _thread_exception(self, args: Any) -> None:
    if not self._from_machinery(args.exc_value, args.exc_traceback):
      self._previous_thread_hook(args)
      return
    name = args.thread.name if args.thread is not None else "?"
    self._write(f"Exception in thread {name}:\n" + "".join(traceback.format_exception(
        args.exc_type, args.exc_value, args.exc_traceback)))
    if self._debug():
      self._previous_thread_hook(args)

  def _unraisable(self, unraisable: Any) -> None:
    from_machinery = self._from_machinery(unraisable.exc_value, unraisable.exc_traceback)
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
    self._previous_thread_hook = threading.excepthook
    threading.excepthook = self._thread_exception
    self._previous_showwarning = warnings.showwarning
    warnings.showwarning = self._showwarning
    return self

  def uninstall(self) -> None:
    for handler in [logging.get_absl_handler(), *py_logging.getLogger().handlers]:
      handler.removeFilter(self)
    if self._previous_hook is not None and sys.unraisablehook == self._unraisable:
      sys.unraisablehook = self._previous_hook
    if (self._previous_thread_hook is not None
        and threading.excepthook == self._thread_exception):
      threading.excepthook = self._previous_thread_hook
    if self._previous_showwarning is not None and warnings.showwarning == self._showwarning:
      warnings.showwarning = self._previous_showwarning


def quiet_background_errors(workdir: str) -> BackgroundErrors:
  """Installs BackgroundErrors for a run in `workdir` (a local workdir gets ERROR_LOG)."""
  local = bool(workdir and workdir.strip()) and not storage.is_remote(workdir)
  log_file = os.path.join(storage.normalize_dir(workdir, "workdir"), ERROR_LOG) if local else None
  return BackgroundErrors(log_file).install()
