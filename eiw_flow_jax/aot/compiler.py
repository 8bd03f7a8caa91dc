"""Lowering and compiling the train and eval steps for a topology: memory and cost per device."""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from eiw_flow_jax.aot import AotError, loop_cost, traffic
from eiw_flow_jax.aot.chips import GiB
from eiw_flow_jax.aot.report import (
    COST_LOOPS,
    COST_LOOPS_APPROXIMATE,
    COST_UNROLLED,
    AotReport,
    ProgramMemory,
)
from eiw_flow_jax.aot.topology import resolve
from eiw_flow_jax.config import checks
from eiw_flow_jax.training import run_config, sharding, train_state
from eiw_flow_jax.training.compiler_options import compiler_options
from eiw_flow_jax.training.run import Run

_OOM = re.compile(
    r"\(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)"
    r"|Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm"
)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": GiB, "T": 1024**4}
# An array type in HLO text, `f32[64,32,32,512]`: its element type and dimensions.
_HLO_ARRAY = re.compile(r"\b[a-z]+(\d*)[a-z0-9]*\[([\d,]*)\]")
# The cuDNN and cuBLAS calls of a compiled GPU program, whose cost XLA's analysis leaves out.
_LIBRARY_CALL = re.compile(r'custom_call_target="(__cudnn\$[^"]*|__cublas[^"]*)"')


def parse_oom(message: str) -> tuple[int, int] | None:
  """(bytes required, bytes available) from the TPU compiler's out-of-memory message."""
  match = _OOM.search(message)
  if not match:
    return None
  groups = [g for g in match.groups() if g is not None]
  need, avail = (float(groups[0]) * _UNITS[groups[1]], float(groups[2]) * _UNITS[groups[3]])
  return int(need), int(avail)


def _is_oom(error: Exception) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text


def _abstract_batch(shape: tuple[int, ...], dtype: Any, mesh: Any) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh))


