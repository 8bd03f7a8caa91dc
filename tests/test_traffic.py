"""The byte breakdown of compiled programs (eiw_flow_jax.aot.traffic) and `aot --compare`'s
tables (eiw_flow_jax.aot.compare), on hand-written HLO text and reports: no compile here (the
TPU compiles that check them against the compiler's own figure are in test_aot.py)."""

from __future__ import annotations

import math

import pytest

from eiw_flow_jax.aot import AotError, compare, traffic
from eiw_flow_jax.aot.chips import CHIPS, GiB
from eiw_flow_jax.aot.report import AotReport, ProgramMemory

# A scheduled TPU module as `compiled.as_text()` prints it, cut down: an input prefetched into
# VMEM (S(1)), a fusion that reads half of it through a slice, a fusion whose reducer must not
# count, a loop whose body runs (counted once), and an unnamed copy of a named result.
ACT = "f32[64,16,16,12]{0,3,2,1:T(8,128)}"  # an activation in HBM
ACT_VMEM = "f32[64,16,16,12]{0,3,2,1:T(8,128)S(1)}"  # the same in VMEM
HALF_SHAPE = "f32[64,16,16,6]{0,3,2,1:T(8,128)}"
W = "f32[512,512]{1,0:T(8,128)}"
LOOP = f"(s32[]{{:T(128)}}, {W})"
STEP = "jit(step)/jvp(MultiScaleFlow.forward)/level0_steps/FlowStep"
BACK = "jit(step)/transpose(jvp(MultiScaleFlow.forward))/level0_steps/FlowStep"
HLO = "\n".join([
    "HloModule jit_step, is_scheduled=true",
    "%add_reducer (a: f32[], b: f32[]) -> f32[] {",
    "  %a = f32[]{:T(128)} parameter(0)",
    "  %b = f32[]{:T(128)} parameter(1)",
    "  ROOT %sum = f32[]{:T(128)} add(%a, %b)",
    "}",
    "%fused_half (param_0.1: f32[64,16,16,12]) -> f32[64,16,16,6] {",
    f"  %param_0.1 = {ACT_VMEM} parameter(0)",
    f"  %half = {HALF_SHAPE} slice(%param_0.1), slice={{[0:64], [0:16], [0:16], [0:6]}}",
    f"  ROOT %twice = {HALF_SHAPE} multiply(%half, %half)",
    "}",
    "%fused_sum (param_0.2: f32[64,16,16,6]) -> f32[64] {",
    f"  %param_0.2 = {HALF_SHAPE} parameter(0)",
    "  %zero = f32[]{:T(128)} constant(0)",
    "  ROOT %reduced = f32[64]{0:T(128)} reduce(%param_0.2, %zero), dimensions={1,2,3}, "
    "to_apply=%add_reducer",
    "}",
    "%body (state: (s32[], f32[512,512])) -> (s32[], f32[512,512]) {",
    f"  %state = {LOOP} parameter(0)",
    f"  %w = {W} get-tuple-element(%state), index=1",
    f'  %w2 = {W} multiply(%w, %w), metadata={{op_name="{BACK}/layers_2/coupling/net/'
    'coupling_net/mul"}',
    "  %i = s32[]{:T(128)} get-tuple-element(%state), index=0",
    f"  ROOT %next = {LOOP} tuple(%i, %w2)",
    "}",
    "%condition (state.1: (s32[], f32[512,512])) -> pred[] {",
    f"  %state.1 = {LOOP} parameter(0)",
    "  %i.1 = s32[]{:T(128)} get-tuple-element(%state.1), index=0",
    "  %limit = s32[]{:T(128)} constant(32)",
    "  ROOT %lt = pred[]{:T(512)} compare(%i.1, %limit), direction=LT",
    "}",
    "ENTRY %main (x: f32[64,16,16,12], w.1: f32[512,512]) -> f32[64] {",
    f'  %x = {ACT} parameter(0), metadata={{op_name="images"}}',
    f"  %w.1 = {W} parameter(1), metadata={{op_name=\"state.params[\\'level0_steps\\']\"}}",
    f"  %prefetch = ({ACT_VMEM}, {ACT}, u32[]{{:S(2)}}) copy-start(%x)",
    f"  %x.vmem = {ACT_VMEM} copy-done(%prefetch)",
    f"  %h = {HALF_SHAPE} fusion(%x.vmem), kind=kLoop, calls=%fused_half, "
    f'metadata={{op_name="{STEP}/layers_0/actnorm/mul"}}',
    "  %h.copy = f32[64,16,16,6]{0,2,3,1:T(8,128)} copy(%h)",
    "  %s = f32[64]{0:T(128)} fusion(%h.copy), kind=kInput, calls=%fused_sum, "
    'metadata={op_name="jit(step)/optimizer_and_ema_update/cond/branch_1_fun/add"}',
    "  %zero.1 = s32[]{:T(128)} constant(0)",
    f"  %init = {LOOP} tuple(%zero.1, %w.1)",
    f"  %loop = {LOOP} while(%init), condition=%condition, body=%body",
    "  ROOT %out = f32[64]{0:T(128)} negate(%s)",
    "}",
])

