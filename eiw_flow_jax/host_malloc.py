"""Host memory: glibc's malloc tuned for XLA:CPU's per-step buffers (re-executes the CLI once).

XLA:CPU allocates a step's temporaries as large blocks (hundreds of MiB at the CIFAR config).
By default glibc serves blocks above its mmap threshold (at most 32 MiB) with a fresh `mmap`
and returns them with `munmap`, so every step page-faults its whole working set again in 4 KiB
pages: ~70,000 minor faults and ~0.27 s of kernel time per CIFAR benchmark step on 2 cores
(docs/performance.md). Two sets of glibc tunables (glibc 2.26+; hugetlb 2.35+) fix that:

* Heap reuse, on CPU hosts (`HEAP_REUSE`): one arena, no mmap'd chunks and no trimming, so the
  blocks come from the heap and a freed block is reused by the next step, already mapped:
  0 faults per step after the first, ~0.01 s of kernel time. (XLA's threads would otherwise use
  per-thread arenas, whose heaps are capped at 64 MiB and mmap anything larger regardless of
  `mmap_max`.) The price: memory freed by the process is kept for reuse, not returned to the
  system, so its resident size stays at its peak (the step's own, in a training run). Skipped
  where an accelerator is visible (the step's buffers live on the device; one arena would
  only serialise the host threads' mallocs).
* Huge pages (`HUGE_PAGES`, where the kernel's THP mode is `madvise`): the heap on 2 MiB pages.

glibc reads tunables once, at process start, so the command line re-executes itself with them
(`reexec_with_malloc_tunables`). Tunables already in `GLIBC_TUNABLES` are left as they are.
Opt out with `EIW_FLOW_JAX_HOST_MALLOC=0` (or the older `EIW_FLOW_JAX_HUGE_PAGES=0`). In a
notebook, start the kernel with `GLIBC_TUNABLES=<the value of tunables_for_this_host()>`.
"""

from __future__ import annotations

import glob
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
OPT_OUT = "EIW_FLOW_JAX_HOST_MALLOC"
LEGACY_OPT_OUT = "EIW_FLOW_JAX_HUGE_PAGES"
ACCELERATOR_DEVICES = ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*")


def _accelerator_visible(environ: Mapping[str, str]) -> bool:
  platforms = environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip() != "cpu"
  return any(glob.glob(pattern) for pattern in ACCELERATOR_DEVICES)


def _thp_madvise(thp_mode_file: str) -> bool:
  try:
    with open(thp_mode_file) as f:
      return "[madvise]" in f.read()
  except OSError:
    return False


def malloc_tunables(
    environ: Mapping[str, str],
    thp_mode_file: str = THP_MODE_FILE,
    accelerator: bool | None = None,
) -> tuple[str, ...]:
  """The tunables this host should add to `environ`'s GLIBC_TUNABLES (may be empty).

  Nothing on other systems than Linux or when opted out; heap reuse unless an accelerator is
  visible (`accelerator`, default: JAX_PLATFORMS, else /dev/nvidia*, /dev/accel*); huge pages
  where the THP mode read from `thp_mode_file` is `madvise`. Tunables whose name GLIBC_TUNABLES
  already mentions are the user's choice and are not added again.
  """
  if not sys.platform.startswith("linux"):
    return ()
  if environ.get(OPT_OUT, "1") == "0" or environ.get(LEGACY_OPT_OUT, "1") == "0":
    return ()
  if accelerator is None:
    accelerator = _accelerator_visible(environ)
  wanted = (() if accelerator else HEAP_REUSE) + (
      HUGE_PAGES if _thp_madvise(thp_mode_file) else ())
  present = {item.split("=")[0] for item in environ.get("GLIBC_TUNABLES", "").split(":") if item}
  return tuple(t for t in wanted if t.split("=")[0] not in present)


def malloc_environ(
    environ: Mapping[str, str],
    thp_mode_file: str = THP_MODE_FILE,
    accelerator: bool | None = None,
) -> dict[str, str] | None:
  """`environ` with `malloc_tunables` appended to GLIBC_TUNABLES, or None if none are to add."""
  added = malloc_tunables(environ, thp_mode_file, accelerator)
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
