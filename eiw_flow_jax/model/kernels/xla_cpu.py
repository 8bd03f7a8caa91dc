"""XLA:CPU forms of the model's matmuls and convolutions: the same functions, computed so that
XLA:CPU hands the products (forward and backward) to its fast matmul library (YNNPACK).

Nothing here chooses a platform: `eiw_flow_jax.model.kernels` (the dispatcher) runs these forms
where the program is compiled for the CPU and the portable ones (`jnp.einsum`, `lax.conv`)
elsewhere.
Which form fits a shape (`conv3x3_takes_matmul_form`, `coupling_net_takes_channels_first`) is
decided here, statically, from shapes alone. Measurements behind each choice are in
docs/performance.md.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

Array = jax.Array
# ((kernel, bias) of the 3x3 input layer, of the 1x1 hidden layer, of the 3x3 output layer): the
# coupling network with its ActNorms and output scale folded in (`eiw_flow_jax.model.kernels`).
CouplingNetLayers = tuple[tuple[Array, Array], tuple[Array, Array], tuple[Array, Array]]

@jax.custom_jvp
def channel_matmul(x: Array, w: Array) -> Array:
  """`x @ w` over the last (channel) axis of `x`, with a derivative rule for XLA:CPU: the 1x1
  layers and the products of `conv3x3_by_matmul` in NHWC (DenseFlow's nets; Glow's coupling
  network where it does not run channels-first, `coupling_net_takes_channels_first`).

  The same product as `jnp.einsum("...c,cd->...d", x, w)` with another derivative rule
  (`_channel_matmul_jvp`), whose kernel gradient XLA:CPU computes as YNNPACK matmuls rather than
  an Eigen dot: the whole CIFAR benchmark train step took 0.72-0.88x the time on a 2-core AMD
  Zen 5, the digits one 0.95-0.99x; blocking its transpose (`transpose_block_rows`) then took the
  CIFAR step to 0.84-0.87x the time on a 2-core Intel Xeon (docs/performance.md).
  """
  return jnp.einsum("...c,cd->...d", x, w)


def _channel_matmul_jvp(primals, tangents):
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
  them; in blocks they stay cached (docs/performance.md). (The blocks as one array
  in a batched matmul instead: XLA's layout assignment folds the transposes back into an Eigen
  dot, or YNNPACK's batched product runs at half rate.) Symbolic-zero tangents (data inputs,
  frozen kernels) skip their term.
  """
  x, w = primals
  dx, dw = tangents
  y = channel_matmul(x, w)
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


channel_matmul.defjvp(_channel_matmul_jvp, symbolic_zeros=True)

# Elements of X per block of its transpose in `_channel_matmul_jvp` (512 KiB in float32):
# 512 rows at 256 channels, 256 at 512. The CIFAR step was as fast with 2**16 to 2**18 on a
# 2-core Intel Xeon, and no faster than unblocked with 2**20 at width 512 (docs/performance.md).
TRANSPOSE_BLOCK_ELEMENTS = 1 << 17
# At most this many blocks (larger ones past it): each block is its own transpose and matmul in
# the compiled program: more blocks compile longer for little more speed (docs/performance.md).
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



