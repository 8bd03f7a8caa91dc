"""Ahead-of-time compiles for TPU topologies (eiw_flow_jax.aot), deviceless, by the real TPU
compiler: libtpu comes with the `tpu` extra, which .ci/run installs. Without it the module is
skipped. The compiles take most of this module's time (on 2 cores: digits ~20 s, the reduced
CIFAR model ~40 s), so each program is compiled once and checked several ways."""

from __future__ import annotations

import dataclasses
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
from eiw_flow_jax.aot import chips, compiler, report, search, topology
from eiw_flow_jax.commands import aot as aot_command
from eiw_flow_jax.model.flow import build_flow
from eiw_flow_jax.training import optimizer, sharding, train_state, train_step

pytestmark = pytest.mark.skipif(
    not topology.libtpu_available(),
    reason="libtpu is not installed (pip install -e '.[tpu]'; .ci/run installs it)",
)

TOPOLOGY = "v5e:2x2"


def digits_config():
  return aot_command.load_config(f"{REPO}/configs/digits.py")


def _aot(env, *args, timeout=900):
  return subprocess.run(
      [sys.executable, "-m", "eiw_flow_jax.aot", *args], env=env, cwd=REPO,
      capture_output=True, text=True, timeout=timeout)


def _fields(stdout: str) -> dict[str, str]:
  return dict(line.strip().split(": ", 1) for line in stdout.splitlines() if ": " in line)


@pytest.fixture(scope="module")
def digits_run(env, tmp_path_factory):
  """The command on configs/digits.py for v5e:2x2 (train and eval steps): its output and the
  report it wrote as JSON."""
  path = tmp_path_factory.mktemp("aot") / "digits.json"
  result = _aot(env, "--config=configs/digits.py", f"--topology={TOPOLOGY}", f"--json={path}",
                "--traffic", "--traffic_top=5")
  assert result.returncode == 0, result.stderr[-3000:]
  return result, json.loads(path.read_text())


def test_digits_compiles_for_four_chips_with_data_parallelism(digits_run):
  _, r = digits_run
  assert (r["num_devices"], r["device_kind"], r["chip"]["name"]) == (4, "TPU v5 lite", "TPU v5e")
  # The config's global batch split over the four chips, as main would run it there.
  assert (r["global_batch"], r["per_device_batch"]) == (64, 16)
  assert r["fits"] and r["error"] is None
  state, train_memory = r["state_bytes"], r["train"]
  assert state["params"] > 0 and state["ema"] == state["params"]
  assert state["optimizer"] >= 2 * state["params"]  # Adam: two moments (plus a count)
  # The train state is replicated: every device holds all of it (plus the TPU's padding of
  # small arrays to whole tiles), donated and updated in place.
  held = state["params"] + state["ema"] + state["optimizer"] + state["constants"]
  assert held <= train_memory["arguments"] < 4 * held
  assert train_memory["aliased"] >= held - 2**12
  # The total is the compiler's buffer assignment, temporaries included (digits' scanned steps
  # need none on v5e; the reduced CIFAR-10 test below checks temporaries that are there).
  assert r["train_total"] == (
      train_memory["arguments"] + train_memory["outputs"] - train_memory["aliased"]
      + train_memory["temporaries"] + train_memory["code"])
  assert r["train_total"] >= held
  assert r["train_total"] < r["hbm_bytes"] == int(15.75 * chips.GiB)
  assert r["eval"] is not None and r["eval_total"] > r["eval"]["arguments"]
  assert r["flops"] > 0 and r["bytes_accessed"] > 0
  assert r["cost_source"] == "unrolled K=1,2"  # digits scans its K=4 steps
  assert 0 < r["step_seconds"] < 1 and r["images_per_second"] > 0


def test_scanned_steps_cost_is_what_the_unrolled_program_costs(digits_run):
  """The compiler counts a scanned loop body once: the report's FLOPs, extrapolated from
  unrolled K=1 and K=2 programs, are those of the unrolled K=4 program, not the scanned one's."""
  _, r = digits_run
  config = digits_config()
  config.model.scan_steps = False
  unrolled = compiler.compile_for_topology(config, TOPOLOGY, with_eval=False)
  assert unrolled.cost_source == "compiler"
  # 3%: on TPU the guarded update is a select per leaf, and unrolled programs (one leaf per step)
  # fuse it a little differently as K grows: their FLOPs grow slightly faster than linearly in K
  # (digits: +2.2% over the K=1,2 line at K=4; a branch stays within 0.3%). docs/tpu.md.
  assert r["flops"] == pytest.approx(unrolled.flops, rel=0.03)
  assert r["bytes_accessed"] == pytest.approx(unrolled.bytes_accessed, rel=0.15)


