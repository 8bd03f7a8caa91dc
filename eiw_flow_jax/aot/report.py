"""What one ahead-of-time compile learned (`AotReport`) and how it is printed and tabled."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from eiw_flow_jax.aot.chips import DEFAULT_GPU_MEMORY_FRACTION, ChipSpec, GiB, GpuSpec
from eiw_flow_jax.aot.loop_cost import WeightedCost
from eiw_flow_jax.aot.traffic import Traffic, render_traffic

# How a report's FLOPs and bytes were found (`AotReport.cost_source`).
COST_COMPILER = "compiler"  # the compiled program's own cost analysis: it holds no loops
# Glow's scanned flow steps: two more compiles with the steps unrolled, at K=1 and K=2,
# extrapolated to K (the compiler counts a loop body once).
COST_UNROLLED = "unrolled K=1,2"
# The compiler's count plus each loop body's instructions times its runs beyond the first
# (`loop_cost`): every loop's trip count read from the program.
COST_LOOPS = "loops counted by their trip counts"
COST_LOOPS_APPROXIMATE = ("loops counted by their trip counts, approximately (a loop of unknown "
                          "trip count once, or each branch of a conditional in a loop)")


@dataclasses.dataclass(frozen=True)
class ProgramMemory:
  """The compiler's buffer assignment for one compiled program, bytes per device."""

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
  budget_s: float = math.nan
  # The longest compile seen (the report's own included): what one more compile would take.
  compile_seconds: float = math.nan

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
  chip: ChipSpec | GpuSpec | None
  # What one device may use: the TPU compiler's limit; on a GPU, JAX's allocator's share.
  hbm_bytes: int
  per_device_batch: int
  global_batch: int
  num_train_steps: int
  eval_batch: int
  dtype: str
  compile_seconds: float = math.nan
  # The XLA options the steps were compiled with (`config.compiler`); empty: XLA's defaults.
  compiler_options: dict[str, float] = dataclasses.field(default_factory=dict)
  train: ProgramMemory | None = None
  state_bytes: dict[str, int] = dataclasses.field(default_factory=dict)
  eval_compile_seconds: float | None = None
  eval: ProgramMemory | None = None
  eval_resident_bytes: int = 0  # train state that stays in HBM while the eval step runs
  flops: float = math.nan
  bytes_accessed: float = math.nan
  compiler_seconds: float | None = None  # the TPU compiler's own step-time estimate
  # Seconds spent finding FLOPs and bytes (with scanned steps: two more compiles, K=1 and 2).
  cost_seconds: float = 0.0
  total_seconds: float = math.nan  # the whole `compile_for_topology` call, every compile in it
  # How flops / bytes_accessed were found: COST_COMPILER, COST_UNROLLED, COST_LOOPS or
  # COST_LOOPS_APPROXIMATE (below).
  cost_source: str = COST_COMPILER
  error: str | None = None  # the compiler's out-of-memory message, when it refused
  required_bytes: int | None = None  # what that message says the program needs
  batch_search: BatchSearch | None = None
  cores_per_device: int = 1  # TensorCores per JAX device (2 on megacore chips)
  platform: str = "tpu"  # or "gpu"
  hosts: int = 1  # processes of the topology, one per host
  memory_fraction: float | None = None  # GPU: the share of its memory JAX's allocator takes
  # GPU: the compiled train step's cuDNN and cuBLAS calls by target (`compiler.library_calls`).
  library_calls: dict[str, int] | None = None
  traffic: Traffic | None = None  # where the bytes go (`compile_for_topology(with_traffic=)`)
  # The loops of a program costed by their trip counts (COST_LOOPS): the compiler's own figures
  # and the instruction counts beside them.
  loop_cost: WeightedCost | None = None

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
    if not isinstance(self.chip, ChipSpec):
      return 1
    return max(1, self.chip.tensorcores // self.cores_per_device)

  @property
  def roofline(self) -> tuple[float, float] | None:
    """(compute seconds, memory-traffic seconds) of one step on one device: FLOPs at the
    device's share of the chip's peak for `dtype`, bytes at its share of the bandwidth."""
    if self.chip is None or not math.isfinite(self.flops):
      return None
    share = self.devices_per_chip
    peak, _ = self.chip.peak_flops(self.dtype)
    return (self.flops / (peak / share),
            self.bytes_accessed / (self.chip.memory_bytes_per_s / share))

  @property
  def step_seconds(self) -> float | None:
    """Roofline lower bound: max(FLOPs / peak, bytes / memory bandwidth), per device."""
    roofline = self.roofline
    return max(roofline) if roofline else None

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
      more = "GPUs with more memory" if self.platform == "gpu" else "chips with more HBM"
      hint = (f"The train state alone (parameters, EMA, optimizer state) takes "
              f"{state / GiB:.2f} GiB per device: a smaller model, or {more}.")
    else:
      hint = ("Lower --per_device_batch, or use config.model.memory='remat' or 'invert', or "
              "config.model.dtype='bfloat16'")
      fraction = self.fraction_that_fits
      if fraction is not None:
        hint += (f", or let JAX's allocator take more of each GPU: XLA_CLIENT_MEM_FRACTION="
                 f"{fraction:.2f} for the training job and this check")
      hint += "."
    return (
        f"error: does not fit: {self.config_name} at {self.per_device_batch} images per device "
        f"on {self.topology}{_slices(self.num_slices)} {needed}, {self.limit_words} "
        f"({what.rstrip('.')}). {hint}"
    )

  @property
  def limit_words(self) -> str:
    """Who sets the memory limit, and the limit: "the TPU compiler allows 15.75 GiB"."""
    if isinstance(self.chip, GpuSpec):
      return (f"JAX's allocator may use {self.hbm_bytes / GiB:.2f} GiB of an {self.chip.name} "
              f"({self.memory_fraction:g} of {self.chip.memory_bytes / GiB:.2f} GiB)")
    return f"the TPU compiler allows {self.hbm_bytes / GiB:.2f} GiB"

  @property
  def fraction_that_fits(self) -> float | None:
    """On a GPU, a larger allocator share that would hold the program, where one up to
    `MAX_SUGGESTED_FRACTION` would (CUDA's context, cuDNN's and NCCL's own buffers take the
    rest)."""
    need = self.peak_bytes
    if not isinstance(self.chip, GpuSpec) or not need or self.memory_fraction is None:
      return None
    fraction = math.ceil(100 * need / self.chip.memory_bytes) / 100
    return fraction if self.memory_fraction < fraction <= MAX_SUGGESTED_FRACTION else None


# The largest share of a GPU's memory the refusal suggests giving JAX's allocator.
MAX_SUGGESTED_FRACTION = 0.9


def _slices(num_slices: int) -> str:
  return f" x {num_slices} slices" if num_slices > 1 else ""




def report_dict(report: AotReport) -> dict[str, Any]:
  """The report as JSON-ready values, with the derived figures (totals, fits, roofline)."""
  out = dataclasses.asdict(report)
  out.update(
      train_total=report.train_total, eval_total=report.eval_total,
      peak_bytes=report.peak_bytes, fits=report.fits, step_seconds=report.step_seconds,
      images_per_second=report.images_per_second, devices_per_chip=report.devices_per_chip,
      # step_seconds and images_per_second are the roofline's: a lower and an upper bound.
      step_seconds_is="roofline lower bound",
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


def _devices_line(r: AotReport) -> str:
  if r.platform == "gpu":
    per_host = r.num_devices // max(1, r.hosts)
    hosts = f"{r.hosts} hosts of {per_host}" if r.hosts > 1 else "1 host"
    gpus = f"{r.num_devices} GPU" + ("s" if r.num_devices > 1 else "")
    return f"{r.topology}{_slices(r.num_slices)} ({gpus}, {hosts}, {r.device_kind})"
  per_chip = f", {r.devices_per_chip} per chip" if r.devices_per_chip > 1 else ""
  return f"{r.topology}{_slices(r.num_slices)} ({r.num_devices} devices, {r.device_kind}{per_chip})"


def _memory_limit_line(r: AotReport) -> str:
  chip, peak = r.chip, r.peak_bytes or 0
  headroom = (f"headroom {_gib(r.hbm_bytes - peak)} "
              f"({100 * (r.hbm_bytes - peak) / r.hbm_bytes:.0f}%)")
  if isinstance(chip, GpuSpec):
    default = " (JAX's default)" if r.memory_fraction == DEFAULT_GPU_MEMORY_FRACTION else ""
    return (f"  GPU memory: {_gib(r.hbm_bytes)} per GPU for JAX's allocator "
            f"(XLA_CLIENT_MEM_FRACTION={r.memory_fraction:g}{default} of the "
            f"{_gib(chip.memory_bytes)} GiB the CUDA driver reports; {chip.name}: {chip.memory} "
            f"published), {headroom}")
  return (f"  HBM: {_gib(r.hbm_bytes)} per device (the TPU compiler's limit; {chip.name}: "
          f"{chip.hbm} per chip published), {headroom}")


def _cost_line(r: AotReport) -> str:
  extrapolated = {
      COST_COMPILER: "",
      COST_UNROLLED: f"; scanned steps: {COST_UNROLLED}, extrapolated",
  }.get(r.cost_source, f"; {r.cost_source}")
  figures = f"{r.flops / 1e9:.2f} GFLOP, {r.bytes_accessed / 1e9:.3f} GB accessed"
  if r.platform == "gpu":
    return (f"cost per step per device: {figures} (FLOPs: the program lowered for one GPU, "
            "since XLA's compiled GPU program has no cost analysis; bytes: the compiled "
            f"program's fusions and its cuDNN/cuBLAS calls' operands and results{extrapolated})")
  return f"cost per step per device: {figures} (TPU compiler{extrapolated})"


def _loops_line(cost: WeightedCost) -> str:
  """The loops behind COST_LOOPS figures, and how the instruction count compares with the
  compiler's where both count each body once."""
  known = [loop for loop in cost.loops if loop.trips is not None]
  trips = sorted({loop.trips for loop in known})
  runs = sorted({loop.runs for loop in known if loop.runs is not None})
  unknown = len(cost.loops) - len(known)
  flops, bytes_ = cost.agreement()
  line = (f"  loops: {len(cost.loops)} (trip counts {', '.join(map(str, trips))}; their bodies "
          f"run {runs[0] if runs else 0} to {runs[-1] if runs else 0} times per step")
  line += f"; {unknown} of unknown count, taken once)" if unknown else ")"
  return (line + f"; the compiler's own count, each body once: "
          f"{cost.compiler_flops / 1e9:.2f} GFLOP, {cost.compiler_bytes / 1e9:.3f} GB; "
          f"this count of the same program, each body once: FLOPs {100 * (flops - 1):+.1f}%, "
          f"bytes {100 * (bytes_ - 1):+.1f}% (what the bodies add beyond their first run is "
          f"this count's)")


def _library_calls_line(calls: dict[str, int]) -> str:
  def count(prefix: str, suffix: str = "") -> int:
    return sum(n for name, n in calls.items()
               if name.startswith(prefix) and name.endswith(suffix))

  convolutions = count("__cudnn$conv")
  return (f"GPU library calls (train step): {convolutions} cuDNN convolutions "
          f"({count('__cudnn$conv', ' 3x3')} with 3x3 windows), "
          f"{count('__cudnn') - convolutions} other cuDNN calls, {count('__cublas')} cuBLAS calls")


def _compile_time_line(r: AotReport) -> str:
  line = f"compile time: train step {r.compile_seconds:.1f} s"
  if r.eval_compile_seconds:
    line += f", eval step {r.eval_compile_seconds:.1f} s"
  if r.cost_source == COST_UNROLLED:
    line += f", FLOPs and bytes {r.cost_seconds:.1f} s (2 more compiles: {r.cost_source})"
  elif r.cost_source != COST_COMPILER:
    line += f", FLOPs and bytes {r.cost_seconds:.1f} s (loops read from the program)"
  if math.isfinite(r.total_seconds):
    line += f"; {r.total_seconds:.1f} s in all"
  if r.compiler_options:
    line += "; XLA options " + ", ".join(f"{k}={v:g}" for k, v in r.compiler_options.items())
  return line


def _compiler_estimate_line(r: AotReport, estimate: float, bound: float) -> str:
  """The compiler's own step-time estimate, and which figure to plan with when they differ."""
  line = f"compiler's estimate: {_duration(estimate)} per step"
  if estimate >= bound:
    return (line + " (its model of its own schedule, above the roofline lower bound; a chip "
            "measures the real step: bench/step_time.py)")
  if r.cost_source == COST_UNROLLED:
    why = ("it models the scanned program, whose loop body it counts once, not the K flow "
           "steps a step runs")
  elif r.cost_source != COST_COMPILER:
    why = ("it models the program with each loop body run once, not as many times as the "
           "step runs it")
  else:
    why = ("it is the compiler's model of its schedule, not a bound, and it assumes more "
           "overlap and bandwidth than the published peaks allow")
  return (line + f", below the roofline lower bound, which no step can beat: {why}. Plan "
          "with the roofline (a lower bound too); a chip measures the real step: "
          "bench/step_time.py")


def _batch_search_line(search: BatchSearch) -> str:
  if search.fits is None:
    found = f"none: the smallest batch tried, {search.fails}, does not fit"
  elif search.exact:
    found = f"{search.fits} ({search.fails} does not fit)"
  elif search.fails is None and search.compiles == 0:
    found = (f"at least {search.fits}; no other batch tried: one compile takes about "
             f"{search.compile_seconds:.0f} s, more than the budget of "
             f"--max_batch_search={search.budget_s:g} s")
  elif search.fails is None:
    found = (f"at least {search.fits} (every batch tried fits; the budget ran out before one "
             "that does not)")
  else:
    found = (f"at least {search.fits}, less than {search.fails} (the budget ran out before the "
             "bisection ended)")
  budget = f" of the {search.budget_s:g} s budget" if math.isfinite(search.budget_s) else ""
  return (f"largest per-device batch that fits: {found}; {search.compiles} more compiles in "
          f"{search.seconds:.0f} s{budget}")


def render(report: AotReport, traffic_top: int = 15) -> str:
  """The report as printed by the command: one `name: value` per line (then the byte
  breakdown's tables, with its `traffic_top` largest instructions, if it was made)."""
  r = report
  chip = r.chip
  compiler = "XLA's GPU compiler" if r.platform == "gpu" else "TPU compiler"
  lines = [
      f"config: {r.config_name}",
      f"topology: {_devices_line(r)}",
      f"batch: {r.per_device_batch} per device, {r.global_batch} global; coupling networks "
      f"{r.dtype}",
      _compile_time_line(r),
  ]
  if r.train is not None:
    s, m = r.state_bytes, r.train
    lines += [
        f"memory per device (GiB, {compiler}):",
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
    lines.append(_memory_limit_line(r))
  if r.library_calls is not None:
    lines.append(_library_calls_line(r.library_calls))
  if r.train is not None and math.isfinite(r.flops):
    lines.append(_cost_line(r))
    if r.loop_cost is not None:
      lines.append(_loops_line(r.loop_cost))
  roofline = r.roofline
  if roofline is not None:
    share = r.devices_per_chip
    compute, memory = roofline
    peak, precision = chip.peak_flops(r.dtype)
    traffic = "memory traffic" if r.platform == "gpu" else "HBM traffic"
    step = r.step_seconds
    lines.append(
        f"roofline lower bound: step >= {_duration(step)} (compute {_duration(compute)} at "
        f"{peak / share / 1e12:g} TFLOP/s {precision}, {traffic} {_duration(memory)} at "
        f"{chip.memory_bytes_per_s / share / 1e9:g} GB/s), <= {r.images_per_second:.0f} "
        f"images/s; {r.num_train_steps} steps >= {_duration(step * r.num_train_steps)} "
        f"(figures: {chip.source})"
    )
    if r.compiler_seconds and r.compiler_seconds > 0:  # libtpu sometimes gives a negative one
      lines.append(_compiler_estimate_line(r, float(r.compiler_seconds), step))
  if r.batch_search is not None:
    lines.append(_batch_search_line(r.batch_search))
  lines.append(f"fits: {'yes' if r.fits else 'no'}")
  if r.traffic is not None:
    source = {
        COST_UNROLLED: "the unrolled K=1,2 programs, extrapolated",
        COST_COMPILER: "the compiled program",
    }.get(r.cost_source, "the compiled program, each loop body times its runs")
    lines.append(render_traffic(r.traffic, r.bytes_accessed, top=traffic_top, source=source))
  return "\n".join(lines)


TABLE_HEADER = ("config", "topology", "batch/device", "fits", "GiB/device", "usable GiB",
                "step (roofline lower bound)", "steps", "wall time (roofline lower bound)",
                "compiles, s")


def table_row(report: AotReport) -> tuple[str, ...]:
  step = report.step_seconds
  return (
      report.config_name, report.topology + _slices(report.num_slices),
      str(report.per_device_batch), "y" if report.fits else "n",
      f"{report.peak_bytes / GiB:.2f}" if report.peak_bytes else "n/a",
      f"{report.hbm_bytes / GiB:.2f}",
      _duration(step) if report.fits else "n/a", str(report.num_train_steps),
      _duration(step * report.num_train_steps) if report.fits and step else "n/a",
      f"{report.total_seconds:.0f}" if math.isfinite(report.total_seconds) else "n/a",
  )


def markdown_table(rows: Sequence[Sequence[str]]) -> str:
  lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + " --- |" * len(TABLE_HEADER)]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines)
