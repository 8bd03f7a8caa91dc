"""Host memory: glibc's malloc tuned for XLA:CPU's per-step buffers (re-executes the CLI once).

XLA:CPU allocates a step's temporaries as large blocks. By default glibc serves blocks above its
mmap threshold (at most 32 MiB) with a fresh `mmap` and returns them with `munmap`, so every
step page-faults its whole working set again in 4 KiB pages. glibc tunables (glibc 2.26+;
hugetlb 2.35+) that change this (what each gains: docs/performance.md, "Host settings"):

* Huge pages (`HUGE_PAGES`, the default where the kernel's THP mode is `madvise`): the blocks on
  2 MiB transparent huge pages, a few hundred faults a step instead of tens of thousands.
* Heap reuse (`HEAP_REUSE`, opt-in: `EIW_FLOW_JAX_HOST_MALLOC=reuse`): one arena, no mmap'd
  chunks and no trimming, so a freed block stays mapped and the next step reuses it: 0 faults
  a step after the first. (XLA's threads otherwise allocate from per-thread arenas, whose heaps
  are capped at 64 MiB and which mmap anything larger regardless of `mmap_max`.) Not the
  default: the single arena serialises the threads' mallocs, which slows smaller models' steps,
  and freed memory is kept for reuse, so the resident size stays at its peak.

glibc reads tunables once, at process start, so the command line re-executes itself with them
(`reexec_with_malloc_tunables`). Tunables already in `GLIBC_TUNABLES` are left as they are.
Opt out with `EIW_FLOW_JAX_HOST_MALLOC=0` (or the older `EIW_FLOW_JAX_HUGE_PAGES=0`). In a
notebook, start the kernel with `GLIBC_TUNABLES=<the value of tunables_for_this_host()>`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
HUGE_PAGES = ("glibc.malloc.hugetlb=1",)
HEAP_REUSE = (
    "glibc.malloc.arena_max=1",
    "glibc.malloc.mmap_max=0",
    f"glibc.malloc.trim_threshold={1 << 40}",
)
MODE_VARIABLE = "EIW_FLOW_JAX_HOST_MALLOC"
LEGACY_OPT_OUT = "EIW_FLOW_JAX_HUGE_PAGES"
MODES = ("0", "1", "reuse")  # values of MODE_VARIABLE: off, huge pages (default), heap reuse too


def _thp_madvise(thp_mode_file: str) -> bool:
  try:
    with open(thp_mode_file) as f:
      return "[madvise]" in f.read()
  except OSError:
    return False


def malloc_tunables(
    environ: Mapping[str, str], thp_mode_file: str = THP_MODE_FILE
) -> tuple[str, ...]:
  """The tunables to add to `environ`'s GLIBC_TUNABLES (may be empty).

  Nothing on other systems than Linux or with `EIW_FLOW_JAX_HOST_MALLOC=0`; huge pages where
  the THP mode read from `thp_mode_file` is `madvise`; with `EIW_FLOW_JAX_HOST_MALLOC=reuse`
  heap reuse as well. Tunables whose name GLIBC_TUNABLES already mentions are the user's choice
  and are not added again.
  """
  mode = environ.get(MODE_VARIABLE, "1")
  if mode not in MODES:
    raise ValueError(f"{MODE_VARIABLE} must be one of {', '.join(MODES)}, got {mode!r}.")
  if not sys.platform.startswith("linux") or mode == "0" or environ.get(LEGACY_OPT_OUT) == "0":
    return ()
  wanted = (HEAP_REUSE if mode == "reuse" else ()) + (
      HUGE_PAGES if _thp_madvise(thp_mode_file) else ())
  present = {item.split("=")[0] for item in environ.get("GLIBC_TUNABLES", "").split(":") if item}
  return tuple(t for t in wanted if t.split("=")[0] not in present)


def malloc_environ(
    environ: Mapping[str, str], thp_mode_file: str = THP_MODE_FILE
) -> dict[str, str] | None:
  """`environ` with `malloc_tunables` appended to GLIBC_TUNABLES, or None if none are to add."""
  added = malloc_tunables(environ, thp_mode_file)
  if not added:
    return None
  tunables = ":".join(t for t in (environ.get("GLIBC_TUNABLES", ""), *added) if t)
  return {**environ, "GLIBC_TUNABLES": tunables}


def tunables_for_this_host() -> str:
  """The GLIBC_TUNABLES value the command line would run with here (for notebooks, scripts)."""
  environ = malloc_environ(os.environ)
  return (environ or os.environ).get("GLIBC_TUNABLES", "")


def reexec_with_malloc_tunables(thp_mode_file: str = THP_MODE_FILE) -> None:
  """Replace this process (same PID, same command line) by one with `malloc_environ`.

  Returns without doing anything where that environment is None, which is also the case in the
  re-executed process, so it runs at most once. Call it first thing in a command-line entry
  point, before threads, files or devices are opened.
  """
  environ = malloc_environ(os.environ, thp_mode_file)
  argv = getattr(sys, "orig_argv", None)  # the interpreter's own argv, `-m module` included
  if environ is None or not argv:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *argv[1:]], environ)
