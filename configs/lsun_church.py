"""LSUN church outdoor at 64x64x3, 8-bit, as RealNVP and Glow report on it
(`lsun_church_realnvp`), with Glow's LSUN 64x64 setup.

The setup, its hardware and its `:v5e_16` variant: `recipes.glow_lsun`.
Memory mode `remat` (recompute each flow step in the backward pass): the TPU compiler's fastest
in float32; its figures and command: `recipes.glow_lsun`.
GPU memory per device (the model of both LSUN configs), from XLA's GPU compiler, one node of 8
H100s at 32 images each, float32, `store`: 12.14 GiB of the 59.33 JAX's allocator takes of an H100
(arguments 0.99, temporaries 11.15); 4539 GFLOP per GPU per step; roofline >= 30.5 ms a step
(memory traffic), >= 2.5 h for 300k steps. Command: `python -m eiw_flow_jax.aot
--config=configs/lsun_church.py --topology=h100:8 --noeval
--config.model.memory=store` (docs/gpu.md).
`--config.model.split=vanilla` is Glow itself (`recipes.glow_recipe`).

Published target (bits/dim): Glow 2.67 (arXiv:1807.03039, Table 2); RealNVP 3.08
(arXiv:1605.08803, Table 1). Their data: images downscaled so the smallest side is 96, random
64x64 crops (docs/datasets.md). `--config.dataset.name=lsun_church` reads this project's own
largest centre square instead, compared with nothing.

Data: from the LSUN lmdb export (TFDS's LSUN builder needs tensorflow-io, which does not load
next to current TensorFlow): unzip church_outdoor_train_lmdb.zip and church_outdoor_val_lmdb.zip
into SRC, then `python -m eiw_flow_jax.prepare --dataset=lsun_church_realnvp --data_dir=DIR
--source_dir=SRC`.
"""

from eiw_flow_jax.config import recipes

HARDWARE = recipes.LSUN_HARDWARE


def get_config(hardware: str = ""):
  return recipes.glow_lsun("lsun_church_realnvp", hardware)
