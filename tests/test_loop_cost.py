"""Loops counted as often as they run (eiw_flow_jax.aot.loop_cost): trip counts read from
compiled programs, FLOPs by the rules of XLA's cost analysis, and the TPU report of a scanned
DenseFlow, whose figures the compiler alone would count with each loop body once."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
from conftest import REPO

from eiw_flow_jax.aot import compiler, loop_cost, report, topology, traffic
from eiw_flow_jax.commands import aot as aot_command

M, K, N = 16, 32, 24  # the loops' matmul: (M, K) @ (K, N), 2 M K N FLOPs


def _nested(x, w):
  """An outer loop of 3 over an inner one of 5, each inner step a matmul and a tanh."""
  def outer(_, x):
    return jax.lax.fori_loop(0, 5, lambda _, y: jnp.tanh(y @ w)[:, :K], x)
  return jax.lax.fori_loop(0, 3, outer, x)


@pytest.fixture(scope="module")
def nested_program():
  x, w = jnp.ones((M, K)), jnp.ones((K, K))
  compiled = jax.jit(_nested).lower(x, w).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return compiled.as_text(), float(cost["flops"]), float(cost["bytes accessed"])


def _runs(text):
  return loop_cost.Program.parse(text).runs


def test_nested_loops_run_their_trip_counts_times_over(nested_program):
  text, flops, bytes_accessed = nested_program
  cost = loop_cost.weighted_cost(loop_cost.Program.parse(text), flops, bytes_accessed)
  assert cost.exact
  assert sorted((loop.trips, loop.runs) for loop in cost.loops) == [(3, 3), (5, 15)]
  matmul = 2 * M * K * K
  # The compiler counts each body once: one matmul. Counted as they run: fifteen (plus the
  # loop counters' adds and compares, a few dozen FLOPs; tanh is a transcendental).
  assert flops == pytest.approx(matmul, abs=20)
  assert cost.flops == pytest.approx(15 * matmul, abs=60)
  assert cost.flops_counted_once == pytest.approx(flops, abs=20)
  assert cost.bytes_accessed > 10 * bytes_accessed / 3  # the body's bytes, 15 times


def test_trip_counts_are_read_from_the_loop_itself_where_the_compiler_wrote_none(
    nested_program):
  """The TPU compiler writes no `known_trip_count` (the CPU's does): the count is read from
  the condition's bound, the loop's start and the body's step, through wrapping fusions."""
  text, _, _ = nested_program
  assert "known_trip_count" in text
  stripped = re.sub(r'"known_trip_count":\{"n":"\d+"\}', '"stripped":1', text)
  assert _runs(stripped) == _runs(text)
  assert sorted(r for r in _runs(text).values() if r) == [1, 3, 4, 15, 18]  # bodies, conds


def test_a_loop_of_unknown_trip_count_leaves_lower_bounds():
  def until(x, n):
    return jax.lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, jnp.tanh(c[1] @ c[1])),
                              (0, x))[1]

  compiled = jax.jit(until).lower(jnp.ones((8, 8)), 4).compile()
  cost = loop_cost.weighted_cost(loop_cost.Program.parse(compiled.as_text()), 128.0, 0.0)
  assert not cost.exact
  assert [loop.trips for loop in cost.loops] == [None]
  assert cost.flops == 128.0  # the body once: what is known


def test_a_branch_inside_a_loop_leaves_the_figures_approximate():
  """Each branch of a conditional in a loop counts as often as the conditional runs (one of
  them does): the figures are then marked approximate, not exact."""
  def branchy(x):
    return jax.lax.fori_loop(0, 4, lambda _, y: jax.lax.cond(
        jnp.sum(y) > 0, lambda y: jnp.tanh(y @ y), lambda y: y - 1.0, y), x)

  compiled = jax.jit(branchy).lower(jnp.ones((8, 8))).compile()
  text = compiled.as_text()
  assert " conditional(" in text  # a data-dependent branch stays a branch
  cost = loop_cost.weighted_cost(loop_cost.Program.parse(text), 0.0, 0.0)
  assert [loop.trips for loop in cost.loops] == [4] and not cost.exact