def test_the_traffic_breakdown_counts_what_the_compiler_counts(digits_run):
  """--traffic: the bytes of the same unrolled K=1,2 programs as the cost, per layer kind and
  extrapolated to K, add up to the compiler's own figure; every layer kind of a flow step and
  the update are found by their name scopes."""
  result, r = digits_run
  kinds = {k["kind"]: k for k in r["traffic"]["kinds"]}
  total = sum(k["forward"] + k["backward"] for k in kinds.values())
  assert total == pytest.approx(r["bytes_accessed"], rel=0.05)
  for kind in ("coupling net", "coupling (halves, affine)", "1x1 conv",
               "optimizer and EMA update", "split and its prior", "gradient all-reduce"):
    assert kinds[kind]["forward"] + kinds[kind]["backward"] > 0, kind
  assert kinds["coupling net"]["backward"] > kinds["coupling net"]["forward"] > 0
  assert kinds["other"]["forward"] + kinds["other"]["backward"] < 0.5 * total
  assert len(r["traffic"]["largest"]) > 5
  lines = result.stdout.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith("memory traffic per step"))
  assert "(counted from the unrolled K=1,2 programs, extrapolated: " in lines[start]
  assert lines[start + 1].startswith("| layer kind | forward | backward | total | share |")
  assert "largest 5 instructions of the unrolled K=2 program:" in result.stdout


def test_compare_tables_memory_modes_and_dtypes(env, tmp_path):
  path = tmp_path / "compare.json"
  result = _aot(env, "--config=configs/digits.py", f"--topology={TOPOLOGY}", "--compare",
                "--compare_memory=remat", "--compare_dtype=bfloat16", "--noexact_cost",
                f"--json={path}")
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  assert lines[0] == "configs/digits.py on v5e:2x2, 16 images per device (TPU compiler; per " \
                     "device, train step):"
  assert lines[1].startswith("| variant | fits | GiB per device |")
  assert re.fullmatch(r"\| remat, bfloat16 \| yes \| [\d.]+ \| [\d.]+ \| \d+ \| [\d.]+ \| "
                      r"[\d.]+ ms \| [\d.]+ ms \| [\d.]+ ms \|", lines[3])
  [variant] = json.loads(path.read_text())
  assert variant["variant"] == "remat, bfloat16" and variant["dtype"] == "bfloat16"
  bad = _aot(env, "--config=configs/digits.py", "--compare", "--compare_memory=fast")
  assert bad.returncode == 1 and bad.stdout == ""
  assert bad.stderr.strip() == ("error: --compare_memory takes names from store, remat, invert, "
                                "remat_wide, got ['fast'].")


def _conditionals(config, devices) -> int:
  mesh = sharding.make_mesh(devices)
  text = compiler.lower_train_step(config, mesh).as_text()
  return text.count("stablehlo.case") + text.count("stablehlo.if")


def test_the_update_is_a_select_on_tpu_and_a_branch_on_cpu():
  # train_step.guarded_update: the same update; the branch lets XLA:CPU update the state in
  # place, the select saves the TPU program the branch's copies of the state.
  # (The other conditionals are the kernels' one-branch ones, in both programs.)
  config = digits_config()
  on_cpu = _conditionals(config, jax.devices()[:1])
  assert _conditionals(config, topology.topology_devices(TOPOLOGY)) == on_cpu - 1


@pytest.mark.parametrize("config_name", ["digits", "digits_denseflow"])
def test_the_train_step_traces_no_form_for_another_platform(config_name):
  """Glow and DenseFlow: the train step traced for a TPU mesh and for a CPU one stages out no
  platform conditional (the kernels' and the update's forms are chosen before tracing), and
  the TPU one none of the XLA:CPU forms (their derivative rules' barriers)."""
  config = aot_command.load_config(f"{REPO}/configs/{config_name}.py")
  for devices, platform in ((topology.topology_devices(TOPOLOGY), "tpu"),
                            (jax.devices()[:1], "cpu")):
    mesh = sharding.make_mesh(devices)
    assert sharding.mesh_platform(mesh) == platform
    config.batch_size = len(devices)
    flow = build_flow(config)
    tx = optimizer.make_optimizer(config)
    state = train_state.abstract_state(flow, tx, mesh, ema=train_state.keeps_ema(config))
    images = jax.ShapeDtypeStruct((config.batch_size, *flow.image_shape), jnp.uint8,
                                  sharding=sharding.batch_sharding(mesh))
    step = train_step.make_train_step(config, flow, tx, mesh)
    jaxpr = str(step.trace(state, images).jaxpr)
    # (JAX's own linear algebra may keep a conditional for Mosaic kernels.)
    assert not re.search(r"platform_index\[platforms=\(\('(cpu|tpu)'", jaxpr)
    assert ("optimization_barrier" in jaxpr) == (platform == "cpu")


