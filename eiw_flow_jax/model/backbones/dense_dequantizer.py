"""Dequantizers: how integer pixels become continuous values the flow can score.

`UniformDequantize` (in `eiw_flow_jax.model.bijectors`, used by Glow) adds u ~ U[0,1). The
`VariationalDequantizer` here is Flow++'s, as DenseFlow builds it (`dequantization.py` of the
authors' code): u = sigmoid(unsqueeze(flow(eps; context(x)))), eps ~ N(loc, exp(log_scale)) per
channel at half resolution, four [1x1 conv, conditional affine coupling] steps conditioned on a
context network of x, a final 1x1 conv. It returns u and log q(u | x), so the model's objective
log p((x + u) / 2^n) - D n ln 2 - log q(u | x) is a lower bound on log P(x) (an ELBO).

The standard-normal draw `eps` is passed in, so tests can compare against the PyTorch model.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from eiw_flow_jax.model.backbones.dense_bijectors import (
    AffineCoupling,
    Conv1x1,
    sum_except_batch,
    unsqueeze2d,
)
from eiw_flow_jax.model.backbones.dense_nets import DenseBlock, conv

Array = jax.Array


class VariationalDequantizer(nn.Module):
  """(uint8 x, eps) -> (u in (0,1)^D, log q(u | x)); eps has shape (B, H/2, W/2, 4C)."""

  n_bits: int = 8
  num_steps: int = 4
  context_channels: int = 64
  mid_channels: int = 64
  depth: int = 4
  growth: int = 64
  context_growth: int = 16
  context_depth: int = 4
  scan: bool = True  # the flow's steps and the context's dense layers as scans (False: unrolled)
  kernels: str = "auto"  # the networks' 1x1 convolutions: eiw_flow_jax.model.kernels

  def noise_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    h, w, c = image_shape
    return (h // 2, w // 2, 4 * c)

  @nn.compact
  def __call__(self, x: Array, eps: Array) -> tuple[Array, Array]:
    b, h, w, c = x.shape
    expected = (b, *self.noise_shape((h, w, c)))
    if tuple(eps.shape) != expected:
      raise ValueError(f"dequantization noise: expected shape {expected}, got {eps.shape}.")
    ctx = 2.0 * x.astype(jnp.float32) / (2**self.n_bits - 1) - 1.0
    # Their FLOPs are a few percent of the dequantizer's: the context's dense layers run
    # padded to the widest as one scan each (`DenseBlock.scan_layers`).
    ctx = DenseBlock(self.mid_channels, self.context_depth, self.context_growth,
                     scan_layers=True, unroll=not self.scan, kernels=self.kernels,
                     name="context_block0")(ctx)
    ctx = conv(self.mid_channels, 2, "context_down", stride=2)(ctx)
    ctx = DenseBlock(self.context_channels, self.context_depth, self.context_growth,
                     scan_layers=True, unroll=not self.scan, kernels=self.kernels,
                     name="context_block1")(ctx)

    channels = 4 * c
    loc = self.param("loc", nn.initializers.zeros, (channels,))
    log_scale = self.param("log_scale", nn.initializers.zeros, (channels,))
    z = loc + jnp.exp(log_scale) * eps
    log_q = sum_except_batch(
        -0.5 * math.log(2 * math.pi) - log_scale
        - 0.5 * jnp.exp(-2 * log_scale) * jnp.square(z - loc)
    )
    if self.is_initializing() or self.num_steps < 2:
      for i in range(self.num_steps):
        z, ld = Conv1x1(name=f"conv{i}")(z)
        log_q = log_q - ld
        z, ld = AffineCoupling(self.mid_channels, self.depth, self.growth, multihead=False,
                               kernels=self.kernels, name=f"coupling{i}")(z, context=ctx)
        log_q = log_q - ld
    else:
      z, log_q = self._scanned_steps(z, log_q, ctx)
    z, ld = Conv1x1(name=f"conv{self.num_steps}")(z)
    log_q = log_q - ld
    z = unsqueeze2d(z)
    log_q = log_q - sum_except_batch(-jax.nn.softplus(-z) - jax.nn.softplus(z))
    return jax.nn.sigmoid(z), log_q

  def _scanned_steps(self, z: Array, log_q: Array, ctx: Array) -> tuple[Array, Array]:
    """The flow's steps (1x1 conv, coupling) but the last 1x1 conv, as one scan over their
    parameters (`conv{i}`, `coupling{i}`, stacked here): they share every shape."""
    params = self.variables["params"]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[
        {"conv": params[f"conv{i}"], "coupling": params[f"coupling{i}"]}
        for i in range(self.num_steps)])
    conv1x1 = Conv1x1(parent=None)
    coupling = AffineCoupling(self.mid_channels, self.depth, self.growth, multihead=False,
                              kernels=self.kernels, parent=None)

    def body(carry: tuple[Array, Array], step: Any) -> tuple[tuple[Array, Array], None]:
      z, log_q = carry
      z, conv_log_det = conv1x1.apply({"params": step["conv"]}, z)
      z, coupling_log_det = coupling.apply({"params": step["coupling"]}, z, context=ctx)
      return (z, log_q - conv_log_det - coupling_log_det), None

    return jax.lax.scan(body, (z, log_q), stacked,
                        unroll=1 if self.scan else self.num_steps)[0]
