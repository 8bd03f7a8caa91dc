"""Loading a trained run for inference: `eiw_flow_jax.load(workdir)`.

  flow, variables, config, step = eiw_flow_jax.load(workdir)   # local or gs://, EMA weights

The flow's exploration methods (`interpolate`, `bits_per_dim_map`, `shuffle_assignment`) are in
`eiw_flow_jax.model.explore`; `notebooks/explore.ipynb` shows both.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import ml_collections

from eiw_flow_jax.model.flow import Flow
from eiw_flow_jax.training import resume
from eiw_flow_jax.training.run import Run
from eiw_flow_jax.training.sharding import make_mesh
from eiw_flow_jax.workdir import checkpointing, storage

Variables = dict[str, Any]


class LoadedFlow(NamedTuple):
  """What `load` returns; unpacks as `flow, variables, config, step = load(workdir)`."""

  flow: Flow
  variables: Variables  # {"params": EMA (or raw) parameters, "constants": ...}
  config: ml_collections.ConfigDict
  step: int


def load(
    workdir: str, *, ema: bool = True, config: ml_collections.ConfigDict | None = None
) -> LoadedFlow:
  """(flow, variables, config, step) of the newest good checkpoint in `workdir`.

  `workdir` is a training run's --workdir, or the output of `python -m eiw_flow_jax.convert` (the
  authors' PyTorch checkpoint converted), local or an `etils.epath` URL (gs://...). The config is
  the workdir's config.json (`resume.read_saved_config`: fields added since it was written get
  their defaults) unless `config` is given. Only what inference needs is read from disk: the EMA
  parameters (`ema=False`: the raw ones) and the constants, verified against the checkpoint's
  digests like every read (a damaged checkpoint is skipped with a warning for the one before;
  an older parameter layout is migrated); the optimizer state is left there. The arrays land on
  the first local device. Read-only: safe while a run writes there.

  Raises FileNotFoundError (one line) for a missing workdir or one without checkpoints,
  ConfigError for a config that cannot be read or run, and checkpointing.CheckpointError if
  checkpoints exist but none can be read.
  """
  workdir = storage.normalize_dir(workdir, "workdir")
  if not storage.path(workdir).is_dir():
    raise FileNotFoundError(f"No such workdir: {workdir}.")
  if not checkpointing.has_checkpoints(workdir):
    raise FileNotFoundError(
        f"No checkpoint in {checkpointing.checkpoint_dir(workdir)}: train with "
        f"--workdir={workdir} first (or convert the authors' checkpoint into it)."
    )
  if config is None:
    try:
      config = resume.read_saved_config(workdir)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"{e} Pass config= to load with another config.") from None
  run = Run.build(config, make_mesh(jax.local_devices()[:1]))
  step, variables = run.restore_variables(workdir, ema=ema)
  return LoadedFlow(run.flow, variables, config, step)
