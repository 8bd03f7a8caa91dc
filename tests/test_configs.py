"""Every config in configs/ loads and validates; bad configs and missing data fail clearly."""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO

from eiw_flow_jax.config import checks, schema
from eiw_flow_jax.training import run_config, train_loop
from eiw_flow_jax.training.compiler_options import compiler_options

CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))
EXPECTED = {
    "digits", "mnist", "mnist_idx", "cifar10", "imagenet32", "imagenet64", "celeba",
    "lsun_bedroom", "lsun_church",
}
# The dataset each config reads, where it is not the config's name: the data version its
# published target was measured on (eiw_flow_jax.data.registry, tests/test_data_versions.py).
DATASET_OF = {
    "celeba": "celeba_realnvp",
    "lsun_bedroom": "lsun_bedroom_realnvp",
    "lsun_church": "lsun_church_realnvp",
}


def load_config(name: str):
  path = os.path.join(REPO, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_all_expected_configs_exist():
  names = {os.path.splitext(os.path.basename(p))[0] for p in CONFIG_FILES}
  assert EXPECTED <= names


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_is_valid_and_defaults_to_eiw_global(name):
  config = load_config(name)
  assert config.dataset.name == DATASET_OF.get(name, name)
  assert config.model.split == "eiw"
  assert config.model.eiw.mode == "global"
  # Same fields as the base config, so every override works on every config.
  assert set(config.keys()) == set(schema.base_config().keys())
  run_config.validate_config(config, num_devices=8, num_processes=2)
  # Image side divisible by 2**levels; the Glow-style datasets use 8 bits.
  height, width, _ = config.model.image_shape
  assert height % 2**config.model.num_levels == 0
  if name not in ("digits",):
    assert config.model.n_bits == 8


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: os.path.basename(p))
def test_command_line_overrides_reach_every_config(path, monkeypatch):
  """`--config.x=y` as the CLI parses it (ml_collections config_flags, locked configs); an
  integer on the command line for a float field (the compiler's effort) is taken as a float."""
  from absl import flags
  from ml_collections import config_flags

  argv = ["prog", f"--config={path}", "--config.dataset.worker_count=2", "--config.batch_size=32",
          "--config.compiler.exec_time_optimization_effort=-1"]
  monkeypatch.setattr("sys.argv", argv)  # config_flags reads the overrides from sys.argv
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", path, flag_values=values, lock_config=True)
  values(argv)
  assert values.config.dataset.worker_count == 2 and values.config.batch_size == 32
  assert values.config.compiler.exec_time_optimization_effort == -1.0
  assert compiler_options(values.config) == (("exec_time_optimization_effort", -1.0),)
  run_config.validate_config(values.config)


