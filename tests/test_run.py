"""The run assembled once (`training.run.Run`) for every path, and a workdir's saved config read
onto the schema (`resume.read_saved_config`, used by resuming and by `load`)."""

from __future__ import annotations

import ast
import json
import os
import pathlib

import jax
import numpy as np
import pytest
from conftest import REPO, copy_of_run, make_config
from test_train import finalized_steps, tiny_config

import eiw_flow_jax
from eiw_flow_jax.config import checks
from eiw_flow_jax.config.schema import base_config
from eiw_flow_jax.training import resume, train_loop

# ------------------------------------------------------------------------------------------------
# One assembly.

# What assembles a run, and the only module that may call it outside the module defining it.
ASSEMBLY = {
    "build_flow": "eiw_flow_jax/model/flow.py",
    "make_optimizer": "eiw_flow_jax/training/optimizer.py",
    "abstract_state": "eiw_flow_jax/training/train_state.py",
    "create_state": "eiw_flow_jax/training/train_state.py",
    "state_from_variables": "eiw_flow_jax/training/train_state.py",
    "restore_latest": "eiw_flow_jax/workdir/checkpointing.py",
}
RUN_MODULE = "eiw_flow_jax/training/run.py"
# The train step derives its in/out shardings from the same cached abstract state.
ALSO_ALLOWED = {("eiw_flow_jax/training/train_step.py", "abstract_state")}


def _module(path: str) -> str:
  return path[:-len(".py")].replace("/", ".")


def assembly_calls(root: pathlib.Path) -> list[str]:
  """'module: name' for each call of an ASSEMBLY function outside its module and the run's
  (imported by name, or through its module: `optimizer.make_optimizer(...)`)."""
  out = []
  for file in sorted((root / "eiw_flow_jax").rglob("*.py")):
    relative = file.relative_to(root).as_posix()
    tree = ast.parse(file.read_text(), str(file))
    names, modules = {}, {}  # local name -> function; module alias -> module
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module:
        for alias in node.names:
          full = f"{node.module}.{alias.name}"
          if any(_module(path) == node.module and name == alias.name
                 for name, path in ASSEMBLY.items()):
            names[alias.asname or alias.name] = alias.name
          modules[alias.asname or alias.name] = full
      elif isinstance(node, ast.Import):
        for alias in node.names:
          modules[alias.asname or alias.name] = alias.name
    for node in ast.walk(tree):
      if not isinstance(node, ast.Call):
        continue
      func, name = node.func, None
      if isinstance(func, ast.Name):
        name = names.get(func.id)
      elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        module = modules.get(func.value.id)
        if func.attr in ASSEMBLY and module == _module(ASSEMBLY[func.attr]):
          name = func.attr
      if name is None or relative in (ASSEMBLY[name], RUN_MODULE):
        continue
      if (relative, name) not in ALSO_ALLOWED:
        out.append(f"{relative}: {name}")
  return sorted(set(out))


def test_the_run_is_assembled_in_one_module():
  assert assembly_calls(pathlib.Path(REPO)) == [], (
      "build the flow, optimizer, state or restore through eiw_flow_jax.training.run.Run")


def test_the_assembly_check_catches_a_second_assembly(tmp_path):
  package = tmp_path / "eiw_flow_jax" / "commands"
  package.mkdir(parents=True)
  (package / "convert.py").write_text(
      "from eiw_flow_jax.training import optimizer\n"
      "def f(config):\n  return optimizer.make_optimizer(config)\n")
  (package / "aot.py").write_text(
      "from eiw_flow_jax.training.train_state import abstract_state as shapes\n"
      "def f(run):\n  return run.create_state(1), shapes(1, 2, 3)\n")
  assert assembly_calls(tmp_path) == ["eiw_flow_jax/commands/aot.py: abstract_state",
                                      "eiw_flow_jax/commands/convert.py: make_optimizer"]


# ------------------------------------------------------------------------------------------------
# The saved config.


def rewrite_config(workdir: str, change) -> None:
  path = os.path.join(workdir, resume.CONFIG_FILE)
  with open(path) as f:
    saved = json.load(f)
  change(saved)
  with open(path, "w") as f:
    json.dump(saved, f)


def test_config_from_saved_fills_fields_added_since():
  config = make_config(hidden=16)
  saved = json.loads(config.to_json())
  del saved["model"]["kernels"], saved["eval"], saved["prefetch_batches"]
  read = resume.config_from_saved(saved, "config.json")
  defaults = base_config()
  assert read.model.kernels == defaults.model.kernels
  assert read.eval.to_dict() == defaults.eval.to_dict()
  assert read.prefetch_batches == defaults.prefetch_batches
  assert read.model.hidden_channels == 16
  assert read.model.image_shape == (8, 8, 1) and isinstance(read.model.image_shape, tuple)


@pytest.mark.parametrize("change, expected", [
    (lambda s: s["model"].update(old_width=3), "fields this version does not define: "
     "model.old_width"),
    (lambda s: s.update(extra={"a": 1}), "fields this version does not define: extra"),
    (lambda s: s.update(batch_size="big"), "values of another type: batch_size='big' "
     "(expected int)"),
])
def test_config_from_saved_names_what_it_cannot_take(change, expected):
  saved = json.loads(make_config().to_json())
  change(saved)
  with pytest.raises(checks.ConfigError) as info:
    resume.config_from_saved(saved, "/w/config.json")
  message = str(info.value)
  assert message.startswith("/w/config.json holds ") and expected in message, message
  assert "\n" not in message


def test_an_old_config_json_lacking_fields_loads_and_resumes(trained, tmp_path, data_dir):
  config, _ = trained
  workdir = copy_of_run(trained, tmp_path)

  def strip(saved):
    del saved["model"]["kernels"], saved["eval"], saved["prefetch_batches"]

  rewrite_config(workdir, strip)
  loaded = eiw_flow_jax.load(workdir)
  assert loaded.step == 20
  assert loaded.config.model.kernels == base_config().model.kernels
  assert loaded.config.to_dict() == config.to_dict()
  # Resuming compares the current config with the saved one, defaults filled in: no change.
  train_loop.train(tiny_config(data_dir, num_train_steps=30, checkpoint_every_steps=10), workdir)
  assert finalized_steps(workdir)[-1] == 30


def test_a_config_json_with_an_unknown_field_is_one_line(trained, tmp_path, data_dir):
  workdir = copy_of_run(trained, tmp_path)
  rewrite_config(workdir, lambda saved: saved["model"].update(old_width=3))
  for read in (lambda: eiw_flow_jax.load(workdir),
               lambda: train_loop.train(tiny_config(data_dir, num_train_steps=30), workdir)):
    with pytest.raises(checks.ConfigError) as info:
      read()
    assert "model.old_width" in str(info.value) and "\n" not in str(info.value)
  assert finalized_steps(workdir) == [10, 20]


def test_load_without_config_json_says_what_to_pass(trained, tmp_path):
  config, _ = trained
  workdir = copy_of_run(trained, tmp_path)
  os.remove(os.path.join(workdir, resume.CONFIG_FILE))
  with pytest.raises(FileNotFoundError, match="No config.json in .*Pass config= to load"):
    eiw_flow_jax.load(workdir)
  loaded = eiw_flow_jax.load(workdir, config=config)
  assert loaded.step == 20
  state = resume.restore_for_inference(config, workdir).state
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded.variables["params"]),
               jax.device_get(state.ema_params))
