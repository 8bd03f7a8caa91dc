"""Training: sharded step equivalence, kill-and-resume, corrupt checkpoints, non-finite guard.

The subprocess tests run the real command line on a tiny digits model and share a persistent
XLA compilation cache, so only the first process pays for compilation.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, with_test_xla_flags

from eiw_flow_jax.config.schema import base_config
from eiw_flow_jax.data import pipeline
from eiw_flow_jax.model.backbones import layouts
from eiw_flow_jax.model.flow import build_flow
from eiw_flow_jax.training import optimizer, resume, sharding, train_loop, train_state, train_step
from eiw_flow_jax.workdir import checkpointing

DIGITS = os.path.join(REPO, "configs", "digits.py")

# A tiny digits model: compiles quickly, a step takes milliseconds.
TINY = {
    "model.steps_per_level": 1,
    "model.hidden_channels": 8,
    "batch_size": 16,
    "eval_batch_size": 64,
    "init_batch_size": 64,
    "sample.num_samples": 4,
    "sample.temperatures": (0.7, 1.0),
    "log_every_steps": 50,
}


def tiny_config(data_dir: str, **overrides):
  """configs/digits.py with TINY and `overrides` ("a.b" keys), as the CLI would build it."""
  sys.path.insert(0, os.path.join(REPO, "configs"))
  try:
    import digits  # noqa: PLC0415 - the config file, found via the path above
  finally:
    sys.path.pop(0)
  config = digits.get_config()
  config.dataset.data_dir = data_dir
  for dotted, value in {**TINY, **overrides}.items():
    node = config
    *parents, leaf = dotted.split(".")
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def cli_args(workdir: str, data_dir: str, **overrides) -> list[str]:
  args = [sys.executable, "-m", "eiw_flow_jax.main", f"--config={DIGITS}", f"--workdir={workdir}"]
  for dotted, value in {**TINY, "dataset.data_dir": data_dir, **overrides}.items():
    if isinstance(value, tuple):
      value = "(" + ",".join(map(str, value)) + ",)"
    args.append(f"--config.{dotted}={value}")
  return args


def run_cli(args: list[str], env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
  result = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, result.stderr[-4000:]
  return result


def finalized_steps(workdir: str) -> list[int]:
  root = os.path.join(workdir, checkpointing.CHECKPOINT_DIR)
  if not os.path.isdir(root):
    return []
  return sorted(int(d) for d in os.listdir(root) if d.isdigit())


def restore(config, workdir: str):
  return jax.device_get(resume.restore_for_inference(config, workdir).state)


def assert_states_equal(a, b, atol: float = 1e-6) -> None:
  assert int(a.step) == int(b.step)
  for name in ("params", "ema_params", "opt_state"):
    leaves_a, leaves_b = jax.tree.leaves(getattr(a, name)), jax.tree.leaves(getattr(b, name))
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol, err_msg=name)


# ------------------------------------------------------------------------------------------------


def test_schedule_and_ema_decay():
  config = base_config()
  config.num_train_steps = 100
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 10
  schedule = optimizer.make_schedule(config)
  assert float(schedule(0)) == pytest.approx(1e-4)
  assert float(schedule(9)) == pytest.approx(1e-3)
  assert float(schedule(50)) == pytest.approx(1e-3)
  config.optimizer.cosine_decay = True
  config.optimizer.end_learning_rate_factor = 0.1
  schedule = optimizer.make_schedule(config)
  assert float(schedule(10)) == pytest.approx(1e-3)
  assert float(schedule(100)) == pytest.approx(1e-4, rel=1e-4)
  assert float(schedule(55)) == pytest.approx(0.55e-3, rel=1e-3)
  assert float(train_step._ema_decay(config, jax.numpy.asarray(0))) == pytest.approx(0.1)
  assert float(train_step._ema_decay(config, jax.numpy.asarray(10**6))) == pytest.approx(0.999)


EIGHT_DEVICES = textwrap.dedent(
    """
    import sys
    import jax, numpy as np
    sys.path.insert(0, {tests!r})
    from test_train import tiny_config
    from eiw_flow_jax.data import pipeline
    from eiw_flow_jax.model.flow import build_flow
    from eiw_flow_jax.training import optimizer, sharding, train_state, train_step

    assert jax.device_count() == 8, jax.devices()
    config = tiny_config({data_dir!r})
    flow, tx = build_flow(config), optimizer.make_optimizer(config)
    images = pipeline.load_examples(config, "train", 64)
    out = {{}}
    for n in (1, 8):
      mesh = sharding.make_mesh(jax.devices()[:n])
      state = train_state.create_state(config, flow, tx, mesh, images)
      step = train_step.make_train_step(config, flow, tx, mesh)
      losses = []
      for i in range(3):
        batch = sharding.global_batch(images[16 * i : 16 * (i + 1)], sharding.batch_sharding(mesh))
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
      assert len(batch.sharding.device_set) == n
      assert len(state.params["top_prior"]["mean"].sharding.device_set) == n
      out[n] = (np.array(losses), jax.device_get(state))
    (loss1, state1), (loss8, state8) = out[1], out[8]
    np.testing.assert_allclose(loss8, loss1, rtol=1e-6, atol=1e-6)
    for name in ("params", "ema_params", "opt_state"):
      pairs = zip(jax.tree.leaves(getattr(state1, name)), jax.tree.leaves(getattr(state8, name)))
      for a, b in pairs:
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    print("OK", loss1.tolist(), loss8.tolist())
    """
)


def test_train_step_on_8_devices_matches_1_device(data_dir, env):
  script = EIGHT_DEVICES.format(tests=os.path.join(REPO, "tests"), data_dir=data_dir)
  env8 = dict(env, XLA_FLAGS=with_test_xla_flags("--xla_force_host_platform_device_count=8"))
  result = run_cli([sys.executable, "-c", script], env8)
  assert "OK" in result.stdout


def test_kill_and_resume_matches_uninterrupted_run(tmp_path, data_dir, env):
  overrides = {"num_train_steps": 120, "checkpoint_every_steps": 20, "keep_checkpoints": 3}
  config = tiny_config(data_dir, **overrides)

  reference = str(tmp_path / "reference")
  run_cli(cli_args(reference, data_dir, **overrides), env)
  assert finalized_steps(reference) == [80, 100, 120]

  # Same command, SIGKILLed once it has written a checkpoint.
  workdir = str(tmp_path / "killed")
  args = cli_args(workdir, data_dir, **overrides)
  proc = subprocess.Popen(
      args, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  deadline = time.time() + 180
  while not finalized_steps(workdir) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  still_running = proc.poll() is None
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert still_running, "the run ended before it could be killed"
  assert proc.returncode == -signal.SIGKILL
  killed_at = finalized_steps(workdir)
  assert killed_at and killed_at[-1] < 120

  # Whatever the kill interrupted (maybe a save), a checkpoint directory is either finalised or
  # still carries Orbax's temporary name, and the newest finalised one restores.
  for name in os.listdir(os.path.join(workdir, checkpointing.CHECKPOINT_DIR)):
    assert name.isdigit() or "orbax-checkpoint-tmp" in name or name[0] in "._", name
  assert int(restore(config, workdir).step) == killed_at[-1]

  result = run_cli(args, env)
  assert "Final test bpd" in result.stdout
  assert_states_equal(restore(config, workdir), restore(config, reference))
  with open(os.path.join(workdir, "results.json")) as f, open(
      os.path.join(reference, "results.json")
  ) as g:
    assert json.load(f)["bpd"] == pytest.approx(json.load(g)["bpd"], abs=1e-6)

  # Corrupt the newest checkpoint of the finished reference run and run the command again:
  # it is reported, moved aside, the previous one is used, and training ends where it did.
  expected = restore(config, reference)
  latest = os.path.join(reference, checkpointing.CHECKPOINT_DIR, "120", "state")
  chunks = glob.glob(os.path.join(latest, "**", "d", "*"), recursive=True)
  assert chunks
  for chunk in chunks:
    os.truncate(chunk, 7)
  result = run_cli(cli_args(reference, data_dir, **overrides), env)
  assert "Checkpoint at step 120" in result.stderr
  assert "corrupt or incomplete" in result.stderr
  assert "Resuming from checkpoint 100" in result.stderr
  assert glob.glob(os.path.join(reference, checkpointing.CORRUPT_DIR, "120-*"))
  assert finalized_steps(reference)[-1] == 120
  assert_states_equal(restore(config, reference), expected)


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path, data_dir):
  config = tiny_config(
      data_dir, num_train_steps=40, checkpoint_every_steps=10, max_consecutive_nonfinite=4,
      log_every_steps=5,
  )
  workdir = str(tmp_path / "work")
  # Steps 3 and 4: isolated failures, skipped and counted. From step 15 on, every step fails.
  bad = lambda step: step in (3, 4) or step >= 15  # noqa: E731
  with pytest.raises(train_loop.NonFiniteError, match="4 consecutive training steps"):
    train_loop.train(config, workdir, nonfinite_steps=bad)
  # Step 10 was saved; step 20 never was; step 10's checkpoint is intact and good.
  assert finalized_steps(workdir) == [10]
  state = restore(config, workdir)
  assert int(state.step) == 10
  assert int(state.nonfinite_total) == 2
  assert int(state.nonfinite_consecutive) == 0
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(state.params))

  # A skipped step leaves params, EMA and optimizer state exactly as they were.
  flow, tx, mesh = build_flow(config), optimizer.make_optimizer(config), sharding.make_mesh()
  images = pipeline.load_examples(config, "train", 16)
  before = train_state.create_state(config, flow, tx, mesh, images)
  before_host = jax.device_get(before)
  poisoned = train_step.make_train_step(config, flow, tx, mesh, inject_nonfinite=True)
  after, metrics = poisoned(before, sharding.global_batch(images, sharding.batch_sharding(mesh)))
  after = jax.device_get(after)
  assert not bool(metrics["finite"])
  assert int(after.step) == 1
  assert int(after.nonfinite_total) == 1 and int(after.nonfinite_consecutive) == 1
  for name in ("params", "ema_params", "opt_state"):
    for x, y in zip(
        jax.tree.leaves(getattr(before_host, name)), jax.tree.leaves(getattr(after, name)),
        strict=True,
    ):
      np.testing.assert_array_equal(x, y)


def _unstack_steps(tree):
  """The inverse of layouts.stack_unrolled_steps: the layout saved before stacking."""
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      if key.startswith("level") and key.endswith("_steps"):
        level = key[len("level"):-len("_steps")]
        count = jax.tree.leaves(value)[0].shape[0]
        for k in range(count):
          out[f"level{level}_step{k}"] = jax.tree.map(lambda leaf, k=k: leaf[k], value)
      else:
        out[key] = _unstack_steps(value)
    return out
  if isinstance(tree, (list, tuple)):
    return type(tree)(_unstack_steps(item) for item in tree)
  return tree


def test_resume_from_the_unrolled_layout_is_refused_then_converted(tmp_path, data_dir):
  """A checkpoint saved before the steps of a level were stacked: one line naming the
  conversion; converted, it restores the same state and training continues."""
  config = tiny_config(data_dir, num_train_steps=2, checkpoint_every_steps=2,
                       **{"model.steps_per_level": 2})
  workdir = str(tmp_path / "stacked")
  train_loop.train(config, workdir)
  # The same checkpoint written in the old layout.
  old = str(tmp_path / "unrolled")
  import shutil

  shutil.copytree(workdir, old)
  state_dir = os.path.join(old, checkpointing.CHECKPOINT_DIR, "2", checkpointing.STATE)
  checkpointer = checkpointing.ocp.StandardCheckpointer()
  raw = checkpointer.restore(state_dir)
  assert "level0_steps" in raw["params"]
  shutil.rmtree(state_dir)
  checkpointer.save(state_dir, _unstack_steps(raw))
  checkpointer.wait_until_finished()
  checkpointer.close()

  longer = tiny_config(data_dir, num_train_steps=4, checkpoint_every_steps=2,
                       **{"model.steps_per_level": 2})
  with pytest.raises(checkpointing.CheckpointMismatchError) as info:
    train_loop.train(longer, old)
  message = str(info.value)
  assert "\n" not in message and "unrolled layout" in message, message
  assert "convert_unrolled_checkpoints" in message, message

  converted = str(tmp_path / "converted")
  assert checkpointing.convert_unrolled_checkpoints(old, converted) == [2]
  assert_states_equal(restore(config, converted), restore(config, workdir), atol=0)
  train_loop.train(longer, converted)
  assert finalized_steps(converted) == [2, 4]


def test_stack_unrolled_steps_converts_glow_and_denseflow_trees():
  import collections

  moments = collections.namedtuple("Moments", "mu nu")
  step = {"layers_0": {"bias": np.ones(3)}}
  tree = {"params": {"level0_step1": {"layers_0": {"bias": 2 * np.ones(3)}},
                     "level0_step0": step, "level0_split": {"theta": np.zeros(3)}},
          "opt": [moments(mu={"level1_step0": step}, nu=np.zeros(1))],
          "dense": {"unit0": {"layer1_actnorm": {"shift": np.ones(2)},
                              "layer0_actnorm": {"shift": np.zeros(2)},
                              "layer0_coupling": {"w": np.zeros(1)},
                              "layer1_coupling": {"w": np.ones(1)}}}}
  out = layouts.stack_unrolled_steps(tree)
  np.testing.assert_array_equal(out["params"]["level0_steps"]["layers_0"]["bias"],
                                [[1, 1, 1], [2, 2, 2]])
  assert set(out["params"]) == {"level0_steps", "level0_split"}
  assert isinstance(out["opt"][0], moments)
  assert out["opt"][0].mu["level1_steps"]["layers_0"]["bias"].shape == (1, 3)
  np.testing.assert_array_equal(out["dense"]["unit0"]["layers"]["actnorm"]["shift"],
                                [[0, 0], [1, 1]])
  assert set(out["dense"]["unit0"]) == {"layers"}
  with pytest.raises(ValueError, match=r"level0: expected steps 0..0, got \[1\]"):
    layouts.stack_unrolled_steps({"level0_step1": step})


@pytest.mark.parametrize("finite", [True, False])
def test_the_guarded_update_is_the_same_as_a_branch_or_a_select(finite):
  """train_step.guarded_update: the update if the step is finite, the state unchanged if not,
  whether it is taken in a branch (XLA:CPU) or as a select per leaf (TPU)."""
  state = {"a": jnp.arange(3.0), "b": (jnp.ones((2, 2)), jnp.zeros((), jnp.int32))}

  def update(s):
    return jax.tree.map(lambda x: x * 2 + 1, s)

  expected = update(state) if finite else state
  for branch in (True, False):
    out = jax.jit(lambda s, f, b=branch: train_step.guarded_update(f, update, s, branch=b))(
        state, jnp.asarray(finite))
    jax.tree.map(lambda o, e: np.testing.assert_array_equal(o, e), out, expected)
