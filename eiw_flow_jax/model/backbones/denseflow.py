"""The DenseFlow backbone with EIW transitions: the paper's own model.

Follows the authors' PyTorch code (studying910/EIW-Flow, `DIW-Flow/experiments/image/model`,
on matejgrcic/DenseFlow) literally, so that a converted state_dict gives the same numbers:

  x (uint8) -> variational dequantization y = (x + u) / 2^n, u ~ q(u | x)
    -> y - 0.5 -> squeeze -> for each scale b: an invertible dense block, then (but at the last
       scale) a transition: squeeze, EIW Shuffle (or none), split in halves, the second half
       scored by a standard normal -> the last scale's conv-Gaussian base (loc, log_scale per
       channel).

Invertible dense block (`block_conf[b]` units): unit 0 maps x; unit i > 0 first appends
`growth_rate` noise channels eta_hat = mu + exp(2 tanh(r / 2)) * eta, eta ~ N(0, I), where
(mu, r) come from a network of the block's earlier inputs (the block input and the outputs of
units 0..i-2), and adds -log N(eta) + sum log-scale to the log-likelihood (the authors count
this cross-unit augmentation as a log-det: the bound's -log q(eta_hat | x)). A unit is
`layers_conf[b]` x [ActNorm, 1x1 conv, affine coupling (multi-head DenseNet with gated convs
and Nystrom attention, zero-initialised output), channel switch].

EIW transition (the authors' `InvertibleTransition`): after the squeeze to C channels, global
weights g = softmax(W2 relu(W1 [C])) (a bias-free MLP of the constant C), channels sorted by g
(heaviest first), the SE Solver s on the *sorted* features, the regulariser
sum_c g_c (log g_c - s_c) per example ('literal', their KLDivLoss on probabilities; 'kl' uses
log s_c), the first half kept. With `model.split = "vanilla"`: DenseFlow's transition (no sort).
The order, the shuffle, the regulariser and the diagnostics are the global Shuffle's of
`eiw_flow_jax.model.splits`, which Glow's `EIWGlobalSplit` uses too.

The order is computed from the logits W2 relu(W1 [C]) (stable descending argsort), not from g:
the softmax saturates (logits tens to hundreds apart at default scale), torch's float32 g on
CPU keeps subnormals (1e-45) and sorts them as distinct, while XLA (CPU, GPU, TPU) flushes them
to exact zeros whose ties an argsort would break by channel index, another permutation than
the authors'. Softmax is monotone, so the logit order is the authors' wherever their float32
weights differ; where those tie exactly (underflow to 0), torch's unstable sort leaves their
order undefined (`authors_weight_ties` finds such ties, `convert` reports them).

Every stochastic draw (dequantization eps, augmentation eta) is an explicit input (`noise`),
so the map is a pure function; `Flow` draws it from an rng when none is given.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from eiw_flow_jax.model import splits
from eiw_flow_jax.model.backbones import dense_scan, layouts
from eiw_flow_jax.model.backbones.base import Backbone, ForwardPass, Level
from eiw_flow_jax.model.backbones.dense_bijectors import (
    ActNorm,
    AffineCoupling,
    Conv1x1,
    soft_clamp,
    squeeze2d,
    std_normal_log_prob,
    sum_except_batch,
    switch_channels,
    unsqueeze2d,
)
from eiw_flow_jax.model.backbones.dense_dequantizer import VariationalDequantizer
from eiw_flow_jax.model.backbones.dense_nets import conv

Array = jax.Array


def block_name(b: int) -> str:
  """The module (and variables) name of dense block b."""
  return f"block{b}"


def unit_name(i: int) -> str:
  """The module name of unit i of a dense block."""
  return f"unit{i}"


def noise_name(i: int) -> str:
  """The module name of the noise network before unit i (i >= 1) of a dense block."""
  return f"noise{i - 1}"


def transition_name(b: int) -> str:
  """The module name of the transition after dense block b."""
  return f"transition{b}"


# The submodule of a unit whose variables stack its coupling layers (`DenseUnit.layers`).
UNIT_LAYERS = "layers"

# Layer j of a unit before its layers were stacked, as the authors' torch model numbers them
# (`layer2_coupling`): now slice j of `layers/coupling`.
_UNIT_LAYER = re.compile(r"^layer(\d+)_(actnorm|conv1x1|coupling)$")


def unit_layer(key: str) -> layouts.Slice | None:
  """Where a key of the per-layer layout (`layer{j}_{part}`) goes in the stacked one."""
  match = _UNIT_LAYER.match(key)
  return None if match is None else layouts.Slice((UNIT_LAYERS, match[2]), int(match[1]))


def migrate_unit_layers(tree: Any) -> Any:
  """`tree` with each unit's per-layer names (`layer{j}_actnorm`, `layer{j}_conv1x1`,
  `layer{j}_coupling`) stacked into `layers/actnorm`, ... (`DenseUnit`)."""
  return layouts.stack_numbered(tree, unit_layer, "layers")


def denseflow_shapes(model: Any) -> dict[str, Any]:
  """Static shapes of a DenseFlow config: per-scale channels, latents and noise.

  Returns a dict with `block_in` ((h, w, c) entering each dense block), `latents` (per-example
  shapes in `encode`'s order: each transition's factored half, then the base's input),
  `augment` (per-example shape of each eta, blocks in order, units 1.. within a block) and
  `dequant` (the dequantizer's eps).
  """
  df = model.denseflow
  h, w, c = tuple(model.image_shape)
  dequant = (h // 2, w // 2, 4 * c)
  h, w, c = h // 2, w // 2, 4 * c
  block_in, latents, augment = [], [], []
  num_blocks = len(df.block_conf)
  for b, units in enumerate(df.block_conf):
    block_in.append((h, w, c))
    augment += [(h, w, df.growth_rate)] * (units - 1)
    c = c + df.growth_rate * (units - 1)
    if b < num_blocks - 1:
      h, w, c = h // 2, w // 2, 4 * c
      latents.append((h, w, c - c // 2))
      c = c // 2
  latents.append((h, w, c))
  return {"block_in": block_in, "latents": latents, "augment": augment, "dequant": dequant}


class DenseLayer(nn.Module):
  """One coupling layer of a unit: ActNorm, 1x1 conv, affine coupling, channel switch."""

  mid_channels: int
  depth: int
  growth: int
  train: bool = False
  num_landmarks: int = 4
  kernels: str = "auto"  # the coupling networks' 1x1 convolutions: eiw_flow_jax.model.kernels

  def setup(self) -> None:
    self.actnorm = ActNorm()
    self.conv1x1 = Conv1x1()
    self.coupling = AffineCoupling(self.mid_channels, self.depth, self.growth, multihead=True,
                                   train=self.train, num_landmarks=self.num_landmarks,
                                   kernels=self.kernels)

  def __call__(self, x: Array, reverse: bool = False) -> tuple[Array, Array]:
    log_det = jnp.zeros((x.shape[0],), x.dtype)
    if reverse:
      x = switch_channels(x, reverse=True)
      for layer in (self.coupling, self.conv1x1, self.actnorm):
        x, ld = layer(x, reverse=True)
        log_det = log_det + ld
      return x, log_det
    for layer in (self.actnorm, self.conv1x1, self.coupling):
      x, ld = layer(x)
      log_det = log_det + ld
    return switch_channels(x), log_det


class _DenseLayerCell(DenseLayer):
  """DenseLayer as a scan body over the carry (h, log_det)."""

  def __call__(self, carry: tuple[Array, Array], _: Any) -> tuple[tuple[Array, Array], None]:
    h, log_det = carry
    h, layer_log_det = DenseLayer.__call__(self, h)
    return (h, log_det + layer_log_det), None


class DenseUnit(nn.Module):
  """`num_layers` x [ActNorm, 1x1 conv, affine coupling, channel switch], as one scan.

  The layers of a unit share every shape (the channel switch keeps C), so their variables are
  stacked along a leading axis (`unit0/layers/actnorm/shift` has shape (num_layers, C)) and
  the layer is traced and compiled once per unit (`scan=True`) or unrolled `num_layers` times
  in the program (`scan=False`, `model.scan_steps`): same parameters either way. In a dense
  block the units run padded to the block's widest, as one scan over units
  (`InvertibleDenseBlock`, `dense_scan`); a unit alone runs here (`init`, the inverse).
  """

  num_layers: int
  mid_channels: int
  depth: int
  growth: int
  train: bool = False
  num_landmarks: int = 4  # of the coupling nets' Nystrom attention
  scan: bool = True
  kernels: str = "auto"

  def setup(self) -> None:
    # nn.scan also at init: each layer's data-dependent ActNorm init sees that layer's input.
    scanned = nn.scan(
        _DenseLayerCell, variable_axes={"params": 0, "constants": 0},
        split_rngs={"params": True}, length=self.num_layers,
        unroll=1 if self.scan else self.num_layers,
    )
    self.layers = scanned(self.mid_channels, self.depth, self.growth, self.train,
                          self.num_landmarks, self.kernels)

  def __call__(self, x: Array) -> tuple[Array, Array]:
    (x, log_det), _ = self.layers((x, jnp.zeros((x.shape[0],), x.dtype)), None)
    return x, log_det

  def inverse(self, z: Array) -> Array:
    # The inverse runs in evaluation (no BatchNorm update): a reverse lax.scan of a parentless
    # layer over the stacked variables.
    twin = DenseLayer(self.mid_channels, self.depth, self.growth, self.train,
                      self.num_landmarks, self.kernels, parent=None)
    variables = {"params": self.variables["params"][UNIT_LAYERS]}
    constants = self.variables.get("constants", {}).get(UNIT_LAYERS)
    if constants is not None:
      variables["constants"] = constants

    def body(h, layer_variables):
      return twin.apply(layer_variables, h, reverse=True)[0], None

    return jax.lax.scan(body, z, variables, reverse=True,
                        unroll=1 if self.scan else self.num_layers)[0]


class NoiseParams(nn.Module):
  """The authors' `_BNReLUConv`: conv3x3 (-> 4 in) -> ReLU -> zero-init conv1x1 (-> 2 growth)."""

  growth: int
  kernels: str = "auto"

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array]:
    h = nn.relu(conv(4 * x.shape[-1], 3, "conv0")(x))
    h = conv(2 * self.growth, 1, "conv2", zero_init=True, kernels=self.kernels)(h)
    mu, unconstrained = jnp.split(h, 2, axis=-1)
    return mu, soft_clamp(unconstrained)


class InvertibleDenseBlock(nn.Module):
  """Units with incremental noise augmentation (cross-unit coupling); see the module doc.

  Runs as one scan over its units padded to the widest (`dense_scan`): the block is traced
  and compiled once, however many units it has. `per_unit` is the same map unit by unit, each
  at its own width: what `init` runs (each layer's data-dependent ActNorm init sees its input)
  and what the scan is tested against.
  """

  num_units: int
  num_layers: int
  mid_channels: int
  growth_rate: int
  depth: int
  coupling_growth: int
  memory: str = "store"
  train: bool = False
  num_landmarks: int = 4
  scan: bool = True  # the loops over units and layers as lax.scans (False: unrolled)
  kernels: str = "auto"  # the networks' 1x1 convolutions: eiw_flow_jax.model.kernels

  def setup(self) -> None:
    self.units = [
        DenseUnit(self.num_layers, self.mid_channels, self.depth, self.coupling_growth,
                  self.train, self.num_landmarks, self.scan, self.kernels, name=unit_name(i))
        for i in range(self.num_units)
    ]
    self.noise_nets = [NoiseParams(self.growth_rate, self.kernels, name=noise_name(i))
                       for i in range(1, self.num_units)]

  def _check(self, etas: Sequence[Array]) -> None:
    if len(etas) != self.num_units - 1:
      raise ValueError(f"expected {self.num_units - 1} augmentation draws, got {len(etas)}.")

  def __call__(self, x: Array, etas: Sequence[Array]) -> tuple[Array, Array, Array]:
    """(x, the block's etas) -> (output, log-det of the units, augmentation terms)."""
    if self.is_initializing():
      return self.per_unit(x, etas)
    self._check(etas)
    params = self.variables["params"]
    constants = self.variables.get("constants", {})
    units = [{"params": params[unit_name(i)][UNIT_LAYERS],
              "constants": constants.get(unit_name(i), {}).get(UNIT_LAYERS, {})}
             for i in range(self.num_units)]
    noise = [params[noise_name(i)] for i in range(1, self.num_units)]
    update = self.train and self.is_mutable_collection("constants")
    layer = dense_scan.PaddedDenseLayer(self.mid_channels, self.depth, self.coupling_growth,
                                        self.train, self.num_landmarks, self.kernels,
                                        parent=None)
    run = dense_scan.ScannedBlock(layer, update_constants=update,
                                  remat=self.memory == "remat", unroll=not self.scan)
    h, log_det, augment, updated = run(x, units, noise, list(etas), self.growth_rate)
    if update:
      for i, unit_constants in enumerate(updated):
        self.units[i].put_variable("constants", UNIT_LAYERS, unit_constants)
    return h, log_det, augment

  def per_unit(self, x: Array, etas: Sequence[Array]) -> tuple[Array, Array, Array]:
    """`__call__` unit by unit, each at its own width (no padding, no recomputation)."""
    self._check(etas)
    log_det = jnp.zeros((x.shape[0],), x.dtype)
    augment = jnp.zeros((x.shape[0],), x.dtype)
    g_inputs = [x]
    h, ld = self.units[0](x)
    log_det = log_det + ld
    for i in range(1, self.num_units):
      eta = etas[i - 1]
      mu, log_scale = self.noise_nets[i - 1](jnp.concatenate(g_inputs, axis=-1))
      eta_hat = mu + jnp.exp(log_scale) * eta
      augment = augment - std_normal_log_prob(eta) + sum_except_batch(log_scale)
      g_inputs.append(h)
      h, ld = self.units[i](jnp.concatenate([h, eta_hat], axis=-1))
      log_det = log_det + ld
    return h, log_det, augment

  def inverse(self, z: Array) -> Array:
    for i in reversed(range(self.num_units)):
      z = self.units[i].inverse(z)
      if i > 0:
        z = z[..., : -self.growth_rate]
    return z


def weight_generator_logits(wg_fc0: Array, wg_fc2: Array, channels: int) -> Array:
  """The weight generator's logits W2 relu(W1 [C]), shape (C,).

  Elementwise products summed in float32 rather than a matmul, so that no matmul precision
  (TF32 on GPU, bf16 passes on TPU) perturbs the channel order taken from them.
  """
  hidden = nn.relu(float(channels) * wg_fc0[0])
  return jnp.sum(hidden[:, None] * wg_fc2, axis=0)


def _pow2(exponent: Array) -> Array:
  """2.0 ** exponent in float32 for integer exponents in [-126, 127], exactly (built from the
  exponent bits: exp2 and ldexp need not be exact)."""
  bits = (jnp.clip(exponent, -126, 127).astype(jnp.int32) + 127) << 23
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


_LN2_HI = 0.693359375  # ln 2 = _LN2_HI + _LN2_LO, _LN2_HI with 9 significant bits (Cody-Waite)
_LN2_LO = -2.12194440e-4


def authors_weight_bits(logits: Array) -> Array:
  """The float32 bit patterns (int32) of softmax(logits) as the authors' PyTorch model holds it
  on CPU: fl(fl(exp(l - max)) * fl(1 / sum)), subnormals kept.

  Computed without subnormal arithmetic (which XLA flushes on every backend): exp(d) =
  exp(f) 2^n with f = d - n ln 2 (Cody-Waite), every value scaled by 2^100, and a subnormal
  rounded to its integer multiple of 2^-149 explicitly. Positive float32 values order as
  their bit patterns, so equal patterns are exactly the authors' ties. Equal to torch's values
  but at rounding boundaries (torch's exp and summation order differ from XLA's by an ulp);
  its ties, which arise between underflowing weights, are torch's (tests/test_denseflow.py checks
  against numpy's float32 arithmetic, tests/test_denseflow_parity.py against torch's).
  """
  logits = logits.astype(jnp.float32)
  d = jnp.maximum(logits - jnp.max(logits), -200.0)  # exp(-104) is 0 in float32 already
  n = jnp.round(d / math.log(2.0))
  f = (d - n * _LN2_HI) - n * _LN2_LO
  mant = jnp.exp(f)  # in [0.70, 1.42]
  n = n.astype(jnp.int32)
  # e = fl(exp(d)): a subnormal e (below 2^-126) is an integer multiple of 2^-149.
  e_149 = mant * _pow2(jnp.minimum(n + 149, 60))  # e * 2^149 while it is below 2^23
  subnormal_e = e_149 < 2.0**23
  e_100 = jnp.where(subnormal_e, jnp.round(e_149) * 2.0**-49, mant * _pow2(n + 100))
  # w = fl(e * fl(1 / sum)); subnormal terms cannot change a sum of at least 1.
  w_100 = e_100 * (1.0 / jnp.sum(jnp.exp(d)))
  subnormal_w = w_100 < 2.0**-26
  normal_bits = jax.lax.bitcast_convert_type(
      jnp.where(subnormal_w, 1.0, w_100) * 2.0**-100, jnp.int32)
  return jnp.where(subnormal_w, jnp.round(w_100 * 2.0**49).astype(jnp.int32), normal_bits)


def authors_weight_ties(logits: Array) -> dict[str, Array]:
  """Where the authors' float32 weights softmax(logits) tie exactly (see
  `authors_weight_bits`): their descending torch.sort is not stable on CPU, so the order of
  tied channels, and with it their model's likelihood, is undefined unless every tie lies in
  the factored half (whose N(0, I) log-density ignores the order; their regulariser does not).

  Returns int32 scalars: `authors_tied_channels` (channels whose weight equals another's),
  `authors_tied_kept_channels` (those among the kept first half in the logit order) and
  `authors_ties_cross_split` (1 where a kept and a factored channel tie: which channels are
  kept is then undefined).
  """
  bits = authors_weight_bits(logits)
  channels = bits.shape[0]
  kept_mask = jnp.zeros((channels,), bool).at[
      jnp.argsort(-logits, stable=True)[: channels // 2]].set(True)
  same = bits[:, None] == bits[None, :]
  tied = jnp.sum(same, axis=1) > 1
  crosses = jnp.any(same & kept_mask[:, None] & ~kept_mask[None, :])
  return {
      "authors_tied_channels": jnp.sum(tied).astype(jnp.int32),
      "authors_tied_kept_channels": jnp.sum(tied & kept_mask).astype(jnp.int32),
      "authors_ties_cross_split": crosses.astype(jnp.int32),
  }


class Transition(nn.Module):
  """Squeeze, then the EIW Shuffle (`eiw=True`) or none, split in halves (see module doc).

  The Shuffle is the global one of `eiw_flow_jax.model.splits` (order from logits, shuffle and
  its inverse, regulariser, diagnostics) with DenseFlow's parts: the logits come from the
  weight generator (float32), the Solver sees the *sorted* features, the regulariser is the
  authors' literal form by default, and the factored half is scored by N(0, I).
  """

  channels: int  # after the squeeze
  eiw: bool = True
  reduction: int = 16
  regularizer: str = "literal"

  def setup(self) -> None:
    c, hidden = self.channels, self.channels // self.reduction

    def init(key, shape):  # torch allows C // r = 0 (an empty layer: s is uniform)
      return nn.initializers.lecun_normal()(key, shape) if min(shape) else jnp.zeros(shape)

    if self.eiw:
      self.wg_fc0 = self.param("wg_fc0", init, (1, c // 2))
      self.wg_fc2 = self.param("wg_fc2", init, (c // 2, c))
      self.se_fc0 = self.param("se_fc0", init, (c, hidden))
      self.se_fc2 = self.param("se_fc2", init, (hidden, c))

  def logits(self) -> Array:
    """The weight generator's logits W2 relu(W1 [C]) (a function of the constant C)."""
    return weight_generator_logits(self.wg_fc0, self.wg_fc2, self.channels)

  def weights(self) -> Array:
    """g: the weight generator's softmax over channels, as the regulariser uses it."""
    return jax.nn.softmax(self.logits())

  def permutation(self) -> Array:
    """Channels by descending logit (ties by index): g's order without its underflow."""
    if not self.eiw:
      return jnp.arange(self.channels)
    return splits.order_from_logits(self.logits())

  def shared_permutation(self) -> Array | None:
    """The order of the EIW Shuffle (the same for every example); None without one."""
    return self.permutation() if self.eiw else None

  def solver_log_weights(self, z_sorted: Array) -> Array:
    """log s: the SE Solver's per-example log-softmax over the (sorted) channels."""
    pooled = jnp.mean(z_sorted, axis=(1, 2))
    return jax.nn.log_softmax(nn.relu(pooled @ self.se_fc0) @ self.se_fc2, axis=-1)

  def regularizer_per_example(self, z_sorted: Array) -> Array:
    return splits.global_shuffle_regularizer(
        self.logits(), self.solver_log_weights(z_sorted), self.regularizer)

  def _squeezed(self, x: Array) -> Array:
    z = squeeze2d(x)
    if z.shape[-1] != self.channels:
      raise ValueError(f"transition: expected {self.channels} channels after the squeeze, "
                       f"got shape {z.shape}.")
    return z

  def __call__(self, x: Array) -> tuple[Array, Array, Array, Array]:
    """x -> (kept, factored, log N(factored), regularizer per example)."""
    z = self._squeezed(x)
    if self.eiw:
      z = splits.shuffle(z, self.permutation())
      reg = self.regularizer_per_example(z)
    else:
      reg = jnp.zeros((x.shape[0],), x.dtype)
    kept, factored = z[..., : self.channels // 2], z[..., self.channels // 2:]
    return kept, factored, std_normal_log_prob(factored), reg

  def inverse(self, kept: Array, factored: Array) -> Array:
    z = jnp.concatenate([kept, factored], axis=-1)
    if self.eiw:
      z = splits.unshuffle(z, self.permutation())
    return unsqueeze2d(z)

  def diagnostics(self, x: Array) -> dict[str, Array]:
    # Differential entropy of N(0, I) per dimension, the prior of the factored half.
    stats = {"factored_entropy": jnp.asarray(0.5 * math.log(2 * math.pi * math.e))}
    if self.eiw:
      perm = self.permutation()
      z = splits.shuffle(self._squeezed(x), perm)
      stats.update({
          **splits.global_shuffle_diagnostics(
              self.logits(), perm, self.solver_log_weights(z), self.regularizer),
          **authors_weight_ties(self.logits()),
      })
    return stats

  def assignment(self, x: Array) -> dict[str, Array]:
    """The channels (after the squeeze) that stay: one order for every example, unscaled."""
    b, c = x.shape[0], self.channels
    order = jnp.broadcast_to(self.permutation(), (b, c))
    return splits.assignment_from_order(order, c // 2, jnp.zeros((b, c), jnp.float32))


class DenseFlowBackbone(Backbone):
  """The whole DenseFlow (+ EIW) model: the backbone interface (`base.Backbone`) plus
  `forward_x`; its data-side maps take the augmentation noise after y.

  Every map is built on two traversals: `_forward_pass` (squeeze, then per scale the dense
  block and, but at the last scale, the transition; the base) and `inverse` (from the base's
  latent down); the factored halves' prior does not depend on the levels above, so sampling
  draws every latent first and decodes them.
  """

  train: bool = False  # BatchNorm: batch statistics (True) or running ones (False)

  def setup(self) -> None:
    m, df = self.model, self.model.denseflow
    shapes = denseflow_shapes(m)
    self.shapes = shapes
    self.dequantizer = VariationalDequantizer(
        m.n_bits, df.dequant_steps, df.dequant_context_channels, df.dequant_mid_channels,
        df.dequant_depth, df.dequant_growth, df.dequant_context_growth,
        df.dequant_context_depth, m.scan_steps, m.kernels, name="dequantizer")
    n = len(df.block_conf)
    self.blocks = [
        InvertibleDenseBlock(df.block_conf[b], df.layers_conf[b], df.layer_mid_chnls[b],
                             df.growth_rate, df.coupling_depth, df.coupling_growth, m.memory,
                             self.train, df.attention_landmarks, m.scan_steps, m.kernels,
                             name=block_name(b))
        for b in range(n)
    ]
    self.transitions = [
        Transition(4 * (shapes["block_in"][b][2] + df.growth_rate * (df.block_conf[b] - 1)),
                   m.split == "eiw", m.eiw.reduction, m.eiw.regularizer,
                   name=transition_name(b))
        for b in range(n - 1)
    ]
    top_c = shapes["latents"][-1][2]
    self.base_loc = self.param("base_loc", nn.initializers.zeros, (top_c,))
    self.base_log_scale = self.param("base_log_scale", nn.initializers.zeros, (top_c,))

  # ---- facts of the architecture --------------------------------------------------------------
  @nn.nowrap
  def levels(self) -> tuple[Level, ...]:
    m = self.model
    shapes = denseflow_shapes(m)
    split = "global" if m.split == "eiw" else "vanilla"
    *factored, top = shapes["latents"]
    out = [Level(tuple(shape), 2 * shape[-1], split) for shape in factored]
    return (*out, Level(tuple(top), None, None))

  @nn.nowrap
  def migrate_layout(self, tree: Any) -> Any:
    return migrate_unit_layers(tree)

  @nn.nowrap
  def stacked_axis(self, path: Any) -> str | None:
    """"layers" under `block{b}/unit{i}/layers` (each unit's stacked coupling layers)."""
    df = self.model.denseflow
    stacked = {(block_name(b), unit_name(i), UNIT_LAYERS)
               for b, units in enumerate(df.block_conf) for i in range(units)}
    keys = layouts.path_keys(path)
    return "layers" if any(tuple(keys[j : j + 3]) in stacked for j in range(len(keys))) else None

  # ---- helpers ----------------------------------------------------------------------------
  def _split_etas(self, augment: Sequence[Array]) -> list[list[Array]]:
    expected = len(self.shapes["augment"])
    if len(augment) != expected:
      raise ValueError(f"augmentation noise: expected {expected} arrays, got {len(augment)}.")
    out, start = [], 0
    for units in self.model.denseflow.block_conf:
      out.append(list(augment[start : start + units - 1]))
      start += units - 1
    return out

  def base_log_prob(self, z: Array) -> Array:
    ls, loc = self.base_log_scale, self.base_loc
    return sum_except_batch(
        -0.5 * math.log(2 * math.pi) - ls - 0.5 * jnp.exp(-2 * ls) * jnp.square(z - loc))

  # ---- the two traversals -------------------------------------------------------------------
  def _forward_pass(
      self, y: Array, augment: Sequence[Array],
      at_split: Callable[[int, Array], Any] | None = None,
  ) -> ForwardPass:
    """y -> latents, scale by scale: squeeze, then each dense block and (but at the last
    scale) its transition. `at_split(b, h)` is called with each transition's input h (before
    its squeeze), and its values are returned in order."""
    etas = self._split_etas(augment)
    h = squeeze2d(y - 0.5)
    log_det = jnp.zeros((y.shape[0],), y.dtype)
    log_prior = jnp.zeros_like(log_det)
    augmentation = jnp.zeros_like(log_det)
    latents, regs, visited = [], [], []
    for b, block in enumerate(self.blocks):
      h, ld, aug = block(h, etas[b])
      log_det, augmentation = log_det + ld + aug, augmentation + aug
      if b < len(self.transitions):
        if at_split is not None:
          visited.append(at_split(b, h))
        h, factored, lp, reg = self.transitions[b](h)
        latents.append(factored)
        log_prior, regs = log_prior + lp, regs + [reg]
    latents.append(h)
    log_prior = log_prior + self.base_log_prob(h)
    aux = {"regularizer": regs, "augmentation": augmentation}
    return ForwardPass(latents, log_det, log_prior, aux, visited)

  def inverse(self, latents: Sequence[Array]) -> Array:
    """latents -> y (the augmented channels are dropped, as the authors' inverse does)."""
    h = latents[-1]
    for b in reversed(range(len(self.blocks))):
      if b < len(self.transitions):
        h = self.transitions[b].inverse(h, latents[b])
      h = self.blocks[b].inverse(h)
    return unsqueeze2d(h) + 0.5

  # ---- the maps ---------------------------------------------------------------------------
  def forward(
      self, y: Array, augment: Sequence[Array]
  ) -> tuple[list[Array], Array, Array, dict[str, Any]]:
    """y in [0,1]^D -> (latents, log-det incl. augmentation terms, log prior, aux).

    aux: "regularizer" (per transition, per example) and "augmentation" (the cross-unit
    terms alone, per example; already inside log-det, as the authors count them).
    """
    latents, log_det, log_prior, aux, _ = self._forward_pass(y, augment)
    return latents, log_det, log_prior, aux

  def dequantization(self, x: Array, eps: Array) -> tuple[Array, Array]:
    """(u, log q(u | x)): the variational dequantizer's noise for uint8 x and its standard
    normal draw eps."""
    return self.dequantizer(x, eps)

  def forward_x(
      self, x: Array, noise: dict[str, Any]
  ) -> tuple[list[Array], dict[str, Any]]:
    """uint8 x and its noise -> (latents, per-example ELBO terms, in nats).

    Terms: dequant_log_det (-D n ln 2), dequant_log_q (log q(u|x)), log_det (flow log-dets
    incl. augmentation), augmentation, log_prior, regularizer (list), elbo (the sum, the
    authors' `log_prob`).
    """
    u, log_q = self.dequantizer(x, noise["dequant"])
    y = (x.astype(u.dtype) + u) / 2.0**self.model.n_bits
    latents, log_det, log_prior, aux = self.forward(y, noise["augment"])
    dims = math.prod(x.shape[1:])
    deq_ld = jnp.full((x.shape[0],), -dims * math.log(2.0**self.model.n_bits), y.dtype)
    elbo = deq_ld - log_q + log_det + log_prior
    terms = {
        "dequant_log_det": deq_ld,
        "dequant_log_q": log_q,
        "log_det": log_det,
        "augmentation": aux["augmentation"],
        "log_prior": log_prior,
        "regularizer": aux["regularizer"],
        "elbo": elbo,
    }
    return latents, terms

  def generate(self, rng: Array, num: int, temperature: float) -> tuple[Array, list[Array]]:
    """Base and factored halves drawn with std scaled by `temperature`, then decoded."""
    shapes = self.shapes["latents"]
    rngs = jax.random.split(rng, len(shapes))
    top = self.base_loc + temperature * jnp.exp(self.base_log_scale) * jax.random.normal(
        rngs[-1], (num, *shapes[-1]))
    latents = [temperature * jax.random.normal(r, (num, *s)) for r, s in zip(rngs, shapes[:-1])]
    latents.append(top)
    return self.inverse(latents), latents

  def prior_means(self, latents: Sequence[Array]) -> list[Array]:
    means = [jnp.zeros_like(z) for z in latents[:-1]]
    return means + [jnp.broadcast_to(self.base_loc, latents[-1].shape)]

  def diagnostics(self, y: Array, augment: Sequence[Array]) -> list[dict[str, Array]]:
    return self._forward_pass(
        y, augment, lambda b, h: self.transitions[b].diagnostics(h)).at_splits

  def split_permutations(self) -> dict[int, Array]:
    orders = {b: t.shared_permutation() for b, t in enumerate(self.transitions)}
    return {b: order for b, order in orders.items() if order is not None}

  def shuffle_assignment(self, y: Array, augment: Sequence[Array]) -> list[dict[str, Array]]:
    return self._forward_pass(
        y, augment, lambda b, h: self.transitions[b].assignment(h)).at_splits

  def split_inputs(self, y: Array, augment: Sequence[Array]) -> list[Array]:
    return self._forward_pass(y, augment, lambda b, h: squeeze2d(h)).at_splits

  def position_log_likelihoods(self, y: Array) -> tuple[list[Array], Array]:
    raise ValueError(
        "bits_per_dim_map: the 'denseflow' backbone is not supported (its variational bound's "
        "dequantizer and augmentation terms are not per-pixel quantities); glow only.")