def test_the_step_time_bench_prints_the_roofline_next_to_the_measured_step(env, tmp_path):
  """bench/step_time.py --roofline_topology: the measured step (here CPU, a toy model) and the
  TPU compiler's roofline of the same config and batch per device."""
  path = tmp_path / "step.json"
  result = subprocess.run(
      [sys.executable, "bench/step_time.py", "--config=configs/digits.py",
       "--config.model.steps_per_level=1", "--config.model.hidden_channels=8",
       "--config.init_batch_size=8", "--per_device_batch=4", "--warmup=1", "--steps=2",
       "--rounds=1", f"--roofline_topology={TOPOLOGY}", f"--json={path}"],
      env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  figures = json.loads(path.read_text())
  assert 0 < figures["roofline_seconds"] < figures["step_seconds"][0]
  assert re.fullmatch(r"roofline \(v5e:2x2, TPU compiler\): [\d.e-]+ ms; measured / roofline = "
                      r"[\d.e+]+", result.stdout.splitlines()[-1])


def test_the_command_prints_the_report(digits_run):
  result, report = digits_run
  fields = _fields(result.stdout)
  assert fields["config"] == "configs/digits.py"
  assert fields["topology"].startswith(f"{TOPOLOGY} (4 devices, TPU v5 lite")
  assert fields["batch"].startswith("16 per device, 64 global; coupling networks float32")
  # Every compile counted: the two unrolled cost compiles and the whole call's time.
  times = re.fullmatch(r"train step ([\d.]+) s, eval step ([\d.]+) s, FLOPs and bytes ([\d.]+) s "
                       r"\(2 more compiles: unrolled K=1,2\); ([\d.]+) s in all",
                       fields["compile time"])
  assert times, fields["compile time"]
  train_s, eval_s, cost_s, total_s = map(float, times.groups())
  assert cost_s > 0 and total_s >= train_s + eval_s + cost_s - 0.3
  assert report["cost_seconds"] == pytest.approx(cost_s, abs=0.06)
  assert report["step_seconds_is"] == "roofline lower bound"
  assert re.match(r"[\d.]+ \(params [\d.]+, EMA [\d.]+, optimizer state [\d.]+",
                  fields["arguments"])
  total, hbm = float(fields["train step total"]), float(fields["HBM"].split()[0])
  assert total == pytest.approx(report["train_total"] / chips.GiB, abs=1e-3)
  assert 0 < total < hbm == 15.75
  assert re.match(r"[\d.]+ GFLOP, [\d.]+ GB accessed \(TPU compiler; scanned steps: unrolled "
                  r"K=1,2, extrapolated\)", fields["cost per step per device"])
  assert re.match(r"step >= [\d.]+ (us|ms|s) .*, <= \d+ images/s; 1250 steps >= ",
                  fields["roofline lower bound"])
  assert fields["fits"] == "yes"
  assert "Failed to find host bounds" not in result.stderr  # libtpu kept quiet off a TPU VM


@pytest.fixture(scope="module")
def cifar_report():
  return compiler.compile_for_topology(
      reduced_cifar_config(), TOPOLOGY, 64, with_eval=False, config_name="cifar10 K=2")


def test_reduced_cifar_compiles_at_64_per_chip(cifar_report):
  r = cifar_report
  assert (r.num_devices, r.per_device_batch, r.global_batch) == (4, 64, 256)
  assert r.fits
  # Measured (libtpu 0.0.42.1): 0.044 GiB of arguments (the replicated state: K=2 has 2.7M
  # parameters), 0.067 GiB of temporaries, 93.6 GFLOP per device: the FLOPs of 64 images'
  # forward and backward passes, not of the global 256 (the program is partitioned).
  held = sum(r.state_bytes.values())
  assert held <= r.train.arguments < 2 * held
  assert 0.01 * chips.GiB < r.train.temporaries < 1 * chips.GiB
  assert 80e9 < r.flops < 110e9
  text = report.render(r)
  assert "fits: yes" in text and "roofline lower bound: step >=" in text


def _three_by_three_convolutions(text: str) -> int:
  return sum(1 for line in text.splitlines()
             if "stablehlo.convolution" in line and re.search(r"tensor<3x3x", line))


def _forward_lowered(config, devices) -> tuple[str, int]:
  """The loss lowered for a mesh of `devices`; and the number of 3x3 kernels it uses."""
  mesh = sharding.make_mesh(devices)
  flow = build_flow(config)
  state = train_state.abstract_state(flow, optimizer.make_optimizer(config), mesh)
  images = jax.ShapeDtypeStruct((config.batch_size, *flow.image_shape), jnp.uint8,
                                sharding=sharding.batch_sharding(mesh))
  loss = jax.jit(lambda v, x: flow.loss(v, x, jax.random.PRNGKey(0))[0])
  text = loss.lower(state.variables(ema=False), images).as_text()
  # 3x3 kernels, stacked per level along leading axes (K steps): each slice is one kernel.
  kernels = sum(math.prod(leaf.shape[:-4]) for leaf in jax.tree.leaves(state.params)
                if leaf.ndim >= 4 and leaf.shape[-4:-2] == (3, 3))
  return text, kernels


@pytest.fixture(scope="module")
def wide_config():
  # Width 256 and 32x32 images: where bijectors.py takes its XLA:CPU forms on the CPU.
  config = reduced_cifar_config(steps=1, width=256)
  config.batch_size = 16
  return config


def test_cpu_program_takes_the_cpu_forms(wide_config):
  text, kernels = _forward_lowered(wide_config, jax.devices()[:1])
  assert kernels >= 6
  assert _three_by_three_convolutions(text) < kernels


def test_tpu_program_keeps_the_3x3_convolutions(wide_config):
  # Lowered in this CPU process for a TPU mesh: the kernels are chosen per target platform
  # (eiw_flow_jax.model.kernels), so none of the XLA:CPU matmul forms leak into the TPU program.
  devices = topology.topology_devices(TOPOLOGY)
  text, kernels = _forward_lowered(wide_config, devices)
  assert _three_by_three_convolutions(text) == kernels
  assert jax.default_backend() == "cpu"


def test_parse_oom_reads_the_compilers_figures():
  message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
             "temporaries (400.00G) exceeds available HBM (15.75G).")
  assert compiler.parse_oom(message) == (400 * chips.GiB, int(15.75 * chips.GiB))
  assert compiler.parse_oom("Used 20.5G of 15.75G hbm. Exceeded hbm capacity") == (
      int(20.5 * chips.GiB), int(15.75 * chips.GiB))
  assert compiler.parse_oom("INTERNAL: something else") is None


