"""`python -m eiw_flow_jax.aot`: the ahead-of-time check from the command line (the library is
`eiw_flow_jax.aot`)."""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
  # The command compiles for a topology and never runs on local devices: JAX's CPU backend, so
  # that it neither probes nor takes the TPU chips or GPUs of the machine it runs on (a TPU VM
  # or GPU node may be training on them), before JAX is imported.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  # XLA's C++ log off: the command prints its report, or one line where a config does not fit,
  # and the compiler's failures reach it as exceptions. Its log would add a warning where a
  # program is too large for a GPU (rematerialisation) and an alarm where a compile takes
  # minutes. Unset or JAX's own default ("1", inherited from a parent JAX process) only: an
  # explicit TF_CPP_MIN_LOG_LEVEL=0 keeps the log.
  if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "1") == "1":
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"

import importlib.util
import json
from typing import Any

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from eiw_flow_jax.aot import AotError, compare
from eiw_flow_jax.aot.chips import GPUS
from eiw_flow_jax.aot.compiler import compile_for_topology
from eiw_flow_jax.aot.report import AotReport, markdown_table, render, report_dict, table_row
from eiw_flow_jax.aot.search import largest_batch
from eiw_flow_jax.commands import command_line


def load_config(path: str, overrides: dict[str, Any] | None = None) -> ml_collections.ConfigDict:
  """`get_config()` of a config file, as `--config=` reads it: `configs/<name>.py`, or
  `configs/<name>.py:<hardware>` for `get_config(<hardware>)`; then `overrides` (dotted field
  -> value, the command line's `--config.<field>=<value>`)."""
  file, _, hardware = path.partition(":")
  if not os.path.isfile(file):
    raise AotError(f"config file {file!r} not found.")
  spec = importlib.util.spec_from_file_location("_aot_config", file)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    config = module.get_config(hardware) if hardware else module.get_config()
  except TypeError as e:
    if hardware and "positional argument" in str(e):
      raise AotError(f"{file} has no hardware variants; got ':{hardware}'.") from e
    raise AotError(f"cannot load {path}: TypeError: {e}") from e
  except Exception as e:  # noqa: BLE001 - a broken config file is the user's to fix
    raise AotError(f"cannot load {path}: {type(e).__name__}: {e}") from e
  for dotted, value in (overrides or {}).items():
    try:
      config.update_from_flattened_dict({dotted: value})
    except KeyError as e:
      raise AotError(f"--config.{dotted}: {path} has no field {dotted}.") from e
  return config


# ----------------------------------------------------------------------------------------------
# Command line.

def _define_flags() -> None:
  """The command's flags, defined when it runs (importing this module defines none, so it can
  share a process with `commands.main`, whose --config has the same name)."""
  global _CONFIG, _TOPOLOGY, _NUM_SLICES, _PER_DEVICE_BATCH, _EVAL, _EXACT_COST
  global _MAX_BATCH_SEARCH, _JSON, _TABLE, _TRAFFIC, _TRAFFIC_TOP, _COMPARE, _COMPARE_MEMORY
  global _COMPARE_DTYPE
  _CONFIG = config_flags.DEFINE_config_file(
      "config", None,
      "Config file (configs/<name>.py); override fields with --config.<field>=<value>. "
      "Default: configs/digits.py of this checkout.",
      lock_config=True,
  )
  _TOPOLOGY = flags.DEFINE_list(
      "topology", ["v5e:2x2"],
      "TPU topology as JAX names it: v5e:2x2, v5e:4x4, v4:2x2x1, v5p:2x2x1, v6e:2x4, ...; or "
      f"GPUs ({', '.join(GPUS)}) as GPUs per host, hosts x GPUs per host, or XLA's partitions "
      "x hosts x GPUs per host: h100:8, h100:2x8, h100:1x2x8 (several, comma-separated, with "
      "--table).")
  _NUM_SLICES = flags.DEFINE_integer(
      "num_slices", 1,
      "Slices of that topology joined by the data-center network (TPU multi-slice; for GPUs, "
      "XLA's partitions).")
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
      "A 'before you rent' table over the config files given as arguments (configs/x.py or "
      "configs/x.py:<hardware>; --config.<field>=<value> overrides apply to each) and every "
      "--topology: fits, GiB per device, the roofline's lower bounds on the step time and the "
      "wall time to num_train_steps.")
  _TRAFFIC = flags.DEFINE_bool(
      "traffic", False,
      "Also print where the train step's bytes go: per layer kind (forward, backward, copies) "
      "and the largest instructions, counted from the compiled programs (the cost's).")
  _TRAFFIC_TOP = flags.DEFINE_integer(
      "traffic_top", 15, "With --traffic: how many of the largest instructions to list.")
  _COMPARE = flags.DEFINE_bool(
      "compare", False,
      "Table the config's memory modes and coupling-network dtypes side by side (train step "
      "only): memory per device, GFLOP and GB per step, roofline; with --traffic, GB per layer "
      "kind of each.")
  _COMPARE_MEMORY = flags.DEFINE_list(
      "compare_memory", None,
      "With --compare: the model.memory values (default: every mode the backbone supports).")
  _COMPARE_DTYPE = flags.DEFINE_list(
      "compare_dtype", ["auto", "bfloat16"], "With --compare: the model.dtype values.")


