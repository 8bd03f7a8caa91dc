"""OpenBLAS (under XLA:CPU's LAPACK calls) limited to one thread by the command line."""

from __future__ import annotations

import os
import subprocess
import sys

from eiw_flow_jax.host import platform as host_platform
from eiw_flow_jax.host import threads as host_threads

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


def test_the_platform_is_decided_before_jax_loads():
  """JAX_PLATFORMS decides when set; else an accelerator counts only with its plugin installed
  and its device present (libtpu alone, as for ahead-of-time TPU compiles, leaves the CPU)."""
  def platform(environ, plugins=(), devices=()):
    return host_platform.default_platform(environ, installed=lambda m: m in plugins,
                                          exists=lambda p: p in devices)

  assert platform({}) == "cpu"
  assert platform({"JAX_PLATFORMS": "cpu"}, ["libtpu"], ["/dev/accel0"]) == "cpu"
  assert platform({"JAX_PLATFORMS": "tpu,cpu"}) == "tpu"
  assert platform({"JAX_PLATFORMS": "cuda"}) == "cuda"
  assert platform({}, ["libtpu"]) == "cpu"
  assert platform({}, ["libtpu"], ["/dev/vfio/0"]) == "tpu"
  assert platform({}, ["jax_cuda12_plugin"], ["/dev/nvidiactl"]) == "cuda"
  assert platform({}, [], ["/dev/nvidiactl"]) == "cpu"
  assert host_platform.runs_on_cpu({"JAX_PLATFORMS": "cpu"})
  assert not host_platform.runs_on_cpu({"JAX_PLATFORMS": "tpu"})


def test_command_line_leaves_the_host_alone_on_an_accelerator():
  """JAX_PLATFORMS=tpu (absl's --helpshort loads no backend): no OpenBLAS setting, and no
  re-execution for the malloc tunables (one interpreter start)."""
  assert _cli_blas_threads(JAX_PLATFORMS="tpu") == "None"
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  env.update(PYTHONPATH=REPO, EIW_FLOW_JAX_HOST_MALLOC="reuse", JAX_PLATFORMS="tpu")
  result = subprocess.run(
      [sys.executable, "-X", "importtime", "-m", "eiw_flow_jax.main", "--helpshort"], env=env,
      capture_output=True, text=True, timeout=300)
  assert "--workdir" in result.stdout, result.stderr[-2000:]
  imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
              if line.startswith("import time:")]
  assert imported.count("site") == 1


def test_jax_is_kept_from_probing_for_absent_accelerators():
  """JAX_PLATFORMS=cpu where a plugin is installed without its device (libtpu for ahead-of-time
  compiles: JAX would probe for chips and libtpu complain on stderr); nothing where the device
  is present (a TPU VM uses its chips), nothing is installed, or the user chose a platform."""
  def skipped(environ, plugins=(), devices=()):
    changed = host_platform.skip_absent_accelerators(
        environ, installed=lambda m: m in plugins, exists=lambda p: p in devices)
    assert changed == (environ.get("JAX_PLATFORMS") == "cpu")
    return environ

  assert skipped({}, ["libtpu"]) == {"JAX_PLATFORMS": "cpu"}
  assert skipped({"A": "1"}, ["jax_cuda12_plugin"]) == {"A": "1", "JAX_PLATFORMS": "cpu"}
  assert skipped({}, ["libtpu"], ["/dev/vfio/0"]) == {}
  assert skipped({}, ["libtpu"], ["/dev/accel0"]) == {}
  assert skipped({}, ["jax_cuda12_plugin"], ["/dev/nvidiactl"]) == {}
  assert skipped({}) == {}
  assert skipped({"JAX_PLATFORMS": "tpu"}, ["libtpu"]) == {"JAX_PLATFORMS": "tpu"}
  assert skipped({"JAX_PLATFORM_NAME": "tpu"}, ["libtpu"]) == {"JAX_PLATFORM_NAME": "tpu"}
