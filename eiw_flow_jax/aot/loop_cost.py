"""A compiled program's FLOPs and bytes with every loop counted as many times as it runs.

The TPU compiler's `cost_analysis()` counts the body of a `while` loop once, however many
times it runs, so the cost of a program whose layers are scanned is a lower bound. Here the
compiled program (`compiled.as_text()`) is read instead:

- `runs_per_step`: how many times each computation runs per step: 1 for the entry, a loop body
  its loop's trip count times as often as the computation holding the loop. A trip count is
  read from the loop itself: its condition compares the induction variable (an element of the
  loop's tuple) with a constant, the loop starts it at a constant and its body adds a constant
  to it. A loop of another form has no known count (None), and neither has what it contains.
- `instruction_flops`: the FLOPs of one instruction by the rules of XLA's cost analysis
  (`HloCostAnalysis`): two per multiply-add of a convolution (padding taps excluded) or a dot,
  one per element of an elementwise operation but the transcendental ones (which it counts
  apart), the reducer's per element of a reduction, a fusion the sum of what it fuses.
- `weighted_cost`: the compiler's own figures (its count of each body once) plus, for every
  instruction inside a loop, its FLOPs and bytes (`traffic.instructions`) times the runs beyond
  the first. The instruction counts agree with the compiler's to a small fraction where both
  count once (`WeightedCost.flops_counted_once` against `compiler_flops`), so the weighted
  figures are the compiler's rules applied to every iteration.
"""

from __future__ import annotations

import dataclasses
import math
import re

from eiw_flow_jax.aot import traffic
from eiw_flow_jax.aot.traffic import Line

_BODY = re.compile(r"\bbody=%([\w.\-]+)")
_CONDITION = re.compile(r"\bcondition=%([\w.\-]+)")
_INDEX = re.compile(r"\bindex=(\d+)")
_KNOWN_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_DIMS = re.compile(r"\[([\d,]*)\]")
# Elementwise opcodes XLA's cost analysis counts as transcendentals, not FLOPs.
_TRANSCENDENTAL = frozenset({
    "exponential", "exponential-minus-one", "log", "log-plus-one", "logistic", "power", "sqrt",
    "cbrt", "rsqrt", "tanh", "sine", "cosine", "tan", "atan2", "erf",
})
# Opcodes with no arithmetic: data movement, views, control flow.
_NO_FLOPS = frozenset({
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "broadcast", "reshape",
    "transpose", "copy", "copy-start", "copy-done", "slice", "dynamic-slice",
    "dynamic-update-slice", "pad", "concatenate", "iota", "while", "conditional", "call",
    "custom-call", "after-all", "partition-id", "replica-id", "gather", "reverse",
    "slice-start", "slice-done", "async-start", "async-done", "async-update", "opt-barrier",
    "bitcast-convert", "all-gather", "all-gather-start", "all-gather-done", "all-to-all",
    "collective-permute", "collective-permute-start", "collective-permute-done",
    "all-reduce-done", "send", "send-done", "recv", "recv-done", "infeed", "outfeed",
    "rng-get-and-update-state", "get-dimension-size", "domain", "add-dependency",
})
_REDUCTIONS = frozenset({"reduce", "all-reduce", "all-reduce-start", "reduce-scatter"})


def _elements(shape: str) -> int:
  """Elements of an array shape (`f32[16,8]{...}`); of a tuple, the sum over its arrays."""
  return sum(math.prod(int(d) for d in dims.split(",") if d) for dims in _DIMS.findall(shape))


def _dims(shape: str) -> list[int]:
  found = _DIMS.search(shape)
  return [int(d) for d in found.group(1).split(",") if d] if found else []


# ----------------------------------------------------------------------------------------------
# Trip counts.

