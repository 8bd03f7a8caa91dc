"""MNIST read offline from the original idx files (no TFDS catalog, no download).

The files come from the user: `--config.dataset.source_dir=DIR` names a directory holding MNIST's
idx files (from an MNIST mirror). With only the 10k test files (t10k-images-idx3-ubyte.gz,
t10k-labels-idx1-ubyte.gz) the data layer splits them deterministically into 9000 train /
1000 test images; with the 60k train files there as well, the real 60000/10000 split is used.
Once prepared into config.dataset.data_dir the directory is no longer needed. Without it (and
without a prepared copy) the run stops before any compute with one line naming the flag.
Same Glow-style model as configs/mnist.py, with a smaller batch and fewer steps because 9000
training images overfit quickly.
"""

from eiw_flow_jax.config import recipes


def get_config():
  config = recipes.glow_recipe(
      "mnist_idx", **recipes.MNIST_GLOW_MODEL, batch_size=64, eval_batch_size=512,
      num_train_steps=10_000,  # ~70 epochs of 9000 images
      warmup_steps=500, checkpoint_every_steps=1000, eval_every_steps=2000,
  )
  return config
