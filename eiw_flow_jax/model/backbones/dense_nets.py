"""The non-invertible networks of DenseFlow (Grcic et al. 2021), as the authors build them.

These compute coupling and noise parameters; nothing here needs to be invertible. They follow
the PyTorch code of DenseFlow / EIW-Flow (`denseflow/nn/blocks/denseblock.py`,
`attention.py`, `nn/nets/matching/densenet.py`) layer for layer, channel order included, so
that a converted state_dict gives the same numbers: images are NHWC here, but every channel
index means what it means in the authors' NCHW tensors, and the two places where their code
reinterprets an NCHW buffer with a raw `reshape` (the Nystrom attention) are reproduced.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from eiw_flow_jax.model.bijectors import Conv1x1

Array = jax.Array

BN_EPS = 1e-5  # torch.nn.BatchNorm2d's default
BN_MOMENTUM = 0.1


def conv(
    features: int,
    kernel: int,
    name: str,
    *,
    zero_init: bool = False,
    use_bias: bool = True,
    stride: int = 1,
    kernels: str = "auto",
) -> nn.Module:
  """A convolution padded like the authors' (3x3: padding 1; 1x1 and the 2x2 stride-2: none).

  1x1 ones are `bijectors.Conv1x1`: the same parameters as `nn.Conv`, computed as a matmul,
  which XLA:CPU runs faster (docs/benchmarks.md), in the form `kernels` picks
  (`eiw_flow_jax.model.kernels`)."""
  zeros = nn.initializers.zeros
  kernel_init = zeros if zero_init else nn.initializers.lecun_normal()
  if kernel == 1 and stride == 1:
    return Conv1x1(features, use_bias=use_bias, kernel_init=kernel_init, kernels=kernels,
                   name=name)
  padding = ((1, 1), (1, 1)) if kernel == 3 else "VALID"
  return nn.Conv(
      features,
      (kernel, kernel),
      strides=(stride, stride),
      padding=padding,
      use_bias=use_bias,
      kernel_init=kernel_init,
      bias_init=zeros,
      name=name,
  )


class DenseLayer(nn.Module):
  """conv1x1 (in -> in) -> ReLU -> conv3x3 (-> growth) -> ReLU, concatenated to the input."""

  growth: int
  kernels: str = "auto"  # the 1x1 convolutions' form: eiw_flow_jax.model.kernels

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = nn.relu(conv(x.shape[-1], 1, "conv0", kernels=self.kernels)(x))
    h = nn.relu(conv(self.growth, 3, "conv2")(h))
    return jnp.concatenate([x, h], axis=-1)


class GatedConv(nn.Module):
  """a + b * sigmoid(c), where (a, b, c) are the three channel thirds of one 1x1 conv."""

  features: int
  kernels: str = "auto"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    a, b, c = jnp.split(conv(3 * self.features, 1, "conv", kernels=self.kernels)(x), 3, axis=-1)
    return a + b * jax.nn.sigmoid(c)


def _pad_axis(a: Array, axis: int, after: int) -> Array:
  pads = [(0, 0)] * a.ndim
  pads[axis] = (0, after)
  return jnp.pad(a, pads)


class DenseBlock(nn.Module):
  """`depth` DenseLayers then a (gated) 1x1 conv to `features` channels.

  `scan_layers`: the layers as one `lax.scan`, traced and compiled once (`unroll`: the same
  program unrolled). Layer i reads the c + i g channels so far (c the input, g the growth);
  each runs at the widest input W = c + (depth - 1) g, on a buffer holding the channels so far
  and zeros after them, with its weights padded by zeros (its extra hidden channels are
  relu(0) = 0): the same function, computed with the FLOPs of `depth` widest layers. Used
  where that costs little (the dequantizer's networks), not in the coupling layers'
  networks, where it would nearly double the model's FLOPs.
  """

  features: int
  depth: int
  growth: int
  gated: bool = True
  zero_init: bool = False
  scan_layers: bool = False
  unroll: bool = False
  kernels: str = "auto"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.scan_layers and self.depth > 1 and not self.is_initializing():
      x = self._scanned_layers(x)
    else:
      for i in range(self.depth):
        x = DenseLayer(self.growth, self.kernels, name=f"layer{i}")(x)
    if self.gated:
      if self.zero_init:
        raise ValueError("DenseBlock: zero_init is only supported without gated convolutions.")
      return GatedConv(self.features, self.kernels, name="gate")(x)
    return conv(self.features, 1, "out", zero_init=self.zero_init, kernels=self.kernels)(x)

  def _scanned_layers(self, x: Array) -> Array:
    channels, growth = x.shape[-1], self.growth
    widest = channels + (self.depth - 1) * growth

    def padded(i: int) -> dict[str, Any]:
      layer = self.variables["params"][f"layer{i}"]
      extra = widest - (channels + i * growth)
      conv0, conv2 = layer["conv0"], layer["conv2"]
      return {
          "conv0": {"kernel": _pad_axis(_pad_axis(conv0["kernel"], -1, extra), -2, extra),
                    "bias": _pad_axis(conv0["bias"], -1, extra)},
          "conv2": {**conv2, "kernel": _pad_axis(conv2["kernel"], -2, extra)},
      }

    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves),
                           *[padded(i) for i in range(self.depth)])
    starts = jnp.asarray([channels + i * growth for i in range(self.depth)])
    layer = DenseLayer(growth, self.kernels, parent=None)

    def body(buffer: Array, xs: tuple[Any, Array]) -> tuple[Array, None]:
      params, start = xs
      new = layer.apply({"params": params}, buffer[..., :widest])[..., widest:]
      return jax.lax.dynamic_update_slice_in_dim(buffer, new, start, axis=-1), None

    # The dtype the layers' concatenations would reach (float64 parameters promote the input).
    buffer = _pad_axis(x, -1, self.depth * growth).astype(
        jnp.result_type(x, *jax.tree.leaves(stacked)))
    return jax.lax.scan(body, buffer, (stacked, starts),
                        unroll=self.depth if self.unroll else 1)[0]


class BatchNorm(nn.Module):
  """torch.nn.BatchNorm2d: batch statistics when training, running ones otherwise.

  The running statistics live in the "constants" collection (never trained); when training
  with that collection mutable they are updated as torch does (momentum 0.1, unbiased var).
  """

  train: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    mean = self.variable("constants", "mean", lambda: jnp.zeros((c,), jnp.float32))
    var = self.variable("constants", "var", lambda: jnp.ones((c,), jnp.float32))
    if self.train and not self.is_initializing():
      axes = tuple(range(x.ndim - 1))
      m = jnp.mean(x, axis=axes)
      v = jnp.mean(jnp.square(x - m), axis=axes)
      if self.is_mutable_collection("constants"):
        n = x.size // c
        unbiased = v * n / max(n - 1, 1)
        mean.value = (1 - BN_MOMENTUM) * mean.value + BN_MOMENTUM * jax.lax.stop_gradient(m)
        var.value = (1 - BN_MOMENTUM) * var.value + BN_MOMENTUM * jax.lax.stop_gradient(unbiased)
    else:
      m, v = mean.value, var.value
    return (x - m) * jax.lax.rsqrt(v + BN_EPS) * scale + bias


def _iterative_inverse(mat: Array, n_iter: int = 6) -> Array:
  """The authors' Newton-Schulz-style approximate inverse (Nystromformer's), 6 iterations."""
  eye = jnp.eye(mat.shape[-1], dtype=mat.dtype)
  ka = jnp.abs(mat)
  v0 = jnp.max(jnp.sum(ka, axis=-2, keepdims=True), axis=-1, keepdims=True)
  vi = jnp.max(jnp.sum(ka, axis=-1, keepdims=True), axis=-2, keepdims=True)
  v = jnp.swapaxes(mat, -1, -2) / (v0 * vi)
  for _ in range(n_iter):
    kv = mat @ v
    v = (0.25 * v) @ (13 * eye - kv @ (15 * eye - kv @ (7 * eye - kv)))
  return v


class NystromAttention(nn.Module):
  """Nystrom attention with `num_landmarks` landmarks, exactly as DenseFlow's code has it.

  Their q, k, v come from a raw `reshape(N, H*W, 3E)` of the NCHW qkv map (not a transpose),
  and the output is reshaped back the same way; both are reproduced on an NCHW view so the
  weights mean the same thing. Softmaxes run over axis -2, as theirs do.
  """

  embed_dim: int
  num_landmarks: int = 4
  kernels: str = "auto"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n, h, w, c = x.shape
    hw, e, lm = h * w, self.embed_dim, self.num_landmarks
    if hw % lm:
      raise ValueError(f"NystromAttention: H*W={hw} must be divisible by {lm} landmarks.")
    qkv = conv(3 * e, 1, "qkv", kernels=self.kernels)(x)
    qkv = jnp.transpose(qkv, (0, 3, 1, 2)).reshape(n, hw, 3 * e)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    scale = hw**0.5
    q_l = jnp.mean(q.reshape(n, lm, hw // lm, e), axis=-2) / scale
    k_l = jnp.mean(k.reshape(n, lm, hw // lm, e), axis=-2) / scale
    k1 = jax.nn.softmax(jnp.einsum("...ij,...kj->...ik", q, k_l), axis=-2)
    k2 = jax.nn.softmax(jnp.einsum("...ij,...kj->...ik", q_l, k_l), axis=-2)
    k3 = jax.nn.softmax(jnp.einsum("...ij,...kj->...ik", q_l, k), axis=-2)
    out = (k1 @ _iterative_inverse(k2)) @ (k3 @ v) + v
    out = jnp.transpose(out.reshape(n, e, h, w), (0, 2, 3, 1))
    return conv(c, 1, "out_transform", kernels=self.kernels)(out)


class MultiHeadDenseBlock(nn.Module):
  """concat(Nystrom attention, DenseBlock) -> BatchNorm -> ReLU -> 1x1 conv (no bias)."""

  depth: int
  growth: int
  gated: bool = True
  train: bool = False
  num_landmarks: int = 4
  kernels: str = "auto"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    att = NystromAttention(c // 2, self.num_landmarks, self.kernels, name="mha")(x)
    dense = DenseBlock(c, self.depth, self.growth, self.gated, kernels=self.kernels,
                       name="dense")(x)
    h = BatchNorm(self.train, name="bn")(jnp.concatenate([att, dense], axis=-1))
    return conv(c, 1, "mix", use_bias=False, kernels=self.kernels)(nn.relu(h))


class DenseNet(nn.Module):
  """conv1x1 -> one (multi-head or residual) dense block -> zero-initialised conv1x1.

  `multihead=True` is the intra-unit coupling network (DenseNetMultihead), False the
  dequantization coupling network (DenseNet with a ResidualDenseBlock).
  """

  features: int
  mid_channels: int
  depth: int
  growth: int
  gated: bool = True
  multihead: bool = True
  train: bool = False
  num_landmarks: int = 4  # of the multi-head block's Nystrom attention
  kernels: str = "auto"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = conv(self.mid_channels, 1, "conv_in", kernels=self.kernels)(x)
    if self.multihead:
      h = MultiHeadDenseBlock(self.depth, self.growth, self.gated, self.train,
                              self.num_landmarks, self.kernels, name="block")(h)
    else:
      h = h + DenseBlock(self.mid_channels, self.depth, self.growth, self.gated,
                         kernels=self.kernels, name="block")(h)
    return conv(self.features, 1, "conv_out", zero_init=True, kernels=self.kernels)(h)
