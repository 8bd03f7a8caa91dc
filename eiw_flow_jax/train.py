"""Training: train state, optimizer, the jitted data-parallel train step and the training loop.

One `jax.jit`-compiled step runs over a `Mesh` of every device of every process: the global
batch is sharded on the mesh axis "data", the train state is replicated. `state_shardings` is
the one place that decides the state's layout, so sharding parameters later is a local change.

Determinism: the dequantization noise of step s is drawn inside the step from
`fold_in(train_key, s)`, the input pipeline's position is checkpointed with the state, and
skipped (non-finite) steps still advance the step counter, so a run resumed from any checkpoint
ends with the same parameters as an uninterrupted one.

Non-finite loss or gradients: the step's update is dropped inside the jitted step (params, EMA
and optimizer state keep their values) and counted on the device; config.max_consecutive_nonfinite
skipped steps in a row stop the run with NonFiniteError, leaving the checkpoints as they were.
The host reads the streak only at each logging interval and before each checkpoint (no
per-step device-to-host read, so several steps stay in flight): the error names the step at
which the streak reached the limit and comes at the next interval, and a checkpoint is never
written after such a streak.

Input: `Prefetcher` puts config.prefetch_batches global batches on the devices ahead of the
step; checkpoints record the input position of the next batch the step takes, not of the
prefetched ones, so resuming stays exact.

EMA: decay min(config.ema_decay, (1 + n) / (10 + n)) after n applied updates, so short runs
are not dominated by the initial parameters; eval and sampling use the EMA parameters.

Pixels arrive on the model's n_bits grid: the data layer drops extra low bits at the source.

Run safety (eiw_flow_jax.runtime): the workdir is locked while training; SIGTERM/SIGINT finish
the step, save and raise runtime.StopRequested; resuming checks the config against the saved
config.json and the restored parameters for NaN/inf; failed saves raise runtime.StorageError.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from eiw_flow_jax import checkpointing, config_lib, data, evaluate, runtime
from eiw_flow_jax.model import Flow, build_flow

DATA_AXIS = "data"
# Fixed offsets folded into the seed, one per use of randomness.
_INIT_STREAM, _TRAIN_STREAM, _STATS_STREAM = 0, 1, 2


class NonFiniteError(RuntimeError):
  """Too many consecutive steps had a non-finite loss or gradient (their updates were skipped)."""


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the input pipeline's position."""

  step: jax.Array  # batches consumed so far, including skipped (non-finite) steps
  params: Any
  constants: Any  # fixed 1x1-conv permutations and signs; never trained
  ema_params: Any
  opt_state: Any
  nonfinite_total: jax.Array
  nonfinite_consecutive: jax.Array

  def variables(self, ema: bool = True) -> dict[str, Any]:
    """Variables for the Flow API: EMA (default) or raw parameters."""
    return {"params": self.ema_params if ema else self.params, "constants": self.constants}


# ----------------------------------------------------------------------------------------------
# Optimizer.


def make_schedule(config: ml_collections.ConfigDict) -> Callable[[Any], jax.Array]:
  """Learning rate per applied update: linear warmup, then constant or cosine decay, times
  decay_rate ** epoch (DenseFlow's per-epoch exponential decay; decay_rate = 1 disables)."""
  opt = config.optimizer
  peak, warmup = float(opt.learning_rate), int(opt.warmup_steps)
  total, end = int(config.num_train_steps), float(opt.end_learning_rate_factor)

  def schedule(count: Any) -> jax.Array:
    count = jnp.asarray(count, jnp.float32)
    # (count + 1): the first update already moves; Glow-style warmup from lr / warmup.
    lr = peak * jnp.minimum(1.0, (count + 1.0) / warmup) if warmup > 0 else jnp.full((), peak)
    if opt.cosine_decay:
      frac = jnp.clip((count - warmup) / max(1, total - warmup), 0.0, 1.0)
      lr = lr * (end + (1.0 - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac)))
    decay_rate = float(opt.get("decay_rate", 1.0))
    if decay_rate < 1.0:
      epoch = jnp.floor(count / max(1, int(opt.steps_per_epoch)))
      lr = lr * decay_rate**epoch
    return lr

  return schedule


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam or Adamax (config.optimizer.name) with the schedule and global-norm clipping."""
  opt = config.optimizer
  parts = []
  if opt.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
  make = {"adam": optax.adam, "adamax": optax.adamax}[opt.get("name", "adam")]
  parts.append(make(make_schedule(config), b1=opt.b1, b2=opt.b2))
  return optax.chain(*parts)


# ----------------------------------------------------------------------------------------------
# Mesh and shardings.


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over all devices of all processes (or `devices`), axis "data"."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def state_shardings(mesh: Mesh, state: Any) -> Any:
  """Sharding of every train-state leaf: replicated. Change here to shard parameters."""
  return jax.tree.map(lambda _: replicated(mesh), state)


def global_batch(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """This process's rows -> the global array sharded on "data" (works multi-host)."""
  return jax.make_array_from_process_local_data(sharding, np.asarray(local))


