"""Which form of a convolution or coupling network runs: the one dispatcher between the portable
forms (`jnp.einsum`, `lax.conv`: every platform) and the XLA:CPU forms
(`eiw_flow_jax.model.kernels.xla_cpu`: the same functions, computed so XLA:CPU runs them as YNNPACK
matmuls).

`kernels="auto"` (`config.model.kernels`, the default) takes the CPU forms where the program is
compiled for the CPU, "portable" takes the portable forms everywhere (a CPU test of what a TPU
or GPU program computes). Which CPU form fits a shape is decided statically
(`xla_cpu.conv3x3_takes_matmul_form`, `xla_cpu.coupling_net_takes_channels_first`).

Under "auto" the choice is made when the program is lowered, so tracing stages out both forms.
A function jitted for a mesh knows its platform before tracing: `resolve` turns "auto" into
that platform's choice (`AUTO_CPU` or `AUTO_PORTABLE`), and `Flow.for_platform` rebuilds the
model with it (the train, evaluation and sampling steps do), so only that form is traced:
DF-74-10's train step for a v5e:2x2 mesh traces and lowers in about 10.5 s instead of 16.1 here.
The compiled program is the one "auto" gives for that platform, less the zero residuals JAX's
conditionals carry for the form not taken (DF-74-10 on v5e: the same FLOPs, bytes and memory).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from eiw_flow_jax.config.schema import KERNELS
from eiw_flow_jax.model.kernels import xla_cpu
from eiw_flow_jax.model.kernels.xla_cpu import CouplingNetLayers

Array = jax.Array
T = TypeVar("T")


# What "auto" becomes for a program lowered for one platform (`resolve`): the CPU forms, or the
# portable ones, chosen while tracing. Not config values: a config says "auto" or "portable".
AUTO_CPU = "auto:cpu"
AUTO_PORTABLE = "auto:portable"


def check_kernels(kernels: str) -> None:
  if kernels not in (*KERNELS, AUTO_CPU, AUTO_PORTABLE):
    raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}.")


def resolve(kernels: str, platform: str) -> str:
  """`kernels` for a program lowered for `platform` alone ("cpu", "tpu", "gpu", ...): "auto"
  becomes `AUTO_CPU` on the CPU and `AUTO_PORTABLE` elsewhere, so that tracing stages out
  only the form that platform keeps; any other choice stays as it is."""
  check_kernels(kernels)
  if kernels != "auto":
    return kernels
  return AUTO_CPU if platform == "cpu" else AUTO_PORTABLE


def platform_dependent(*operands: Any, cpu: Callable[..., T], portable: Callable[..., T],
                       kernels: str = "auto") -> T:
  """`cpu(*operands)` in a program compiled for the CPU, `portable(*operands)` elsewhere (or
  everywhere with `kernels="portable"`). The two must compute the same function. `AUTO_CPU`
  and `AUTO_PORTABLE` (`resolve`) take one of the two without tracing the other.

  Under "auto" the platform is asked of `jax.lax.platform_dependent`, which stages out both
  branches (both differentiable, in both modes, and batched under vmap like a `lax.switch`) and
  keeps the one for the platform the program is lowered for: a program lowered on this host
  for a TPU (ahead of time, `jax.export`) gets the portable forms, whatever the host's default
  backend. Outside jit it runs the branch of the default device's platform.
  """
  check_kernels(kernels)
  if kernels == "portable":
    return portable(*operands)
  if kernels in (AUTO_CPU, AUTO_PORTABLE):
    # Still a (one-branch) conditional, which the compiler inlines: the program is then the
    # one "auto" gives. Inlined by hand, the form compiled differently: DF-74-10's TPU train
    # step moved 1.8% more bytes by the TPU compiler's count (124.8 GB against 122.5).
    form = cpu if kernels == AUTO_CPU else portable
    return jax.lax.platform_dependent(*operands, default=form)
  return jax.lax.platform_dependent(*operands, cpu=cpu, default=portable)


def portable_conv(x: Array, kernel: Array) -> Array:
  """SAME, stride-1, bias-free convolution of NHWC `x` by HWIO `kernel`; a 1x1 kernel is a dot."""
  if kernel.shape[:2] == (1, 1):
    return jnp.einsum("...c,cd->...d", x, kernel[0, 0])
  return jax.lax.conv_general_dilated(
      x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def apply_conv(x: Array, kernel: Array, dtype: Any = None, kernels: str = "auto") -> Array:
  """SAME, stride-1, bias-free convolution of NHWC `x` by HWIO `kernel`, computed in `dtype`
  (None: the dtype `x` and `kernel` promote to), in the platform's form: on CPU `xla_cpu.conv`
  (1x1 kernels and 3x3 ones of the matmul form: matmuls), elsewhere `portable_conv`."""
  dtype = dtype or jnp.result_type(x, kernel)
  x, kernel = x.astype(dtype), kernel.astype(dtype)
  if kernel.shape[:2] != (1, 1) and not xla_cpu.conv3x3_takes_matmul_form(kernel.shape):
    return portable_conv(x, kernel)  # the CPU form is the same convolution
  return platform_dependent(x, kernel, cpu=xla_cpu.conv, portable=portable_conv, kernels=kernels)


def coupling_net(layers: CouplingNetLayers, x: Array, dtype: Any = None,
                 kernels: str = "auto") -> Array:
  """Glow's coupling network of its folded layers (`CouplingNetLayers`):
  relu(conv(x) + b) twice, then conv(h) + b, in the platform's form.

  Computes in `dtype` (None: the dtype `x` and the parameters promote to) and returns the dtype
  `x` and the parameters promote to, so a bfloat16 network returns float32 (from float32 input).
  On CPU: channels-first (`xla_cpu.coupling_net_channels_first`) where
  `xla_cpu.coupling_net_takes_channels_first`, else NHWC with `xla_cpu.conv`'s forms.
  """
  in_kernel = layers[0][0]
  dtype = dtype or jnp.result_type(x, in_kernel)
  hidden, out_channels = in_kernel.shape[-1], layers[2][0].shape[-1]
  if xla_cpu.coupling_net_takes_channels_first(x.shape, hidden, out_channels):
    cpu_form = functools.partial(xla_cpu.coupling_net_channels_first, dtype=dtype)
  else:
    cpu_form = functools.partial(_coupling_net_nhwc, dtype=dtype, conv=xla_cpu.conv)
  portable_form = functools.partial(_coupling_net_nhwc, dtype=dtype, conv=portable_conv)
  return platform_dependent(layers, x, cpu=cpu_form, portable=portable_form, kernels=kernels)


# Names of the coupling network's values that memory="remat_wide" keeps for the backward pass
# (`jax.checkpoint` policy, eiw_flow_jax.model.memory): the wide hidden activation (the 1x1
# layer's output, hidden-width channels) and the network's output.
COUPLING_WIDE = "coupling_net_wide"
COUPLING_OUT = "coupling_net_out"


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def relu(x: Array, name: str | None = None) -> Array:
  """`nn.relu`, whose derivative is written on its output, named `name` for `jax.checkpoint`
  policies (`checkpoint_name`): relu'(x) = [relu(x) > 0], which is [x > 0] (0 at 0, as
  `nn.relu`). The same function and derivative; what changes is what the backward pass needs:
  the output, which a policy keeping `name` provides (memory="remat_wide"), where `nn.relu`'s
  rule needs its input, which would be recomputed through the layer before it."""
  return jnp.maximum(x, 0)


@relu.defjvp
def _relu_jvp(name: str | None, primals: tuple[Array], tangents: tuple[Array]
              ) -> tuple[Array, Array]:
  y = jnp.maximum(primals[0], 0)
  if name is not None:
    y = checkpoint_name(y, name)
  return y, jnp.where(y > 0, tangents[0], jnp.zeros_like(tangents[0]))


def _coupling_net_nhwc(layers: CouplingNetLayers, x: Array, dtype: Any,
                       conv: Callable[[Array, Array], Array]) -> Array:
  (in_kernel, in_bias), (hidden_kernel, hidden_bias), (out_kernel, out_bias) = layers
  out_dtype = jnp.result_type(x, out_bias)
  h = x.astype(dtype)
  h = relu(conv(h, in_kernel.astype(dtype)) + in_bias.astype(dtype))
  h = relu(conv(h, hidden_kernel.astype(dtype)) + hidden_bias.astype(dtype), COUPLING_WIDE)
  return checkpoint_name(conv(h, out_kernel.astype(dtype)).astype(out_dtype) + out_bias,
                         COUPLING_OUT)
