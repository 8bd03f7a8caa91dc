"""python -m eiw_flow_jax.table: results.json of real (tiny) digits and MNIST-idx runs -> table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from test_data import mnist_source

from eiw_flow_jax.commands import table
from eiw_flow_jax.config.schema import base_config
from eiw_flow_jax.training import evaluate, train_loop


def _tiny(config, data_dir: str, steps: int):
  config.dataset.data_dir = data_dir
  config.model.steps_per_level = 1
  config.model.hidden_channels = 8
  config.model.eiw.reduction = 2
  config.batch_size = 16
  config.eval_batch_size = 500
  config.init_batch_size = 32
  config.num_train_steps = steps
  config.log_every_steps = steps
  config.checkpoint_every_steps = steps
  config.sample.num_samples = 4
  config.sample.temperatures = (0.7,)
  return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
  """Workdirs of a digits run (EIW global; trained to step 2, then resumed to step 4) and an
  mnist_idx run (vanilla), trained through train_loop.train / train_loop.train_and_evaluate."""
  root = tmp_path_factory.mktemp("runs")
  digits = base_config()
  digits.dataset.name = "digits"
  digits.model.image_shape = (8, 8, 1)
  digits.model.n_bits = 5
  digits = _tiny(digits, data_dir, 2)
  out = {"digits": root / "digits_eiw"}
  train_loop.train(digits, str(out["digits"]))  # a first run to step 2 ...
  out["first_run_s"] = evaluate.read_train_time(str(out["digits"]))
  digits.num_train_steps = 4
  train_loop.train_and_evaluate(digits, str(out["digits"]))  # ... resumed to step 4

  mnist = base_config()
  mnist.dataset.name = "mnist_idx"
  mnist.dataset.source_dir = str(mnist_source(root / "mnist_source"))
  mnist.model.image_shape = (28, 28, 1)
  mnist.model.split = "vanilla"
  out["mnist_idx"] = root / "mnist_idx"
  train_loop.train_and_evaluate(_tiny(mnist, data_dir, 2), str(out["mnist_idx"]))
  return out


def test_results_json_names_the_run(runs):
  results = json.loads((runs["digits"] / "results.json").read_text())
  assert results["backbone"] == "glow"
  assert results["split"] == "eiw" and results["eiw_mode"] == "global"
  assert isinstance(results["num_parameters"], int) and results["num_parameters"] > 1000
  assert results["image_shape"] == [8, 8, 1]
  # Trained scalars only: the fixed `constants` collection is not counted.
  variables = {"params": {"a": np.zeros((2, 3)), "b": {"c": np.zeros(4)}},
               "constants": {"perm": np.zeros(100)}}
  assert evaluate.num_parameters(variables) == 10
  # The resumed workdir sums the wall time of both training runs.
  recorded = json.loads((runs["digits"] / evaluate.TRAIN_TIME_FILE).read_text())
  assert recorded["step"] == 4
  assert results["wall_time_s"] == pytest.approx(recorded["wall_time_s"])
  assert 0 < runs["first_run_s"] < results["wall_time_s"]


def test_table_from_digits_and_mnist_idx_runs(runs, tmp_path):
  # A cifar10 run's results.json (made up, to check the comparison with published numbers).
  cifar = tmp_path / "cifar_fake"
  cifar.mkdir()
  results = json.loads((runs["digits"] / "results.json").read_text())
  results.update(dataset="cifar10", data_version="cifar10", n_bits=8, image_shape=[32, 32, 3],
                 bpd=3.5, split="vanilla")
  (cifar / "results.json").write_text(json.dumps(results))

  out = tmp_path / "table"
  md_path, json_path, rows = table.write_table(
      [str(runs["digits"]), str(runs["mnist_idx"]), str(cifar)], str(out)
  )
  assert (md_path, json_path) == (str(out / "bpd_table.md"), str(out / "bpd_table.json"))
  by_workdir = {os.path.basename(r["workdir"]): r for r in rows}
  assert set(by_workdir) == {"digits_eiw", "mnist_idx", "cifar_fake"}
  digits = by_workdir["digits_eiw"]
  measured = json.loads((runs["digits"] / "results.json").read_text())
  assert digits["bpd"] == measured["bpd"] and digits["steps"] == 4
  assert (digits["split"], digits["mode"], digits["backbone"]) == ("eiw", "global", "glow")
  assert digits["num_parameters"] == measured["num_parameters"]
  assert digits["published"] == {} and digits["benchmark"] is None  # nothing published
  mnist = by_workdir["mnist_idx"]
  assert (mnist["split"], mnist["mode"], mnist["steps"]) == ("vanilla", None, 2)
  fake = by_workdir["cifar_fake"]
  assert fake["benchmark"] == "CIFAR-10"
  assert fake["published"] == {"RealNVP": 3.49, "Glow": 3.35, "Flow++": 3.08, "DenseFlow": 2.98}
  assert fake["gap"]["Glow"] == pytest.approx(0.15)

  text = Path(md_path).read_text()
  header = text.splitlines()[0]
  for column in ("dataset", "backbone", "split", "mode", "steps", "wall time", "devices",
                 "params", "bpd", "Glow (gap)", "DenseFlow (gap)"):
    assert column in header
  assert "3.35 (+0.150)" in text
  assert f"{measured['bpd']:.4f}" in text
  for reference in ("arXiv:1605.08803", "arXiv:1807.03039", "arXiv:1902.00275",
                    "arXiv:2106.04627"):
    assert reference in text
  saved = json.loads(Path(json_path).read_text())
  assert len(saved["rows"]) == 3 and saved["skipped"] == []
  assert "| mnist_idx | mnist | glow | vanilla | - | 2 |" in text


def test_missing_and_corrupt_results_are_skipped_with_a_warning(runs, tmp_path):
  corrupt = tmp_path / "corrupt"
  corrupt.mkdir()
  (corrupt / "results.json").write_text('{"bpd": 1.2, "data')
  incomplete = tmp_path / "incomplete"
  incomplete.mkdir()
  (incomplete / "results.json").write_text('{"bpd": 1.2}')
  empty = tmp_path / "not_evaluated"
  empty.mkdir()
  paths = [str(runs["digits"]), str(corrupt), str(incomplete), str(empty),
           str(tmp_path / "nowhere")]
  rows, warnings = table.collect(paths)
  assert len(rows) == 1
  text = "\n".join(warnings)
  assert f"{corrupt}/results.json: unreadable (JSONDecodeError" in text
  assert f"{incomplete}/results.json: missing fields ['dataset', 'split', 'step', 'n_bits']" in text
  assert f"{empty}: no results.json in it or below" in text
  assert f"{tmp_path / 'nowhere'}: no such workdir" in text
  with pytest.raises(table.TableError, match="unreadable"):
    table.collect(paths, strict=True)
  with pytest.raises(table.TableError, match="No readable results.json"):
    table.collect([str(corrupt), str(empty)])


def test_command_line(runs, tmp_path):
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  corrupt = tmp_path / "corrupt"
  corrupt.mkdir()
  (corrupt / "results.json").write_text("not json")
  args = [sys.executable, "-m", "eiw_flow_jax.table", str(runs["digits"].parent), str(corrupt),
          f"--out={tmp_path / 'out'}"]
  result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "| digits | digits | glow | eiw | global | 4 |" in result.stdout
  assert "Skipped:" in result.stdout and "unreadable" in result.stdout
  assert (tmp_path / "out" / "bpd_table.md").is_file()
  assert (tmp_path / "out" / "bpd_table.json").is_file()
  result = subprocess.run([*args[:3], str(corrupt)], env=env, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 1 and result.stderr.startswith("error: No readable results.json")
  assert "Traceback" not in result.stderr


def test_denseflow_rows_compare_the_iwbo_when_evaluated(tmp_path):
  """DenseFlow's bpd is a bound: the IWBO (what the papers report) is compared when present."""
  common = {"dataset": "cifar10", "split": "eiw", "eiw_mode": "global", "step": 10,
            "n_bits": 8, "image_shape": [32, 32, 3], "backbone": "denseflow"}
  with_iwbo = tmp_path / "with_iwbo"
  with_iwbo.mkdir()
  (with_iwbo / "results.json").write_text(json.dumps(
      {**common, "bpd": 3.10, "elbo_bpd": 3.10, "iwbo_bpd": 3.05, "iwbo_k": 1000}))
  elbo_only = tmp_path / "elbo_only"
  elbo_only.mkdir()
  (elbo_only / "results.json").write_text(json.dumps({**common, "bpd": 3.20, "elbo_bpd": 3.20}))
  rows, warnings = table.collect([str(with_iwbo), str(elbo_only)])
  assert not warnings
  by_dir = {os.path.basename(r["workdir"]): r for r in rows}
  assert by_dir["with_iwbo"]["bpd"] == pytest.approx(3.05)
  assert by_dir["with_iwbo"]["measure"] == "IWBO k=1000"
  assert by_dir["with_iwbo"]["gap"]["DenseFlow"] == pytest.approx(3.05 - 2.98)
  assert by_dir["elbo_only"]["bpd"] == pytest.approx(3.20)
  assert by_dir["elbo_only"]["measure"] == "ELBO"
  assert "IWBO k=1000" in table.markdown(rows)
