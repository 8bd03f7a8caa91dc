"""The optimizer: Adam or Adamax with a learning-rate schedule and global-norm clipping."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from eiw_flow_jax.config.checks import choice
from eiw_flow_jax.config.schema import OPTIMIZERS


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
    decay_rate = float(opt.decay_rate)
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
  choice("config.optimizer.name", opt.name, OPTIMIZERS)
  make = getattr(optax, opt.name)  # OPTIMIZERS are named as optax names them
  parts.append(make(make_schedule(config), b1=opt.b1, b2=opt.b2))
  return optax.chain(*parts)
