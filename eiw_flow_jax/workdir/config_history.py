"""`<workdir>/config_history.jsonl`: every config change a resume made, with the step it took
effect at, so a workdir tells what its run really was.

`config.json` holds the config the checkpoints are trained with now; each resume that changed a
field (a learning rate, a schedule, the eval cadence, or with `--allow_config_change` a batch
size) appends one line per field: `{"step", "field", "old", "new", "time"}`. Reading the lines
backwards from `config.json` gives the config at any step. Process 0 writes.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from typing import Any

import jax
from absl import logging

from eiw_flow_jax.workdir import storage

HISTORY_FILE = "config_history.jsonl"


def read(workdir: str) -> list[dict[str, Any]]:
  """The workdir's config changes, oldest first ([] if there were none); an unreadable line is
  skipped with a warning."""
  file = storage.path(workdir, HISTORY_FILE)
  try:
    text = file.read_text()
  except FileNotFoundError:
    return []
  changes = []
  for number, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      changes.append(json.loads(line))
    except ValueError:
      logging.warning("Skipping line %d of %s: not JSON.", number, file)
  return changes


def append(workdir: str, step: int, changes: Sequence[tuple[str, Any, Any]]) -> None:
  """Appends (field, old, new) `changes` taking effect at `step` (process 0 writes; the file is
  rewritten whole, as object stores have no append)."""
  if not changes or jax.process_index() != 0:
    return
  file = storage.path(workdir, HISTORY_FILE)
  try:
    before = file.read_text()
  except FileNotFoundError:
    before = ""
  when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  lines = [json.dumps({"step": int(step), "field": field, "old": old, "new": new, "time": when})
           for field, old, new in changes]
  if before and not before.endswith("\n"):
    before += "\n"
  storage.write_text(file, before + "\n".join(lines) + "\n", "the config history")