def _source(name: str, by_name: dict[str, Line], through: tuple[str, ...] = ("copy", "bitcast"),
            steps: int = 8) -> Line | None:
  """The instruction `name` comes from, followed back through up to `steps` instructions of the
  opcodes `through` (copies the compiler inserted, which leave the value as it is)."""
  line = by_name.get(name)
  for _ in range(steps):
    if line is None or line.opcode not in through or not line.operands:
      break
    line = by_name.get(line.operands[0])
  return line


def _constant(name: str, by_name: dict[str, Line]) -> int | None:
  """The integer value of `name` if it is a scalar constant (through copies and bitcasts)."""
  line = _source(name, by_name, ("copy", "bitcast", "convert"))
  if line is None or line.opcode != "constant":
    return None
  try:
    return int(line.literal)
  except ValueError:
    return None


def _tuple_index(name: str, by_name: dict[str, Line]) -> int | None:
  """k where `name` is get-tuple-element(parameter, index=k), through copies and bitcasts (the
  TPU compiler at low effort copies the induction variable before adding to it)."""
  line = _source(name, by_name)
  if line is None or line.opcode != "get-tuple-element":
    return None
  source = by_name.get(line.operands[0]) if line.operands else None
  found = _INDEX.search(line.attributes)
  return int(found.group(1)) if found and source and source.opcode == "parameter" else None


