"""Training: sharded step equivalence, kill-and-resume, corrupt checkpoints, non-finite guard.

The subprocess tests run the real command line on a tiny digits model and share a persistent
XLA compilation cache, so only the first process pays for compilation.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
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

import eiw_flow_jax
from eiw_flow_jax.config.schema import base_config
from eiw_flow_jax.data import pipeline
from eiw_flow_jax.model.backbones import layouts
from eiw_flow_jax.model.flow import build_flow
from eiw_flow_jax.training import (
    optimizer,
    reporting,
    resume,
    sharding,
    train_loop,
    train_state,
    train_step,
)
from eiw_flow_jax.training.run import Run
from eiw_flow_jax.workdir import checkpointing, digests

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
    from eiw_flow_jax.training import sharding
    from eiw_flow_jax.training.run import Run

    assert jax.device_count() == 8, jax.devices()
    config = tiny_config({data_dir!r})
    images = pipeline.load_examples(config, "train", 64)
    out = {{}}
    for n in (1, 8):
      mesh = sharding.make_mesh(jax.devices()[:n])
      run = Run.build(config, mesh)
      state = run.create_state(images)
      step = run.train_step()
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
  """The inverse of Glow's `Flow.migrate_layout`: the layout saved before stacking."""
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


def write_unrolled_copy(workdir: str, old: str) -> None:
  """`old`: a copy of `workdir` whose checkpoints hold the layout saved before the steps of a
  level were stacked, with digests of that layout (as such checkpoints were written)."""

  def unroll(raw):
    assert "level0_steps" in raw["params"]
    return _unstack_steps(raw)

  rewrite_checkpoints_of_copy(workdir, old, unroll)


def rewrite_checkpoints_of_copy(workdir: str, old: str, rewrite) -> None:
  """`old`: a copy of `workdir` whose checkpoints' states are `rewrite(state)`, each with
  digests of what it now holds (as checkpoints of that form were written)."""
  shutil.copytree(workdir, old)
  for step in finalized_steps(old):
    step_dir = os.path.join(old, checkpointing.CHECKPOINT_DIR, str(step))
    state_dir = os.path.join(step_dir, checkpointing.STATE)
    with checkpointing.ocp.StandardCheckpointer() as checkpointer:
      state = rewrite(checkpointer.restore(state_dir))
      shutil.rmtree(state_dir)
      checkpointer.save(state_dir, state)
    with open(os.path.join(step_dir, checkpointing.DIGESTS, "metadata"), "w") as f:
      json.dump(digests.digest_record(state), f)


def test_a_checkpoint_of_the_unrolled_layout_resumes_directly(tmp_path, data_dir, caplog):
  """A checkpoint saved before the steps of a level were stacked: verified against its own
  digests, migrated through the flow, and training goes on; its next checkpoints are in the
  current layout with digests that verify."""
  config = tiny_config(data_dir, num_train_steps=2, checkpoint_every_steps=2,
                       **{"model.steps_per_level": 2})
  workdir = str(tmp_path / "stacked")
  train_loop.train(config, workdir)
  old = str(tmp_path / "unrolled")
  write_unrolled_copy(workdir, old)

  # Eval and `load` read it as it is.
  with caplog.at_level(logging.WARNING):
    assert_states_equal(restore(config, old), restore(config, workdir), atol=0)
  assert "holds an older parameter layout: migrated" in caplog.text
  assert "corrupt" not in caplog.text
  loaded = eiw_flow_jax.load(old)
  assert loaded.step == 2
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded.variables["params"]),
               jax.device_get(restore(config, workdir).ema_params))

  # Training resumes from it (the input position included) and saves in the current layout.
  longer = tiny_config(data_dir, num_train_steps=4, checkpoint_every_steps=2,
                       **{"model.steps_per_level": 2})
  train_loop.train(longer, old)
  train_loop.train(longer, workdir)
  assert finalized_steps(old) == [2, 4]
  assert_states_equal(restore(longer, old), restore(longer, workdir), atol=0)
  manager = checkpointing.make_manager(old, keep=5, read_only=True)
  try:
    assert checkpointing.architecture_differences(
        manager, 4, restore(longer, workdir)) == []
  finally:
    manager.close()


