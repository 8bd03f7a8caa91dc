"""What a run reports: TensorBoard events (local or on an object store) and a tqdm bar.

`Reporter` writes the training loop's scalars and Shuffle diagnostics (process 0 only);
`summarise` turns a logging interval's step metrics into them. Event files go to the workdir,
also when it is a URL: `register_tensorboard_schemes` routes tensorboardX through etils.epath.
"""

from __future__ import annotations

import math
import os
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


class Reporter:
  """TensorBoard events in the workdir plus a tqdm bar; silent on processes other than 0."""

  def __init__(self, workdir: str, total: int, initial: int, batch_size: int):
    self.active = jax.process_index() == 0
    self.batch_size = batch_size
    self.writer = self.bar = None
    if self.active:
      from tqdm import tqdm

      self.writer = summary_writer(workdir)
      self.bar = tqdm(
          total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=1.0
      )

  def advance(self) -> None:
    if self.bar is not None:
      self.bar.update(1)

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if self.writer is not None:
      for tag, value in values.items():
        self.writer.add_scalar(tag, value, step)

  def shuffle_stats(self, step: int, stats: list[dict[str, np.ndarray]], changes: dict) -> None:
    if self.writer is None:
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
    if self.bar is not None:
      self.bar.close()
    if self.writer is not None:
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