def test_a_platform_choice_inside_a_loop_of_a_lowered_program_is_counted_exactly():
  """Before XLA's passes (the program a GPU report counts FLOPs on), a `platform_dependent` in a
  loop is a conditional picking the platform's index (branches that only return a constant)
  and a one-branch conditional running the chosen code: counting every branch each time is
  exact, and the FLOPs are the matmuls of every iteration, forward and backward."""
  def choose(x, w):
    return jax.lax.platform_dependent(
        x, w, cpu=lambda a, b: jnp.tanh(a @ b), default=lambda a, b: jnp.sin(a @ b))

  def loss(x, ws):
    return jax.lax.scan(lambda x, w: (choose(x, w), None), x, ws)[0].sum()

  lowered = jax.jit(jax.grad(loss)).lower(jnp.ones((M, N)), jnp.ones((5, N, N)))
  module = lowered.compiler_ir("hlo").as_hlo_module()
  program = loop_cost.Program.parse(module.to_string())
  conditionals = [line for name in program.runs for line in program.computations[name]
                  if line.opcode == "conditional"]
  assert conditionals and all(program.runs[name] == 5 for name in program.runs
                              if any(x in conditionals for x in program.computations[name]))
  cost = loop_cost.weighted_cost(program, compiler._hlo_cost(module)["flops"], 0.0)
  assert cost.exact and [loop.trips for loop in cost.loops] == [5, 5]
  matmuls = 2 * 5 * 2 * M * N * N  # forward, and the gradient with respect to x
  assert matmuls < cost.flops < 1.2 * matmuls


@pytest.mark.parametrize("padding,stride,dilation", [
    ("SAME", 1, 1), ("VALID", 1, 1), ("SAME", 2, 1), (((2, 1), (0, 3)), 1, 2)])