@pytest.mark.parametrize("name", ["v5e", "v5e:2y2", "tpu"])
def test_a_bad_topology_is_an_error_naming_it(name):
  with pytest.raises(aot.AotError, match="--topology must look like v5e:2x2"):
    topology.topology_devices(name)


def test_multi_slice_topologies_have_every_slice():
  devices = topology.topology_devices(TOPOLOGY, num_slices=2)
  assert len(devices) == 8
  assert sorted({d.slice_index for d in devices}) == [0, 1]


def test_a_batch_that_does_not_split_is_an_error():
  config = digits_config()
  config.batch_size = 66
  with pytest.raises(aot.AotError, match="batch_size=66 must be divisible by the number of "
                                          "devices \\(4\\)"):
    compiler.compile_for_topology(config, TOPOLOGY)


def test_a_config_that_does_not_fit_exits_with_one_line(env):
  # A train state larger than a v5e chip's HBM (hidden width 32768: 3.3 GiB of parameters,
  # four copies with EMA and Adam's moments) is refused within seconds of compiling. (A batch
  # far beyond the limit is not a quick test: the TPU compiler rematerialises to fit it, and
  # the digits model fitted even 2**20 images per chip in 10 GiB after 8 minutes' compiling.)
  result = _aot(env, "--config=configs/digits.py", f"--topology={TOPOLOGY}", "--noeval",
                "--config.model.hidden_channels=32768", "--config.model.num_levels=1",
                "--config.model.steps_per_level=1", "--per_device_batch=2")
  assert result.returncode == 1
  assert result.stdout == ""
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr[-3000:]
  assert re.match(r"error: does not fit: configs/digits.py at 2 images per device on v5e:2x2 "
                  r"needs [\d.]+ GiB per device, the TPU compiler allows 15.75 GiB \(train step: "
                  r"RESOURCE_EXHAUSTED: .*\)\. The train state alone \(parameters, EMA, "
                  r"optimizer state\) takes [\d.]+ GiB per device", lines[0])


