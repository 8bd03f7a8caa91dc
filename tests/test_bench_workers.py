"""bench/workers.py: the interleaved-timing protocol the benchmarks share (no model involved)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO, load_bench_module

workers = load_bench_module("workers")

# A worker whose step sleeps a little longer each call, so that the kept steps can be told apart.
_WORKER = (
    "import sys, time; sys.path.insert(0, {bench!r}); import workers\n"
    "calls = [0]\n"
    "def run():\n"
    "  calls[0] += 1\n"
    "  time.sleep(0.01 * calls[0])\n"
    "workers.serve('w', run, {{'kind': 'test'}})\n"
)


@pytest.fixture
def pool():
  pool = workers.InterleavedWorkers()
  for name in ("a", "b"):
    pool.start(name, ["-c", _WORKER.format(bench=os.path.join(REPO, "bench"))])
  yield pool
  pool.close()


def test_one_step_per_turn_and_several_back_to_back(pool):
  assert pool.infos["a"]["ready"] == "w" and pool.infos["a"]["kind"] == "test"
  one = pool.time_steps(rounds=2)
  assert {name: len(t) for name, t in one.items()} == {"a": 2, "b": 2}
  several = pool.time_steps(rounds=2, steps_per_turn=3)
  # Each turn's first step is left out: 2 rounds x 2 kept steps, calls 4-5 and 7-8 (call 3,
  # which would be kept otherwise, sleeps 0.03 s).
  assert {name: len(t) for name, t in several.items()} == {"a": 4, "b": 4}
  assert min(several["a"]) >= 0.04 and min(several["b"]) >= 0.04


def test_bad_counts_are_refused(pool):
  with pytest.raises(ValueError, match="steps_per_turn must be at least 1, got 0"):
    pool.time_steps(rounds=1, steps_per_turn=0)
  with pytest.raises(RuntimeError, match="worker a: unknown command 'steps 0'"):
    pool.ask("a", "steps 0")
  with pytest.raises(RuntimeError, match="worker b: unknown command 'steps x'"):
    pool.ask("b", "steps x")
  assert pool.ask("a", "steps 2")["seconds"][1] > 0


def test_peer_benchmark_refuses_a_bad_steps_per_turn():
  out = subprocess.run(
      [sys.executable, os.path.join(REPO, "bench", "peer_pytorch.py"), "--steps_per_turn=0"],
      capture_output=True, text=True, cwd=REPO, timeout=120)
  assert out.returncode != 0
  assert "--steps_per_turn must be at least 1, got 0" in out.stderr
