"""What every command does with its command line, on top of absl.

* `--help` (`-?`, `--helpshort`, `--helpfull`, `--helpxml`) prints absl's usage and exits 0;
  absl's own exit status for it is 1, which reads as a failure in scripts and CI.
* `--config` (a Python file defining `get_config()`, optionally `path.py:argument`) and its
  `--config.<field>=<value>` overrides: a missing, non-Python or get_config-less file, and a
  field that does not exist (with "did you mean" where a field is close), are one line and
  exit 1, also when `--config` is left at a command's default.
* A `--workdir` that names an existing file is refused in one line.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Sequence

import ml_collections
from absl import app, flags

from eiw_flow_jax.config import checks
from eiw_flow_jax.workdir import storage

HELP_FLAGS = (
    "--help", "-help", "-?", "--helpshort", "-helpshort", "--helpfull", "-helpfull",
    "--helpxml", "-helpxml",
)

CONFIG_EXPECTED = (
    "expected a Python file that defines get_config() (e.g. configs/digits.py), optionally "
    "followed by ':<argument>' for get_config(argument)"
)
# Where the fields a --config.<field> may name are defined.
FIELDS_HOME = "eiw_flow_jax/config/schema.py:base_config and the config file"
# The config of main and aot when the command line names none: a checkout's digits config.
DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs",
    "digits.py")


def fail(message: str, code: int = 1) -> None:
  """Prints `message` on stderr and exits with `code`."""
  print(message, file=sys.stderr, flush=True)
  sys.exit(code)


# ----------------------------------------------------------------------------------------------
# --help


def requested_help(argv: Sequence[str]) -> str | None:
  """The first help flag among `argv`'s flags (those before a `--`), or None."""
  for arg in argv:
    if arg == "--":
      return None
    if arg in HELP_FLAGS:
      return arg
  return None


def run(
    main: Callable[[list[str]], None],
    flags_parser: Callable[[list[str]], list[str]] | None = None,
) -> None:
  """`absl.app.run(main, flags_parser)`, except that a help flag prints the usage and exits 0.

  The usage is absl's (the `__main__` module's docstring and flags); it is printed before any
  other flag is parsed, so a bad --config next to --help does not turn it into an error.
  """
  help_flag = requested_help(sys.argv[1:])
  if help_flag is not None:
    app.define_help_flags()
    try:
      flags.FLAGS([sys.argv[0], help_flag])  # absl prints the usage, then exits 1
    except SystemExit:
      pass
    sys.exit(0)
  if flags_parser is None:
    app.run(main)
  else:
    app.run(main, flags_parser=flags_parser)


# ----------------------------------------------------------------------------------------------
# --config and --config.<field>


def config_value(argv: Sequence[str]) -> str | None:
  """The last --config value in `argv` (`--config=x` or `--config x`), None if not given."""
  value = None
  for index, arg in enumerate(argv):
    if arg.startswith("--config="):
      value = arg[len("--config="):]
    elif arg == "--config" and index + 1 < len(argv):
      value = argv[index + 1]
  return value


def _load_failure(shown: str, error: BaseException) -> str:
  """One line for a config file that exists but does not load (not Python, no get_config)."""
  message = str(error)
  if "Error whilst parsing config file" in message:  # ml_collections embeds a traceback
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    message = lines[-1] if lines else message
  elif not isinstance(error, (OSError, ImportError)):
    message = f"{type(error).__name__}: {message}"
  detail = " ".join(line.strip() for line in message.splitlines() if line.strip())
  return f"cannot load {shown}: {CONFIG_EXPECTED}; loading it failed with {detail[:300]}"


def _config_load_error(value: str | None, error: BaseException) -> str:
  shown = f"--config={value}" if value is not None else "--config"
  return f"error: ConfigError: {_load_failure(shown, error)}"


def check_config_file(value: str) -> None:
  """ConfigError (one line) unless `value` (`path` or `path:argument`) names a Python file
  that defines get_config().

  ml_collections loads whatever the path names as Python and reports a missing file only when
  the config is first used ("Failed loading config file config_config", without the path); a
  non-Python file fails with its first NameError or SyntaxError and a traceback; and a Python
  file without get_config() silently reuses the get_config() of the module loaded before it
  (the default config), since every config module gets the same name. So the file is executed
  once here, in a fresh module, and checked.
  """
  path, _, _ = value.partition(":")
  shown = f"--config={value}"
  if not path:
    raise checks.ConfigError(f"cannot load {shown}: no file given; {CONFIG_EXPECTED}.")
  full = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(full):
    raise checks.ConfigError(f"cannot load {shown}: {full} does not exist; {CONFIG_EXPECTED}.")
  if not os.path.isfile(full):
    raise checks.ConfigError(f"cannot load {shown}: {full} is not a file; {CONFIG_EXPECTED}.")
  loader = importlib.machinery.SourceFileLoader("eiw_flow_config_check", full)  # any suffix
  module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
  try:
    loader.exec_module(module)
  except Exception as e:  # noqa: BLE001 - whatever executing a non-config raises
    raise checks.ConfigError(_load_failure(shown, e)) from e
  if not callable(getattr(module, "get_config", None)):
    raise checks.ConfigError(
        f"cannot load {shown}: {CONFIG_EXPECTED}; {full} defines no get_config()."
    )


