"""Loading a trained run for inference: `eiw_flow_jax.load(workdir)`.

  flow, variables, config, step = eiw_flow_jax.load(workdir)   # local or gs://, EMA weights

The flow's exploration methods (`interpolate`, `bits_per_dim_map`, `shuffle_assignment`) are in
`eiw_flow_jax.model.explore`; `notebooks/explore.ipynb` shows both.
"""

from __future__ import annotations

import json
import types
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from eiw_flow_jax.model.flow import Flow, build_flow
from eiw_flow_jax.workdir import checkpointing

Variables = dict[str, Any]


class LoadedFlow(NamedTuple):
  """What `load` returns; unpacks as `flow, variables, config, step = load(workdir)`."""

  flow: Flow
  variables: Variables  # {"params": EMA (or raw) parameters, "constants": ...}
  config: ml_collections.ConfigDict
  step: int


def _read_config(workdir: str) -> ml_collections.ConfigDict:
  from eiw_flow_jax.training import resume
  from eiw_flow_jax.workdir import storage

  file = storage.path(workdir, resume.CONFIG_FILE)
  try:
    text = file.read_text()
  except FileNotFoundError:
    raise FileNotFoundError(
        f"No {resume.CONFIG_FILE} in {workdir}: expected the --workdir of a training run (or "
        "of eiw_flow_jax.commands.convert); pass config= to load with another config."
    ) from None

  def tuples(value: Any) -> Any:  # JSON has no tuples; the configs' sequences are tuples
    if isinstance(value, dict):
      return {k: tuples(v) for k, v in value.items()}
    return tuple(tuples(v) for v in value) if isinstance(value, list) else value

  try:
    return ml_collections.ConfigDict(tuples(json.loads(text)))
  except ValueError as e:
    raise ValueError(f"{file} is not a readable config ({e}).") from None


def load(
    workdir: str, *, ema: bool = True, config: ml_collections.ConfigDict | None = None
) -> LoadedFlow:
  """(flow, variables, config, step) of the newest readable checkpoint in `workdir`.

  `workdir` is a training run's --workdir, or the output of `python -m eiw_flow_jax.convert` (the
  authors' PyTorch checkpoint converted), local or an `etils.epath` URL (gs://...). The config is
  the workdir's config.json unless `config` is given. Only what inference needs is read from disk:
  the EMA parameters (`ema=False`: the raw ones) and the constants; the optimizer state is left
  there. The arrays land on the default device. Read-only: safe while a run writes there.
  Raises FileNotFoundError (one line) for a missing workdir or one without checkpoints, and
  checkpointing.CheckpointError if checkpoints exist but none can be read.
  """
  # Imported here: checkpointing brings orbax and the data pipeline, which the model does not need.
  import orbax.checkpoint as ocp

  from eiw_flow_jax.workdir import storage

  workdir = storage.normalize_dir(workdir, "workdir")
  if not storage.path(workdir).is_dir():
    raise FileNotFoundError(f"No such workdir: {workdir}.")
  if not checkpointing.has_checkpoints(workdir):
    raise FileNotFoundError(
        f"No checkpoint in {checkpointing.checkpoint_dir(workdir)}: train with "
        f"--workdir={workdir} first (or convert the authors' checkpoint into it)."
    )
  config = _read_config(workdir) if config is None else config
  flow = build_flow(config)
  shapes = jax.eval_shape(
      flow.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, *flow.image_shape), jnp.uint8))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  params_key = "ema_params" if ema else "params"

  def placed(tree: Any) -> Any:
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), tree)

  # Only these entries of the saved TrainState are read (orbax partial restore).
  target = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=device),
            params_key: placed(shapes["params"]), "constants": placed(shapes["constants"])}
  manager = checkpointing.make_manager(workdir, keep=1, read_only=True)
  checkpointer = ocp.PyTreeCheckpointer()
  failures = []
  try:
    abstract = types.SimpleNamespace(params=shapes["params"], constants=shapes["constants"])
    for step in sorted(manager.all_steps(), reverse=True):
      differences = checkpointing.architecture_differences(manager, step, abstract)
      if differences:
        raise checkpointing.CheckpointMismatchError(
            f"The checkpoint at step {step} in {manager.directory} holds another architecture "
            f"than the config builds: {'; '.join(differences[:4])}"
            f"{'; ...' if len(differences) > 4 else ''}."
        )
      try:
        restored = checkpointer.restore(
            storage.path(manager.directory, str(step), checkpointing.STATE),
            args=ocp.args.PyTreeRestore(
                target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True),
        )
      except Exception as e:  # noqa: BLE001 - corruption surfaces as many exception types
        logging.warning("Checkpoint %d in %s cannot be read (%s: %s); trying an older one.",
                        step, manager.directory, type(e).__name__, str(e)[:300])
        failures.append(step)
        continue
      variables = {"params": restored[params_key], "constants": restored["constants"]}
      return LoadedFlow(flow, variables, config, int(restored["step"]))
  finally:
    checkpointer.close()
    manager.close()
  raise checkpointing.CheckpointError(
      f"None of the checkpoints {failures} in {checkpointing.checkpoint_dir(workdir)} can be "
      "read; see the warnings above."
  )
