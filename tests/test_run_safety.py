"""Runs that survive a pod: stop signals, the workdir lock, resume checks, failed saves, remote
workdirs, divergence; and the small API / CLI checks that came with them."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import REPO, copy_of_run, make_config
from test_train import assert_states_equal, cli_args, finalized_steps, restore, tiny_config

from eiw_flow_jax.commands import main
from eiw_flow_jax.config.schema import base_config
from eiw_flow_jax.data import pipeline
from eiw_flow_jax.model.flow import build_flow
from eiw_flow_jax.training import evaluate, resume, train_loop
from eiw_flow_jax.workdir import checkpointing, divergence, stop_signals, storage, workdir_lock

# ------------------------------------------------------------------------------------------------
# SIGTERM / SIGINT.


def _start(args, env):
  return subprocess.Popen(
      args, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )


def _signal_after_first_checkpoint(proc, workdir: str, signum: int) -> tuple[str, str]:
  """Signals `proc` once it has saved a new checkpoint (so it is surely in its training loop)."""
  before = set(finalized_steps(workdir))
  deadline = time.time() + 240
  while (
      not set(finalized_steps(workdir)) - before and proc.poll() is None
      and time.time() < deadline
  ):
    time.sleep(0.02)
  if proc.poll() is not None:
    stdout, stderr = proc.communicate()
    raise AssertionError(f"the run ended before it could be signalled: {stderr[-3000:]}")
  os.kill(proc.pid, signum)
  return proc.communicate(timeout=180)


def test_sigterm_saves_then_resume_matches_uninterrupted_run(tmp_path, data_dir, env):
  overrides = {"num_train_steps": 120, "checkpoint_every_steps": 20, "keep_checkpoints": 10}
  config = tiny_config(data_dir, **overrides)
  pipeline.prepare_dataset(config)  # once, before two runs start at the same time
  reference = str(tmp_path / "reference")
  proc = _start(cli_args(reference, data_dir, **overrides), env)
  workdir = str(tmp_path / "stopped")
  args = cli_args(workdir, data_dir, **overrides)

  stopped_at = []
  for signum in (signal.SIGTERM,):  # SIGINT takes the same path (test_stop_signals_...)
    stopper = _start(args, env)
    stdout, stderr = _signal_after_first_checkpoint(stopper, workdir, signum)
    if stopper.returncode == 0:  # finished before the signal landed: nothing to check
      break
    name = signal.Signals(signum).name
    assert stopper.returncode == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("stopped: ")]
    assert len(lines) == 1 and f"Stopped by {name} after step" in lines[0], stderr[-3000:]
    step = int(lines[0].split("after step ")[1].split(";")[0])
    assert step in finalized_steps(workdir), (step, finalized_steps(workdir))
    assert int(restore(config, workdir).step) == step
    assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))  # released
    stopped_at.append(step)
  assert stopped_at and all(s < 120 for s in stopped_at), stopped_at

  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  result = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert_states_equal(restore(config, workdir), restore(config, reference))
  with open(os.path.join(workdir, "results.json")) as f, open(
      os.path.join(reference, "results.json")
  ) as g:
    assert json.load(f)["bpd"] == pytest.approx(json.load(g)["bpd"], abs=1e-6)


def test_stop_signals_flag_and_restore_handlers():
  before = signal.getsignal(signal.SIGTERM)
  with stop_signals.StopSignals() as stop:
    assert not stop.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)
    assert stop.should_stop(2) and stop.received == signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) is before
  # Ctrl-C: the same flag; a second Ctrl-C aborts at once (KeyboardInterrupt, no save).
  with stop_signals.StopSignals() as stop:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)
    assert stop.should_stop(1) and stop.received == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.05)
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  assert stop_signals.StopRequested(signal.SIGINT, 3, "/w").exit_code == 130
  error = stop_signals.StopRequested(signal.SIGTERM, 7, "/w/checkpoints")
  assert error.exit_code == 143
  assert "Stopped by SIGTERM after step 7" in str(error)


# ------------------------------------------------------------------------------------------------
# The workdir lock.


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_workdir_lock_refuses_a_second_run_and_takes_over_stale_locks(tmp_path):
  workdir = str(tmp_path / "w")
  first = workdir_lock.WorkdirLock(workdir)
  first.acquire()
  try:
    with pytest.raises(workdir_lock.WorkdirBusyError) as info:
      workdir_lock.WorkdirLock(workdir).acquire()
    message = str(info.value)
    assert os.path.join(workdir, "LOCK") in message
    assert f"pid {os.getpid()}" in message and socket.gethostname() in message
    assert "started" in message
  finally:
    first.release()
  assert not os.path.exists(os.path.join(workdir, "LOCK"))

  lock_file = tmp_path / "w" / "LOCK"
  # A killed run on this host: its pid is gone, the lock is stale.
  lock_file.write_text(json.dumps(
      {"pid": _dead_pid(), "host": socket.gethostname(), "started": time.time(),
       "heartbeat": time.time(), "token": "x"}))
  with workdir_lock.WorkdirLock(workdir) as lock:
    assert json.loads(lock_file.read_text())["token"] == lock.token
  # Another host: alive while its heartbeat advances (tests/test_restarts.py); a heartbeat older
  # than stale_after is gone at once.
  holder = {"pid": 1, "host": "some-other-host", "started": time.time() - 99, "token": "y"}
  lock_file.write_text(json.dumps({**holder, "heartbeat": time.time() - 120}))
  started = time.monotonic()
  with workdir_lock.WorkdirLock(workdir, stale_after=60):
    pass
  assert time.monotonic() - started < 5
  # The heartbeat keeps a long run's lock fresh.
  with workdir_lock.WorkdirLock(workdir, heartbeat_interval=0.5) as lock:
    first_beat = json.loads(lock_file.read_text())["heartbeat"]
    time.sleep(1.2)
    assert json.loads(lock_file.read_text())["heartbeat"] > first_beat


def test_cli_refuses_a_busy_workdir(tmp_path, data_dir, env):
  workdir = tmp_path / "busy"
  workdir.mkdir()
  holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
            "heartbeat": time.time(), "token": "x"}
  (workdir / "LOCK").write_text(json.dumps(holder))
  result = subprocess.run(
      cli_args(str(workdir), data_dir), env=env, cwd=REPO, capture_output=True, text=True,
      timeout=240,
  )
  assert result.returncode == 1, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  line = [x for x in result.stderr.splitlines() if x.startswith("error: ")][0]
  assert "WorkdirBusyError" in line and str(workdir / "LOCK") in line
  assert f"pid {os.getpid()}" in line and "--take_over_lock" in line  # the way out, if gone
  assert not (workdir / "config.json").exists()


# ------------------------------------------------------------------------------------------------
# Resuming: saved config, architecture, non-finite state; failed saves; divergence.


def test_resume_with_a_different_config_is_refused_before_config_json_changes(
    trained, tmp_path, data_dir
):
  config, _ = trained
  workdir = copy_of_run(trained, tmp_path)
  saved = open(os.path.join(workdir, "config.json")).read()
  changed = tiny_config(
      data_dir, num_train_steps=30, checkpoint_every_steps=10, batch_size=32, seed=3,
      **{"model.n_bits": 4, "dataset.name": "mnist"},
  )
  with pytest.raises(resume.ConfigMismatchError) as info:
    train_loop.train(changed, workdir)
  message = str(info.value)
  for text in ("batch_size: saved 16, now 32", "seed: saved 0, now 3",
               "model.n_bits: saved 5, now 4", "dataset.name: saved 'digits', now 'mnist'",
               "--allow_config_change"):
    assert text in message, message
  assert "num_train_steps" not in message  # training longer is not a change of the run
  assert open(os.path.join(workdir, "config.json")).read() == saved
  assert not os.path.exists(os.path.join(workdir, "LOCK"))

  # An architecture change, allowed on purpose, still cannot restore: said so, not "corrupt";
  # and the workdir is as it was (config.json too), so the original command still resumes.
  wider = tiny_config(data_dir, num_train_steps=30, **{"model.hidden_channels": 16})
  with pytest.raises(checkpointing.CheckpointMismatchError) as info:
    train_loop.train(wider, workdir, allow_config_change=True)
  message = str(info.value)
  assert "another architecture" in message and "corrupt" not in message
  assert "(1, 8) in the checkpoint, (1, 16) in the model" in message, message  # K=1 stacked
  assert finalized_steps(workdir) == [10, 20]
  assert not os.path.exists(os.path.join(workdir, checkpointing.CORRUPT_DIR))
  assert open(os.path.join(workdir, "config.json")).read() == saved
  assert not os.path.exists(os.path.join(workdir, "config_history.jsonl"))
  assert train_loop.train(config, workdir).step == 20


def test_resume_with_another_worker_count_is_refused_even_when_allowed(trained, tmp_path,
                                                                      data_dir):
  workdir = copy_of_run(trained, tmp_path)
  workers = tiny_config(data_dir, num_train_steps=30, checkpoint_every_steps=10,
                        **{"dataset.worker_count": 2})
  with pytest.raises(resume.ConfigMismatchError) as info:
    train_loop.train(workers, workdir, allow_config_change=True)
  message = str(info.value)
  assert "dataset.worker_count: saved 0, now 2" in message, message
  assert "not even with --allow_config_change" in message, message
  assert finalized_steps(workdir) == [10, 20]
  assert not os.path.exists(os.path.join(workdir, checkpointing.CORRUPT_DIR))


def test_nonfinite_restored_state_is_refused(trained, tmp_path, data_dir):
  config, _ = trained
  workdir = copy_of_run(trained, tmp_path)
  state = restore(config, workdir)
  poisoned = state.replace(
      ema_params=jax.tree.map(lambda x: np.full_like(x, np.nan), state.ema_params)
  )
  manager = checkpointing.make_manager(workdir, keep=5, async_save=False)
  checkpointing.save(
      manager, 25, jax.tree.map(jnp.asarray, poisoned), pipeline.create_train_iterator(config)
  )
  manager.close()
  with pytest.raises(checkpointing.CheckpointError, match="non-finite values") as info:
    train_loop.train(tiny_config(data_dir, num_train_steps=30, checkpoint_every_steps=10), workdir)
  assert "step 25" in str(info.value) and "ema_params" in str(info.value)


def test_failed_save_is_one_line_and_earlier_checkpoints_stay(tmp_path, data_dir, monkeypatch):
  config = tiny_config(data_dir, num_train_steps=40, checkpoint_every_steps=10)
  workdir = str(tmp_path / "full")
  real_save = ocp.CheckpointManager.save

  def save(self, step, *args, **kwargs):
    if step >= 20:
      raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", save)
  with pytest.raises(storage.StorageError) as info:
    train_loop.train(config, workdir)
  message = str(info.value)
  assert "\n" not in message
  assert message.startswith("Cannot write the checkpoint of step 20 to ")
  assert os.path.join(workdir, "checkpoints") in message
  assert "No space left on device" in message
  assert finalized_steps(workdir) == [10]
  assert int(restore(config, workdir).step) == 10

  # A background (async) save that failed surfaces at the next check, named the same way.
  class Failing:
    directory = "/some/dir/checkpoints"

    def check_for_errors(self):
      raise RuntimeError("write failed") from OSError(errno.EACCES, "denied")

  with pytest.raises(storage.StorageError, match="Cannot write a checkpoint to "
                     "/some/dir/checkpoints: Permission denied"):
    checkpointing.check_saves(Failing())

  # An unwritable workdir (here: below a file) fails at once, naming it.
  blocker = tmp_path / "file"
  blocker.write_text("")
  with pytest.raises(storage.StorageError, match=f"Cannot write the workdir to {blocker}/run"):
    train_loop.train(config, str(blocker / "run"))


def test_divergence_is_an_error(trained, tmp_path, monkeypatch):
  with pytest.raises(divergence.DivergedError, match="not finite"):
    divergence.check_final_bpd(math.nan, 4.0, "/w")
  with pytest.raises(divergence.DivergedError, match="far above the initial train bpd 4.0000"):
    divergence.check_final_bpd(4.6, 4.0, "/w")
  divergence.check_final_bpd(4.4, 4.0, "/w")
  divergence.check_final_bpd(3.0, None, "/w")

  config, source = trained
  assert divergence.read_initial_bpd(source) == pytest.approx(4.5, abs=1.0)
  workdir = copy_of_run(trained, tmp_path)
  monkeypatch.setattr(evaluate, "evaluate_bpd", lambda *a, **k: (math.inf, 297))
  with pytest.raises(divergence.DivergedError):
    train_loop.train_and_evaluate(config, workdir)
  assert os.path.exists(os.path.join(workdir, "results.json"))  # written for inspection


# ------------------------------------------------------------------------------------------------
# Remote workdirs (gs:// through etils.epath + fsspec, with a local stand-in for the bucket).


def test_gs_workdir_end_to_end_with_a_local_stand_in(tmp_path, data_dir, monkeypatch):
  """gs://bucket/run: the same code path as on GCS (etils.epath's fsspec backend, Orbax's GCS
  handling, tensorboardX through runtime's epath writer), with fsspec's "gcs" protocol and
  TensorStore's paths pointed at a local directory instead of the network."""
  import fsspec
  from etils.epath import backend as epath_backend
  from fsspec.implementations.local import LocalFileSystem
  from orbax.checkpoint._src.path import gcs_utils
  from orbax.checkpoint._src.serialization import tensorstore_utils

  root = str(tmp_path / "bucket_root")

  def local(path: str) -> str:
    path = str(path)
    for prefix in ("gs://", "gcs://"):
      if path.startswith(prefix):
        return os.path.join(root, path[len(prefix):])
    return path

  class FakeGCS(LocalFileSystem):
    protocol = ("gcs", "gs")

    def __init__(self, *args, finalize_on_close=None, **kwargs):
      super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
      return LocalFileSystem._strip_protocol(local(path))

    def glob(self, path, **kwargs):  # object names relative to the store, as gcsfs returns
      return [os.path.relpath(p, root) for p in super().glob(path, **kwargs)]

  fsspec.register_implementation("gcs", FakeGCS, clobber=True)
  fsspec.register_implementation("gs", FakeGCS, clobber=True)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()
  # TensorStore (Orbax's array writer) gets the bucket's local directory instead of its GCS
  # driver; everything else in Orbax still sees gs:// paths.
  monkeypatch.setattr(
      tensorstore_utils, "_normalize_path", lambda path: os.path.normpath(local(path))
  )
  # Orbax asks the GCS API (google-cloud-storage) whether the bucket has a hierarchical namespace.
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
  try:
    config = tiny_config(data_dir, num_train_steps=20, checkpoint_every_steps=10)
    workdir = main.resolve_paths(config, "gs://bucket/runs/r1/")
    assert workdir == "gs://bucket/runs/r1"
    results = train_loop.train_and_evaluate(config, workdir)
    local_dir = os.path.join(root, "bucket", "runs", "r1")
    assert results["step"] == 20
    assert json.load(open(os.path.join(local_dir, "results.json")))["bpd"] == results["bpd"]
    assert json.load(open(os.path.join(local_dir, "config.json")))["batch_size"] == 16
    assert sorted(os.listdir(os.path.join(local_dir, "samples"))) == [
        "bpd_curves.png", "temperature_0.70.png", "temperature_1.00.png"]
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(local_dir))
    assert not os.path.exists(os.path.join(local_dir, "LOCK"))
    assert set(finalized_steps(local_dir)) >= {20}
    assert not os.path.exists(os.path.join(REPO, "gs:"))
    # Restores from the bucket, and a resumed run reads the same checkpoints.
    assert int(resume.restore_for_inference(config, workdir).step) == 20
    state = jax.device_get(resume.restore_for_inference(config, workdir).state)
    assert_states_equal(state, restore(config, local_dir))
  finally:
    fsspec.register_implementation("gcs", "gcsfs.GCSFileSystem", clobber=True)
    fsspec.register_implementation("gs", "gcsfs.GCSFileSystem", clobber=True)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()


