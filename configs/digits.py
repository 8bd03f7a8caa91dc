"""scikit-learn's bundled 8x8 digits: real data that trains offline on 2 CPU cores in minutes.

Pixel values are 0..16, stored unchanged as uint8 and modelled with n_bits = 5 (a 32-level grid
of which 17 values occur), so bits/dim are bits per 5-bit pixel.
"""

from eiw_flow_jax.config_lib import base_config


def get_config():
  config = base_config()
  config.dataset.name = "digits"
  config.model.image_shape = (8, 8, 1)
  config.model.num_levels = 2
  config.model.steps_per_level = 4
  config.model.hidden_channels = 64
  config.model.n_bits = 5
  config.batch_size = 64
  config.num_train_steps = 1500
  return config
