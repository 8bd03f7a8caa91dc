"""Backbones: multi-scale flows that `eiw_flow_jax.model.flow.Flow` wraps.

Every backbone is a linen module built from the validated `config.model` with the methods
`forward(y) -> (latents, log_det, log_prior, aux)`, `inverse(latents) -> y`,
`generate(rng, num, temperature) -> (y, latents)`, `prior_means(latents)` and `diagnostics(y)`.
Glow's share the bijectors (`eiw_flow_jax.model.bijectors`) and splits
(`eiw_flow_jax.model.splits`);
DenseFlow's (`DenseFlowBackbone`, the paper's model) has its own, parameterised as the authors'
PyTorch code (`dense_bijectors.py`, `dense_nets.py`, `dense_dequantizer.py`); its
`forward`/`diagnostics` also take the augmentation noise, and `forward_x(x, noise)` runs the
variational dequantization too.
"""

from eiw_flow_jax.model.backbones.denseflow import DenseFlowBackbone
from eiw_flow_jax.model.backbones.glow import MultiScaleFlow

__all__ = ["DenseFlowBackbone", "MultiScaleFlow"]
