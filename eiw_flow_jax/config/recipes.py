"""Training recipes the dataset configs build on: Glow's, DenseFlow's DF-74-10, Glow's LSUN, and
per-hardware variants of a config (`--config=configs/<name>.py:<variant>`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

from eiw_flow_jax.config.checks import ConfigError
from eiw_flow_jax.config.schema import base_config


def denseflow_df_74_10(dataset: str, image_shape: tuple[int, int, int], *, batch_size: int,
                       epochs: int, num_train: int, decay_rate: float, iwbo_samples: int,
                       iwbo_chunk: int) -> ml_collections.ConfigDict:
  """base_config() for `dataset` with DF-74-10, EIW transitions and DenseFlow's training recipe.

  The model: block_conf 6 4 1, layers_conf 5 6 20, layer_mid_chnls 48 48 48, growth_rate 10
  (the defaults of base_config), EIW global transitions with the authors' literal regulariser
  and sigma 1e-3. Training (DenseFlow's README flags, read by the optimiser file both
  repositories' train.py imports, `optim/expdecay_flow.py`): Adamax (b1 0.9, b2 0.999, its
  --momentum and --momentum_sqr defaults), lr 1e-3, 5000 warmup steps, lr *= decay_rate after
  every epoch of int(num_train / batch_size) + 1 steps, no clipping, no EMA; ActNorm
  initialised on one training batch. (`optim/expdecay.py`, a OneCycleLR, is imported by neither
  train.py nor train_more.py.) In their runs the warmup scheduler resets the learning rate at
  every step, which undoes the per-epoch decay, so the configs train as their runs did:
  `decay_rate=1.0` (lr constant after warmup), not the README's --gamma (docs/denseflow.md,
  "Training step"; `--config.optimizer.decay_rate=<gamma>` gives the README's intent).
  """
  config = base_config()
  config.dataset.name = dataset
  config.model.image_shape = image_shape
  config.model.backbone = "denseflow"
  config.model.split = "eiw"
  config.model.eiw.mode = "global"
  config.model.eiw.regularizer = "literal"
  config.model.eiw.sigma = 1e-3
  config.model.eiw.reduction = 16
  config.model.n_bits = 8
  steps_per_epoch = int(num_train / batch_size) + 1
  config.batch_size = batch_size
  config.init_batch_size = batch_size
  config.num_train_steps = epochs * steps_per_epoch
  config.optimizer.name = "adamax"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 5000
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.grad_clip_norm = 0.0
  config.optimizer.decay_rate = decay_rate
  config.optimizer.steps_per_epoch = steps_per_epoch
  config.ema_decay = 0.0
  config.eval_batch_size = 16
  config.eval.iwbo_samples = iwbo_samples
  config.eval.iwbo_chunk = iwbo_chunk
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  config.eval_every_steps = 0
  config.sample.num_samples = 64
  return config


def glow_recipe(dataset: str, *, image_shape: tuple[int, int, int], num_levels: int,
                steps_per_level: int, batch_size: int, num_train_steps: int,
                warmup_steps: int = 2000, eval_every_steps: int = 20_000,
                hidden_channels: int = 512, eval_batch_size: int | None = None,
                checkpoint_every_steps: int = 2000) -> ml_collections.ConfigDict:
  """base_config() for `dataset` with the Glow backbone and Glow's training recipe.

  Glow (Kingma & Dhariwal 2018; github.com/openai/glow README): affine coupling, learned top
  prior, Adam with lr 1e-3 after a linear warmup, n_bits 8; the eval batch is the train batch
  unless given; logs every 100 steps. A dataset's config states its L, K, batch and schedule;
  the step count, warmup length, EMA and clipping are this project's choices. The split stays
  EIW-Flow's (`split=eiw`, `eiw.mode=global`); `--config.model.split=vanilla` is Glow itself
  (Glow has no Shuffle), compared with the same published rows. The backbone differs from
  openai/glow in three documented ways (top prior per position, no ActNorm log-scale factor 3,
  no edge-bias padding): README.md, "Glow backbone vs openai/glow".

  Memory figures in the configs' docstrings are the TPU compiler's (`python -m eiw_flow_jax.aot`,
  TPU v5e, docs/tpu.md) where a config names that command; GPU buffer assignment differs, so
  leave headroom there. Roofline step times are lower bounds (no all-reduce, kernels at peak);
  wall times stated at an assumed TFLOP/s rate are estimates from XLA's FLOP count, and flows in
  float32 often sustain well below it.
  """
  config = base_config()
  config.dataset.name = dataset
  config.model.image_shape = image_shape
  config.model.num_levels = num_levels
  config.model.steps_per_level = steps_per_level
  config.model.hidden_channels = hidden_channels
  config.model.coupling = "affine"
  config.model.n_bits = 8
  config.batch_size = batch_size
  config.eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
  config.num_train_steps = num_train_steps
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = warmup_steps
  config.log_every_steps = 100
  config.checkpoint_every_steps = checkpoint_every_steps
  config.eval_every_steps = eval_every_steps
  return config


# The Glow-style model both MNIST configs train (this project's choice: Glow reported no MNIST).
MNIST_GLOW_MODEL = {
    "image_shape": (28, 28, 1), "num_levels": 2, "steps_per_level": 16, "hidden_channels": 256,
}


def hardware_variant(config: ml_collections.ConfigDict, hardware: str | None,
                     variants: Mapping[str, Mapping[str, Any]]) -> ml_collections.ConfigDict:
  """`config` for `--config=configs/<name>.py:<hardware>`, as Flax's examples keep per-hardware
  configs: ml_collections' config_flags passes the text after ':' to `get_config(hardware)`.

  `variants[hardware]` maps dotted field names to values set on `config`; no hardware (the plain
  path) leaves the config as the file states it. An unknown name is a ConfigError naming the
  known ones.
  """
  if not hardware:
    return config
  if hardware not in variants:
    known = ", ".join(sorted(variants)) or "none"
    raise ConfigError(
        f"Unknown hardware variant {hardware!r} for the {config.dataset.name} config; "
        f"expected one of: {known} (or no ':<variant>' for the default)."
    )
  config.update_from_flattened_dict(dict(variants[hardware]))
  return config



# Glow's LSUN setup (configs/lsun_*.py); 16 images on a 16 GiB v5e chip fit as stored.
LSUN_HARDWARE = {"v5e_16": {}}


def glow_lsun(dataset: str, hardware: str = "") -> ml_collections.ConfigDict:
  """Glow's LSUN 64x64 setup (github.com/openai/glow README, "LSUN 64x64 quantitative result").

  L=3, K=48, 512 hidden channels, affine coupling, lr 1e-3, n_bits 8 (`glow_recipe`). Glow
  (like RealNVP) trained on random 64x64 crops of images downscaled to a smallest side of 96,
  the data the configs read (`lsun_*_realnvp`; `lsun_*` is this project's centre square,
  compared with no published number). Batch 256, step count, warmup, EMA and clipping are this
  project's choices.
  Evaluated on "validation" (LSUN has no public test split). Hardware: 8 accelerators with
  >= 16 GB each, 32 images per device.

  Memory mode `remat` (recompute each flow step in the backward pass): the TPU compiler's fastest
  for float32 coupling networks. TPU v5e at 32 images per chip (scanned steps): 2.14 GiB per chip
  (arguments 1.00, temporaries 1.10); 6090 GFLOP and 92.9 GB per chip per step; roofline
  >= 113 ms a step, >= 9.5 h for 300k steps (`store`: 11.89 GiB of the 15.75 the compiler allows,
  4572 GFLOP, 113.9 GB, 139 ms). Command: `python -m eiw_flow_jax.aot --compare
  --config=configs/lsun_bedroom.py --topology=v5e:2x2 --per_device_batch=32 --noeval
  --compare_memory=store,remat --compare_dtype=auto` (docs/tpu.md). `:v5e_16` (16 chips of 16
  GiB, 16 images each): as is (with `store`, 7.27 GiB per chip at 16).
  """
  config = glow_recipe(
      dataset, image_shape=(64, 64, 3), num_levels=3, steps_per_level=48, batch_size=256,
      num_train_steps=300_000,
  )
  config.dataset.eval_split = ""  # the dataset's usual eval split: "validation"
  config.model.memory = "remat"  # the TPU compiler's fastest in float32 (docstring)
  return hardware_variant(config, hardware, LSUN_HARDWARE)
