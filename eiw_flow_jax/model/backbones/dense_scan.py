"""An invertible dense block's units as one `lax.scan`: each unit padded to the block's widest.

The units of a dense block differ only in width: unit i maps W_i = c + i g channels (c the
block's input, g the growth rate), and the noise network before it reads the N_i channels of
the block's input and the outputs of units 0..i-2. The coupling networks' hidden layers, their
attention and BatchNorm have the same shapes in every unit. So every unit runs at the block's
widest width P = W_{U-1}, with its parameters padded so that the extra channels pass through
unchanged and add nothing to the log-determinant:

- ActNorm: shift 0 and log-scale 0 on the extra channels (identity, log-det 0);
- 1x1 conv: the matrix [[W, 0], [0, I]] (the same log |det W|);
- coupling: the network reads every channel, with zero input weights on all but the first
  ceil(W_i / 2) (its x1), and writes each (log-scale, shift) pair at the channel it transforms,
  zeros elsewhere: log-scale 2 tanh(0) = 0 and shift 0 leave x1 and the extra channels as they
  are (0 + exp(0) x = x);
- channel switch: the first W_i channels rotated by ceil(W_i / 2), the extra ones in place;
- noise network: input and hidden channels padded with zero weights (relu(0) = 0), and unit 0,
  which has none, gets an all-zero one whose terms are masked out.
The extra channels hold zeros throughout, and every padded term is an exact zero, so the block
computes the function of its per-unit form (`InvertibleDenseBlock.per_unit`) up to the order of
floating-point sums.

The block is then a scan over units whose body is the noise network and the unit (itself a
scan over its coupling layers): traced and compiled once per block, whatever the number of
units. The parameters keep their per-unit layout (the authors' state_dict's and checkpoints');
`pad_layers` and `pad_noise` pad them inside the program, so their gradients are those of the
unpadded parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from eiw_flow_jax.model.backbones.dense_bijectors import (
  ActNorm,
  Conv1x1,
  coupling_log_scale_and_shift,
  soft_clamp,
  std_normal_log_prob,
  sum_except_batch,
)
from eiw_flow_jax.model.backbones.dense_nets import DenseNet

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class BlockWidths:
  """The channel counts of a dense block of `units` units on `channels` input channels."""

  channels: int  # c: the block's input
  growth: int  # g: noise channels appended before each unit but the first
  units: int  # U

  def unit(self, i: int) -> int:
    """W_i: the channels unit i maps (its input and output)."""
    return self.channels + i * self.growth

  @property
  def padded(self) -> int:
    """P: the widest unit's channels, the width every unit runs at."""
    return self.unit(self.units - 1)

  def noise_in(self, i: int) -> int:
    """N_i: the channels of unit i's noise network input (the block's input and the outputs
    of units 0..i-2); 0 for unit 0, which has none."""
    return sum(self.unit(j - 1) if j else self.channels for j in range(i))

  @property
  def noise_padded(self) -> int:
    return self.noise_in(self.units - 1)


def _pad_axis(a: Array, axis: int, before: int, after: int) -> Array:
  pads = [(0, 0)] * a.ndim
  pads[axis] = (before, after)
  return jnp.pad(a, pads)


def pad_layers(layers: dict[str, Any], width: int, padded: int) -> dict[str, Any]:
  """One unit's coupling-layer parameters (stacked along the layers, `DenseUnit`'s `layers`) at
  `width` channels -> the same layers at `padded` channels (see the module doc).

  Only the width-dependent leaves change: ActNorm's shift and log-scale, the 1x1 conv's matrix,
  the coupling network's input kernel (rows: x1's channels, then zeros) and output kernel and
  bias (each channel's (log-scale, shift) columns at that channel: x1's are zero)."""
  extra, n_id = padded - width, width - width // 2
  actnorm = {k: _pad_axis(v, -1, 0, extra) for k, v in layers["actnorm"].items()}
  weight = layers["conv1x1"]["weight"]
  weight = _pad_axis(_pad_axis(weight, -1, 0, extra), -2, 0, extra)
  weight = weight + jnp.diag(jnp.arange(padded) >= width).astype(weight.dtype)
  net = dict(layers["coupling"]["net"])
  conv_in = dict(net["conv_in"])
  conv_in["kernel"] = _pad_axis(conv_in["kernel"], -2, 0, padded - n_id)
  net["conv_in"] = conv_in
  net["conv_out"] = {k: _pad_axis(v, -1, 2 * n_id, 2 * extra)
                     for k, v in net["conv_out"].items()}
  return {**layers, "actnorm": actnorm, "conv1x1": {"weight": weight},
          "coupling": {**layers["coupling"], "net": net}}


