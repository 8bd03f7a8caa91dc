"""What a run reports: TensorBoard events (local or on an object store), a tqdm bar, and a PNG
of its bits/dim curves.

`Reporter` writes the training loop's scalars and Shuffle diagnostics (process 0 only) and
shows the progress bar; `summarise` turns a logging interval's step metrics into them. Event
files go to the workdir, also when it is a URL: `register_tensorboard_schemes` routes
tensorboardX through etils.epath. `read_events` reads them back (no TensorFlow or tensorboard
needed) and `write_bpd_curves` draws the train and test bits/dim from them.
"""

from __future__ import annotations

import collections
import io
import logging as py_logging
import math
import os
import struct
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from eiw_flow_jax.workdir import storage

# ----------------------------------------------------------------------------------------------
# TensorBoard event files (local or on object stores).


def summary_writer(workdir: str, suffix: str = "") -> Any:
  """A tensorboardX SummaryWriter on `workdir` (local or a URL such as gs://bucket/run).

  Each writer starts its own event file (named by time and host, plus `suffix`, so writers
  opened within the same second do not overwrite each other); TensorBoard reads them all.
  """
  from tensorboardX import SummaryWriter  # noqa: PLC0415

  if storage.is_remote(workdir):
    register_tensorboard_schemes(workdir.split("://", 1)[0])
  with storage.writing("TensorBoard events", workdir):
    return SummaryWriter(os.fspath(workdir), filename_suffix=suffix)


class _EpathRecordWriter:
  """tensorboardX record writer for a URL: buffers the events, rewrites the object on flush.

  Object stores have no append, so each flush uploads the whole (small) event file.
  """

  def __init__(self, url: str):
    self.file = epath.Path(url)
    self.buffer = bytearray()
    self.closed = False

  def write(self, data: bytes) -> None:
    self.buffer.extend(data)

  def flush(self) -> None:
    with storage.writing("TensorBoard events", self.file), self.file.open("wb") as f:
      f.write(bytes(self.buffer))

  def close(self) -> None:
    if not self.closed:
      self.flush()
      self.closed = True


class _EpathWriterFactory:
  def open(self, url: str) -> _EpathRecordWriter:
    return _EpathRecordWriter(url)

  def directory_check(self, url: str) -> None:
    with storage.writing("TensorBoard events", url):
      epath.Path(url).mkdir(parents=True, exist_ok=True)


def register_tensorboard_schemes(*schemes: str) -> None:
  """Routes tensorboardX's event files for `scheme://` logdirs through etils.epath.

  tensorboardX's own gs:// writer needs google-cloud-storage; epath already reaches every store
  the checkpoints use (gs://, s3://, and any scheme registered with epath).
  """
  from tensorboardX import record_writer  # noqa: PLC0415

  for scheme in schemes or ("gs", "s3"):
    record_writer.register_writer_factory(scheme, _EpathWriterFactory())


# ----------------------------------------------------------------------------------------------
# Reading the events back, and the bits/dim curves drawn from them.

EVENT_FILES = "events.out.tfevents.*"
BPD_CURVES_FILE = "bpd_curves.png"

Series = dict[str, list[tuple[int, Any]]]  # tag -> [(step, value)], sorted by step


def _records(data: bytes) -> Iterator[bytes]:
  """The payloads of TFRecord framing (length, masked CRC, data, masked CRC); CRCs unchecked.
  A file still being written may end in a partial record, which is left out."""
  offset = 0
  while offset + 12 <= len(data):
    (length,) = struct.unpack("<Q", data[offset : offset + 8])
    end = offset + 12 + length
    if end + 4 > len(data):
      return
    yield data[offset + 12 : end]
    offset = end + 4


