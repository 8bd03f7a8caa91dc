"""host_malloc: when the CLI asks glibc for huge pages, and that it re-executes itself once."""

import os
import subprocess
import sys

import pytest

from eiw_flow_jax import host_malloc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MADVISE = "always [madvise] never\n"


def _thp_file(tmp_path, mode: str) -> str:
  path = tmp_path / "enabled"
  path.write_text(mode)
  return str(path)


def test_adds_the_tunable_where_the_kernel_wants_madvise(tmp_path):
  environ = host_malloc.huge_page_environ({"HOME": "/h"}, _thp_file(tmp_path, MADVISE))
  assert environ == {"HOME": "/h", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


def test_keeps_other_tunables(tmp_path):
  environ = host_malloc.huge_page_environ(
      {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, _thp_file(tmp_path, MADVISE))
  assert environ["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


@pytest.mark.parametrize("mode", ["[always] madvise never\n", "always madvise [never]\n"])
def test_nothing_to_do_when_thp_is_always_or_never(tmp_path, mode):
  assert host_malloc.huge_page_environ({}, _thp_file(tmp_path, mode)) is None


@pytest.mark.parametrize("environ", [
    {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},  # the user's own choice stands
    {"EIW_FLOW_JAX_HUGE_PAGES": "0"},
])
def test_respects_the_users_setting_and_the_opt_out(tmp_path, environ):
  assert host_malloc.huge_page_environ(environ, _thp_file(tmp_path, MADVISE)) is None


def test_nothing_to_do_without_the_thp_file(tmp_path):
  assert host_malloc.huge_page_environ({}, str(tmp_path / "missing")) is None


_CHILD = """
import os, sys
print("pid", os.getpid(), "tunables", os.environ.get("GLIBC_TUNABLES"), "argv", sys.argv[1:],
      flush=True)
from eiw_flow_jax import host_malloc
host_malloc.reexec_with_huge_pages(sys.argv[1])
print("done", os.getpid(), flush=True)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables are Linux-only")
def test_reexecutes_once_with_the_same_pid_and_arguments(tmp_path):
  thp = _thp_file(tmp_path, MADVISE)
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", host_malloc.OPT_OUT)}
  env["PYTHONPATH"] = REPO
  out = subprocess.run([sys.executable, "-c", _CHILD, thp, "x"], env=env, capture_output=True,
                       text=True, timeout=300, check=True).stdout.splitlines()
  first, second, done = out
  assert first.split()[1] == second.split()[1] == done.split()[1]  # exec keeps the PID
  assert "tunables None" in first and "tunables glibc.malloc.hugetlb=1" in second
  assert first.endswith(f"argv ['{thp}', 'x']") and second.endswith(f"argv ['{thp}', 'x']")