def host_replicated(value: np.ndarray, mesh: Mesh) -> jax.Array:
  """An array every process holds in full -> a global replicated array."""
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, replicated(mesh), lambda index: value[index])


# ----------------------------------------------------------------------------------------------
# State creation.


def rng_keys(config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
  """One key per use of randomness, all derived from config.seed."""
  base = jax.random.PRNGKey(config.seed)
  return {
      "init": jax.random.fold_in(base, _INIT_STREAM),
      "train": jax.random.fold_in(base, _TRAIN_STREAM),
      "stats": jax.random.fold_in(base, _STATS_STREAM),
      "eval": jax.random.fold_in(base, evaluate.EVAL_STREAM),
      "sample": jax.random.fold_in(base, evaluate.SAMPLE_STREAM),
  }


def _state_from_variables(tx: optax.GradientTransformation, variables: Any) -> TrainState:
  params = variables["params"]
  zero = jnp.zeros((), jnp.int32)
  return TrainState(
      step=zero,
      params=params,
      constants=variables["constants"],
      ema_params=params,
      opt_state=tx.init(params),
      nonfinite_total=zero,
      nonfinite_consecutive=zero,
  )


@functools.lru_cache(maxsize=8)
def abstract_state(flow: Flow, tx: optax.GradientTransformation, mesh: Mesh) -> Any:
  """The train state's structure as ShapeDtypeStructs with shardings (traced, not computed)."""
  x = jax.ShapeDtypeStruct((1, *flow.image_shape), jnp.uint8)
  shapes = jax.eval_shape(
      lambda r, x: _state_from_variables(tx, flow.init(r, x)), jax.random.PRNGKey(0), x
  )
  shardings = state_shardings(mesh, shapes)
  return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
  )


def create_state(
    config: ml_collections.ConfigDict,
    flow: Flow,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    init_images: np.ndarray,
) -> TrainState:
  """Fresh state with data-dependent init on `init_images` (the same on every process)."""
  # flow.init runs on this process's default device, outside the sharded jit (which would
  # compile the whole data-dependent init as one graph); every process computes the same
  # variables from the same examples, then they are placed with the state's shardings.
  variables = jax.device_get(flow.init(rng_keys(config)["init"], init_images))
  variables = jax.tree.map(lambda v: host_replicated(v, mesh), variables)
  shardings = state_shardings(mesh, abstract_state(flow, tx, mesh))
  return jax.jit(lambda v: _state_from_variables(tx, v), out_shardings=shardings)(variables)


# ----------------------------------------------------------------------------------------------
# The train step.


def _split_thetas(params: Any) -> dict[int, jax.Array]:
  """Level -> theta of each EIW `global` split (the parameter that fixes its permutation)."""
  out = {}
  for name, sub in params.items():
    if name.startswith("level") and name.endswith("_split") and "theta" in sub:
      out[int(name[len("level") : -len("_split")])] = sub["theta"]
  return out


def _ema_decay(config: ml_collections.ConfigDict, applied: jax.Array) -> jax.Array:
  # Ramped like TF's ExponentialMovingAverage(num_updates): short runs are not dominated by
  # the initial parameters.
  applied = applied.astype(jnp.float32)
  return jnp.minimum(config.ema_decay, (1.0 + applied) / (10.0 + applied))


