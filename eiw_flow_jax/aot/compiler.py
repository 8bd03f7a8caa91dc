"""Lowering and compiling the train and eval steps for a topology: memory and cost per device."""

from __future__ import annotations

import math
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from eiw_flow_jax.aot import AotError, traffic
from eiw_flow_jax.aot.chips import GiB, chip_for
from eiw_flow_jax.aot.report import AotReport, ProgramMemory
from eiw_flow_jax.aot.topology import topology_devices
from eiw_flow_jax.config import checks
from eiw_flow_jax.model.flow import build_flow
from eiw_flow_jax.training import evaluate, optimizer, run_config, sharding, train_state, train_step

_OOM = re.compile(
    r"\(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)"
    r"|Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm"
)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": GiB, "T": 1024**4}


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


def _compute_dtype_name(config: ml_collections.ConfigDict) -> str:
  # "auto" computes in the inputs' dtype: the train step feeds float32 (dequantized images).
  dtype = str(config.model.get("dtype", "auto"))
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
  if not m.get("scan_steps", True) or m.get("backbone", "glow") != "glow":
    return 0  # DenseFlow scans only each unit's few coupling layers: see docs/tpu.md
  return int(m.steps_per_level)


def _unrolled_programs(config: ml_collections.ConfigDict, mesh: Any) -> list[Any]:
  """The train step compiled with its flow steps unrolled, at K=1 and K=2."""
  programs = []
  for k in (1, 2):
    unrolled = ml_collections.ConfigDict(config.to_dict())
    unrolled.model.steps_per_level = k
    unrolled.model.scan_steps = False
    programs.append(lower_train_step(unrolled, mesh).compile())
  return programs


def _unrolled_cost(config: ml_collections.ConfigDict, programs: list[Any]) -> tuple[float, float]:
  """(FLOPs, bytes accessed) per step at config's K, from the unrolled programs at K=1 and K=2."""
  costs = []
  for program in programs:
    cost = _cost(program)
    costs.append((float(cost.get("flops", math.nan)), float(cost.get("bytes accessed", math.nan))))
  (f1, b1), (f2, b2) = costs
  k = _scanned_steps(config)
  return f1 + (k - 1) * (f2 - f1), b1 + (k - 1) * (b2 - b1)


def lower_train_step(config: ml_collections.ConfigDict, mesh: Any) -> Any:
  """`train_step.make_train_step` lowered for `mesh` on abstract arguments (nothing allocated)."""
  flow = build_flow(config)
  tx = optimizer.make_optimizer(config)
  state = train_state.abstract_state(flow, tx, mesh)
  images = _abstract_batch((config.batch_size, *flow.image_shape), jnp.uint8, mesh)
  # The kernels are chosen per target platform (eiw_flow_jax.model.kernels): lowered for a TPU mesh,
  # the program holds the portable forms although this process's backend is the CPU.
  return train_step.make_train_step(config, flow, tx, mesh).lower(state, images)


def lower_eval_step(config: ml_collections.ConfigDict, mesh: Any) -> Any:
  """The eval step `evaluate.evaluate_bpd` runs (EMA variables, config.eval_batch_size images),
  lowered for `mesh` on abstract arguments."""
  flow = build_flow(config)
  state = train_state.abstract_state(flow, optimizer.make_optimizer(config), mesh)
  images = _abstract_batch((config.eval_batch_size, *flow.image_shape), jnp.uint8, mesh)
  mask = _abstract_batch((config.eval_batch_size,), jnp.bool_, mesh)
  key = jax.eval_shape(lambda: jax.random.fold_in(train_state.rng_keys(config)["eval"], 0))
  rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh))
  return evaluate._bpd_sum_fn(flow, mesh).lower(state.variables(ema=True), images, mask, rng)


