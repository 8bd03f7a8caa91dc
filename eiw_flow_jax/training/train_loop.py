"""The training loop: from a workdir and a config to a trained state, results and samples.

The step runs over the mesh of `eiw_flow_jax.training.sharding` (batch sharded on "data", state
replicated); the state is `train_state.TrainState`, the optimizer `optimizer.make_optimizer`.

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

Input: `prefetch.Prefetcher` puts config.prefetch_batches global batches on the devices ahead
of the step; checkpoints record the input position of the next batch the step takes, not of
the prefetched ones, so resuming stays exact.

EMA: decay min(config.ema_decay, (1 + n) / (10 + n)) after n applied updates, so short runs
are not dominated by the initial parameters; eval and sampling use the EMA parameters.

Pixels arrive on the model's n_bits grid: the data layer drops extra low bits at the source.

Run safety: the workdir is locked while training (workdir_lock; a lock taken over by another
run stops this one before its next checkpoint); SIGTERM/SIGINT finish the step, save and raise
stop_signals.StopRequested (during the final evaluation and sampling: at once, naming what is
left); resuming checks the config against the saved config.json and the restored parameters for
NaN/inf, and records config changes only once the restore succeeded (resume); failed saves raise
storage.StorageError; a diverged run raises divergence.DivergedError.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import Mesh

from eiw_flow_jax.data import pipeline, registry
from eiw_flow_jax.training import (
    evaluate,
    reporting,
    resume,
    run_config,
    sample_grids,
    train_step,
)
from eiw_flow_jax.training.prefetch import Prefetcher
from eiw_flow_jax.training.run import Run
from eiw_flow_jax.training.sharding import batch_sharding
from eiw_flow_jax.training.train_state import TrainResult, TrainState, rng_keys
from eiw_flow_jax.workdir import checkpointing, divergence, stop_signals, storage, workdir_lock


class NonFiniteError(RuntimeError):
  """Too many consecutive steps had a non-finite loss or gradient (their updates were skipped)."""


# ----------------------------------------------------------------------------------------------
# The loop.


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    mesh: Mesh | None = None,
    nonfinite_steps: Callable[[int], bool] | None = None,
    allow_config_change: bool = False,
    take_over_lock: bool = False,
    signals: stop_signals.StopSignals | None = None,
) -> TrainResult:
  """Trains (resuming from the newest readable checkpoint in `workdir`) to num_train_steps.

  `workdir` is a local directory or an `etils.epath` URL (`gs://bucket/run`). It is locked
  for the run (workdir_lock.WorkdirBusyError if another run holds it; a lock whose holder is
  gone is taken over, and `take_over_lock` takes over any lock). Resuming with a config that
  differs from the saved config.json in model, batch size, seed or dataset raises
  resume.ConfigMismatchError unless `allow_config_change`. Nothing in the workdir changes
  before the restore has succeeded; then each changed field is logged and kept in its
  config_history.jsonl (`resume.save_config`). A workdir already at or past num_train_steps
  trains nothing (said in one line) and returns its newest state.

  SIGTERM/SIGINT: the current step finishes, a checkpoint is saved, stop_signals.StopRequested is
  raised (`signals`: the caller's StopSignals, which then also saw a signal that came after the
  last step). `nonfinite_steps` (tests only): steps for which the loss is made NaN, to exercise
  the non-finite guard. Raises NonFiniteError once config.max_consecutive_nonfinite skipped
  steps in a row are seen, at the next logging interval (config.log_every_steps) or
  checkpoint, whichever comes first; the checkpoints saved before are left as they are.
  """
  started = time.time()
  run = Run.build(config, mesh)
  workdir = storage.normalize_dir(workdir, "workdir")
  with storage.writing("the workdir", workdir):
    storage.path(workdir).mkdir(parents=True, exist_ok=True)

  lock = workdir_lock.acquire_workdir_lock(workdir, take_over=take_over_lock)
  manager = reporter = None
  try:
    with contextlib.ExitStack() as stack:
      if signals is None:
        signals = stack.enter_context(stop_signals.StopSignals())
      # Before config.json is overwritten: the saved one is what the checkpoints were made with.
      resume.check_resume_config(
          config, workdir, has_checkpoints=checkpointing.has_checkpoints(workdir),
          allow_change=allow_config_change,
      )
      info = run_config.check_dataset(config)
      with storage.writing("checkpoints", checkpointing.checkpoint_dir(workdir)):
        manager = checkpointing.make_manager(workdir, keep=config.keep_checkpoints)
      train_iter = pipeline.create_train_iterator(config)
      restored = run.restore(manager, train_iter)
      if restored is None:
        n_init = min(config.init_batch_size, info.num_train)
        init_images = pipeline.load_examples(
            config, registry.resolve_split(config, "train"), n_init)
        state = run.create_state(init_images)
        logging.info("Initialised a fresh model (data-dependent init on %d examples).", n_init)
      else:
        restored_step, state = restored
        resume.check_restored(state, restored_step, workdir, run.flow.stacked_axis)
        logging.info("Resumed from the checkpoint at step %d in %s.", restored_step, workdir)
      start = int(jax.device_get(state.step))
      if start < config.num_train_steps or restored is None:
        # The resume succeeded and the run trains with this config: now the workdir says so.
        resume.save_config(config, workdir, step=None if restored is None else start)
      elif start > config.num_train_steps:
        logging.warning(
            "config.num_train_steps=%d is below the step of the workdir's newest checkpoint "
            "(%d): training nothing, the run goes on with the step-%d state (config.json is "
            "unchanged). Use another --workdir to train a shorter run.",
            config.num_train_steps, start, start)
      else:
        logging.info("The workdir is already trained to num_train_steps=%d.", start)
      reporter = reporting.Reporter(workdir, config.num_train_steps, start, config.batch_size)

      def after_step(done: int, metrics: dict[str, jax.Array]) -> bool:
        if done == 1:  # the reference for the divergence check (one device read, once)
          divergence.record_initial_bpd(workdir, float(jax.device_get(metrics["bpd"])))
        checkpointing.check_saves(manager)  # a failed background save stops the run now
        return signals.should_stop(done)

      def before_save() -> None:  # two runs must never write into one workdir
        workdir_lock.check_held(lock, workdir)

      state, position = _train_loop(
          run, manager, reporter, state, train_iter, nonfinite_steps, after_step=after_step,
          before_save=before_save,
      )
      final = int(jax.device_get(state.step))
      if manager.latest_step() != final:
        before_save()
        checkpointing.save(manager, final, state, position, force=True)
      checkpointing.wait(manager)
      evaluate.record_train_time(workdir, time.time() - started, final)
      if final < config.num_train_steps and signals.received is not None:
        raise stop_signals.StopRequested(
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
  return TrainResult(flow=run.flow, state=state, mesh=run.mesh, info=info, step=final)


def _saved_message(manager: ocp.CheckpointManager) -> str:
  latest = manager.latest_step()
  if latest is None:
    return f"No checkpoint was saved yet in {manager.directory}."
  return f"The last checkpoint (step {latest}) in {manager.directory} is unchanged."


def _train_loop(
    run: Run,
    manager: ocp.CheckpointManager,
    reporter: reporting.Reporter,
    state: TrainState,
    train_iter: Any,
    nonfinite_steps: Callable[[int], bool] | None,
    after_step: Callable[[int, dict[str, jax.Array]], bool] | None = None,
    before_save: Callable[[], None] | None = None,
) -> tuple[TrainState, Any]:
  """Steps from state.step to config.num_train_steps with logging, checkpoints and evals.

  Nothing is read back from the devices between logging intervals, so the host dispatches
  steps ahead of the devices; the non-finite streak (computed on the device every step) is
  checked at each logging interval and before each checkpoint.

  `after_step(done, metrics)` runs after every step; True stops the loop at that step (the
  caller saves). `before_save()` runs before each checkpoint (and may raise to stop the run).
  Returns the state and the input position to checkpoint with it (prefetched batches not yet
  consumed are not counted).
  """
  config, flow, mesh = run.config, run.flow, run.mesh
  start, total = int(jax.device_get(state.step)), config.num_train_steps
  step_fn = run.train_step()
  poisoned_fn = None
  stats_fn = train_step.make_stats_fn(flow, mesh)
  keys = rng_keys(config)
  batches = Prefetcher(
      train_iter, batch_sharding(mesh), config.prefetch_batches, limit=total - start
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
        poisoned_fn = run.train_step(inject_nonfinite=True)
      state, metrics = poisoned_fn(state, images)
    else:
      state, metrics = step_fn(state, images)
    history.append((step, metrics))
    reporter.advance()
    done = step + 1

    if done % config.log_every_steps == 0 or done == total:
      check_streak()
      summary, changes = reporting.summarise(jax.device_get([m for _, m in history]))
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
        if before_save is not None:
          before_save()
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


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, **kwargs: Any
) -> dict[str, Any]:
  """Trains, then evaluates test bpd (EMA params) into results.json and writes sample grids.

  A SIGTERM/SIGINT after the last training step stops at once with StopRequested saying what
  is left to write (rerunning the command restores the final checkpoint and writes it).
  Raises divergence.DivergedError (after writing them) if the final test bpd is not finite or far
  above the first training step's bpd.
  """
  workdir = storage.normalize_dir(workdir, "workdir")
  with stop_signals.StopSignals() as signals:
    result = train(config, workdir, signals=signals, **kwargs)
    results = evaluate_and_sample(config, workdir, result, signals=signals)
  divergence.check_final_bpd(results["bpd"], divergence.read_initial_bpd(workdir), workdir)
  return results


def evaluate_and_sample(
    config: ml_collections.ConfigDict, workdir: str, result: TrainResult, *,
    signals: stop_signals.StopSignals | None = None,
) -> dict[str, Any]:
  """results.json and sample grids from a trained/restored state; returns the results.

  With `signals`, a stop signal (also one received before) raises StopRequested at once, naming
  what is not written yet.
  """
  keys = rng_keys(config)
  variables = result.state.variables(ema=True)

  def stop_before_writing(left: str) -> None:
    if signals is not None:
      signals.stop_at_once(lambda signum: stop_signals.StopRequested(
          signum, result.step, checkpointing.checkpoint_dir(workdir), left=left))

  stop_before_writing(f"results.json and the sample grids ({sample_grids.SAMPLES_DIR}/)")
  results = evaluate.evaluate_and_write(
      config, workdir, result.flow, variables, result.mesh, keys["eval"],
      info=result.info, step=result.step,
  )
  stop_before_writing(f"the sample grids ({sample_grids.SAMPLES_DIR}/)")
  sample_grids.write_sample_grids(
      config, workdir, result.flow, variables, result.mesh, keys["sample"], step=result.step
  )
  return results
