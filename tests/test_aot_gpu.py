"""Ahead-of-time compiles for GPU topologies (eiw_flow_jax.aot), deviceless, by XLA's GPU
compiler in JAX's CUDA plugin (`pip install -e ".[gpu-aot]"`: jax[cuda12], ~5.5 GB). CI does not
install it (README, "Before renting"): the tests that compile skip without it, with a reason
naming the extra; the topology names, the GPU figures, the refusal's wording and the table run
everywhere. With the plugin the compiles take most of this module's time (docs/gpu.md), so
each program is compiled once and checked several ways."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from conftest import REPO, reduced_cifar_config

from eiw_flow_jax import aot
from eiw_flow_jax.aot import chips, compiler, report, topology
from eiw_flow_jax.commands import aot as aot_command
from eiw_flow_jax.model.flow import build_flow
from eiw_flow_jax.training import optimizer, sharding, train_state

WITHOUT_PLUGIN = ("JAX's CUDA plugin is not installed: pip install -e \".[gpu-aot]\" (jax[cuda12], "
                  "~5.5 GB; CI does not install it)")
needs_gpu_compiler = pytest.mark.skipif(not topology.gpu_compiler_available(),
                                        reason=WITHOUT_PLUGIN)
H100 = chips.GPUS["h100"]


def _aot(env, *args, timeout=900):
  return subprocess.run(
      [sys.executable, "-m", "eiw_flow_jax.aot", *args], env=env, cwd=REPO,
      capture_output=True, text=True, timeout=timeout)


def _fields(stdout: str) -> dict[str, str]:
  return dict(line.strip().split(": ", 1) for line in stdout.splitlines() if ": " in line)


def _three_by_three_kernels(config, mesh) -> int:
  """3x3 kernels of the model, stacked per level along leading axes (K steps)."""
  state = train_state.abstract_state(build_flow(config), optimizer.make_optimizer(config), mesh)
  return sum(math.prod(leaf.shape[:-4]) for leaf in jax.tree.leaves(state.params)
             if leaf.ndim >= 4 and leaf.shape[-4:-2] == (3, 3))


# ----------------------------------------------------------------------------------------------
# Everywhere: names, figures, wording.

@pytest.mark.parametrize("name", ["h300:8", "a100:8", "rtx4090:1x1x8"])
def test_an_unknown_gpu_is_one_line_naming_the_known_ones(env, name):
  result = _aot(env, "--config=configs/digits.py", f"--topology={name}", timeout=300)
  assert result.returncode == 1 and result.stdout == ""
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr[-3000:]
  assert lines[0] == (
      f"error: unknown accelerator {name.split(':')[0]!r} in --topology={name}: the GPUs known "
      "are h100, h200, a100-80g, a100-40g, l4 (e.g. h100:8); TPUs go by JAX's names (v4, v5e, "
      "v5p, v6e: v5e:2x2).")


@pytest.mark.parametrize("text, num_slices, shape", [
    ("8", 1, (1, 1, 8)), ("2x8", 1, (1, 2, 8)), ("1x2x8", 1, (1, 2, 8)),
    ("4x2x8", 1, (4, 2, 8)), ("2x8", 3, (3, 2, 8)), ("8", 2, (2, 1, 8)),
])
def test_gpu_topologies_are_gpus_hosts_and_partitions(text, num_slices, shape):
  dims = [int(n) for n in text.split("x")]
  assert topology._gpu_shape(f"h100:{text}", dims, num_slices) == shape


@pytest.mark.parametrize("name, message", [
    ("h100:1x2x8", "names its partitions already: drop --num_slices"),
    ("h100:0x8", "every count must be >= 1"),
    ("h100:1x1x1x8", "--topology must look like v5e:2x2"),
    ("h100", "--topology must look like v5e:2x2 or v4:2x2x1 (TPU: version:chips per axis) or "
             "h100:8, h100:2x8 (GPU: name:[hosts x] GPUs per host), got 'h100'"),
    ("H100:8", "--topology must look like v5e:2x2"),
])
def test_a_bad_gpu_topology_is_an_error_naming_it(monkeypatch, name, message):
  monkeypatch.setattr(topology, "gpu_compiler_available", lambda: True)
  num_slices = 2 if name == "h100:1x2x8" else 1
  with pytest.raises(aot.AotError, match=re.escape(message)):
    topology.resolve(name, num_slices)


def test_without_the_cuda_plugin_the_error_names_the_extra(monkeypatch):
  monkeypatch.setattr(topology, "gpu_compiler_available", lambda: False)
  with pytest.raises(aot.AotError, match=re.escape(
      "compiling for a GPU topology needs JAX's CUDA plugin (jax[cuda12] of the installed jax "
      f"{jax.__version__}, ~5.5 GB): pip install -e \".[gpu-aot]\".")):
    topology.resolve("h100:8")


def test_the_gpu_memory_fraction_is_jaxs_variable_or_its_default():
  assert topology.gpu_memory_fraction({}) == 0.75 == chips.DEFAULT_GPU_MEMORY_FRACTION
  assert topology.gpu_memory_fraction({"XLA_PYTHON_CLIENT_MEM_FRACTION": ".9"}) == 0.9
  assert topology.gpu_memory_fraction({"XLA_CLIENT_MEM_FRACTION": "0.5"}) == 0.5
  with pytest.raises(aot.AotError, match="set one of XLA_CLIENT_MEM_FRACTION and "
                                         "XLA_PYTHON_CLIENT_MEM_FRACTION: JAX refuses both"):
    topology.gpu_memory_fraction({"XLA_CLIENT_MEM_FRACTION": "0.5",
                                  "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9"})
  for bad in ("0", "1.5", "most"):
    with pytest.raises(aot.AotError, match=f"XLA_CLIENT_MEM_FRACTION must be a fraction in "
                                           f"\\(0, 1\\], got '{bad}'"):
      topology.gpu_memory_fraction({"XLA_CLIENT_MEM_FRACTION": bad})


# Published FP32 (non-tensor) peaks of the datasheets chips.GPUS cites, which the SM count, FP32
# lanes and clock must give back: a check on the transcribed figures.
FP32_PEAK = {"h100": 67e12, "h200": 67e12, "a100-80g": 19.5e12, "a100-40g": 19.5e12,
             "l4": 30.3e12}


@pytest.mark.parametrize("name", sorted(chips.GPUS))
def test_each_gpus_figures_agree_with_its_datasheet(name):
  gpu = chips.GPUS[name]
  assert gpu.sm_count * gpu.fp32_lanes_per_sm * 2 * gpu.boost_clock_ghz * 1e9 == pytest.approx(
      FP32_PEAK[name], rel=0.01)
  # Dense tensor-core peaks: BF16 twice TF32 on these GPUs; the published memory (GB) within
  # 10% of what the CUDA driver reports.
  assert gpu.bf16_flops == pytest.approx(2 * gpu.tf32_flops, rel=0.01)
  published_gb = float(gpu.memory.split()[0])
  assert 0.9 * published_gb * 1e9 < gpu.memory_bytes < 1.1 * published_gb * 1e9
  assert gpu.usable_bytes(0.75) == int(0.75 * gpu.memory_bytes)
  assert gpu.peak_flops("float32") == (gpu.tf32_flops, "TF32 dense")
  assert gpu.peak_flops("bfloat16") == (gpu.bf16_flops, "BF16 dense")
  text = gpu.target_config((9, 8, 0), (12, 9, 0))
  major, minor = gpu.compute_capability
  for line in (f"core_count: {gpu.sm_count}", f"device_memory_size: {gpu.memory_bytes}",
               f"cuda_compute_capability {{ major: {major} minor: {minor} }}",
               "dnn_version_info { major: 9 minor: 8 patch: 0 }",
               f'device_description_str: "{gpu.device_kind}"'):
    assert line in text


def test_h100_figures():
  assert (H100.tf32_flops, H100.bf16_flops, H100.memory_bytes_per_s) == (494.5e12, 989.5e12,
                                                                          3.35e12)
  assert H100.usable_bytes(0.75) / chips.GiB == pytest.approx(59.33, abs=0.01)


def _fake_gpu_report(batch: int, *, gpu: str = "a100-40g", per_image: int = 2**20,
                     fixed: int = 2**30, dtype: str = "float32") -> report.AotReport:
  """A GPU report as the compiler would give for `fixed` + `per_image` x batch bytes: XLA's
  GPU compiler does not refuse, it compiles and the report compares."""
  spec = chips.GPUS[gpu]
  total = fixed + per_image * batch
  fake = report.AotReport(
      config_name="fake", topology=f"{gpu}:8", num_slices=1, num_devices=8,
      device_kind=spec.device_kind, chip=spec, hbm_bytes=spec.usable_bytes(0.75),
      per_device_batch=batch, global_batch=8 * batch, num_train_steps=1000, eval_batch=256,
      dtype=dtype, compile_seconds=1.0, flops=1e12, bytes_accessed=1e9,
      state_bytes={"params": 2**27, "ema": 2**27, "optimizer": 2**28, "constants": 0},
      platform="gpu", memory_fraction=0.75)
  fake.train = report.ProgramMemory(arguments=fixed, outputs=fixed, aliased=fixed,
                                    temporaries=total - fixed, code=0)
  return fake


def test_the_gpu_refusal_says_what_to_change():
  fits, over, far_over = (_fake_gpu_report(b) for b in (1024, 30 * 1024, 60 * 1024))
  assert fits.fits and not over.fits and not far_over.fits
  # 31 GiB of the A100 40GB's 39.42: 0.79 of it, within what JAX's allocator can be given.
  assert over.one_line() == (
      "error: does not fit: fake at 30720 images per device on a100-40g:8 needs 31.00 GiB per "
      "device, JAX's allocator may use 29.57 GiB of an A100 SXM4 40GB (0.75 of 39.42 GiB) "
      "(train step 31.00 GiB). Lower --per_device_batch, or use config.model.memory='remat' or "
      "'invert', or config.model.dtype='bfloat16', or let JAX's allocator take more of each "
      "GPU: XLA_CLIENT_MEM_FRACTION=0.79 for the training job and this check.")
  assert far_over.one_line().endswith("or config.model.dtype='bfloat16'.")  # 61 GiB: no share
  big_state = _fake_gpu_report(1)
  big_state.state_bytes["optimizer"] = 40 * chips.GiB
  assert big_state.one_line().endswith(
      "The train state alone (parameters, EMA, optimizer state) takes 40.25 GiB per device: a "
      "smaller model, or GPUs with more memory.")


def test_the_gpu_table_and_roofline():
  row = report.table_row(_fake_gpu_report(64, gpu="h100"))
  # 1e12 FLOPs at 494.5 TFLOP/s TF32: 2.0 ms a step (memory: 1e9 B at 3.35 TB/s, 0.3 ms).
  assert row == ("fake", "h100:8", "64", "y", "1.06", "59.33", "2.0 ms", "1000", "2.0 s", "n/a")
  bf16 = _fake_gpu_report(64, gpu="h100", dtype="bfloat16")
  assert bf16.roofline == pytest.approx((1e12 / 989.5e12, 1e9 / 3.35e12))
  l4 = _fake_gpu_report(64, gpu="l4")
  assert l4.step_seconds == pytest.approx(1e12 / 60e12)


# ----------------------------------------------------------------------------------------------
# With the CUDA plugin: compiles.

@needs_gpu_compiler
@pytest.mark.parametrize("name", sorted(chips.GPUS))
def test_each_gpu_target_describes_its_gpu_to_xla(name):
  target = topology.resolve(f"{name}:1x2x4")
  assert (target.platform, target.chip, target.hosts) == ("gpu", chips.GPUS[name], 2)
  assert len(target.devices) == 8
  assert {d.device_kind for d in target.devices} == {chips.GPUS[name].device_kind}
  assert sorted({d.process_index for d in target.devices}) == [0, 1]
  assert target.usable_bytes == chips.GPUS[name].usable_bytes(0.75)


@needs_gpu_compiler
def test_num_slices_adds_partitions_of_hosts():
  target = topology.resolve("h100:8", num_slices=2)
  assert (len(target.devices), target.hosts) == (16, 2)


@pytest.fixture(scope="module")
def digits_run(env, tmp_path_factory):
  """The command on configs/digits.py for one host of 8 H100s (train and eval steps): its
  output and the report it wrote as JSON."""
  if not topology.gpu_compiler_available():
    pytest.skip(WITHOUT_PLUGIN)
  path = tmp_path_factory.mktemp("aot_gpu") / "digits.json"
  result = _aot(env, "--config=configs/digits.py", "--topology=h100:8", f"--json={path}")
  assert result.returncode == 0, result.stderr[-3000:]
  return result, json.loads(path.read_text())


@pytest.mark.compiler_output
def test_digits_compiles_for_eight_h100s(digits_run):
  _, r = digits_run
  assert (r["platform"], r["num_devices"], r["hosts"]) == ("gpu", 8, 1)
  assert (r["device_kind"], r["chip"]["name"]) == ("NVIDIA H100 80GB HBM3", "H100 SXM5 80GB")
  assert (r["global_batch"], r["per_device_batch"]) == (64, 8)
  assert r["fits"] and r["error"] is None
  state, train_memory = r["state_bytes"], r["train"]
  held = state["params"] + state["ema"] + state["optimizer"] + state["constants"]
  # The train state is replicated on every GPU, donated and updated in place.
  assert held <= train_memory["arguments"] < 2 * held
  assert train_memory["aliased"] >= held - 2**12
  assert r["train_total"] >= held
  assert r["hbm_bytes"] == int(0.75 * 84_942_979_072) and r["memory_fraction"] == 0.75
  assert r["eval"] is not None and r["eval_total"] > r["eval"]["arguments"]
  # digits scans its K=4 steps: FLOPs and bytes from unrolled K=1,2 programs, extrapolated.
  assert r["cost_source"] == "unrolled K=1,2"
  assert 10e6 < r["flops"] < 100e6 and r["bytes_accessed"] > 1e6
  assert 0 < r["step_seconds"] < 1e-3
  assert sum(n for call, n in r["library_calls"].items() if call.startswith("__cudnn$conv")) > 0


def test_the_command_prints_the_gpu_report(digits_run):
  result, r = digits_run
  fields = _fields(result.stdout)
  assert fields["topology"] == "h100:8 (8 GPUs, 1 host, NVIDIA H100 80GB HBM3)"
  assert fields["batch"] == "8 per device, 64 global; coupling networks float32"
  assert "memory per device (GiB, XLA's GPU compiler):" in result.stdout.splitlines()
  assert float(fields["train step total"]) == pytest.approx(r["train_total"] / chips.GiB,
                                                            abs=1e-3)
  assert fields["GPU memory"].startswith(
      "59.332 per GPU for JAX's allocator (XLA_CLIENT_MEM_FRACTION=0.75 (JAX's default) of the "
      "79.109 GiB the CUDA driver reports; H100 SXM5 80GB: 80 GB HBM3 published), headroom ")
  assert re.fullmatch(r"\d+ cuDNN convolutions \(\d+ with 3x3 windows\), 0 other cuDNN calls, "
                      r"\d+ cuBLAS calls", fields["GPU library calls (train step)"])
  assert re.fullmatch(
      r"[\d.]+ GFLOP, [\d.]+ GB accessed \(FLOPs: the program lowered for one GPU, since XLA's "
      r"compiled GPU program has no cost analysis; bytes: the compiled program's fusions and "
      r"its cuDNN/cuBLAS calls' operands and results; scanned steps: unrolled K=1,2, "
      r"extrapolated\)", fields["cost per step per device"])
  assert re.match(r"step >= [\d.]+ (us|ms|s) \(compute [\d.]+ (us|ms|s) at 494.5 TFLOP/s TF32 "
                  r"dense, memory traffic [\d.]+ (us|ms|s) at 3350 GB/s\), <= \d+ images/s; "
                  r"1250 steps >= ", fields["roofline lower bound"])
  assert fields["fits"] == "yes"
  # No GPU here: the CUDA plugin is loaded only to compile, and says nothing.
  assert result.stderr == ""


@pytest.mark.compiler_output
@needs_gpu_compiler
def test_a_scanned_denseflow_is_costed_with_every_unit_and_layer_on_a_gpu():
  """As on a TPU (test_loop_cost): DenseFlow's units and layers are loops, counted as often as
  they run; the FLOPs on the program lowered for one GPU (its `platform_dependent` choices are
  one-way conditionals there), the bytes on the compiled one (whose loops carry their
  `known_trip_count`)."""
  config = aot_command.load_config(f"{REPO}/configs/digits_denseflow.py")
  r = compiler.compile_for_topology(config, "h100:8", 8, with_eval=False)
  assert r.cost_source == report.COST_LOOPS
  cost = r.loop_cost
  assert cost.exact and (r.flops, r.bytes_accessed) == (cost.flops, cost.bytes_accessed)
  trips = sorted(loop.trips for loop in cost.loops if "_forward_pass/block" in loop.op_name)
  assert trips == [2] * 8
  assert r.flops > 2 * cost.compiler_flops and r.bytes_accessed > 1.3 * cost.compiler_bytes
  # Measured: FLOPs counted once -0.3% from XLA's cost analysis, bytes +14%; 0.17 GFLOP per
  # GPU at 8 images, where the TPU compiler's program (v5e, 8 per chip) gives 0.18.
  flops, bytes_ = cost.agreement()
  assert flops == pytest.approx(1.0, abs=0.02) and bytes_ == pytest.approx(1.0, abs=0.3)
  assert 0.1e9 < r.flops < 0.3e9
  assert "loops counted by their trip counts)" in report.render(r)


@pytest.fixture(scope="module")
def cifar_report():
  if not topology.gpu_compiler_available():
    pytest.skip(WITHOUT_PLUGIN)
  return compiler.compile_for_topology(
      reduced_cifar_config(), "h100:1x1x8", 64, with_eval=False, config_name="cifar10 K=2")


@pytest.mark.compiler_output
def test_reduced_cifar_compiles_at_64_per_h100(cifar_report):
  r = cifar_report
  assert (r.num_devices, r.per_device_batch, r.global_batch) == (8, 64, 512)
  assert r.fits
  # Measured (jax 0.10.2, CUDA plugin 0.10.2): 0.041 GiB of arguments (the replicated state:
  # K=2 has 2.7M parameters), 0.28 GiB of temporaries; 92.9 GFLOP per GPU, the FLOPs of 64
  # images' forward and backward passes (the TPU compiler counts 93.6 for the same program).
  held = sum(r.state_bytes.values())
  assert held <= r.train.arguments < 2 * held
  assert 0.01 * chips.GiB < r.train.temporaries < 2 * chips.GiB
  assert 80e9 < r.flops < 110e9 and r.cost_source == "compiler"
  assert 0.5e9 < r.bytes_accessed < 20e9
  text = report.render(r)
  assert "fits: yes" in text and "roofline lower bound: step >=" in text


@pytest.mark.compiler_output
def test_the_gpu_program_runs_every_3x3_convolution_on_cudnn(cifar_report):
  """The kernel dispatcher's GPU branch: each 3x3 kernel's forward convolution and both of its
  gradients are cuDNN calls in the compiled train step (no XLA:CPU matmul form leaked in)."""
  config = reduced_cifar_config()
  config.batch_size = 64
  kernels = _three_by_three_kernels(config, sharding.make_mesh(jax.devices()[:1]))
  assert kernels >= 12
  calls = cifar_report.library_calls
  forward = sum(n for call, n in calls.items()
                if call.startswith("__cudnn$conv") and "Forward" in call and call.endswith("3x3"))
  assert forward == kernels
  assert calls.get("__cudnn$convBackwardInput 3x3") == kernels
  assert calls.get("__cudnn$convBackwardFilter 3x3") == kernels


@needs_gpu_compiler
def test_gpu_program_keeps_the_3x3_convolutions():
  # Lowered in this CPU process for a GPU mesh: the kernels are chosen per target platform
  # (eiw_flow_jax.model.kernels), as for a TPU (tests/test_aot.py).
  config = reduced_cifar_config(steps=1, width=256)  # where XLA:CPU takes its matmul forms
  config.batch_size = 16
  mesh = sharding.make_mesh(topology.topology_devices("h100:1")[:1])
  flow = build_flow(config)
  state = train_state.abstract_state(flow, optimizer.make_optimizer(config), mesh)
  images = jax.ShapeDtypeStruct((16, *flow.image_shape), jnp.uint8,
                                sharding=sharding.batch_sharding(mesh))
  loss = jax.jit(lambda v, x: flow.loss(v, x, jax.random.PRNGKey(0))[0])
  text = loss.lower(state.variables(ema=False), images).as_text()
  convolutions = sum(1 for line in text.splitlines()
                     if "stablehlo.convolution" in line and re.search(r"tensor<3x3x", line))
  assert convolutions == _three_by_three_kernels(config, mesh) >= 6
  assert jax.default_backend() == "cpu"


@needs_gpu_compiler
def test_the_table_over_two_hosts_of_eight(env, tmp_path):
  path = tmp_path / "table.json"
  result = _aot(env, "--table", "configs/digits.py", "--topology=h100:2x8", "--noeval",
                "--noexact_cost", f"--json={path}")
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert lines[0].startswith("| config | topology | batch/device | fits | GiB/device | usable GiB")
  assert re.fullmatch(r"\| configs/digits.py \| h100:2x8 \| 4 \| y \| [\d.]+ \| 59.33 \| "
                      r"[\d.]+ (us|ms) \| 1250 \| [\d.]+ (ms|s) \| \d+ \|", lines[2])
  (r,) = json.loads(path.read_text())
  assert (r["num_devices"], r["hosts"], r["global_batch"]) == (16, 2, 64)
  # One progress line on stderr, and no noise from the CUDA plugin.
  assert re.fullmatch(r"configs/digits.py on h100:2x8: fits \(compiled in \d+ s\)",
                      result.stderr.strip()), result.stderr[-3000:]


@needs_gpu_compiler
def test_a_config_too_large_for_the_gpu_exits_with_one_line(env):
  # XLA's GPU compiler does not refuse: it rematerialises towards ~76% of the device memory,
  # then compiles what it has, and the command compares with what JAX's allocator may use.
  # 2**21 images of 8x8 per GPU (one level, one step: a quick compile) need ~33 GiB.
  result = _aot(env, "--config=configs/digits.py", "--topology=a100-40g:8", "--noeval",
                "--config.model.num_levels=1", "--config.model.steps_per_level=1",
                f"--per_device_batch={2**21}")
  assert result.returncode == 1
  assert result.stdout == ""
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr[-3000:]
  assert re.fullmatch(
      r"error: does not fit: configs/digits.py at 2097152 images per device on a100-40g:8 needs "
      r"[\d.]+ GiB per device, JAX's allocator may use 29.57 GiB of an A100 SXM4 40GB \(0.75 of "
      r"39.42 GiB\) \(train step [\d.]+ GiB\)\. Lower --per_device_batch, .*", lines[0])
