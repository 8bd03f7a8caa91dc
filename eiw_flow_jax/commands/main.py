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

import sys

if __name__ == "__main__":
  from eiw_flow_jax.host.process import prepare_command_process

  prepare_command_process()  # before JAX is imported: see eiw_flow_jax.host

import importlib.machinery
import importlib.util
import logging as py_logging
import os
import re

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

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

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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


_CONFIG_EXPECTED = (
    "expected a Python file that defines get_config() (e.g. configs/digits.py), optionally "
    "followed by ':<argument>' for get_config(argument)"
)


def _config_value(argv: list[str]) -> str | None:
  """The last --config value in `argv` (`--config=x` or `--config x`), None if not given."""
  value = None
  for index, arg in enumerate(argv):
    if arg.startswith("--config="):
      value = arg[len("--config="):]
    elif arg == "--config" and index + 1 < len(argv):
      value = argv[index + 1]
  return value


def _load_failure(shown: str, error: BaseException) -> str:
  """One line for a config file that exists but does not load (not Python, no get_config)."""
  message = str(error)
  if "Error whilst parsing config file" in message:  # ml_collections embeds a traceback
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    message = lines[-1] if lines else message
  elif not isinstance(error, (OSError, ImportError)):
    message = f"{type(error).__name__}: {message}"
  detail = " ".join(line.strip() for line in message.splitlines() if line.strip())
  return f"cannot load {shown}: {_CONFIG_EXPECTED}; loading it failed with {detail[:300]}"


def check_config_file(value: str) -> None:
  """ConfigError (one line) unless `value` (`path` or `path:argument`) names a Python file
  that defines get_config().

  ml_collections loads whatever the path names as Python and reports a missing file only when
  the config is first used ("Failed loading config file config_config", without the path); a
  non-Python file fails with its first NameError or SyntaxError and a traceback; and a Python
  file without get_config() silently reuses the get_config() of the module loaded before it
  (the default config), since every config module gets the same name. So the file is executed
  once here, in a fresh module, and checked.
  """
  path, _, _ = value.partition(":")
  shown = f"--config={value}"
  if not path:
    raise checks.ConfigError(f"cannot load {shown}: no file given; {_CONFIG_EXPECTED}.")
  full = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(full):
    raise checks.ConfigError(
        f"cannot load {shown}: {full} does not exist; {_CONFIG_EXPECTED}."
    )
  if not os.path.isfile(full):
    raise checks.ConfigError(f"cannot load {shown}: {full} is not a file; {_CONFIG_EXPECTED}.")
  loader = importlib.machinery.SourceFileLoader("eiw_flow_config_check", full)  # any suffix
  module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
  try:
    loader.exec_module(module)
  except Exception as e:  # noqa: BLE001 - whatever executing a non-config raises
    raise checks.ConfigError(_load_failure(shown, e)) from e
  if not callable(getattr(module, "get_config", None)):
    raise checks.ConfigError(
        f"cannot load {shown}: {_CONFIG_EXPECTED}; {full} defines no get_config()."
    )


def _config_load_error(value: str | None, error: BaseException) -> str:
  shown = f"--config={value}" if value is not None else "--config"
  return f"error: ConfigError: {_load_failure(shown, error)}"


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, but a bad --config path or an unknown --config.<field> is one line."""
  config_value = _config_value(argv)
  if config_value is not None:
    try:
      check_config_file(config_value)
    except checks.ConfigError as e:
      _fail(f"error: ConfigError: {e}")
  try:
    rest = flags.FLAGS(argv)
  except flags.IllegalFlagValueError as e:
    if "Error whilst parsing config file" in str(e):  # get_config raised TypeError/ValueError
      _fail(_config_load_error(config_value, e))
    _fail(f"error: {e}\nPass --help for the flags.")
  except flags.Error as e:
    _fail(f"error: {e}\nPass --help for the flags.")
  except (AttributeError, KeyError) as e:  # --config.<field> names no field
    if isinstance(e, AttributeError) and "get_config" in str(e):  # a file without get_config
      _fail(_config_load_error(config_value, e))
    name, hint = _unknown_field(e)
    bad = [a.split("=", 1)[0] for a in argv if a.startswith("--config.") and name in a]
    shown = bad[0] if bad else f"--config.*{name}"
    _fail(
        f"error: ConfigError: {shown} names no config field ({name!r} is unknown{hint}). The "
        "fields are those of eiw_flow_jax/config.py:base_config and the config file."
    )
  except OSError as e:  # the config file itself
    _fail(_config_load_error(config_value, e))
  except Exception as e:  # noqa: BLE001 - executing a non-Python file: NameError, SyntaxError...
    _fail(_config_load_error(config_value, e))
  try:
    config = _CONFIG.value
    if not isinstance(config, ml_collections.ConfigDict):
      raise TypeError(f"get_config() returned {type(config).__name__}, not a ConfigDict")
    config.get("model")  # a missing or broken config file surfaces on first use
  except (OSError, ImportError, SyntaxError, AttributeError, TypeError) as e:
    _fail(_config_load_error(config_value, e))
  return rest


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  py_logging.getLogger("absl").addFilter(_QuietOrbax())
  try:
    # Orbax's background tracebacks (a failed save, a damaged checkpoint) go to a log file in
    # the workdir: the one-line error stays the last line of the output.
    background_errors.quiet_background_errors(_WORKDIR.value)
    run(_CONFIG.value, _WORKDIR.value, _MODE.value, distributed=_DISTRIBUTED.value,
        allow_config_change=_ALLOW_CONFIG_CHANGE.value, take_over_lock=_TAKE_OVER_LOCK.value)
  except stop_signals.StopRequested as e:
    _fail(f"stopped: {e}", e.exit_code)
  except _USER_ERRORS as e:
    _fail(f"error: {type(e).__name__}: {e}")
  except KeyboardInterrupt:  # outside the training loop (start-up, eval) or a second Ctrl-C
    _fail("interrupted (Ctrl-C): nothing was saved since the last checkpoint; rerun the same "
          "command to resume.", 130)


def cli() -> None:
  """Parses the command line and runs `main` (what `python -m eiw_flow_jax.main` does)."""
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  cli()
