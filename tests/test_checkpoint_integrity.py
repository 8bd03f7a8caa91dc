"""Checkpoints verified end to end (digests), a full disk, a read-only workdir (issue 26).

Flipped bytes in a checkpoint's data file that still decode (the storage layer has no checksum
on array data) are caught by the digests saved with the checkpoint: the run falls back to the
previous checkpoint and names the array. A disk that fills during a save ends the command
with one StorageError line, the last line of the output. Small filesystems are tmpfs mounts
(root only; the tests skip with the reason elsewhere).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys

import disk_faults
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import REPO, copy_of_run
from test_train import cli_args, finalized_steps, tiny_config

import eiw_flow_jax
from eiw_flow_jax.commands import main
from eiw_flow_jax.model.flow import build_flow
from eiw_flow_jax.training import evaluate, optimizer, resume, sharding, train_loop, train_state
from eiw_flow_jax.training.run import Run
from eiw_flow_jax.workdir import background_errors, checkpointing, digests, storage

# ------------------------------------------------------------------------------------------------
# Helpers.


@contextlib.contextmanager
def mounted_tmpfs(directory, options: str):
  """A tmpfs at `directory` (`options`: "size=800k", "ro", ...); skips where mounting fails."""
  os.makedirs(directory, exist_ok=True)
  result = subprocess.run(
      ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)],
      capture_output=True, text=True,
  )
  if result.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()[:200]}")
  try:
    yield str(directory)
  finally:
    subprocess.run(["umount", "-l", str(directory)], capture_output=True)


def _leaf_names(tree) -> list[str]:
  return ["/".join(digests.key_name(k) for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def flip_bytes_silently(step_dir: str, abstract_state, within: str = "") -> list[str]:
  """Flips 8 bytes inside one of the step's data files such that Orbax still restores
  it (the flip lands in array data, which has no checksum) but values change, in an array whose
  name starts with `within`. Returns the names of the arrays that changed. Candidates are tried
  in a fixed order (deterministic)."""
  state_dir = os.path.join(step_dir, checkpointing.STATE)
  checkpointer = ocp.StandardCheckpointer()
  original = jax.device_get(checkpointer.restore(state_dir, abstract_state))
  names = _leaf_names(original)
  files = sorted(glob.glob(os.path.join(state_dir, "**", "d", "*"), recursive=True),
                 key=os.path.getsize, reverse=True)
  assert files
  # Most flips land in compressed chunks and fail to decode (the storage layer's own check);
  # which file holds raw float data depends on how the save packed the chunks, so all files are
  # candidates, the largest first.
  for file in files:
    with open(file, "rb") as f:
      raw = f.read()
    for fraction in np.linspace(0.05, 0.95, 61):
      at = int(len(raw) * fraction)
      with open(file, "wb") as f:
        f.write(raw[:at] + bytes(b ^ 0xFF for b in raw[at:at + 8]) + raw[at + 8:])
      try:
        damaged = jax.device_get(checkpointer.restore(state_dir, abstract_state))
      except Exception:  # noqa: BLE001 - caught by the storage layer: not what we look for
        damaged = None
      if damaged is not None:
        changed = [
            name for name, a, b in zip(
                names, jax.tree.leaves(original), jax.tree.leaves(damaged), strict=True)
            if not np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)
        ]
        if any(name.startswith(within) for name in changed):
          return changed
      with open(file, "wb") as f:
        f.write(raw)
  pytest.fail(f"no flip of 8 bytes within 5-95% of a data file restored with changed values "
              f"of {within or 'any array'}")


# ------------------------------------------------------------------------------------------------
# Digests.


def test_every_checkpoint_carries_digests_of_its_arrays(trained):
  config, workdir = trained
  state = resume.restore_for_inference(config, workdir).state
  manager = checkpointing.make_manager(workdir, keep=5, read_only=True)
  try:
    record = manager.restore(20, args=ocp.args.Composite(
        **{checkpointing.DIGESTS: ocp.args.JsonRestore()}))[checkpointing.DIGESTS]
  finally:
    manager.close()
  assert record["format"] == 2 and record["algorithm"] == "sha256"
  assert sorted(record["arrays"]) == sorted(_leaf_names(state))
  with open(os.path.join(workdir, checkpointing.CHECKPOINT_DIR, "20", checkpointing.DATA,
                         "process_0-of-1.json")) as f:  # grain's file of the input position
    position = json.dumps(json.load(f), sort_keys=True, separators=(",", ":")).encode()
  assert record["positions"] == {"process_0-of-1": hashlib.sha256(position).hexdigest()}
  # A replicated state: one entry per array covering it whole, equal to a recomputation.
  assert record["arrays"] == digests.array_digests(state)
  assert record["arrays"]["step"] == {"": digests._sha256(np.asarray(20, np.int32))}
  assert digests.digest_mismatch(state, record) is None
  changed = jax.tree.map(np.array, jax.device_get(state))
  changed.params["level0_steps"]["layers_2"]["net"]["Conv_0"]["kernel"][0, 0, 0, 0, 0] += 1.0
  assert digests.digest_mismatch(changed, record) == (
      "params/level0_steps/layers_2/net/Conv_0/kernel")


def test_flipped_bytes_fall_back_to_the_previous_checkpoint_naming_the_array(
    trained, tmp_path, data_dir, caplog
):
  config, _ = trained
  workdir = copy_of_run(trained, tmp_path)
  flow, tx, mesh = build_flow(config), optimizer.make_optimizer(config), sharding.make_mesh()
  abstract = train_state.abstract_state(flow, tx, mesh)
  step_dir = os.path.join(workdir, checkpointing.CHECKPOINT_DIR, "20")
  changed = flip_bytes_silently(step_dir, abstract)

  # Eval/sample (read-only): falls back, moves nothing.
  with caplog.at_level(logging.WARNING):
    assert resume.restore_for_inference(config, workdir).step == 10
  lines = [r.getMessage() for r in caplog.records if "does not match the digest" in r.getMessage()]
  assert len(lines) == 1, caplog.text
  assert lines[0].startswith("Checkpoint at step 20 in ")
  assert f"is corrupt: array {changed[0]} does not match the digest saved with it" in lines[0]
  assert finalized_steps(workdir) == [10, 20]

  # Training resumes from step 10, quarantines step 20, and saves a good step 20 again.
  caplog.clear()
  longer = tiny_config(data_dir, num_train_steps=30, checkpoint_every_steps=10)
  with caplog.at_level(logging.WARNING):
    train_loop.train(longer, workdir)
  assert "Resuming from checkpoint 10 instead of the corrupt newer one(s) [20]" in caplog.text
  assert glob.glob(os.path.join(workdir, checkpointing.CORRUPT_DIR, "20-*"))
  assert finalized_steps(workdir) == [10, 20, 30]
  assert resume.restore_for_inference(longer, workdir).step == 30


def test_load_verifies_the_digests_of_what_it_reads(trained, tmp_path, caplog):
  """`eiw_flow_jax.load` reads only the EMA parameters and constants, and verifies them: a
  flipped byte in the EMA parameters of the newest checkpoint falls back to the one before,
  naming the array; with no checkpoint left, one CheckpointError line."""
  config, _ = trained
  workdir = copy_of_run(trained, tmp_path)
  step_dir = os.path.join(workdir, checkpointing.CHECKPOINT_DIR, "20")
  changed = flip_bytes_silently(step_dir, Run.build(config).abstract_state, within="ema_params/")
  expected = jax.device_get(resume.restore_for_inference(config, workdir).state.ema_params)
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    loaded = eiw_flow_jax.load(workdir)
  assert loaded.step == 10
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded.variables["params"]),
               expected)
  lines = [r.getMessage() for r in caplog.records if "does not match the digest" in r.getMessage()]
  assert len(lines) == 1 and lines[0].startswith("Checkpoint at step 20 in "), caplog.text
  named = lines[0].split(" is corrupt: array ")[1].split(" does not match")[0]
  assert named in changed and not named.startswith("params/"), (named, changed)
  assert finalized_steps(workdir) == [10, 20]  # read-only: nothing moved aside

  shutil.rmtree(os.path.join(workdir, checkpointing.CHECKPOINT_DIR, "10"))
  with pytest.raises(checkpointing.CheckpointError) as info:
    eiw_flow_jax.load(workdir)
  assert "\n" not in str(info.value)
  assert "None of the checkpoints [20]" in str(info.value)


def test_a_checkpoint_without_digests_restores_with_a_warning_naming_it(
    trained, tmp_path, caplog
):
  """Checkpoints saved before digests existed restore on every path (eval, `load`, sampling,
  training), unverified, with one warning naming the checkpoint on each."""
  config, _ = trained
  workdir = copy_of_run(trained, tmp_path)
  shutil.rmtree(os.path.join(workdir, checkpointing.CHECKPOINT_DIR, "20",
                             checkpointing.DIGESTS))
  expected = (f"Checkpoint at step 20 in {workdir}/checkpoints has no digests (saved by an "
              "older version): its values are not verified.")
  for read in (lambda: resume.restore_for_inference(config, workdir).step,
               lambda: eiw_flow_jax.load(workdir).step):
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      assert read() == 20
    warned = [r for r in caplog.records if r.getMessage() == expected]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING, caplog.text
  paths = {
      "sample": lambda: main.run(config, workdir, "sample"),
      "resume": lambda: train_loop.train(config, workdir),  # last: it trains on
  }
  for path, read in paths.items():
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      read()
    warned = [r for r in caplog.records if r.getMessage() == expected]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING, (path, caplog.text)
  assert finalized_steps(workdir) == [10, 20]


def test_cli_resume_after_silent_corruption(tmp_path, data_dir, env):
  """The issue's reproduction: digits, 60 steps, checkpoints at 20/40/60; bytes flipped in the
  newest; rerunning the command resumes from step 40 and exits 0, naming the array."""
  overrides = {"num_train_steps": 60, "checkpoint_every_steps": 20}
  config = tiny_config(data_dir, **overrides)
  workdir = str(tmp_path / "run")
  train_loop.train(config, workdir)
  flow, tx, mesh = build_flow(config), optimizer.make_optimizer(config), sharding.make_mesh()
  step_dir = os.path.join(workdir, checkpointing.CHECKPOINT_DIR, "60")
  changed = flip_bytes_silently(step_dir, train_state.abstract_state(flow, tx, mesh))

  result = subprocess.run(cli_args(workdir, data_dir, **overrides), env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [x for x in result.stderr.splitlines() if "does not match the digest" in x]
  assert len(lines) == 1 and "Checkpoint at step 60" in lines[0], result.stderr[-3000:]
  assert f"array {changed[0]} " in lines[0]
  assert "Resuming from checkpoint 40" in result.stderr
  assert "Traceback" not in result.stderr
  assert glob.glob(os.path.join(workdir, checkpointing.CORRUPT_DIR, "60-*"))
  assert finalized_steps(workdir)[-1] == 60


# ------------------------------------------------------------------------------------------------
# A full disk; a read-only workdir.


def test_disk_full_during_a_save_is_the_last_line(tmp_path, data_dir, env):
  """A 800 KB filesystem holds two tiny checkpoints (~330 KB each); the third save fails. Where
  no tmpfs can be mounted, the saves from step 30 on fail with ENOSPC (tests/disk_faults.py)."""
  small = str(tmp_path / "small")
  mounted = disk_faults.mount_tmpfs(small, "size=800k")
  try:
    workdir = os.path.join(small, "run")
    args = cli_args(workdir, data_dir, num_train_steps=60, checkpoint_every_steps=10,
                    keep_checkpoints=10)
    if not mounted:
      args = [sys.executable, os.path.join(REPO, "tests", "disk_faults.py"), "30", *args[3:]]
    result = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert lines[-1].startswith("error: StorageError: Cannot write the checkpoint of step "), (
        result.stderr[-3000:])
    assert lines[-1].endswith(
        f"to {workdir}/checkpoints: No space left on device (free space or use a larger disk "
        "/ a bucket)."), lines[-1]
    # The async save machinery went quietly: no traceback, no "Event loop is closed".
    assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr
    assert len(lines) < 30, result.stderr[-3000:]
    saved = finalized_steps(workdir)
    assert saved, lines[-1]
    failed = int(lines[-1].split("of step ")[1].split(" ")[0])
    assert failed not in saved and failed > saved[-1]
  finally:
    if mounted:
      disk_faults.unmount(small)


def test_eval_on_a_read_only_workdir_fails_before_evaluating(tmp_path, data_dir, monkeypatch):
  def evaluation_started(*args, **kwargs):
    raise AssertionError("the evaluation ran before the workdir was checked")

  monkeypatch.setattr(resume, "restore_for_inference", evaluation_started)
  monkeypatch.setattr(evaluate, "evaluate_and_write", evaluation_started)
  config = tiny_config(data_dir)
  if os.geteuid() != 0:
    workdir = tmp_path / "readonly"
    workdir.mkdir()
    workdir.chmod(0o555)
    context = contextlib.nullcontext(str(workdir))
  else:  # root writes through permission bits: a read-only mount instead
    context = mounted_tmpfs(tmp_path / "readonly", "ro,size=64k")
  with context as workdir:
    for mode, what in (("eval", "results"), ("sample", "sample grids")):
      with pytest.raises(storage.StorageError, match=f"Cannot write {what} to {workdir}"):
        main.run(config, workdir, mode)


def test_background_errors_go_to_the_log_file_not_the_console(tmp_path, capsys):
  """What quiets a failed async save: Orbax's ERROR records and the 'Event loop is closed'
  unraisables are appended to the workdir's log; other records and unraisables pass."""
  from absl import logging as absl_logging

  quiet = background_errors.quiet_background_errors(str(tmp_path))
  try:
    handler = absl_logging.get_absl_handler()
    orbax_record = logging.LogRecord(
        "absl", logging.ERROR, "/x/site-packages/orbax/checkpoint/future.py", 1,
        "_SignalingThread.run() raised an exception", None, None)
    own_record = logging.LogRecord(
        "absl", logging.ERROR, "/x/eiw_flow_jax/train_loop.py", 1, "our own error", None, None)
    assert not quiet.filter(orbax_record) and quiet.filter(own_record)
    assert handler.filters.count(quiet) == 1
    try:
      raise RuntimeError("Event loop is closed")
    except RuntimeError as e:
      error = e
    unraisable = type("U", (), {"exc_type": RuntimeError, "exc_value": error,
                                "exc_traceback": error.__traceback__, "object": None,
                                "err_msg": None})()
    sys.unraisablehook(unraisable)
    # tensorboardX's exit handler flushing again onto the full disk (frames: tensorboardX's).
    flush = compile("raise OSError(28, 'No space left on device')",
                    os.path.join("site-packages", "tensorboardX", "record_writer.py"), "exec")
    try:
      exec(flush)
    except OSError as e:
      error = e
    unraisable = type("U", (), {"exc_type": OSError, "exc_value": error,
                                "exc_traceback": error.__traceback__, "object": None,
                                "err_msg": "Exception ignored in atexit callback"})()
    sys.unraisablehook(unraisable)
  finally:
    quiet.uninstall()
  assert "Event loop is closed" not in capsys.readouterr().err
  log = (tmp_path / background_errors.ERROR_LOG).read_text()
  assert "_SignalingThread.run() raised an exception" in log
  assert "RuntimeError: Event loop is closed" in log and "our own error" not in log
  assert "OSError: [Errno 28] No space left on device" in log
  assert quiet.count == 3


def test_an_unawaited_write_coroutine_warns_into_the_log_file(tmp_path):
  """An aborted async save leaves a coroutine unawaited; Python warns at shutdown, after the
  error line. That warning goes to the log; other warnings still reach the console."""
  import gc
  import warnings

  async def write_fragment():
    pass

  shown = []
  with warnings.catch_warnings():
    warnings.simplefilter("always")
    warnings.showwarning = lambda message, *args, **kwargs: shown.append(str(message))
    quiet = background_errors.quiet_background_errors(str(tmp_path))
    try:
      coroutine = write_fragment()
      del coroutine
      gc.collect()
      warnings.warn("a warning of our own", UserWarning, stacklevel=1)
    finally:
      quiet.uninstall()
  assert shown == ["a warning of our own"]
  log = (tmp_path / background_errors.ERROR_LOG).read_text()
  assert "RuntimeWarning: coroutine" in log and "write_fragment" in log and "never awaited" in log
