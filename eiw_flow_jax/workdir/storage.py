"""Where a run's files live: local paths or `etils.epath` URLs, and one-line write errors.

A workdir or data dir may be local or any `etils.epath` URL (`gs://`, `s3://`); every file the
project writes goes through `path()`, so nothing turns `gs://b/x` into `./gs:/b/x`. A write
that fails (disk full, no permission) raises `StorageError`, one line naming what, where and why;
`write_text` replaces a file whole or not at all.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterator

from etils import epath

from eiw_flow_jax.config import checks


def is_remote(path: str | os.PathLike[str]) -> bool:
  """True for URLs (`gs://bucket/dir`, `s3://...`): never made absolute or `os`-joined."""
  return "://" in os.fspath(path)


def normalize_dir(value: str | os.PathLike[str], what: str) -> str:
  """A usable directory string: URLs unchanged (minus a trailing '/'), local paths absolute.

  Raises ConfigError for an empty value, which would otherwise mean the current directory.
  """
  value = os.fspath(value) if value is not None else ""
  if not value.strip():
    raise checks.ConfigError(f"{what} must name a directory, got {value!r}.")
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


_NO_SPACE = re.compile(r"No space left on device|os_error_code='?28'?\]")


def _chain_text(error: BaseException | None) -> str:
  texts = []
  while error is not None and len(texts) < 10:
    texts.append(str(error))
    error = error.__cause__ or error.__context__
  return "\n".join(texts)


def storage_error(what: str, where: str | os.PathLike[str], error: BaseException) -> StorageError:
  """One line naming what failed, where, and why (the OS reason when there is one)."""
  cause = error
  while cause is not None and not isinstance(cause, OSError):
    cause = cause.__cause__ or cause.__context__
  code = cause.errno if isinstance(cause, OSError) and cause.errno else None
  if code is None and _NO_SPACE.search(_chain_text(error)):
    code = errno.ENOSPC  # TensorStore's RESOURCE_EXHAUSTED ... [os_error_code='28'], no OSError
  if code is not None:
    reason = os.strerror(code)
    if code == errno.ENOSPC:
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
  """Writes `text` to `file` whole or not at all: locally into a temporary file renamed over
  `file` (a kill or a full disk mid-write leaves the previous contents); object stores write
  an object atomically anyway."""
  with writing(what, file):
    file.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(file):
      file.write_text(text)
      return
    temporary = f"{os.fspath(file)}.{os.getpid()}.tmp"
    try:
      with open(temporary, "w") as f:
        f.write(text)
      os.replace(temporary, os.fspath(file))
    finally:
      with contextlib.suppress(FileNotFoundError):
        os.remove(temporary)