def make_train_step(
    config: ml_collections.ConfigDict,
    flow: Flow,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    *,
    inject_nonfinite: bool = False,
) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
  """The jitted step (state, global uint8 batch) -> (state, metrics).

  A step whose loss or gradient is not finite leaves params, EMA and optimizer state unchanged
  and is counted. `inject_nonfinite` (tests only) makes every step's loss NaN.
  """
  schedule = make_schedule(config)
  train_key = rng_keys(config)["train"]
  use_ema = config.ema_decay > 0

  def step_fn(state: TrainState, images: jax.Array):
    rng = jax.random.fold_in(train_key, state.step)

    def loss_fn(params):
      loss, aux = flow.loss({"params": params, "constants": state.constants}, images, rng)
      if inject_nonfinite:
        loss = loss * jnp.nan
      return loss, aux

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    applied = state.step - state.nonfinite_total  # updates applied before this one

    def apply_update(operands):
      params, ema, opt_state = operands
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      if use_ema:
        decay = _ema_decay(config, applied)
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
      else:
        ema = params
      return params, ema, opt_state

    # A branch, not a select per leaf: a non-finite step runs no update at all, and XLA can
    # update the donated params, EMA and optimizer state in place (a select between new and old
    # values forced a copy of every leaf, ~1000 small copies per step).
    params, ema, opt_state = jax.lax.cond(
        finite, apply_update, lambda operands: operands,
        (state.params, state.ema_params, state.opt_state),
    )

    def keep_if_finite(new, old):
      return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    skipped = (~finite).astype(jnp.int32)
    # DenseFlow's BatchNorm running statistics come back from the loss (not trained).
    constants = keep_if_finite(aux["constants"], state.constants) if "constants" in aux else (
        state.constants)
    new_state = state.replace(
        constants=constants,
        step=state.step + 1,
        params=params,
        ema_params=ema,
        opt_state=opt_state,
        nonfinite_total=state.nonfinite_total + skipped,
        nonfinite_consecutive=jnp.where(finite, 0, state.nonfinite_consecutive + 1),
    )
    metrics = {
        "loss": loss,
        "bpd": aux["bpd"],
        "regularizer": aux["regularizer"],
        "weight_entropy": aux["weight_entropy"],
        "grad_norm": grad_norm,
        "learning_rate": schedule(applied),
        "finite": finite,
        "nonfinite_total": new_state.nonfinite_total,
        "nonfinite_consecutive": new_state.nonfinite_consecutive,
    }
    old_thetas, new_thetas = _split_thetas(state.params), _split_thetas(new_state.params)
    for level, theta in new_thetas.items():
      before = jnp.argsort(-old_thetas[level], stable=True)
      after = jnp.argsort(-theta, stable=True)
      metrics[f"perm_changed/level{level}"] = jnp.any(before != after).astype(jnp.int32)
    return new_state, metrics

  shardings = state_shardings(mesh, abstract_state(flow, tx, mesh))
  return jax.jit(
      step_fn,
      in_shardings=(shardings, batch_sharding(mesh)),
      out_shardings=(shardings, replicated(mesh)),
      donate_argnums=(0,),
  )


def make_stats_fn(flow: Flow, mesh: Mesh) -> Callable[..., list[dict[str, jax.Array]]]:
  """Jitted (variables, uint8 batch, rng) -> per-level Shuffle diagnostics."""
  return jax.jit(
      lambda v, x, rng: flow.shuffle_stats(v, flow.dequantize(x, rng, variables=v)),
      out_shardings=replicated(mesh),
  )


# ----------------------------------------------------------------------------------------------
# Reporting (process 0 only).


