"""Coming back to a workdir: the saved config, the restored state's checks, restoring for eval.

* The saved config (`read_saved_config`, used by resuming and by `load`): `<workdir>/config.json`
  read onto `base_config()`, so a file written before a field existed gets its default, and a
  field the schema does not know is a ConfigError naming it (`config_from_saved`).
* Config check: resuming with a config that differs from the saved one in the model, batch
  size, seed or dataset is refused (naming the fields) unless `allow_config_change`; a changed
  `dataset.worker_count` is refused even then (the saved pipeline position needs it). Nothing
  in the workdir changes before the resume has succeeded: `save_config` runs after the restore,
  logs each changed field in one line and keeps it in `config_history.jsonl` with the step it
  took effect at (`workdir.config_history`), then writes config.json.
* A restored state with NaN/inf parameters is refused (`check_restored`).
* `restore_for_inference`: the newest checkpoint's state, read-only, for eval and sampling.
* `convert_unrolled_checkpoints`: a workdir's checkpoints migrated offline into a new workdir.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from eiw_flow_jax.config import checks
from eiw_flow_jax.config.schema import base_config
from eiw_flow_jax.training import run_config
from eiw_flow_jax.training.run import Run
from eiw_flow_jax.training.sharding import make_mesh
from eiw_flow_jax.training.train_state import TrainResult, TrainState
from eiw_flow_jax.workdir import checkpointing, config_history, storage

CONFIG_FILE = "config.json"


# Fields that must match the saved config.json to resume (prefixes of dotted names).
RESUME_FIELDS = ("model", "batch_size", "seed", "dataset.name", "dataset.train_split",
                 "dataset.worker_count")


# ... of which these cannot change even on purpose: the checkpoint cannot be restored otherwise
# (grain saves the input pipeline's position in a layout that depends on its worker count).
UNCHANGEABLE_FIELDS = ("dataset.worker_count",)


# Where files are, not what the run computes: a restart on another machine may find its data
# elsewhere. Not recorded as config changes (config.json keeps the latest).
LOCATION_FIELDS = ("dataset.data_dir", "dataset.source_dir")


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


# ----------------------------------------------------------------------------------------------
# The saved config.


def config_from_saved(values: Mapping[str, Any], source: str) -> ml_collections.ConfigDict:
  """`base_config()` with the saved `values` (a config.json's contents) set on it.

  Fields the saved values lack (added to the schema since they were written) keep their
  defaults; JSON lists become the schema's tuples. A field the schema does not have, or a value
  of another type than the field's, is a ConfigError naming the fields and `source`.
  """
  config = base_config()
  unknown, wrong = [], []

  def tuples(value: Any) -> Any:  # JSON has no tuples; the configs' sequences are tuples
    if isinstance(value, dict):
      return {k: tuples(v) for k, v in value.items()}
    return tuple(tuples(v) for v in value) if isinstance(value, list) else value

  def set_fields(node: ml_collections.ConfigDict, saved: Mapping[str, Any], prefix: str) -> None:
    for key, value in saved.items():
      name = f"{prefix}{key}"
      if key not in node:
        unknown.append(name)
      elif isinstance(node[key], ml_collections.ConfigDict) and isinstance(value, Mapping):
        set_fields(node[key], value, f"{name}.")
      else:
        try:
          node[key] = tuples(value)
        except (TypeError, ValueError):
          wrong.append(f"{name}={value!r} (expected {type(node[key]).__name__})")

  if not isinstance(values, Mapping):
    raise checks.ConfigError(f"{source}: expected a JSON object of config fields, got "
                             f"{type(values).__name__}.")
  set_fields(config, values, "")
  if unknown or wrong:
    problems = ([f"fields this version does not define: {', '.join(unknown)}"] if unknown
                else []) + ([f"values of another type: {', '.join(wrong)}"] if wrong else [])
    raise checks.ConfigError(
        f"{source} holds {'; '.join(problems)}. It was written by another version of "
        "eiw_flow_jax, or edited; the fields are those of eiw_flow_jax.config.schema.base_config."
    )
  return config


def read_saved_config(workdir: str) -> ml_collections.ConfigDict:
  """The config `workdir`'s checkpoints were made with: its config.json, `config_from_saved`.

  FileNotFoundError (one line) if the workdir has none; ConfigError if it cannot be read.
  """
  file = storage.path(workdir, CONFIG_FILE)
  try:
    values = json.loads(file.read_text())
  except FileNotFoundError:
    raise FileNotFoundError(
        f"No {CONFIG_FILE} in {workdir}: expected the --workdir of a training run (or of "
        "python -m eiw_flow_jax.convert)."
    ) from None
  except ValueError as e:
    raise checks.ConfigError(f"{file} is not a readable config ({e}).") from None
  return config_from_saved(values, str(file))


def config_changes(
    saved: Mapping[str, Any] | ml_collections.ConfigDict, config: ml_collections.ConfigDict
) -> list[tuple[str, Any, Any]]:
  """(field, saved value, current value) for every field that differs, as JSON values; where
  files are (LOCATION_FIELDS) is no change of the run."""
  if isinstance(saved, ml_collections.ConfigDict):
    saved = json.loads(saved.to_json())
  now = _flatten(json.loads(config.to_json()))
  before = _flatten(saved)
  return [(name, before[name], now[name]) for name in sorted(now)
          if name in before and name not in LOCATION_FIELDS
          and not _same(name, before[name], now[name])]


def config_differences(
    saved: Mapping[str, Any] | ml_collections.ConfigDict, config: ml_collections.ConfigDict
) -> list[tuple[str, Any, Any]]:
  """(field, saved value, current value) for every RESUME_FIELDS field that differs."""
  return [(name, old, new) for name, old, new in config_changes(saved, config)
          if any(name == f or name.startswith(f + ".") for f in RESUME_FIELDS)]


def check_resume_config(
    config: ml_collections.ConfigDict, workdir: str, *, has_checkpoints: bool,
    allow_change: bool = False,
) -> None:
  """Raises ConfigMismatchError if resuming `workdir` with `config` changes RESUME_FIELDS.

  The saved config is read as `read_saved_config` reads it (fields it lacks compare as their
  defaults; fields the schema does not define are a ConfigError); a damaged one is not compared.
  """
  file = storage.path(workdir, CONFIG_FILE)
  if not has_checkpoints:
    return
  try:
    values = json.loads(file.read_text())
  except FileNotFoundError:
    return
  except (OSError, ValueError) as e:  # a damaged file: it is rewritten with this config
    logging.warning("Cannot read %s (%s); not comparing configs.", file, e)
    return
  differences = config_differences(config_from_saved(values, str(file)), config)
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
  if allow_change:  # each change is logged and kept once the resume succeeded (save_config)
    return
  raise ConfigMismatchError(
      differ + "Use the same config to resume, another --workdir for a new run, or "
      "--allow_config_change to resume with the change on purpose."
  )


def save_config(
    config: ml_collections.ConfigDict, workdir: str, *, step: int | None = None
) -> list[tuple[str, Any, Any]]:
  """Writes `config` as the workdir's config.json (process 0); returns the changes made.

  With `step` (a run resumed at that step, after its restore succeeded), each field that
  differs from the saved config.json is first logged in one line and appended to
  `config_history.jsonl` with `step`, so the workdir keeps every value the run was trained with.
  """
  changes = []
  if step is not None:
    try:
      changes = config_changes(read_saved_config(workdir), config)
    except FileNotFoundError:
      pass  # nothing to compare: written below
    except checks.ConfigError as e:  # warned about when the configs were compared
      logging.info("Not recording config changes: %s", e)
  file = storage.path(workdir, CONFIG_FILE)
  for name, old, new in changes:
    logging.warning("Config changed on resume at step %d: %s %s -> %s (kept in %s).",
                    step, name, json.dumps(old), json.dumps(new),
                    storage.path(workdir, config_history.HISTORY_FILE))
  if jax.process_index() == 0:
    config_history.append(workdir, step, changes)
    storage.write_text(file, config.to_json(indent=2, sort_keys=True), "the config")
  return changes


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
  run = Run.build(config, mesh)
  info = run_config.check_dataset(config)
  step, state = run.restore_state(workdir)
  return TrainResult(flow=run.flow, state=state, mesh=run.mesh, info=info, step=step)


def convert_unrolled_checkpoints(workdir: str, new_workdir: str) -> list[int]:
  """Copies `workdir`'s checkpoints into `new_workdir` in the current parameter layout.

  The offline form of what resuming does by itself: each checkpoint is read as saved, verified
  against its digests, migrated by the flow of the workdir's config (`Flow.migrate_layout`) and
  written with fresh digests (`checkpointing.migrate_checkpoints`). `workdir` is not changed;
  both are local directories. Returns the steps converted.
  """
  run = Run.build(read_saved_config(workdir), make_mesh(jax.local_devices()[:1]))
  return checkpointing.migrate_checkpoints(workdir, new_workdir, run.flow.migrate_layout)
