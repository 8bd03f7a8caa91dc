"""Downsampled ImageNet 32x32x3 (TFDS imagenet_resized/32x32), 8-bit, Glow's hyperparameters.

Glow (github.com/openai/glow README, "ImageNet 32x32 quantitative result"): L=3, K=48, 512
hidden channels, affine coupling, lr 1e-3, n_bits 8, 8 GPUs x 64 = 512 images per batch;
Glow reports 4.09 bits/dim. Evaluated on the "validation" split (ImageNet has no public test
labels; for density estimation the validation set is the usual test set).
Step count, warmup, EMA and clipping are this project's choices.
"""

from eiw_flow_jax.config_lib import base_config


def get_config():
  config = base_config()
  config.dataset.name = "imagenet32"
  config.dataset.eval_split = ""  # the dataset's usual eval split: "validation"
  config.model.image_shape = (32, 32, 3)
  config.model.num_levels = 3
  config.model.steps_per_level = 48
  config.model.hidden_channels = 512
  config.model.n_bits = 8
  config.batch_size = 512
  config.eval_batch_size = 512
  config.num_train_steps = 400_000  # ~160 epochs of 1.28M images
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 2000
  config.init_batch_size = 512
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  config.eval_every_steps = 20_000
  return config
