"""A preempted job always restarts, and no resume changes anything silently.

What an automatic restart loop meets on preemptible machines (SLURM requeues, recreated TPU VMs,
restarted containers, full disks, damaged files, changed commands), one case each: the
restarted run goes on by itself where the earlier one is provably gone, says in one line what it
did, and leaves the workdir telling the truth about the run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import REPO, copy_of_run
from disk_faults import full_disk
from test_train import cli_args, finalized_steps, tiny_config

import eiw_flow_jax
from eiw_flow_jax.commands import main
from eiw_flow_jax.training import evaluate, resume, sample_grids, train_loop
from eiw_flow_jax.workdir import (
    background_errors,
    checkpointing,
    config_history,
    stop_signals,
    storage,
    workdir_lock,
)


def _warnings(caplog, text: str = "") -> list[str]:
  return [r.getMessage() for r in caplog.records
          if r.levelno >= logging.WARNING and text in r.getMessage()]


def _lock_file(workdir) -> str:
  return os.path.join(workdir, workdir_lock.LOCK_FILE)


def _write_lock(workdir, **fields) -> str:
  record = {"pid": 12345, "host": "some-other-host", "started": time.time() - 99,
            "heartbeat": time.time(), "token": "earlier", **fields}
  os.makedirs(workdir, exist_ok=True)
  with open(_lock_file(workdir), "w") as f:
    json.dump(record, f)
  return _lock_file(workdir)


# ------------------------------------------------------------------------------------------------
# 1. A full disk at start leaves no lock behind; an empty lock is no live holder.


def test_a_full_disk_at_start_leaves_no_lock_and_an_empty_lock_is_taken_over(
    tmp_path, monkeypatch, caplog
):
  workdir = str(tmp_path / "small")
  with full_disk(workdir, monkeypatch) as (kind, free_space):
    with pytest.raises(storage.StorageError, match="No space left on device") as info:
      workdir_lock.WorkdirLock(workdir).acquire()
    assert "Cannot write the workdir lock" in str(info.value), (kind, info.value)
    assert [n for n in os.listdir(workdir) if n.startswith("LOCK")] == [], kind
    free_space()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING), workdir_lock.WorkdirLock(workdir):
      assert os.path.getsize(_lock_file(workdir)) > 0
    assert time.monotonic() - started < 5, kind
    assert _warnings(caplog) == [], caplog.text

  # An empty lock (what a full disk left before, or a crash right after creating it) is taken
  # over at once, saying so; so is one that is not JSON.
  for content in ("", "{\"pid\": 12"):
    empty = tmp_path / "w"
    empty.mkdir(exist_ok=True)
    (empty / "LOCK").write_text(content)
    caplog.clear()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING), workdir_lock.WorkdirLock(str(empty)) as lock:
      assert json.loads((empty / "LOCK").read_text())["token"] == lock.token
    assert time.monotonic() - started < 5
    lines = _warnings(caplog, "Taking over the workdir lock")
    assert len(lines) == 1 and "empty or unreadable" in lines[0], caplog.text


# ------------------------------------------------------------------------------------------------
# 2. Stale locks: SLURM requeues, recreated VMs, restarted containers; a live holder refuses.


def test_who_holds_a_lock_is_judged_from_what_it_recorded(tmp_path):
  here = workdir_lock.process_identity()
  now = time.time()
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  finished = subprocess.Popen([sys.executable, "-c", "pass"])
  finished.wait()
  try:
    same_host = {"host": here["host"], "boot_id": here["boot_id"],
                 "pid_namespace": here["pid_namespace"], "token": "t", "heartbeat": now,
                 "heartbeat_interval": 10.0}
    cases = {
        "empty": ({}, workdir_lock.GONE, "empty or unreadable"),
        # A restarted container: same hostname, same PID (1), another process.
        "this_pid_earlier_process": (
            {**same_host, "pid": here["pid"], "process_start": (here["process_start"] or 0) - 1},
            workdir_lock.GONE, "names this process's PID"),
        "this_pid_other_container": (
            {**same_host, "pid": here["pid"], "pid_namespace": "pid:[1]",
             "process_start": here["process_start"]},
            workdir_lock.GONE, "names this process's PID"),
        "this_very_process": (
            {**same_host, "pid": here["pid"], "process_start": here["process_start"]},
            workdir_lock.ALIVE, "this very process"),
        "ended": ({**same_host, "pid": finished.pid}, workdir_lock.GONE, "has ended"),
        "running": ({**same_host, "pid": sleeper.pid,
                     "process_start": workdir_lock.process_start(sleeper.pid)},
                    workdir_lock.ALIVE, "is running"),
        "pid_reused": ({**same_host, "pid": sleeper.pid,
                        "process_start": (workdir_lock.process_start(sleeper.pid) or 0) + 1},
                       workdir_lock.GONE, "now belongs to another process"),
        # A recreated VM with the same hostname: another boot.
        "rebooted": ({**same_host, "pid": sleeper.pid, "boot_id": "another-boot"},
                     workdir_lock.GONE, "has restarted since"),
        # Another container on this host: its PID means nothing here; this host's clock does.
        "other_container_silent": (
            {**same_host, "pid": 7, "pid_namespace": "pid:[1]", "heartbeat": now - 31},
            workdir_lock.GONE, "heartbeat stopped 31 s ago"),
        "other_container_beating": (
            {**same_host, "pid": 7, "pid_namespace": "pid:[1]"}, workdir_lock.WATCH,
            "another container"),
        "other_host": ({"host": "elsewhere", "pid": 7, "token": "t", "heartbeat": now},
                       workdir_lock.WATCH, "another host (elsewhere)"),
        "other_host_old": ({"host": "elsewhere", "pid": 7, "token": "t", "heartbeat": now - 700},
                           workdir_lock.GONE, "700 s old"),
    }
    for name, (holder, verdict, why) in cases.items():
      got, reason = workdir_lock.judge_holder(holder, here, now)
      assert (got, why in reason) == (verdict, True), (name, got, reason)

    # A SLURM job requeued onto another node: the earlier run of the job is gone.
    slurm = {**here, "slurm_job": "c/77", "slurm_restart": 2}
    holder = {"host": "node-a", "pid": 7, "token": "t", "heartbeat": now,
              "slurm_job": "c/77", "slurm_restart": 1}
    got, reason = workdir_lock.judge_holder(holder, slurm, now)
    assert got == workdir_lock.GONE and "earlier run of SLURM job c/77 (restart 1" in reason
    assert workdir_lock.judge_holder({**holder, "slurm_restart": 2}, slurm, now)[0] == (
        workdir_lock.WATCH)  # the same run of the job, elsewhere: maybe alive
  finally:
    sleeper.kill()
    sleeper.wait()


def test_restarts_take_over_a_gone_holder_at_once_and_refuse_a_live_one(tmp_path, caplog):
  workdir = str(tmp_path / "w")
  here = workdir_lock.process_identity()
  # The container restart: the lock names this host and this very PID, written by the
  # process that had it before.
  _write_lock(workdir, host=here["host"], pid=here["pid"], boot_id=here["boot_id"])
  started = time.monotonic()
  with caplog.at_level(logging.WARNING), workdir_lock.WorkdirLock(workdir):
    pass
  assert time.monotonic() - started < 5
  lines = _warnings(caplog, "Taking over the workdir lock")
  assert len(lines) == 1 and f"pid {here['pid']} on host {here['host']}" in lines[0], caplog.text
  assert "names this process's PID" in lines[0]

  # Another host that went silent (a preempted VM): watched for 3 heartbeats, then taken over.
  caplog.clear()
  _write_lock(workdir, heartbeat_interval=0.2)
  started = time.monotonic()
  with caplog.at_level(logging.WARNING), workdir_lock.WorkdirLock(workdir):
    pass
  assert 0.5 < time.monotonic() - started < 5
  lines = _warnings(caplog, "Taking over the workdir lock")
  assert len(lines) == 1 and "has not advanced for 1 s" in lines[0], caplog.text

  # Another host whose heartbeat advances: alive, refused, naming it.
  holder = workdir_lock.WorkdirLock(workdir, heartbeat_interval=0.1)
  holder.identity = {**holder.identity, "host": "some-other-host"}
  holder.acquire()
  try:
    with pytest.raises(workdir_lock.WorkdirBusyError) as info:
      workdir_lock.WorkdirLock(workdir).acquire()
    message = str(info.value)
    assert "some-other-host" in message and "heartbeat advanced" in message, message
    assert "--take_over_lock" in message
    # Taken over on purpose: one line; the holder learns it and stops before its next save.
    caplog.clear()
    with caplog.at_level(logging.WARNING), workdir_lock.WorkdirLock(workdir, take_over=True):
      lines = _warnings(caplog, "Taking over the workdir lock")
      assert len(lines) == 1 and "on request (take_over_lock)" in lines[0], caplog.text
      deadline = time.monotonic() + 5
      while holder.lost is None and time.monotonic() < deadline:
        time.sleep(0.05)
      with pytest.raises(workdir_lock.WorkdirBusyError, match="was taken over by another run"):
        workdir_lock.check_held(holder, workdir)
  finally:
    holder.release()
  assert not os.path.exists(_lock_file(workdir))  # the taker released it; the holder left it


def test_take_over_lock_on_the_command_line(trained, tmp_path, data_dir, env):
  """A lock held by a live process (this test; refused without the flag:
  test_cli_refuses_a_busy_workdir) is taken over with --take_over_lock, and the run goes on
  (here: the workdir is trained; it evaluates)."""
  workdir = copy_of_run(trained, tmp_path)
  _write_lock(workdir, host=socket.gethostname(), pid=os.getpid())
  args = cli_args(workdir, data_dir, num_train_steps=20, checkpoint_every_steps=10)
  result = subprocess.run([*args, "--take_over_lock"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [x for x in result.stderr.splitlines() if "Taking over the workdir lock" in x]
  assert len(lines) == 1 and f"pid {os.getpid()}" in lines[0], result.stderr[-3000:]
  assert os.path.exists(os.path.join(workdir, evaluate.RESULTS_FILE))
  assert not os.path.exists(_lock_file(workdir))


# ------------------------------------------------------------------------------------------------
# 4. The input position is verified like the arrays.


def test_a_changed_input_position_falls_back_to_the_previous_checkpoint(
    trained, tmp_path, data_dir, caplog
):
  workdir = copy_of_run(trained, tmp_path)
  position = os.path.join(workdir, checkpointing.CHECKPOINT_DIR, "20", checkpointing.DATA,
                          "process_0-of-1.json")
  with open(position) as f:
    text = f.read()
  changed = text.replace("20", "21")
  assert changed != text, text
  with open(position, "w") as f:
    f.write(changed)
  longer = tiny_config(data_dir, num_train_steps=30, checkpoint_every_steps=10)
  with caplog.at_level(logging.WARNING):
    train_loop.train(longer, workdir)
  lines = _warnings(caplog, "does not match the digest")
  assert len(lines) == 1, caplog.text
  assert lines[0].startswith("Checkpoint at step 20 in ")
  assert "the input position data/process_0-of-1.json does not match" in lines[0]
  assert "Resuming from checkpoint 10 instead of the corrupt newer one(s) [20]" in caplog.text
  assert os.listdir(os.path.join(workdir, checkpointing.CORRUPT_DIR))
  assert finalized_steps(workdir) == [10, 20, 30]


# ------------------------------------------------------------------------------------------------
# 5. Changes on resume are logged and kept; 7. a num_train_steps below the workdir's step.


def test_config_changes_on_resume_are_logged_and_kept_in_the_history(
    trained, tmp_path, data_dir, caplog
):
  workdir = copy_of_run(trained, tmp_path)
  changed = tiny_config(data_dir, num_train_steps=30, checkpoint_every_steps=10,
                        **{"optimizer.learning_rate": 5e-4})
  with caplog.at_level(logging.WARNING):
    results = train_loop.train_and_evaluate(changed, workdir)
  lines = _warnings(caplog, "Config changed on resume")
  assert lines == [
      f"Config changed on resume at step 20: num_train_steps 20 -> 30 (kept in {workdir}/"
      "config_history.jsonl).",
      f"Config changed on resume at step 20: optimizer.learning_rate 0.001 -> 0.0005 (kept in "
      f"{workdir}/config_history.jsonl).",
  ], caplog.text
  history = config_history.read(workdir)
  assert [(c["step"], c["field"], c["old"], c["new"]) for c in history] == [
      (20, "num_train_steps", 20, 30), (20, "optimizer.learning_rate", 1e-3, 5e-4)]
  assert resume.read_saved_config(workdir).optimizer.learning_rate == 5e-4
  assert results["config_changes"] == history  # results.json says what the run was

  # A later resume that only trains longer records just that.
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    train_loop.train(tiny_config(data_dir, num_train_steps=40, checkpoint_every_steps=10,
                                 **{"optimizer.learning_rate": 5e-4}), workdir)
  assert _warnings(caplog, "Config changed") == [
      f"Config changed on resume at step 30: num_train_steps 30 -> 40 (kept in {workdir}/"
      "config_history.jsonl)."], caplog.text
  assert len(config_history.read(workdir)) == 3


def test_num_train_steps_below_the_workdir_step_says_so(trained, tmp_path, data_dir, caplog):
  workdir = copy_of_run(trained, tmp_path)
  saved = open(os.path.join(workdir, resume.CONFIG_FILE)).read()
  with caplog.at_level(logging.WARNING):
    result = train_loop.train(tiny_config(data_dir, num_train_steps=10), workdir)
  assert result.step == 20
  lines = _warnings(caplog)
  assert len(lines) == 1, caplog.text
  assert lines[0].startswith("config.num_train_steps=10 is below the step of the workdir's "
                             "newest checkpoint (20): training nothing"), lines[0]
  assert open(os.path.join(workdir, resume.CONFIG_FILE)).read() == saved
  assert config_history.read(workdir) == []
  assert finalized_steps(workdir) == [10, 20]


# ------------------------------------------------------------------------------------------------
# 6. SIGTERM during the final evaluation or sampling.


@pytest.fixture
def sigterm_reaches_no_default_handler():
  """A SIGTERM that no handler of the run catches fails the test instead of killing pytest."""

  def unhandled(signum, frame):
    raise AssertionError("SIGTERM reached the default handler: the process would have died")

  previous = signal.signal(signal.SIGTERM, unhandled)
  yield
  signal.signal(signal.SIGTERM, previous)


def _sigterm_first(function):
  def wrapped(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)  # the handler runs in the main thread at the next bytecode
    return function(*args, **kwargs)
  return wrapped


@pytest.mark.usefixtures("sigterm_reaches_no_default_handler")
def test_sigterm_after_training_says_what_is_left_and_a_rerun_finishes(
    trained, tmp_path, data_dir, monkeypatch
):
  config, _ = trained
  workdir = copy_of_run(trained, tmp_path)
  checkpoints = checkpointing.checkpoint_dir(workdir)
  results_file = os.path.join(workdir, evaluate.RESULTS_FILE)
  phases = {  # where the signal lands -> what is left
      "end of training": (evaluate, "record_train_time", "results.json and the sample grids"),
      "evaluation": (evaluate, "evaluate_bpd", "results.json and the sample grids"),
      "sampling": (sample_grids, "_sample_fn", "the sample grids"),
  }
  for phase, (module, name, left) in phases.items():
    with monkeypatch.context() as patch:
      patch.setattr(module, name, _sigterm_first(getattr(module, name)))
      with pytest.raises(stop_signals.StopRequested) as info:
        train_loop.train_and_evaluate(config, workdir)
    message = str(info.value)
    assert info.value.exit_code == 143, phase
    assert message.startswith(f"Stopped by SIGTERM before writing {left}"), (phase, message)
    assert f"its checkpoint (step 20) is saved in {checkpoints}" in message, message
    assert "Run the same command again to finish" in message, message
    assert os.path.exists(results_file) == (phase == "sampling"), phase
    assert not os.path.exists(os.path.join(workdir, sample_grids.SAMPLES_DIR)), phase
  assert train_loop.train_and_evaluate(config, workdir)["step"] == 20  # the rerun finishes
  written = sorted(os.listdir(os.path.join(workdir, sample_grids.SAMPLES_DIR)))
  assert written == ["bpd_curves.png", "temperature_0.70.png", "temperature_1.00.png"], written

  # --mode=eval: nothing to save, nothing written.
  os.remove(results_file)
  with monkeypatch.context() as patch:
    patch.setattr(evaluate, "evaluate_bpd", _sigterm_first(evaluate.evaluate_bpd))
    with pytest.raises(stop_signals.StopRequested, match=(
        f"Stopped by SIGTERM before writing results.json; the checkpoints in {checkpoints} are "
        "unchanged. Run the same command again to write results.json.")):
      main.run(config, workdir, "eval")
  assert not os.path.exists(results_file)


# ------------------------------------------------------------------------------------------------
# 8. No warning on a normal resume; background tracebacks go to the log file only.


def test_a_normal_resume_and_every_read_print_no_warning(trained, tmp_path, caplog):
  """What a restart after a preemption does: the same command on a workdir whose newest
  checkpoint is behind num_train_steps. Orbax read the step's metadata from the wrong directory
  and warned on every read."""
  config, _ = trained
  workdir = copy_of_run(trained, tmp_path)
  shutil.rmtree(os.path.join(workdir, checkpointing.CHECKPOINT_DIR, "20"))
  with caplog.at_level(logging.WARNING):
    assert train_loop.train(config, workdir).step == 20
    assert resume.restore_for_inference(config, workdir).step == 20
    assert eiw_flow_jax.load(workdir).step == 20
  assert _warnings(caplog) == [], caplog.text


def test_a_dying_tensorboard_writer_thread_goes_to_the_log_file(tmp_path, capfd, monkeypatch):
  """On a full disk tensorboardX's writer thread dies with an OSError traceback (threading's
  excepthook), printed before the run's one-line error; it goes to checkpoint_errors.log."""
  from tensorboardX import SummaryWriter, record_writer

  console = []  # what reaches the hook that prints (pytest's own would hide it)
  monkeypatch.setattr(threading, "excepthook", lambda args: console.append(args.exc_type))
  writer = SummaryWriter(str(tmp_path / "events"))
  quiet = background_errors.quiet_background_errors(str(tmp_path))
  try:
    def full(self, data):
      raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
      patch.setattr(record_writer.RecordWriter, "write", full)
      writer.add_scalar("x", 1.0, 1)
      writer.file_writer.event_writer._worker.join(timeout=30)
    # Threads of our own keep their tracebacks.
    mine = threading.Thread(target=lambda: 1 / 0, name="ours")
    mine.start()
    mine.join()
  finally:
    quiet.uninstall()
  assert console == [ZeroDivisionError]
  assert "No space left on device" not in capfd.readouterr().err
  log = (tmp_path / background_errors.ERROR_LOG).read_text()
  assert "Exception in thread" in log and "OSError: [Errno 28] No space left on device" in log
  assert "tensorboardX" in log and "ZeroDivisionError" not in log


