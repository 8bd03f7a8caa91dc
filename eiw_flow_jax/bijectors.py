"""Invertible building blocks of the flow, as Flax linen modules.

Every bijector follows distrax's naming: `forward_and_log_det(x) -> (y, log_det)` and
`inverse_and_log_det(y) -> (x, log_det)`, with `log_det` of shape (B,): the log |det J| of the
map that was applied, per example (so the inverse returns the negative of the forward's).
Internally each module has one compact `__call__(x, reverse)`: parameters are created on the
forward pass at `init`, which is where data-dependent initialisation (ActNorm) happens.

Images are NHWC; shapes are checked at the edge with errors that say what was expected.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

Array = jax.Array


def check_image_batch(x: Array, name: str, channels: int | None = None) -> None:
  """Raises ValueError unless `x` is a float NHWC batch (with `channels` channels if given)."""
  if x.ndim != 4:
    raise ValueError(f"{name}: expected a rank-4 NHWC batch (B, H, W, C), got shape {x.shape}.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name}: expected a floating-point array, got dtype {x.dtype}.")
  if channels is not None and x.shape[-1] != channels:
    raise ValueError(f"{name}: expected {channels} channels, got shape {x.shape}.")


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
    log_det = jnp.full((x.shape[0],), spatial * jnp.sum(log_scale), log_scale.dtype)
    # Applied in the input's dtype, so a bfloat16 coupling network stays bfloat16.
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
  recursive 2x2 blocks, only dots, which XLA:CPU runs in microseconds where its LAPACK
  triangular-solve call took milliseconds: ~40% of memory="invert"'s step time). "blocks" is
  used by memory="invert"'s backward pass, whose drift guard checks the rebuilt inputs anyway.
  """

  inverse_method: str = "solve"

  @nn.compact
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
  dtype: Any = None  # compute dtype of the convolution (None: the input's); output is float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = nn.Conv(
        self.features, (3, 3), padding="SAME", kernel_init=nn.initializers.zeros, dtype=self.dtype
    )
    logs = self.param("logs", nn.initializers.zeros, (self.features,))
    scale = jnp.exp(logs * self.logscale_factor)
    if self.is_initializing():
      return conv(x).astype(jnp.float32) * scale
    # (conv(x, W) + b) * scale == conv(x, W * scale) + b * scale: one pass less over the output.
    params = conv.variables["params"]
    kernel, bias = fold_output_scale(params["kernel"], params["bias"], scale)
    h = apply_conv(x, kernel, self.dtype or jnp.result_type(x, jnp.float32))
    return h.astype(jnp.float32) + bias


def channel_matmul(x: Array, w: Array) -> Array:
  """`x @ w` over the last (channel) axis of `x`: the 1x1 layers and the products of
  `conv3x3_by_matmul` in NHWC (DenseFlow's nets; Glow's coupling network where it does not run
  channels-first, `coupling_net_takes_channels_first`).

  On CPU the same product with another derivative rule (`_channel_matmul_cpu`), whose kernel
  gradient XLA:CPU computes as YNNPACK matmuls rather than an Eigen dot: the whole CIFAR
  benchmark train step took 0.72-0.88x the time on a 2-core AMD Zen 5, the digits one
  0.95-0.99x; blocking its transpose (`transpose_block_rows`) then took the CIFAR step to
  0.84-0.87x the time on a 2-core Intel Xeon (docs/performance.md). Other backends keep the
  plain einsum.
  """
  if jax.default_backend() == "cpu":
    return _channel_matmul_cpu(x, w)
  return jnp.einsum("...c,cd->...d", x, w)


@jax.custom_jvp
def _channel_matmul_cpu(x: Array, w: Array) -> Array:
  return jnp.einsum("...c,cd->...d", x, w)