def test_convolution_flops_skip_padding_taps_as_xla_counts_them(padding, stride, dilation):
  def conv(x, k):
    return jax.lax.conv_general_dilated(
        x, k, (stride, stride), padding, rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  lowered = jax.jit(conv).lower(jnp.ones((2, 7, 6, 3)), jnp.ones((3, 3, 3, 5)))
  module = lowered.compiler_ir("hlo").as_hlo_module()
  expected = compiler._hlo_cost(module)["flops"]  # XLA's own count of the same module
  text = module.to_string()
  computations, entry = traffic.parse_computations(text)
  shapes = {x.name: x.shape for x in computations[entry]}
  counted = sum(loop_cost.instruction_flops(x, computations, shapes)
                for x in computations[entry])
  assert counted == expected


def test_a_scanned_denseflow_is_costed_with_every_unit_and_layer():
  """The TPU report of a DenseFlow, whose units and layers are loops: FLOPs and bytes count
  every iteration, where the compiler's own figures count each loop body once. The same at the
  compiler's least effort (`config.compiler`: another program, whose loops copy their
  induction variable before stepping it)."""
  if not topology.libtpu_available():
    pytest.skip("libtpu is not installed (pip install -e '.[tpu]'; .ci/run installs it)")
  reports = {}
  for effort in (0.0, -1.0):
    config = aot_command.load_config(f"{REPO}/configs/digits_denseflow.py")
    config.compiler.exec_time_optimization_effort = effort
    r = reports[effort] = compiler.compile_for_topology(
        config, "v5e:2x2", 4, with_eval=False, with_traffic=True)
    assert r.cost_source == report.COST_LOOPS, effort
    cost = r.loop_cost
    assert cost.exact and (r.flops, r.bytes_accessed) == (cost.flops, cost.bytes_accessed)
    # Each block's units (2) and each unit's layers (2) are loops: their bodies run 2 and 4
    # times per step in the forward pass and again in the backward.
    trips = sorted(loop.trips for loop in cost.loops if "_forward_pass/block" in loop.op_name)
    assert trips == [2] * 8, effort
    # Most FLOPs are in those bodies: counted as they run, over twice the compiler's figure
    # (which counts each once); the bytes less so (the optimizer's pass over the state is not
    # in a loop).
    assert r.flops > 2 * cost.compiler_flops and r.bytes_accessed > 1.3 * cost.compiler_bytes
    # Counted once, the instructions cost what the compiler says (its rules, to a few percent;
    # the bytes of loop bookkeeping differ more: docs/tpu.md).
    flops, bytes_ = cost.agreement()
    assert flops == pytest.approx(1.0, abs=0.02) and bytes_ == pytest.approx(1.0, abs=0.2)
    # The traffic by layer kind counts the same runs: the instructions once, plus the runs
    # beyond the first, the part the report adds to the compiler's figure.
    added = r.bytes_accessed - cost.compiler_bytes
    assert r.traffic.total == pytest.approx(cost.bytes_counted_once + added, rel=1e-9)
    rendered = report.render(r)
    assert report.COST_LOOPS in rendered and "loops read from the program" in rendered
    assert "the compiler's own count, each body once" in rendered
    assert ("XLA options exec_time_optimization_effort=-1" in rendered) == (effort == -1.0)
  # The option reached the compiler: the same arithmetic, compiled into another program.
  default, least = reports[0.0], reports[-1.0]
  assert least.flops == pytest.approx(default.flops, rel=0.05)
  assert least.bytes_accessed != pytest.approx(default.bytes_accessed, rel=0.05)


def test_the_loops_line_names_unknown_counts_and_the_agreement():
  cost = loop_cost.WeightedCost(
      flops=9e9, bytes_accessed=4e9, exact=False,
      loops=(loop_cost.Loop("a/while", 5, 30), loop_cost.Loop("b/while", None, None)),
      compiler_flops=1e9, compiler_bytes=2e9, flops_counted_once=1.01e9,
      bytes_counted_once=2.2e9)
  line = report._loops_line(cost)
  assert "loops: 2 (trip counts 5; their bodies run 30 to 30 times per step; 1 of unknown " \
         "count, taken once)" in line
  assert "1.00 GFLOP, 2.000 GB" in line and "FLOPs +1.0%, bytes +10.0%" in line


_TWO_STACKED_WRITES = """\
%fused (p0: f32[4,8], p1: f32[1,8], p2: s32[], p3: f32[4,8]) -> (f32[4,8], f32[4,8]) {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[1,8]{1,0} parameter(1)
  %p2 = s32[] parameter(2)
  %p3 = f32[4,8]{1,0} parameter(3)
  %zero = s32[] constant(0)
  %d0 = f32[4,8]{1,0} dynamic-update-slice(%p0, %p1, %p2, %zero)
  %d1 = f32[4,8]{1,0} dynamic-update-slice(%p3, %p1, %p2, %zero)
  ROOT %t = (f32[4,8]{1,0}, f32[4,8]{1,0}) tuple(%d0, %d1)
}

ENTRY %main (a: f32[4,8], b: f32[1,8], i: s32[], c: f32[4,8]) -> (f32[4,8], f32[4,8]) {
  %a = f32[4,8]{1,0} parameter(0)
  %b = f32[1,8]{1,0} parameter(1)
  %i = s32[] parameter(2)
  %c = f32[4,8]{1,0} parameter(3)
  ROOT %f = (f32[4,8]{1,0}, f32[4,8]{1,0}) fusion(%a, %b, %i, %c), kind=kLoop, calls=%fused
}
"""


def test_a_loop_body_writing_several_stacked_buffers_moves_only_the_slices():
  """A scan's body stores each iteration's residuals into stacked buffers in one fusion (a
  tuple of in-place updates): it reads the new rows and writes them, not the whole buffers."""
  (fusion,) = traffic.instructions(_TWO_STACKED_WRITES)
  assert (fusion.read, fusion.written) == (8 * 4 + 4, 2 * 8 * 4)
