"""Command line: train (then evaluate and sample), evaluate, or sample an EIW-Flow.

  python -m eiw_flow_jax.main --config=configs/digits.py --workdir=/tmp/digits
  python -m eiw_flow_jax.main --config=configs/digits.py --workdir=/tmp/digits --mode=eval
  python -m eiw_flow_jax.main --config=configs/digits.py --workdir=/tmp/digits --mode=sample
  python -m eiw_flow_jax.main --config=configs/cifar10.py --config.model.split=vanilla \\
      --config.batch_size=256 --workdir=...

Re-running the same train command resumes from the newest readable checkpoint. Every config
field can be overridden with --config.<field>=<value>; the config is validated before any
compute, and bad configs, missing data and diverged runs end with a one-line error (exit 1).
--workdir and the config's data_dir may be local paths or URLs (gs://bucket/run).

Exit status: 0 done; 1 a one-line error (config, data, busy workdir, failed save, config
mismatch on resume, divergence); 143 stopped by SIGTERM and 130 by SIGINT after saving a
checkpoint (rerun the same command to resume).
"""

from __future__ import annotations

import sys

from eiw_flow_jax import host_malloc, host_threads

if __name__ == "__main__":
  # First thing, before JAX and the rest are imported (the package's __init__ imports nothing
  # heavy): the re-executed process then imports them once, not twice (~4 s per start).
  try:
    host_malloc.reexec_with_malloc_tunables()  # glibc malloc for XLA:CPU's buffers (see module)
  except ValueError as e:  # a bad EIW_FLOW_JAX_HOST_MALLOC
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  host_threads.limit_blas_threads()  # OpenBLAS under XLA's LAPACK calls: one thread (see module)

import logging as py_logging
import os
import re

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from eiw_flow_jax import (
    checkpointing,
    config_lib,
    divergence,
    evaluate,
    stop_signals,
    storage,
    train,
    train_state,
    workdir_lock,
)

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    os.path.join(_REPO_ROOT, "configs", "digits.py"),
    "Config file (configs/<name>.py); override fields with --config.<field>=<value>.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, TensorBoard events, results and samples."
)
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "eval", "sample"],
    "train: train (resuming if possible), then eval + sample; eval: test bpd of the latest "
    "checkpoint into results.json; sample: PNG grids of the latest checkpoint.",
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Call jax.distributed.initialize() (multi-host); same as --config.distributed=True.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0, for jax.distributed.initialize when the cluster is not detected.",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Process count (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False,
    "Resume even though the config differs from the workdir's config.json in model, batch "
    "size, seed or dataset (a deliberate change; architecture changes still cannot restore).",
)
flags.mark_flag_as_required("workdir")

# Errors that are the user's to fix; anything else keeps its traceback.
_USER_ERRORS = (
    config_lib.ConfigError,
    FileNotFoundError,
    train.NonFiniteError,
    checkpointing.CheckpointError,
    storage.StorageError,
    workdir_lock.WorkdirBusyError,
    divergence.DivergedError,
)