def test_paths_stay_urls():
  config = base_config()
  config.dataset.data_dir = "gs://b/tfds"
  config.dataset.source_dir = "relative/src"
  assert main.resolve_paths(config, "s3://b/run") == "s3://b/run"
  assert config.dataset.data_dir == "gs://b/tfds"
  assert config.dataset.source_dir == os.path.abspath("relative/src")
  assert checkpointing.checkpoint_dir("gs://b/run") == "gs://b/run/checkpoints"
  for bad in ("", "  "):
    with pytest.raises(main.checks.ConfigError, match="--workdir must name a directory"):
      main.resolve_paths(base_config(), bad)


# ------------------------------------------------------------------------------------------------
# Python API and config checks.


def test_api_rejects_empty_batches_bad_y_and_bad_temperatures():
  from conftest import make_config

  flow = build_flow(make_config(steps=1))
  variables = flow.init(jax.random.PRNGKey(0), jnp.zeros((2, 8, 8, 1), jnp.uint8))
  with pytest.raises(ValueError, match="B=0"):
    flow.bpd(variables, jnp.zeros((0, 8, 8, 1), jnp.uint8), jax.random.PRNGKey(1))
  with pytest.raises(ValueError, match="B=0"):
    flow.log_prob(variables, jnp.zeros((0, 8, 8, 1)))
  for bad in (1.5, -0.1):
    with pytest.raises(ValueError, match=r"expected values in \[0, 1\]"):
      flow.log_prob(variables, jnp.full((1, 8, 8, 1), bad))
  for temperature in (math.nan, -1.0, math.inf):
    with pytest.raises(ValueError, match="temperature: expected a finite number >= 0"):
      flow.sample(variables, jax.random.PRNGKey(2), 2, temperature)
  with pytest.raises(ValueError, match="num: expected an int >= 1"):
    flow.sample(variables, jax.random.PRNGKey(2), 0)