def _shard_bytes(tree: Any) -> int:
  return int(sum(
      math.prod(leaf.sharding.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
      for leaf in jax.tree.leaves(tree)
  ))


def _cost(compiled: Any) -> dict[str, float]:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  return dict(cost or {})


def _hlo_cost(module: Any) -> dict[str, float]:
  """XLA's cost analysis (`HloCostAnalysis`) of an HLO module, run by the CPU client: what
  `Lowered.cost_analysis` does, for modules whose own (compile-only GPU) client has none."""
  from jax._src.lib import _jax  # noqa: PLC0415 - jax exposes this analysis only privately

  return dict(_jax.hlo_module_cost_analysis(jax.local_devices(backend="cpu")[0].client, module))


def _array_bytes(hlo_text: str) -> int:
  """Bytes of every array type written in `hlo_text`: f32[2,3] is 24 (pred, one per element)."""
  return sum(max(1, int(bits or 8) // 8) * math.prod(int(d) for d in dims.split(",") if d)
             for bits, dims in _HLO_ARRAY.findall(hlo_text))


def library_calls(hlo_text: str) -> dict[str, int]:
  """The cuDNN and cuBLAS calls of a compiled GPU program's text, by call target, with `3x3`
  appended to a convolution's target when its window is 3x3."""
  calls: dict[str, int] = {}
  for line in hlo_text.splitlines():
    match = _LIBRARY_CALL.search(line)
    if match:
      name = match.group(1) + (" 3x3" if "window={size=3x3" in line else "")
      calls[name] = calls.get(name, 0) + 1
  return calls


def _gpu_flops_module(config: ml_collections.ConfigDict, mesh: Any) -> Any:
  """One device's train step as an HLO module, lowered for one GPU of the mesh at the
  per-device batch: what its FLOPs are counted on (before XLA's GPU passes turn convolutions
  into cuDNN calls, which its cost analysis does not count)."""
  per_device = ml_collections.ConfigDict(config.to_dict())
  per_device.batch_size = config.batch_size // mesh.devices.size
  lowered = lower_train_step(per_device, sharding.make_mesh(list(mesh.devices.flat)[:1]))
  return lowered.compiler_ir("hlo").as_hlo_module()


def _module_flops(module: Any) -> float:
  """FLOPs of an HLO module by XLA's cost analysis, each loop body once."""
  return float(_hlo_cost(module).get("flops", math.nan))


def _gpu_flops(config: ml_collections.ConfigDict, mesh: Any) -> float:
  """FLOPs of one device's train step (`_gpu_flops_module`), each loop body once."""
  return _module_flops(_gpu_flops_module(config, mesh))


def _gpu_bytes(compiled: Any) -> float:
  """Bytes accessed per step by one GPU's compiled program: XLA's cost analysis (its fusions,
  copies and collectives) plus the operands and results of its cuDNN and cuBLAS calls."""
  from jax._src.lib import xla_client  # noqa: PLC0415

  options = xla_client.hlo.HloPrintOptions.short_parsable()
  options.print_operand_shape = True
  total = 0.0
  for module in compiled.runtime_executable().hlo_modules():
    total += max(0.0, _hlo_cost(module).get("bytes accessed", 0.0))
    text = module.to_string(options)
    total += sum(_array_bytes(line.split("custom_call_target=")[0])
                 for line in text.splitlines() if _LIBRARY_CALL.search(line))
  return total


def _gpu_cost(config: ml_collections.ConfigDict, mesh: Any, compiled: Any,
              counts_loops: bool) -> tuple[float, float, loop_cost.WeightedCost | None]:
  """(FLOPs, bytes, their loop-weighted count or None) per GPU per step. The FLOPs are
  counted on the lowered one-GPU program (`_gpu_flops_module`), the bytes on the compiled one
  (`_gpu_bytes`); with `counts_loops`, each program's loops are weighted by their trip counts
  (`loop_cost`) and the two counts joined: FLOPs from the first, bytes and loops from the
  second (the compiled program's loops are the ones that run)."""
  module = _gpu_flops_module(config, mesh)
  flops = _module_flops(module)
  bytes_accessed = _gpu_bytes(compiled)
  if not counts_loops:
    return flops, bytes_accessed, None
  by_flops = loop_cost.weighted_cost(loop_cost.Program.parse(module.to_string()), flops, 0.0)
  by_bytes = loop_cost.weighted_cost(
      loop_cost.Program.parse(compiled.as_text()), 0.0, bytes_accessed)
  return flops, bytes_accessed, dataclasses.replace(
      by_bytes, flops=by_flops.flops, exact=by_flops.exact and by_bytes.exact,
      compiler_flops=by_flops.compiler_flops, flops_counted_once=by_flops.flops_counted_once)


def _step_cost(config: ml_collections.ConfigDict, mesh: Any, compiled: Any) -> tuple[float, float]:
  """(FLOPs, bytes accessed) per device of the compiled train step: the compiler's own cost
  analysis on a TPU; on a GPU, whose compiled program has none, `_gpu_flops` and `_gpu_bytes`."""
  if sharding.mesh_platform(mesh) == "gpu":
    return _gpu_flops(config, mesh), _gpu_bytes(compiled)
  cost = _cost(compiled)
  return float(cost.get("flops", math.nan)), float(cost.get("bytes accessed", math.nan))


def _compute_dtype_name(config: ml_collections.ConfigDict) -> str:
  # "auto" computes in the inputs' dtype: the train step feeds float32 (dequantized images).
  dtype = str(config.model.dtype)
  return "float32" if dtype == "auto" else dtype


def _configure(
    config: ml_collections.ConfigDict, num_devices: int, per_device_batch: int | None
) -> tuple[ml_collections.ConfigDict, int]:
  config = ml_collections.ConfigDict(config.to_dict())  # a copy: the caller's is not changed
  if per_device_batch is not None:
    if per_device_batch < 1:
      raise AotError(f"--per_device_batch must be >= 1, got {per_device_batch}.")
    config.batch_size = per_device_batch * num_devices
  try:
    run_config.validate_config(config, num_devices=num_devices)
  except checks.ConfigError as e:
    raise AotError(f"ConfigError: {e}") from e
  return config, config.batch_size // num_devices


def _scanned_steps(config: ml_collections.ConfigDict) -> int:
  """K where the program scans over K flow steps (whose cost the compiler counts once), else 0."""
  m = config.model
  if not m.scan_steps or m.backbone != "glow":
    # DenseFlow scans its units and their layers and has no K to extrapolate in: its loops are
    # counted by their trip counts instead (`loop_cost`).
    return 0
  return int(m.steps_per_level)


def _unrolled_programs(
    config: ml_collections.ConfigDict, mesh: Any
) -> list[tuple[ml_collections.ConfigDict, Any]]:
  """The train step compiled with its flow steps unrolled, at K=1 and K=2, with their configs."""
  programs = []
  for k in (1, 2):
    unrolled = ml_collections.ConfigDict(config.to_dict())
    unrolled.model.steps_per_level = k
    unrolled.model.scan_steps = False
    programs.append((unrolled, lower_train_step(unrolled, mesh).compile()))
  return programs


def _unrolled_cost(config: ml_collections.ConfigDict, mesh: Any,
                   programs: list[tuple[ml_collections.ConfigDict, Any]]) -> tuple[float, float]:
  """(FLOPs, bytes accessed) per step at config's K, from the unrolled programs at K=1 and K=2."""
  costs = [_step_cost(unrolled, mesh, program) for unrolled, program in programs]
  (f1, b1), (f2, b2) = costs
  k = _scanned_steps(config)
  return f1 + (k - 1) * (f2 - f1), b1 + (k - 1) * (b2 - b1)


def lower_train_step(config: ml_collections.ConfigDict, mesh: Any) -> Any:
  """The train step as `main` builds it (`Run.train_step`), lowered for `mesh` on abstract
  arguments (nothing allocated)."""
  return _lower_train_step(Run.build(config, mesh))


def lower_eval_step(config: ml_collections.ConfigDict, mesh: Any) -> Any:
  """The eval step `evaluate.evaluate_bpd` runs (`Run.eval_step`: EMA variables,
  config.eval_batch_size images), lowered for `mesh` on abstract arguments."""
  return _lower_eval_step(Run.build(config, mesh))


def _lower_train_step(run: Run) -> Any:
  images = _abstract_batch(
      (run.config.batch_size, *run.flow.image_shape), jnp.uint8, run.mesh)
  # The kernels are chosen per target platform (eiw_flow_jax.model.kernels): lowered for a TPU
  # mesh, the program holds the portable forms although this process's backend is the CPU.
  return run.train_step().lower(run.abstract_state, images)


def _lower_eval_step(run: Run) -> Any:
  batch, mesh = run.config.eval_batch_size, run.mesh
  images = _abstract_batch((batch, *run.flow.image_shape), jnp.uint8, mesh)
  mask = _abstract_batch((batch,), jnp.bool_, mesh)
  key = jax.eval_shape(lambda: jax.random.fold_in(train_state.rng_keys(run.config)["eval"], 0))
  rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh))
  return run.eval_step().lower(run.abstract_state.variables(ema=True), images, mask, rng)


