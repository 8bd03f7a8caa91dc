"""What a run reports besides its checkpoints: TensorBoard events read back, the bits/dim curves
drawn from them, the progress bar, and sample grids that show (and count) values that are not
finite instead of turning them into black pixels."""

from __future__ import annotations

import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_config
from PIL import Image

from eiw_flow_jax.model.flow import build_flow
from eiw_flow_jax.training import reporting, sample_grids, sharding

# matplotlib's first two line colours (C0, C1): the train and the test curve.
TRAIN_COLOUR, TEST_COLOUR = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)


def log(workdir, step: int, scalars: dict, suffix: str) -> None:
  """Into a new event file (its name: the second, the host and `suffix`)."""
  reporting.log_to_tensorboard(str(workdir), step, scalars, {}, suffix)
  time.sleep(0.01)  # events are told apart by their wall time


def test_read_events_keeps_the_last_value_written_for_a_step(tmp_path):
  """A run resumed from a checkpoint before its last logged step logs those steps again."""
  log(tmp_path, 10, {"train/bpd": 4.0}, ".a")
  log(tmp_path, 20, {"train/bpd": 3.0, "other": 1.0}, ".b")
  log(tmp_path, 20, {"train/bpd": 2.5}, ".resumed")
  scalars, texts = reporting.read_events(str(tmp_path))
  assert scalars == {"train/bpd": [(10, 4.0), (20, 2.5)], "other": [(20, 1.0)]}
  assert texts == {}


def colours(path) -> set[tuple[int, int, int]]:
  pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
  return {tuple(int(v) for v in p) for p in np.unique(pixels, axis=0)}


def test_bpd_curves_of_train_and_test(tmp_path):
  png = tmp_path / "samples" / reporting.BPD_CURVES_FILE
  assert not reporting.write_bpd_curves(str(tmp_path), str(png))  # nothing logged: no figure
  assert not png.exists()
  for step, bpd in ((50, 4.4), (100, 4.0), (150, 3.7)):
    log(tmp_path, step, {"train/bpd": bpd}, f".train{step}")
  assert reporting.write_bpd_curves(str(tmp_path), str(png))
  assert TRAIN_COLOUR in colours(png) and TEST_COLOUR not in colours(png)
  log(tmp_path, 150, {"eval/bpd": 3.6}, ".eval")
  assert reporting.write_bpd_curves(str(tmp_path), str(png))
  assert {TRAIN_COLOUR, TEST_COLOUR} <= colours(png)


def test_progress_bar_starts_after_the_first_step_and_log_lines_go_above_it(tmp_path):
  root = logging.getLogger()
  before = list(root.handlers)
  reporter = reporting.Reporter(str(tmp_path), total=6, initial=2, batch_size=4)
  try:
    assert reporter.bar is None  # the first step is mostly compiling: no rate, no ETA yet
    reporter.advance()
    assert reporter.bar.n == reporter.bar.initial == 3  # rates count from here
    assert [getattr(h, "handler", None) for h in root.handlers] == before
    reporter.advance()
    assert reporter.bar.n == 4
  finally:
    reporter.close()
  assert root.handlers == before



def test_a_writer_that_died_on_a_full_disk_does_not_block_the_run(tmp_path, monkeypatch, caplog):
  """tensorboardX writes from a thread; when a write fails (a full disk) the thread dies and,
  ten queued events later, every further event would block forever. The reporter drops the dead
  writer with a warning and opens a new event file, so logging resumes when the disk has room."""
  from tensorboardX import event_file_writer

  reporter = reporting.Reporter(str(tmp_path), total=10**6, initial=0, batch_size=4)
  disk_full = {"on": True}
  write_event = event_file_writer.EventsWriter.write_event

  def failing(self, event):
    if disk_full["on"]:
      raise OSError(28, "No space left on device")
    return write_event(self, event)

  monkeypatch.setattr(event_file_writer.EventsWriter, "write_event", failing)
  try:
    reporter.scalars(1, {"train/bpd": 1.0})
    reporter.writer.file_writer.event_writer._worker.join(timeout=30)  # it dies on that write
    with caplog.at_level(logging.WARNING):
      for step in range(2, 40):  # more than the writer's queue holds
        reporter.scalars(step, {"train/bpd": float(step)})
    assert "event writer stopped" in caplog.text
    disk_full["on"] = False
    reporter.scalars(40, {"train/bpd": 40.0})
  finally:
    reporter.close()
  scalars, _ = reporting.read_events(str(tmp_path))
  assert scalars["train/bpd"][-1] == (40, 40.0)


@pytest.fixture(scope="module")
def tiny_flow():
  config = make_config(steps=1, split="vanilla", n_bits=5)
  config.sample.num_samples = 4
  config.sample.temperatures = (0.7,)
  flow = build_flow(config)
  variables = flow.init(jax.random.PRNGKey(0), jnp.zeros((4, 8, 8, 1), jnp.uint8))
  return config, flow, variables


@pytest.mark.parametrize("diverged", [False, True])
def test_sample_grids_mark_and_count_values_that_are_not_finite(diverged, tiny_flow, tmp_path,
                                                                caplog):
  config, flow, variables = tiny_flow
  if diverged:  # every parameter NaN: every decoded value is NaN
    variables = {**variables, "params": jax.tree.map(lambda p: p * jnp.nan, variables["params"])}
  with caplog.at_level(logging.WARNING):
    (path,) = sample_grids.write_sample_grids(
        config, str(tmp_path), flow, variables, sharding.make_mesh(), jax.random.PRNGKey(1),
        step=7)
  count = 4 * 8 * 8 * 1 if diverged else 0
  scalars, _ = reporting.read_events(str(tmp_path))
  assert scalars["samples/nonfinite_values/temperature_0.70"] == [(7, count)]
  warnings = [r.getMessage() for r in caplog.records if "not finite" in r.getMessage()]
  image_colours = colours(path)
  if diverged:
    assert warnings == [f"Samples at temperature 0.7: {count} of {count} decoded values are not "
                        f"finite (NaN or inf; the model may have diverged); their 256 pixels are "
                        f"drawn in magenta in {path}."]
    assert image_colours == {sample_grids.NONFINITE_COLOUR, (255, 255, 255)}  # and the frame
  else:
    assert warnings == []
    assert sample_grids.NONFINITE_COLOUR not in image_colours
