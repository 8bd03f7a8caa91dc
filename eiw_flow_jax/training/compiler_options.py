"""The XLA options a run's jitted steps are compiled with (`config.compiler`).

`jax.jit(..., compiler_options=...)` takes them per program, so a run's choice reaches its own
train and eval steps and nothing else in the process (no `jax.config` update).
"""

from __future__ import annotations

import ml_collections

# config.compiler's fields: JAX's compiler options of the same names, each in [-1, 1] with XLA's
# default 0.
EFFORT_FIELDS = ("exec_time_optimization_effort", "memory_fitting_effort")
EFFORT_RANGE = "[-1, 1]"  # what `is_effort` accepts, as messages name it


def is_effort(value: object) -> bool:
  """Whether `value` is a valid effort: a number (not a bool) in [-1, 1]."""
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and -1.0 <= value <= 1.0)


CompilerOptions = tuple[tuple[str, float], ...]


def compiler_options(config: ml_collections.ConfigDict) -> CompilerOptions:
  """The (option, value) pairs of `config.compiler` that differ from XLA's defaults, sorted; a
  tuple so that cached step builders can take it as a key (`dict(...)` for `jax.jit`)."""
  return tuple(sorted((name, float(config.compiler[name])) for name in EFFORT_FIELDS
                      if float(config.compiler[name]) != 0.0))


def jit_options(options: CompilerOptions) -> dict[str, float] | None:
  """`compiler_options`' pairs as `jax.jit`'s `compiler_options` (None: XLA's defaults)."""
  return dict(options) or None