def test_configs_are_locked():
  config = base_config()
  with pytest.raises(AttributeError, match="memroy"):
    config.model.memroy = 3
  with pytest.raises(AttributeError, match="batchsize"):
    config.batchsize = 3
  config.model.hidden_channels = 16  # existing fields still change
  assert tiny_config("/tmp").is_locked


def test_nonfinite_message_without_a_checkpoint(tmp_path, data_dir):
  config = tiny_config(data_dir, num_train_steps=2, checkpoint_every_steps=0,
                       max_consecutive_nonfinite=2)
  with pytest.raises(train_loop.NonFiniteError) as info:
    train_loop.train(config, str(tmp_path / "w"), nonfinite_steps=lambda step: True)
  assert "step None" not in str(info.value)
  assert "No checkpoint was saved yet in" in str(info.value)


CLI_ERRORS = {
    "unknown_field": (["--config.model.memroy=3"],
                      "--config.model.memroy names no config field ('memroy' is unknown; did you "
                      "mean 'memory'?)"),
    "unknown_field_no_hint": (["--config.model.zzqqxx=3"],
                              "--config.model.zzqqxx names no config field ('zzqqxx' is unknown)"),
    "missing_config": (["--config=configs/nonexistent.py"],
                       f"cannot load --config=configs/nonexistent.py: "
                       f"{os.path.join(REPO, 'configs', 'nonexistent.py')} does not exist; "
                       "expected a Python file that defines get_config()"),
    # A file that is not Python (the issue's --config=/etc/hostname): one line, no traceback.
    "not_python": (["--config=tests/fixtures/not_a_config.txt"],
                   "cannot load --config=tests/fixtures/not_a_config.txt: expected a Python "
                   "file that defines get_config() (e.g. configs/digits.py), optionally followed "
                   "by ':<argument>' for get_config(argument); loading it failed with NameError"),
    "no_get_config": (["--config=tests/fixtures/no_get_config.py"],
                      "cannot load --config=tests/fixtures/no_get_config.py: expected a Python "
                      "file that defines get_config()"),
    "directory": (["--config=configs"], f"{os.path.join(REPO, 'configs')} is not a file"),
    # path.py:argument calls get_config(argument); digits' get_config takes none.
    "argument_not_taken": (["--config=configs/digits.py:v5e_16"],
                           "cannot load --config=configs/digits.py:v5e_16: expected a Python file "
                           "that defines get_config()"),
    "empty_workdir": (["--workdir="], "--workdir must name a directory, got ''"),
}


@pytest.mark.parametrize("case", sorted(CLI_ERRORS))
def test_cli_one_line_errors(case, tmp_path, env):
  extra, expected = CLI_ERRORS[case]
  args = [sys.executable, "-m", "eiw_flow_jax.main", "--config=configs/digits.py",
          f"--workdir={tmp_path / 'w'}", *extra]
  result = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and expected in errors[0], result.stderr[-3000:]


def test_config_written_before_dtype_auto_resumes_under_the_new_default():
  """A config.json from before model.dtype="auto" saved "float32", which computes the same on
  float32 inputs; other dtypes still count as changes."""
  config = make_config()
  assert config.model.dtype == "auto"
  saved = json.loads(config.to_json())
  saved["model"]["dtype"] = "float32"
  assert resume.config_differences(saved, config) == []
  saved["model"]["dtype"] = "bfloat16"
  assert resume.config_differences(saved, config) == [("model.dtype", "bfloat16", "auto")]