def test_converted_unrolled_checkpoints_carry_fresh_digests(tmp_path, data_dir, caplog):
  """The explicit offline conversion writes the current layout with digests of what it wrote
  (the digests it read name the old layout), so the converted checkpoint verifies."""
  config = tiny_config(data_dir, num_train_steps=2, checkpoint_every_steps=2,
                       **{"model.steps_per_level": 2})
  workdir = str(tmp_path / "stacked")
  train_loop.train(config, workdir)
  old = str(tmp_path / "unrolled")
  write_unrolled_copy(workdir, old)

  converted = str(tmp_path / "converted")
  assert resume.convert_unrolled_checkpoints(old, converted) == [2]
  manager = checkpointing.make_manager(converted, keep=5, read_only=True)
  try:
    record = manager.restore(2, args=checkpointing.ocp.args.Composite(
        **{checkpointing.DIGESTS: checkpointing.ocp.args.JsonRestore()}))[checkpointing.DIGESTS]
  finally:
    manager.close()
  expected = restore(config, workdir)
  assert digests.digest_mismatch(expected, record) is None
  with caplog.at_level(logging.WARNING):
    assert_states_equal(restore(config, converted), expected, atol=0)
  for unexpected in ("corrupt", "no digests", "migrated"):  # verified as it is
    assert unexpected not in caplog.text, caplog.text
  longer = tiny_config(data_dir, num_train_steps=4, checkpoint_every_steps=2,
                       **{"model.steps_per_level": 2})
  train_loop.train(longer, converted)
  assert finalized_steps(converted) == [2, 4]


def _small_denseflow_config():
  """A DenseFlow of two scales, every width and depth at its smallest (compiles quickly)."""
  config = base_config()
  config.model.backbone = "denseflow"
  df = config.model.denseflow
  df.block_conf, df.layers_conf, df.layer_mid_chnls = (2, 1), (1, 1), (4, 4)
  df.growth_rate = df.coupling_depth = df.dequant_steps = df.dequant_depth = 1
  df.dequant_context_depth = 1
  df.coupling_growth = df.dequant_context_channels = df.dequant_mid_channels = 4
  df.dequant_growth = df.dequant_context_growth = 4
  return config


def test_migrate_layout_converts_older_glow_and_denseflow_trees():
  import collections

  moments = collections.namedtuple("Moments", "mu nu")
  glow = build_flow(base_config())
  step = {"layers_0": {"bias": np.ones(3)}}
  tree = {"params": {"level0_step1": {"layers_0": {"bias": 2 * np.ones(3)}},
                     "level0_step0": step, "level0_split": {"theta": np.zeros(3)}},
          "opt": [moments(mu={"level1_step0": step}, nu=np.zeros(1))]}
  out = glow.migrate_layout(tree)
  np.testing.assert_array_equal(out["params"]["level0_steps"]["layers_0"]["bias"],
                                [[1, 1, 1], [2, 2, 2]])
  assert set(out["params"]) == {"level0_steps", "level0_split"}
  assert isinstance(out["opt"][0], moments)
  assert out["opt"][0].mu["level1_steps"]["layers_0"]["bias"].shape == (1, 3)
  assert glow.migrate_layout(out) is out  # already current: the same tree
  with pytest.raises(layouts.LayoutError, match=r"level0_steps: expected steps 0..0, got \[1\]"):
    glow.migrate_layout({"level0_step1": step})

  denseflow = build_flow(_small_denseflow_config())
  tree = {"dense": {"unit0": {"layer1_actnorm": {"shift": np.ones(2)},
                              "layer0_actnorm": {"shift": np.zeros(2)},
                              "layer0_coupling": {"w": np.zeros(1)},
                              "layer1_coupling": {"w": np.ones(1)}}}}
  out = denseflow.migrate_layout(tree)
  np.testing.assert_array_equal(out["dense"]["unit0"]["layers"]["actnorm"]["shift"],
                                [[0, 0], [1, 1]])
  assert set(out["dense"]["unit0"]) == {"layers"}
  assert denseflow.migrate_layout(out) is out
  with pytest.raises(layouts.LayoutError, match="layers/coupling/w: the layers have different "
                     r"shapes: \[\(1,\), \(2,\)\]"):
    denseflow.migrate_layout({"layer0_coupling": {"w": np.zeros(1)},
                              "layer1_coupling": {"w": np.zeros(2)}})


