"""eiw_flow_jax.data.catalog: writes array_record in TFDS's exact layout, and its error messages.

Nothing here downloads: TFDS's download step is replaced by synthetic builders (subclasses of the
catalog builders, see fake_catalog.py) or fed local source files (ImageNet tars, LSUN lmdb).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from fake_catalog import (
  assert_tfds_layout,
  catalog_config,
  set_file_format,
  write_cifar10,
  write_downsampled_imagenet_sources,
  write_lsun_lmdb,
)

from eiw_flow_jax.data import catalog, pipeline, sources


def test_synthetic_cifar10_has_tfds_layout_and_is_read_by_the_data_layer(tmp_path):
  version_dir = write_cifar10(tmp_path, num_train=24, num_test=10)
  assert version_dir == tmp_path / "cifar10" / "3.0.2"
  assert_tfds_layout(version_dir, "cifar10", {"train": 24, "test": 10})
  config = catalog_config("cifar10", tmp_path, (32, 32, 3))
  info = pipeline.get_dataset_info(config)
  assert (info.num_train, info.num_eval, info.pixel_bits) == (24, 10, 8)
  images = pipeline.load_examples(config, "test", 3)
  assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8


def test_prepare_imagenet32_from_source_tars(tmp_path):
  sources = write_downsampled_imagenet_sources(tmp_path / "src", 32, num_train=12, num_valid=5)
  version_dir = Path(catalog.prepare("imagenet32", str(tmp_path / "tfds"), source_dir=sources))
  assert version_dir == tmp_path / "tfds" / "downsampled_imagenet" / "32x32" / "2.0.0"
  assert_tfds_layout(version_dir, "downsampled_imagenet/32x32", {"train": 12, "validation": 5})
  config = catalog_config("imagenet32", tmp_path / "tfds", (32, 32, 3))
  info = pipeline.get_dataset_info(config)
  assert (info.num_train, info.num_eval) == (12, 5)
  # Pixels survive exactly (PNG is lossless; the stored bytes are the archive's).
  import tarfile

  from PIL import Image
  with tarfile.open(sources / "valid_32x32.tar") as archive:
    member = sorted(m.name for m in archive.getmembers())[0]
    first = np.asarray(Image.open(archive.extractfile(member)))
  stored = {img.tobytes() for img in pipeline.load_examples(config, "validation", 5)}
  assert first.tobytes() in stored
  # Preparing again is a no-op that returns the same folder.
  assert catalog.prepare("imagenet32", str(tmp_path / "tfds"), source_dir=sources) == str(
      version_dir
  )


def test_prepare_lsun_from_lmdb_export(tmp_path):
  pytest.importorskip("lmdb")
  sources = write_lsun_lmdb(tmp_path / "src", "church_outdoor", num_train=5, num_val=3)
  version_dir = Path(catalog.prepare("lsun_church", str(tmp_path / "tfds"), source_dir=sources))
  assert version_dir == tmp_path / "tfds" / "lsun" / "church_outdoor" / "3.1.0"
  assert_tfds_layout(version_dir, "lsun/church_outdoor", {"train": 5, "validation": 3})
  config = catalog_config("lsun_church", tmp_path / "tfds", (64, 64, 3))
  assert pipeline.load_examples(config, "validation", 3).shape == (3, 64, 64, 3)


def test_prepare_download_path_writes_array_record(tmp_path, monkeypatch):
  """The TFDS download path, with TFDS's builder swapped for a synthetic one of the same class."""
  calls = {}

  def fake_builder(dataset, data_dir, *, source_dir="", file_format="array_record"):
    calls.update(dataset=dataset, data_dir=data_dir, file_format=file_format)

    class Built:  # what prepare() uses of a builder
      def download_and_prepare(self, **kwargs):
        self.data_dir = write_cifar10(data_dir, 8, 4)

    return Built()

  monkeypatch.setattr(catalog, "catalog_builder", fake_builder)
  monkeypatch.setattr(catalog, "missing_modules", lambda *a: [])
  out = catalog.prepare("cifar10", str(tmp_path))
  assert calls == {"dataset": "cifar10", "data_dir": str(tmp_path), "file_format": "array_record"}
  assert out == str(tmp_path / "cifar10" / "3.0.2")
  assert "train: 8 examples" in catalog.summary("cifar10", str(tmp_path))