def trip_count(loop: Line, computations: dict[str, list[Line]],
               parent: dict[str, Line]) -> int | None:
  """The number of times `loop` (a `while` in the computation whose instructions are `parent`)
  runs its body, or None where its form is not `for (i = a; i < b; i += s)` with constants."""
  known = _KNOWN_TRIP_COUNT.search(loop.attributes)
  if known:  # the CPU and GPU compilers write the count they found into the loop
    return int(known.group(1))
  condition, body = _CONDITION.search(loop.attributes), _BODY.search(loop.attributes)
  if not condition or not body or len(loop.operands) != 1:
    return None
  cond_lines = computations.get(condition.group(1), [])
  cond = {x.name: x for x in cond_lines}
  root = _unwrapped(next((x for x in cond_lines if x.root), None), computations)
  if root is None or root.opcode != "compare" or len(root.operands) != 2:
    return None
  direction = re.search(r"direction=(\w+)", root.attributes)
  a, b = root.operands
  index, bound = _tuple_index(a, cond), _constant(b, cond)
  op = direction.group(1) if direction else ""
  if index is None:  # bound > i, the same loop written the other way round
    index, bound = _tuple_index(b, cond), _constant(a, cond)
    op = {"GT": "LT", "GE": "LE"}.get(op, "")
  if index is None or bound is None or op not in ("LT", "LE"):
    return None
  start = _tuple_element_constant(loop.operands[0], index, parent)
  step = _loop_step(computations.get(body.group(1), []), index, computations)
  if start is None or not step or step < 0:
    return None
  end = bound + (1 if op == "LE" else 0)
  return max(0, -(-(end - start) // step))


def _unwrapped(line: Line | None, computations: dict[str, list[Line]]) -> Line | None:
  """A fusion that wraps one instruction on its parameters (`wrapped_add`), as that
  instruction applied to the fusion's operands; any other line as it is."""
  if line is None or line.opcode != "fusion":
    return line
  fused = computations.get(traffic.called(line.attributes), [])
  root = next((x for x in fused if x.root), None)
  parameters = {x.name: int(x.literal) for x in fused if x.opcode == "parameter"}
  if root is None or not all(o in parameters for o in root.operands):
    return None
  operands = tuple(line.operands[parameters[o]] for o in root.operands)
  return dataclasses.replace(root, name=line.name, operands=operands)


def _tuple_element_constant(name: str, index: int, by_name: dict[str, Line]) -> int | None:
  line = by_name.get(name)
  if line is None or line.opcode != "tuple" or index >= len(line.operands):
    return None
  return _constant(line.operands[index], by_name)


def _loop_step(body: list[Line], index: int,
               computations: dict[str, list[Line]]) -> int | None:
  """s where the body's result sets element `index` to element `index` + s (s a constant)."""
  by_name = {x.name: x for x in body}
  root = next((x for x in body if x.root), None)
  if root is None or root.opcode != "tuple" or index >= len(root.operands):
    return None
  # Through copies the compiler put after the add.
  update = _unwrapped(_source(root.operands[index], by_name, steps=4), computations)
  if update is None or update.opcode != "add" or len(update.operands) != 2:
    return None
  a, b = update.operands
  if _tuple_index(a, by_name) == index:
    return _constant(b, by_name)
  if _tuple_index(b, by_name) == index:
    return _constant(a, by_name)
  return None


def runs_per_step(computations: dict[str, list[Line]], entry: str) -> dict[str, int | None]:
  """Executed computation -> how many times it runs per program run (None: a loop on its path
  has no known trip count). A computation called from several places runs the sum of their
  counts; a conditional's branches count as running as often as it does (the compiler's count
  takes each branch once)."""
  # Call sites: callee -> [(caller, times per caller run or None)].
  callers: dict[str, list[tuple[str, int | None]]] = {}
  seen, stack = {entry}, [entry]
  while stack:
    name = stack.pop()
    lines = computations.get(name, [])
    by_name = {x.name: x for x in lines}
    for line in lines:
      if line.opcode in traffic.INNER:
        continue
      called = traffic.subprograms(line)
      trips = trip_count(line, computations, by_name) if line.opcode == "while" else 1
      body = _BODY.search(line.attributes) if line.opcode == "while" else None
      for sub in called:
        # A loop's condition runs once more than its body.
        times = trips if trips is None or body is None or sub == body.group(1) else trips + 1
        callers.setdefault(sub, []).append((name, times))
        if sub not in seen:
          seen.add(sub)
          stack.append(sub)
  runs: dict[str, int | None] = {entry: 1}

  def count(name: str) -> int | None:
    if name not in runs:
      total: int | None = 0
      for caller, times in callers.get(name, []):
        outer = count(caller)
        total = None if total is None or outer is None or times is None else (
            total + outer * times)
      runs[name] = total
    return runs[name]

  for name in seen:
    count(name)
  return runs


# ----------------------------------------------------------------------------------------------
# FLOPs.

def instruction_flops(line: Line, computations: dict[str, list[Line]],
                      shapes: dict[str, str]) -> float:
  """FLOPs of one instruction by the rules of XLA's cost analysis (see the module doc)."""
  opcode = line.opcode
  if opcode == "fusion":
    fused = computations.get(traffic.called(line.attributes), [])
    inner = {x.name: x.shape for x in fused}
    return sum(instruction_flops(x, computations, inner) for x in fused)
  if opcode in _NO_FLOPS or opcode in _TRANSCENDENTAL:
    return 0.0
  if opcode == "convolution":
    return _convolution_flops(line, shapes)
  if opcode == "dot":
    return _dot_flops(line, shapes)
  if opcode in _REDUCTIONS or opcode == "reduce-window":
    reducer = _reducer_flops(line, computations)
    if opcode == "reduce-window":
      window = re.search(r"size=([\dx]+)", line.attributes)
      size = math.prod(int(s) for s in window.group(1).split("x")) if window else 1
      return float(_elements(line.shape) * max(size - 1, 0) * reducer)
    inputs = sum(_elements(shapes.get(o, "")) for o in line.operands[: max(
        1, len(line.operands) // 2)])
    return float(max(inputs - _elements(line.shape), 0) * reducer)
  # Elementwise (and what else computes): one per element of the result.
  return float(_elements(line.shape))


def _reducer_flops(line: Line, computations: dict[str, list[Line]]) -> float:
  found = re.search(r"\bto_apply=%([\w.\-]+)", line.attributes)
  body = computations.get(found.group(1), []) if found else []
  shapes = {x.name: x.shape for x in body}
  return sum(instruction_flops(x, computations, shapes) for x in body) or 1.0


def _dot_flops(line: Line, shapes: dict[str, str]) -> float:
  lhs = _dims(shapes.get(line.operands[0], "")) if line.operands else []
  found = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line.attributes)
  contracting = [int(d) for d in found.group(1).split(",") if d] if found else []
  depth = math.prod(lhs[d] for d in contracting if d < len(lhs))
  return 2.0 * _elements(line.shape) * depth


def _convolution_flops(line: Line, shapes: dict[str, str]) -> float:
  """2 per multiply-add whose input tap is not padding, as XLA's `GetConvolutionFlops`."""
  if len(line.operands) < 2:
    return 0.0
  lhs = _dims(shapes.get(line.operands[0], ""))
  rhs = _dims(shapes.get(line.operands[1], ""))
  out = _dims(line.shape)
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", line.attributes)
  if not labels or not lhs or not rhs or not out:
    return 0.0
  lhs_labels, rhs_labels, out_labels = labels.groups()
  groups = re.search(r"feature_group_count=(\d+)", line.attributes)
  batch_groups = re.search(r"batch_group_count=(\d+)", line.attributes)
  feature_groups = int(groups.group(1)) if groups else 1
  batch_group_count = int(batch_groups.group(1)) if batch_groups else 1
  input_features = lhs[lhs_labels.index("f")]
  output_features = out[out_labels.index("f")]
  batch = lhs[lhs_labels.index("b")]
  spatial = [c for c in lhs_labels if c.isdigit()]
  window = _window(line.attributes, len(spatial))
  valid = 1
  for k, label in enumerate(spatial):
    size_in = lhs[lhs_labels.index(label)]
    kernel = rhs[rhs_labels.index(label)]
    size_out = out[out_labels.index(label)]
    valid *= _valid_taps(size_in, kernel, size_out, *window[k])
  fma = (input_features // feature_groups) * output_features * (
      batch // batch_group_count) * valid
  return 2.0 * fma


def _window(attributes: str, rank: int) -> list[tuple[int, int, int, int, int]]:
  """Per spatial dimension: (stride, padding low, padding high, input dilation, kernel
  dilation), from the convolution's `window={...}`."""
  found = re.search(r"window=\{([^}]*)\}", attributes)
  text = found.group(1) if found else ""

  def field(name: str, default: list[int]) -> list[int]:
    match = re.search(rf"\b{name}=([\d_x-]+)", text)
    if not match:
      return default
    return [int(v) for v in match.group(1).split("x")]

  strides = field("stride", [1] * rank)
  lhs_dilation = field("lhs_dilate", [1] * rank)
  rhs_dilation = field("rhs_dilate", [1] * rank)
  pads = re.search(r"\bpad=([\d_x-]+)", text)
  padding = ([tuple(int(p) for p in part.split("_")) for part in pads.group(1).split("x")]
             if pads else [(0, 0)] * rank)
  return [(strides[k], padding[k][0], padding[k][1], lhs_dilation[k], rhs_dilation[k])
          for k in range(rank)]


def _valid_taps(size_in: int, kernel: int, size_out: int, stride: int, pad_low: int,
                _pad_high: int, lhs_dilation: int, rhs_dilation: int) -> int:
  """(output position, kernel tap) pairs of one spatial dimension that read an input element
  (not padding, not a hole of the input's dilation)."""
  dilated = (size_in - 1) * lhs_dilation + 1
  count = 0
  for o in range(size_out):
    for k in range(kernel):
      position = o * stride + k * rhs_dilation - pad_low
      if 0 <= position < dilated and position % lhs_dilation == 0:
        count += 1
  return count


# ----------------------------------------------------------------------------------------------
# The weighted cost.

@dataclasses.dataclass(frozen=True)
class Loop:
  """A loop of the compiled program: where it comes from and how often its body runs."""

  op_name: str
  trips: int | None
  runs: int | None  # times its body runs per step, counting the loops around it


@dataclasses.dataclass(frozen=True)
class WeightedCost:
  """FLOPs and bytes per step with each loop body counted as often as it runs."""

  flops: float
  bytes_accessed: float
  # Every loop's trip count was read and no conditional with branches of a cost runs inside a
  # loop. Else approximate: a loop of unknown count is counted once, and every branch of a
  # conditional in a loop as often as the conditional runs (one of them does).
  exact: bool
  loops: tuple[Loop, ...]
  compiler_flops: float  # the compiler's own figures: each loop body once
  compiler_bytes: float
  flops_counted_once: float  # `instruction_flops` over the program, each body once
  bytes_counted_once: float  # `traffic` bytes, each body once

  def agreement(self) -> tuple[float, float]:
    """(FLOPs, bytes) counted here with each body once, over the compiler's own figures."""
    return (self.flops_counted_once / max(self.compiler_flops, 1.0),
            self.bytes_counted_once / max(self.compiler_bytes, 1.0))


@dataclasses.dataclass(frozen=True)
class Program:
  """A compiled program read once: its computations, how often each runs per step
  (`runs_per_step`) and its executed instructions with their bytes and runs
  (`traffic.executed_instructions`), which `weighted_cost` and `--traffic` both use."""

  computations: dict[str, list[Line]]
  entry: str
  runs: dict[str, int | None]
  instructions: list[traffic.Instruction]

  @classmethod
  def parse(cls, text: str) -> Program:
    """The program of compiled HLO text (`compiled.as_text()`)."""
    computations, entry = traffic.parse_computations(text)
    runs = runs_per_step(computations, entry)
    return cls(computations, entry, runs,
               traffic.executed_instructions(computations, entry, runs=runs))


# What a branch may hold and still cost nothing (a `platform_dependent`'s branches that each
# return their platform's index, in a program not yet optimised).
_COSTLESS = frozenset({"parameter", "constant", "tuple", "get-tuple-element", "bitcast"})


def _one_way(conditional: Line, computations: dict[str, list[Line]]) -> bool:
  """Whether counting every branch of `conditional` each time it runs is exact: it has one
  branch, or none of its branches costs anything."""
  branches = traffic.subprograms(conditional)
  return len(branches) <= 1 or all(
      all(x.opcode in _COSTLESS for x in computations.get(b, [])) for b in branches)


def weighted_cost(program: Program, compiler_flops: float,
                  compiler_bytes: float) -> WeightedCost:
  """The compiler's FLOPs and bytes (`compiled.cost_analysis()`, each loop body once) plus what
  each instruction in a loop adds in its runs beyond the first (see the module doc)."""
  computations, entry, runs = program.computations, program.entry, program.runs
  extra_flops = extra_bytes = once_flops = once_bytes = 0.0
  exact = all(count is not None for count in runs.values()) and not any(
      line.opcode == "conditional" and (runs.get(name) or 1) > 1
      and not _one_way(line, computations)
      for name in runs for line in computations.get(name, []))
  for name in traffic.executed(computations, entry):
    shapes = {x.name: x.shape for x in computations[name]}
    flops = sum(instruction_flops(x, computations, shapes) for x in computations[name])
    once_flops += flops
    extra_flops += ((runs.get(name) or 1) - 1) * flops
  for i in program.instructions:
    once_bytes += i.bytes
    extra_bytes += ((i.runs or 1) - 1) * i.bytes
  loops = []
  for name, lines in computations.items():
    if name not in runs:
      continue
    by_name = {x.name: x for x in lines}
    for line in lines:
      if line.opcode == "while":
        body = _BODY.search(line.attributes)
        loops.append(Loop(traffic.op_name_of(line), trip_count(line, computations, by_name),
                          runs.get(body.group(1)) if body else None))
  return WeightedCost(compiler_flops + extra_flops, compiler_bytes + extra_bytes, exact,
                      tuple(loops), compiler_flops, compiler_bytes, once_flops, once_bytes)
