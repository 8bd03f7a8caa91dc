"""The command line end to end: train -> eval -> sample on digits, and its error messages."""

from __future__ import annotations

import glob
import json
import os
import re
import struct
import subprocess
import sys

import pytest
from conftest import REPO, with_test_xla_flags

from eiw_flow_jax.data import pipeline
from eiw_flow_jax.model.flow import build_flow
from eiw_flow_jax.training import evaluate, optimizer, sharding, train_state

CONFIGS = os.path.join(REPO, "configs")
TINY = [
    "--config.model.steps_per_level=1",
    "--config.model.hidden_channels=8",
    "--config.batch_size=16",
    "--config.eval_batch_size=64",
    "--config.init_batch_size=64",
    "--config.sample.num_samples=4",
    "--config.sample.temperatures=(0.5,1.0)",
    "--config.log_every_steps=50",
]


def main_args(workdir: str, config: str = "digits.py", *extra: str) -> list[str]:
  return [
      sys.executable, "-m", "eiw_flow_jax.main", f"--config={os.path.join(CONFIGS, config)}",
      f"--workdir={workdir}", *extra,
  ]


# What JAX and libtpu print when they look for TPU chips that are not there.
TPU_NOISE = ("Unable to initialize backend 'tpu'", "No jellyfish device",
             "unexpected worker hostname")
# A tqdm bar's elapsed and remaining time, e.g. "[00:21<35:59, 21.82s/step]".
BAR_TIMES = re.compile(r"\[(?:\d+:)?\d+:\d+<((?:\d+:)?\d+:\d+),")
LOG_LINE = re.compile(r"[IWE]\d{4} \d\d:\d\d:\d\d")  # absl's prefix


def seconds(clock: str) -> int:
  return sum(int(part) * 60**power for power, part in enumerate(reversed(clock.split(":"))))