def conv3x3_takes_matmul_form(kernel_shape: tuple[int, ...], min_width: int = 256) -> bool:
  """Whether `conv` computes this HWIO kernel by `conv3x3_by_matmul`.

  3x3 kernels with few channels on one side (9 min(C_in, C_out) <= 2 max) and at least
  `min_width` on the other, where the matmul form makes the whole train step faster; with
  fewer channels the two forms are within noise of each other (docs/performance.md), so
  lax.conv stays there.
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



def conv(x: Array, kernel: Array) -> Array:
  """The CPU form of a SAME, stride-1, bias-free convolution of NHWC `x` by HWIO `kernel`.

  A 1x1 kernel is a dot over channels (`channel_matmul`; faster than lax.conv on XLA:CPU). A 3x3
  kernel whose channel counts differ a lot (the coupling network's first and last layers, at
  width 256 and up: `conv3x3_takes_matmul_form`) is one matmul plus nine shifted copies
  (`conv3x3_by_matmul`: a faster Glow train step on CPUs, docs/performance.md);
  other kernels stay `lax.conv_general_dilated`.
  """
  if kernel.shape[:2] == (1, 1):
    return channel_matmul(x, kernel[0, 0])
  if conv3x3_takes_matmul_form(kernel.shape):
    return conv3x3_by_matmul(x, kernel)
  return jax.lax.conv_general_dilated(
      x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


# Narrowest image width (W of NHWC) at which the CPU coupling network runs channels-first: the
# shifts of its 3x3 convolutions then move rows of at least 16 floats. One network forward and
# backward took 0.82-0.87x the NHWC time at widths 16 and 32, 1.00-1.04x at 8, 1.07-1.16x at 4
# (docs/performance.md).
CHANNELS_FIRST_MIN_WIDTH = 16


def coupling_net_takes_channels_first(x_shape: tuple[int, ...], hidden: int,
                                      out_channels: int) -> bool:
  """Whether the CPU form of `CouplingNet` for NHWC input of `x_shape` is
  `coupling_net_channels_first`: when both 3x3 convolutions take the matmul form
  (`conv3x3_takes_matmul_form`: width 256 and up) and the image is at least
  `CHANNELS_FIRST_MIN_WIDTH` wide. A static decision, from shapes alone."""
  _, _, width, channels = x_shape
  return (width >= CHANNELS_FIRST_MIN_WIDTH
          and conv3x3_takes_matmul_form((3, 3, channels, hidden))
          and conv3x3_takes_matmul_form((3, 3, hidden, out_channels)))


def coupling_net_channels_first(layers: CouplingNetLayers, x: Array, dtype: Any) -> Array:
  """`CouplingNet`'s function of its folded layers (`eiw_flow_jax.model.kernels.coupling_net`) with
  the hidden activations stored channels-first, (C, B H W), instead of NHWC.

  Row-major NHWC activations X (N, C) make every kernel gradient X^T dY contract the major axis
  of both operands, which XLA:CPU runs as an Eigen dot unless X is transposed first
  (`channel_matmul`), transposes that cost the step time (docs/performance.md). Channels-first, each
  layer is W^T X (a small transposed kernel times X), its input gradient W dY and its kernel
  gradient dY X^T, a product over the minor axis of both: all three YNNPACK matmuls, with no
  transpose bigger than a kernel (`channels_first_matmul`). Only the coupling network's input
  (C/2 channels) and output (C) change layout. The 3x3 convolutions are the two forms of
  `conv3x3_by_matmul`, the shifts moving along H and W. Same function up to float round-off
  (tests/test_bijectors.py compares it with the layer-by-layer network, values and gradients).
  """
  batch, height, width, _ = x.shape
  offsets = [(i - 1, j - 1) for i in range(3) for j in range(3)]
  (in_kernel, in_bias), (hidden_kernel, hidden_bias), (out_kernel, out_bias) = layers
  out_dtype = jnp.result_type(x, out_bias)
  x = x.astype(dtype)
  # The 3x3 input layer (few inputs): the nine shifted copies of the input stacked, one matmul.
  x_first = x.transpose(3, 0, 1, 2)
  patches = jnp.concatenate([_shift(x_first, di, dj, height_axis=2) for di, dj in offsets])
  h = channels_first_matmul(in_kernel.astype(dtype).reshape(patches.shape[0], -1),
                            patches.reshape(patches.shape[0], -1))
  h = nn.relu(h + in_bias.astype(dtype)[:, None])
  # The 1x1 hidden layer.
  h = channels_first_matmul(hidden_kernel.astype(dtype).reshape(h.shape[0], -1), h)
  h = nn.relu(h + hidden_bias.astype(dtype)[:, None])
  # The zero-initialised 3x3 output layer (few outputs): one matmul to nine output blocks, each
  # shifted into place.
  blocks = channels_first_matmul(
      out_kernel.astype(dtype).transpose(2, 0, 1, 3).reshape(h.shape[0], -1), h,
  ).reshape(len(offsets), out_kernel.shape[-1], batch, height, width)
  out = _shift(blocks[0], *offsets[0], height_axis=2)
  for block, (di, dj) in zip(blocks[1:], offsets[1:]):
    out = out + _shift(block, di, dj, height_axis=2)
  return out.transpose(1, 2, 3, 0).astype(out_dtype) + out_bias


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
