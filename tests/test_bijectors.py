"""Every bijector: exact inverse, and log-det equal to log|det J| from jax.jacfwd."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ON_PINNED_COMPILER, log_abs_det_jacobian, perturb

from eiw_flow_jax.model import bijectors
from eiw_flow_jax.model.bijectors import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    FlowStep,
    InvertibleConv1x1,
    Shift,
    Squeeze,
    UniformDequantize,
)
from eiw_flow_jax.model.kernels import xla_cpu
from eiw_flow_jax.model.kernels.xla_cpu import (
    channel_matmul,
    conv3x3_by_matmul,
    conv3x3_takes_matmul_form,
    transpose_block_rows,
)
from eiw_flow_jax.model.splits import EIWGlobalSplit, EIWPerExampleSplit, VanillaSplit

SHAPE = (3, 4, 4, 4)  # B, H, W, C: tiny, so the 64x64 Jacobian is cheap

BIJECTORS = {
    "dequantize": lambda: UniformDequantize(n_bits=8),
    "centre": lambda: Shift(-0.5),
    "squeeze": Squeeze,
    "actnorm": ActNorm,
    "conv1x1": InvertibleConv1x1,
    "affine_coupling": lambda: AffineCoupling(hidden=8),
    # Wide enough that both 3x3 convolutions take the matmul form (conv3x3_by_matmul on CPU).
    "affine_coupling_wide": lambda: AffineCoupling(hidden=256),
    "additive_coupling": lambda: AdditiveCoupling(hidden=8),
    "flow_step": lambda: FlowStep(hidden=8, coupling="affine"),
}


def _input(seed=0):
  return 0.7 * jax.random.normal(jax.random.PRNGKey(seed), SHAPE) + 0.3


def _init_perturbed(module, x, method):
  variables = module.init({"params": jax.random.PRNGKey(1)}, x, method=method)
  return perturb(variables, jax.random.PRNGKey(2), scale=0.2)


def _check_bijector(forward, inverse, x):
  y, log_det = forward(x)
  x_back, inverse_log_det = inverse(y)
  assert log_det.shape == (x.shape[0],)
  np.testing.assert_allclose(x_back, x, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(inverse_log_det, -log_det, rtol=1e-5, atol=1e-5)
  for i in range(x.shape[0]):
    expected = log_abs_det_jacobian(lambda v: forward(v[None])[0][0], x[i])
    np.testing.assert_allclose(log_det[i], expected, rtol=1e-4, atol=1e-4 * x[i].size)


@pytest.mark.parametrize("name", sorted(BIJECTORS))
def test_bijector_inverse_and_log_det(name):
  module = BIJECTORS[name]()
  x = _input()
  variables = _init_perturbed(module, x, "forward_and_log_det")

  def forward(v):
    return module.apply(variables, v, method="forward_and_log_det")

  def inverse(v):
    return module.apply(variables, v, method="inverse_and_log_det")

  _check_bijector(forward, inverse, x)


SPLITS = {
    "vanilla": lambda: VanillaSplit(4),
    "eiw_global": lambda: EIWGlobalSplit(4, reduction=2),
    "eiw_per_example": lambda: EIWPerExampleSplit(4, anchor_width=1, solver_width=8),
    "eiw_per_example_vp": lambda: EIWPerExampleSplit(
        4, anchor_width=1, solver_width=8, volume_preserving=True
    ),
}


@pytest.mark.parametrize("name", sorted(SPLITS))
def test_split_is_a_bijection_with_exact_log_det(name):
  """The split's map z -> (kept, factored) as one bijector: (kept | factored) on channels."""
  module = SPLITS[name]()
  x = _input(seed=3)
  variables = _init_perturbed(module, x, lambda m, z: m.split(z))

  def forward(z):
    out = module.apply(variables, z, method=lambda m, z: m.split(z))
    return jnp.concatenate([out.kept, out.factored], axis=-1), out.log_det

  def inverse(z):
    return module.apply(variables, z[..., :2], z[..., 2:], method=lambda m, k, f: m.merge(k, f))

  _check_bijector(forward, inverse, x)