def read_events(workdir: str) -> tuple[Series, Series]:
  """(scalars, texts) of every TensorBoard event file in `workdir` (local or a URL).

  Each maps a tag to its [(step, value)], sorted by step. A step logged more than once (a run
  resumed from a checkpoint before its last logged step logs the steps after it again) keeps
  the value written last. Read with tensorboardX's protobufs.
  """
  from tensorboardX.proto import event_pb2  # noqa: PLC0415

  latest: dict[str, dict[str, dict[int, tuple[float, Any]]]] = {
      "scalars": collections.defaultdict(dict), "texts": collections.defaultdict(dict)}
  for file in sorted(storage.path(workdir).glob(EVENT_FILES)):
    for record in _records(file.read_bytes()):
      event = event_pb2.Event.FromString(record)
      for value in event.summary.value:
        kind = value.WhichOneof("value")
        if kind == "simple_value":
          kept, tag, item = latest["scalars"], value.tag, value.simple_value
        elif kind == "tensor" and value.tensor.string_val:
          kept, tag = latest["texts"], value.tag.removesuffix("/text_summary")
          item = value.tensor.string_val[0].decode()
        else:
          continue
        previous = kept[tag].get(event.step)
        if previous is None or previous[0] <= event.wall_time:
          kept[tag][event.step] = (event.wall_time, item)
  scalars, texts = (
      {tag: sorted((step, item) for step, (_, item) in by_step.items())
       for tag, by_step in latest[kind].items()}
      for kind in ("scalars", "texts"))
  return scalars, texts


def write_bpd_curves(workdir: str, path: str) -> bool:
  """A PNG at `path` (local or a URL) of the run's train and test bits/dim against the step,
  from the workdir's events (`train/bpd`: the mean over each logging interval; `eval/bpd`: the
  EMA parameters on the test split). Returns False, writing nothing, where neither was logged
  (a converted checkpoint that was never trained or evaluated)."""
  scalars, _ = read_events(workdir)
  train, test = scalars.get("train/bpd", []), scalars.get("eval/bpd", [])
  if not train and not test:
    return False
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
  from matplotlib.figure import Figure  # noqa: PLC0415

  figure = Figure(figsize=(6, 4), dpi=100, layout="constrained")
  FigureCanvasAgg(figure)
  axes = figure.add_subplot()
  if train:
    steps, values = zip(*train)
    axes.plot(steps, values, label="train (mean over each logging interval)")
  if test:
    steps, values = zip(*test)
    axes.plot(steps, values, "o-", label="test (EMA parameters)")
  axes.set_title(os.path.basename(workdir.rstrip("/")) or workdir)
  axes.set_xlabel("step")
  axes.set_ylabel("bits/dim")
  axes.grid(alpha=0.3)
  axes.legend()
  png = io.BytesIO()
  figure.savefig(png, format="png")
  file = storage.path(path)
  with storage.writing("the bits/dim curves", file):
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_bytes(png.getvalue())
  return True


# ----------------------------------------------------------------------------------------------
# The training loop's reporter (process 0 only).

def log_to_tensorboard(
    workdir: str, step: int, scalars: dict, images: dict, suffix: str
) -> None:
  """Scalars and (H, W, C) uint8 images into a new event file in the workdir (process 0)."""
  if jax.process_index() != 0:
    return
  writer = summary_writer(workdir, suffix)
  try:
    for tag, value in scalars.items():
      writer.add_scalar(tag, value, step)
    for tag, image in images.items():
      writer.add_image(tag, image, step, dataformats="HWC")
  finally:
    writer.close()


class _AboveTheBar(py_logging.Handler):
  """Hands each record to `handler` with the progress bars cleared, then redraws them, so that
  log lines are not written into a bar."""

  def __init__(self, handler: py_logging.Handler):
    super().__init__(handler.level)
    self.handler = handler

  def emit(self, record: py_logging.LogRecord) -> None:
    from tqdm import tqdm  # noqa: PLC0415

    with tqdm.external_write_mode():
      self.handler.handle(record)


def _writer_alive(writer: Any) -> bool:
  """Whether a tensorboardX SummaryWriter's background thread still writes its events."""
  file_writer = getattr(writer, "file_writer", None)
  worker = getattr(getattr(file_writer, "event_writer", None), "_worker", None)
  return worker is None or worker.is_alive()