class _Reporter:
  """TensorBoard events in the workdir plus a tqdm bar; silent on processes other than 0."""

  def __init__(self, workdir: str, total: int, initial: int, batch_size: int):
    self.active = jax.process_index() == 0
    self.batch_size = batch_size
    self.writer = self.bar = None
    if self.active:
      from tqdm import tqdm

      self.writer = evaluate.summary_writer(workdir)
      self.bar = tqdm(
          total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=1.0
      )

  def advance(self) -> None:
    if self.bar is not None:
      self.bar.update(1)

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if self.writer is not None:
      for tag, value in values.items():
        self.writer.add_scalar(tag, value, step)

  def shuffle_stats(self, step: int, stats: list[dict[str, np.ndarray]], changes: dict) -> None:
    if self.writer is None:
      return
    for level, level_stats in enumerate(stats):
      prefix = f"shuffle/level{level}"
      for name, value in level_stats.items():
        value = np.asarray(value)
        if value.ndim == 0:
          self.writer.add_scalar(f"{prefix}/{name}", float(value), step)
        elif name in ("permutation", "kept_channels"):
          self.writer.add_text(f"{prefix}/{name}", " ".join(map(str, value.tolist())), step)
        else:
          self.writer.add_histogram(f"{prefix}/{name}", value, step)
          for index, item in enumerate(value.tolist()):
            self.writer.add_scalar(f"{prefix}/{name}/{index}", item, step)
      if level in changes:
        self.writer.add_scalar(f"{prefix}/permutation_changes", changes[level], step)

  def postfix(self, **values: Any) -> None:
    if self.bar is not None:
      self.bar.set_postfix(**values, refresh=False)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
    if self.writer is not None:
      try:
        self.writer.close()
      except OSError as e:  # a full disk: must not hide the error that ends the run
        logging.warning("Could not write the last TensorBoard events: %s", e)


def _summarise(history: list[dict[str, np.ndarray]]) -> tuple[dict[str, float], dict[int, int]]:
  """Means over the log interval of finite steps, skip counts; permutation changes per level."""
  finite = np.array([bool(m["finite"]) for m in history])
  out = {}
  for name in ("loss", "bpd", "regularizer", "weight_entropy", "grad_norm"):
    values = np.array([float(m[name]) for m in history])[finite]
    out[f"train/{name}"] = float(values.mean()) if values.size else math.nan
  out["train/learning_rate"] = float(history[-1]["learning_rate"])
  out["train/skipped_steps"] = float(np.sum(~finite))
  out["train/skipped_steps_total"] = float(history[-1]["nonfinite_total"])
  changes = {
      int(name[len("perm_changed/level") :]): sum(int(m[name]) for m in history)
      for name in history[-1] if name.startswith("perm_changed/level")
  }
  return out, changes


# ----------------------------------------------------------------------------------------------
# The loop.


@dataclasses.dataclass
class TrainResult:
  flow: Flow
  state: TrainState
  mesh: Mesh
  info: data.DatasetInfo
  step: int


def _check_data(config: ml_collections.ConfigDict) -> data.DatasetInfo:
  try:
    return data.get_dataset_info(config)
  except ValueError as e:  # wrong split name, image shape, ...: a config problem
    raise config_lib.ConfigError(f"Dataset {config.dataset.name!r}: {e}") from e


def _save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() == 0:
    runtime.write_text(
        runtime.path(workdir, runtime.CONFIG_FILE), config.to_json(indent=2, sort_keys=True),
        "the config",
    )


