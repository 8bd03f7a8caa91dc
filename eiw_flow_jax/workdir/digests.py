"""SHA-256 digests of everything a checkpoint holds, saved with it and verified on restore.

Damage that still decodes (a flipped byte in an array's data) is not caught by the
storage layer. In Orbax 0.12's default layout (OCDBT + zarr v2) TensorStore checks a CRC-32C
of OCDBT's B-tree nodes (a flip there fails to restore), but the values (zarr chunks, zstd
level 1 without zstd's optional frame checksum) carry none, so some flips in a data file restore
with changed values. Orbax's zarr v3 layout (`use_zarr3`) adds crc32c only to the shard index,
not to the chunks, and there is no Orbax option to add a chunk checksum. The input pipeline's
position (grain's JSON, one file per process) has no check at all: a changed digit resumes with
another data order. So every checkpoint carries a third item, `digests` (JSON): the SHA-256 of
each array's bytes, per leaf and per shard index, computed on the host from the values handed
to Orbax, and of each process's input position (its state as canonical JSON). It is part of the
same atomic save (Orbax finalises the step directory only once every item is written), so a
torn save never looks complete. On restore each process hashes the shards and the position it
restored and compares; a mismatch is treated like an unreadable checkpoint (one warning naming
the checkpoint and the array or position, fallback, quarantine), and every process agrees on
the verdict. A checkpoint without digests, or without the position's (saved by an older
version), restores with a warning naming it.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

DIGEST_ALGORITHM = "sha256"
# 1: arrays only; 2: also the input positions ("positions").
DIGEST_FORMAT = 2


def _index_key(index: tuple[slice, ...], shape: tuple[int, ...]) -> str:
  """A shard's position in its array as text: "0:16,0:3" ("" for a scalar)."""
  return ",".join(
      "{}:{}".format(*s.indices(n)[:2]) for s, n in zip(index, shape, strict=True)
  )


def _leaf_shards(leaf: Any) -> list[tuple[str, Any]]:
  """(index key, value) of each distinct shard this process holds (replicas hashed once)."""
  if isinstance(leaf, jax.Array):
    shards: dict[str, Any] = {}
    for shard in leaf.addressable_shards:
      shards.setdefault(_index_key(shard.index, leaf.shape), shard.data)
    return list(shards.items())
  value = np.asarray(leaf)
  return [(_index_key((slice(None),) * value.ndim, value.shape), value)]


def _sha256(value: np.ndarray) -> str:
  data = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
  return hashlib.sha256(data).hexdigest()  # releases the GIL: leaves hash in parallel


def array_digests(tree: Any) -> dict[str, dict[str, str]]:
  """{leaf name ("params/level0_step0/..."): {shard index: sha256 of its bytes}}.

  Covers the shards this process holds (every array in full for a replicated state). The
  values are copied to the host in one batch, then hashed on a few threads.
  """
  names, keys, values = [], [], []
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = "/".join(key_name(k) for k in key_path)
    for index, value in _leaf_shards(leaf):
      names.append(name)
      keys.append(index)
      values.append(value)
  host = jax.device_get(values)
  workers = max(1, min(8, os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    hashes = list(pool.map(_sha256, host))
  out: dict[str, dict[str, str]] = {}
  for name, index, digest in zip(names, keys, hashes, strict=True):
    out.setdefault(name, {})[index] = digest
  return out


def position_key(process_index: int, process_count: int) -> str:
  """A process's input position as the checkpoint names it (grain's `data/<key>.json`)."""
  return f"process_{process_index}-of-{process_count}"


def position_digest(data_iterator: Any) -> str:
  """SHA-256 of the iterator's position: its `get_state()` (a dict, or JSON bytes) as canonical
  JSON, so the digest does not depend on how the file was indented."""
  state = data_iterator.get_state()
  if isinstance(state, (bytes, bytearray, str)):
    state = json.loads(state)
  return hashlib.sha256(json.dumps(state, sort_keys=True, separators=(",", ":")).encode()
                        ).hexdigest()


def position_digests(data_iterator: Any) -> dict[str, str]:
  """{position_key: digest} of every process's position (gathered: process 0 writes them)."""
  digest = position_digest(data_iterator)
  count = jax.process_count()
  if count == 1:
    return {position_key(0, 1): digest}
  gathered = multihost_utils.process_allgather(np.frombuffer(bytes.fromhex(digest), np.uint8))
  return {position_key(index, count): bytes(np.asarray(row, np.uint8)).hex()
          for index, row in enumerate(np.asarray(gathered).reshape(count, -1))}


def digest_record(state: Any, positions: dict[str, str] | None = None) -> dict[str, Any]:
  """The `digests` item of a checkpoint of `state` and the input `positions`
  (`position_digests`); Orbax writes it from process 0 only."""
  if jax.process_index() != 0:
    return {}
  record = {"format": DIGEST_FORMAT, "algorithm": DIGEST_ALGORITHM,
            "arrays": array_digests(state)}
  if positions is not None:
    record["positions"] = dict(positions)
  return record


def position_mismatch(data_iterator: Any, record: dict[str, Any]) -> str | None:
  """This process's `position_key` if its restored position is not the one `record` holds the
  digest of; None if it is, or if `record` holds no positions (saved by an older version)."""
  positions = record.get("positions")
  if positions is None:
    return None
  key = position_key(jax.process_index(), jax.process_count())
  return key if positions.get(key) != position_digest(data_iterator) else None


def digest_mismatch(state: Any, record: dict[str, Any], *, partial: bool = False) -> str | None:
  """The first array (with its shard) of `state` whose bytes differ from `record`, or None.

  Each process checks the shards it holds; a shard whose index was not recorded (restored
  with another sharding than it was saved with) cannot be checked and is skipped. `partial`:
  `state` holds some of the checkpoint's arrays (a partial restore), and only those are checked.
  """
  saved = record.get("arrays", {})
  restored = array_digests(state)
  for name in sorted(set(saved) | set(restored)):
    if name not in restored and partial:
      continue
    if name not in restored:
      return f"{name} (recorded in the digests, absent from the restored state)"
    if name not in saved:
      return f"{name} (absent from the digests)"
    for index, digest in restored[name].items():
      expected = saved[name].get(index)
      if expected is not None and expected != digest:
        shown = f" [{index}]" if index and len(saved[name]) > 1 else ""
        return f"{name}{shown}"
  return None



def key_name(entry: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)