def pad_noise(noise: dict[str, Any], width: int, padded: int) -> dict[str, Any]:
  """A noise network's parameters (`NoiseParams`: conv0 3x3 `width` -> 4 `width`, ReLU, conv2
  1x1 -> 2 growth) with input and hidden channels padded with zeros to `padded`."""
  conv0, conv2 = noise["conv0"], noise["conv2"]
  extra = padded - width
  kernel = _pad_axis(_pad_axis(conv0["kernel"], -2, 0, extra), -1, 0, 4 * extra)
  return {
      "conv0": {"kernel": kernel, "bias": _pad_axis(conv0["bias"], -1, 0, 4 * extra)},
      "conv2": {**conv2, "kernel": _pad_axis(conv2["kernel"], -2, 0, 4 * extra)},
  }


def switch_channels_padded(x: Array, width: Array) -> Array:
  """`switch_channels` of the first `width` channels of x (a traced scalar), the rest in place:
  channel k < width takes channel (k + ceil(width / 2)) mod width."""
  first = width - width // 2
  k = jnp.arange(x.shape[-1])
  left = jnp.roll(x, -first, axis=-1)  # channel k + first
  right = jnp.roll(x, width - first, axis=-1)  # channel k - (width - first)
  return jnp.where(k < width - first, left, jnp.where(k < width, right, x))


class MaskedAffineCoupling(nn.Module):
  """`AffineCoupling` on padded parameters (`pad_layers`): the network reads every channel and
  scales and shifts every channel; the zeros of the padding make x1 and the extra channels
  pass through. The network's parameters are `AffineCoupling`'s (`net`)."""

  mid_channels: int
  depth: int
  growth: int
  train: bool = False
  num_landmarks: int = 4
  kernels: str = "auto"

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array]:
    params = DenseNet(2 * x.shape[-1], self.mid_channels, self.depth, self.growth,
                      multihead=True, train=self.train, num_landmarks=self.num_landmarks,
                      kernels=self.kernels, name="net")(x)
    log_scale, shift = coupling_log_scale_and_shift(params)
    return shift + jnp.exp(log_scale) * x, sum_except_batch(log_scale)


class PaddedDenseLayer(nn.Module):
  """`DenseLayer` (ActNorm, 1x1 conv, affine coupling, channel switch) on its padded
  parameters, for a unit of `width` channels (a traced scalar); same variable names."""

  mid_channels: int
  depth: int
  growth: int
  train: bool = False
  num_landmarks: int = 4
  kernels: str = "auto"  # the networks' 1x1 convolutions: eiw_flow_jax.model.kernels

  @nn.compact
  def __call__(self, x: Array, width: Array) -> tuple[Array, Array]:
    x, log_det = ActNorm(name="actnorm")(x)
    x, ld = Conv1x1(name="conv1x1")(x)
    log_det = log_det + ld
    x, ld = MaskedAffineCoupling(self.mid_channels, self.depth, self.growth, self.train,
                                 self.num_landmarks, self.kernels, name="coupling")(x)
    return switch_channels_padded(x, width), log_det + ld