def _fail(message: str, code: int = 1) -> None:
  print(message, file=sys.stderr, flush=True)
  sys.exit(code)


def _write_json(value: Any) -> None:
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(value, f, indent=2, default=str)


def _run_one(config, name: str, topology: str, with_eval: bool | None = None) -> AotReport:
  report = compile_for_topology(
      config, topology, _PER_DEVICE_BATCH.value, num_slices=_NUM_SLICES.value,
      with_eval=_EVAL.value if with_eval is None else with_eval, config_name=name,
      exact_cost=_EXACT_COST.value, with_traffic=_TRAFFIC.value,
  )
  return report


def _compare(config, name: str, topology: str) -> None:
  """--compare: the variants' table (and with --traffic their bytes per layer kind)."""
  chosen = compare.variants(_COMPARE_MEMORY.value or compare.memory_modes(config),
                            _COMPARE_DTYPE.value)

  def compile_variant(variant_config):
    report = _run_one(variant_config, name, topology, with_eval=False)
    print(f"{name} on {topology}, memory={variant_config.model.memory}, "
          f"dtype={variant_config.model.dtype}: compiled in {report.compile_seconds:.0f} s",
          file=sys.stderr, flush=True)
    return report

  results = compare.compare(config, chosen, compile_variant)
  print(f"{name} on {topology}, {results[0][1].per_device_batch} images per device "
        "(TPU compiler; per device, train step):", flush=True)
  print(compare.table(results), flush=True)
  if _TRAFFIC.value:
    print("GB per step per device by layer kind (counted from the compiled programs):")
    print(compare.traffic_table(results), flush=True)
  _write_json([{"variant": v.label, **report_dict(r)} for v, r in results])


def main(argv: list[str]) -> None:
  # JAX's persistent compilation cache writes these executables but cannot read them back
  # without a TPU client (a warning, then a recompile): off for this command.
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    if _TABLE.value:
      if len(argv) < 2:
        raise app.UsageError("--table needs config files: --table configs/a.py configs/b.py")
      rows, reports = [], []
      # The --config.<field>=<value> overrides apply to every config of the table.
      overrides = config_flags.get_override_values(flags.FLAGS["config"])
      configs = [(path, load_config(path, overrides)) for path in argv[1:]]  # all errors first
      for path, config in configs:
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
    if _COMPARE.value:
      _compare(_CONFIG.value, name, _TOPOLOGY.value[0])
      return
    report = _run_one(_CONFIG.value, name, _TOPOLOGY.value[0])
    if not report.fits:
      _write_json(report_dict(report))
      _fail(report.one_line())
    if _MAX_BATCH_SEARCH.value > 0:
      report.batch_search = largest_batch(
          _CONFIG.value, report.topology, report, budget_s=_MAX_BATCH_SEARCH.value,
          num_slices=_NUM_SLICES.value,
      )
    print(render(report, traffic_top=_TRAFFIC_TOP.value), flush=True)
    _write_json(report_dict(report))
  except AotError as e:
    _fail(f"error: {e}")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing; a bad flag, config path or --config.<field> is one line."""
  return command_line.parse_flags(argv, _CONFIG, default_config=command_line.DEFAULT_CONFIG)


def cli() -> None:
  """Parses the command line and runs `main` (what `python -m eiw_flow_jax.aot` does)."""
  _define_flags()
  command_line.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  cli()
