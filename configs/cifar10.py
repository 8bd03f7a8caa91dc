"""CIFAR-10 32x32x3, 8-bit, with Glow's CIFAR-10 hyperparameters.

Glow (Kingma & Dhariwal 2018; github.com/openai/glow README): L=3 levels, K=32 steps per level,
512 hidden channels, affine coupling, learned top prior, Adam with lr 1e-3 after a linear
warmup, n_bits 8, and 8 GPUs x 64 = 512 images per batch. Glow reports 3.35 bits/dim.
The step count, warmup length, EMA and clipping are this project's choices.
Needs the TFDS dataset prepared in array_record format (see eiw_flow_jax.data.CATALOG_HELP).
"""

from eiw_flow_jax.config_lib import base_config


def get_config():
  config = base_config()
  config.dataset.name = "cifar10"
  config.model.image_shape = (32, 32, 3)
  config.model.num_levels = 3
  config.model.steps_per_level = 32
  config.model.hidden_channels = 512
  config.model.coupling = "affine"
  config.model.n_bits = 8
  config.batch_size = 512
  config.eval_batch_size = 512
  config.num_train_steps = 200_000  # ~2000 epochs of 50k images
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 1000
  config.init_batch_size = 512
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  config.eval_every_steps = 10_000
  return config