def _channel_matmul_cpu_jvp(primals, tangents):
  """The product rule, with the `x @ dw` term written on a materialised transpose of x.

  Reverse mode transposes that term into the kernel gradient X^T dY (contracted over the
  N = B H W rows). From plain autodiff XLA:CPU gets a dot contracting both operands' leading
  axis, which it runs as an Eigen dot (asynchronously, beside the layer's YNNPACK input-gradient
  matmul, at about half the rate either reaches alone on 2 cores). Here X^T (C, N) is computed
  in the forward pass behind an optimization barrier (so the algebraic simplifier does not
  fold the transpose back into the dot) and kept in place of X, the same bytes; its transposed
  term is a row-major (C, N) @ (N, D) matmul, which XLA:CPU hands to YNNPACK.

  A large X is transposed in blocks of rows (`transpose_block_rows`), each block its own
  (C, T) array and its own matmul, the kernel gradient their sum. XLA:CPU's transpose loop
  reads a whole column of X per output row; with C a power of two those N reads fall in a few
  cache sets, and past a few hundred rows they evict each other before the next column reuses
  them: one (4096, 256) transpose took 3.1 ms alone, in blocks 0.7 ms. (The blocks as one array
  in a batched matmul instead: XLA's layout assignment folds the transposes back into an Eigen
  dot, or YNNPACK's batched product runs at half rate.) Symbolic-zero tangents (data inputs,
  frozen kernels) skip their term.
  """
  x, w = primals
  dx, dw = tangents
  y = _channel_matmul_cpu(x, w)
  terms = []
  if not isinstance(dx, SymbolicZero):
    terms.append(jnp.einsum("...c,cd->...d", dx, w))
  if not isinstance(dw, SymbolicZero):
    rows = x.reshape(-1, x.shape[-1])
    block = transpose_block_rows(*rows.shape)
    products = [jax.lax.optimization_barrier(rows[start:start + block].T).T @ dw
                for start in range(0, rows.shape[0], block)]
    terms.append(jnp.concatenate(products).reshape(y.shape))
  if not terms:
    return y, jnp.zeros_like(y)
  return y, sum(terms[1:], terms[0])


_channel_matmul_cpu.defjvp(_channel_matmul_cpu_jvp, symbolic_zeros=True)

# Elements of X per block of its transpose in `_channel_matmul_cpu_jvp` (512 KiB in float32):
# 512 rows at 256 channels, 256 at 512. The CIFAR step was as fast with 2**16 to 2**18 on a
# 2-core Intel Xeon, and no faster than unblocked with 2**20 at width 512 (docs/performance.md).
TRANSPOSE_BLOCK_ELEMENTS = 1 << 17
# At most this many blocks (larger ones past it): each block is its own transpose and matmul in
# the compiled program. At width 512, batch 64, 16 blocks of 1024 rows kept most of the speed of
# 64 of 256 (1.03-1.05x their step time) and compiled in 40 s instead of 71 at K=32.
MAX_TRANSPOSE_BLOCKS = 16
# Fewer rows than this per block and the matmuls get thin: one transpose instead.
MIN_TRANSPOSE_BLOCK_ROWS = 64