def _fake_report(batch: int, *, per_image: int = 10 * 2**20, fixed: int = 2**30,
                 hbm: int = 15 * 2**30) -> report.AotReport:
  """A report as the compiler would give for a model of `fixed` + `per_image` x batch bytes."""
  total = fixed + per_image * batch
  fake = report.AotReport(
      config_name="fake", topology=TOPOLOGY, num_slices=1, num_devices=4,
      device_kind="TPU v5 lite", chip=chips.CHIPS["v5e"], hbm_bytes=hbm, per_device_batch=batch,
      global_batch=4 * batch, num_train_steps=1000, eval_batch=256, dtype="float32",
      compile_seconds=1.0, flops=1e12, bytes_accessed=1e9,
      state_bytes={"params": 2**28, "ema": 2**28, "optimizer": 2**29, "constants": 0})
  if total <= hbm:
    fake.train = report.ProgramMemory(arguments=fixed, outputs=fixed, aliased=fixed,
                                   temporaries=total - fixed, code=0)
  else:
    fake.error = "train step: RESOURCE_EXHAUSTED"
    fake.required_bytes = total
  return fake


@pytest.mark.parametrize("start", [1, 64, 1300, 5000])
def test_the_batch_search_finds_the_largest_batch_that_fits(monkeypatch, start):
  compiled = []

  def fake_compile(config, topology, batch, **kwargs):
    compiled.append(batch)
    return _fake_report(batch)

  monkeypatch.setattr(search, "compile_for_topology", fake_compile)
  found = search.largest_batch(None, TOPOLOGY, _fake_report(start), budget_s=60)
  # (15 GiB - 1 GiB) / 10 MiB = 1433.6 images.
  assert (found.fits, found.fails, found.exact) == (1433, 1434, True)
  assert found.compiles == len(compiled) <= 12
  stopped = search.largest_batch(None, TOPOLOGY, _fake_report(start), budget_s=0)
  assert stopped.compiles == 0 and not stopped.exact


def test_the_batch_search_stays_within_its_budget(monkeypatch):
  """Compiles that take 30 s, then longer as the batch grows: a search given 100 s starts a
  compile only while the time spent plus the longest compile (and a margin) fits, and says so."""
  clock = [0.0]
  monkeypatch.setattr(search.time, "perf_counter", lambda: clock[0])

  def slow_compile(config, topology, batch, **kwargs):
    clock[0] += 30.0 * (1 + batch / 10_000)
    return _fake_report(batch)

  monkeypatch.setattr(search, "compile_for_topology", slow_compile)
  start = _fake_report(64)
  start.compile_seconds = 30.0
  found = search.largest_batch(None, TOPOLOGY, start, budget_s=100)
  assert found.compiles == 2 and found.seconds <= 100 and found.budget_s == 100
  once = search.largest_batch(None, TOPOLOGY, start, budget_s=60)
  assert once.compiles == 1 and once.seconds <= 60 and not once.exact
  assert report.render(dataclasses.replace(start, batch_search=once)).splitlines()[-2] == (
      "largest per-device batch that fits: at least 1433 (every batch tried fits; the budget "
      "ran out before one that does not); 1 more compiles in 34 s of the 60 s budget")
  none = search.largest_batch(None, TOPOLOGY, start, budget_s=20)
  assert none.compiles == 0
  assert report.render(dataclasses.replace(start, batch_search=none)).splitlines()[-2] == (
      "largest per-device batch that fits: at least 64; no other batch tried: one compile takes "
      "about 30 s, more than the budget of --max_batch_search=20 s; 0 more compiles in 0 s of "
      "the 20 s budget")