def _check_restored(state: TrainState, step: int, workdir: str) -> None:
  """A restored state with NaN/inf parameters would train on garbage: refuse it."""
  bad = runtime.nonfinite_leaves({"params": state.params, "ema_params": state.ema_params})
  if bad:
    shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    raise checkpointing.CheckpointError(
        f"The checkpoint at step {step} in {checkpointing.checkpoint_dir(workdir)} holds "
        f"non-finite values (NaN or inf) in {len(bad)} arrays: {shown}. Resume from an older "
        "checkpoint by moving this step's directory aside, or start in a fresh --workdir."
    )


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    mesh: Mesh | None = None,
    nonfinite_steps: Callable[[int], bool] | None = None,
    allow_config_change: bool = False,
    lock_stale_after: float = 600.0,
) -> TrainResult:
  """Trains (resuming from the newest readable checkpoint in `workdir`) to num_train_steps.

  `workdir` is a local directory or an `etils.epath` URL (`gs://bucket/run`). It is locked
  for the run (runtime.WorkdirBusyError if another run holds it; a lock older than
  `lock_stale_after` seconds without heartbeat, or of a dead process on this host, is taken
  over). Resuming with a config that differs from the saved config.json in model, batch size,
  seed or dataset raises runtime.ConfigMismatchError unless `allow_config_change`.

  SIGTERM/SIGINT: the current step finishes, a checkpoint is saved, runtime.StopRequested is
  raised. `nonfinite_steps` (tests only): steps for which the loss is made NaN, to exercise the
  non-finite guard. Raises NonFiniteError once config.max_consecutive_nonfinite skipped steps
  in a row are seen, at the next logging interval (config.log_every_steps) or checkpoint,
  whichever comes first; the checkpoints saved before are left as they are.
  """
  started = time.time()
  mesh = make_mesh() if mesh is None else mesh
  config_lib.validate_config(config, num_devices=mesh.size, num_processes=jax.process_count())
  workdir = runtime.normalize_dir(workdir, "workdir")
  with runtime.writing("the workdir", workdir):
    runtime.path(workdir).mkdir(parents=True, exist_ok=True)

  lock = runtime.acquire_workdir_lock(workdir, stale_after=lock_stale_after)
  manager = reporter = None
  try:
    # Before config.json is overwritten: the saved one is what the checkpoints were made with.
    runtime.check_resume_config(
        config, workdir, has_checkpoints=checkpointing.has_checkpoints(workdir),
        allow_change=allow_config_change,
    )
    info = _check_data(config)
    flow = build_flow(config)
    tx = make_optimizer(config)
    with runtime.writing("checkpoints", checkpointing.checkpoint_dir(workdir)):
      manager = checkpointing.make_manager(workdir, keep=config.keep_checkpoints)
    _save_config(config, workdir)
    train_iter = data.create_train_iterator(config)
    restored = checkpointing.restore_latest(manager, abstract_state(flow, tx, mesh), train_iter)
    if restored is None:
      n_init = min(config.init_batch_size, info.num_train)
      init_images = data.load_examples(config, data.resolve_split(config, "train"), n_init)
      state = create_state(config, flow, tx, mesh, init_images)
      logging.info("Initialised a fresh model (data-dependent init on %d examples).", n_init)
    else:
      restored_step, state = restored
      _check_restored(state, restored_step, workdir)
      logging.info("Resumed from the checkpoint at step %d in %s.", restored_step, workdir)
    start = int(jax.device_get(state.step))
    reporter = _Reporter(workdir, config.num_train_steps, start, config.batch_size)
    with runtime.StopSignals() as signals:

      def after_step(done: int, metrics: dict[str, jax.Array]) -> bool:
        if done == 1:  # the reference for the divergence check (one device read, once)
          runtime.record_initial_bpd(workdir, float(jax.device_get(metrics["bpd"])))
        checkpointing.check_saves(manager)  # a failed background save stops the run now
        return signals.should_stop(done)

      state, position = _train_loop(
          config, flow, tx, mesh, manager, reporter, state, train_iter, nonfinite_steps,
          after_step=after_step,
      )
      final = int(jax.device_get(state.step))
      if manager.latest_step() != final:
        checkpointing.save(manager, final, state, position, force=True)
      checkpointing.wait(manager)
      evaluate.record_train_time(workdir, time.time() - started, final)
      if final < config.num_train_steps and signals.received is not None:
        raise runtime.StopRequested(
            signals.received, final, checkpointing.checkpoint_dir(workdir)
        )
  finally:
    if reporter is not None:
      reporter.close()
    if manager is not None:
      # Lets an in-flight async save finish, also when an error is on its way out.
      try:
        manager.wait_until_finished()
      except Exception as e:  # noqa: BLE001 - reported by the save that failed, if any
        logging.warning("A checkpoint save failed: %s", str(e).splitlines()[0][:300])
      try:
        manager.close()
      except Exception as e:  # noqa: BLE001 - the same failure again: must not hide the error
        logging.debug("Closing the checkpoint manager: %s", e)
    if lock is not None:
      lock.release()
  return TrainResult(flow=flow, state=state, mesh=mesh, info=info, step=final)