def compile_for_topology(
    config: ml_collections.ConfigDict,
    topology: str,
    per_device_batch: int | None = None,
    *,
    num_slices: int = 1,
    with_eval: bool = True,
    config_name: str = "config",
    exact_cost: bool = True,
    with_cost: bool = True,
    with_traffic: bool = False,
) -> AotReport:
  """Compiles the train step (and the eval step) as `main` builds them, for `topology`.

  `per_device_batch` None keeps `config.batch_size` (split over the devices). Returns an
  `AotReport` also when the program does not fit (`fits` False, `error` the compiler's
  message, or on a GPU, whose compiler does not refuse, more memory than JAX's allocator may
  use). Raises AotError for a bad topology or config, or without the compiler (libtpu, or
  the CUDA plugin for a GPU topology: `topology.resolve`).

  With `model.scan_steps` the compiler's cost analysis counts the scanned loop body once, not K
  times; `exact_cost` then finds FLOPs and bytes per step from two small unrolled compiles
  (K=1 and K=2: the cost is linear in K, each step costing the same), `_unrolled_cost`.
  `with_cost` False leaves FLOPs and bytes out (NaN). `with_traffic` (TPU only): also where the
  bytes go (`report.traffic`, `eiw_flow_jax.aot.traffic`), from the same programs as the cost.
  `report.total_seconds` is the whole call, every compile in it.
  """
  started = time.perf_counter()
  report = _compile_and_analyse(
      config, topology, per_device_batch, num_slices=num_slices, with_eval=with_eval,
      config_name=config_name, exact_cost=exact_cost, with_cost=with_cost,
      with_traffic=with_traffic)
  report.total_seconds = time.perf_counter() - started
  return report


