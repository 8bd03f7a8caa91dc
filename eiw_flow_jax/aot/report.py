"""What one ahead-of-time compile learned (`AotReport`) and how it is printed and tabled."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from eiw_flow_jax.aot.chips import ChipSpec, GiB
from eiw_flow_jax.aot.traffic import Traffic, render_traffic


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
  traffic: Traffic | None = None  # where the bytes go (`compile_for_topology(with_traffic=)`)

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


def render(report: AotReport, traffic_top: int = 15) -> str:
  """The report as printed by the command: one `name: value` per line (then the byte
  breakdown's tables, with its `traffic_top` largest instructions, if it was made)."""
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
  if r.traffic is not None:
    source = ("the unrolled K=1,2 programs, extrapolated" if r.cost_source != "compiler"
              else "the compiled program")
    lines.append(render_traffic(r.traffic, r.bytes_accessed, top=traffic_top, source=source))
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