def test_catalog_builder_asks_tfds_for_array_record(tmp_path):
  builder = catalog.catalog_builder("cifar10", str(tmp_path))
  assert builder.info.file_format.value == "array_record"
  assert builder.name == "cifar10"
  builder = catalog.catalog_builder("imagenet64_resized", str(tmp_path))
  assert builder.name == "imagenet_resized" and builder.builder_config.name == "64x64"


def test_missing_requirements_are_named(tmp_path, monkeypatch):
  assert catalog.missing_modules({"json": "json", "no_such_module_xyz": "no-such"}) == ["no-such"]
  monkeypatch.setattr(catalog, "missing_modules", lambda *a: ["tensorflow", "apache-beam"])
  with pytest.raises(catalog.PrepareError, match=r"needs \['tensorflow', 'apache-beam'\]: pip "
                     r"install -e '\.\[prepare\]'"):
    catalog.prepare("cifar10", str(tmp_path))
  assert not (tmp_path / "cifar10").exists()


def test_download_failure_for_downsampled_imagenet_suggests_source_dir(tmp_path, monkeypatch):
  class Failing:
    def download_and_prepare(self, **kwargs):
      raise ConnectionError("404 Not Found")

  monkeypatch.setattr(catalog, "catalog_builder", lambda *a, **k: Failing())
  monkeypatch.setattr(catalog, "missing_modules", lambda *a: [])
  with pytest.raises(catalog.PrepareError) as error:
    catalog.prepare("imagenet64", str(tmp_path))
  message = str(error.value)
  for needle in ("404 Not Found", "train_64x64.tar", "valid_64x64.tar", "--source_dir"):
    assert needle in message


def test_tfrecord_dataset_is_explained_and_converted(tmp_path, monkeypatch):
  version_dir = write_cifar10(tmp_path, 8, 4)
  set_file_format(version_dir, "tfrecord")
  config = catalog_config("cifar10", tmp_path, (32, 32, 3))
  sources.open_split.cache_clear()
  with pytest.raises(FileNotFoundError) as error:
    pipeline.get_dataset_info(config)
  message = str(error.value)
  for needle in ("stored as tfrecord", "--dataset=cifar10", f"--data_dir={tmp_path}",
                 "--convert", str(version_dir)):
    assert needle in message
  with pytest.raises(catalog.PrepareError, match="already prepared .* as tfrecord.*--convert"):
    catalog.prepare("cifar10", str(tmp_path))

  converted = []
  monkeypatch.setattr(catalog, "missing_modules", lambda *a: [])
  monkeypatch.setattr(catalog, "convert_in_place", converted.append)
  assert catalog.prepare("cifar10", str(tmp_path), convert=True) == str(version_dir)
  assert converted == [str(version_dir)]
  # What TFDS's in-place conversion leaves: tfrecord first, array_record as an alternative.
  set_file_format(version_dir, "tfrecord", ["array_record"])
  sources.open_split.cache_clear()
  assert pipeline.get_dataset_info(config).num_train == 8
  assert catalog.prepare("cifar10", str(tmp_path)) == str(version_dir)  # nothing left to do


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dataset": "cifar100"}, "Unknown --dataset 'cifar100'; choose one of"),
        ({"dataset": "cifar10", "data_dir": ""}, "--data_dir is empty"),
        ({"dataset": "lsun_bedroom"}, "bedroom_train_lmdb.zip and bedroom_val_lmdb.zip"),
        ({"dataset": "lsun_bedroom_realnvp"}, "can only be prepared from the LSUN lmdb export"),
        ({"dataset": "cifar10", "source_dir": "."}, "TFDS downloads 'cifar10'"),
        ({"dataset": "cifar10", "source_dir": "/nonexistent/x"}, "is not a folder"),
        ({"dataset": "cifar10", "convert": True}, "--convert: nothing to convert"),
        ({"dataset": "digits", "convert": True}, "--convert is for TFDS catalog datasets"),
    ],
)
def test_prepare_errors(tmp_path, kwargs, message):
  kwargs = {"data_dir": str(tmp_path), **kwargs}
  with pytest.raises(catalog.PrepareError, match=message.replace(".", r"\.")):
    catalog.prepare(kwargs.pop("dataset"), kwargs.pop("data_dir"), **kwargs)


def test_missing_source_files_are_named(tmp_path):
  (tmp_path / "src").mkdir()
  with pytest.raises(catalog.PrepareError, match="has neither train_32x32.tar nor a folder"):
    catalog.prepare("imagenet32", str(tmp_path / "tfds"), source_dir=str(tmp_path / "src"))
  with pytest.raises(catalog.PrepareError, match=r"bedroom_train_lmdb/data.mdb"):
    catalog.prepare("lsun_bedroom", str(tmp_path / "tfds"), source_dir=str(tmp_path / "src"))


