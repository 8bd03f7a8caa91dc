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
mismatch on resume, divergence); 143 stopped by SIGTERM and 130 by SIGINT with the checkpoints
saved (rerun the same command to resume, or to finish the final evaluation and sampling).
--take_over_lock starts even when the workdir's LOCK names a run that may be alive.
"""

from __future__ import annotations

if __name__ == "__main__":
  from eiw_flow_jax.host.process import prepare_command_process

  prepare_command_process()  # before JAX is imported: see eiw_flow_jax.host

import logging as py_logging

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from eiw_flow_jax.commands import command_line
from eiw_flow_jax.config import checks
from eiw_flow_jax.training import (
    evaluate,
    resume,
    run_config,
    sample_grids,
    train_loop,
    train_state,
)
from eiw_flow_jax.workdir import (
    background_errors,
    checkpointing,
    divergence,
    stop_signals,
    storage,
    workdir_lock,
)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None,
    "Config file (configs/<name>.py); override fields with --config.<field>=<value>. "
    "Default: configs/digits.py of this checkout.",
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
_TAKE_OVER_LOCK = flags.DEFINE_bool(
    "take_over_lock", False,
    "Take over the workdir's LOCK even if its holder may still be running (you know it is gone). "
    "Without it, a lock whose holder is provably gone is taken over by itself and a live one "
    "refuses the start.",
)
flags.mark_flag_as_required("workdir")

# Errors that are the user's to fix; anything else keeps its traceback.
_USER_ERRORS = (
    checks.ConfigError,
    FileNotFoundError,
    train_loop.NonFiniteError,
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
    allow_config_change: bool = False, take_over_lock: bool = False,
) -> dict | None:
  """What the command does, callable from Python; returns the results of train/eval.

  SIGTERM/SIGINT end it with stop_signals.StopRequested: in training after saving a checkpoint,
  afterwards (the final evaluation and sampling, `eval`, `sample`) at once, naming what is not
  written yet.
  """
  storage.normalize_dir(workdir, "--workdir")  # "" must not mean the current directory
  run_config.validate_config(config)  # what can be checked before touching any device
  if distributed or config.distributed:
    jax.distributed.initialize(
        coordinator_address=_COORDINATOR.value if flags.FLAGS.is_parsed() else None,
        num_processes=_NUM_PROCESSES.value if flags.FLAGS.is_parsed() else None,
        process_id=_PROCESS_ID.value if flags.FLAGS.is_parsed() else None,
    )
  run_config.validate_config(
      config, num_devices=jax.device_count(), num_processes=jax.process_count()
  )
  with config.unlocked():
    workdir = resolve_paths(config, workdir)
  logging.info(
      "Mode %s, workdir %s, %d devices (%s) in %d processes.",
      mode, workdir, jax.device_count(), jax.devices()[0].device_kind, jax.process_count(),
  )
  if mode == "train":
    results = train_loop.train_and_evaluate(
        config, workdir, allow_config_change=allow_config_change, take_over_lock=take_over_lock
    )
    if jax.process_index() == 0:
      print(f"Final test bpd ({results['dataset']}, {results['num_evaluated']} examples, "
            f"step {results['step']}): {results['bpd']:.4f}", flush=True)
    return results
  sample_grids.check_writable(workdir, mode)  # before the evaluation, not after it
  with stop_signals.StopSignals() as signals:
    left = "results.json" if mode == "eval" else f"the sample grids ({sample_grids.SAMPLES_DIR}/)"
    signals.stop_at_once(lambda signum: stop_signals.StopRequested(
        signum, None, checkpointing.checkpoint_dir(workdir), left=left))
    return _evaluate_or_sample(config, workdir, mode)


def _evaluate_or_sample(config, workdir: str, mode: str) -> dict | None:
  restored = resume.restore_for_inference(config, workdir)
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
  paths = sample_grids.write_sample_grids(
      config, workdir, restored.flow, variables, restored.mesh, keys["sample"],
      step=restored.step,
  )
  if jax.process_index() == 0:
    print("Wrote " + ", ".join(paths), flush=True)
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, but a bad --config path or an unknown --config.<field> is one line."""
  return command_line.parse_flags(argv, _CONFIG, default_config=command_line.DEFAULT_CONFIG)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  py_logging.getLogger("absl").addFilter(_QuietOrbax())
  try:
    command_line.check_workdir(_WORKDIR.value)
    # Orbax's background tracebacks (a failed save, a damaged checkpoint) go to a log file in
    # the workdir: the one-line error stays the last line of the output.
    background_errors.quiet_background_errors(_WORKDIR.value)
    run(_CONFIG.value, _WORKDIR.value, _MODE.value, distributed=_DISTRIBUTED.value,
        allow_config_change=_ALLOW_CONFIG_CHANGE.value, take_over_lock=_TAKE_OVER_LOCK.value)
  except stop_signals.StopRequested as e:
    command_line.fail(f"stopped: {e}", e.exit_code)
  except _USER_ERRORS as e:
    command_line.fail(f"error: {type(e).__name__}: {e}")
  except KeyboardInterrupt:  # outside the training loop (start-up, eval) or a second Ctrl-C
    command_line.fail("interrupted (Ctrl-C): nothing was saved since the last checkpoint; "
                      "rerun the same command to resume.", 130)


def cli() -> None:
  """Parses the command line and runs `main` (what `python -m eiw_flow_jax.main` does)."""
  command_line.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  cli()
