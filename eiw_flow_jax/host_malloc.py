"""Host memory: glibc's malloc on transparent huge pages, for XLA:CPU's per-step buffers.

XLA:CPU allocates a step's temporaries as large blocks (hundreds of MiB at the CIFAR config).
glibc serves blocks above its mmap threshold (at most 32 MiB) with a fresh `mmap` and returns
them with `munmap`, so every step page-faults its whole working set again in 4 KiB pages:
~65,000 minor faults and a fifth of the CPU time of the CIFAR benchmark step on 2 cores
(docs/performance.md). glibc's tunable `glibc.malloc.hugetlb=1` (glibc 2.35+) marks those
blocks for transparent huge pages (`madvise(MADV_HUGEPAGE)`): 2 MiB pages, ~500 faults a step.
It only matters where the kernel's THP mode is `madvise` (with `always` every large mapping is
already huge; with `never` none can be), and glibc reads tunables once, at process start, so
the command line re-executes itself with it (`reexec_with_huge_pages`). On GPUs and TPUs the
host's buffers are small and this changes little; it costs one exec at start-up.

Opt out with `EIW_FLOW_JAX_HUGE_PAGES=0`, or set `GLIBC_TUNABLES` yourself (a value that
mentions `glibc.malloc.hugetlb` is left alone). In a notebook, start the kernel with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` in its environment.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "EIW_FLOW_JAX_HUGE_PAGES"


def huge_page_environ(
    environ: Mapping[str, str], thp_mode_file: str = THP_MODE_FILE
) -> dict[str, str] | None:
  """`environ` plus `glibc.malloc.hugetlb=1` in GLIBC_TUNABLES, or None where it changes nothing.

  None: not Linux, opted out (`EIW_FLOW_JAX_HUGE_PAGES=0`), GLIBC_TUNABLES already mentions
  the tunable, or the kernel's THP mode (read from `thp_mode_file`) is not `madvise`.
  """
  if not sys.platform.startswith("linux") or environ.get(OPT_OUT, "1") == "0":
    return None
  tunables = environ.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb" in tunables:
    return None
  try:
    with open(thp_mode_file) as f:
      mode = f.read()
  except OSError:
    return None
  if "[madvise]" not in mode:
    return None
  return {**environ, "GLIBC_TUNABLES": f"{tunables}:{TUNABLE}" if tunables else TUNABLE}


def reexec_with_huge_pages(thp_mode_file: str = THP_MODE_FILE) -> None:
  """Replace this process (same PID, same command line) by one with `huge_page_environ`.

  Returns without doing anything where that environment is None, which is also the case in the
  re-executed process, so it runs at most once. Call it first thing in a command-line entry
  point, before threads, files or devices are opened.
  """
  environ = huge_page_environ(os.environ, thp_mode_file)
  argv = getattr(sys, "orig_argv", None)  # the interpreter's own argv, `-m module` included
  if environ is None or not argv:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *argv[1:]], environ)
