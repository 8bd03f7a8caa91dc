"""bench/host_refault.py: time to touch fresh memory after idle periods (no JAX involved)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO, load_bench_module

host_refault = load_bench_module("host_refault")
SCRIPT = os.path.join(REPO, "bench", "host_refault.py")


@pytest.mark.parametrize("huge_pages", [True, False])
def test_touch_and_measure(huge_pages):
  assert host_refault.touch_fresh_memory(4 << 20, huge_pages) > 0
  seconds = host_refault.measure([0.0, 0.01], 4 << 20, repeats=2, huge_pages=huge_pages)
  assert list(seconds) == [0.0, 0.01]
  assert all(len(t) == 2 and min(t) > 0 for t in seconds.values())


def test_script_prints_one_row_per_idle_time():
  out = subprocess.run([sys.executable, SCRIPT, "--size_mib=4", "--idle_s=0,0.01", "--repeats=1"],
                       capture_output=True, text=True, timeout=120, check=True).stdout
  rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
  assert rows[0].startswith("| idle s | median ms")
  assert [row.split(" | ")[0] for row in rows[1:]] == ["| 0", "| 0.01"]
  assert rows[1].endswith("| 1.00x |")
  assert "4 MiB mapped and touched" in out


@pytest.mark.parametrize("args, message", [
    (["--idle_s=x"], "--idle_s: expected seconds (numbers), got 'x'."),
    (["--idle_s=-1"], "--idle_s: expected seconds >= 0, got '-1'."),
    (["--idle_s=nan"], "--idle_s: expected seconds >= 0, got 'nan'."),
    (["--size_mib=0"], "--size_mib must be at least 1, got 0."),
    (["--repeats=0"], "--repeats must be at least 1, got 0."),
])
def test_script_refuses_bad_flags(args, message):
  out = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                       timeout=120)
  assert out.returncode != 0
  assert message in out.stderr
