"""`python -m eiw_flow_jax.convert` without torch: .pt files are read, and a converted state_dict
becomes the Orbax TrainState checkpoint that the training loop writes and --mode=eval restores."""

from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest
from conftest import REPO
from test_denseflow_parity import config_from_fixture, load_case

from eiw_flow_jax.commands import convert
from eiw_flow_jax.model.backbones import denseflow_torch
from eiw_flow_jax.model.flow import build_flow
from eiw_flow_jax.training import optimizer, sharding, train_state
from eiw_flow_jax.workdir import checkpointing

SMALL_PT = os.path.join(REPO, "tests", "fixtures", "torch_state_dict_small.pt")


def test_reads_a_torch_file_without_torch(monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # any import of torch would fail
  state = denseflow_torch.state_dict_from(denseflow_torch.read_torch_file(SMALL_PT))
  # Saved by torch 2.13 from nn.DataParallel-style keys; one tensor is a transposed view.
  assert set(state) == {"a.weight", "b.bias", "c.num_batches_tracked", "d.weight"}
  np.testing.assert_array_equal(state["a.weight"], np.arange(12.0).reshape(3, 4).T)
  np.testing.assert_array_equal(state["b.bias"], [1.5, -2.0])
  assert state["c.num_batches_tracked"] == 7 and state["d.weight"].dtype == np.float64


def test_errors_name_the_problem(tmp_path):
  with pytest.raises(FileNotFoundError, match="No such checkpoint"):
    denseflow_torch.read_torch_file(str(tmp_path / "missing.pt"))
  with pytest.raises(denseflow_torch.ConversionError, match="Expected a state_dict"):
    denseflow_torch.state_dict_from([1, 2])


def test_files_only_torch_reads_say_so_in_one_line(tmp_path, monkeypatch):
  """An older torch's pickle, and a zip checkpoint holding other objects than tensors, need torch;
  without it the error says so (and not for a file that is no checkpoint: test_command_line)."""
  monkeypatch.setitem(sys.modules, "torch", None)  # any import of torch fails
  legacy = tmp_path / "legacy.pt"
  legacy.write_bytes(pickle.dumps({"a": 1}, protocol=2))
  with pytest.raises(denseflow_torch.TorchRequiredError,
                     match="can only be read with torch: it is in the pickle format of torch "
                           "before 1.6. Install it for the conversion: pip install torch=="):
    denseflow_torch.read_torch_file(str(legacy))
  objects = tmp_path / "objects.pt"
  with zipfile.ZipFile(objects, "w") as archive:
    archive.writestr("archive/data.pkl", pickle.dumps(argparse.Namespace(lr=1.0), protocol=2))
  with pytest.raises(denseflow_torch.TorchRequiredError, match="unsupported global argparse"):
    denseflow_torch.read_torch_file(str(objects))
  with pytest.raises(denseflow_torch.ConversionError, match="is not a file"):
    denseflow_torch.read_torch_file(str(tmp_path))


def test_convert_checkpoint_writes_a_restorable_train_state(tmp_path):
  _, cfg, weights = load_case("denseflow_vanilla_tiny")
  config = config_from_fixture(cfg)
  npz = tmp_path / "weights.npz"
  np.savez(npz, **weights)
  workdir = str(tmp_path / "work")
  reports = []
  convert.convert_checkpoint(str(npz), config, workdir, report=reports.append)
  assert reports == ["EIW channel order: no EIW transitions (vanilla split)."]
  assert os.path.exists(os.path.join(workdir, "config.json"))
  flow = build_flow(config)
  tx = optimizer.make_optimizer(config)
  mesh = sharding.make_mesh()
  manager = checkpointing.make_manager(workdir, keep=1, read_only=True)
  try:
    step, state = checkpointing.restore_latest(
        manager, train_state.abstract_state(flow, tx, mesh), quarantine=False)
  finally:
    manager.close()
  assert step == 0
  expected = denseflow_torch.convert_state_dict(weights, flow)
  got = jax.device_get(state.variables(ema=True))
  jax.tree.map(np.testing.assert_array_equal, got, expected)


def test_cli_requires_its_flags():
  out = subprocess.run([sys.executable, "-m", "eiw_flow_jax.convert"], cwd=REPO,
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=REPO))
  assert out.returncode != 0 and "torch_checkpoint" in out.stderr


def ties(tied: int, kept: int = 0, cross: int = 0, channels: int = 64) -> dict[str, int]:
  return {"channels": channels, "authors_tied_channels": tied,
          "authors_tied_kept_channels": kept, "authors_ties_cross_split": cross}


@pytest.mark.parametrize("found,expected", [
    ({"transition0": ties(0), "transition1": ties(0)}, "distinct at every transition"),
    ({"transition0": ties(0), "transition1": ties(9, channels=96)},
     "at transition1 9 of 96 channels (all factored); torch's unstable sort leaves the tied "
     "order undefined and their likelihood does not depend on it, their regulariser does"),
    ({"transition0": ties(4, kept=4), "transition1": ties(41, channels=144)},
     "at transition0 4 of 64 channels (4 kept); transition1 41 of 144 channels (all factored);"
     " torch's unstable sort leaves the tied order undefined and the authors' likelihood "
     "depends on their sort's implementation"),
    ({"transition0": ties(6, kept=2, cross=1)},
     "6 of 64 channels (crossing the kept/factored split)"),
], ids=["none", "factored", "kept", "cross"])
def test_weight_ties_are_reported_in_one_line(found, expected):
  line = denseflow_torch.describe_weight_ties(found)
  assert expected in line and "\n" not in line


def test_weight_ties_of_a_saturated_checkpoint():
  _, cfg, weights = load_case("denseflow_eiw_saturated_kept")
  flow = build_flow(config_from_fixture(cfg))
  found = denseflow_torch.authors_weight_ties(denseflow_torch.convert_state_dict(weights, flow))
  assert found == {"transition0": ties(45, channels=144)}