@pytest.mark.parametrize("cost_source", ["compiler", "unrolled K=1,2"])
def test_the_compilers_estimate_is_weighed_against_the_roofline(cost_source):
  fake = dataclasses.replace(_fake_report(64), cost_source=cost_source)
  roofline = fake.step_seconds  # 5.1 ms: compute-bound
  below = report.render(dataclasses.replace(fake, compiler_seconds=roofline / 10))
  line = next(x for x in below.splitlines() if x.startswith("compiler's estimate:"))
  assert line.startswith("compiler's estimate: 508 us per step, below the roofline lower bound, "
                         "which no step can beat: ")
  assert ("counts once" in line) == (cost_source != "compiler")
  assert "Plan with the roofline" in line
  above = report.render(dataclasses.replace(fake, compiler_seconds=roofline * 2))
  line = next(x for x in above.splitlines() if x.startswith("compiler's estimate:"))
  assert line.startswith("compiler's estimate: 10.2 ms per step (its model of its own schedule, "
                         "above the roofline lower bound")


def test_load_config_takes_hardware_variants_and_overrides(tmp_path):
  config_file = tmp_path / "small_chips.py"
  config_file.write_text(
      "from configs import cifar10\n"
      "from eiw_flow_jax.config import recipes\n\n"
      "def get_config(hardware=''):\n"
      "  return recipes.hardware_variant(cifar10.get_config(), hardware,\n"
      "                                  {'half': {'batch_size': 256}})\n")
  plain = aot_command.load_config(str(config_file))
  half = aot_command.load_config(f"{config_file}:half",
                                 {"model.memory": "invert", "num_train_steps": 7})
  assert (plain.batch_size, half.batch_size) == (512, 256)
  assert (half.model.memory, half.num_train_steps) == ("invert", 7)
  assert aot_command.load_config(f"{REPO}/configs/cifar10.py:v5e_16").batch_size == 512
  with pytest.raises(aot.AotError, match=r"configs/digits.py has no hardware variants; got "
                                         r"':v5e_16'"):
    aot_command.load_config(f"{REPO}/configs/digits.py:v5e_16")
  with pytest.raises(aot.AotError, match="Unknown hardware variant 'tpu9'"):
    aot_command.load_config(f"{REPO}/configs/cifar10.py:tpu9")
  with pytest.raises(aot.AotError, match=r"--config.model.colour: .* has no field model.colour"):
    aot_command.load_config(f"{REPO}/configs/cifar10.py", {"model.colour": 1})


def test_the_table_takes_overrides_and_hardware_variants(env, tmp_path):
  path = tmp_path / "table.json"
  result = _aot(env, "--table", "configs/digits.py", "configs/digits.py", "--noeval",
                "--noexact_cost", f"--topology={TOPOLOGY}", "--config.num_train_steps=123",
                "--config.model.steps_per_level=1", f"--json={path}")
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert lines[0] == ("| config | topology | batch/device | fits | GiB/device | usable GiB | "
                      "step (roofline lower bound) | steps | wall time (roofline lower bound) | "
                      "compiles, s |")
  assert len(lines) == 4 and all("| 123 |" in line for line in lines[2:]), lines
  assert all(r["num_train_steps"] == 123 for r in json.loads(path.read_text()))
  bad = _aot(env, "--table", "configs/digits.py:v5e_16", "--noeval")
  assert bad.returncode == 1 and bad.stdout == ""
  assert bad.stderr.strip() == ("error: configs/digits.py has no hardware variants; got "
                                "':v5e_16'.")


def test_the_before_you_rent_table():
  fits, refused = _fake_report(64), _fake_report(4096)
  assert fits.fits and not refused.fits
  fits.total_seconds = 12.4
  table = report.markdown_table([report.table_row(fits), report.table_row(refused)]).splitlines()
  assert table[0].startswith("| config | topology | batch/device | fits | GiB/device |")
  assert "wall time (roofline lower bound)" in table[0]
  # 1e12 FLOPs at 197 TFLOP/s: 5.1 ms a step (HBM: 1e9 B at 819 GB/s, 1.2 ms); 1000 steps.
  assert table[2] == "| fake | v5e:2x2 | 64 | y | 1.62 | 15.00 | 5.1 ms | 1000 | 5.1 s | 12 |"
  assert table[3] == "| fake | v5e:2x2 | 4096 | n | 41.00 | 15.00 | n/a | 1000 | n/a | n/a |"
  assert "The train state alone" not in refused.one_line()
  assert refused.one_line().startswith(
      "error: does not fit: fake at 4096 images per device on v5e:2x2 needs 41.00 GiB per "
      "device, the TPU compiler allows 15.00 GiB (train step: RESOURCE_EXHAUSTED). Lower "
      "--per_device_batch")
