"""MNIST read offline from the original idx files (no TFDS catalog, no download).

The files come from the user: `--config.dataset.source_dir=DIR` names a directory holding MNIST's
idx files (from an MNIST mirror). With only the 10k test files (t10k-images-idx3-ubyte.gz,
t10k-labels-idx1-ubyte.gz) the data layer splits them deterministically into 9000 train /
1000 test images; with the 60k train files there as well, the real 60000/10000 split is used.
Once prepared into config.dataset.data_dir the directory is no longer needed. Without it (and
without a prepared copy) the run stops before any compute with one line naming the flag.
Same Glow-style model as configs/mnist.py, with a smaller batch and fewer steps because 9000
training images overfit quickly.
Memory mode `store` (keep every activation for the backward pass): the TPU compiler's fastest
for float32 coupling networks, as for configs/mnist.py. TPU v5e at 16 images per chip (the batch
on 4 chips, scanned steps): 0.12 GiB per chip (temporaries 0.07); 31 GFLOP and 1.4 GB per chip
per step; roofline >= 1.7 ms a step (`remat`: 0.05 GiB, 41 GFLOP, 1.6 GB, 1.9 ms). Command:
`python -m eiw_flow_jax.aot --compare --config=configs/mnist_idx.py --topology=v5e:2x2
--per_device_batch=16 --noeval --compare_memory=store,remat --compare_dtype=auto` (docs/tpu.md).
"""

from eiw_flow_jax.config import recipes


def get_config():
  config = recipes.glow_recipe(
      "mnist_idx", **recipes.MNIST_GLOW_MODEL, batch_size=64, eval_batch_size=512,
      num_train_steps=10_000,  # ~70 epochs of 9000 images
      warmup_steps=500, checkpoint_every_steps=1000, eval_every_steps=2000,
  )
  config.model.memory = "store"  # the TPU compiler's fastest in float32 (docstring)
  return config
