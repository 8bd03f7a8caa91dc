"""Invertible building blocks of the flow, as Flax linen modules.

Every bijector follows distrax's naming: `forward_and_log_det(x) -> (y, log_det)` and
`inverse_and_log_det(y) -> (x, log_det)`, with `log_det` of shape (B,): the log |det J| of the
map that was applied, per example (so the inverse returns the negative of the forward's).
Internally each module has one compact `__call__(x, reverse)`: parameters are created on the
forward pass at `init`, which is where data-dependent initialisation (ActNorm) happens.

Images are NHWC; shapes are checked at the edge with errors that say what was expected.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, TypeVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from eiw_flow_jax.model import kernels
from eiw_flow_jax.model.kernels import apply_conv

Array = jax.Array
T = TypeVar("T")


def check_image_batch(x: Array, name: str, channels: int | None = None) -> None:
  """Raises ValueError unless `x` is a float NHWC batch (with `channels` channels if given)."""
  if x.ndim != 4:
    raise ValueError(f"{name}: expected a rank-4 NHWC batch (B, H, W, C), got shape {x.shape}.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name}: expected a floating-point array, got dtype {x.dtype}.")
  if channels is not None and x.shape[-1] != channels:
    raise ValueError(f"{name}: expected {channels} channels, got shape {x.shape}.")


# The name scope of each kind of layer (`layer_scope`), in the op names of compiled programs.
ACTNORM_SCOPE = "actnorm"
CONV1X1_SCOPE = "conv1x1"
COUPLING_SCOPE = "coupling"  # the coupling of the halves, around its network
COUPLING_NET_SCOPE = "coupling_net"
SPLIT_SCOPE = "split_and_prior"  # a split (its Shuffle, its prior net) and its merge
TOP_PRIOR_SCOPE = "top_prior_density"
LAYER_SCOPES = (ACTNORM_SCOPE, CONV1X1_SCOPE, COUPLING_SCOPE, COUPLING_NET_SCOPE, SPLIT_SCOPE,
                TOP_PRIOR_SCOPE)


def layer_scope(scope: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
  """Runs a layer's `__call__` under `jax.named_scope(scope)`: the compiled program's op names
  then say which kind of layer each instruction belongs to (`eiw_flow_jax.aot.traffic`)."""

  def decorate(call: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(call)
    def scoped(*args: Any, **kwargs: Any) -> T:
      with jax.named_scope(scope):
        return call(*args, **kwargs)

    return scoped

  return decorate


def sum_except_batch(x: Array) -> Array:
  return jnp.sum(x.reshape(x.shape[0], -1), axis=-1)


class Bijector(nn.Module):
  """Base class: subclasses implement `__call__(x, reverse) -> (out, log_det_of_that_map)`."""

  def forward_and_log_det(self, x: Array) -> tuple[Array, Array]:
    return self(x, reverse=False)

  def inverse_and_log_det(self, y: Array) -> tuple[Array, Array]:
    return self(y, reverse=True)


class UniformDequantize(Bijector):
  """Maps x + u in [0, 2^n)^D (x integer, u ~ U[0,1)) to y = (x + u) / 2^n in [0, 1)^D.

  The log-det, -D n ln 2, converts a density on [0,1]^D into one on [0, 2^n]^D; `dequantize`
  draws the noise. (Variational dequantization would replace u's distribution, not this map.)
  """

  n_bits: int = 8

  def dequantize(self, x: Array, rng: Array) -> Array:
    """uint8 x -> y = (x + u) / 2^n with u ~ U[0,1), as float32."""
    u = jax.random.uniform(rng, x.shape, jnp.float32)
    return (x.astype(jnp.float32) + u) / 2.0**self.n_bits

  def __call__(self, x: Array, reverse: bool = False) -> tuple[Array, Array]:
    levels = 2.0**self.n_bits
    dims = math.prod(x.shape[1:])
    log_det = jnp.full((x.shape[0],), -dims * self.n_bits * math.log(2.0), x.dtype)
    if reverse:
      return x * levels, -log_det
    return x / levels, log_det


class Shift(Bijector):
  """y = x + shift (the design's centring is Shift(-0.5)); log-det 0."""

  shift: float = -0.5

  def __call__(self, x: Array, reverse: bool = False) -> tuple[Array, Array]:
    zero = jnp.zeros((x.shape[0],), x.dtype)
    return (x - self.shift, zero) if reverse else (x + self.shift, zero)


def squeeze2x2(x: Array) -> Array:
  """(B, H, W, C) -> (B, H/2, W/2, 4C): each 2x2 block becomes channels."""
  b, h, w, c = x.shape
  if h % 2 or w % 2:
    raise ValueError(f"Squeeze: expected even H and W, got shape {x.shape}.")
  x = x.reshape(b, h // 2, 2, w // 2, 2, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // 2, w // 2, 4 * c)


def unsqueeze2x2(x: Array) -> Array:
  """Inverse of `squeeze2x2`."""
  b, h, w, c = x.shape
  if c % 4:
    raise ValueError(f"Unsqueeze: expected channels divisible by 4, got shape {x.shape}.")
  x = x.reshape(b, h, w, 2, 2, c // 4)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, c // 4)


class Squeeze(Bijector):
  """2x2 space-to-depth; a permutation, log-det 0."""

  def __call__(self, x: Array, reverse: bool = False) -> tuple[Array, Array]:
    zero = jnp.zeros((x.shape[0],), x.dtype)
    return (unsqueeze2x2(x), zero) if reverse else (squeeze2x2(x), zero)


class ActNorm(Bijector):
  """y = (x + bias) * exp(log_scale), per channel; data-dependent init (Glow).

  At `init`, bias and log_scale are set so the init batch leaves with zero mean and unit
  variance per channel. Log-det = H * W * sum(log_scale).
  """

  eps: float = 1e-6

  @nn.compact
  @layer_scope(ACTNORM_SCOPE)
  def __call__(self, x: Array, reverse: bool = False) -> tuple[Array, Array]:
    check_image_batch(x, "ActNorm")
    channels = x.shape[-1]

    # Statistics and parameters are float32 whatever the input's dtype (mixed precision).
    def init_bias(_rng, shape):
      return -jnp.mean(x.astype(jnp.float32), axis=(0, 1, 2)).reshape(shape)

    def init_log_scale(_rng, shape):
      std = jnp.std(x.astype(jnp.float32), axis=(0, 1, 2))
      return -jnp.log(std + self.eps).reshape(shape)

    bias = self.param("bias", init_bias, (channels,))
    log_scale = self.param("log_scale", init_log_scale, (channels,))
    spatial = x.shape[1] * x.shape[2]
    # The scale and the log-det in the wider of the input's and the parameters' dtypes (float64
    # under x64); applied in the input's dtype, so a bfloat16 coupling network stays bfloat16.
    log_scale = log_scale.astype(jnp.promote_types(x.dtype, log_scale.dtype))
    log_det = jnp.full((x.shape[0],), spatial * jnp.sum(log_scale), log_scale.dtype)
    bias_c = bias.astype(x.dtype)
    if reverse:
      return x * jnp.exp(-log_scale).astype(x.dtype) - bias_c, -log_det
    return (x + bias_c) * jnp.exp(log_scale).astype(x.dtype), log_det


def _lu_init(rng: Array, channels: int) -> tuple[np.ndarray, ...]:
  """LU factors of a random rotation: (P, L, U strictly upper, sign(diag), log|diag|)."""
  w = jax.random.orthogonal(rng, channels)
  p, lower, upper = jax.scipy.linalg.lu(w)
  diag = jnp.diag(upper)
  return p, lower, jnp.triu(upper, 1), jnp.sign(diag), jnp.log(jnp.abs(diag))


def lower_triangular_inverse(lower: Array) -> Array:
  """Inverse of a lower triangular matrix by recursive 2x2 blocks, with XLA dots only.

  inv([[A, 0], [C, B]]) = [[inv(A), 0], [-inv(B) C inv(A), inv(B)]], from 1x1 blocks up,
  every level one batched matmul pair (log2(C) levels; the matrix is padded with the identity
  to a power of two). This is the recursive variant of LAPACK's triangular inverse and as
  stable; XLA:CPU runs it in microseconds where its LAPACK triangular-solve call took
  milliseconds per call (checked against triangular solves in tests/test_memory.py).
  """
  channels = lower.shape[0]
  size = 1 << max(0, (channels - 1).bit_length())
  padded = jnp.eye(size, dtype=lower.dtype).at[:channels, :channels].set(lower)
  blocks = (1.0 / jnp.diagonal(padded)).reshape(size, 1, 1)  # inverses of the 1x1 blocks
  width = 1
  while width < size:
    count = size // width
    tiles = padded.reshape(count, width, count, width)
    idx = jnp.arange(0, count, 2)
    below = tiles[idx + 1, :, idx, :]  # (count/2, width, width): the C of each pair
    upper_inv, lower_inv = blocks[0::2], blocks[1::2]
    corner = -jnp.matmul(lower_inv, jnp.matmul(below, upper_inv))
    zeros = jnp.zeros_like(corner)
    blocks = jnp.concatenate([
        jnp.concatenate([upper_inv, zeros], axis=2),
        jnp.concatenate([corner, lower_inv], axis=2),
    ], axis=1)
    width *= 2
  return blocks[0, :channels, :channels]


class InvertibleConv1x1(Bijector):
  """Glow's invertible 1x1 convolution, LU-parameterised: W = P L (U + diag(sign * exp(s))).

  P and sign(diag) are fixed at init and live in the `constants` collection (not trained);
  L (unit lower), U (strictly upper) and s = log|diag| are parameters. Log-det = H W sum(s),
  O(C). The 1x1 convolution is an einsum over channels (faster than lax.conv on XLA:CPU).

  `inverse_method`: "solve" (triangular solves) or "blocks" (`lower_triangular_inverse`:
  recursive 2x2 blocks, only dots, which XLA:CPU runs far faster than its LAPACK
  triangular-solve call: docs/performance.md). "blocks" is
  used by memory="invert"'s backward pass, whose drift guard checks the rebuilt inputs anyway.
  """

  inverse_method: str = "solve"

  @nn.compact
  @layer_scope(CONV1X1_SCOPE)
  def __call__(self, x: Array, reverse: bool = False) -> tuple[Array, Array]:
    check_image_batch(x, "InvertibleConv1x1")
    c = x.shape[-1]
    # Constants and parameters are LU factors of one random rotation, so they share one key.
    # (Flax also evaluates init functions abstractly at apply time: hence the dummy key there.)
    key = self.make_rng("params") if self.is_initializing() else jax.random.key(0)
    perm = self.variable("constants", "permutation", lambda: _lu_init(key, c)[0]).value
    sign = self.variable("constants", "sign", lambda: _lu_init(key, c)[3]).value
    lower = self.param("lower", lambda _r, _s: _lu_init(key, c)[1], (c, c))
    upper = self.param("upper", lambda _r, _s: _lu_init(key, c)[2], (c, c))
    log_s = self.param("log_s", lambda _r, _s: _lu_init(key, c)[4], (c,))

    log_s = log_s.astype(jnp.promote_types(x.dtype, log_s.dtype))  # float64 under x64
    lower_mask = jnp.tril(jnp.ones((c, c), x.dtype), -1)
    l_mat = lower * lower_mask + jnp.eye(c, dtype=x.dtype)
    u_mat = upper * lower_mask.T + jnp.diag(sign * jnp.exp(log_s))
    spatial = x.shape[1] * x.shape[2]
    log_det = jnp.full((x.shape[0],), spatial * jnp.sum(log_s), x.dtype)
    if not reverse:
      weight = perm @ l_mat @ u_mat
      return jnp.einsum("bhwc,dc->bhwd", x, weight), log_det
    eye = jnp.eye(c, dtype=x.dtype)
    if self.inverse_method == "blocks":
      l_inv = lower_triangular_inverse(l_mat)
      u_inv = lower_triangular_inverse(u_mat.T).T
    else:
      # W^-1 = U^-1 L^-1 P^T via triangular solves: exact and stable.
      l_inv = jax.scipy.linalg.solve_triangular(l_mat, eye, lower=True, unit_diagonal=True)
      u_inv = jax.scipy.linalg.solve_triangular(u_mat, eye, lower=False)
    weight_inv = u_inv @ l_inv @ perm.T
    return jnp.einsum("bhwc,dc->bhwd", x, weight_inv), -log_det


class ZeroConv(nn.Module):
  """3x3 conv initialised to zero with a learned per-channel output scale exp(3 * logs) (Glow).

  Zero init makes couplings start as the identity and priors start as N(0, 1).
  """

  features: int
  logscale_factor: float = 3.0
  # Compute dtype of the convolution (None: the input's); the output is in the dtype the input
  # and the (float32) parameters promote to, float32 from bfloat16.
  dtype: Any = None
  kernels: str = "auto"  # see eiw_flow_jax.model.kernels

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = nn.Conv(self.features, (3, 3), padding="SAME", kernel_init=nn.initializers.zeros,
                   dtype=self.dtype, name="Conv_0")
    logs = self.param("logs", nn.initializers.zeros, (self.features,))
    out_dtype = jnp.result_type(x, logs)
    if self.is_initializing():
      return conv(x).astype(out_dtype) * jnp.exp(logs * self.logscale_factor)
    # (conv(x, W) + b) * scale == conv(x, W * scale) + b * scale: one pass less over the output.
    kernel, bias = self.folded()
    h = apply_conv(x, kernel, self.dtype or out_dtype, self.kernels)
    return h.astype(out_dtype) + bias

  def folded(self) -> tuple[Array, Array]:
    """(kernel, bias) of this layer with its output scale folded in (`fold_output_scale`)."""
    params = self.variables["params"]
    return fold_output_scale(params["Conv_0"]["kernel"], params["Conv_0"]["bias"],
                             jnp.exp(params["logs"] * self.logscale_factor))


class Conv1x1(nn.Module):
  """A 1x1 convolution computed as a matmul over channels, bias-free unless `use_bias`.

  Same parameters as `nn.Conv(features, (1, 1), use_bias=...)` (kernel (1, 1, in, out), bias
  (out,) zero-initialised, the same initialisers), so checkpoints and converted state_dicts are
  interchangeable; on XLA:CPU the dot is faster than the convolution for the coupling
  network's 1x1 layer (forward + backward, docs/benchmarks.md). Glow's coupling networks
  and DenseFlow's nets (`dense_nets.conv`) use it.
  """

  features: int
  dtype: Any = None  # compute dtype (None: what the input and the kernel promote to)
  use_bias: bool = False
  kernel_init: Any = nn.initializers.lecun_normal()
  kernels: str = "auto"  # see eiw_flow_jax.model.kernels

  @nn.compact
  def __call__(self, x: Array) -> Array:
    y = apply_conv(x, self.kernel(x.shape[-1]), self.dtype, self.kernels)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,))
    return y

  def kernel(self, in_channels: int) -> Array:
    return self.param("kernel", self.kernel_init, (1, 1, in_channels, self.features))


def fold_output_scale(kernel: Array, bias: Array, scale: Array) -> tuple[Array, Array]:
  """(conv(x, kernel) + bias) * scale == conv(x, kernel') + bias' per output channel: returns
  (kernel', bias') = (kernel * scale, bias * scale), the kernel through `scale_output_channels`.
  The fold of `CouplingNet`'s ActNorms into their convolutions and of `ZeroConv`'s scale."""
  return scale_output_channels(kernel, scale), bias * scale


def scale_output_channels(kernel: Array, scale: Array) -> Array:
  """`kernel * scale` for an HWIO kernel and a per-output-channel scale, through a 2-D view.

  The same product; what changes is the scale's gradient, a sum over the other axes. Written on
  the 4-D kernel, a 1x1 kernel's sum became a reduce over axis 2 of (1, 1, C, D), which XLA:CPU
  sends to a slow path (its unit axes simplified away), an order of magnitude slower than the
  same sum over axis 0 of (C, D) (docs/performance.md).
  """
  return (kernel.reshape(-1, kernel.shape[-1]) * scale).reshape(kernel.shape)


class CouplingNet(nn.Module):
  """Glow's coupling network: conv3x3 -> ActNorm -> ReLU -> conv1x1 -> ActNorm -> ReLU ->
  zero-initialised conv3x3 (`ZeroConv`).

  Its parameters are those of the layers named below. At `init` the layers run one after the
  other: ActNorm's data-dependent initialisation needs its convolution's output statistics.
  Afterwards each ActNorm is folded into the convolution before it, and the zero convolution's
  output scale into that convolution (`fold_output_scale`), which gives the same function of the
  same parameters with one elementwise pass per layer (bias, ReLU) instead of three, and a
  backward pass with no reduction over pixels for the scales.
  `eiw_flow_jax.model.kernels.coupling_net` computes the folded layers in the platform's form
  (channels-first matmuls on XLA:CPU at large widths; convolutions elsewhere).

  `dtype` (mixed precision; None: the input's, as Flax's `dtype`): the convolutions and
  activations compute in that dtype while the parameters stay float32; the output (shift and
  scale of the coupling) is in the dtype the input and the parameters promote to (float32 from
  bfloat16 or float32, float64 from float64), so the log-determinant and the coupled half are
  computed at least in float32.
  """

  hidden: int
  out_channels: int
  dtype: Any = None
  kernels: str = "auto"  # see eiw_flow_jax.model.kernels

  @nn.compact
  @layer_scope(COUPLING_NET_SCOPE)
  def __call__(self, x: Array) -> Array:
    if self.dtype is not None:
      x = x.astype(self.dtype)
    # The names are those of the checkpoints (and of convert.py's mapping of the authors').
    conv_in = nn.Conv(self.hidden, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype,
                      name="Conv_0")
    norm_in = ActNorm(name="ActNorm_0")
    conv_hidden = Conv1x1(self.hidden, self.dtype, kernels=self.kernels, name="Conv_1")
    norm_hidden = ActNorm(name="ActNorm_1")
    conv_out = ZeroConv(self.out_channels, dtype=self.dtype, kernels=self.kernels,
                        name="ZeroConv_0")
    if self.is_initializing():
      h = nn.relu(norm_in(conv_in(x))[0])
      h = nn.relu(norm_hidden(conv_hidden(h))[0])
      return conv_out(h)
    layers = (_fold_actnorm(conv_in, norm_in), _fold_actnorm(conv_hidden, norm_hidden),
              conv_out.folded())
    return kernels.coupling_net(layers, x, self.dtype, self.kernels)


def _fold_actnorm(conv: nn.Module, actnorm: ActNorm) -> tuple[Array, Array]:
  """(kernel, bias) of relu's input ActNorm(conv(x)) = conv(x, kernel) + bias."""
  norm = actnorm.variables["params"]
  return fold_output_scale(conv.variables["params"]["kernel"], norm["bias"],
                           jnp.exp(norm["log_scale"]))


def split_halves(x: Array, name: str) -> tuple[Array, Array]:
  c = x.shape[-1]
  if c < 2:
    raise ValueError(f"{name}: expected at least 2 channels to couple, got shape {x.shape}.")
  half = c // 2
  return x[..., :half], x[..., half:]


def affine_couple(net_out: Array, x_b: Array, reverse: bool) -> tuple[Array, Array]:
  """The affine coupling of half x_b given the network's output on the other half."""
  shift, raw_scale = net_out[..., 0::2], net_out[..., 1::2]
  log_scale = jax.nn.log_sigmoid(raw_scale + 2.0)
  log_det = sum_except_batch(log_scale)
  if reverse:
    return x_b * jnp.exp(-log_scale) - shift, -log_det
  return (x_b + shift) * jnp.exp(log_scale), log_det


def additive_couple(net_out: Array, x_b: Array, reverse: bool) -> tuple[Array, Array]:
  """The additive coupling of half x_b given the network's output (the shift)."""
  x_b = x_b - net_out if reverse else x_b + net_out
  return x_b, jnp.zeros((x_b.shape[0],), x_b.dtype)


class AffineCoupling(Bijector):
  """Glow affine coupling: x_b <- (x_b + t(x_a)) * sigmoid(r(x_a) + 2); x_a unchanged."""

  hidden: int = 512
  dtype: Any = None  # the coupling network's compute dtype (None: the input's)
  kernels: str = "auto"  # see eiw_flow_jax.model.kernels

  @nn.compact
  @layer_scope(COUPLING_SCOPE)
  def __call__(self, x: Array, reverse: bool = False) -> tuple[Array, Array]:
    check_image_batch(x, "AffineCoupling")
    x_a, x_b = split_halves(x, "AffineCoupling")
    h = CouplingNet(self.hidden, 2 * x_b.shape[-1], self.dtype, self.kernels, name="net")(x_a)
    x_b, log_det = affine_couple(h, x_b, reverse)
    return jnp.concatenate([x_a, x_b], axis=-1), log_det


class AdditiveCoupling(Bijector):
  """Additive coupling (NICE / Glow option): x_b <- x_b + t(x_a); log-det 0."""

  hidden: int = 512
  dtype: Any = None  # the coupling network's compute dtype (None: the input's)
  kernels: str = "auto"  # see eiw_flow_jax.model.kernels

  @nn.compact
  @layer_scope(COUPLING_SCOPE)
  def __call__(self, x: Array, reverse: bool = False) -> tuple[Array, Array]:
    check_image_batch(x, "AdditiveCoupling")
    x_a, x_b = split_halves(x, "AdditiveCoupling")
    shift = CouplingNet(self.hidden, x_b.shape[-1], self.dtype, self.kernels, name="net")(x_a)
    x_b, log_det = additive_couple(shift, x_b, reverse)
    return jnp.concatenate([x_a, x_b], axis=-1), log_det


class FlowStep(Bijector):
  """One Glow step: ActNorm -> invertible 1x1 conv -> coupling."""

  hidden: int = 512
  coupling: str = "affine"
  dtype: Any = None  # compute dtype of the coupling network only (None: the input's)
  kernels: str = "auto"  # see eiw_flow_jax.model.kernels

  def setup(self) -> None:
    coupling_cls: Callable[..., Bijector] = {
        "affine": AffineCoupling,
        "additive": AdditiveCoupling,
    }.get(self.coupling)
    if coupling_cls is None:
      raise ValueError(f"coupling must be 'affine' or 'additive', got {self.coupling!r}.")
    self.layers = [
        ActNorm(), InvertibleConv1x1(),
        coupling_cls(hidden=self.hidden, dtype=self.dtype, kernels=self.kernels),
    ]

  def __call__(self, x: Array, reverse: bool = False) -> tuple[Array, Array]:
    total = jnp.zeros((x.shape[0],), x.dtype)
    for layer in reversed(self.layers) if reverse else self.layers:
      x, log_det = layer(x, reverse=reverse)
      total = total + log_det
    return x, total

  # The variables' names of `layers` (ActNorm, 1x1 convolution, coupling), as setup names them.
  LAYER_NAMES = ("layers_0", "layers_1", "layers_2")

  @nn.nowrap
  def inverse_vjp(
      self, variables: Any, y: Array, g_y: Array, g_log_det: Array
  ) -> tuple[Array, Any, Array]:
    """This step's input rebuilt from its output `y`, and the step's VJP there: (x, d params,
    d x), for `variables` of one step and the cotangents of its output and log-det.

    The `inverse_vjp` of memory="invert" (`eiw_flow_jax.model.memory`): the coupling network
    runs once, on the half the coupling leaves unchanged (y_a = x_a exactly), and serves both
    the inverse (shift and scale for x_b) and the backward pass (its VJP), instead of once for
    the inverse and again in a recomputed forward. ActNorm and the 1x1 convolution (no hidden
    activations) are inverted, then differentiated generically. Same function and gradients as
    `jax.vjp` of `self.apply` at the rebuilt input. Called on a parentless step.
    """
    actnorm, conv, coupling = self.LAYER_NAMES
    params, constants = variables["params"], variables.get("constants", {})
    y_a, y_b = split_halves(y, "FlowStep")
    g_a, g_b = split_halves(g_y, "FlowStep")
    out_channels = y_b.shape[-1] * (2 if self.coupling == "affine" else 1)
    couple = affine_couple if self.coupling == "affine" else additive_couple
    net = CouplingNet(self.hidden, out_channels, self.dtype, self.kernels, parent=None)
    net_out, net_vjp = jax.vjp(
        lambda p, x_a: net.apply({"params": p}, x_a), params[coupling]["net"], y_a
    )
    z_b = couple(net_out, y_b, True)[0]
    _, couple_vjp = jax.vjp(lambda n, x_b: couple(n, x_b, False), net_out, z_b)
    g_net_out, g_zb = couple_vjp((g_b, g_log_det))
    g_net, g_za = net_vjp(g_net_out)
    grads = {coupling: {"net": g_net}}
    x = jnp.concatenate([y_a, z_b], axis=-1)
    g_x = jnp.concatenate([g_a + g_za, g_zb], axis=-1)
    layers = (
        (conv, InvertibleConv1x1(inverse_method="blocks", parent=None)),
        (actnorm, ActNorm(parent=None)),
    )
    for name, layer in layers:
      layer_vars = {"params": params[name]}
      if name in constants:
        layer_vars["constants"] = constants[name]
      x = layer.apply(layer_vars, x, reverse=True)[0]

      def forward(p, h, layer=layer, layer_vars=layer_vars):
        return layer.apply({**layer_vars, "params": p}, h)

      _, vjp = jax.vjp(forward, params[name], x)
      grads[name], g_x = vjp((g_x, g_log_det))
    return x, grads, g_x