class _QuietOrbax(py_logging.Filter):
  """Drops Orbax's INFO chatter (several lines per save); its warnings still show."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or "orbax" not in record.pathname


def resolve_paths(config, workdir: str) -> str:
  """Makes local data paths and the workdir absolute; URLs (gs://...) are kept as they are."""
  for field in ("data_dir", "source_dir"):
    value = config.dataset[field]
    if value:
      config.dataset[field] = storage.normalize_dir(value, f"config.dataset.{field}")
  return storage.normalize_dir(workdir, "--workdir")


def run(
    config, workdir: str, mode: str, *, distributed: bool = False,
    allow_config_change: bool = False,
) -> dict | None:
  """What the command does, callable from Python; returns the results of train/eval."""
  storage.normalize_dir(workdir, "--workdir")  # "" must not mean the current directory
  config_lib.validate_config(config)  # what can be checked before touching any device
  if distributed or config.distributed:
    jax.distributed.initialize(
        coordinator_address=_COORDINATOR.value if flags.FLAGS.is_parsed() else None,
        num_processes=_NUM_PROCESSES.value if flags.FLAGS.is_parsed() else None,
        process_id=_PROCESS_ID.value if flags.FLAGS.is_parsed() else None,
    )
  config_lib.validate_config(
      config, num_devices=jax.device_count(), num_processes=jax.process_count()
  )
  with config.unlocked():
    workdir = resolve_paths(config, workdir)
  logging.info(
      "Mode %s, workdir %s, %d devices (%s) in %d processes.",
      mode, workdir, jax.device_count(), jax.devices()[0].device_kind, jax.process_count(),
  )
  if mode == "train":
    results = train.train_and_evaluate(
        config, workdir, allow_config_change=allow_config_change
    )
    if jax.process_index() == 0:
      print(f"Final test bpd ({results['dataset']}, {results['num_evaluated']} examples, "
            f"step {results['step']}): {results['bpd']:.4f}", flush=True)
    return results
  restored = train.restore_for_inference(config, workdir)
  keys = train_state.rng_keys(config)
  variables = restored.state.variables(ema=True)
  if mode == "eval":
    results = evaluate.evaluate_and_write(
        config, workdir, restored.flow, variables, restored.mesh, keys["eval"],
        info=restored.info, step=restored.step,
    )
    if jax.process_index() == 0:
      print(f"Test bpd ({results['dataset']}, step {results['step']}): {results['bpd']:.4f}",
            flush=True)
      if "elbo_bpd" in results:  # DenseFlow: a bound; the IWBO is what the papers report
        iwbo = (f", IWBO (k={results['iwbo_k']}) {results['iwbo_bpd']:.4f}"
                if "iwbo_bpd" in results else "")
        print(f"Test ELBO {results['elbo_bpd']:.4f}{iwbo} bits/dim", flush=True)
    return results
  paths = evaluate.write_sample_grids(
      config, workdir, restored.flow, variables, restored.mesh, keys["sample"]
  )
  if jax.process_index() == 0:
    print("Wrote " + ", ".join(paths), flush=True)
  return None


def _fail(message: str, code: int = 1) -> None:
  print(message, file=sys.stderr, flush=True)
  sys.exit(code)


def _unknown_field(error: Exception) -> tuple[str, str]:
  """(field name, ', did you mean ...' or '') from ml_collections' error for an unknown field."""
  message = error.args[0] if error.args else error
  if isinstance(message, BaseException):  # AttributeError wrapping the KeyError
    message = message.args[0] if message.args else str(message)
  message = str(message)
  first = message.splitlines()[0] if message else ""
  quoted = re.search(r'Key "([^"]+)"', first) or re.search(r"'([^']+)'", first)
  name = quoted.group(1) if quoted else first.strip("\"'")
  suggestion = re.search(r'Did you mean "([^"]+)"', message)
  return name, f"; did you mean {suggestion.group(1)!r}?" if suggestion else ""


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, but a bad --config path or an unknown --config.<field> is one line."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    _fail(f"error: {e}\nPass --help for the flags.")
  except (AttributeError, KeyError) as e:  # --config.<field> names no field
    name, hint = _unknown_field(e)
    bad = [a.split("=", 1)[0] for a in argv if a.startswith("--config.") and name in a]
    shown = bad[0] if bad else f"--config.*{name}"
    _fail(
        f"error: ConfigError: {shown} names no config field ({name!r} is unknown{hint}). The "
        "fields are those of eiw_flow_jax/config_lib.py:base_config and the config file."
    )
  except OSError as e:  # the config file itself
    _fail(f"error: ConfigError: cannot load --config: {str(e).splitlines()[0]}")
  try:
    _CONFIG.value.get("model")  # a missing or broken config file surfaces on first use
  except (OSError, ImportError, SyntaxError, AttributeError) as e:
    detail = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    given = [a for a in argv if a.startswith("--config=")] or ["--config"]
    _fail(f"error: ConfigError: cannot load {given[-1]}: {detail[:400]}")
  return rest


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  py_logging.getLogger("absl").addFilter(_QuietOrbax())
  try:
    run(_CONFIG.value, _WORKDIR.value, _MODE.value, distributed=_DISTRIBUTED.value,
        allow_config_change=_ALLOW_CONFIG_CHANGE.value)
  except stop_signals.StopRequested as e:
    _fail(f"stopped: {e}", e.exit_code)
  except _USER_ERRORS as e:
    _fail(f"error: {type(e).__name__}: {e}")
  except KeyboardInterrupt:  # outside the training loop (start-up, eval) or a second Ctrl-C
    _fail("interrupted (Ctrl-C): nothing was saved since the last checkpoint; rerun the same "
          "command to resume.", 130)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
