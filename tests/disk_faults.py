"""Full disks for the tests: a small tmpfs where one can be mounted (root), an injected
ENOSPC otherwise, so the disk-full tests run everywhere.

As a script, runs the command line with every checkpoint save from a given step failing with
ENOSPC (what a full disk does to Orbax), for machines that cannot mount a tmpfs:

  python tests/disk_faults.py <first failing step> --config=... --workdir=...
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
from collections.abc import Callable, Iterator


def mount_tmpfs(directory: str, options: str) -> bool:
  """Mounts a tmpfs at `directory` (`options`: "size=800k", "ro", ...); False where it cannot."""
  os.makedirs(directory, exist_ok=True)
  result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", directory],
                          capture_output=True, text=True)
  return result.returncode == 0


def unmount(directory: str) -> None:
  subprocess.run(["umount", "-l", directory], capture_output=True)


def _fill(directory: str) -> str:
  """Writes a file into `directory` until its filesystem is full; returns the file."""
  filler = os.path.join(directory, ".filler")
  with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
    while True:
      f.write(b"\0" * 4096)
  return filler


def _path_of(fd: int) -> str:
  try:
    return os.readlink(f"/proc/self/fd/{fd}")
  except OSError:
    return ""


@contextlib.contextmanager
def full_disk(directory: str, monkeypatch) -> Iterator[tuple[str, Callable[[], None]]]:
  """(`directory`, free_space) where writing into `directory` fails with ENOSPC until
  free_space() is called: a full tmpfs where one can be mounted, else `os.write` failing for
  the files under `directory` (injected: Python-level writes only)."""
  directory = os.fspath(directory)
  if mount_tmpfs(directory, "size=64k"):
    try:
      filler = _fill(directory)
      yield "tmpfs", lambda: os.remove(filler)
    finally:
      unmount(directory)
    return
  real_write = os.write

  def write(fd: int, data) -> int:
    if _path_of(fd).startswith(directory + os.sep):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_write(fd, data)

  monkeypatch.setattr(os, "write", write)
  yield "injected", lambda: monkeypatch.setattr(os, "write", real_write)


def _run_with_failing_saves(first_failing_step: int, argv: list[str]) -> None:
  import orbax.checkpoint as ocp  # noqa: PLC0415

  real_save = ocp.CheckpointManager.save

  def save(self, step, *args, **kwargs):
    if step >= first_failing_step:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_save(self, step, *args, **kwargs)

  ocp.CheckpointManager.save = save
  from eiw_flow_jax.commands import main  # noqa: PLC0415

  sys.argv = ["eiw_flow_jax.main", *argv]
  main.cli()


if __name__ == "__main__":
  _run_with_failing_saves(int(sys.argv[1]), sys.argv[2:])