ACTIVATION = 16 * 16 * 16 * 128 * 4  # f32[64,16,16,12] in layout {0,3,2,1}: 64 -> 128, 12 -> 16
HALF = 16 * 16 * 8 * 128 * 4  # f32[64,16,16,6]: 6 -> 8
MATRIX = 512 * 512 * 4


def by_name() -> dict[str, traffic.Instruction]:
  return {i.name: i for i in traffic.instructions(HLO)}


def test_arrays_are_counted_in_their_tiles():
  assert traffic.array_bytes("f32[64,16,16,12]{0,3,2,1:T(8,128)}") == ACTIVATION
  assert traffic.array_bytes("f32[64,16,16,12]{0,3,2,1:T(8,128)}", padded=False) == (
      64 * 16 * 16 * 12 * 4)
  assert traffic.array_bytes("bf16[64,16,16,512]{3,0,2,1:T(8,128)(2,1)}") == 64 * 16 * 16 * 512 * 2
  assert traffic.array_bytes("(f32[512,512]{1,0:T(8,128)}, s32[]{:T(128)})") == MATRIX + 4
  # Only the arrays in HBM (memory space 0): the VMEM copy does not count.
  vmem_and_hbm = "(f32[8,128]{1,0:T(8,128)S(1)}, f32[8,128]{1,0:T(8,128)})"
  assert traffic.array_bytes(vmem_and_hbm, hbm_only=True) == 8 * 128 * 4


def test_each_instruction_that_runs_is_charged_by_the_compilers_rules():
  found = by_name()
  # Free: parameters, constants, tuples, the loop itself; the reducer runs inside its fusion.
  assert set(found) == {"prefetch", "x.vmem", "h", "h.copy", "s", "w2", "lt", "out"}
  # An asynchronous copy: the start reads the source and writes (destination, source view),
  # the end writes the destination again; in HBM, the source once.
  assert (found["prefetch"].read, found["prefetch"].written) == (ACTIVATION, 2 * ACTIVATION + 4)
  assert (found["x.vmem"].read, found["x.vmem"].written) == (0, ACTIVATION)
  assert found["prefetch"].hbm == ACTIVATION and found["x.vmem"].hbm == 0
  # The fusion reads only the half its slice takes.
  assert (found["h"].read, found["h"].written) == (HALF, HALF)
  assert found["h"].hbm == HALF  # its input is in VMEM, its result in HBM
  assert found["w2"].bytes == 3 * MATRIX  # the loop body, once


def test_layer_kinds_come_from_the_scopes_and_from_a_copys_source():
  found = by_name()
  assert found["h"].kind == "ActNorm" and not found["h"].backward
  assert found["h.copy"].kind == "ActNorm"  # unnamed: its source's op_name
  assert found["h.copy"].moves and not found["h"].moves
  assert found["s"].kind == "optimizer and EMA update"
  assert found["w2"].kind == "coupling net" and found["w2"].backward
  assert found["prefetch"].kind == "other"  # the images are no layer
  assert traffic.layer_kind("state.opt_state[1][0].mu['level0_steps']") == "train state (copies)"
  assert traffic.layer_kind(
      "x/transpose(jvp(f))/level1_split.split/split_and_prior/mul") == "split and its prior"
  assert traffic.layer_kind("x/jvp(f)/top_prior.log_prob/top_prior_density/sub") == "top prior"
  assert traffic.layer_kind("", "all-reduce") == "gradient all-reduce"


def test_kinds_add_up_to_the_instructions():
  t = traffic.breakdown(HLO)
  assert t.total == sum(i.bytes for i in traffic.instructions(HLO))
  actnorm = t.kind("ActNorm")
  # The fusion, then the copy to a layout whose minor dimensions are (16, 64): 16 * 6 * 16 * 128.
  relaid = 16 * 6 * 16 * 128 * 4
  assert actnorm.forward == 2 * HALF + HALF + relaid and actnorm.backward == 0
  assert actnorm.moves == HALF + relaid
  assert t.kind("coupling net").backward == 3 * MATRIX
  assert [k.total for k in t.kinds] == sorted((k.total for k in t.kinds), reverse=True)
  assert t.largest[0].bytes == max(i.bytes for i in traffic.instructions(HLO))


