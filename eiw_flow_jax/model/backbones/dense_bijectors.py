"""Bijectors of the DenseFlow backbone and its dequantizer, parameterised as the authors' code.

Each module's `__call__(x, reverse=False, context=None) -> (out, log_det)` returns the log
|det J| of the map it applied, per example (the inverse returns minus the forward's). They
differ from `eiw_flow_jax.model.bijectors` (Glow) on purpose: the parameterisations are DenseFlow's
(ActNorm `z = (x - shift) exp(-log_scale)`, a full 1x1-conv matrix with `slogdet`, couplings
with log-scale `2 tanh(s / 2)` whose network interleaves scale and shift channels), so that a
converted PyTorch state_dict computes the same function. Images are NHWC with the authors'
NCHW channel order.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from eiw_flow_jax.model.backbones.dense_nets import DenseNet

Array = jax.Array


def sum_except_batch(x: Array) -> Array:
  return jnp.sum(x.reshape(x.shape[0], -1), axis=-1)


def squeeze2d(x: Array) -> Array:
  """2x2 space-to-depth with the authors' channel order: out channel = 4 c + 2 i + j."""
  b, h, w, c = x.shape
  if h % 2 or w % 2:
    raise ValueError(f"squeeze2d: H and W must be even, got shape {x.shape}.")
  t = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
  return t.reshape(b, h // 2, w // 2, 4 * c)


def unsqueeze2d(z: Array) -> Array:
  """Inverse of `squeeze2d`."""
  b, h, w, c = z.shape
  if c % 4:
    raise ValueError(f"unsqueeze2d: channels must be divisible by 4, got shape {z.shape}.")
  t = z.reshape(b, h, w, c // 4, 2, 2).transpose(0, 1, 4, 2, 5, 3)
  return t.reshape(b, 2 * h, 2 * w, c // 4)


def std_normal_log_prob(x: Array) -> Array:
  """Per-example log N(x; 0, I), written as the authors' StandardNormal.log_prob."""
  return sum_except_batch(-0.5 * math.log(2 * math.pi) - 0.5 * x**2)


class ActNorm(nn.Module):
  """z = (x - shift) * exp(-log_scale), data-initialised at `init` to the batch mean and
  log(std + 1e-6) per channel (torch's unbiased std), as the authors' ActNormBijection2d."""

  eps: float = 1e-6

  @nn.compact
  def __call__(self, x: Array, reverse: bool = False) -> tuple[Array, Array]:
    c = x.shape[-1]

    def init_shift(_):
      return jnp.mean(x, axis=(0, 1, 2))

    def init_log_scale(_):
      n = x.size // c
      var = jnp.sum(jnp.square(x - jnp.mean(x, axis=(0, 1, 2))), axis=(0, 1, 2)) / max(n - 1, 1)
      return jnp.log(jnp.sqrt(var) + self.eps)

    shift = self.param("shift", init_shift)
    log_scale = self.param("log_scale", init_log_scale)
    log_det = jnp.full((x.shape[0],), -jnp.sum(log_scale) * x.shape[1] * x.shape[2], x.dtype)
    if reverse:
      return shift + x * jnp.exp(log_scale), -log_det
    return (x - shift) * jnp.exp(-log_scale), log_det


class Conv1x1(nn.Module):
  """Invertible 1x1 convolution with a full (orthogonally initialised) C x C weight matrix.

  `weight[o, i]` is torch's layout: out[..., o] = sum_i weight[o, i] x[..., i].
  """

  @nn.compact
  def __call__(self, x: Array, reverse: bool = False) -> tuple[Array, Array]:
    c = x.shape[-1]
    weight = self.param("weight", nn.initializers.orthogonal(), (c, c))
    log_det = jnp.linalg.slogdet(weight)[1] * x.shape[1] * x.shape[2]
    log_det = jnp.full((x.shape[0],), log_det, x.dtype)
    if reverse:
      return jnp.einsum("...i,oi->...o", x, jnp.linalg.inv(weight)), -log_det
    return jnp.einsum("...i,oi->...o", x, weight), log_det


def soft_clamp(unconstrained: Array) -> Array:
  """The authors' bound on log-scales: 2 tanh(u / 2), in (-2, 2)."""
  return 2.0 * jnp.tanh(unconstrained / 2.0)


def coupling_log_scale_and_shift(params: Array) -> tuple[Array, Array]:
  """A coupling network's output as (log-scale, shift): interleaved channels, even ones the
  log-scale (`soft_clamp`ed), odd ones the shift, as the authors' layers read it."""
  return soft_clamp(params[..., 0::2]), params[..., 1::2]


def switch_channels(x: Array, reverse: bool = False) -> Array:
  """Swap the two channel halves (first half = ceil(C / 2), as torch.chunk) and its inverse."""
  c = x.shape[-1]
  first = c - c // 2 if not reverse else c // 2
  return jnp.concatenate([x[..., first:], x[..., :first]], axis=-1)


class AffineCoupling(nn.Module):
  """x = [x1, x2] (x1: ceil(C / 2) channels); z2 = shift + exp(2 tanh(s / 2)) * x2.

  The network sees x1 (and the context, concatenated after x1, if given); its output channels
  interleave (scale, shift) per transformed channel, torch's ElementwiseParams2d 'sequential'.
  `multihead` picks the intra-unit DenseNetMultihead (True) or the dequantizer's DenseNet.
  """

  mid_channels: int
  depth: int
  growth: int
  multihead: bool = True
  train: bool = False
  num_landmarks: int = 4  # Nystrom attention landmarks (multihead nets)
  kernels: str = "auto"  # the networks' 1x1 convolutions: eiw_flow_jax.model.kernels

  @nn.compact
  def __call__(
      self, x: Array, reverse: bool = False, context: Array | None = None
  ) -> tuple[Array, Array]:
    c = x.shape[-1]
    n_id = c - c // 2
    x1, x2 = x[..., :n_id], x[..., n_id:]
    h = x1 if context is None else jnp.concatenate([x1, context], axis=-1)
    params = DenseNet(2 * (c // 2), self.mid_channels, self.depth, self.growth,
                      multihead=self.multihead, train=self.train,
                      num_landmarks=self.num_landmarks, kernels=self.kernels, name="net")(h)
    log_scale, shift = coupling_log_scale_and_shift(params)
    log_det = sum_except_batch(log_scale)
    if reverse:
      return jnp.concatenate([x1, (x2 - shift) * jnp.exp(-log_scale)], axis=-1), -log_det
    return jnp.concatenate([x1, shift + jnp.exp(log_scale) * x2], axis=-1), log_det
