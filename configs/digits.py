"""scikit-learn's bundled 8x8 digits: real data that trains offline on 2 CPU cores in minutes.

Pixel values are 0..16, stored unchanged as uint8 and modelled with n_bits = 5 (a 32-level grid
of which 17 values occur), so bits/dim are bits per 5-bit pixel.

Training budget (measured on 2 CPU cores): the whole `python -m eiw_flow_jax.main` command
(dataset preparation, init, 1250 steps of batch 64, eval and sample grids) takes about a minute.
Test bpd goes from 4.44 at init to about 2.50; with only 1500 training images, longer runs
overfit (train bpd keeps falling, test bpd rises again after ~1500 steps).
"""

from eiw_flow_jax.config.schema import base_config


def get_config():
  config = base_config()
  config.dataset.name = "digits"
  config.model.image_shape = (8, 8, 1)
  config.model.num_levels = 2
  config.model.steps_per_level = 4
  config.model.hidden_channels = 64
  config.model.n_bits = 5
  config.batch_size = 64
  config.num_train_steps = 1250
  config.optimizer.warmup_steps = 100
  config.eval_batch_size = 256
  config.log_every_steps = 50
  config.checkpoint_every_steps = 250
  config.sample.display_max = 16  # the largest stored value, shown as white
  return config
