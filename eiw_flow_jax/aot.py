"""Ahead-of-time compiles for a TPU topology on any machine: memory per chip, cost, roofline.

  python -m eiw_flow_jax.aot --config=configs/cifar10.py --topology=v5e:4x4 \\
      [--per_device_batch=64] [--num_slices=2] [--max_batch_search=300] [--config.x=y ...]
  python -m eiw_flow_jax.aot --table configs/digits.py configs/cifar10.py \\
      --topology=v5e:2x2,v5p:2x2x1 [--per_device_batch=N]

The first thing to run before renting a slice. With `libtpu` installed (`pip install -e
".[tpu]"`), JAX compiles for a TPU topology without a TPU (`jax.experimental.topologies`): the
train step and the eval step are built exactly as `python -m eiw_flow_jax.main` builds them
(`train.make_train_step`, `train_state.abstract_state`, the same mesh and shardings) over a mesh of
the topology's devices, lowered on `jax.ShapeDtypeStruct`s (no array is allocated) and compiled
by the real TPU compiler, whose memory and cost analyses are printed: per device the arguments
(parameters, EMA, optimizer state), temporaries, outputs and total against the HBM the compiler
says is available, FLOPs and bytes per step, a roofline bound on the step time and images/s
from `CHIPS`, and (`--max_batch_search`) the largest per-device batch that fits. A config that
does not fit exits 1 with one line. `--table` prints a "before you rent" table over configs and
topologies: fits, GiB per device, step time and wall time to the config's step count.

The per-device batch defaults to the config's global batch split over the topology's devices
(what `main` would run there); `--per_device_batch` sets the global batch to N x devices.
Topology names are JAX's: `v4:2x2x1`, `v5e:2x2`, `v5p:2x2x1`, `v6e:4x4`, ...; `--num_slices`
compiles for several such slices joined by the data-center network (multi-slice).

Not covered: the data-dependent init (`train_state.create_state` runs `flow.init` on one device on
`init_batch_size` images before the first step), the input pipeline's host memory, and the
time of the gradient all-reduce over the interconnect (the roofline counts one device's
compute and HBM traffic only).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
  # The command compiles for a topology and never runs on local devices: JAX's CPU backend, so
  # that it neither probes nor takes the TPU chips of the machine it runs on (a TPU VM may be
  # training on them), before JAX is imported.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses
import importlib.util
import json
import math
import re
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags

from eiw_flow_jax import config_lib, evaluate, optimizer, sharding, train, train_state
from eiw_flow_jax.model import build_flow

GiB = 1024**3


# ----------------------------------------------------------------------------------------------
# Chips.


@dataclasses.dataclass(frozen=True)
class ChipSpec:
  """Published figures of one TPU chip, and what the TPU compiler says one device may use.

  `bf16_flops` is the published peak per chip. No fp32 peak is published for these chips;
  under JAX's default matmul precision float32 convolutions and matmuls run on the MXU as one
  bfloat16 pass, so the roofline uses the bf16 peak for float32 models too (with
  `jax_default_matmul_precision="highest"` they take several passes: slower).
  """

  name: str
  device_kind: str  # jax.Device.device_kind of its devices
  hbm: str  # per chip, as published (the pages write GiB for v4, GB for the others)
  hbm_bytes_per_s: float  # per chip, as published
  bf16_flops: float  # per chip, as published
  tensorcores: int  # per chip; a JAX device is one TensorCore or a whole chip (megacore)
  # HBM one device may use, per the TPU compiler's out-of-memory message (libtpu 0.0.42.1,
  # jax 0.10.2: "exceeds available HBM (15.75G)" for a v5e device); per device, not per chip.
  usable_gib_per_core: float
  source: str


# Sources: the Cloud TPU documentation's page of each version, table of key specifications
# (read 2026-12-03): https://cloud.google.com/tpu/docs/v4 ("Peak compute per chip 275
# teraflops (bf16 or int8)", "HBM2 capacity and bandwidth 32 GiB, 1200 GBps", two TensorCores
# per chip), https://cloud.google.com/tpu/docs/v5e ("Peak compute per chip (bf16) 197
# TFLOPs", "HBM2 capacity and bandwidth 16 GB, 819 GBps", one TensorCore),
# https://cloud.google.com/tpu/docs/v5p ("459 TFLOPs", "HBM2e capacity and bandwidth 95 GB,
# 2765 GBps"), https://cloud.google.com/tpu/docs/v6e ("918 TFLOPs", "HBM capacity per chip
# 32 GB", "HBM bandwidth per chip 1640 GBps", one TensorCore).
CHIPS = {
    "v4": ChipSpec("TPU v4", "TPU v4", "32 GiB", 1200e9, 275e12, 2, 15.25,
                   "https://cloud.google.com/tpu/docs/v4"),
    "v5e": ChipSpec("TPU v5e", "TPU v5 lite", "16 GB", 819e9, 197e12, 1, 15.75,
                    "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": ChipSpec("TPU v5p", "TPU v5", "95 GB", 2765e9, 459e12, 2, 95.74 / 2,
                    "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": ChipSpec("TPU v6e", "TPU v6 lite", "32 GB", 1640e9, 918e12, 1, 31.25,
                    "https://cloud.google.com/tpu/docs/v6e"),
}


def chip_for(device_kind: str) -> ChipSpec | None:
  for chip in CHIPS.values():
    if chip.device_kind == device_kind:
      return chip
  return None


class AotError(Exception):
  """Bad input the user can fix (topology, config, no libtpu); the CLI prints one line."""


# ----------------------------------------------------------------------------------------------
# Topologies.


def libtpu_available() -> bool:
  """Whether `libtpu` (the TPU compiler; `pip install -e ".[tpu]"`) is installed."""
  return importlib.util.find_spec("libtpu") is not None


def _quiet_libtpu_env() -> None:
  """Environment for loading libtpu only to compile (set before its first load).

  Several processes may compile at once (libtpu otherwise holds /tmp/libtpu_lockfile, meant for
  processes that own the chips). Off a TPU VM, libtpu looks for the VM's accelerator type and
  worker hostnames and prints several lines of warnings to stderr without them; these
  placeholders describe no TPU and only apply where there is none (no /dev/accel* or /dev/vfio).
  """
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  on_tpu_vm = any(os.path.exists(p) for p in ("/dev/accel0", "/dev/vfio/0"))
  if not on_tpu_vm and "TPU_ACCELERATOR_TYPE" not in os.environ:
    os.environ["TPU_ACCELERATOR_TYPE"] = "v5litepod-1"
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def topology_devices(topology: str, num_slices: int = 1) -> list[jax.Device]:
  """The devices of a TPU topology (`v5e:2x2`, `v4:2x2x1`, ...), `num_slices` of them."""
  if not libtpu_available():
    raise AotError(
        "compiling for a TPU topology needs libtpu: pip install -e \".[tpu]\" (jax[tpu] of the "
        f"installed jax {jax.__version__})."
    )
  if not re.fullmatch(r"[a-z0-9]+:\d+(x\d+)*", topology):
    raise AotError(
        f"--topology must look like v5e:2x2 or v4:2x2x1 (version:chips per axis), got "
        f"{topology!r}."
    )
  if num_slices < 1:
    raise AotError(f"--num_slices must be >= 1, got {num_slices}.")
  from jax.experimental import topologies  # noqa: PLC0415

  _quiet_libtpu_env()
  kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
  try:
    desc = topologies.get_topology_desc(topology_name=topology, platform="tpu", **kwargs)
  except Exception as e:  # noqa: BLE001 - libtpu's message for an unknown name says why
    detail = " ".join(str(e).split())[:300]
    raise AotError(f"TPU topology {topology!r} (num_slices={num_slices}): {detail}") from e
  return list(desc.devices)


# ----------------------------------------------------------------------------------------------
# One compile.


@dataclasses.dataclass(frozen=True)
class ProgramMemory:
  """The TPU compiler's buffer assignment for one compiled program, bytes per device."""

  arguments: int
  outputs: int
  aliased: int  # outputs that reuse donated argument buffers (the train state)
  temporaries: int
  code: int

  @property
  def total(self) -> int:
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

  @classmethod
  def of(cls, compiled: Any) -> ProgramMemory:
    stats = compiled.memory_analysis()
    return cls(
        arguments=int(stats.argument_size_in_bytes), outputs=int(stats.output_size_in_bytes),
        aliased=int(stats.alias_size_in_bytes), temporaries=int(stats.temp_size_in_bytes),
        code=int(stats.generated_code_size_in_bytes),
    )