def test_actnorm_data_dependent_init_normalises_the_init_batch():
  x = 3.0 * _input() + 5.0
  module = ActNorm()
  variables = module.init({"params": jax.random.PRNGKey(0)}, x, method="forward_and_log_det")
  y, _ = module.apply(variables, x, method="forward_and_log_det")
  np.testing.assert_allclose(jnp.mean(y, axis=(0, 1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(jnp.std(y, axis=(0, 1, 2)), 1.0, atol=1e-4)


def test_conv1x1_constants_are_a_permutation_and_log_det_is_from_log_s():
  module = InvertibleConv1x1()
  x = _input()
  variables = module.init({"params": jax.random.PRNGKey(0)}, x, method="forward_and_log_det")
  perm = np.asarray(variables["constants"]["permutation"])
  np.testing.assert_array_equal(np.sort(perm.sum(0)), np.ones(4))
  np.testing.assert_array_equal(perm @ perm.T, np.eye(4))
  _, log_det = module.apply(variables, x, method="forward_and_log_det")
  expected = 16 * jnp.sum(variables["params"]["log_s"])
  np.testing.assert_allclose(log_det, expected, rtol=1e-6)


def test_couplings_start_as_identity():
  x = _input()
  for cls in (AffineCoupling, AdditiveCoupling):
    module = cls(hidden=8)
    variables = module.init({"params": jax.random.PRNGKey(0)}, x, method="forward_and_log_det")
    y, log_det = module.apply(variables, x, method="forward_and_log_det")
    if cls is AffineCoupling:  # sigmoid(0 + 2) scale at init, shift 0
      np.testing.assert_allclose(y[..., 2:], x[..., 2:] * jax.nn.sigmoid(2.0), rtol=1e-6)
    else:
      np.testing.assert_allclose(y, x, rtol=1e-6)
    np.testing.assert_allclose(y[..., :2], x[..., :2])


@pytest.mark.parametrize("module", [AffineCoupling(hidden=4), ActNorm(), InvertibleConv1x1()])
def test_bijectors_reject_bad_rank(module):
  with pytest.raises(ValueError, match="rank-4"):
    module.init(
        {"params": jax.random.PRNGKey(0)}, jnp.zeros((4, 4, 4)), method="forward_and_log_det"
    )


def test_coupling_rejects_single_channel():
  with pytest.raises(ValueError, match="at least 2 channels"):
    AffineCoupling(hidden=4).init(
        {"params": jax.random.PRNGKey(0)}, jnp.zeros((1, 2, 2, 1)), method="forward_and_log_det"
    )


@pytest.mark.parametrize("cls", [VanillaSplit, EIWGlobalSplit, EIWPerExampleSplit])
def test_splits_reject_odd_channels(cls):
  with pytest.raises(ValueError, match="even number of channels"):
    cls(5).init({"params": jax.random.PRNGKey(0)}, jnp.zeros((1, 2, 2, 5)), method="split")


def test_split_rejects_wrong_channel_count():
  with pytest.raises(ValueError, match="expected 4 channels"):
    VanillaSplit(4).init({"params": jax.random.PRNGKey(0)}, jnp.zeros((1, 2, 2, 6)), method="split")


@pytest.mark.parametrize("anchor", [0, 2, 3])
def test_per_example_split_rejects_anchor_out_of_range(anchor):
  with pytest.raises(ValueError, match="anchor width"):
    EIWPerExampleSplit(4, anchor_width=anchor).init(
        {"params": jax.random.PRNGKey(0)}, jnp.zeros((1, 2, 2, 4)), method="split"
    )


def test_matmul_form_routing_rule():
  takes = conv3x3_takes_matmul_form
  assert takes((3, 3, 2, 256)) and takes((3, 3, 256, 12)) and takes((3, 3, 48, 512))
  # The wide coupling case above: its first (C/2 -> 256) and last (256 -> C) convolutions.
  c = SHAPE[-1]
  assert takes((3, 3, c // 2, 256)) and takes((3, 3, 256, 2 * (c - c // 2)))
  assert not takes((3, 3, 6, 128))  # narrow: lax.conv (within +-8% there)
  assert not takes((3, 3, 64, 256))  # balanced channels
  assert not takes((1, 1, 2, 256))  # 1x1: a dot anyway
  assert takes((3, 3, 6, 128), min_width=0)  # the benchmark's any-width candidates


@pytest.mark.parametrize("blocks", [1, 3])
def test_channel_matmul_has_the_plain_einsums_derivatives(blocks, monkeypatch):
  """Its CPU derivative rule (the kernel gradient from a materialised x^T, in one block or in
  several) gives the same gradients, Jacobians and Hessians as the plain einsum, with either
  input held fixed too."""
  if blocks > 1:  # 18 rows of 4 channels in blocks of 6 rows
    monkeypatch.setattr(xla_cpu, "TRANSPOSE_BLOCK_ELEMENTS", 24)
    monkeypatch.setattr(xla_cpu, "MIN_TRANSPOSE_BLOCK_ROWS", 1)
  assert 18 // transpose_block_rows(18, 4) == blocks
  kx, kw = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(kx, (2, 3, 3, 4))
  w = jax.random.normal(kw, (4, 5))

  def plain(x, w):
    return jnp.sum(jnp.sin(jnp.einsum("bhwc,cd->bhwd", x, w)))

  def ours(x, w):
    return jnp.sum(jnp.sin(channel_matmul(x, w)))

  np.testing.assert_allclose(channel_matmul(x, w), jnp.einsum("bhwc,cd->bhwd", x, w),
                             rtol=1e-6, atol=1e-6)
  if jax.default_backend() == "cpu":  # the rule in use: one barrier'd transpose per block
    jaxpr = str(jax.make_jaxpr(jax.grad(ours, argnums=1))(x, w))
    assert jaxpr.count("optimization_barrier") == blocks
  for derivative in (jax.grad, jax.jacfwd, jax.jacrev):
    for argnums in ((0, 1), 0, 1):
      got = derivative(ours, argnums=argnums)(x, w)
      want = derivative(plain, argnums=argnums)(x, w)
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jax.hessian(ours, argnums=1)(x, w),
                             jax.hessian(plain, argnums=1)(x, w), rtol=1e-5, atol=1e-5)
  grads = jax.jit(jax.vmap(jax.grad(ours, argnums=1), in_axes=(0, None)))(x[:, None], w)
  assert grads.shape == (2, 4, 5)
  low = jax.grad(lambda w: jnp.sum(channel_matmul(x.astype(jnp.bfloat16), w)))(
      w.astype(jnp.bfloat16))
  assert low.dtype == jnp.bfloat16


def test_transpose_block_rows():
  """Blocks divide the rows and hold at most TRANSPOSE_BLOCK_ELEMENTS, unless that would take
  more than MAX_TRANSPOSE_BLOCKS blocks; small inputs, and rows with no divisor of a useful
  size, stay one block."""
  budget, most = xla_cpu.TRANSPOSE_BLOCK_ELEMENTS, xla_cpu.MAX_TRANSPOSE_BLOCKS
  assert transpose_block_rows(4096, 256) == budget // 256  # CIFAR level 0, width 256
  assert transpose_block_rows(4096, 512) == budget // 512
  assert transpose_block_rows(16384, 512) == 16384 // most  # the cap: larger blocks
  assert transpose_block_rows(256, 256) == 256  # small enough: one block
  assert transpose_block_rows(4099, 256) == 4099  # prime: no divisor fits
  assert transpose_block_rows(2 * 4099, 256) == 4099  # none within the budget: the smallest
  assert transpose_block_rows(37 * 61, 256) == 37 * 61  # no divisor of 64 rows or more
  assert transpose_block_rows(100, 4 * budget) == 100  # one row exceeds the budget
  for rows, channels in [(3136, 256), (4096, 54), (4096, 108), (16 * 24 * 24, 320),
                         (64 * 32 * 32, 256)]:
    block = transpose_block_rows(rows, channels)
    assert rows % block == 0 and rows // block <= most
    assert block * channels <= budget or rows // block == most
    assert block >= xla_cpu.MIN_TRANSPOSE_BLOCK_ROWS


def _standalone_dots(hlo: str) -> int:
  """Dots in the entry computation and in non-fusion computations of compiled HLO text: XLA:CPU
  runs those as Eigen dots; fused bodies (YNNPACK fusions hold their dot inside) are left out."""
  dots, in_fusion = 0, False
  for line in hlo.splitlines():
    if line and not line.startswith(" "):
      in_fusion = "fused" in line or "ynn" in line.lower()
    elif not in_fusion and " dot(" in line:
      dots += 1
  return dots


@pytest.mark.compiler_output
@pytest.mark.parametrize("shape", [(4, 8, 8, 256), (16, 16, 16, 256)])
def test_channel_matmul_kernel_gradient_is_not_an_eigen_dot_on_cpu(shape):
  """The point of its derivative rule: on XLA:CPU the kernel gradient X^T dY compiles to
  YNNPACK fusions, not to a standalone (Eigen) dot over transposed operands, as plain autodiff
  of the einsum does with this jaxlib; with X in blocks (the larger shape) too, where no
  (C, N) transpose of the whole X is left. Checked against the plain einsum, so a jaxlib that
  compiles both alike skips instead of failing."""
  if jax.default_backend() != "cpu":
    pytest.skip("the derivative rule is CPU-only")
  x, w = jnp.ones(shape), jnp.ones((256, 256))
  rows = int(np.prod(shape[:-1]))

  def compiled(f):
    return jax.jit(jax.grad(lambda w: jnp.sum(f(x, w) ** 2))).lower(w).compile().as_text()

  def standalone_dots(f):
    return _standalone_dots(compiled(f))

  plain = standalone_dots(lambda x, w: jnp.einsum("bhwc,cd->bhwd", x, w))
  if plain == 0:
    pytest.skip("this jaxlib compiles the plain einsum's kernel gradient without an Eigen dot")
  assert standalone_dots(channel_matmul) == 0
  block = transpose_block_rows(rows, 256)
  hlo = compiled(channel_matmul)
  assert f"f32[256,{block}]" in hlo
  if block < rows:
    assert f"f32[256,{rows}]" not in hlo


@pytest.mark.parametrize("cin,cout", [(3, 32), (32, 3)])
def test_conv3x3_by_matmul_is_lax_conv_in_value_and_both_autodiff_modes(cin, cout):
  """Few inputs (im2col) and few outputs (nine shifted output blocks): same values, VJP and
  JVP as lax.conv_general_dilated with SAME padding, border pixels included."""
  kx, kk, kg = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (2, 5, 6, cin))
  kernel = jax.random.normal(kk, (3, 3, cin, cout))

  def reference(x, kernel):
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

  want, want_vjp = jax.vjp(reference, x, kernel)
  got, got_vjp = jax.vjp(conv3x3_by_matmul, x, kernel)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  cotangent = jax.random.normal(kg, want.shape)
  for a, b in zip(got_vjp(cotangent), want_vjp(cotangent)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
  tangents = (jnp.ones_like(x), 0.1 * kernel)
  np.testing.assert_allclose(jax.jvp(conv3x3_by_matmul, (x, kernel), tangents)[1],
                             jax.jvp(reference, (x, kernel), tangents)[1], rtol=1e-5, atol=1e-4)


# (16, 4): lax.conv; (256, 4): the 3x3s in matmul form; (256, 16): channels-first on CPU.
@pytest.mark.parametrize("hidden,size", [(16, 4), (256, 4), (256, 16)])
def test_coupling_net_is_the_unfolded_conv_actnorm_relu_network(hidden, size):
  """Folding each ActNorm (and the zero convolution's output scale) into the convolution before
  it, and the channels-first form, change neither the function nor its derivatives: CouplingNet
  against Glow's network written out layer by layer with the same (perturbed, non-identity)
  parameters, in value, parameter and input gradients, and forward mode."""
  net = bijectors.CouplingNet(hidden=hidden, out_channels=4)
  kx, kp = jax.random.split(jax.random.PRNGKey(3))
  x = jax.random.normal(kx, (2, size, size, 3))
  on_cpu = jax.default_backend() == "cpu"
  assert xla_cpu.coupling_net_takes_channels_first(x.shape, hidden, 4) == (
      on_cpu and size == 16 and hidden == 256)
  params = perturb(net.init(jax.random.PRNGKey(0), x), kp)["params"]

  def conv(h, kernel):
    return jax.lax.conv_general_dilated(
        h, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision="highest")

  def actnorm(h, p):
    return (h + p["bias"]) * jnp.exp(p["log_scale"])

  def unfolded(params, x=x):
    h = jax.nn.relu(actnorm(conv(x, params["Conv_0"]["kernel"]), params["ActNorm_0"]))
    h = jax.nn.relu(actnorm(conv(h, params["Conv_1"]["kernel"]), params["ActNorm_1"]))
    zero = params["ZeroConv_0"]
    return (conv(h, zero["Conv_0"]["kernel"]) + zero["Conv_0"]["bias"]) * jnp.exp(3 * zero["logs"])

  def folded(params, x=x):
    return net.apply({"params": params}, x)

  np.testing.assert_allclose(folded(params), unfolded(params), rtol=1e-4, atol=1e-4)
  got = jax.grad(lambda p, x: jnp.sum(jnp.sin(folded(p, x))), argnums=(0, 1))(params, x)
  want = jax.grad(lambda p, x: jnp.sum(jnp.sin(unfolded(p, x))), argnums=(0, 1))(params, x)
  np.testing.assert_allclose(got[1], want[1], rtol=2e-3, atol=2e-3)
  for path, leaf in jax.tree_util.tree_leaves_with_path(got[0]):
    reference = want[0]
    for key in path:
      reference = reference[key.key]
    np.testing.assert_allclose(leaf, reference, rtol=2e-3, atol=2e-3,
                               err_msg=jax.tree_util.keystr(path))
  tangents = (jax.tree.map(lambda a: 0.1 * jnp.ones_like(a), params), jnp.ones_like(x))
  np.testing.assert_allclose(jax.jvp(folded, (params, x), tangents)[1],
                             jax.jvp(unfolded, (params, x), tangents)[1], rtol=2e-3, atol=2e-3)


@pytest.mark.compiler_output
def test_scale_output_channels_gradient_reduces_a_2d_view():
  """The per-channel scale's gradient of a folded 1x1 kernel is a sum over axis 0 of (C, D),
  not over axis 2 of (1, 1, C, D), which XLA:CPU ran about 10x slower (docs/performance.md)."""
  kernel, scale, x = jnp.ones((1, 1, 64, 32)), jnp.zeros((32,)), jnp.ones((128, 64))
  np.testing.assert_array_equal(bijectors.scale_output_channels(kernel, scale + 2.0),
                                kernel * 2.0)

  def loss(kernel, scale, x):  # all arguments: constants would be folded differently
    return jnp.sum(jnp.tanh(x @ bijectors.scale_output_channels(kernel, jnp.exp(scale))[0, 0]))

  hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(kernel, scale, x).compile().as_text()
  reduces = [line for line in hlo.splitlines() if " reduce(" in line]
  assert reduces, "expected the scale's gradient to be a reduce"
  assert not [line for line in reduces if "f32[1,1," in line], reduces


@pytest.mark.compiler_output
def test_channels_first_coupling_net_gradient_has_no_activation_transpose_or_eigen_dot():
  """The point of the channels-first form: its compiled gradient (parameters and input) holds no
  transpose as large as the hidden activations, and no Eigen dot; the NHWC form at the same
  size transposes them (for `channel_matmul`'s kernel gradients)."""
  if jax.default_backend() != "cpu":
    pytest.skip("the channels-first form is CPU-only")
  net = bijectors.CouplingNet(hidden=256, out_channels=12)
  x = jnp.ones((2, 16, 16, 6))
  params = net.init(jax.random.PRNGKey(0), x)["params"]
  activation_elements = 2 * 16 * 16 * 256

  def compiled():
    loss = jax.grad(lambda p, x: jnp.sum(jnp.sin(net.apply({"params": p}, x))), argnums=(0, 1))
    return jax.jit(loss).lower(params, x).compile().as_text()

  def large_transposes(hlo):
    found = []
    for line in hlo.splitlines():
      match = re.search(r"^\s*(?:ROOT )?%?(\S+) = f32\[([\d,]+)\]\S* (transpose|fusion)\(", line)
      if not match:
        continue
      name, dims, op = match.groups()
      is_transpose = op == "transpose" or "transpose" in name  # a transpose_copy_fusion
      if is_transpose and math.prod(int(d) for d in dims.split(",")) >= activation_elements:
        found.append(line.strip()[:100])
    return found

  assert xla_cpu.coupling_net_takes_channels_first(x.shape, 256, 12)
  hlo = compiled()
  assert not large_transposes(hlo), large_transposes(hlo)
  assert _standalone_dots(hlo) == 0
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(xla_cpu, "CHANNELS_FIRST_MIN_WIDTH", 10**6)
    assert large_transposes(compiled()), "expected the NHWC form to transpose the activations"


@pytest.mark.parametrize("size", [4, 16])  # 16: channels-first on CPU
def test_coupling_net_mixed_precision_computes_low_and_returns_float32(size):
  """`dtype=bfloat16`: the network computes in bfloat16 in both layouts, returns float32 close
  to the float32 network's output, and its parameter gradients stay float32."""
  net32 = bijectors.CouplingNet(hidden=256, out_channels=4)
  net16 = bijectors.CouplingNet(hidden=256, out_channels=4, dtype=jnp.bfloat16)
  kx, kp = jax.random.split(jax.random.PRNGKey(5))
  x = jax.random.normal(kx, (2, size, size, 3))
  params = perturb(net32.init(jax.random.PRNGKey(0), x), kp)["params"]
  want = net32.apply({"params": params}, x)
  got = net16.apply({"params": params}, x)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=0.05, atol=0.05 * float(jnp.max(jnp.abs(want))))
  if ON_PINNED_COMPILER:  # the compiled program's shapes: checked on the pinned jaxlib only
    hlo = jax.jit(lambda p: net16.apply({"params": p}, x)).lower(params).compile().as_text()
    hidden = "bf16[256,512]" if size == 16 and jax.default_backend() == "cpu" else (
        f"bf16[2,{size},{size},256]")  # the hidden activations, channels-first or NHWC
    assert hidden in hlo
  grads = jax.grad(lambda p: jnp.sum(net16.apply({"params": p}, x)))(params)
  assert {leaf.dtype for leaf in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