def test_prepare_offline_builder(tmp_path):
  out = catalog.prepare("digits", str(tmp_path))
  assert out == str(tmp_path / "digits")
  assert any(p.name.endswith("array_record-00000-of-00001") for p in Path(out).rglob("*"))


def test_command_line(tmp_path):
  """The command: prepares from source files, prints a summary; bad flags give one line."""
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  sources = write_downsampled_imagenet_sources(tmp_path / "src", 32, num_train=4, num_valid=2)
  commands = {
      "ok": ["--dataset=imagenet32", f"--data_dir={tmp_path / 'tfds'}", f"--source_dir={sources}"],
      "unknown": ["--dataset=nope", f"--data_dir={tmp_path}"],
      "no_data_dir": ["--dataset=cifar10"],
      "lsun": ["--dataset=lsun_bedroom", f"--data_dir={tmp_path}"],
  }
  procs = {
      name: subprocess.Popen(
          [sys.executable, "-m", "eiw_flow_jax.prepare", *args], env=env, cwd=REPO,
          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      )
      for name, args in commands.items()
  }
  out = {name: (p, *p.communicate(timeout=120)) for name, p in procs.items()}
  proc, stdout, stderr = out["ok"]
  assert proc.returncode == 0, stderr[-3000:]
  assert f"imagenet32 ready in {tmp_path / 'tfds'}" in stdout
  assert "train: 4 examples" in stdout and "validation: 2 examples" in stdout
  for name, needle in (("unknown", "Unknown --dataset 'nope'"),
                       ("lsun", "can only be prepared from the LSUN lmdb export")):
    proc, stdout, stderr = out[name]
    assert proc.returncode == 1 and needle in stderr, stderr[-3000:]
    assert "Traceback" not in stderr
  proc, stdout, stderr = out["no_data_dir"]
  assert proc.returncode == 1 and "Flag --data_dir must have a value other than None" in stderr


def test_not_prepared_message_points_to_the_prepare_command(tmp_path):
  sources.open_split.cache_clear()
  for name, shape, needles in (
      ("cifar10", (32, 32, 3), [f"python -m eiw_flow_jax.prepare --dataset=cifar10 "
                                f"--data_dir={tmp_path}\n"]),
      ("imagenet32", (32, 32, 3), ["--dataset=imagenet32", "--source_dir=SRC",
                                   "train_32x32.tar and valid_32x32.tar",
                                   "'downsampled_imagenet/32x32'"]),
      ("lsun_church", (64, 64, 3), ["--source_dir=SRC", "church_outdoor_train_lmdb/"]),
      ("imagenet32_resized", (32, 32, 3), ["--dataset=imagenet32_resized", "--source_dir=SRC",
                                           "Imagenet32_train.zip and Imagenet32_val.zip",
                                           "'imagenet_resized/32x32'"]),
      ("lsun_church_realnvp", (64, 64, 3), ["--dataset=lsun_church_realnvp", "--source_dir=SRC",
                                            "church_outdoor_train_lmdb/",
                                            "'lsun_realnvp/church_outdoor'"]),
  ):
    with pytest.raises(FileNotFoundError) as error:
      pipeline.get_dataset_info(catalog_config(name, tmp_path, shape))
    message = str(error.value)
    assert "pip install -e '.[prepare]'" in message
    for needle in needles:
      assert needle in message, (name, needle, message)


def test_reading_a_prepared_catalog_dataset_does_not_import_tensorflow(tmp_path):
  """Reading stays TensorFlow-free, also where the [prepare] extra installed TensorFlow."""
  write_cifar10(tmp_path, 8, 4)
  code = (
      "import sys\n"
      "from eiw_flow_jax.data import pipeline\n"
      "from eiw_flow_jax.config.schema import base_config\n"
      "c = base_config(); c.dataset.name = 'cifar10'; c.dataset.data_dir = sys.argv[1]\n"
      "c.model.image_shape = (32, 32, 3)\n"
      "assert pipeline.load_examples(c, 'train', 8).shape == (8, 32, 32, 3)\n"
      "loaded = [m for m in sys.modules if m.split('.')[0] == 'tensorflow']\n"
      "assert not loaded, loaded\n"
  )
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
