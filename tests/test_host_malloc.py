"""host_malloc: which glibc tunables the CLI adds on which host, and that it re-executes once."""

import os
import platform
import subprocess
import sys

import pytest
from conftest import transparent_hugepage_mode

from eiw_flow_jax.host import malloc as host_malloc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MADVISE = "always [madvise] never\n"
REUSE = ":".join(host_malloc.HEAP_REUSE)


def _thp_file(tmp_path, mode: str, name: str = "enabled") -> str:
  path = tmp_path / name
  path.write_text(mode)
  return str(path)


def test_adds_huge_pages_where_the_kernel_wants_madvise(tmp_path):
  environ = host_malloc.malloc_environ({"HOME": "/h"}, _thp_file(tmp_path, MADVISE))
  assert environ == {"HOME": "/h", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


@pytest.mark.parametrize("mode", ["[always] madvise never\n", "always madvise [never]\n"])
def test_nothing_to_do_when_thp_is_always_or_never(tmp_path, mode):
  assert host_malloc.malloc_environ({}, _thp_file(tmp_path, mode)) is None
  assert host_malloc.malloc_environ({}, str(tmp_path / "missing")) is None


def test_heap_reuse_on_request(tmp_path):
  reuse = {"EIW_FLOW_JAX_HOST_MALLOC": "reuse"}
  environ = host_malloc.malloc_environ(reuse, _thp_file(tmp_path, MADVISE))
  assert environ["GLIBC_TUNABLES"] == f"{REUSE}:glibc.malloc.hugetlb=1"
  assert "glibc.malloc.arena_max=1" in REUSE and "glibc.malloc.mmap_max=0" in REUSE
  never = _thp_file(tmp_path, "always madvise [never]\n", "never")
  assert host_malloc.malloc_environ(reuse, never)["GLIBC_TUNABLES"] == REUSE


def test_keeps_the_users_tunables_and_adds_the_rest(tmp_path):
  environ = host_malloc.malloc_environ(
      {"GLIBC_TUNABLES": "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=0",
       "EIW_FLOW_JAX_HOST_MALLOC": "reuse"}, _thp_file(tmp_path, MADVISE))
  assert environ["GLIBC_TUNABLES"] == (
      "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=0:glibc.malloc.mmap_max=0:"
      f"glibc.malloc.trim_threshold={1 << 40}")
  assert host_malloc.malloc_environ(
      {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, _thp_file(tmp_path, MADVISE)) is None


@pytest.mark.parametrize("environ", [
    {"EIW_FLOW_JAX_HOST_MALLOC": "0"}, {"EIW_FLOW_JAX_HUGE_PAGES": "0"},
    {"EIW_FLOW_JAX_HOST_MALLOC": "reuse", "EIW_FLOW_JAX_HUGE_PAGES": "0"},
])
def test_opt_out(tmp_path, environ):
  assert host_malloc.malloc_environ(environ, _thp_file(tmp_path, MADVISE)) is None


def test_unknown_mode_is_an_error(tmp_path):
  with pytest.raises(ValueError, match="EIW_FLOW_JAX_HOST_MALLOC must be one of 0, 1, reuse"):
    host_malloc.malloc_environ({"EIW_FLOW_JAX_HOST_MALLOC": "yes"}, _thp_file(tmp_path, MADVISE))


_CHILD = """
import os, sys
print("pid", os.getpid(), "tunables", os.environ.get("GLIBC_TUNABLES"), "argv", sys.argv[1:],
      flush=True)
from eiw_flow_jax.host import malloc as host_malloc
host_malloc.reexec_with_malloc_tunables(sys.argv[1])
print("done", os.getpid(), flush=True)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables are Linux-only")
def test_reexecutes_once_with_the_same_pid_and_arguments(tmp_path):
  thp = _thp_file(tmp_path, MADVISE)
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", host_malloc.MODE_VARIABLE, host_malloc.LEGACY_OPT_OUT)}
  env["PYTHONPATH"] = REPO
  out = subprocess.run([sys.executable, "-c", _CHILD, thp, "x"], env=env, capture_output=True,
                       text=True, timeout=300, check=True).stdout.splitlines()
  first, second, done = out
  assert first.split()[1] == second.split()[1] == done.split()[1]  # exec keeps the PID
  assert "tunables None" in first and "tunables glibc.malloc.hugetlb=1 " in second
  assert first.endswith(f"argv ['{thp}', 'x']") and second.endswith(f"argv ['{thp}', 'x']")


_STEPS = """
import resource, jax, jax.numpy as jnp
# A 64 MiB temporary (the barrier keeps XLA from fusing it away), small input and output.
f = jax.jit(lambda x: jnp.sum(jax.lax.optimization_barrier(jnp.tile(x, 64) * 2.0)))
x = jnp.ones((1 << 18,), jnp.float32)
f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
  f(x).block_until_ready()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 3)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc tunables: Linux with glibc only")
@pytest.mark.skipif(transparent_hugepage_mode() == "always",
                    reason="THP mode 'always': the kernel backs the block with huge pages, so "
                    "the 4 KiB page-fault counts this test expects do not apply")
def test_heap_reuse_stops_the_per_step_page_faults(tmp_path):
  """What heap reuse is for: XLA:CPU's large temporaries stop faulting in every call."""
  faults = {}
  for name, tunables in (("default", ""), ("reuse", REUSE)):
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env.update(GLIBC_TUNABLES=tunables, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _STEPS], env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    faults[name] = int(out.split()[-1])
  # A 64 MiB block is 16,384 pages of 4 KiB: faulted afresh per call unless it is reused.
  assert faults["default"] > 10_000 and faults["reuse"] < 1_000, faults


def test_command_line_names_a_bad_mode_in_one_line(tmp_path):
  env = {**os.environ, "PYTHONPATH": REPO, "EIW_FLOW_JAX_HOST_MALLOC": "on"}
  result = subprocess.run(
      [sys.executable, "-m", "eiw_flow_jax.main", f"--workdir={tmp_path / 'w'}"], env=env,
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip() == (
      "error: EIW_FLOW_JAX_HOST_MALLOC must be one of 0, 1, reuse, got 'on'.")
  assert not (tmp_path / "w").exists()


def test_command_line_reexecutes_before_importing_jax():
  # The package's __init__ is lazy and main.py re-executes before its imports, so JAX loads
  # once per start (it loaded twice, ~4 s more, when the re-exec came after the imports).
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  env.update(PYTHONPATH=REPO, EIW_FLOW_JAX_HOST_MALLOC="reuse")  # re-executes on any kernel
  result = subprocess.run(
      [sys.executable, "-X", "importtime", "-m", "eiw_flow_jax.main", "--helpshort"], env=env,
      capture_output=True, text=True, timeout=300)
  assert "--workdir" in result.stdout, result.stderr[-2000:]  # absl's help (exit status 0)
  imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
              if line.startswith("import time:")]
  assert imported.count("site") == 2  # two interpreter starts: it did re-execute
  assert imported.count("jax") == 1


def test_package_import_is_light_and_its_names_load_on_use():
  code = ("import sys, eiw_flow_jax; assert 'jax' not in sys.modules, 'jax imported'; "
          "from eiw_flow_jax import build_flow, base_config; "
          "print(build_flow.__module__, sorted(eiw_flow_jax.__all__) == "
          "sorted(n for n in eiw_flow_jax.__all__ if n in dir(eiw_flow_jax)))")
  result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": REPO},
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split() == ["eiw_flow_jax.model.flow", "True"]
  import eiw_flow_jax

  with pytest.raises(AttributeError, match="no attribute 'nope'"):
    eiw_flow_jax.nope  # noqa: B018
