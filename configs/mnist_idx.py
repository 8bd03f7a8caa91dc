"""MNIST read offline from the original idx files in config.dataset.source_dir (no TFDS catalog).

The default source_dir, "../shared/data/mnist", is relative to the current directory (run from
the repository root). It holds only the 10k MNIST test files, which the data layer splits
deterministically into 9000 train / 1000 test images; with the 60k train files there as well,
the real 60000/10000 split is used. Same Glow-style model as configs/mnist.py, with a smaller
batch and fewer steps because 9000 training images overfit quickly.
"""

from eiw_flow_jax.config_lib import base_config


def get_config():
  config = base_config()
  config.dataset.name = "mnist_idx"
  config.dataset.source_dir = "../shared/data/mnist"
  config.model.image_shape = (28, 28, 1)
  config.model.num_levels = 2
  config.model.steps_per_level = 16
  config.model.hidden_channels = 256
  config.model.n_bits = 8
  config.batch_size = 64
  config.eval_batch_size = 512
  config.num_train_steps = 10_000  # ~70 epochs of 9000 images
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 500
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  config.eval_every_steps = 2000
  return config