class _Position:
  """The input pipeline's position as it was before a prefetched batch (for checkpoints).

  grain's checkpoint handler calls `get_state()` on a non-DatasetIterator item and expects the
  JSON bytes; restoring goes into the real iterator as usual.
  """

  def __init__(self, state: Any):
    self._state = state

  def get_state(self) -> bytes:
    return json.dumps(self._state, indent=4).encode()


class Prefetcher:
  """Global batches put on the devices `depth` steps ahead of the train step.

  `jax.make_array_from_process_local_data` starts the host-to-device copy and returns at once,
  so batch s+depth is in flight while step s runs. The iterator runs ahead of the step by
  `depth` batches; `position()` is the position of the next batch the step will take (what a
  checkpoint must hold for an exact resume), recorded before each batch was drawn. Runs in the
  calling thread, so the iterator is never touched concurrently. At most `limit` batches are
  drawn in all (the steps left), so the iterator ends where the last step's batch ended.
  """

  def __init__(
      self, iterator: Any, sharding: NamedSharding, depth: int, limit: int | None = None
  ):
    self.iterator, self.sharding, self.depth = iterator, sharding, depth
    self._left = math.inf if limit is None else limit
    self._queue: collections.deque[tuple[Any, jax.Array]] = collections.deque()

  def _fill(self, size: int) -> None:
    while len(self._queue) < size and self._left > 0:
      self._left -= 1
      before = self.iterator.get_state()
      batch = global_batch(next(self.iterator)["image"], self.sharding)
      self._queue.append((before, batch))

  def next(self) -> jax.Array:
    self._fill(1)
    _, batch = self._queue.popleft()
    self._fill(self.depth)
    return batch

  def position(self) -> Any:
    """For `checkpointing.save`: the iterator itself, or its state before the queued batches."""
    return _Position(self._queue[0][0]) if self._queue else self.iterator


def _saved_message(manager: ocp.CheckpointManager) -> str:
  latest = manager.latest_step()
  if latest is None:
    return f"No checkpoint was saved yet in {manager.directory}."
  return f"The last checkpoint (step {latest}) in {manager.directory} is unchanged."