def _noise_params(noise: dict[str, Any], x: Array) -> tuple[Array, Array]:
  """`NoiseParams` (the authors' `_BNReLUConv`) as a function of its padded parameters."""
  conv0, conv2 = noise["conv0"], noise["conv2"]
  h = jax.lax.conv_general_dilated(
      x, conv0["kernel"], (1, 1), ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC")) + conv0["bias"]
  h = jnp.einsum("...i,io->...o", nn.relu(h), conv2["kernel"][0, 0]) + conv2["bias"]
  mu, unconstrained = jnp.split(h, 2, axis=-1)
  return mu, soft_clamp(unconstrained)


@dataclasses.dataclass(frozen=True)
class ScannedBlock:
  """How a dense block runs as a scan over its units: the layer, whether BatchNorm statistics
  are updated, the units' recomputation and the loops' unrolling."""

  layer: PaddedDenseLayer  # unbound: applied to each layer's variables
  update_constants: bool  # training-mode BatchNorm updates its running statistics
  remat: bool  # each unit's internals recomputed in the backward pass (memory="remat")
  unroll: bool  # both loops unrolled (model.scan_steps False): the same program, no loops

  def __call__(
      self, x: Array, units: list[dict[str, Any]], noise: list[dict[str, Any]],
      etas: list[Array], growth: int,
  ) -> tuple[Array, Array, Array, list[Any]]:
    """(x, per unit {"params": its `layers` parameters, "constants": theirs}, the noise
    networks' parameters (units 1..), the etas) -> (output, log-det of the units, augmentation
    terms, per unit its constants after the block)."""
    widths = BlockWidths(x.shape[-1], growth, len(units))
    # The loop's carries hold the dtype the units reach (float64 parameters promote the input).
    x = x.astype(jnp.result_type(x, *jax.tree.leaves([u["params"] for u in units])))
    num_units, padded = widths.units, widths.padded
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[
        {"params": pad_layers(u["params"], widths.unit(i), padded),
         "constants": u["constants"]} for i, u in enumerate(units)])
    num_layers = jax.tree.leaves(stacked["params"])[0].shape[1]
    xs = {"unit": stacked, "width": jnp.asarray([widths.unit(i) for i in range(num_units)])}
    batch = x.shape[0]
    if num_units > 1:
      noise_width = widths.noise_padded
      zero = jax.tree.map(jnp.zeros_like, pad_noise(noise[0], widths.noise_in(1), noise_width))
      xs["noise"] = jax.tree.map(lambda *leaves: jnp.stack(leaves), zero, *[
          pad_noise(n, widths.noise_in(i + 1), noise_width) for i, n in enumerate(noise)])
      xs["eta"] = jnp.stack([jnp.zeros_like(etas[0]), *etas])
      xs["active"] = jnp.arange(num_units) > 0
      # Where unit i's eta goes (after unit i-1's W_{i-1} channels; unit 0's zeros after the
      # block input's) and where unit i-1's output joins the noise networks' input.
      xs["eta_at"] = jnp.asarray([widths.unit(i - 1) if i else x.shape[-1]
                                  for i in range(num_units)])
      xs["joins_at"] = jnp.asarray([widths.noise_in(i) for i in range(num_units)])
      inputs = jnp.zeros((*x.shape[:-1], noise_width + padded), x.dtype)
    else:
      inputs = None

    def unit(variables: dict[str, Any], h: Array, width: Array) -> tuple[Any, Any]:
      def layer(carry, layer_variables):
        h, log_det = carry
        if self.update_constants:
          (h, ld), changed = self.layer.apply(layer_variables, h, width, mutable=["constants"])
          return (h, log_det + ld), changed["constants"]
        h, ld = self.layer.apply(layer_variables, h, width)
        return (h, log_det + ld), layer_variables["constants"]

      return jax.lax.scan(layer, (h, jnp.zeros((batch,), h.dtype)), variables,
                          unroll=num_layers if self.unroll else 1)

    if self.remat:
      unit = jax.checkpoint(unit, prevent_cse=False)

    def body(carry, xs):
      h, inputs, log_det, augment = carry
      if inputs is not None:
        mu, log_scale = _noise_params(xs["noise"], inputs[..., :noise_width])
        eta = xs["eta"]
        term = sum_except_batch(log_scale) - std_normal_log_prob(eta)
        augment = augment + jnp.where(xs["active"], term, 0.0)
        inputs = jax.lax.dynamic_update_slice_in_dim(inputs, h, xs["joins_at"], axis=-1)
        h = jax.lax.dynamic_update_slice_in_dim(
            h, mu + jnp.exp(log_scale) * eta, xs["eta_at"], axis=-1)
      (h, ld), constants = unit(xs["unit"], h, xs["width"])
      return (h, inputs, log_det + ld, augment), constants

    h = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, padded - x.shape[-1])])
    zeros = jnp.zeros((batch,), x.dtype)
    (h, _, log_det, augment), constants = jax.lax.scan(
        body, (h, inputs, zeros, zeros), xs, unroll=num_units if self.unroll else 1)
    constants = [jax.tree.map(lambda leaf, i=i: leaf[i], constants) for i in range(num_units)]
    return h, log_det, augment, constants

