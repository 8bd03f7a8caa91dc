"""Catalog configs end to end on prepared (synthetic) TFDS data, through the real TFDS reader.

`cifar10` is written by TFDS's writer on a subclass of the catalog builder; the
`downsampled_imagenet/32x32` data goes through `python -m eiw_flow_jax.prepare --source_dir`.
Both land in the exact layout TFDS 4.9.10 writes (checked in test_prepare.py), then
configs/cifar10.py and configs/imagenet32.py train, evaluate and sample a few steps with a tiny
model through `python -m eiw_flow_jax.main`, reading through `tfds.builder(...).as_data_source`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO
from fake_catalog import write_cifar10, write_downsampled_imagenet_sources

CONFIGS = os.path.join(REPO, "configs")
TINY = [
    "--config.model.num_levels=2",
    "--config.model.steps_per_level=1",
    "--config.model.hidden_channels=8",
    "--config.model.eiw.reduction=2",
    "--config.batch_size=8",
    "--config.eval_batch_size=16",
    "--config.init_batch_size=16",
    "--config.num_train_steps=2",
    "--config.optimizer.warmup_steps=1",  # the same for both configs: compilations are reused
    "--config.log_every_steps=1",
    "--config.checkpoint_every_steps=1",
    "--config.eval_every_steps=0",
    "--config.sample.num_samples=4",
    "--config.sample.temperatures=(0.7,)",
]


@pytest.fixture(scope="module")
def catalog_dir(tmp_path_factory, env):
  root = tmp_path_factory.mktemp("catalog")
  write_cifar10(root / "tfds", num_train=24, num_test=10)
  sources = write_downsampled_imagenet_sources(root / "src", 32, num_train=24, num_valid=10)
  result = subprocess.run(
      [sys.executable, "-m", "eiw_flow_jax.prepare", "--dataset=imagenet32",
       f"--data_dir={root / 'tfds'}", f"--source_dir={sources}"],
      env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return root / "tfds"


def _run(env, workdir, config, *extra):
  args = [sys.executable, "-m", "eiw_flow_jax.main", f"--config={os.path.join(CONFIGS, config)}",
          f"--workdir={workdir}", *TINY, *extra]
  return subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def test_train_eval_sample_catalog_configs(tmp_path, catalog_dir, env):
  data_flag = f"--config.dataset.data_dir={catalog_dir}"
  runs = {
      "cifar10": (tmp_path / "cifar10", "cifar10.py", "test"),
      "imagenet32": (tmp_path / "imagenet32", "imagenet32.py", "validation"),
  }
  # One after the other: the second reuses the first's compilations (same shapes and model).
  for name, (workdir, config, split) in runs.items():
    stdout, stderr = _run(env, workdir, config, data_flag).communicate(timeout=600)
    assert "Final test bpd" in stdout, f"{name}: {stderr[-4000:]}"
    results = json.loads((workdir / "results.json").read_text())
    assert results["dataset"] == name and results["step"] == 2
    assert results["eval_split"] == split
    assert results["num_eval"] == results["num_evaluated"] == 10
    assert results["num_train"] == 24
    assert os.path.isfile(workdir / "samples" / "temperature_0.70.png")

  # Eval and sample again from the checkpoint, as separate commands (cifar10).
  workdir = runs["cifar10"][0]
  (workdir / "results.json").unlink()
  (workdir / "samples" / "temperature_0.70.png").unlink()
  outputs = {}
  for mode in ("eval", "sample"):
    proc = _run(env, workdir, "cifar10.py", data_flag, f"--mode={mode}")
    outputs[mode], stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"{mode}: {stderr[-4000:]}"
  assert "Test bpd (cifar10, step 2)" in outputs["eval"]
  assert "temperature_0.70.png" in outputs["sample"]
  results = json.loads((workdir / "results.json").read_text())
  assert results["step"] == 2 and results["num_evaluated"] == 10
  assert os.path.isfile(workdir / "samples" / "temperature_0.70.png")
