"""LSUN bedroom at 64x64x3, 8-bit, with Glow's LSUN 64x64 hyperparameters.

Glow (github.com/openai/glow README, "LSUN 64x64 quantitative result"): L=3, K=48, 512 hidden
channels, affine coupling, lr 1e-3, n_bits 8; Glow's Table 2 lists 2.38 bits/dim on bedroom.
Glow (like RealNVP) trained on random 64x64 crops of 96x96 images, while the data layer here
takes the largest centre square resized to 64x64, so numbers are close to but not exactly
comparable. Batch 256, step count, warmup, EMA and clipping are this project's choices.
Evaluated on the "validation" split (LSUN has no public test split).
"""

from eiw_flow_jax.config_lib import base_config


def get_config():
  config = base_config()
  config.dataset.name = "lsun_bedroom"
  config.dataset.eval_split = ""  # the dataset's usual eval split: "validation"
  config.model.image_shape = (64, 64, 3)
  config.model.num_levels = 3
  config.model.steps_per_level = 48
  config.model.hidden_channels = 512
  config.model.n_bits = 8
  config.batch_size = 256
  config.eval_batch_size = 256
  config.num_train_steps = 300_000
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 2000
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  config.eval_every_steps = 20_000
  return config