def unknown_field(error: BaseException) -> tuple[str, str]:
  """(field name, '; did you mean ...?' or '') from ml_collections' error for an unknown field."""
  message = error.args[0] if error.args else error
  if isinstance(message, BaseException):  # AttributeError wrapping the KeyError
    message = message.args[0] if message.args else str(message)
  message = str(message)
  first = message.splitlines()[0] if message else ""
  quoted = re.search(r'Key "([^"]+)"', first) or re.search(r"'([^']+)'", first)
  name = quoted.group(1) if quoted else first.strip("\"'")
  suggestion = re.search(r'Did you mean "([^"]+)"', message)
  return name, f"; did you mean {suggestion.group(1)!r}?" if suggestion else ""


def parse_flags(
    argv: list[str], config_flag: flags.FlagHolder, default_config: str | None = None
) -> list[str]:
  """absl's parsing, but a bad --config, an unknown --config.<field> or a bad flag is one line.

  `config_flag` is the command's `config_flags.DEFINE_config_file` holder, defined with no
  default: ml_collections parses a default config (and applies the command line's overrides to
  it) while the flag is being defined, where an unknown field can only end in a traceback. So
  `default_config`, the file used when the command line names none, is added to `argv` here.
  """
  value = config_value(argv)
  if value is None and default_config is not None:
    if not os.path.isfile(default_config):
      fail(f"error: ConfigError: no --config given, and the default {default_config} does not "
           "exist (it is a checkout's configs/digits.py); pass --config=<a config file>.")
    value = default_config
    argv = [argv[0], f"--config={value}", *argv[1:]]
  if value is not None:
    try:
      check_config_file(value)
    except checks.ConfigError as e:
      fail(f"error: ConfigError: {e}")
  try:
    rest = flags.FLAGS(argv)
  except flags.IllegalFlagValueError as e:
    if "Error whilst parsing config file" in str(e):  # get_config raised TypeError/ValueError
      fail(_config_load_error(value, e))
    fail(f"error: {e}\nPass --help for the flags.")
  except flags.Error as e:
    fail(f"error: {e}\nPass --help for the flags.")
  except (AttributeError, KeyError) as e:  # --config.<field> names no field
    if isinstance(e, AttributeError) and "get_config" in str(e):  # a file without get_config
      fail(_config_load_error(value, e))
    name, hint = unknown_field(e)
    bad = [a.split("=", 1)[0] for a in argv if a.startswith("--config.") and name in a]
    shown = bad[0] if bad else f"--config.*{name}"
    fail(
        f"error: ConfigError: {shown} names no config field ({name!r} is unknown{hint}). The "
        f"fields are those of {FIELDS_HOME}."
    )
  except OSError as e:  # the config file itself
    fail(_config_load_error(value, e))
  except Exception as e:  # noqa: BLE001 - executing a non-Python file: NameError, SyntaxError...
    fail(_config_load_error(value, e))
  if value is not None:
    try:
      config = config_flag.value
      if not isinstance(config, ml_collections.ConfigDict):
        raise TypeError(f"get_config() returned {type(config).__name__}, not a ConfigDict")
      config.get("model")  # a missing or broken config file surfaces on first use
    except (OSError, ImportError, SyntaxError, AttributeError, TypeError) as e:
      fail(_config_load_error(value, e))
  return rest


# ----------------------------------------------------------------------------------------------
# --workdir


def check_workdir(workdir: str, flag: str = "--workdir") -> str:
  """`storage.normalize_dir(workdir)`; ConfigError if it names an existing file, not a folder."""
  normalized = storage.normalize_dir(workdir, flag)
  target = storage.path(normalized)
  if target.exists() and not target.is_dir():
    raise checks.ConfigError(
        f"{flag}={workdir} is a file, not a directory: name a directory (it is created if "
        "missing) for the run's checkpoints, events, results and samples."
    )
  return normalized