def compile_for_topology(
    config: ml_collections.ConfigDict,
    topology: str,
    per_device_batch: int | None = None,
    *,
    num_slices: int = 1,
    with_eval: bool = True,
    config_name: str = "config",
    exact_cost: bool = True,
    with_traffic: bool = False,
) -> AotReport:
  """Compiles the train step (and the eval step) as `main` builds them, for `topology`.

  `per_device_batch` None keeps `config.batch_size` (split over the devices). Returns an
  `AotReport` also when the program does not fit (`fits` False, `error` the compiler's
  message). Raises AotError for a bad topology or config, or without libtpu.

  With `model.scan_steps` the compiler's cost analysis counts the scanned loop body once, not K
  times; `exact_cost` then finds FLOPs and bytes per step from two small unrolled compiles
  (K=1 and K=2: the cost is linear in K, each step costing the same), `_unrolled_cost`.
  `with_traffic`: also where the bytes go (`report.traffic`, `eiw_flow_jax.aot.traffic`), from
  the same programs as the cost.
  """
  devices = topology_devices(topology, num_slices)
  config, per_device = _configure(config, len(devices), per_device_batch)
  chip = chip_for(devices[0].device_kind)
  cores = int(getattr(devices[0], "num_cores", 1) or 1)
  usable = (chip.usable_gib_per_core * cores * GiB) if chip else math.nan
  report = AotReport(
      config_name=config_name, topology=topology, num_slices=num_slices,
      num_devices=len(devices), device_kind=devices[0].device_kind, chip=chip,
      hbm_bytes=int(usable) if chip else 0, per_device_batch=per_device,
      global_batch=config.batch_size, num_train_steps=int(config.num_train_steps),
      eval_batch=int(config.eval_batch_size),
      dtype=_compute_dtype_name(config), cores_per_device=cores,
  )
  mesh = sharding.make_mesh(devices)
  state = train_state.abstract_state(build_flow(config), optimizer.make_optimizer(config), mesh)
  report.state_bytes = {
      "params": _shard_bytes(state.params), "ema": _shard_bytes(state.ema_params),
      "optimizer": _shard_bytes(state.opt_state), "constants": _shard_bytes(state.constants),
  }
  started = time.perf_counter()
  try:
    compiled = lower_train_step(config, mesh).compile()
  except Exception as e:  # noqa: BLE001 - only the compiler's out-of-memory is an answer
    report.compile_seconds = time.perf_counter() - started
    _refused(report, e, "train step")
    return report
  report.compile_seconds = time.perf_counter() - started
  report.train = ProgramMemory.of(compiled)
  cost = _cost(compiled)
  report.flops = float(cost.get("flops", math.nan))
  report.bytes_accessed = float(cost.get("bytes accessed", math.nan))
  report.compiler_seconds = cost.get("optimal_seconds")
  if exact_cost and _scanned_steps(config) > 1:
    programs = _unrolled_programs(config, mesh)
    report.flops, report.bytes_accessed = _unrolled_cost(config, programs)
    report.cost_source = "unrolled K=1,2"
    if with_traffic:
      one, two = (traffic.breakdown(p.as_text()) for p in programs)
      report.traffic = traffic.extrapolate(one, two, _scanned_steps(config))
  elif with_traffic:
    report.traffic = traffic.breakdown(compiled.as_text())
  if with_eval:
    started = time.perf_counter()
    try:
      compiled = lower_eval_step(config, mesh).compile()
    except Exception as e:  # noqa: BLE001
      report.eval_compile_seconds = time.perf_counter() - started
      _refused(report, e, "eval step")
      return report
    report.eval_compile_seconds = time.perf_counter() - started
    report.eval = ProgramMemory.of(compiled)
    # Eval runs inside training: params and optimizer state stay allocated next to it.
    report.eval_resident_bytes = report.state_bytes["params"] + report.state_bytes["optimizer"]
  return report


def _refused(report: AotReport, error: Exception, program: str) -> None:
  """Records the compiler's out-of-memory refusal; re-raises any other error."""
  if not _is_oom(error):
    raise error
  report.error = f"{program}: " + " ".join(str(error).split())[:400]
  parsed = parse_oom(str(error))
  if parsed:
    report.required_bytes, report.hbm_bytes = parsed
