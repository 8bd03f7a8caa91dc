"""One assembly of a run: what training, eval, sampling, conversion, AOT compiles and `load`
build from a config and a device mesh.

`Run.build(config, mesh)` validates the config and builds the flow and the optimizer once; from
them come the abstract train state with its shardings (what restoring reads into and what the
compiled steps take), a fresh state (`create_state`), a state holding given weights
(`state_from_variables`), the train and eval steps, and every read of a checkpoint:

* `restore`: training's, the whole state and the input pipeline's position;
* `restore_state`: eval's and sampling's, the whole state, read-only;
* `restore_variables`: `load`'s, only the parameters (EMA or raw) and the constants.

Each read verifies the checkpoint against its digests, falls back past a damaged checkpoint,
and brings a checkpoint of an older parameter layout into the current one through the flow
(`Flow.migrate_layout`): `checkpointing.restore_latest` does the reading, the run says what to
read into and how layouts migrate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from eiw_flow_jax.model.flow import Flow, build_flow
from eiw_flow_jax.training import evaluate, run_config, train_state, train_step
from eiw_flow_jax.training.compiler_options import compiler_options
from eiw_flow_jax.training.optimizer import make_optimizer
from eiw_flow_jax.training.sharding import make_mesh, replicated, state_shardings
from eiw_flow_jax.training.train_state import TrainState
from eiw_flow_jax.workdir import checkpointing, storage

Variables = dict[str, Any]


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, like Flow
class Run:
  """The flow, the optimizer and the mesh of a run, and what is derived from them."""

  config: ml_collections.ConfigDict
  mesh: Mesh
  flow: Flow
  tx: optax.GradientTransformation

  @classmethod
  def build(cls, config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> Run:
    """Validates `config` for `mesh` (default: every device) and builds flow and optimizer.

    Raises config.checks.ConfigError naming the field for a config that cannot run.
    """
    mesh = make_mesh() if mesh is None else mesh
    run_config.validate_config(config, num_devices=mesh.size, num_processes=jax.process_count())
    return cls(config=config, mesh=mesh, flow=build_flow(config), tx=make_optimizer(config))

  # ---- the state ---------------------------------------------------------------------------
  @property
  def abstract_state(self) -> TrainState:
    """The train state's structure as ShapeDtypeStructs carrying their shardings."""
    return train_state.abstract_state(self.flow, self.tx, self.mesh,
                                      ema=train_state.keeps_ema(self.config))

  @property
  def shardings(self) -> TrainState:
    return state_shardings(self.mesh, self.abstract_state)

  def create_state(self, init_images: np.ndarray) -> TrainState:
    """A fresh state, data-dependent init on `init_images` (the same on every process)."""
    return train_state.create_state(self.config, self.flow, self.tx, self.mesh, init_images)

  def state_from_variables(self, variables: Variables) -> TrainState:
    """A state at step 0 holding `variables` (EMA = params where the run keeps one, a fresh
    optimizer state), placed with the state's shardings: imported weights become a checkpoint
    training writes."""
    variables = jax.tree.map(jnp.asarray, variables)
    state = train_state.state_from_variables(
        self.tx, variables, ema=train_state.keeps_ema(self.config))
    return jax.device_put(state, self.shardings)

  # ---- the compiled steps --------------------------------------------------------------------
  def train_step(self, *, inject_nonfinite: bool = False) -> Callable[..., Any]:
    """Jitted (state, uint8 batch) -> (state, metrics); `train_step.make_train_step`."""
    return train_step.make_train_step(
        self.config, self.flow, self.tx, self.mesh, inject_nonfinite=inject_nonfinite)

  def eval_step(self) -> Callable[..., Any]:
    """Jitted (variables, uint8 batch, mask, rng) -> (sum of bpd, count); what eval runs."""
    return evaluate.bpd_sum_step(self.flow, self.mesh, compiler_options(self.config))

  # ---- reading checkpoints -------------------------------------------------------------------
  def restore(
      self, manager: ocp.CheckpointManager, data_iterator: Any | None = None, *,
      quarantine: bool = True,
  ) -> tuple[int, TrainState] | None:
    """(step, state) of the newest good checkpoint of `manager`, None if there is none; the
    iterator's position restored in place. Damaged checkpoints are moved aside (`quarantine`)."""
    return checkpointing.restore_latest(
        manager, self.abstract_state, data_iterator, quarantine=quarantine,
        migrate=self.flow.migrate_layout, partial=self._reads_part_of_state,
    )

  def restore_state(self, workdir: str) -> tuple[int, TrainState]:
    """(step, state) of `workdir`'s newest good checkpoint, read-only (safe while a run writes
    there). FileNotFoundError if it has none."""
    return self._read_only(workdir, self.abstract_state, partial=self._reads_part_of_state)

  @property
  def _reads_part_of_state(self) -> bool:
    """A run without an EMA reads its state's entries alone from a checkpoint: one saved with
    an EMA copy (as runs with `ema_decay` 0 once saved) restores too, its copy left unread."""
    return self.abstract_state.ema_params is None

  def restore_variables(self, workdir: str, *, ema: bool = True) -> tuple[int, Variables]:
    """(step, {"params", "constants"}) of `workdir`'s newest good checkpoint, read-only: the EMA
    parameters (`ema=False`, or a run without an EMA: the raw ones) and the constants; the
    optimizer state stays on disk."""
    state = self.abstract_state
    params = "ema_params" if ema and state.ema_params is not None else "params"
    target = {
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated(self.mesh)),
        params: getattr(state, params),
        "constants": state.constants,
    }
    step, restored = self._read_only(workdir, target, partial=True)
    return step, {"params": restored[params], "constants": restored["constants"]}

  def _read_only(self, workdir: str, target: Any, *, partial: bool) -> tuple[int, Any]:
    directory = checkpointing.checkpoint_dir(workdir)
    restored = None
    if storage.path(directory).is_dir():
      manager = checkpointing.make_manager(
          workdir, keep=self.config.keep_checkpoints, read_only=True)
      try:
        restored = checkpointing.restore_latest(
            manager, target, quarantine=False, migrate=self.flow.migrate_layout,
            partial=partial,
        )
      finally:
        manager.close()
    if restored is None:
      raise FileNotFoundError(
          f"No checkpoint in {directory}; train first (--mode=train) with the same --workdir."
      )
    return restored
