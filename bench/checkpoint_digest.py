"""What checkpoint digests cost: save and restore time with and without them, CIFAR-size state.

  python bench/checkpoint_digest.py [--config=configs/cifar10.py] [--rounds=3] [--dir=/tmp/x]

The train state of the config (params + EMA + Adam moments, as `train_state.abstract_state` lays it
out) is filled with random values (nothing is trained or compiled) and saved and restored with
the project's CheckpointManager, synchronously, so a save's time is its whole write:

* save: `checkpointing.save` with digests against the same save without the `digests` item;
* restore: the state (and digests) restored, with and without `digest_mismatch` checking them;
* digest: `digest_record` alone (copy to the host + SHA-256 on up to 8 threads).

With asynchronous saving (the default in training) only the digest and Orbax's own copy to the
host block the training loop. Every round writes a fresh directory; medians are printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eiw_flow_jax.model.flow import build_flow  # noqa: E402
from eiw_flow_jax.training import optimizer, sharding, train_state  # noqa: E402
from eiw_flow_jax.workdir import checkpointing, digests


def load_config(path: str):
  spec = importlib.util.spec_from_file_location("config_module", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def random_state(abstract):
  """Concrete arrays of the abstract state's shapes, dtypes and shardings (random floats)."""
  rng = np.random.default_rng(0)

  def fill(leaf):
    if np.issubdtype(leaf.dtype, np.floating):
      value = rng.standard_normal(leaf.shape, dtype=np.float32).astype(leaf.dtype)
    else:
      value = np.zeros(leaf.shape, leaf.dtype)
    return jax.device_put(value, leaf.sharding)

  return jax.tree.map(fill, abstract)


def timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  parser.add_argument("--config", default=os.path.join(repo, "configs", "cifar10.py"))
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--dir", default=None, help="where to write (default: a temporary dir)")
  args = parser.parse_args()

  config = load_config(args.config)
  mesh = sharding.make_mesh(jax.devices()[:1])
  flow, tx = build_flow(config), optimizer.make_optimizer(config)
  abstract = train_state.abstract_state(flow, tx, mesh)
  state = random_state(abstract)
  nbytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
  root = args.dir or tempfile.mkdtemp(prefix="checkpoint_digest_")

  times: dict[str, list[float]] = {k: [] for k in (
      "save", "save+digests", "restore", "restore+verify", "digest")}
  for round_index in range(args.rounds):
    for with_digests in (False, True):
      workdir = os.path.join(root, f"r{round_index}_{int(with_digests)}")
      manager = checkpointing.make_manager(workdir, keep=2, async_save=False)
      items = {checkpointing.STATE: ocp.args.StandardSave(state)}

      def save(manager=manager, items=items, with_digests=with_digests):
        if with_digests:
          items = {**items, checkpointing.DIGESTS: ocp.args.JsonSave(
              digests.digest_record(state))}
        manager.save(1, args=ocp.args.Composite(**items))
        manager.wait_until_finished()

      times["save+digests" if with_digests else "save"].append(timed(save))
      restore_items = {checkpointing.STATE: ocp.args.StandardRestore(abstract)}
      if with_digests:
        restore_items[checkpointing.DIGESTS] = ocp.args.JsonRestore()

      def restore(manager=manager, restore_items=restore_items, with_digests=with_digests):
        restored = manager.restore(1, args=ocp.args.Composite(**restore_items))
        jax.block_until_ready(restored[checkpointing.STATE])
        if with_digests:
          assert digests.digest_mismatch(
              restored[checkpointing.STATE], restored[checkpointing.DIGESTS]) is None

      times["restore+verify" if with_digests else "restore"].append(timed(restore))
      manager.close()
      shutil.rmtree(workdir)
    times["digest"].append(timed(lambda: digests.digest_record(state)))
  if args.dir is None:
    shutil.rmtree(root)

  median = {k: statistics.median(v) for k, v in times.items()}
  print(f"config {os.path.basename(args.config)}: {len(jax.tree.leaves(state))} arrays, "
        f"{nbytes / 2**20:.0f} MiB (params + EMA + Adam moments); {jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} CPUs; {args.rounds} rounds, medians")
  print("| | without digests, s | with digests, s | added |")
  print("| --- | --- | --- | --- |")
  for name, base, with_digests in (
      ("save (sync, whole write)", "save", "save+digests"),
      ("restore", "restore", "restore+verify"),
  ):
    added = median[with_digests] - median[base]
    print(f"| {name} | {median[base]:.2f} | {median[with_digests]:.2f} | "
          f"{added:+.2f} ({added / median[base]:+.0%}) |")
  print(f"| digests alone (host copy + SHA-256) | | {median['digest']:.2f} | "
        f"{nbytes / 2**20 / median['digest']:.0f} MiB/s |")


if __name__ == "__main__":
  main()
