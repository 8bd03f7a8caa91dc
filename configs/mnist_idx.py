"""MNIST read offline from the original idx files in config.dataset.source_dir (no TFDS catalog).

The default source_dir, "../shared/data/mnist", is relative to the current directory (run from
the repository root). It holds only the 10k MNIST test files, which the data layer splits
deterministically into 9000 train / 1000 test images; with the 60k train files there as well,
the real 60000/10000 split is used. Same Glow-style model as configs/mnist.py, with a smaller
batch and fewer steps because 9000 training images overfit quickly.
"""

from eiw_flow_jax.config import recipes


def get_config():
  config = recipes.glow_recipe(
      "mnist_idx", **recipes.MNIST_GLOW_MODEL, batch_size=64, eval_batch_size=512,
      num_train_steps=10_000,  # ~70 epochs of 9000 images
      warmup_steps=500, checkpoint_every_steps=1000, eval_every_steps=2000,
  )
  config.dataset.source_dir = "../shared/data/mnist"
  return config
