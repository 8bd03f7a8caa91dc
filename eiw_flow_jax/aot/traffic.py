"""Where a compiled program's memory traffic goes: bytes per instruction, by layer kind.

The TPU compiler's `cost_analysis()` gives one figure, "bytes accessed", for a whole program.
`breakdown` reads the compiled program itself (`compiled.as_text()`: the optimized HLO after
fusion, layout and memory-space assignment) and charges each instruction that runs with the
bytes it reads and writes, by the rules of the compiler's count: operands and result in the
layout the compiler chose, padding to the TPU's tiles included (a float32 array whose minor
dimensions are tiled (8, 128) occupies whole tiles); a fusion is one instruction (its
intermediates stay on chip) that reads of a parameter only the slices it takes; loop and branch
bodies once; an asynchronous copy's start reads its source and writes the destination and a
second view of the source, its end writes the destination again. So prefetching an array into
the on-chip memory (VMEM, memory space 1) and reading it there counts five times its size, where
HBM sees it once: `Instruction.hbm` counts only the arrays that live in HBM (memory space 0) and
each copy once, a figure closer to what the chip's HBM moves.

Each instruction's `op_name` metadata carries the JAX name scopes it came from: the Flax module
path (`level0_steps/level0_step1/FlowStep/layers_2/...`), the layers' own scopes
(`bijectors.layer_scope`: actnorm, conv1x1, coupling, coupling_net) and the train step's
update (`train_step.UPDATE_SCOPE`); an instruction without one (a copy the compiler inserted)
takes its source's, and the train state's arguments are named `state.params[...]` and so on.
`layer_kind` maps these to the parts of the model in `LAYER_KINDS`.

The sum over instructions is compared with the compiler's figure where printed; the two agree
to a few percent on the Glow train steps (the compiler's rules for some fusions differ).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

from eiw_flow_jax.model import bijectors
from eiw_flow_jax.training.train_step import UPDATE_SCOPE

# Bytes per element of each HLO element type (pred is stored as one byte).
_ELEMENT_BYTES = {
    "pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
    "token": 0,
}
_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([\d,]*)\](?:\{([^}]*)\})?")
_HEADER = re.compile(r"^(?:ENTRY )?%(\S+) .*\{$")
_INSTRUCTION = re.compile(r"^\s+(ROOT )?%(\S+) = ")
_OPERAND = re.compile(r"%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="((?:[^"\\]|\\.)*)"')
# Attributes that name computations run as parts of the program (not fused internals).
_SUBPROGRAMS = re.compile(
    r"\b(?:body|condition|to_apply|true_computation|false_computation)=%([\w.\-]+)"
    r"|\bbranch_computations=\{([^}]*)\}")
# Opcodes whose computations run inside the instruction (reducers, fused bodies).
INNER = frozenset({
    "fusion", "reduce", "reduce-window", "sort", "scatter", "select-and-scatter", "map",
    "all-reduce", "all-reduce-start", "reduce-scatter",
})
# Opcodes that move no data themselves: views, bookkeeping, or control flow whose bodies are
# counted instruction by instruction.
_FREE = frozenset({
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
    "partition-id", "replica-id", "iota", "while", "conditional", "call",
    "all-reduce-done", "all-gather-done", "collective-permute-done", "opt-barrier",
})
# The ends of asynchronous copies and slices: their destination is counted as written.
_DONE = frozenset({"copy-done", "slice-done"})
# Instructions that only move data (prefetches, evictions, layout changes, slices).
MOVES = frozenset({"copy", "copy-start", "copy-done", "slice-start", "slice-done", "slice",
                   "pad", "transpose", "concatenate", "dynamic-slice"})
# Through these a fusion reads only part of a parameter: the parameter costs what they produce.
_PARTIAL_READS = frozenset({"slice", "dynamic-slice"})

# (scope in op_name, layer kind), first match wins. The scopes are the layers' own
# (`bijectors.layer_scope`), the train step's and the Flax module names.
LAYER_KINDS: tuple[tuple[str, str], ...] = (
    (UPDATE_SCOPE, "optimizer and EMA update"),
    ("state.", "train state (copies)"),  # the train state's arguments, as named by jit
    (bijectors.COUPLING_NET_SCOPE, "coupling net"),
    (bijectors.COUPLING_SCOPE, "coupling (halves, affine)"),
    (bijectors.CONV1X1_SCOPE, "1x1 conv"),
    (bijectors.ACTNORM_SCOPE, "ActNorm"),
    (bijectors.SPLIT_SCOPE, "split and its prior"),
    (bijectors.TOP_PRIOR_SCOPE, "top prior"),
    ("dequantize", "input (dequantize)"),
)
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")


def layer_kind(op_name: str, opcode: str = "") -> str:
  """The part of the model an instruction belongs to (`LAYER_KINDS`), from its op_name."""
  if opcode.startswith(_COLLECTIVES):
    return "gradient all-reduce"
  for scope, kind in LAYER_KINDS:
    if scope in op_name:
      return kind
  return "other"


def array_bytes(shape: str, padded: bool = True, hbm_only: bool = False) -> int:
  """Bytes of an HLO shape (`f32[64,32]{1,0:T(8,128)}`, or a tuple of them).

  `padded`: as the arrays lie in memory, each minor dimension (in layout order) rounded up to
  the layout's first tile; else the elements alone. `hbm_only`: only arrays in memory space 0
  (no `S(n)` in the layout).
  """
  total = 0
  for element, dims_text, layout in _ARRAY.findall(shape):
    if hbm_only and re.search(r"S\([1-9]\d*\)", layout):
      continue
    dims = [int(d) for d in dims_text.split(",") if d]
    if padded and layout and dims:
      dims = _tiled_dims(dims, layout)
    total += _ELEMENT_BYTES.get(element, 4) * math.prod(dims)
  return total


def _tiled_dims(dims: list[int], layout: str) -> list[int]:
  """The dimensions in major-to-minor order, the minor ones padded to the layout's first tile."""
  minor_to_major, _, tiling = layout.partition(":")
  order = [int(d) for d in minor_to_major.split(",") if d]
  if sorted(order) != list(range(len(dims))):
    return dims
  major_to_minor = [dims[d] for d in reversed(order)]
  tile = re.match(r"T\(([\d,]+)\)", tiling)
  if tile:
    sizes = [int(t) for t in tile.group(1).split(",")]
    for offset, size in enumerate(reversed(sizes), start=1):
      if offset <= len(major_to_minor):
        major_to_minor[-offset] = -(-major_to_minor[-offset] // size) * size
  return major_to_minor


def _tuple_element(shape: str, index: int) -> str:
  """Top-level element `index` of a tuple shape, as text ('' if there is none)."""
  depth, start, elements = 0, 1, []
  for i, ch in enumerate(shape):
    if ch in "({[":
      depth += 1
    elif ch in ")}]":
      depth -= 1
    if (ch == "," and depth == 1) or (ch == ")" and depth == 0):
      elements.append(shape[start:i].strip())
      start = i + 1
  return elements[index] if index < len(elements) else ""


@dataclasses.dataclass(frozen=True)
class Line:
  """One instruction of HLO text: `%name = shape opcode(operands), attributes`."""

  name: str
  shape: str
  opcode: str
  operands: tuple[str, ...]
  attributes: str
  literal: str  # what the parentheses hold (a parameter's number)
  root: bool = False  # the computation's result


def _split_shape(rest: str) -> tuple[str, str]:
  """(shape, text after it) of an instruction's right-hand side."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += (ch == "(") - (ch == ")")
      if depth == 0:
        return rest[: i + 1], rest[i + 1:].lstrip()
  head, _, tail = rest.partition(" ")
  return head, tail


def _parenthesised(text: str) -> tuple[str, str]:
  """(inside of the parenthesis that `text` opens with, text after it)."""
  depth = 0
  for i, ch in enumerate(text):
    depth += (ch == "(") - (ch == ")")
    if depth == 0:
      return text[1:i], text[i + 1:]
  return text[1:], ""


def parse_computations(text: str) -> tuple[dict[str, list[Line]], str]:
  """The computations of HLO text (name -> instructions) and the entry computation's name."""
  computations: dict[str, list[Line]] = {}
  entry, current = "", None
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = computations.setdefault(header.group(1), [])
      entry = header.group(1) if line.startswith("ENTRY") else entry
      continue
    if line.startswith("}"):
      current = None
      continue
    match = _INSTRUCTION.match(line)
    if current is None or not match:
      continue
    shape, rest = _split_shape(line[match.end():])
    opcode, _, rest = rest.partition("(")
    inside, attributes = _parenthesised("(" + rest)
    current.append(Line(match.group(2), shape, opcode.strip(), tuple(_OPERAND.findall(inside)),
                        attributes, inside.strip(), root=bool(match.group(1))))
  return computations, entry


def executed(computations: dict[str, list[Line]], entry: str) -> list[str]:
  """The entry computation and those it runs as loops, branches and calls (not fused ones)."""
  seen, order, stack = set(), [], [entry]
  while stack:
    name = stack.pop()
    if name in seen or name not in computations:
      continue
    seen.add(name)
    order.append(name)
    for line in computations[name]:
      if line.opcode not in INNER:
        stack.extend(subprograms(line))
  return order


def subprograms(line: Line) -> list[str]:
  """The computations `line` runs as parts of the program: a loop's condition and body, a
  conditional's branches, a call's callee (not a fusion's fused computation)."""
  names = []
  for single, several in _SUBPROGRAMS.findall(line.attributes):
    names.extend([single] if single else _OPERAND.findall(several))
  return names


def called(attributes: str) -> str:
  """The fused computation a fusion's attributes name ('' if none)."""
  found = re.search(r"\bcalls=%([\w.\-]+)", attributes)
  return found.group(1) if found else ""


def op_name_of(line: Line) -> str:
  """The `op_name` metadata of one instruction ('' if it has none)."""
  found = _OP_NAME.search(line.attributes)
  return found.group(1) if found else ""


def _parameter_read(fused: list[Line], index: int, shape: str, padded: bool,
                    hbm_only: bool) -> int:
  """Bytes a fusion reads of its parameter `index` (of `shape`): each slice the fused
  computation takes of it, plus the whole array once if anything else uses it."""
  whole = array_bytes(shape, padded, hbm_only)
  param = next((x.name for x in fused if x.opcode == "parameter" and x.literal == str(index)),
               None)
  if param is None:
    return whole
  total, counted_whole = 0, False
  element = shape.split("[", 1)[0]
  for user in fused:
    if param not in user.operands:
      continue
    if user.opcode in _PARTIAL_READS and user.operands[0] == param:
      # The slice's elements in the parameter's type (the slice may convert as it reads).
      piece = array_bytes(element + user.shape[user.shape.index("["):], padded)
      total += piece if whole or not hbm_only else 0
    elif not counted_whole:
      counted_whole = True
      total += whole
  return total


@dataclasses.dataclass(frozen=True)
class Instruction:
  """One instruction of a compiled program that runs, with the bytes it moves."""

  name: str
  opcode: str  # fusions as "fusion (loop)", "fusion (output)", ...
  shape: str
  op_name: str  # its own, or (copies the compiler inserted) its source's
  read: int  # bytes of its operands, the compiler's count
  written: int  # bytes of its result, the compiler's count
  hbm: int  # bytes of the arrays it reads and writes in HBM, each copy once
  kind: str  # `layer_kind` of op_name
  backward: bool  # under autodiff's transpose (the backward pass)
  # Times it runs per step (inside loops: their trip counts; `loop_cost.runs_per_step`), None
  # where a loop around it has no known count; 1 where the caller gave no counts.
  runs: int | None = 1

  @property
  def bytes(self) -> int:
    return self.read + self.written

  @property
  def bytes_per_step(self) -> int:
    """`bytes` times the runs per step (a loop of unknown count taken once)."""
    return self.bytes * (self.runs or 1)

  @property
  def moves(self) -> bool:
    """A copy, slice or prefetch: data movement the compiler or the program's layout added."""
    return self.opcode in MOVES


def _instruction_bytes(line: Line, computations: dict[str, list[Line]], shapes: dict[str, str],
                       padded: bool) -> tuple[int, int, int]:
  """(read, written, HBM bytes) of one instruction."""
  sources = [shapes.get(o, "") for o in line.operands]
  if line.opcode in _DONE:
    return 0, array_bytes(line.shape, padded), 0  # the start moved the data
  if line.opcode == "copy-start":  # result: (destination, source, context)
    source, destination = (sources[0] if sources else ""), _tuple_element(line.shape, 0)
    hbm = array_bytes(source, padded, True) + array_bytes(destination, padded, True)
    return array_bytes(source, padded), array_bytes(line.shape, padded), hbm
  if line.opcode == "slice-start":  # result: ((source), slice, context); moves the slice
    piece = _tuple_element(line.shape, 1)
    moved = array_bytes(piece, padded)
    in_hbm = (array_bytes(sources[0], padded, True) > 0 if sources else False)
    return moved, moved, moved * in_hbm + array_bytes(piece, padded, True)
  if line.opcode == "custom-call" and "ConcatBitcast" in line.attributes:
    return 0, 0, 0  # joins adjacent buffers in place
  written = array_bytes(line.shape, padded)
  written_hbm = array_bytes(line.shape, padded, True)
  if line.opcode == "fusion":
    fused = computations.get(called(line.attributes), [])
    reads = [_parameter_read(fused, k, s, padded, False) for k, s in enumerate(sources)]
    hbm_reads = [_parameter_read(fused, k, s, padded, True) for k, s in enumerate(sources)]
    updates = _in_place_updates(fused)
    if updates is not None:  # writes each update into its operand's buffer, in place
      written = written_hbm = 0
      for k, (buffer, update_shape) in enumerate(updates):
        result = _tuple_element(line.shape, k) if line.shape.startswith("(") else line.shape
        if buffer is not None:
          reads[buffer] = hbm_reads[buffer] = 0
          in_hbm = array_bytes(result, padded, True) > 0
          written += array_bytes(update_shape, padded)
          written_hbm += array_bytes(update_shape, padded) if in_hbm else 0
        else:  # an output that is not an update: written whole
          written += array_bytes(result, padded)
          written_hbm += array_bytes(result, padded, True)
    read, hbm = sum(reads), sum(hbm_reads)
  elif line.opcode == "dynamic-update-slice" and len(sources) > 1:
    read = hbm = array_bytes(sources[1], padded)
    written = written_hbm = array_bytes(sources[1], padded)
  else:
    read = sum(array_bytes(s, padded) for s in sources)
    hbm = sum(array_bytes(s, padded, True) for s in sources)
  return read, written, hbm + written_hbm


def _in_place_updates(fused: list[Line]) -> list[tuple[int | None, str]] | None:
  """Where a fused computation's result is a dynamic-update-slice of one of its parameters, or
  a tuple holding such updates (a loop body writing several stacked buffers at once): per
  output, (parameter number of the buffer, shape of the update), or (None, shape) for an output
  that is not such an update. None when no output is an in-place update."""
  root = next((x for x in fused if x.root), None)
  if root is None:
    return None
  by_name = {x.name: x for x in fused}
  outputs = [by_name.get(o) for o in root.operands] if root.opcode == "tuple" else [root]
  found: list[tuple[int | None, str]] = []
  for output in outputs:
    if output is None:
      return None
    buffer = update = None
    if output.opcode == "dynamic-update-slice" and len(output.operands) >= 2:
      buffer, update = (by_name.get(o) for o in output.operands[:2])
    if buffer is not None and buffer.opcode == "parameter" and update is not None:
      found.append((int(buffer.literal), update.shape))
    else:
      found.append((None, output.shape))
  return found if any(buffer is not None for buffer, _ in found) else None


def breakdown(text: str, padded: bool = True) -> Traffic:
  """The traffic of compiled HLO text (`compiled.as_text()`): per layer kind, the largest (each
  instruction once; `loop_cost.Program` counts them as often as they run)."""
  return Traffic.of(instructions(text, padded))


def instructions(text: str, padded: bool = True) -> list[Instruction]:
  """The instructions of compiled HLO text that run, each with the bytes it moves (a loop body
  once, as the compiler's cost analysis counts it)."""
  return executed_instructions(*parse_computations(text), padded=padded)


def executed_instructions(computations: dict[str, list[Line]], entry: str, *,
                          padded: bool = True,
                          runs: dict[str, int | None] | None = None) -> list[Instruction]:
  """`instructions` of a program already parsed (`parse_computations`), each with how often
  it runs given `runs` (computation -> runs per step, `loop_cost.runs_per_step`)."""
  lines = {line.name: line for body in computations.values() for line in body}
  shapes = {name: line.shape for name, line in lines.items()}
  own = {name: op_name_of(line) for name, line in lines.items()}

  def op_name(name: str) -> str:
    for _ in range(16):  # an unnamed copy of a copy of ...: its source's name
      if own.get(name) or name not in lines or not lines[name].operands:
        break
      name = lines[name].operands[0]
    return own.get(name, "")

  found_instructions = []
  for computation in executed(computations, entry):
    times = 1 if runs is None else runs.get(computation)
    for line in computations[computation]:
      if line.opcode in _FREE:
        continue
      read, written, hbm = _instruction_bytes(line, computations, shapes, padded)
      name = op_name(line.name)
      kind = re.search(r"kind=k(\w+)", line.attributes) if line.opcode == "fusion" else None
      found_instructions.append(Instruction(
          name=line.name, opcode=f"fusion ({kind.group(1).lower()})" if kind else line.opcode,
          shape=line.shape, op_name=name, read=read, written=written, hbm=hbm,
          kind=layer_kind(name, line.opcode), backward="transpose(" in name,
          runs=times,
      ))
  return found_instructions


@dataclasses.dataclass(frozen=True)
class KindBytes:
  """Bytes of one layer kind: forward and backward pass, the copies among them, and the HBM
  figure (`Instruction.hbm`)."""

  kind: str
  forward: float
  backward: float
  moves: float
  hbm: float

  @property
  def total(self) -> float:
    return self.forward + self.backward


@dataclasses.dataclass(frozen=True)
class Traffic:
  """The bytes a compiled program moves: per layer kind, and the largest instructions."""

  kinds: tuple[KindBytes, ...]  # largest first
  largest: tuple[Instruction, ...]  # the largest byte movers, largest first
  largest_from: str = "the compiled program"  # which program `largest` lists

  @classmethod
  def of(cls, instructions: Sequence[Instruction], top: int = 40) -> Traffic:
    groups: dict[str, list[float]] = {}
    for i in instructions:
      g = groups.setdefault(i.kind, [0.0, 0.0, 0.0, 0.0])
      g[1 if i.backward else 0] += i.bytes_per_step
      g[2] += i.bytes_per_step if i.moves else 0
      g[3] += i.hbm * (i.runs or 1)
    kinds = sorted((KindBytes(k, *g) for k, g in groups.items()), key=lambda k: -k.total)
    return cls(tuple(kinds),
               tuple(sorted(instructions, key=lambda i: -i.bytes_per_step)[:top]))

  @property
  def total(self) -> float:
    return sum(k.total for k in self.kinds)

  @property
  def hbm(self) -> float:
    return sum(k.hbm for k in self.kinds)

  def kind(self, name: str) -> KindBytes:
    return next((k for k in self.kinds if k.kind == name), KindBytes(name, 0, 0, 0, 0))


def extrapolate(one: Traffic, two: Traffic, steps: int) -> Traffic:
  """The traffic of K = `steps` flow steps per level, from unrolled programs at K=1 and K=2:
  per kind, one + (K - 1) (two - one), the rule of the compiler's FLOPs and bytes
  (`aot.compiler`); the largest instructions are those of the K=2 program."""
  names = {k.kind for k in one.kinds} | {k.kind for k in two.kinds}
  kinds = []
  for name in names:
    a, b = one.kind(name), two.kind(name)
    kinds.append(KindBytes(name, *(
        getattr(a, f) + (steps - 1) * (getattr(b, f) - getattr(a, f))
        for f in ("forward", "backward", "moves", "hbm"))))
  return Traffic(tuple(sorted(kinds, key=lambda k: -k.total)), two.largest,
                 "the unrolled K=2 program")


def render_traffic(traffic: Traffic, compiler_bytes: float | None = None, top: int = 15,
                   source: str = "the compiled program") -> str:
  """The breakdown as `aot --traffic` prints it: by layer kind, then the largest movers."""
  total = traffic.total
  scale, unit = (1e9, "GB") if total >= 1e9 else (1e6, "MB")

  def fmt(n: float) -> str:
    return f"{n / scale:.3f}"

  head = (f"memory traffic per step per device by layer kind, {unit} (counted from {source}: "
          f"{fmt(total)}")
  if compiler_bytes:
    head += f"; the TPU compiler's cost analysis: {fmt(compiler_bytes)}"
  lines = [
      head + f"; of it in arrays the compiler placed in HBM, each copy once: "
      f"{fmt(traffic.hbm)}):",
      "| layer kind | forward | backward | total | share | of which copies | in HBM |",
      "| --- | --- | --- | --- | --- | --- | --- |",
  ]
  for k in traffic.kinds:
    lines.append(f"| {k.kind} | {fmt(k.forward)} | {fmt(k.backward)} | {fmt(k.total)} | "
                 f"{100 * k.total / max(total, 1):.1f}% | {fmt(k.moves)} | {fmt(k.hbm)} |")
  if top and traffic.largest:
    lines += [f"largest {min(top, len(traffic.largest))} instructions of "
              f"{traffic.largest_from}:",
              f"| {unit} per step | runs | pass | opcode | result | op_name (last scopes) |",
              "| --- | --- | --- | --- | --- | --- |"]
    for i in traffic.largest[:top]:
      runs = "?" if i.runs is None else str(i.runs)
      lines.append(f"| {fmt(i.bytes_per_step)} | {runs} | "
                   f"{'backward' if i.backward else 'forward'} | "
                   f"{i.opcode} | `{_short_shape(i.shape)}` | {_short_name(i.op_name)} |")
  return "\n".join(lines)


def _short_shape(shape: str) -> str:
  return re.sub(r"\{[^}]*\}", "", shape)[:70]


def _short_name(op_name: str, keep: int = 4) -> str:
  return "/".join([p for p in op_name.split("/") if p][-keep:])
