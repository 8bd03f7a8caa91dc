"""The suite's own compile flags (tests/conftest.py): only flags this jaxlib's XLA accepts."""

from __future__ import annotations

import os

from conftest import LOOP_EMITTERS_FLAG, TEST_XLA_FLAGS, xla_accepts


def test_probe_tells_known_from_unknown_xla_flags():
  assert xla_accepts("--xla_backend_optimization_level=0")
  assert not xla_accepts("--xla_cpu_no_such_flag_for_the_probe=true")


def test_suite_flags_are_set_and_the_loop_emitters_only_where_known():
  assert TEST_XLA_FLAGS in os.environ["XLA_FLAGS"]
  if "EIW_FLOW_JAX_TEST_XLA_FLAGS" not in os.environ:
    assert (LOOP_EMITTERS_FLAG in TEST_XLA_FLAGS) == xla_accepts(LOOP_EMITTERS_FLAG)