def transpose_block_rows(rows: int, channels: int) -> int:
  """Rows per block in which `channel_matmul`'s CPU rule transposes its (rows, channels) input.

  Among the divisors of `rows` that make at most `MAX_TRANSPOSE_BLOCKS` blocks of at least
  `MIN_TRANSPOSE_BLOCK_ROWS` rows: the largest whose block holds at most
  `TRANSPOSE_BLOCK_ELEMENTS` elements, else the smallest. All rows (one block) when the input
  is that small already, or when no divisor qualifies (rows = B H W with a large prime factor).
  """
  if rows * channels <= TRANSPOSE_BLOCK_ELEMENTS:
    return rows
  candidates = [block for block in _divisors(rows)
                if block >= MIN_TRANSPOSE_BLOCK_ROWS and rows // block <= MAX_TRANSPOSE_BLOCKS]
  if not candidates:
    return rows
  within_budget = [block for block in candidates if block * channels <= TRANSPOSE_BLOCK_ELEMENTS]
  return max(within_budget) if within_budget else min(candidates)


def _divisors(n: int) -> list[int]:
  small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
  return sorted({*small, *(n // d for d in small)})


class Conv1x1(nn.Module):
  """A 1x1 convolution computed as a matmul over channels, bias-free unless `use_bias`.

  Same parameters as `nn.Conv(features, (1, 1), use_bias=...)` (kernel (1, 1, in, out), bias
  (out,) zero-initialised, the same initialisers), so checkpoints and converted state_dicts are
  interchangeable; on XLA:CPU the dot is about 3x faster than the convolution for the coupling
  network's 1x1 layer (forward + backward, see docs/benchmarks.md). Glow's coupling networks
  and DenseFlow's nets (`dense_nets.conv`) use it.
  """

  features: int
  dtype: Any = jnp.float32
  use_bias: bool = False
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    y = apply_conv(x, self.kernel(x.shape[-1]), self.dtype)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,))
    return y

  def kernel(self, in_channels: int) -> Array:
    return self.param("kernel", self.kernel_init, (1, 1, in_channels, self.features))


def apply_conv(x: Array, kernel: Array, dtype: Any) -> Array:
  """SAME, stride-1, bias-free convolution of NHWC `x` by HWIO `kernel`, computed in `dtype`.

  A 1x1 kernel is computed as a dot over channels (`channel_matmul`; faster than lax.conv on
  XLA:CPU). On CPU, a 3x3 kernel whose channel counts differ a lot (the coupling network's
  first and last layers, at width 256 and up: `conv3x3_takes_matmul_form`) is computed as one
  matmul plus nine shifted copies (`conv3x3_by_matmul`: a whole Glow train step 14% faster on
  2 cores, docs/performance.md); accelerators keep their convolution kernels, as the rewrite
  is unmeasured there.
  """
  x, kernel = x.astype(dtype), kernel.astype(dtype)
  if kernel.shape[:2] == (1, 1):
    return channel_matmul(x, kernel[0, 0])
  if jax.default_backend() == "cpu" and conv3x3_takes_matmul_form(kernel.shape):
    return conv3x3_by_matmul(x, kernel)
  return jax.lax.conv_general_dilated(
      x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def conv3x3_takes_matmul_form(kernel_shape: tuple[int, ...], min_width: int = 256) -> bool:
  """Whether `apply_conv` computes this HWIO kernel by `conv3x3_by_matmul` on CPU.

  3x3 kernels with few channels on one side (9 min(C_in, C_out) <= 2 max) and at least
  `min_width` on the other: at 256 the whole CIFAR train step took 0.82-0.88x the time. With
  32-128 channels the two forms were within +-8% of each other (docs/performance.md), so
  lax.conv stays there. (bench/conv3x3.py passes min_width=0 to measure the form at any width.)
  """
  kh, kw, cin, cout = kernel_shape
  return ((kh, kw) == (3, 3) and max(cin, cout) >= min_width
          and 9 * min(cin, cout) <= 2 * max(cin, cout))


def _shift(x: Array, di: int, dj: int, height_axis: int = 1) -> Array:
  """x[:, p + di, q + dj] (NHWC; `height_axis=2` for (C, B, H, W): x[:, :, p + di, q + dj]) with
  zeros outside, |di|, |dj| <= 1: one lax.pad (negative = crop), whose transpose is again one
  pad (the opposite shift)."""
  padding = [(0, 0, 0)] * x.ndim
  padding[height_axis], padding[height_axis + 1] = (-di, di, 0), (-dj, dj, 0)
  return jax.lax.pad(x, jnp.zeros((), x.dtype), padding)


def conv3x3_by_matmul(x: Array, kernel: Array) -> Array:
  """The SAME 3x3 convolution written as one matmul over a 9x wider side, plus shifts.

  XLA:CPU runs 3x3 convolutions with few input or output channels (Glow's coupling network:
  C/2 -> hidden and hidden -> C, C = 6..48) at a third to a half of its matmul rate, slowest in
  their backward passes (measured in docs/performance.md). With few inputs (im2col): stack the
  nine shifted copies of x (9 C_in channels), then one matmul. With few outputs: one matmul to
  nine output blocks (9 C_out channels), each shifted into place and summed. Plain JAX ops whose
  transposes are again matmuls, pads and a concatenate (`lax.split` transposes to one), so
  reverse- and forward-mode autodiff both stay fast; the only custom rule is the matmuls'
  (`channel_matmul`, a JVP rule, so both modes still work). Same function as
  `lax.conv_general_dilated(x, kernel, (1, 1), "SAME")` up to float round-off.
  """
  kh, kw, cin, cout = kernel.shape
  offsets = [(i - 1, j - 1) for i in range(kh) for j in range(kw)]
  if cin <= cout:
    patches = jnp.concatenate([_shift(x, di, dj) for di, dj in offsets], axis=-1)
    return channel_matmul(patches, kernel.reshape(kh * kw * cin, cout))
  blocks = channel_matmul(x, kernel.transpose(2, 0, 1, 3).reshape(cin, kh * kw * cout))
  blocks = jax.lax.split(blocks, [cout] * (kh * kw), axis=3)
  out = _shift(blocks[0], *offsets[0])
  for block, (di, dj) in zip(blocks[1:], offsets[1:]):
    out = out + _shift(block, di, dj)
  return out


def conv_actnorm_relu(conv: nn.Module, actnorm: ActNorm, x: Array, dtype: Any) -> Array:
  """relu(ActNorm(conv(x))) with the ActNorm folded into the convolution.

  (conv(x, W) + b) * exp(s) == conv(x, W * exp(s)) + b * exp(s) per output channel, so the
  same parameters give the same function with one elementwise pass (bias, ReLU) instead of
  three (bias, scale, ReLU), and the backward pass needs no reduction over pixels for s: the
  scale's gradient comes from the kernel's. At `init` the layers run unfolded, because ActNorm's
  data-dependent initialisation needs the convolution's output statistics.
  """
  if conv.is_initializing():
    return nn.relu(actnorm(conv(x))[0])
  kernel = conv.variables["params"]["kernel"]
  bias, log_scale = actnorm.variables["params"]["bias"], actnorm.variables["params"]["log_scale"]
  kernel, bias = fold_output_scale(kernel, bias, jnp.exp(log_scale))
  h = apply_conv(x, kernel, dtype)
  return nn.relu(h + bias.astype(h.dtype))


def fold_output_scale(kernel: Array, bias: Array, scale: Array) -> tuple[Array, Array]:
  """(conv(x, kernel) + bias) * scale == conv(x, kernel') + bias' per output channel: returns
  (kernel', bias') = (kernel * scale, bias * scale), the kernel through `scale_output_channels`.
  The fold behind `conv_actnorm_relu` (ActNorm after a convolution) and `ZeroConv`."""
  return scale_output_channels(kernel, scale), bias * scale


def scale_output_channels(kernel: Array, scale: Array) -> Array:
  """`kernel * scale` for an HWIO kernel and a per-output-channel scale, through a 2-D view.

  The same product; what changes is the scale's gradient, a sum over the other axes. Written on
  the 4-D kernel, a 1x1 kernel's sum became a reduce over axis 2 of (1, 1, C, D), which XLA:CPU
  ran at 300-380 us for C = D = 256 (its unit axes simplified away, the reduction went to a slow
  path) against 20-30 us over axis 0 of (C, D): about 10% of the op time of the CIFAR benchmark
  step went to those 24 sums (docs/performance.md).
  """
  return (kernel.reshape(-1, kernel.shape[-1]) * scale).reshape(kernel.shape)


class CouplingNet(nn.Module):
  """Glow's coupling network.

  conv3x3 -> ActNorm -> ReLU -> conv1x1 -> ActNorm -> ReLU -> zero-initialised conv3x3.
  Each ActNorm is folded into the convolution before it (`conv_actnorm_relu`). On CPU, at
  widths where `coupling_net_takes_channels_first` holds, the same function of the same
  parameters is computed with channels-first activations (`coupling_net_channels_first`).

  `dtype` (mixed precision): the convolutions and activations compute in that dtype while the
  parameters stay float32; the output (shift and scale of the coupling) is float32, so the
  log-determinant and the coupled half are computed in float32.
  """

  hidden: int
  out_channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = x.astype(self.dtype)
    if not self.is_initializing() and coupling_net_takes_channels_first(
        x.shape, self.hidden, self.out_channels):
      return coupling_net_channels_first(self.variables["params"], x, self.dtype)
    conv0 = nn.Conv(self.hidden, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype)
    h = conv_actnorm_relu(conv0, ActNorm(), x, self.dtype)
    h = conv_actnorm_relu(Conv1x1(self.hidden, self.dtype, name="Conv_1"), ActNorm(), h,
                          self.dtype)
    return ZeroConv(self.out_channels, dtype=self.dtype)(h)


# Narrowest image width (W of NHWC) at which the CPU coupling network runs channels-first: the
# shifts of its 3x3 convolutions then move rows of at least 16 floats. One network forward and
# backward took 0.82-0.87x the NHWC time at widths 16 and 32, 1.00-1.04x at 8, 1.07-1.16x at 4
# (docs/performance.md).
CHANNELS_FIRST_MIN_WIDTH = 16


def coupling_net_takes_channels_first(x_shape: tuple[int, ...], hidden: int,
                                      out_channels: int) -> bool:
  """Whether `CouplingNet` computes NHWC input of `x_shape` by `coupling_net_channels_first`:
  on CPU, when both 3x3 convolutions take the matmul form (`conv3x3_takes_matmul_form`: width
  256 and up) and the image is at least `CHANNELS_FIRST_MIN_WIDTH` wide."""
  _, _, width, channels = x_shape
  return (jax.default_backend() == "cpu" and width >= CHANNELS_FIRST_MIN_WIDTH
          and conv3x3_takes_matmul_form((3, 3, channels, hidden))
          and conv3x3_takes_matmul_form((3, 3, hidden, out_channels)))


def coupling_net_channels_first(params: Any, x: Array, dtype: Any) -> Array:
  """`CouplingNet`'s function of its (folded) parameters with the hidden activations stored
  channels-first, (C, B H W), instead of NHWC.

  Row-major NHWC activations X (N, C) make every kernel gradient X^T dY contract the major axis
  of both operands, which XLA:CPU runs as an Eigen dot unless X is transposed first
  (`channel_matmul`): those transposes were 7% of the CIFAR step's op time. Channels-first, each
  layer is W^T X (a small transposed kernel times X), its input gradient W dY and its kernel
  gradient dY X^T, a product over the minor axis of both: all three YNNPACK matmuls, with no
  transpose bigger than a kernel (`channels_first_matmul`). Only the coupling network's input
  (C/2 channels) and output (C) change layout. The 3x3 convolutions are the two forms of
  `conv3x3_by_matmul`, the shifts moving along H and W. Same function up to float round-off
  (tests/test_bijectors.py compares it with the layer-by-layer network, values and gradients).
  """
  batch, height, width, _ = x.shape
  offsets = [(i - 1, j - 1) for i in range(3) for j in range(3)]

  def folded(kernel, actnorm):
    kernel, bias = fold_output_scale(kernel, actnorm["bias"], jnp.exp(actnorm["log_scale"]))
    return kernel.astype(dtype), bias.astype(dtype)

  # Conv_0 (few inputs): the nine shifted copies of the input stacked, one matmul.
  x_first = x.transpose(3, 0, 1, 2)
  patches = jnp.concatenate([_shift(x_first, di, dj, height_axis=2) for di, dj in offsets])
  kernel, bias = folded(params["Conv_0"]["kernel"], params["ActNorm_0"])
  h = channels_first_matmul(kernel.reshape(patches.shape[0], -1),
                            patches.reshape(patches.shape[0], -1))
  h = nn.relu(h + bias[:, None])
  # Conv_1, 1x1.
  kernel, bias = folded(params["Conv_1"]["kernel"], params["ActNorm_1"])
  h = nn.relu(channels_first_matmul(kernel.reshape(h.shape[0], -1), h) + bias[:, None])
  # ZeroConv (few outputs): one matmul to nine output blocks, each shifted into place.
  zero = params["ZeroConv_0"]
  kernel, bias = fold_output_scale(zero["Conv_0"]["kernel"], zero["Conv_0"]["bias"],
                                   jnp.exp(zero["logs"] * ZeroConv.logscale_factor))
  blocks = channels_first_matmul(
      kernel.astype(dtype).transpose(2, 0, 1, 3).reshape(h.shape[0], -1), h,
  ).reshape(len(offsets), kernel.shape[-1], batch, height, width)
  out = _shift(blocks[0], *offsets[0], height_axis=2)
  for block, (di, dj) in zip(blocks[1:], offsets[1:]):
    out = out + _shift(block, di, dj, height_axis=2)
  return out.transpose(1, 2, 3, 0).astype(jnp.float32) + bias


@jax.custom_jvp
def channels_first_matmul(kernel: Array, x: Array) -> Array:
  """`kernel^T @ x`: a (C, D) kernel applied to channels-first activations x (C, N) -> (D, N).

  Computed on a materialised kernel^T behind an optimization barrier, and its derivative rule
  keeps the kernel's own layout for the input gradient (kernel @ dY), so that XLA:CPU runs the
  forward product, the input gradient and the kernel gradient (dY x^T, contracting the minor
  axis of both) as YNNPACK matmuls; folded into the dot, a transposed kernel makes an Eigen dot.
  """
  return jax.lax.optimization_barrier(kernel.T) @ x


def _channels_first_matmul_jvp(primals, tangents):
  kernel, x = primals
  dkernel, dx = tangents
  y = channels_first_matmul(kernel, x)
  # Reverse mode transposes these terms: dx's into kernel @ ct, dkernel's into (ct @ x^T)^T.
  # Symbolic-zero tangents (data inputs, frozen kernels) skip their term.
  terms = []
  if not isinstance(dx, SymbolicZero):
    terms.append(jax.lax.optimization_barrier(kernel).T @ dx)
  if not isinstance(dkernel, SymbolicZero):
    terms.append(dkernel.T @ x)
  if not terms:
    return y, jnp.zeros_like(y)
  return y, sum(terms[1:], terms[0])


channels_first_matmul.defjvp(_channels_first_matmul_jvp, symbolic_zeros=True)


def _split_halves(x: Array, name: str) -> tuple[Array, Array]:
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
  dtype: Any = jnp.float32  # the coupling network's compute dtype

  @nn.compact
  def __call__(self, x: Array, reverse: bool = False) -> tuple[Array, Array]:
    check_image_batch(x, "AffineCoupling")
    x_a, x_b = _split_halves(x, "AffineCoupling")
    h = CouplingNet(self.hidden, 2 * x_b.shape[-1], self.dtype, name="net")(x_a)
    x_b, log_det = affine_couple(h, x_b, reverse)
    return jnp.concatenate([x_a, x_b], axis=-1), log_det


class AdditiveCoupling(Bijector):
  """Additive coupling (NICE / Glow option): x_b <- x_b + t(x_a); log-det 0."""

  hidden: int = 512
  dtype: Any = jnp.float32  # the coupling network's compute dtype

  @nn.compact
  def __call__(self, x: Array, reverse: bool = False) -> tuple[Array, Array]:
    check_image_batch(x, "AdditiveCoupling")
    x_a, x_b = _split_halves(x, "AdditiveCoupling")
    shift = CouplingNet(self.hidden, x_b.shape[-1], self.dtype, name="net")(x_a)
    x_b, log_det = additive_couple(shift, x_b, reverse)
    return jnp.concatenate([x_a, x_b], axis=-1), log_det


class FlowStep(Bijector):
  """One Glow step: ActNorm -> invertible 1x1 conv -> coupling."""

  hidden: int = 512
  coupling: str = "affine"
  dtype: Any = jnp.float32  # compute dtype of the coupling network only (mixed precision)

  def setup(self) -> None:
    coupling_cls: Callable[..., Bijector] = {
        "affine": AffineCoupling,
        "additive": AdditiveCoupling,
    }.get(self.coupling)
    if coupling_cls is None:
      raise ValueError(f"coupling must be 'affine' or 'additive', got {self.coupling!r}.")
    self.layers = [
        ActNorm(), InvertibleConv1x1(), coupling_cls(hidden=self.hidden, dtype=self.dtype)
    ]

  def __call__(self, x: Array, reverse: bool = False) -> tuple[Array, Array]:
    total = jnp.zeros((x.shape[0],), x.dtype)
    for layer in reversed(self.layers) if reverse else self.layers:
      x, log_det = layer(x, reverse=reverse)
      total = total + log_det
    return x, total


def flow_step_inverse_vjp(
    step: FlowStep, variables: Any, y: Array, g_y: Array, g_log_det: Array
) -> tuple[Array, Any, Array]:
  """One step's input rebuilt from its output, and the step's VJP there: (x, d params, d x).

  For memory="invert" (`eiw_flow_jax.memory`): the coupling network runs once, on the half the
  coupling leaves unchanged (y_a = x_a exactly), and serves both the inverse (shift and scale
  for x_b) and the backward pass (its VJP), instead of once for the inverse and again in a
  recomputed forward. ActNorm and the 1x1 convolution (no hidden activations) are inverted,
  then differentiated generically. Same function and gradients as `jax.vjp` of `step.apply`
  at the rebuilt input.
  """
  params, constants = variables["params"], variables.get("constants", {})
  y_a, y_b = _split_halves(y, "FlowStep")
  g_a, g_b = _split_halves(g_y, "FlowStep")
  out_channels = y_b.shape[-1] * (2 if step.coupling == "affine" else 1)
  couple = affine_couple if step.coupling == "affine" else additive_couple
  net = CouplingNet(step.hidden, out_channels, step.dtype, parent=None)
  net_out, net_vjp = jax.vjp(
      lambda p, x_a: net.apply({"params": p}, x_a), params["layers_2"]["net"], y_a
  )
  z_b = couple(net_out, y_b, True)[0]
  _, couple_vjp = jax.vjp(lambda n, x_b: couple(n, x_b, False), net_out, z_b)
  g_net_out, g_zb = couple_vjp((g_b, g_log_det))
  g_net, g_za = net_vjp(g_net_out)
  grads = {"layers_2": {"net": g_net}}
  x = jnp.concatenate([y_a, z_b], axis=-1)
  g_x = jnp.concatenate([g_a + g_za, g_zb], axis=-1)
  layers = (
      ("layers_1", InvertibleConv1x1(inverse_method="blocks", parent=None)),
      ("layers_0", ActNorm(parent=None)),
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
