"""Coming back to a workdir: the saved config, the restored state's checks, restoring for eval.

* Config check: resuming with a config that differs from `<workdir>/config.json` in the model,
  batch size, seed or dataset is refused (naming the fields) unless `allow_config_change`; a
  changed `dataset.worker_count` is refused even then (the saved pipeline position needs it).
* A restored state with NaN/inf parameters is refused (`check_restored`).
* `restore_for_inference`: the newest checkpoint's state, read-only, for eval and sampling.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from eiw_flow_jax.config import checks
from eiw_flow_jax.model.flow import build_flow
from eiw_flow_jax.training import run_config
from eiw_flow_jax.training.optimizer import make_optimizer
from eiw_flow_jax.training.sharding import make_mesh
from eiw_flow_jax.training.train_state import TrainResult, TrainState, abstract_state
from eiw_flow_jax.workdir import checkpointing, storage

CONFIG_FILE = "config.json"


# Fields that must match the saved config.json to resume (prefixes of dotted names).
RESUME_FIELDS = ("model", "batch_size", "seed", "dataset.name", "dataset.train_split",
                 "dataset.worker_count")


# ... of which these cannot change even on purpose: the checkpoint cannot be restored otherwise
# (grain saves the input pipeline's position in a layout that depends on its worker count).
UNCHANGEABLE_FIELDS = ("dataset.worker_count",)


# Saved values that an older version of the code wrote and that compute exactly what a current
# value does: float32 inputs under model.dtype "auto" (the default since inputs' dtype rules)
# compute in float32, so a run started with "float32" resumes under the new default.
EQUIVALENT_VALUES = {"model.dtype": ({"float32", "auto"},)}


def _same(name: str, saved: Any, now: Any) -> bool:
  if saved == now:
    return True
  return any({saved, now} <= group for group in EQUIVALENT_VALUES.get(name, ()))


class ConfigMismatchError(checks.ConfigError):
  """The config differs from the one the workdir's checkpoints were trained with."""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def config_differences(
    saved: dict[str, Any], config: ml_collections.ConfigDict
) -> list[tuple[str, Any, Any]]:
  """(field, saved value, current value) for every RESUME_FIELDS field that differs.

  Fields absent from the saved config (added by a newer version of the code) are not compared.
  """
  now = _flatten(json.loads(config.to_json()))
  before = _flatten(saved)
  out = []
  for name in sorted(now):
    if not any(name == f or name.startswith(f + ".") for f in RESUME_FIELDS):
      continue
    if name in before and not _same(name, before[name], now[name]):
      out.append((name, before[name], now[name]))
  return out


def check_resume_config(
    config: ml_collections.ConfigDict, workdir: str, *, has_checkpoints: bool,
    allow_change: bool = False,
) -> None:
  """Raises ConfigMismatchError if resuming `workdir` with `config` changes RESUME_FIELDS."""
  file = storage.path(workdir, CONFIG_FILE)
  if not has_checkpoints:
    return
  try:
    saved = json.loads(file.read_text())
  except FileNotFoundError:
    return
  except (OSError, ValueError) as e:
    logging.warning("Cannot read %s (%s); not comparing configs.", file, e)
    return
  differences = config_differences(saved, config)
  if not differences:
    return
  listed = "; ".join(f"{name}: saved {old!r}, now {new!r}" for name, old, new in differences)
  differ = f"The config differs from the one this workdir was trained with ({file}) in: {listed}. "
  fixed = [name for name, _, _ in differences if name in UNCHANGEABLE_FIELDS]
  if fixed:
    raise ConfigMismatchError(
        differ + f"{', '.join(fixed)} cannot change on resume, not even with "
        "--allow_config_change: the checkpoints hold the input pipeline's position in a layout "
        "that depends on it. Resume with the saved value, or start a new run in another --workdir."
    )
  if allow_change:
    logging.warning("Resuming %s with a changed config (allowed): %s", workdir, listed)
    return
  raise ConfigMismatchError(
      differ + "Use the same config to resume, another --workdir for a new run, or "
      "--allow_config_change to resume with the change on purpose."
  )


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() == 0:
    storage.write_text(
        storage.path(workdir, CONFIG_FILE), config.to_json(indent=2, sort_keys=True),
        "the config",
    )


@jax.jit
def _finite_leaves(tree: Any) -> list[jax.Array]:
  return [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]


def nonfinite_leaves(
    tree: Any, stacked_axis: Callable[[Any], str | None] | None = None
) -> list[str]:
  """Names ("['params']['level0_steps']['layers_2']... (steps 3, 7)") of the leaves that hold
  a NaN or an infinity; for leaves of a stacked module, which slices. `stacked_axis` (a
  `Flow.stacked_axis`) names a leaf's stacked leading axis from its key path."""
  flags = jax.device_get(_finite_leaves(tree))
  out = []
  for (path, leaf), ok in zip(jax.tree_util.tree_flatten_with_path(tree)[0], flags):
    if bool(ok):
      continue
    name = jax.tree_util.keystr(path)
    axis = stacked_axis(path) if stacked_axis is not None and np.ndim(leaf) >= 1 else None
    if axis is not None:
      values = np.asarray(jax.device_get(leaf)).reshape(np.shape(leaf)[0], -1)
      slices = np.flatnonzero(~np.all(np.isfinite(values), axis=1))
      name += f" ({axis} {', '.join(map(str, slices))})"
    out.append(name)
  return out


def check_restored(
    state: TrainState, step: int, workdir: str,
    stacked_axis: Callable[[Any], str | None] | None = None,
) -> None:
  """A restored state with NaN/inf parameters would train on garbage: refuse it.
  `stacked_axis` (a `Flow.stacked_axis`) lets the message say which stacked slices."""
  bad = nonfinite_leaves({"params": state.params, "ema_params": state.ema_params}, stacked_axis)
  if bad:
    shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    raise checkpointing.CheckpointError(
        f"The checkpoint at step {step} in {checkpointing.checkpoint_dir(workdir)} holds "
        f"non-finite values (NaN or inf) in {len(bad)} arrays: {shown}. Resume from an older "
        "checkpoint by moving this step's directory aside, or start in a fresh --workdir."
    )


def restore_for_inference(
    config: ml_collections.ConfigDict, workdir: str, *, mesh: Mesh | None = None
) -> TrainResult:
  """The newest readable checkpoint's state (no input pipeline), for eval and sampling.

  Read-only: safe while a training run writes to the same workdir.
  """
  mesh = make_mesh() if mesh is None else mesh
  run_config.validate_config(config, num_devices=mesh.size, num_processes=jax.process_count())
  info = run_config.check_dataset(config)
  flow = build_flow(config)
  tx = make_optimizer(config)
  directory = checkpointing.checkpoint_dir(workdir)
  restored = None
  if storage.path(directory).is_dir():
    manager = checkpointing.make_manager(workdir, keep=config.keep_checkpoints, read_only=True)
    try:
      restored = checkpointing.restore_latest(
          manager, abstract_state(flow, tx, mesh), quarantine=False
      )
    finally:
      manager.close()
  if restored is None:
    raise FileNotFoundError(
        f"No checkpoint in {directory}; train first (--mode=train) with the same --workdir."
    )
  step, state = restored
  return TrainResult(flow=flow, state=state, mesh=mesh, info=info, step=step)
