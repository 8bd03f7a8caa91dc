"""Imports a PyTorch state_dict of the authors' DenseFlow / EIW-Flow model into this project.

  python -m eiw_flow_jax.convert --torch_checkpoint=/path/to/checkpoint.pt \\
      --config=configs/cifar10_denseflow.py --workdir=/tmp/df_cifar10

writes the checkpoint training writes (a `TrainState` at step 0, EMA = the imported weights,
a fresh optimizer state) into `<workdir>/checkpoints`, and the config into
`<workdir>/config.json`, so that `python -m eiw_flow_jax.main --mode=eval` (and
`--mode=sample`) run on it. Both the EIW-Flow checkpoints (studying910/EIW-Flow, `DIW-Flow/`)
and DenseFlow's (matejgrcic/DenseFlow, vanilla transitions: use `--config.model.split=vanilla`)
are accepted: their `check/checkpoint.pt` (a dict whose "model" entry is the state_dict), a
bare state_dict, or either saved from `nn.DataParallel` ("module." prefixes).

The reading and the mapping are `eiw_flow_jax.model.backbones.denseflow_torch`'s. A missing or
unreadable file, a bad --config, a checkpoint that does not fit the config and a workdir that
cannot be written end in one line (exit 1).
"""


from __future__ import annotations

if __name__ == "__main__":
  from eiw_flow_jax.host.process import prepare_command_process

  prepare_command_process()  # before JAX is imported: see eiw_flow_jax.host

import os
from collections.abc import Callable
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from eiw_flow_jax.commands import command_line
from eiw_flow_jax.config import checks
from eiw_flow_jax.model.backbones.denseflow_torch import (
  ConversionError,
  authors_weight_ties,
  convert_state_dict,
  describe_weight_ties,
  read_torch_file,
  state_dict_from,
)
from eiw_flow_jax.training import resume
from eiw_flow_jax.training.run import Run
from eiw_flow_jax.workdir import checkpointing, storage

# Errors that are the user's to fix: one line, exit 1.
_USER_ERRORS = (
    FileNotFoundError, ConversionError, checks.ConfigError, storage.StorageError,
    checkpointing.CheckpointError,
)


def convert_checkpoint(
    torch_checkpoint: str, config: Any, workdir: str,
    report: Callable[[str], None] | None = print,
) -> str:
  """Writes `<workdir>/checkpoints/0` (a TrainState) from the .pt file; returns its directory.

  The run is assembled as training assembles it (`training.run.Run`) and the checkpoint saved
  as training saves it, digests included, so eval, sampling, `load` and resuming verify it.
  `report` (a callable of one string, or None) receives one line on the EIW channel order:
  whether the authors' float32 channel weights tie (`describe_weight_ties`).
  """
  state_dict = state_dict_from(read_torch_file(torch_checkpoint))  # before the model's build
  run = Run.build(config)
  variables = convert_state_dict(state_dict, run.flow)
  if report is not None:
    report(describe_weight_ties(authors_weight_ties(variables)))
  state = run.state_from_variables(variables)
  with storage.writing("the workdir", workdir):
    os.makedirs(workdir, exist_ok=True)
  resume.save_config(config, workdir)
  manager = checkpointing.make_manager(workdir, keep=config.keep_checkpoints)
  try:
    checkpointing.save(manager, 0, state, force=True)
    checkpointing.wait(manager)
  finally:
    manager.close()
  return checkpointing.checkpoint_dir(workdir)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    workdir = command_line.check_workdir(_WORKDIR.value)
    path = convert_checkpoint(_TORCH.value, _CONFIG.value, workdir)
  except _USER_ERRORS as e:
    command_line.fail(f"error: {type(e).__name__}: {e}")
  print(f"Wrote {path} (step 0). Evaluate it with: python -m eiw_flow_jax.main "
        f"--config=<the same config> --workdir={_WORKDIR.value} --mode=eval", flush=True)


def _define_flags() -> None:
  """The command's flags, defined when it runs (importing this module defines none, so it can
  share a process with `commands.main`, whose --config and --workdir have the same names)."""
  global _CONFIG, _TORCH, _WORKDIR
  _CONFIG = config_flags.DEFINE_config_file(
      "config", None, "Config file (configs/*_denseflow.py); override fields with "
      "--config.<field>=<value>.", lock_config=True)
  _TORCH = flags.DEFINE_string("torch_checkpoint", None, "The authors' .pt file.")
  _WORKDIR = flags.DEFINE_string("workdir", None, "Where to write the Orbax checkpoint.")
  flags.mark_flags_as_required(["config", "torch_checkpoint", "workdir"])


def cli() -> None:
  """Parses the command line and runs `main` (what `python -m eiw_flow_jax.convert` does)."""
  _define_flags()
  command_line.run(main, flags_parser=lambda argv: command_line.parse_flags(argv, _CONFIG))


if __name__ == "__main__":
  cli()
