"""Validation of a whole run's config (model, dataset, training) before any compute."""

from __future__ import annotations

import ml_collections

from eiw_flow_jax.config.checks import ConfigError, choice, positive_int, require
from eiw_flow_jax.config.schema import OPTIMIZERS
from eiw_flow_jax.data import registry
from eiw_flow_jax.data.pipeline import DatasetInfo, get_dataset_info
from eiw_flow_jax.model.validation import validate_model_config
from eiw_flow_jax.training.compiler_options import EFFORT_FIELDS, EFFORT_RANGE, is_effort


def validate_config(
    config: ml_collections.ConfigDict,
    *,
    num_devices: int | None = None,
    num_processes: int | None = None,
) -> None:
  """Checks the whole config (model, dataset, training) and raises ConfigError naming the field.

  `num_devices` / `num_processes` (global device count, JAX process count) enable the checks
  that batches split evenly; leave them None to check only what the config alone determines
  (e.g. before `jax.distributed.initialize()`).
  """
  try:
    validate_model_config(config.model)
    _validate_training(config)
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError(str(e)) from e
  except (TypeError, AttributeError, KeyError) as e:  # a field missing or of the wrong type
    raise ConfigError(f"Invalid config ({type(e).__name__}): {e}") from e
  for count, what in ((num_devices, "devices"), (num_processes, "processes")):
    if count is None:
      continue
    for field in ("batch_size", "eval_batch_size"):
      value = config[field]
      if value % count:
        raise ConfigError(
            f"config.{field}={value} must be divisible by the number of {what} ({count}): "
            f"each of them gets an equal share of every batch."
        )


def _validate_training(config: ml_collections.ConfigDict) -> None:
  known = tuple(sorted(registry.DATASETS))
  choice("config.dataset.name", config.dataset.name, known)
  require(
      isinstance(config.seed, int) and config.seed >= 0,
      f"config.seed must be an int >= 0, got {config.seed!r}.",
  )
  for field in ("batch_size", "eval_batch_size", "num_train_steps", "init_batch_size"):
    positive_int(f"config.{field}", config[field])
  for field in ("log_every_steps", "keep_checkpoints", "max_consecutive_nonfinite"):
    positive_int(f"config.{field}", config[field])
  positive_int("config.prefetch_batches", config.prefetch_batches, allow_zero=True)
  positive_int("config.dataset.worker_count", config.dataset.worker_count, allow_zero=True)
  for field in ("checkpoint_every_steps", "eval_every_steps"):
    positive_int(f"config.{field}", config[field], allow_zero=True)
  require(
      0.0 <= config.ema_decay < 1.0,
      f"config.ema_decay must be in [0, 1), got {config.ema_decay!r}.",
  )
  opt = config.optimizer
  require(
      opt.learning_rate > 0,
      f"config.optimizer.learning_rate must be > 0, got {opt.learning_rate!r}.",
  )
  positive_int("config.optimizer.warmup_steps", opt.warmup_steps, allow_zero=True)
  require(
      0.0 <= opt.end_learning_rate_factor <= 1.0,
      "config.optimizer.end_learning_rate_factor must be in [0, 1], got "
      f"{opt.end_learning_rate_factor!r}.",
  )
  choice("config.optimizer.name", opt.name, OPTIMIZERS)
  decay_rate = opt.decay_rate
  require(0.0 < decay_rate <= 1.0,
          f"config.optimizer.decay_rate must be in (0, 1] (1 disables), got {decay_rate!r}.")
  if decay_rate < 1.0:
    positive_int("config.optimizer.steps_per_epoch", opt.steps_per_epoch)
  k, chunk = config.eval.iwbo_samples, config.eval.iwbo_chunk
  positive_int("config.eval.iwbo_samples", k, allow_zero=True)
  positive_int("config.eval.iwbo_chunk", chunk)
  if k:
    require(config.model.backbone == "denseflow",
            "config.eval.iwbo_samples > 0 needs model.backbone='denseflow' (Glow's likelihood "
            f"is exact given the dequantization noise), got {config.model.backbone!r}.")
    require(k % min(chunk, k) == 0,
            f"config.eval.iwbo_samples={k} must be a multiple of config.eval.iwbo_chunk="
            f"{chunk}.")
  for field in ("b1", "b2"):
    require(
        0.0 <= opt[field] < 1.0, f"config.optimizer.{field} must be in [0, 1), got {opt[field]!r}."
    )
  require(
      opt.grad_clip_norm >= 0,
      f"config.optimizer.grad_clip_norm must be >= 0 (0 disables), got {opt.grad_clip_norm!r}.",
  )
  temperatures = tuple(config.sample.temperatures)
  require(
      len(temperatures) > 0 and all(t >= 0 for t in temperatures),
      f"config.sample.temperatures must be a non-empty list of numbers >= 0, got {temperatures!r}.",
  )
  positive_int("config.sample.num_samples", config.sample.num_samples)
  positive_int("config.sample.display_max", config.sample.display_max, allow_zero=True)
  for field in EFFORT_FIELDS:
    value = config.compiler[field]
    require(is_effort(value),
            f"config.compiler.{field} must be a number in {EFFORT_RANGE} (0: XLA's default), "
            f"got {value!r}.")


def check_dataset(config: ml_collections.ConfigDict) -> DatasetInfo:
  """The dataset's `DatasetInfo`; a dataset that does not fit the config is a ConfigError."""
  try:
    return get_dataset_info(config)
  except ValueError as e:  # wrong split name, image shape, ...: a config problem
    raise ConfigError(f"Dataset {config.dataset.name!r}: {e}") from e