def test_extrapolation_is_linear_in_the_steps_per_kind():
  def kinds(net: float, update: float) -> traffic.Traffic:
    return traffic.Traffic((traffic.KindBytes("coupling net", net, 2 * net, 0, net),
                            traffic.KindBytes("optimizer update", update, 0, 1, update)), ())
  one, two = kinds(10, 5), kinds(30, 6)
  at_32 = traffic.extrapolate(one, two, 32)
  net = at_32.kind("coupling net")
  assert (net.forward, net.backward, net.hbm) == (10 + 31 * 20, 20 + 31 * 40, 10 + 31 * 20)
  assert at_32.kind("optimizer update").total == 5 + 31 * 1
  assert at_32.kinds[0].kind == "coupling net"
  assert traffic.extrapolate(one, two, 1).total == one.total


def test_the_breakdown_prints_as_tables():
  text = traffic.render_traffic(traffic.breakdown(HLO), compiler_bytes=9e6, top=3)
  lines = text.splitlines()
  assert lines[0].startswith("memory traffic per step per device by layer kind, MB")
  assert "the TPU compiler's cost analysis: 9.000" in lines[0]
  assert lines[1] == ("| layer kind | forward | backward | total | share | of which copies | "
                      "in HBM |")
  assert any(line.startswith("| coupling net | 0.000 | 3.146 |") for line in lines)
  assert "largest 3 instructions of the compiled program:" in text


def _report(flops: float, gb: float, total_gib: float, temporaries_gib: float) -> AotReport:
  r = AotReport(config_name="c", topology="v5e:2x2", num_slices=1, num_devices=4,
                device_kind="TPU v5 lite", chip=CHIPS["v5e"], hbm_bytes=int(15.75 * GiB),
                per_device_batch=64, global_batch=256, num_train_steps=1, eval_batch=256,
                dtype="float32")
  temporaries = int(temporaries_gib * GiB)
  r.train = ProgramMemory(arguments=int(total_gib * GiB) - temporaries, outputs=0, aliased=0,
                          temporaries=temporaries, code=0)
  r.flops, r.bytes_accessed = flops, gb * 1e9
  return r


def test_compare_tables_the_variants_side_by_side():
  chosen = compare.variants(["store", "remat"], ["auto", "bfloat16"])
  assert [v.label for v in chosen] == ["store, float32", "store, bfloat16", "remat, float32",
                                       "remat, bfloat16"]
  results = [(chosen[0], _report(1496e9, 30.9, 4.05, 3.35)),
             (chosen[2], _report(1991e9, 25.2, 1.19, 0.5))]
  lines = compare.table(results).splitlines()
  assert lines[0].startswith("| variant | fits | GiB per device | temporaries GiB | GFLOP/step |")
  assert lines[2] == ("| store, float32 | yes | 4.05 | 3.35 | 1496 | 30.9 | 37.7 ms | 7.6 ms | "
                      "37.7 ms |")
  assert lines[3].startswith("| remat, float32 | yes | 1.19 | 0.50 | 1991 | 25.2 | 30.8 ms |")
  assert compare.traffic_table(results) == ""  # no breakdowns were made
  results[0][1].traffic = traffic.breakdown(HLO)
  rows = compare.traffic_table(results).splitlines()
  assert rows[0] == "| layer kind | store, float32 |"
  assert rows[-1].startswith("| total counted | ")


def test_a_config_variant_sets_memory_and_dtype_on_a_copy():
  from eiw_flow_jax.config.schema import base_config
  config = base_config()
  changed = compare.Variant("remat", "bfloat16").apply(config)
  assert (changed.model.memory, changed.model.dtype) == ("remat", "bfloat16")
  assert (config.model.memory, config.model.dtype) == ("store", "auto")
  config.model.backbone = "denseflow"
  assert compare.memory_modes(config) == ("store", "remat")


@pytest.mark.parametrize("memory, dtypes", [(["store", "fast"], ["auto"]), (["store"], ["f8"]),
                                            ([], ["auto"])])
def test_unknown_variants_are_an_error_naming_the_choices(memory, dtypes):
  with pytest.raises(AotError, match=r"takes names from .*, got \["):
    compare.variants(memory, dtypes)


def test_a_report_without_a_chip_has_no_roofline_cells():
  r = _report(1e9, 1.0, 1.0, 0.5)
  r.chip = None
  row = compare.table([(compare.Variant("store", "auto"), r)]).splitlines()[2]
  assert row.endswith("| n/a | n/a | n/a |") and not math.isnan(r.flops)