def test_train_eval_sample_on_digits(tmp_path, data_dir, user_env):
  """The quick start's command, as a user runs it (no JAX_PLATFORMS; libtpu installed by the
  test command's `tpu` extra): quiet about TPUs, the dataset's preparation explained, a
  progress bar whose ETA counts steps (not the compile) and that log lines do not break."""
  workdir = str(tmp_path / "run")
  args = main_args(
      workdir, "digits.py", *TINY, f"--config.dataset.data_dir={data_dir}",
      "--config.num_train_steps=300", "--config.checkpoint_every_steps=100",
  )
  result = subprocess.run(args, env=user_env, cwd=REPO, capture_output=True, timeout=300)
  stdout, stderr = result.stdout.decode(), result.stderr.decode()
  assert result.returncode == 0, stderr[-4000:]
  assert "Final test bpd" in stdout
  assert not [line for line in stderr.splitlines() if any(n in line for n in TPU_NOISE)], stderr
  assert "Downloading and preparing" not in stdout + stderr
  assert "Preparing dataset digits (scikit-learn's bundled 8x8 digits" in stderr, stderr
  assert "Compiling the training step; the progress bar starts after step 1." in stderr
  # The bar is redrawn as "\r<bar>" in place; a log line written into it would follow bar text
  # on the same line.
  bar_states = re.split(r"[\r\n]", stderr)
  assert not [b for b in bar_states if "step/s" in b and LOG_LINE.search(b)], stderr[-4000:]
  remaining = [seconds(m.group(1)) for m in BAR_TIMES.finditer(stderr)]
  assert remaining and max(remaining) < 120, remaining  # 300 tiny steps: seconds, not hours

  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert results["dataset"] == "digits"
  assert results["num_eval"] == results["num_evaluated"] == 297
  assert results["num_train"] == 1500
  assert results["step"] == 300
  for key in ("config_hash", "git_commit", "device_kind", "device_count"):
    assert results[key]
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "300"))
  events = sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*")))
  # Training's file, then one with the final eval/bpd and one with the sample grids.
  assert len(events) == 3, events
  assert [e.endswith(".eval") for e in events].count(True) == 1
  assert [e.endswith(".samples") for e in events].count(True) == 1
  tags = {}
  for path in events:
    for tag, steps in event_tags(path).items():
      tags.setdefault(tag, []).extend(steps)
  assert tags["eval/bpd"] == [300]
  assert tags["samples/temperature_0.50"] == tags["samples/temperature_1.00"] == [300]
  assert tags["samples/nonfinite_values/temperature_0.50"] == [300]
  for tag in (
      "train/loss", "train/bpd", "train/regularizer", "train/grad_norm", "train/img_per_sec",
      "train/learning_rate", "train/skipped_steps_total", "shuffle/level0/g_entropy",
      "shuffle/level0/mean_s_entropy", "shuffle/level0/regularizer",
      "shuffle/level0/factored_entropy", "shuffle/level0/permutation_changes",
  ):
    assert tags.get(tag) == [50, 100, 150, 200, 250, 300], tag
  assert sorted(os.listdir(os.path.join(workdir, "samples"))) == [
      "bpd_curves.png", "temperature_0.50.png", "temperature_1.00.png",
  ]

  # Test bpd of the same model at initialisation (same seed, same init batch, same eval noise).
  config = _tiny_config(data_dir)
  flow, tx, mesh = build_flow(config), optimizer.make_optimizer(config), sharding.make_mesh()
  images = pipeline.load_examples(config, "train", config.init_batch_size)
  state = train_state.create_state(config, flow, tx, mesh, images)
  init_bpd, count = evaluate.evaluate_bpd(
      config, flow, state.variables(), mesh, train_state.rng_keys(config)["eval"]
  )
  assert count == 297
  assert results["bpd"] < init_bpd - 0.5, (results["bpd"], init_bpd)

  # --mode=eval recomputes the same number from the checkpoint; --mode=sample rewrites the PNGs
  # (the grids, and the curves from the events).
  os.remove(os.path.join(workdir, "results.json"))
  for path in glob.glob(os.path.join(workdir, "samples", "*.png")):
    os.remove(path)
  for mode in ("eval", "sample"):
    result = subprocess.run(
        [*args, f"--mode={mode}"], env=user_env, cwd=REPO, capture_output=True, text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["bpd"] == pytest.approx(results["bpd"], abs=1e-6)
  assert len(glob.glob(os.path.join(workdir, "samples", "*.png"))) == 3  # grids and the curves


def event_tags(path: str) -> dict[str, list[int]]:
  """Tag -> logged steps of a TensorBoard event file (TFRecord framing around Event protos)."""
  from tensorboardX.proto import event_pb2

  with open(path, "rb") as f:
    raw = f.read()
  tags, offset = {}, 0
  while offset < len(raw):
    (length,) = struct.unpack("<Q", raw[offset : offset + 8])
    event = event_pb2.Event.FromString(raw[offset + 12 : offset + 12 + length])
    offset += 12 + length + 4  # length, its crc, the record, its crc
    for value in event.summary.value:
      tags.setdefault(value.tag, []).append(event.step)
  return tags


def _tiny_config(data_dir: str):
  sys.path.insert(0, CONFIGS)
  try:
    import digits  # noqa: PLC0415 - the config file, found via the path above
  finally:
    sys.path.pop(0)
  config = digits.get_config()
  config.dataset.data_dir = data_dir
  config.model.steps_per_level = 1
  config.model.hidden_channels = 8
  config.batch_size = 16
  config.eval_batch_size = 64
  config.init_batch_size = 64
  return config


# Each case: (config file, extra flags, environment additions, expected text on stderr).
ERROR_CASES = {
    "unknown_dataset": (
        "digits.py", ["--config.dataset.name=svhn"], {}, "config.dataset.name must be one of",
    ),
    "bad_split": ("digits.py", ["--config.model.split=random"], {}, "model.split must be one of"),
    "bad_mode": (
        "digits.py", ["--config.model.eiw.mode=local"], {}, "model.eiw.mode must be one of",
    ),
    "image_not_divisible": (
        "digits.py", ["--config.model.num_levels=4"], {}, "divisible by 2**num_levels",
    ),
    "batch_not_divisible": (
        "digits.py", ["--config.batch_size=12"],
        {"XLA_FLAGS": with_test_xla_flags("--xla_force_host_platform_device_count=8")},
        "config.batch_size=12 must be divisible by the number of devices (8)",
    ),
    "mnist_idx_missing": (
        "mnist_idx.py", ["--config.dataset.source_dir=/nonexistent/mnist"], {},
        "/nonexistent/mnist, which does not exist",
    ),
    "catalog_not_prepared": ("cifar10.py", [], {}, "is not prepared in data_dir"),
    "compiler_effort_out_of_range": (
        "digits.py", ["--config.compiler.exec_time_optimization_effort=-3"], {},
        "config.compiler.exec_time_optimization_effort must be a number in [-1, 1]",
    ),
}


@pytest.fixture(scope="module")
def error_runs(tmp_path_factory, env):
  """Runs every error case at once (they only import and fail), keyed by case name."""
  root = tmp_path_factory.mktemp("errors")
  procs = {}
  for name, (config, extra, env_extra, _) in ERROR_CASES.items():
    args = main_args(
        str(root / name), config, *extra, f"--config.dataset.data_dir={root / 'tfds'}"
    )
    procs[name] = subprocess.Popen(
        args, env={**env, **env_extra}, cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )
  return {name: (proc, *proc.communicate(timeout=300)) for name, proc in procs.items()}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_cli_errors(case, error_runs):
  proc, stdout, stderr = error_runs[case]
  expected = ERROR_CASES[case][3]
  assert proc.returncode == 1, stderr[-3000:]
  assert expected in stderr, stderr[-3000:]
  # A message, not a traceback.
  assert any(line.startswith("error: ") for line in stderr.splitlines()), stderr[-3000:]
  assert "Traceback" not in stderr


def test_eval_without_checkpoint_fails_clearly(tmp_path, data_dir, env):
  args = main_args(str(tmp_path / "empty"), "digits.py", "--mode=eval",
                   f"--config.dataset.data_dir={data_dir}")
  result = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert "No checkpoint in" in result.stderr



@pytest.mark.slow
def test_two_processes_with_distributed_initialize(tmp_path, data_dir, env):
  """launch/multihost_example.sh: 2 JAX processes x 2 CPU devices train and evaluate together."""
  workdir = str(tmp_path / "multihost")
  script = os.path.join(REPO, "launch", "multihost_example.sh")
  result = subprocess.run(
      [script, "2", workdir, *TINY, f"--config.dataset.data_dir={data_dir}",
       "--config.num_train_steps=60", "--config.checkpoint_every_steps=30"],
      env={**env, "PYTHON": sys.executable, "PORT": "12391"}, cwd=REPO, capture_output=True,
      text=True, timeout=600,
  )
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert results["process_count"] == 2 and results["device_count"] == 4
  assert results["num_evaluated"] == 297
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(
      os.listdir(os.path.join(workdir, "checkpoints", "60", "data"))
  )

  # One process with the same 4 devices sees the same global batches row for row (the data
  # layer gives each process a contiguous block of every batch), so it ends at the same bpd.
  single = str(tmp_path / "single")
  result = subprocess.run(
      main_args(single, "digits.py", *TINY, f"--config.dataset.data_dir={data_dir}",
                "--config.num_train_steps=60", "--config.checkpoint_every_steps=30"),
      env={**env, "XLA_FLAGS": with_test_xla_flags("--xla_force_host_platform_device_count=4")},
      cwd=REPO,
      capture_output=True, text=True, timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(single, "results.json")) as f:
    single_results = json.load(f)
  assert single_results["device_count"] == 4
  assert single_results["bpd"] == pytest.approx(results["bpd"], abs=1e-4)
