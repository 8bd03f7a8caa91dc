"""Backbones: multi-scale flows that `eiw_flow_jax.model.Flow` wraps.

Every backbone is a linen module built from the validated `config.model` with the methods
`forward(y) -> (latents, log_det, log_prior, aux)`, `inverse(latents) -> y`,
`generate(rng, num, temperature) -> (y, latents)`, `prior_means(latents)` and `diagnostics(y)`.
They share the bijectors (`eiw_flow_jax.bijectors`) and splits (`eiw_flow_jax.splits`).
"""

from eiw_flow_jax.backbones.glow import MultiScaleFlow

__all__ = ["MultiScaleFlow"]
