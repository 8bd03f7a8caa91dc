"""OpenBLAS (under XLA:CPU's LAPACK calls) limited to one thread by the command line."""

from __future__ import annotations

import os
import subprocess
import sys

from eiw_flow_jax import host_threads

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sets_one_thread_unless_the_user_chose():
  environ = {"OTHER": "x"}
  assert host_threads.limit_blas_threads(environ)
  assert environ == {"OTHER": "x", "OPENBLAS_NUM_THREADS": "1"}
  chosen = {"OPENBLAS_NUM_THREADS": "4"}
  assert not host_threads.limit_blas_threads(chosen)
  assert chosen == {"OPENBLAS_NUM_THREADS": "4"}
  assert host_threads.blas_thread_environ({"A": "1"}) == {"A": "1", "OPENBLAS_NUM_THREADS": "1"}
  assert host_threads.blas_thread_environ(chosen) == chosen


_CLI = """
import atexit, os, runpy, sys
atexit.register(lambda: print("BLAS", os.environ.get("OPENBLAS_NUM_THREADS"), flush=True))
sys.argv = ["eiw_flow_jax.main", "--helpshort"]
runpy.run_module("eiw_flow_jax.main", run_name="__main__")
"""


def _cli_blas_threads(**extra: str) -> str:
  env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
  env.update(PYTHONPATH=REPO, EIW_FLOW_JAX_HOST_MALLOC="0", **extra)  # no re-exec here
  result = subprocess.run([sys.executable, "-c", _CLI], env=env, capture_output=True, text=True,
                          timeout=300)
  lines = [line for line in result.stdout.splitlines() if line.startswith("BLAS ")]
  assert lines, result.stderr[-2000:]
  return lines[-1].split()[1]


def test_command_line_runs_openblas_on_one_thread_unless_told_otherwise():
  assert _cli_blas_threads() == "1"
  assert _cli_blas_threads(OPENBLAS_NUM_THREADS="2") == "2"
