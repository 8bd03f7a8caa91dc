"""`aot --compare`: one config's memory modes and coupling-network dtypes side by side.

Each variant is the config with `model.memory` and `model.dtype` set, compiled for the topology
by `compiler.compile_for_topology` (train step only); the table gives what the TPU compiler
says of each: memory per device, FLOPs and bytes per step, the roofline step and which of
compute or memory traffic bounds it. With the byte breakdown (`traffic`), a second table gives
each variant's bytes per layer kind, so a change is judged by what it removes and where.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence

import ml_collections

from eiw_flow_jax.aot import AotError
from eiw_flow_jax.aot.chips import GiB
from eiw_flow_jax.aot.report import AotReport
from eiw_flow_jax.config.schema import DENSEFLOW_MEMORY, DTYPES, MEMORY_MODES


@dataclasses.dataclass(frozen=True)
class Variant:
  """A config variant: `model.memory` and `model.dtype`."""

  memory: str
  dtype: str

  @property
  def label(self) -> str:
    return f"{self.memory}, {'float32' if self.dtype == 'auto' else self.dtype}"

  def apply(self, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` with this variant's fields."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.memory, config.model.dtype = self.memory, self.dtype
    return config


def memory_modes(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The memory modes the config's backbone supports (the default of `--compare_memory`)."""
  return DENSEFLOW_MEMORY if config.model.get("backbone", "glow") == "denseflow" else MEMORY_MODES


def variants(memory: Sequence[str], dtypes: Sequence[str]) -> list[Variant]:
  """Every memory mode with every dtype; an unknown name is an AotError naming the choices."""
  for name, given, allowed in (("--compare_memory", memory, MEMORY_MODES),
                               ("--compare_dtype", dtypes, DTYPES)):
    unknown = [g for g in given if g not in allowed]
    if unknown or not given:
      raise AotError(f"{name} takes names from {', '.join(allowed)}, got {list(given)}.")
  return [Variant(m, d) for m, d in itertools.product(memory, dtypes)]


def compare(
    config: ml_collections.ConfigDict,
    chosen: Sequence[Variant],
    compile_variant: Callable[[ml_collections.ConfigDict], AotReport],
) -> list[tuple[Variant, AotReport]]:
  """Each variant of `config` compiled by `compile_variant` (a config -> AotReport)."""
  return [(v, compile_variant(v.apply(config))) for v in chosen]


def _ms(seconds: float | None) -> str:
  return "n/a" if seconds is None else f"{seconds * 1e3:.1f} ms"


def table(results: Sequence[tuple[Variant, AotReport]]) -> str:
  """The variants side by side (markdown): memory, FLOPs, bytes, roofline, per device."""
  lines = [
      "| variant | fits | GiB per device | temporaries GiB | GFLOP/step | GB/step | "
      "roofline step | compute alone | traffic alone |",
      "|" + " --- |" * 9,
  ]
  for variant, r in results:
    chip = r.chip
    share = r.devices_per_chip
    compute = r.flops / (chip.bf16_flops / share) if chip else None
    memory = r.bytes_accessed / (chip.hbm_bytes_per_s / share) if chip else None
    total = r.train_total
    temporaries = r.train.temporaries if r.train else None
    lines.append(
        f"| {variant.label} | {'yes' if r.fits else 'no'} | "
        f"{'n/a' if total is None else f'{total / GiB:.2f}'} | "
        f"{'n/a' if temporaries is None else f'{temporaries / GiB:.2f}'} | "
        f"{r.flops / 1e9:.0f} | {r.bytes_accessed / 1e9:.1f} | {_ms(r.step_seconds)} | "
        f"{_ms(compute)} | {_ms(memory)} |")
  return "\n".join(lines)


def traffic_table(results: Sequence[tuple[Variant, AotReport]]) -> str:
  """GB per step per device of each layer kind (rows) in each variant (columns)."""
  shown = [(v, r) for v, r in results if r.traffic is not None]
  if not shown:
    return ""
  kinds: list[str] = []
  for _, r in shown:
    kinds += [k.kind for k in r.traffic.kinds if k.kind not in kinds]
  lines = ["| layer kind | " + " | ".join(v.label for v, _ in shown) + " |",
           "|" + " --- |" * (len(shown) + 1)]
  for kind in kinds:
    cells = [f"{r.traffic.kind(kind).total / 1e9:.2f}" for _, r in shown]
    lines.append(f"| {kind} | " + " | ".join(cells) + " |")
  lines.append("| total counted | " + " | ".join(
      f"{r.traffic.total / 1e9:.2f}" for _, r in shown) + " |")
  return "\n".join(lines)
