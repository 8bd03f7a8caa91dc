"""Where the CPU train step's time goes: XLA:CPU's per-op trace, summed by kind and by model part.

Builds the same step as `bench/peer_pytorch.py`'s JAX peer (this project's train step at the
CIFAR benchmark config by default; same model flags), runs a few warm-up steps, then traces
`--steps` steps with `jax.profiler` while XLA:CPU emits one trace event per executed HLO op
(`--xla_cpu_enable_xprof_traceme=true`). Each op's event is mapped back to the model through the
`op_name` metadata of the compiled HLO, and the op time is summed:

- by op kind (the HLO instruction's name without its number: `ynn_fusion` is a YNNPACK matmul or
  convolution fusion, `dot` an XLA (Eigen) dot, `*_fusion` XLA's own loop fusions, ...);
- by phase (forward, backward, update) and model part (ActNorm, the 1x1 convolution, the
  coupling network, split priors, optimizer, EMA, ...), with flow-step and level numbers folded.

Op time is summed over threads, so with ops running concurrently it can exceed the wall time;
both are printed. An XLA (Eigen) `dot`'s event covers only its launch: its work shows up as time
when no op runs, just before the op that waits for its result. Runs under the command line's
glibc malloc tunables (as the CLI does).

  python bench/profile_step.py                           # CIFAR config, 3 traced steps
  python bench/profile_step.py --hidden=64 --top_rows=30
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

from absl import app, flags

from eiw_flow_jax.model.bijectors import LAYER_SCOPES

flags.DEFINE_integer("traced_steps", 3, "Steps traced (after the warm-up).")
flags.DEFINE_integer("warmup_steps", 3, "Untraced steps first.")
flags.DEFINE_integer("top_rows", 20, "Rows printed per table.")
flags.DEFINE_string("trace_dir", "", "Where to keep the trace (default: a temporary directory).")
FLAGS = flags.FLAGS

# Name of a flow step in op_name metadata, "level0_step3" (unrolled) or the scope of a level's
# scanned steps, "level0_steps"; folded for the summary.
_STEP_NAME = re.compile(r"level\d+_step(\d+|s)")
# Scopes between a step's name and its layers: the scan's body, the parentless step module
# applied to the step's variables (glow.MultiScaleFlow._run_steps), a rematerialised call.
_STEP_WRAPPERS = ("while", "body", "closed_call", "FlowStep", "checkpoint", "remat",
                  "rematted_computation")
_LEVEL_NAME = re.compile(r"level\d+")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{op_name=\"([^\"]*)\"")
# Control flow whose events span the ops inside them (those are traced, and counted, themselves).
_CONTAINERS = ("cond", "conditional", "while", "call")
_FLOW_STEP_PARTS = {"layers_0": "ActNorm", "layers_1": "1x1 conv (LU)", "layers_2": "coupling"}


def op_names(hlo_text: str) -> dict[str, str]:
  """Instruction name -> op_name metadata, for every instruction of the compiled HLO."""
  names = {}
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if match:
      names[match.group(1)] = match.group(2)
  return names


def op_kind(instruction: str) -> str:
  """`multiply_reduce_fusion.74` -> `multiply_reduce_fusion`, `dot.3` -> `dot`."""
  return re.sub(r"\.\d+$", "", instruction)


def model_part(op_name: str) -> tuple[str, str]:
  """(phase, part) of one op from its op_name: phase forward / backward / update; part the module
  path below the flow step (`coupling/net/ZeroConv_0`), flow-step and level numbers folded."""
  if "transpose(" in op_name:
    phase = "backward"
  elif "jvp(" in op_name:
    phase = "forward"
  else:
    phase = "update"
  path = [p for p in op_name.split("/")[:-1]  # the last element is the primitive
          if not p.startswith(("jit(", "jvp(", "transpose(", "MultiScaleFlow."))
          and p not in LAYER_SCOPES]  # the layers' own scopes repeat what the path says
  if phase == "update":
    return phase, "Adam + EMA (under the finite cond)" if "cond" in path else "gradient norm, guard"
  # The last flow-step name: a custom rule's ops (channel_matmul's kernel gradient) carry the
  # path of the forward op they came from nested inside the backward one.
  for index in reversed(range(len(path))):
    name = path[index]
    if _STEP_NAME.fullmatch(name):
      inner = path[index + 1:]
      while inner and inner[0] in _STEP_WRAPPERS:
        inner = inner[1:]
      if not inner:
        return phase, "flow step"
      return phase, "/".join([_FLOW_STEP_PARTS.get(inner[0], inner[0]), *inner[1:]])
  return phase, _LEVEL_NAME.sub("level", "/".join(path)) or "(top)"


def summarise(events: list[dict], names: dict[str, str]) -> dict[str, collections.Counter]:
  """Op-time sums (microseconds) by kind and by (phase, part) over the traced ops."""
  by_kind, by_part, counts = collections.Counter(), collections.Counter(), collections.Counter()
  for event in events:
    name = event.get("name", "")
    if event.get("ph") != "X" or name not in names or op_kind(name) in _CONTAINERS:
      continue
    by_kind[op_kind(name)] += event["dur"]
    by_part[model_part(names[name])] += event["dur"]
    counts[op_kind(name)] += 1
  return {"kind": by_kind, "part": by_part, "count": counts}


def busy_micros(events: list[dict], names: dict[str, str]) -> float:
  """Length of the union of the traced ops' intervals: time when at least one op's event was
  open. The rest of the wall time is dispatch, waiting, and work whose event covers only its
  launch: XLA:CPU's Eigen dots run asynchronously (docs/performance.md)."""
  spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                 if e.get("ph") == "X" and e.get("name", "") in names)
  busy, end = 0.0, -float("inf")
  for start, stop in spans:
    if stop > end:
      busy += stop - max(start, end)
      end = stop
  return busy