@pytest.mark.parametrize("backbone", ["glow", "denseflow"])
def test_permutation_changes_are_reported_for_every_shared_split_order(backbone):
  """`perm_changed/level{i}`: whether split i's channel order (Glow's `global` splits,
  DenseFlow's EIW transitions) changed in the step. The first split starts with all logits
  equal (the identity order), so its first update changes it."""
  config = _small_denseflow_config() if backbone == "denseflow" else tiny_config("unused")
  config.model.image_shape = (8, 8, 1)
  config.model.eiw.reduction = 2
  config.optimizer.warmup_steps = 0
  flow, tx, mesh = build_flow(config), optimizer.make_optimizer(config), sharding.make_mesh()
  images = np.random.RandomState(0).randint(0, 2**config.model.n_bits, (16, 8, 8, 1))
  images = images.astype(np.uint8)
  variables = flow.init(jax.random.PRNGKey(0), images)
  params = jax.tree.map(np.asarray, variables["params"])
  if backbone == "glow":
    assert not params["level0_split"]["theta"].any()  # zero-initialised
  else:
    params["transition0"]["wg_fc2"] = np.zeros_like(params["transition0"]["wg_fc2"])
  variables = {**variables, "params": params}
  shardings = sharding.state_shardings(mesh, train_state.abstract_state(flow, tx, mesh))
  state = jax.jit(lambda v: train_state.state_from_variables(tx, v), out_shardings=shardings)(
      variables)  # jitted: the EMA gets buffers of its own (the step donates both)
  before = jax.device_get(flow.split_permutations(variables))
  step = train_step.make_train_step(config, flow, tx, mesh)
  state, metrics = step(state, sharding.global_batch(images, sharding.batch_sharding(mesh)))
  after = jax.device_get(flow.split_permutations(
      {"params": state.params, "constants": state.constants}))
  splits = len(flow.latent_shapes) - 1
  assert sorted(before) == sorted(after) == list(range(splits))
  changed = {name: int(value) for name, value in metrics.items() if name.startswith("perm_")}
  assert changed == {f"perm_changed/level{i}": int(np.any(before[i] != after[i]))
                     for i in range(splits)}
  assert changed["perm_changed/level0"] == 1
  _, changes = reporting.summarise([jax.device_get(metrics)])
  assert changes == {i: changed[f"perm_changed/level{i}"] for i in range(splits)}


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


def write_copy_with_ema(workdir: str, old: str) -> None:
  """`old`: a copy of `workdir` (a run with `ema_decay` 0) whose checkpoints also hold an EMA
  copy of the parameters, with digests of it: as such runs saved them before the state held no
  EMA without one."""

  def add_ema(raw):
    assert not jax.tree.leaves(raw.get("ema_params"))
    raw["ema_params"] = jax.tree.map(lambda p: p + 1.0, raw["params"])
    return raw

  rewrite_checkpoints_of_copy(workdir, old, add_ema)


def test_a_run_without_ema_holds_no_copy_and_reads_checkpoints_that_have_one(
    tmp_path, data_dir, caplog):
  """`ema_decay` 0: the train state holds no EMA copy (in memory, in its checkpoints, in the
  abstract state the compiles use), `load` and eval read the raw parameters; checkpoints saved
  with a copy (before) still restore, load and resume, their copy left unread."""
  config = tiny_config(data_dir, num_train_steps=2, checkpoint_every_steps=2, ema_decay=0.0)
  assert Run.build(config).abstract_state.ema_params is None
  workdir = str(tmp_path / "no_ema")
  result = train_loop.train(config, workdir)
  assert result.state.ema_params is None
  step_dir = os.path.join(workdir, checkpointing.CHECKPOINT_DIR, "2", checkpointing.STATE)
  with checkpointing.ocp.StandardCheckpointer() as checkpointer:
    assert not jax.tree.leaves(checkpointer.restore(step_dir).get("ema_params"))
  state = restore(config, workdir)
  assert state.ema_params is None
  loaded = eiw_flow_jax.load(workdir)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded.variables["params"]),
               state.params)

  old = str(tmp_path / "with_ema")
  write_copy_with_ema(workdir, old)
  with caplog.at_level(logging.WARNING):
    assert_states_equal(restore(config, old), state, atol=0)
    loaded = eiw_flow_jax.load(old)
  assert "corrupt" not in caplog.text
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded.variables["params"]),
               state.params)
  longer = tiny_config(data_dir, num_train_steps=4, checkpoint_every_steps=2, ema_decay=0.0)
  train_loop.train(longer, old)
  assert finalized_steps(old) == [2, 4]
  assert "corrupt" not in caplog.text


def test_the_compiler_options_reach_the_train_and_eval_steps(data_dir):
  """`config.compiler` is passed to the jitted train and eval steps (XLA:CPU ignores the
  effort, so the numbers are the same as with XLA's defaults; the TPU compiler's other program
  is checked in test_loop_cost). Each setting is its own cached eval step."""
  images = np.random.default_rng(0).integers(0, 32, (16, 8, 8, 1)).astype(np.uint8)  # 5 bits
  outputs = []
  for effort in (0.0, -1.0):
    run = Run.build(tiny_config(data_dir, **{"compiler.exec_time_optimization_effort": effort}))
    state = run.create_state(images)
    batch = sharding.global_batch(images, sharding.batch_sharding(run.mesh))
    eval_step = run.eval_step()
    bpd_sum, count = eval_step(state.variables(ema=True), batch,
                               jnp.ones((16,), bool), jax.random.PRNGKey(1))
    state, metrics = run.train_step()(state, batch)
    outputs.append((eval_step, float(bpd_sum), int(count), float(metrics["loss"])))
  (default_step, *default), (least_step, *least) = outputs
  assert default_step is not least_step
  assert least == pytest.approx(default, rel=1e-6) and default[1] == 16