# ------------------------------------------------------------------------------------------------
# 9. Every path that reads a checkpoint verifies it.


def _tamper_with_a_digest(workdir: str, step: int) -> str:
  """Changes one array's digest in the record of checkpoint `step`: what verifying catches when
  the array's bytes changed. Returns the array's name."""
  record_file = os.path.join(workdir, checkpointing.CHECKPOINT_DIR, str(step),
                             checkpointing.DIGESTS, "metadata")
  with open(record_file) as f:
    record = json.load(f)
  name = next(n for n in sorted(record["arrays"]) if n.startswith("ema_params/"))
  index = next(iter(record["arrays"][name]))
  record["arrays"][name][index] = "0" * 64
  with open(record_file, "w") as f:
    json.dump(record, f)
  return name


def test_every_path_that_reads_a_checkpoint_verifies_it(trained, tmp_path, data_dir, caplog):
  config, _ = trained
  workdir = copy_of_run(trained, tmp_path)
  name = _tamper_with_a_digest(workdir, 20)
  paths = {
      "eval": lambda: main.run(config, workdir, "eval")["step"],
      "sample": lambda: (main.run(config, workdir, "sample"),
                         resume.restore_for_inference(config, workdir).step)[1],
      "load": lambda: eiw_flow_jax.load(workdir).step,
      "resume": lambda: train_loop.train(config, workdir).step,  # last: it moves step 20 aside
  }
  for path, read in paths.items():
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      step = read()
    lines = _warnings(caplog, "does not match the digest")
    assert lines and all(x.startswith("Checkpoint at step 20 in ") for x in lines), (path,
                                                                                     caplog.text)
    assert f"array {name} does not match" in lines[0], (path, lines[0])
    assert step == (20 if path == "resume" else 10), path  # resume trains step 20 again
  assert os.listdir(os.path.join(workdir, checkpointing.CORRUPT_DIR))