def _load_module(path: str):
  spec = importlib.util.spec_from_file_location("config_under_test", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


HARDWARE_VARIANTS = [
    (path, variant)
    for path in CONFIG_FILES
    for variant in sorted(getattr(_load_module(path), "HARDWARE", {}))
]


def test_the_glow_family_has_the_v5e_16_variant():
  with_variant = {os.path.basename(path) for path, variant in HARDWARE_VARIANTS
                  if variant == "v5e_16"}
  assert with_variant == {
      "celeba.py", "cifar10.py", "imagenet32.py", "imagenet64.py", "lsun_bedroom.py",
      "lsun_church.py",
  }


@pytest.mark.parametrize(
    "path, variant", HARDWARE_VARIANTS, ids=lambda x: os.path.basename(x) if "/" in x else x
)
def test_hardware_variant_from_the_command_line(path, variant, monkeypatch):
  """`--config=configs/x.py:variant`: config_flags passes "variant" to get_config."""
  from absl import flags
  from ml_collections import config_flags

  argv = ["prog", f"--config={path}:{variant}", "--config.seed=3"]
  monkeypatch.setattr("sys.argv", argv)
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", path, flag_values=values, lock_config=True)
  values(argv)
  module = _load_module(path)
  expected = module.get_config()
  for dotted, value in module.HARDWARE[variant].items():
    *parents, leaf = dotted.split(".")
    node = expected
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  expected.seed = 3
  assert values.config.to_dict() == expected.to_dict()
  run_config.validate_config(values.config, num_devices=16)


def test_every_recipe_fits_16_gib_v5e_chips_as_it_is():
  # The TPU compiler's figures (configs' docstrings, docs/tpu.md) fit every Glow recipe on
  # 16 GiB v5e chips at its v5e_16 batch as stored: no variant trades speed for memory
  # ("remat" is the compiler's fastest in float32 where measured; "invert" would trade).
  for path, variant in HARDWARE_VARIANTS:
    module = _load_module(path)
    name = os.path.basename(path)
    assert module.get_config(variant).to_dict() == module.get_config().to_dict(), name
    assert module.get_config(variant).model.memory in ("store", "remat"), name


# The published Glow configs: every expected config but the toy one. Each states its memory mode
# in its docstring ("Memory mode `M`"), the TPU compiler's fastest within a chip (docs/tpu.md).
PUBLISHED_GLOW = sorted(EXPECTED - {"digits"})


@pytest.mark.parametrize("name", PUBLISHED_GLOW)
def test_published_glow_config_has_the_memory_mode_its_docstring_states(name):
  module = _load_module(os.path.join(REPO, "configs", f"{name}.py"))
  stated = re.findall(r"Memory mode `([a-z_]+)`", module.__doc__)
  assert len(stated) == 1, f"{name}.py's docstring states its memory mode once: {stated}"
  config = module.get_config()
  assert config.model.backbone == "glow"
  assert stated[0] in schema.MEMORY_MODES
  assert config.model.memory == stated[0]


def test_unknown_hardware_variant_names_the_known_ones():
  module = _load_module(os.path.join(REPO, "configs", "cifar10.py"))
  with pytest.raises(checks.ConfigError, match=r"'v9_1' .*expected one of: v5e_16"):
    module.get_config("v9_1")
  with pytest.raises(TypeError):
    _load_module(os.path.join(REPO, "configs", "digits.py")).get_config("v5e_16")


@pytest.mark.parametrize("name", ["mnist_idx", "mnist_idx_denseflow"])
def test_mnist_idx_source_dir_comes_from_the_user(name):
  assert load_config(name).dataset.source_dir == ""


@pytest.mark.parametrize("given", ["", "empty", "missing"])
def test_mnist_idx_without_files_is_one_line_naming_the_flag(tmp_path, env, given):
  """`python -m eiw_flow_jax.main` on configs/mnist_idx.py without the idx files (none given, an
  empty directory, a missing one) stops before any compute with one line naming the flag and
  where the files come from."""
  (tmp_path / "empty").mkdir()
  source = str(tmp_path / given) if given else ""
  workdir = tmp_path / "work"
  result = subprocess.run(
      [sys.executable, "-m", "eiw_flow_jax.main",
       f"--config={os.path.join(REPO, 'configs', 'mnist_idx.py')}", f"--workdir={workdir}",
       f"--config.dataset.data_dir={tmp_path / 'tfds'}", f"--config.dataset.source_dir={source}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
  found = {"": "is empty", "empty": "which lacks", "missing": "which does not exist"}[given]
  for needle in ("--config.dataset.source_dir=DIR", "MNIST mirror", found):
    assert needle in errors[0]
  assert not (workdir / "checkpoints").exists() and not (tmp_path / "tfds" / "mnist_idx").exists()


def _bad(**overrides):
  config = load_config("digits")
  for dotted, value in overrides.items():
    node = config
    *parents, leaf = dotted.split("__")
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dataset__name": "nope"}, "config.dataset.name must be one of"),
        ({"model__split": "diagonal"}, "model.split must be one of"),
        ({"model__eiw__mode": "local"}, "model.eiw.mode must be one of"),
        ({"model__num_levels": 4}, "divisible by 2**num_levels"),
        ({"model__image_shape": (12, 12, 1), "model__num_levels": 3}, "divisible by 2**num_levels"),
        ({"batch_size": 0}, "config.batch_size must be an int >= 1"),
        ({"num_train_steps": -5}, "config.num_train_steps"),
        ({"ema_decay": 1.0}, "config.ema_decay"),
        ({"optimizer__learning_rate": 0.0}, "learning_rate"),
        ({"optimizer__grad_clip_norm": -1.0}, "grad_clip_norm"),
        ({"max_consecutive_nonfinite": 0}, "max_consecutive_nonfinite"),
        ({"sample__temperatures": ()}, "temperatures"),
        ({"seed": -1}, "config.seed"),
        ({"dataset__worker_count": -1}, "config.dataset.worker_count must be an int >= 0"),
        ({"compiler__exec_time_optimization_effort": -1.5},
         r"config.compiler.exec_time_optimization_effort must be a number in \[-1, 1\] "
         r"\(0: XLA's default\), got -1.5"),
        ({"compiler__memory_fitting_effort": 2.0},
         "config.compiler.memory_fitting_effort must be a number in"),
    ],
)
def test_bad_config_raises_config_error(overrides, message):
  config = _bad(**overrides)
  with pytest.raises(checks.ConfigError, match=message.replace("*", r"\*")):
    run_config.validate_config(config)
  assert issubclass(checks.ConfigError, ValueError)


@pytest.mark.parametrize("field", ["batch_size", "eval_batch_size"])
def test_batch_not_divisible_by_devices(field):
  config = _bad(**{field: 12})
  run_config.validate_config(config)  # fine without a device count
  run_config.validate_config(config, num_devices=4)
  with pytest.raises(checks.ConfigError, match=rf"config.{field}=12 .*devices \(8\)"):
    run_config.validate_config(config, num_devices=8)


def test_missing_mnist_idx_source_dir(tmp_path):
  config = load_config("mnist_idx")
  config.dataset.source_dir = str(tmp_path / "does_not_exist")
  config.dataset.data_dir = str(tmp_path / "tfds")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    train_loop.train(config, str(tmp_path / "work"))


def test_catalog_dataset_not_prepared(tmp_path):
  config = load_config("cifar10")
  config.dataset.data_dir = str(tmp_path / "tfds")
  with pytest.raises(FileNotFoundError, match="not prepared"):
    train_loop.train(config, str(tmp_path / "work"))


def test_wrong_split_name_is_a_config_error(tmp_path):
  config = load_config("digits")
  config.dataset.data_dir = str(tmp_path / "tfds")
  config.dataset.eval_split = "validation"
  with pytest.raises(checks.ConfigError, match="no split 'validation'"):
    train_loop.train(config, str(tmp_path / "work"))
