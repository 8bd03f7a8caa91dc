"""Downsampled ImageNet 64x64x3 (TFDS imagenet_resized/64x64), 8-bit, Glow's architecture.

Glow (github.com/openai/glow README, "ImageNet 64x64 quantitative result"): L=4, K=48, 512
hidden channels, affine coupling, lr 1e-3, n_bits 8; Glow reports 3.81 bits/dim. The batch of
256 (half of Glow's 512 at 32x32, for memory at 4x the pixels), the step count, warmup, EMA and
clipping are this project's choices. Evaluated on "validation".
"""

from eiw_flow_jax.config_lib import base_config


def get_config():
  config = base_config()
  config.dataset.name = "imagenet64"
  config.dataset.eval_split = ""  # the dataset's usual eval split: "validation"
  config.model.image_shape = (64, 64, 3)
  config.model.num_levels = 4
  config.model.steps_per_level = 48
  config.model.hidden_channels = 512
  config.model.n_bits = 8
  config.batch_size = 256
  config.eval_batch_size = 256
  config.num_train_steps = 400_000
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 2000
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  config.eval_every_steps = 20_000
  return config
