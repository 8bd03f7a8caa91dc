"""What every command does with its command line (eiw_flow_jax/commands/command_line.py):
--help exits 0, bad input is one line with exit 1 ("did you mean" for a misspelled field, also
when --config is left at its default), a workdir that is a file is named as such; and the
table counts its runs in words."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest
from conftest import REPO

from eiw_flow_jax.commands import command_line

CONFIGS = os.path.join(REPO, "configs")
COMMANDS = ("main", "convert", "table", "prepare", "aot")
SMALL_PT = os.path.join(REPO, "tests", "fixtures", "torch_state_dict_small.pt")


@pytest.fixture(scope="module")
def help_runs(env):
  """`python -m eiw_flow_jax.<command> --help` of every command, run at once."""
  procs = {
      command: subprocess.Popen(
          [sys.executable, "-m", f"eiw_flow_jax.{command}", "--help"], env=env, cwd=REPO,
          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for command in COMMANDS
  }
  return {command: (proc, *proc.communicate(timeout=300)) for command, proc in procs.items()}


@pytest.mark.parametrize("command", COMMANDS)
def test_help_exits_0_with_the_usage(command, help_runs):
  proc, stdout, stderr = help_runs[command]
  assert proc.returncode == 0, stderr[-3000:]
  assert f"eiw_flow_jax/commands/{command}.py:" in stdout, stdout[-3000:]  # its flags
  assert "Try --helpfull to get a list of all flags." in stdout


def test_requested_help_is_the_first_help_flag_before_a_double_dash():
  assert command_line.requested_help(["--config=x.py", "-?", "--helpfull"]) == "-?"
  assert command_line.requested_help(["--workdir=w"]) is None
  assert command_line.requested_help(["--", "--help"]) is None  # an argument, not a flag


# Each case: (command and its arguments, what the single "error: " line of stderr says).
_TEXT_FILE = "not_a_checkpoint.pt"
_ZIP_FILE = "some_archive.pt"
ERROR_CASES = {
    # --config left at its default (ml_collections applies the overrides while the flag is
    # defined, where this used to end in a traceback).
    "top_level_field_default_config": (
        ["main", "--workdir={tmp}/w", "--config.num_trian_steps=3"],
        "--config.num_trian_steps names no config field ('num_trian_steps' is unknown; did you "
        "mean 'num_train_steps'?). The fields are those of eiw_flow_jax/config/schema.py"),
    "nested_field_default_config": (
        ["main", "--workdir={tmp}/w", "--config.modl.n_bits=3"],
        "--config.modl.n_bits names no config field ('modl' is unknown; did you mean 'model'?)"),
    "workdir_is_a_file": (
        ["main", f"--config={CONFIGS}/digits.py", "--workdir={tmp}/" + _TEXT_FILE],
        "ConfigError: --workdir={tmp}/" + _TEXT_FILE + " is a file, not a directory"),
    "aot_field": (
        ["aot", "--config.model.num_level=2"],
        "('num_level' is unknown; did you mean 'num_levels'?)"),
    "convert_missing_checkpoint": (
        ["convert", f"--config={CONFIGS}/digits_denseflow.py", "--workdir={tmp}/w",
         "--torch_checkpoint={tmp}/missing.pt"],
        "FileNotFoundError: No such checkpoint: {tmp}/missing.pt"),
    "convert_missing_config": (
        ["convert", "--config={tmp}/nope.py", "--workdir={tmp}/w",
         f"--torch_checkpoint={SMALL_PT}"],
        "ConfigError: cannot load --config={tmp}/nope.py: {tmp}/nope.py does not exist"),
    "convert_field": (
        ["convert", f"--config={CONFIGS}/digits_denseflow.py", "--workdir={tmp}/w",
         f"--torch_checkpoint={SMALL_PT}", "--config.model.denseflow.growth_rat=3"],
        "('growth_rat' is unknown; did you mean 'growth_rate'?)"),
    "convert_not_a_checkpoint": (
        ["convert", f"--config={CONFIGS}/digits_denseflow.py", "--workdir={tmp}/w",
         "--torch_checkpoint={tmp}/" + _TEXT_FILE],
        "ConversionError: {tmp}/" + _TEXT_FILE + " is not a PyTorch checkpoint: torch.save "
        "writes a zip archive (torch >= 1.6) or a pickle (older torch), and this file is neither"),
    "convert_zip_without_pickle": (
        ["convert", f"--config={CONFIGS}/digits_denseflow.py", "--workdir={tmp}/w",
         "--torch_checkpoint={tmp}/" + _ZIP_FILE],
        "ConversionError: {tmp}/" + _ZIP_FILE + " is a zip archive but not a PyTorch checkpoint"),
    "convert_glow_config": (
        ["convert", f"--config={CONFIGS}/digits.py", "--workdir={tmp}/w",
         f"--torch_checkpoint={SMALL_PT}"],
        "ConversionError: The authors' checkpoints are DenseFlow models, but the config's "
        "model.backbone is 'glow'"),
    "convert_checkpoint_of_another_model": (
        ["convert", f"--config={CONFIGS}/digits_denseflow.py", "--workdir={tmp}/w",
         f"--torch_checkpoint={SMALL_PT}"],
        "ConversionError: Unexpected key 'a.weight'"),
    "convert_workdir_is_a_file": (
        ["convert", f"--config={CONFIGS}/digits_denseflow.py",
         "--workdir={tmp}/" + _TEXT_FILE, f"--torch_checkpoint={SMALL_PT}"],
        "is a file, not a directory"),
}


@pytest.fixture(scope="module")
def error_runs(tmp_path_factory, env):
  """Every error case at once (they import and fail), keyed by case name."""
  tmp = tmp_path_factory.mktemp("command_line_errors")
  (tmp / _TEXT_FILE).write_text("hello\n")
  with zipfile.ZipFile(tmp / _ZIP_FILE, "w") as archive:
    archive.writestr("readme.txt", "not a checkpoint")
  procs = {}
  for name, (args, _) in ERROR_CASES.items():
    command, *flags = (a.format(tmp=tmp) for a in args)
    procs[name] = subprocess.Popen(
        [sys.executable, "-m", f"eiw_flow_jax.{command}", *flags], env=env, cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  return tmp, {name: (proc, *proc.communicate(timeout=300)) for name, proc in procs.items()}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_errors_are_one_line(case, error_runs):
  tmp, runs = error_runs
  proc, _, stderr = runs[case]
  assert proc.returncode == 1, stderr[-3000:]
  assert "Traceback" not in stderr, stderr[-3000:]
  errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, stderr[-3000:]
  assert ERROR_CASES[case][1].format(tmp=tmp) in errors[0], errors[0]
  assert not os.path.exists(tmp / "w"), "nothing is written before the error"


@pytest.mark.parametrize("count, words", [(1, "(1 run)"), (2, "(2 runs)")])
def test_table_counts_its_runs_in_words(count, words, tmp_path, env):
  for index in range(count):
    workdir = tmp_path / f"run{index}"
    workdir.mkdir()
    (workdir / "results.json").write_text(json.dumps(
        {"bpd": 2.5, "dataset": "digits", "split": "eiw", "step": 10, "n_bits": 5}))
  result = subprocess.run(
      [sys.executable, "-m", "eiw_flow_jax.table", str(tmp_path), f"--out={tmp_path}"], env=env,
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.splitlines()[-1].endswith(f".json {words}."), result.stdout[-500:]