def _train_loop(
    config: ml_collections.ConfigDict,
    flow: Flow,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    manager: ocp.CheckpointManager,
    reporter: _Reporter,
    state: TrainState,
    train_iter: Any,
    nonfinite_steps: Callable[[int], bool] | None,
    after_step: Callable[[int, dict[str, jax.Array]], bool] | None = None,
) -> tuple[TrainState, Any]:
  """Steps from state.step to config.num_train_steps with logging, checkpoints and evals.

  Nothing is read back from the devices between logging intervals, so the host dispatches
  steps ahead of the devices; the non-finite streak (computed on the device every step) is
  checked at each logging interval and before each checkpoint.

  `after_step(done, metrics)` runs after every step; True stops the loop at that step (the
  caller saves). Returns the state and the input position to checkpoint with it (prefetched
  batches not yet consumed are not counted).
  """
  start, total = int(jax.device_get(state.step)), config.num_train_steps
  step_fn = make_train_step(config, flow, tx, mesh)
  poisoned_fn = None
  stats_fn = make_stats_fn(flow, mesh)
  keys = rng_keys(config)
  batches = Prefetcher(
      train_iter, batch_sharding(mesh), config.get("prefetch_batches", 2), limit=total - start
  )
  history: list[tuple[int, dict[str, jax.Array]]] = []  # (step, its metrics), since last log
  last_log_time, last_log_step = time.time(), start
  limit = config.max_consecutive_nonfinite

  def check_streak() -> None:
    """Raises NonFiniteError if the streak reached the limit at any step since the last log."""
    streaks = jax.device_get([m["nonfinite_consecutive"] for _, m in history])
    for (step, _), count in zip(history, streaks):
      if int(count) >= limit:
        manager.wait_until_finished()
        raise NonFiniteError(
            f"{int(count)} consecutive training steps (up to step {step + 1}) had a non-finite "
            f"loss or gradient; their updates were skipped and training stopped "
            f"(config.max_consecutive_nonfinite={limit}; detected at step {history[-1][0] + 1}, "
            f"the streak is checked every config.log_every_steps and before checkpoints). "
            f"{_saved_message(manager)} Consider a lower config.optimizer.learning_rate or "
            f"config.optimizer.grad_clip_norm."
        )

  for step in range(start, total):
    images = batches.next()
    if nonfinite_steps is not None and nonfinite_steps(step):
      if poisoned_fn is None:
        poisoned_fn = make_train_step(config, flow, tx, mesh, inject_nonfinite=True)
      state, metrics = poisoned_fn(state, images)
    else:
      state, metrics = step_fn(state, images)
    history.append((step, metrics))
    reporter.advance()
    done = step + 1

    if done % config.log_every_steps == 0 or done == total:
      check_streak()
      summary, changes = _summarise(jax.device_get([m for _, m in history]))
      history = []
      now = time.time()
      summary["train/img_per_sec"] = (
          (done - last_log_step) * config.batch_size / max(now - last_log_time, 1e-9)
      )
      last_log_time, last_log_step = now, done
      stats = jax.device_get(
          stats_fn(state.variables(ema=False), images, jax.random.fold_in(keys["stats"], done))
      )
      reporter.scalars(done, summary)
      reporter.shuffle_stats(done, stats, changes)
      reporter.postfix(
          bpd=f"{summary['train/bpd']:.4f}", img_s=f"{summary['train/img_per_sec']:.0f}"
      )
      logging.info(
          "step %d: loss %.4f, bpd %.4f, grad norm %.3g, lr %.3g, %.0f img/s, skipped %d",
          done, summary["train/loss"], summary["train/bpd"], summary["train/grad_norm"],
          summary["train/learning_rate"], summary["train/img_per_sec"],
          summary["train/skipped_steps_total"],
      )

    every = config.checkpoint_every_steps
    if every and done % every == 0 and done < total:  # the final save happens after the loop
      check_streak()
      if int(jax.device_get(state.nonfinite_consecutive)) == 0:
        checkpointing.save(manager, done, state, batches.position())
      else:
        logging.warning("Step %d: no checkpoint inside a run of non-finite steps.", done)

    if config.eval_every_steps and done % config.eval_every_steps == 0 and done < total:
      bpd, _ = evaluate.evaluate_bpd(
          config, flow, state.variables(ema=True), mesh, keys["eval"]
      )
      reporter.scalars(done, {"eval/bpd": bpd})
      logging.info("step %d: test bpd %.4f (EMA parameters)", done, bpd)

    if after_step is not None and after_step(done, metrics):
      break

  check_streak()
  return state, batches.position()


def restore_for_inference(
    config: ml_collections.ConfigDict, workdir: str, *, mesh: Mesh | None = None
) -> TrainResult:
  """The newest readable checkpoint's state (no input pipeline), for eval and sampling.

  Read-only: safe while a training run writes to the same workdir.
  """
  mesh = make_mesh() if mesh is None else mesh
  config_lib.validate_config(config, num_devices=mesh.size, num_processes=jax.process_count())
  info = _check_data(config)
  flow = build_flow(config)
  tx = make_optimizer(config)
  directory = checkpointing.checkpoint_dir(workdir)
  restored = None
  if runtime.path(directory).is_dir():
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


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, **kwargs: Any
) -> dict[str, Any]:
  """Trains, then evaluates test bpd (EMA params) into results.json and writes sample grids.

  Raises runtime.DivergedError (after writing them) if the final test bpd is not finite or far
  above the first training step's bpd.
  """
  workdir = runtime.normalize_dir(workdir, "workdir")
  result = train(config, workdir, **kwargs)
  results = evaluate_and_sample(config, workdir, result)
  runtime.check_final_bpd(results["bpd"], runtime.read_initial_bpd(workdir), workdir)
  return results


def evaluate_and_sample(
    config: ml_collections.ConfigDict, workdir: str, result: TrainResult
) -> dict[str, Any]:
  """results.json and sample grids from a trained/restored state; returns the results."""
  keys = rng_keys(config)
  variables = result.state.variables(ema=True)
  results = evaluate.evaluate_and_write(
      config, workdir, result.flow, variables, result.mesh, keys["eval"],
      info=result.info, step=result.step,
  )
  evaluate.write_sample_grids(
      config, workdir, result.flow, variables, result.mesh, keys["sample"], step=result.step
  )
  return results
