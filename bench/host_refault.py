"""Does this host take freed memory back? Time to touch fresh memory after idle periods.

XLA:CPU allocates a training step's temporaries as blocks above glibc's mmap threshold, so they
are mapped afresh for each step and unmapped after it (docs/performance.md, "Page faults").
On a virtual machine whose kernel reports free pages to the hypervisor (virtio-balloon free
page reporting: `Free page reporting enabled` in the kernel log, e.g. Firecracker guests),
memory that stays free for a second or two is handed back to the host, and the next process
to touch it waits for the host to back it again. A step that follows an idle pause then costs
much more than the same step back to back.

This script measures that cost without JAX: for each idle time it sleeps, maps `--size_mib`
of anonymous memory (with MADV_HUGEPAGE, as the command line's huge pages give XLA's blocks),
writes one byte per 4 KiB page, and unmaps it; it prints milliseconds per touch and the ratio
to the shortest idle. On a host without the effect every row is the same.

  python bench/host_refault.py                          # 256 MiB, idle 0.05 to 4 s
  python bench/host_refault.py --idle_s=0,1,3 --repeats=5
"""

from __future__ import annotations

import mmap
import os
import statistics
import time

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS

flags.DEFINE_integer("size_mib", 256, "MiB mapped and touched per measurement.")
flags.DEFINE_list("idle_s", ["0.05", "0.5", "1", "2.5", "4"],
                  "Idle seconds before each touch (one table row each).")
flags.DEFINE_integer("repeats", 4, "Touches per idle time.")
flags.DEFINE_bool("huge_pages", True, "Ask for transparent huge pages (MADV_HUGEPAGE).")

PAGE = 4096


def touch_fresh_memory(size_bytes: int, huge_pages: bool = True) -> float:
  """Seconds to map `size_bytes` of anonymous memory and write one byte per 4 KiB page."""
  start = time.perf_counter()
  region = mmap.mmap(-1, size_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
  try:
    if huge_pages and hasattr(mmap, "MADV_HUGEPAGE"):
      try:
        region.madvise(mmap.MADV_HUGEPAGE)
      except OSError:  # a kernel without transparent huge pages: plain pages then
        pass
    pages = np.frombuffer(region, dtype=np.uint8)
    pages[::PAGE] = 1
    seconds = time.perf_counter() - start
    del pages  # the view must go before the mapping can be closed
  finally:
    region.close()
  return seconds


def measure(idle_times: list[float], size_bytes: int, repeats: int,
            huge_pages: bool = True) -> dict[float, list[float]]:
  """{idle seconds: [touch seconds, ...]}; the idle times are visited in turn, `repeats` times,
  so that drifting machine load hits all alike. One untimed touch first: the process's first
  mapping also meets memory that has been free since before it started."""
  touch_fresh_memory(size_bytes, huge_pages)
  seconds = {idle: [] for idle in idle_times}
  for _ in range(repeats):
    for idle in idle_times:
      time.sleep(idle)
      seconds[idle].append(touch_fresh_memory(size_bytes, huge_pages))
  return seconds


def host_notes() -> str:
  """What the kernel says about free page reporting and THP (where readable)."""
  notes = []
  try:
    with open("/proc/cmdline") as f:
      reporting = [w for w in f.read().split() if w.startswith("page_reporting")]
    notes.append("kernel command line: " + (" ".join(reporting) or "no page_reporting option"))
  except OSError:
    pass
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      notes.append("THP: " + f.read().strip())
  except OSError:
    pass
  return "; ".join(notes)


def _parse_idle(values: list[str]) -> list[float]:
  idle_times = []
  for value in values:
    try:
      idle = float(value)
    except ValueError:
      raise app.UsageError(f"--idle_s: expected seconds (numbers), got {value!r}.") from None
    if not idle >= 0:
      raise app.UsageError(f"--idle_s: expected seconds >= 0, got {value!r}.")
    idle_times.append(idle)
  if not idle_times:
    raise app.UsageError("--idle_s: expected at least one idle time.")
  return idle_times


def main(argv):
  del argv
  idle_times = _parse_idle(FLAGS.idle_s)
  if FLAGS.size_mib < 1:
    raise app.UsageError(f"--size_mib must be at least 1, got {FLAGS.size_mib}.")
  if FLAGS.repeats < 1:
    raise app.UsageError(f"--repeats must be at least 1, got {FLAGS.repeats}.")
  seconds = measure(idle_times, FLAGS.size_mib << 20, FLAGS.repeats, FLAGS.huge_pages)
  print(f"{FLAGS.size_mib} MiB mapped and touched after each idle time, {FLAGS.repeats} times, "
        f"{'huge pages asked for' if FLAGS.huge_pages else 'no huge pages asked for'}; "
        f"{os.cpu_count()} CPU cores; {host_notes()}\n")
  base = statistics.median(seconds[min(idle_times)])
  print("| idle s | median ms | min ms | max ms | median vs shortest idle |")
  print("| --- | --- | --- | --- | --- |")
  for idle in idle_times:
    t = seconds[idle]
    print(f"| {idle:g} | {1e3 * statistics.median(t):.1f} | {1e3 * min(t):.1f} | "
          f"{1e3 * max(t):.1f} | {statistics.median(t) / base:.2f}x |")


if __name__ == "__main__":
  app.run(main)