class Reporter:
  """TensorBoard events in the workdir plus a tqdm bar; silent on processes other than 0.

  The bar starts after the first step, whose time is mostly compiling, so that its rate and
  ETA count steps only. While it shows, the root logger's handlers (absl's) write above it.
  """

  def __init__(self, workdir: str, total: int, initial: int, batch_size: int):
    self.active = jax.process_index() == 0
    self.workdir = workdir
    self.batch_size = batch_size
    self.total, self.initial = total, initial
    self.writer = self.bar = None
    self._handlers: list[py_logging.Handler] | None = None
    if self.active:
      self.writer = summary_writer(workdir)
      if initial < total:
        logging.info("Compiling the training step; the progress bar starts after step %d.",
                     initial + 1)

  def advance(self) -> None:
    if not self.active:
      return
    if self.bar is None:
      from tqdm import tqdm  # noqa: PLC0415

      self.bar = tqdm(total=self.total, initial=self.initial + 1, unit="step",
                      dynamic_ncols=True, mininterval=1.0)
      root = py_logging.getLogger()
      self._handlers = list(root.handlers)
      root.handlers = [_AboveTheBar(handler) for handler in self._handlers]
      return
    self.bar.update(1)

  def _events(self) -> Any:
    """The event writer (None on processes other than 0). tensorboardX writes from a background
    thread, which dies when a write fails (a full disk); its queue then fills and the next event
    would block the run forever. A dead writer is dropped with one warning and a new event file
    is opened, so logging resumes once the disk has room; while that fails, the interval's events
    are skipped with a warning (the checkpoints report a disk that stays full)."""
    if not self.active:
      return None
    if self.writer is not None:
      if _writer_alive(self.writer):
        return self.writer
      logging.warning("TensorBoard events could not be written to %s (the event writer stopped: "
                      "a full disk?); training goes on and logging starts a new event file.",
                      self.workdir)
      self.writer = None
    try:
      self.writer = summary_writer(self.workdir)
    except storage.StorageError as e:
      logging.warning("%s; this interval's TensorBoard events are skipped.", e)
    return self.writer

  def scalars(self, step: int, values: dict[str, float]) -> None:
    writer = self._events()
    if writer is not None:
      for tag, value in values.items():
        writer.add_scalar(tag, value, step)

  def shuffle_stats(self, step: int, stats: list[dict[str, np.ndarray]], changes: dict) -> None:
    if self._events() is None:
      return
    for level, level_stats in enumerate(stats):
      prefix = f"shuffle/level{level}"
      for name, value in level_stats.items():
        value = np.asarray(value)
        if value.ndim == 0:
          self.writer.add_scalar(f"{prefix}/{name}", float(value), step)
        elif name in ("permutation", "kept_channels"):
          self.writer.add_text(f"{prefix}/{name}", " ".join(map(str, value.tolist())), step)
        else:
          self.writer.add_histogram(f"{prefix}/{name}", value, step)
          for index, item in enumerate(value.tolist()):
            self.writer.add_scalar(f"{prefix}/{name}/{index}", item, step)
      if level in changes:
        self.writer.add_scalar(f"{prefix}/permutation_changes", changes[level], step)

  def postfix(self, **values: Any) -> None:
    if self.bar is not None:
      self.bar.set_postfix(**values, refresh=False)

  def close(self) -> None:
    if self._handlers is not None:
      py_logging.getLogger().handlers = self._handlers
      self._handlers = None
    if self.bar is not None:
      self.bar.close()
    if self.writer is not None and _writer_alive(self.writer):
      try:
        self.writer.close()
      except OSError as e:  # a full disk: must not hide the error that ends the run
        logging.warning("Could not write the last TensorBoard events: %s", e)


def summarise(history: list[dict[str, np.ndarray]]) -> tuple[dict[str, float], dict[int, int]]:
  """Means over the log interval of finite steps, skip counts; permutation changes per level."""
  finite = np.array([bool(m["finite"]) for m in history])
  out = {}
  for name in ("loss", "bpd", "regularizer", "weight_entropy", "grad_norm"):
    values = np.array([float(m[name]) for m in history])[finite]
    out[f"train/{name}"] = float(values.mean()) if values.size else math.nan
  out["train/learning_rate"] = float(history[-1]["learning_rate"])
  out["train/skipped_steps"] = float(np.sum(~finite))
  out["train/skipped_steps_total"] = float(history[-1]["nonfinite_total"])
  changes = {
      int(name[len("perm_changed/level") :]): sum(int(m[name]) for m in history)
      for name in history[-1] if name.startswith("perm_changed/level")
  }
  return out, changes