def _compile_and_analyse(
    config: ml_collections.ConfigDict, topology: str, per_device_batch: int | None, *,
    num_slices: int, with_eval: bool, config_name: str, exact_cost: bool, with_cost: bool,
    with_traffic: bool,
) -> AotReport:
  """`compile_for_topology` but for the call's total time."""
  target = resolve(topology, num_slices)
  devices = target.devices
  if with_traffic and target.platform != "tpu":
    raise AotError(f"--traffic reads TPU programs (their memory spaces and layouts); "
                   f"{topology} is a {target.platform.upper()} topology.")
  config, per_device = _configure(config, len(devices), per_device_batch)
  report = AotReport(
      config_name=config_name, topology=topology, num_slices=num_slices,
      num_devices=len(devices), device_kind=devices[0].device_kind, chip=target.chip,
      hbm_bytes=target.usable_bytes or 0, per_device_batch=per_device,
      global_batch=config.batch_size, num_train_steps=int(config.num_train_steps),
      eval_batch=int(config.eval_batch_size),
      dtype=_compute_dtype_name(config),
      compiler_options=dict(compiler_options(config)),
      cores_per_device=int(getattr(devices[0], "num_cores", 1) or 1),
      platform=target.platform, hosts=target.hosts, memory_fraction=target.memory_fraction,
  )
  mesh = sharding.make_mesh(devices)
  run = Run.build(config, mesh)
  state = run.abstract_state
  report.state_bytes = {
      "params": _shard_bytes(state.params), "ema": _shard_bytes(state.ema_params),
      "optimizer": _shard_bytes(state.opt_state), "constants": _shard_bytes(state.constants),
  }
  compiled, report.compile_seconds = _timed_compile(
      lambda: _lower_train_step(run), report, "train step")
  if compiled is None:
    return report
  report.train = ProgramMemory.of(compiled)
  if target.platform == "gpu":
    report.library_calls = library_calls(compiled.as_text())
  report.compiler_seconds = _cost(compiled).get("optimal_seconds")
  started = time.perf_counter()
  if (with_cost or with_traffic) and exact_cost and _scanned_steps(config) > 1:
    programs = _unrolled_programs(config, mesh)
    report.flops, report.bytes_accessed = _unrolled_cost(config, mesh, programs)
    report.cost_source = COST_UNROLLED
    if with_traffic:
      one, two = (traffic.breakdown(program.as_text()) for _, program in programs)
      report.traffic = traffic.extrapolate(one, two, _scanned_steps(config))
  elif with_cost or with_traffic:
    # Loops the compiler counts once (DenseFlow's scanned units and layers, a linear solve's)
    # counted as often as they run. (Glow's scanned steps keep their own rule: the unrolled
    # compiles, or with `exact_cost` False the compiler's count.)
    counts_loops = _scanned_steps(config) <= 1
    if target.platform == "gpu":
      report.flops, report.bytes_accessed, weighted = _gpu_cost(
          config, mesh, compiled, counts_loops)
    else:
      report.flops, report.bytes_accessed = _step_cost(config, mesh, compiled)
      text = compiled.as_text()
      program = loop_cost.Program.parse(text) if counts_loops else None
      weighted = (loop_cost.weighted_cost(program, report.flops, report.bytes_accessed)
                  if program is not None else None)
      if with_traffic:
        report.traffic = (traffic.Traffic.of(program.instructions) if program is not None
                          else traffic.breakdown(text))
    if weighted is not None and weighted.loops:
      report.loop_cost = weighted
      report.flops, report.bytes_accessed = weighted.flops, weighted.bytes_accessed
      report.cost_source = COST_LOOPS if weighted.exact else COST_LOOPS_APPROXIMATE
  report.cost_seconds = time.perf_counter() - started
  if with_eval:
    compiled, report.eval_compile_seconds = _timed_compile(
        lambda: _lower_eval_step(run), report, "eval step")
    if compiled is None:
      return report
    report.eval = ProgramMemory.of(compiled)
    # Eval runs inside training: params and optimizer state stay allocated next to it.
    report.eval_resident_bytes = report.state_bytes["params"] + report.state_bytes["optimizer"]
  return report


def _timed_compile(lower: Any, report: AotReport, program: str) -> tuple[Any | None, float]:
  """(`lower()` compiled, or None where the compiler refused it for memory (recorded in
  `report`), seconds taken)."""
  started = time.perf_counter()
  try:
    compiled = lower().compile()
  except Exception as e:  # noqa: BLE001 - only the compiler's out-of-memory is an answer
    _refused(report, e, program)
    compiled = None
  return compiled, time.perf_counter() - started


def _refused(report: AotReport, error: Exception, program: str) -> None:
  """Records the compiler's out-of-memory refusal; re-raises any other error."""
  if not _is_oom(error):
    raise error
  report.error = f"{program}: " + " ".join(str(error).split())[:400]
  parsed = parse_oom(str(error))
  if parsed:
    report.required_bytes, report.hbm_bytes = parsed
