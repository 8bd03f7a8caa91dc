"""bench/plot_runs.py turns TensorBoard events of a sweep into PNGs and a paired-comparison table.

The events are synthetic (written with tensorboardX exactly as train.py's _Reporter writes them),
so the test runs in seconds without training anything.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import load_bench_module, make_config
from tensorboardX import SummaryWriter

plot_runs = load_bench_module("plot_runs")

FINAL = {  # variant -> seed -> final test bpd
    "vanilla": {0: 2.50, 1: 2.54},
    "global": {0: 2.49, 1: 2.56},
    "per_example": {0: 2.44, 1: 2.45},
}


def _write_run(workdir, variant, seed):
  os.makedirs(workdir)
  split, mode = ("vanilla", "global") if variant == "vanilla" else ("eiw", variant)
  config = make_config(split=split, mode=mode)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config.to_dict(), f)
  writer = SummaryWriter(workdir)
  for step in (50, 100, 150):
    writer.add_scalar("train/bpd", 4.0 - step / 100, step)
    writer.add_scalar("shuffle/level0/factored_entropy", 1.4 - step / 1000 + seed / 100, step)
    if variant == "per_example":
      writer.add_scalar("shuffle/level0/weight_entropy", 1.0 - step / 1000, step)
      writer.add_scalar("shuffle/level0/non_identity_fraction", step / 200, step)
      for c in range(3):
        writer.add_scalar(f"shuffle/level0/stay_frequency/{c}", c / 3, step)
    if variant == "global":
      writer.add_scalar("shuffle/level0/g_entropy", 1.38, step)
      writer.add_scalar("shuffle/level0/mean_s_entropy", 1.2, step)
      perm = "0 1 2 3" if step < 150 else "2 3 0 1"
      writer.add_text("shuffle/level0/permutation", perm, step)
    if step == 100:
      writer.add_scalar("eval/bpd", FINAL[variant][seed] + 0.3, step)
  writer.close()
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({"bpd": FINAL[variant][seed], "step": 150}, f)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
  root = tmp_path_factory.mktemp("sweep")
  for variant, by_seed in FINAL.items():
    for seed in by_seed:
      _write_run(str(root / variant / f"seed{seed}"), variant, seed)
  return root


def test_events_are_read_back(sweep):
  run = plot_runs.Run(str(sweep / "global" / "seed0"))
  steps, values = run.series("shuffle/level0/g_entropy")
  np.testing.assert_array_equal(steps, [50, 100, 150])
  np.testing.assert_allclose(values, 1.38, rtol=1e-6)
  np.testing.assert_array_equal(run.test_bpd()[0], [100, 150])
  stats = run.global_permutation_stats(0)
  np.testing.assert_array_equal(stats["non_identity_fraction"][1], [0, 0, 1])
  np.testing.assert_array_equal(stats["stay_frequency/1"][1], [1, 1, 0])  # kept: first half
  np.testing.assert_array_equal(stats["stay_frequency/3"][1], [0, 0, 1])


def test_plots_and_table(sweep, tmp_path, capsys):
  out = tmp_path / "figures"
  written = plot_runs.main([str(sweep), "--out", str(out), "--prefix", "toy", "--table"])
  assert sorted(os.path.basename(p) for p in written) == [
      "toy_shuffle_level0.png", "toy_test_bpd.png"
  ]
  for path in written:
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(path) > 10_000
  table = capsys.readouterr().out
  assert "| per_example - vanilla | -0.0600 | -0.0900 | -0.0750 ± 0.0212 |" in table
  assert "| vanilla |" in table and "2.5200 ± 0.0283" in table


def test_empty_directory_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="No runs .* under"):
    plot_runs.main([str(tmp_path), "--out", str(tmp_path / "figures")])