@dataclasses.dataclass(frozen=True)
class BatchSearch:
  """The largest per-device batch that fits: `fits` does, `fails` (if known) does not."""

  fits: int | None
  fails: int | None
  compiles: int
  seconds: float

  @property
  def exact(self) -> bool:
    return self.fits is not None and self.fails is not None and self.fails == self.fits + 1


@dataclasses.dataclass
class AotReport:
  """What `compile_for_topology` learned; figures are per device unless named global."""

  config_name: str
  topology: str
  num_slices: int
  num_devices: int
  device_kind: str
  chip: ChipSpec | None
  hbm_bytes: int  # what one device may use (the compiler's figure)
  per_device_batch: int
  global_batch: int
  num_train_steps: int
  eval_batch: int
  dtype: str
  compile_seconds: float = math.nan
  train: ProgramMemory | None = None
  state_bytes: dict[str, int] = dataclasses.field(default_factory=dict)
  eval_compile_seconds: float | None = None
  eval: ProgramMemory | None = None
  eval_resident_bytes: int = 0  # train state that stays in HBM while the eval step runs
  flops: float = math.nan
  bytes_accessed: float = math.nan
  compiler_seconds: float | None = None  # the TPU compiler's own step-time estimate
  # How flops / bytes_accessed were found: "compiler" (the program's own cost analysis) or
  # "unrolled K=1,2" (extrapolated: the compiler counts a scanned loop body once).
  cost_source: str = "compiler"
  error: str | None = None  # the compiler's out-of-memory message, when it refused
  required_bytes: int | None = None  # what that message says the program needs
  batch_search: BatchSearch | None = None
  cores_per_device: int = 1  # TensorCores per JAX device (2 on megacore chips)

  @property
  def train_total(self) -> int | None:
    return self.train.total if self.train else self.required_bytes

  @property
  def eval_total(self) -> int | None:
    return self.eval.total + self.eval_resident_bytes if self.eval else None

  @property
  def peak_bytes(self) -> int | None:
    totals = [t for t in (self.train_total, self.eval_total) if t is not None]
    return max(totals) if totals else None

  @property
  def fits(self) -> bool:
    return self.error is None and self.peak_bytes is not None and self.peak_bytes <= self.hbm_bytes

  @property
  def devices_per_chip(self) -> int:
    return 1 if self.chip is None else max(1, self.chip.tensorcores // self.cores_per_device)

  @property
  def step_seconds(self) -> float | None:
    """Roofline lower bound: max(FLOPs / peak, bytes / HBM bandwidth), per device."""
    if self.chip is None or not math.isfinite(self.flops):
      return None
    share = self.devices_per_chip
    compute = self.flops / (self.chip.bf16_flops / share)
    memory = self.bytes_accessed / (self.chip.hbm_bytes_per_s / share)
    return max(compute, memory)

  @property
  def images_per_second(self) -> float | None:
    step = self.step_seconds
    return self.global_batch / step if step else None

  def one_line(self) -> str:
    """The line printed when the config does not fit."""
    need = self.peak_bytes
    needed = f"needs {need / GiB:.2f} GiB per device" if need else "does not fit"
    what = self.error or (
        f"train step {self.train_total / GiB:.2f} GiB" if self.train_total else "")
    if self.eval_total:
      what += f", eval step {self.eval_total / GiB:.2f} GiB with the train state resident"
    state = sum(self.state_bytes.values())
    if state > self.hbm_bytes:
      hint = (f"The train state alone (parameters, EMA, optimizer state) takes "
              f"{state / GiB:.2f} GiB per device: a smaller model, or chips with more HBM.")
    else:
      hint = ("Lower --per_device_batch, or use config.model.memory='remat' or 'invert', or "
              "config.model.dtype='bfloat16'.")
    return (
        f"error: does not fit: {self.config_name} at {self.per_device_batch} images per device "
        f"on {self.topology}{_slices(self.num_slices)} {needed}, the TPU compiler allows "
        f"{self.hbm_bytes / GiB:.2f} GiB ({what.rstrip('.')}). {hint}"
    )


def _slices(num_slices: int) -> str:
  return f" x {num_slices} slices" if num_slices > 1 else ""


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
    config_lib.validate_config(config, num_devices=num_devices)
  except config_lib.ConfigError as e:
    raise AotError(f"ConfigError: {e}") from e
  return config, config.batch_size // num_devices


def _scanned_steps(config: ml_collections.ConfigDict) -> int:
  """K where the program scans over K flow steps (whose cost the compiler counts once), else 0."""
  m = config.model
  if not m.get("scan_steps", True) or m.get("backbone", "glow") != "glow":
    return 0  # DenseFlow scans only each unit's few coupling layers: see docs/tpu.md
  return int(m.steps_per_level)


def _unrolled_cost(config: ml_collections.ConfigDict, mesh: Any) -> tuple[float, float]:
  """(FLOPs, bytes accessed) per step at config's K, from unrolled programs at K=1 and K=2."""
  costs = []
  for k in (1, 2):
    unrolled = ml_collections.ConfigDict(config.to_dict())
    unrolled.model.steps_per_level = k
    unrolled.model.scan_steps = False
    cost = _cost(lower_train_step(unrolled, mesh).compile())
    costs.append((float(cost.get("flops", math.nan)), float(cost.get("bytes accessed", math.nan))))
  (f1, b1), (f2, b2) = costs
  k = _scanned_steps(config)
  return f1 + (k - 1) * (f2 - f1), b1 + (k - 1) * (b2 - b1)


def lower_train_step(config: ml_collections.ConfigDict, mesh: Any) -> Any:
  """`train.make_train_step` lowered for `mesh` on abstract arguments (nothing allocated)."""
  flow = build_flow(config)
  tx = optimizer.make_optimizer(config)
  state = train_state.abstract_state(flow, tx, mesh)
  images = _abstract_batch((config.batch_size, *flow.image_shape), jnp.uint8, mesh)
  # The kernels are chosen per target platform (eiw_flow_jax.kernels): lowered for a TPU mesh,
  # the program holds the portable forms although this process's backend is the CPU.
  return train.make_train_step(config, flow, tx, mesh).lower(state, images)


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
) -> AotReport:
  """Compiles the train step (and the eval step) as `main` builds them, for `topology`.

  `per_device_batch` None keeps `config.batch_size` (split over the devices). Returns an
  `AotReport` also when the program does not fit (`fits` False, `error` the compiler's
  message). Raises AotError for a bad topology or config, or without libtpu.

  With `model.scan_steps` the compiler's cost analysis counts the scanned loop body once, not K
  times; `exact_cost` then finds FLOPs and bytes per step from two small unrolled compiles
  (K=1 and K=2: the cost is linear in K, each step costing the same), `_unrolled_cost`.
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
    report.flops, report.bytes_accessed = _unrolled_cost(config, mesh)
    report.cost_source = "unrolled K=1,2"
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


def largest_batch(
    config: ml_collections.ConfigDict,
    topology: str,
    report: AotReport,
    *,
    budget_s: float,
    num_slices: int = 1,
) -> BatchSearch:
  """The largest per-device batch whose train step fits, within about `budget_s` seconds.

  Starts from `report` (one compile at its batch), guesses from memory being affine in the
  batch (the state is fixed, activations grow with it), then bisects between a batch that fits
  and one that does not. A compile is started only while the time spent plus the last
  compile's time stays within the budget; the result says whether it is exact.
  """
  started = time.perf_counter()
  # batch -> total bytes (a refusal's from the compiler's message; None: refused, size unknown)
  seen: dict[int, int | None] = {}

  def record(r: AotReport) -> None:
    seen[r.per_device_batch] = r.train_total

  record(report)
  limit = report.hbm_bytes
  last = report.compile_seconds
  compiles, guessed = 0, 0

  def bracket() -> tuple[int | None, int | None]:
    fitting = [b for b, t in seen.items() if t is not None and t <= limit]
    lo = max(fitting) if fitting else None
    failing = [b for b, t in seen.items() if (t is None or t > limit) and (lo is None or b > lo)]
    return lo, min(failing, default=None)

  def estimate() -> int | None:
    """The batch where memory, affine in the batch, reaches the limit."""
    known = sorted((b, t) for b, t in seen.items() if t is not None)
    if len(known) >= 2:
      # The two closest to the limit: memory is only roughly affine over a wide range.
      b0, t0 = min(known, key=lambda bt: abs(bt[1] - limit))
      b1, t1 = min((bt for bt in known if bt[0] != b0), key=lambda bt: abs(bt[1] - limit))
      slope = (t1 - t0) / (b1 - b0)
    elif known:
      b0, t0 = known[0]
      slope = (t0 - sum(report.state_bytes.values())) / b0  # the state does not grow
    else:
      return None
    return int(b0 + (limit - t0) / slope) if slope > 0 else None

  while time.perf_counter() - started + last <= budget_s:
    lo, hi = bracket()
    if (lo is not None and hi is not None and hi <= lo + 1) or (lo is None and hi == 1):
      break
    guess = estimate()
    if lo is not None and hi is not None:
      # The estimate while it narrows the bracket; every third probe bisects, so that the
      # search ends in logarithmic time even when the memory is not affine in the batch.
      middle = (lo + hi) // 2
      batch = guess if guess is not None and lo < guess < hi and guessed < 2 else middle
      if guess == lo:
        batch = lo + 1
    elif lo is not None:
      batch = max(lo + 1, guess if guess is not None else 2 * lo)
    else:
      batch = max(1, min(hi - 1, guess if guess is not None else hi // 2))
    guessed = guessed + 1 if batch == guess else 0
    if batch in seen:
      break
    t0 = time.perf_counter()
    try:
      r = compile_for_topology(config, topology, batch, num_slices=num_slices, with_eval=False,
                               config_name=report.config_name, exact_cost=False)
    except AotError:  # e.g. a global batch the config cannot split: stop searching
      break
    last = time.perf_counter() - t0
    compiles += 1
    record(r)
  lo, hi = bracket()
  return BatchSearch(fits=lo, fails=hi, compiles=compiles, seconds=time.perf_counter() - started)


# ----------------------------------------------------------------------------------------------
# Output.


def report_dict(report: AotReport) -> dict[str, Any]:
  """The report as JSON-ready values, with the derived figures (totals, fits, roofline)."""
  out = dataclasses.asdict(report)
  out.update(
      train_total=report.train_total, eval_total=report.eval_total,
      peak_bytes=report.peak_bytes, fits=report.fits, step_seconds=report.step_seconds,
      images_per_second=report.images_per_second, devices_per_chip=report.devices_per_chip,
  )
  return out


def _gib(n: int | float | None) -> str:
  return "n/a" if n is None else f"{n / GiB:.3f}"


def _duration(seconds: float | None) -> str:
  if seconds is None or not math.isfinite(seconds):
    return "n/a"
  if seconds < 1e-3:
    return f"{seconds * 1e6:.0f} us"
  if seconds < 1:
    return f"{seconds * 1e3:.1f} ms"
  if seconds < 120:
    return f"{seconds:.1f} s"
  hours = seconds / 3600
  return f"{hours:.1f} h" if hours >= 1 else f"{seconds / 60:.0f} min"


def render(report: AotReport) -> str:
  """The report as printed by the command: one `name: value` per line."""
  r = report
  chip = r.chip
  lines = [
      f"config: {r.config_name}",
      f"topology: {r.topology}{_slices(r.num_slices)} ({r.num_devices} devices, "
      f"{r.device_kind}{f', {r.devices_per_chip} per chip' if r.devices_per_chip > 1 else ''})",
      f"batch: {r.per_device_batch} per device, {r.global_batch} global; coupling networks "
      f"{r.dtype}",
      f"compile time: train step {r.compile_seconds:.1f} s"
      + (f", eval step {r.eval_compile_seconds:.1f} s" if r.eval_compile_seconds else ""),
  ]
  if r.train is not None:
    s, m = r.state_bytes, r.train
    lines += [
        "memory per device (GiB, TPU compiler):",
        f"  arguments: {_gib(m.arguments)} (params {_gib(s['params'])}, EMA {_gib(s['ema'])}, "
        f"optimizer state {_gib(s['optimizer'])}, constants {_gib(s['constants'])})",
        f"  temporaries: {_gib(m.temporaries)}",
        f"  outputs: {_gib(m.outputs)} ({_gib(m.aliased)} of them in the donated arguments' "
        "buffers)",
        f"  code: {_gib(m.code)}",
        f"  train step total: {_gib(m.total)}",
    ]
    if r.eval is not None:
      lines.append(f"  eval step total: {_gib(r.eval_total)} ({r.eval_batch // r.num_devices} "
                   "images per device; params and optimizer state stay resident)")
  if chip is not None:
    peak = r.peak_bytes or 0
    lines.append(
        f"  HBM: {_gib(r.hbm_bytes)} per device (the TPU compiler's limit; {chip.name}: "
        f"{chip.hbm} per chip published), headroom {_gib(r.hbm_bytes - peak)} "
        f"({100 * (r.hbm_bytes - peak) / r.hbm_bytes:.0f}%)"
    )
  if r.train is not None:
    lines.append(f"cost per step per device: {r.flops / 1e9:.2f} GFLOP, "
                 f"{r.bytes_accessed / 1e9:.3f} GB accessed (TPU compiler"
                 + ("" if r.cost_source == "compiler" else
                    f"; scanned steps: {r.cost_source}, extrapolated") + ")")
  step = r.step_seconds
  if step is not None and chip is not None:
    share = r.devices_per_chip
    compute = r.flops / (chip.bf16_flops / share)
    memory = r.bytes_accessed / (chip.hbm_bytes_per_s / share)
    lines.append(
        f"roofline: step >= {_duration(step)} (compute {_duration(compute)} at "
        f"{chip.bf16_flops / share / 1e12:g} TFLOP/s bf16, HBM traffic {_duration(memory)} at "
        f"{chip.hbm_bytes_per_s / share / 1e9:g} GB/s), <= {r.images_per_second:.0f} images/s; "
        f"{r.num_train_steps} steps >= {_duration(step * r.num_train_steps)} "
        f"(figures: {chip.source})"
    )
    if r.compiler_seconds and r.compiler_seconds > 0:  # libtpu sometimes gives a negative one
      lines.append(f"compiler's estimate: {_duration(float(r.compiler_seconds))} per step")
  search = r.batch_search
  if search is not None:
    if search.fits is None:
      found = f"none found (the smallest tried, {search.fails}, does not fit)"
    elif search.exact:
      found = f"{search.fits} ({search.fails} does not)"
    elif search.fails is None:
      found = f"at least {search.fits} (no larger batch tried within --max_batch_search)"
    else:
      found = (f"at least {search.fits}, less than {search.fails} (--max_batch_search ran out "
               "before the bisection ended)")
    lines.append(f"largest per-device batch that fits: {found}; {search.compiles} more compiles "
                 f"in {search.seconds:.0f} s")
  lines.append(f"fits: {'yes' if r.fits else 'no'}")
  return "\n".join(lines)


TABLE_HEADER = ("config", "topology", "batch/device", "fits", "GiB/device", "HBM GiB",
                "step (roofline)", "steps", "wall time (roofline)")


def table_row(report: AotReport) -> tuple[str, ...]:
  step = report.step_seconds
  return (
      report.config_name, report.topology + _slices(report.num_slices),
      str(report.per_device_batch), "y" if report.fits else "n",
      f"{report.peak_bytes / GiB:.2f}" if report.peak_bytes else "n/a",
      f"{report.hbm_bytes / GiB:.2f}",
      _duration(step) if report.fits else "n/a", str(report.num_train_steps),
      _duration(step * report.num_train_steps) if report.fits and step else "n/a",
  )


def markdown_table(rows: Sequence[Sequence[str]]) -> str:
  lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + " --- |" * len(TABLE_HEADER)]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines)


def load_config(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file (configs/<name>.py)."""
  if not os.path.isfile(path):
    raise AotError(f"config file {path!r} not found.")
  spec = importlib.util.spec_from_file_location("_aot_config", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    return module.get_config()
  except Exception as e:  # noqa: BLE001 - a broken config file is the user's to fix
    raise AotError(f"cannot load {path}: {type(e).__name__}: {e}") from e


# ----------------------------------------------------------------------------------------------
# Command line.

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if __name__ == "__main__":
  from ml_collections import config_flags

  _CONFIG = config_flags.DEFINE_config_file(
      "config", os.path.join(_REPO_ROOT, "configs", "digits.py"),
      "Config file (configs/<name>.py); override fields with --config.<field>=<value>.",
      lock_config=True,
  )
  _TOPOLOGY = flags.DEFINE_list(
      "topology", ["v5e:2x2"],
      "TPU topology as JAX names it: v5e:2x2, v5e:4x4, v4:2x2x1, v5p:2x2x1, v6e:2x4, ... "
      "(several, comma-separated, with --table).")
  _NUM_SLICES = flags.DEFINE_integer(
      "num_slices", 1, "Slices of that topology joined by the data-center network (multi-slice).")
  _PER_DEVICE_BATCH = flags.DEFINE_integer(
      "per_device_batch", None,
      "Images per device per step (global batch = this x devices); default: the config's "
      "batch_size split over the topology's devices.")
  _EVAL = flags.DEFINE_bool("eval", True, "Also compile the eval step (test bits/dim).")
  _EXACT_COST = flags.DEFINE_bool(
      "exact_cost", True,
      "With scanned flow steps (model.scan_steps), find FLOPs and bytes per step from two "
      "small unrolled compiles (K=1, 2): the compiler counts a scanned loop body once.")
  _MAX_BATCH_SEARCH = flags.DEFINE_float(
      "max_batch_search", 0.0,
      "Seconds to spend finding the largest per-device batch that fits (a few compiles, each "
      "as long as the first); 0: do not search.")
  _JSON = flags.DEFINE_string("json", None, "Also write the report (or the table's) as JSON here.")
  _TABLE = flags.DEFINE_bool(
      "table", False,
      "A 'before you rent' table over the config files given as arguments and every "
      "--topology: fits, GiB per device, roofline step time and wall time to num_train_steps.")


def _fail(message: str, code: int = 1) -> None:
  print(message, file=sys.stderr, flush=True)
  sys.exit(code)


def _write_json(value: Any) -> None:
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(value, f, indent=2, default=str)


def _run_one(config, name: str, topology: str) -> AotReport:
  report = compile_for_topology(
      config, topology, _PER_DEVICE_BATCH.value, num_slices=_NUM_SLICES.value,
      with_eval=_EVAL.value, config_name=name, exact_cost=_EXACT_COST.value,
  )
  return report


def main(argv: list[str]) -> None:
  # JAX's persistent compilation cache writes these executables but cannot read them back
  # without a TPU client (a warning, then a recompile): off for this command.
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    if _TABLE.value:
      if len(argv) < 2:
        raise app.UsageError("--table needs config files: --table configs/a.py configs/b.py")
      rows, reports = [], []
      for path in argv[1:]:
        config = load_config(path)
        for topology in _TOPOLOGY.value:
          report = _run_one(config, path, topology)
          rows.append(table_row(report))
          reports.append(report_dict(report))
          print(f"{path} on {topology}: {'fits' if report.fits else 'does not fit'} "
                f"(compiled in {report.compile_seconds:.0f} s)", file=sys.stderr, flush=True)
      print(markdown_table(rows), flush=True)
      _write_json(reports)
      return
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]} (config files go with --table)")
    if len(_TOPOLOGY.value) != 1:
      raise AotError(f"give one --topology without --table, got {_TOPOLOGY.value}.")
    name = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")),
                "configs/digits.py")
    report = _run_one(_CONFIG.value, name, _TOPOLOGY.value[0])
    if not report.fits:
      _write_json(report_dict(report))
      _fail(report.one_line())
    if _MAX_BATCH_SEARCH.value > 0:
      report.batch_search = largest_batch(
          _CONFIG.value, report.topology, report, budget_s=_MAX_BATCH_SEARCH.value,
          num_slices=_NUM_SLICES.value,
      )
    print(render(report), flush=True)
    _write_json(report_dict(report))
  except AotError as e:
    _fail(f"error: {e}")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing; a bad flag, config path or --config.<field> is one line."""
  try:
    rest = flags.FLAGS(argv)
    _CONFIG.value.get("model")  # a missing or broken config file surfaces on first use
  except flags.Error as e:
    _fail(f"error: {e}\nPass --help for the flags.")
  except (AttributeError, KeyError, OSError, ImportError, SyntaxError) as e:
    detail = " ".join(str(e).split())[:300]
    _fail(f"error: ConfigError: --config or a --config.<field> override: {detail}")
  return rest


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
