"""Field checks shared by the model's and the training run's config validation.

Each check raises ValueError (or ConfigError) naming the field, what was expected and what came.
"""

from __future__ import annotations


class ConfigError(ValueError):
  """A config that cannot run; raised by the validation before any compute."""


def require(condition: bool, message: str) -> None:
  if not condition:
    raise ValueError(message)


def choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
  require(value in allowed, f"{name} must be one of {allowed}, got {value!r}.")


def int_tuple(name: str, value: object, length: int | None = None) -> tuple[int, ...]:
  ok = isinstance(value, (tuple, list)) and len(value) >= 1 and all(
      isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
  require(ok, f"{name} must be a non-empty list of ints >= 1, got {value!r}.")
  if length is not None:
    require(len(value) == length,
             f"{name} must have one entry per dense block ({length}, as block_conf), "
             f"got {len(value)}: {value!r}.")
  return tuple(value)


def positive_int(name: str, value: object, *, allow_zero: bool = False) -> None:
  low = 0 if allow_zero else 1
  require(
      isinstance(value, int) and not isinstance(value, bool) and value >= low,
      f"{name} must be an int >= {low}, got {value!r}.",
  )
