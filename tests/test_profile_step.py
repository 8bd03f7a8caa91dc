"""bench/profile_step.py's trace accounting: HLO op names mapped to model parts, op time summed.

Synthetic HLO lines and trace events in the formats jaxlib 0.10.2 writes (checked against a real
trace of the train step), so the test runs without compiling or tracing anything.
"""

from __future__ import annotations

import pytest
from conftest import load_bench_module

profile_step = load_bench_module("profile_step")

PREFIX = "jit(step_fn)/jvp(MultiScaleFlow.forward)/MultiScaleFlow._level_forward"
HLO = "\n".join([
    "ENTRY %main.375 (p: f32[2]) -> f32[2] {",
    f'  %ynn_fusion.15 = f32[16,16,16,256]{{3,2,1,0}} fusion(%a, %b), kind=kCustom, '
    f'calls=%fused_computation.15, metadata={{op_name="{PREFIX}/level0_step3/layers_2/net/'
    f'bhwc,cd->bhwd/dot_general" stack_frame_id=144}}, backend_config={{}}',
    '  %dot.3 = f32[256,256]{1,0} dot(%a, %b), metadata={op_name="jit(step_fn)/'
    'transpose(jvp(MultiScaleFlow.forward))/MultiScaleFlow._level_forward/level2_step0/'
    'layers_2/net/ZeroConv_0/dot_general"}',
    '  %multiply_add_fusion.7 = f32[12]{0} fusion(%a), kind=kLoop, '
    'metadata={op_name="jit(step_fn)/cond/branch_1_fun/mul"}',
    '  %conditional.1 = (f32[12]) conditional(%p, %a, %b), '
    'metadata={op_name="jit(step_fn)/cond"}',
    f'  ROOT %add.2 = f32[2]{{0}} add(%a, %b), metadata={{op_name="{PREFIX}/level1_step0/'
    f'layers_0/add"}}',
    "  %no_metadata.1 = f32[2]{0} add(%a, %b)",
    "}",
])


def test_op_names_and_kinds_come_from_the_compiled_hlo():
  names = profile_step.op_names(HLO)
  assert set(names) == {"ynn_fusion.15", "dot.3", "multiply_add_fusion.7", "conditional.1",
                        "add.2"}
  assert names["add.2"].endswith("level1_step0/layers_0/add")
  assert profile_step.op_kind("multiply_add_fusion.7") == "multiply_add_fusion"
  assert profile_step.op_kind("ynn_fusion") == "ynn_fusion"


@pytest.mark.parametrize("op_name, expected", [
    (f"{PREFIX}/level0_step3/layers_2/net/bhwc,cd->bhwd/dot_general",
     ("forward", "coupling/net/bhwc,cd->bhwd")),
    ("jit(step_fn)/transpose(jvp(MultiScaleFlow.forward))/MultiScaleFlow._level_forward/"
     "level2_step0/layers_2/net/ZeroConv_0/dot_general", ("backward", "coupling/net/ZeroConv_0")),
    (f"{PREFIX}/level1_step0/layers_0/add", ("forward", "ActNorm")),
    ("jit(step_fn)/transpose(jvp(MultiScaleFlow.forward))/MultiScaleFlow._level_forward/"
     "level0_step4/layers_2/net/ZeroConv_0/jvp(MultiScaleFlow.forward)/"
     "MultiScaleFlow._level_forward/level0_step4/layers_2/net/ZeroConv_0/...c,cd->...d/"
     "dot_general", ("backward", "coupling/net/ZeroConv_0/...c,cd->...d")),
    (f"{PREFIX}/level1_step7/layers_1/bhwc,dc->bhwd/dot_general",
     ("forward", "1x1 conv (LU)/bhwc,dc->bhwd")),
    (f"{PREFIX}/level1_step7/add", ("forward", "flow step")),
    ("jit(step_fn)/cond/branch_1_fun/mul", ("update", "Adam + EMA (under the finite cond)")),
    ("jit(step_fn)/reduce_sum", ("update", "gradient norm, guard")),
    # The stacked steps (glow.MultiScaleFlow._run_steps): scanned, and unrolled.
    (f"{PREFIX}/MultiScaleFlow._run_steps/level0_steps/while/body/closed_call/FlowStep/"
     "layers_2/net/ZeroConv_0/conv_general_dilated", ("forward", "coupling/net/ZeroConv_0")),
    (f"{PREFIX}/MultiScaleFlow._run_steps/level0_steps/level0_step1/FlowStep/layers_0/add",
     ("forward", "ActNorm")),
    # The layers' own name scopes (bijectors.layer_scope) add nothing to the part's name.
    (f"{PREFIX}/level0_step3/layers_2/coupling/net/coupling_net/bhwc,cd->bhwd/dot_general",
     ("forward", "coupling/net/bhwc,cd->bhwd")),
    (f"{PREFIX}/level1_step0/layers_0/actnorm/add", ("forward", "ActNorm")),
])
def test_model_part_folds_levels_and_steps(op_name, expected):
  assert profile_step.model_part(op_name) == expected


def test_summaries_skip_containers_and_unknown_events_and_busy_time_is_a_union():
  names = profile_step.op_names(HLO)
  events = [
      {"ph": "X", "name": "ynn_fusion.15", "ts": 0.0, "dur": 100.0},
      {"ph": "X", "name": "dot.3", "ts": 50.0, "dur": 100.0},  # concurrent with the fusion
      {"ph": "X", "name": "multiply_add_fusion.7", "ts": 300.0, "dur": 10.0},
      {"ph": "X", "name": "conditional.1", "ts": 290.0, "dur": 40.0},  # spans the op inside
      {"ph": "X", "name": "ThunkExecutor::Execute", "ts": 0.0, "dur": 1000.0},  # not an op
      {"ph": "i", "name": "dot.3", "ts": 60.0},  # not a complete event
  ]
  sums = profile_step.summarise(events, names)
  assert sums["kind"] == {"ynn_fusion": 100.0, "dot": 100.0, "multiply_add_fusion": 10.0}
  assert sums["part"][("update", "Adam + EMA (under the finite cond)")] == 10.0
  assert sum(sums["part"].values()) == 210.0
  assert sums["count"]["dot"] == 1
  # Busy: [0, 150] and [290, 330] (the container's own span counts as time some op ran).
  assert profile_step.busy_micros(events, names) == 190.0