def _print_table(title: str, sums: collections.Counter, total: float, steps: int, top: int,
                 counts: collections.Counter | None = None) -> None:
  print(f"\n{title}")
  for key, micros in sums.most_common(top):
    label = " / ".join(key) if isinstance(key, tuple) else key
    extra = f"  {counts[key] / steps:7.0f} ops" if counts is not None else ""
    print(f"  {label:58s} {micros / steps / 1e3:8.1f} ms  {100 * micros / total:5.1f}%{extra}")


def main(argv):
  del argv
  from eiw_flow_jax.host import malloc as host_malloc  # noqa: PLC0415 - before jax (re-exec)
  from eiw_flow_jax.host import threads as host_threads

  host_malloc.reexec_with_malloc_tunables()
  host_threads.limit_blas_threads()
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_cpu_enable_xprof_traceme=true").strip()
  import jax  # noqa: PLC0415
  import peer_pytorch  # noqa: PLC0415 - already imported under __main__, for its model flags

  run, info = peer_pytorch.jax_peer()
  names = op_names(info["compiled"].as_text())
  for _ in range(FLAGS.warmup_steps):
    run()
  trace_dir = FLAGS.trace_dir or tempfile.mkdtemp(prefix="eiw_profile_")
  walls = []
  jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
  for _ in range(FLAGS.traced_steps):
    start = time.perf_counter()
    run()
    walls.append(time.perf_counter() - start)
  jax.profiler.stop_trace()
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
  if not paths:
    raise SystemExit(f"no *.trace.json.gz under {trace_dir}: the profiler wrote no trace")
  path = paths[-1]
  with gzip.open(path) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  sums = summarise(events, names)
  total = sum(sums["kind"].values())
  steps = FLAGS.traced_steps
  print(f"{peer_pytorch.model_flag_args()}  GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')}")
  print(f"wall ms/step (traced): {', '.join(f'{1e3 * w:.0f}' for w in walls)}; "
        f"op time summed over threads: {total / steps / 1e3:.0f} ms/step, some op running: "
        f"{busy_micros(events, names) / steps / 1e3:.0f} ms/step; "
        f"{info['flops'] / 1e9:.1f} GFLOP/step (XLA cost analysis); trace: {trace_dir}")
  _print_table("by op kind", sums["kind"], total, steps, FLAGS.top_rows, sums["count"])
  _print_table("by phase / model part", sums["part"], total, steps, FLAGS.top_rows)


if __name__ == "__main__":
  import peer_pytorch  # noqa: F401,E402 - registers the model flags before absl parses argv

  app.run(main)
