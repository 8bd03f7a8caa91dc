"""Which ImageNet, which CelebA, which LSUN: the published data versions, prepared and compared.

Chrabaszcz et al.'s box-resized ImageNet is prepared from small fake archives in each published
format (pickled and `_npz` zips, their extracted files, Python 2 and 3 pickles) and must read
back exactly as TFDS's own `imagenet_resized` builder writes it; a tiny run trains on it,
evaluates and is tabulated against DenseFlow's row only. CelebA's and LSUN's preprocessings are
checked pixel for pixel against references computed here from the papers' code.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import REPO
from fake_catalog import (
  assert_tfds_layout,
  catalog_config,
  celeb_a_jpegs,
  write_celeb_a,
  write_lsun_lmdb,
  write_resized_imagenet_sources,
)
from PIL import Image

from eiw_flow_jax.commands import table
from eiw_flow_jax.data import catalog, pipeline, preprocess, registry, resized_imagenet, sources
from eiw_flow_jax.data.builders import LsunRealnvpBuilder, no_checksums_lookup

# The fake archives' sizes: 10 train batches of 2 or 3 images, and 5 validation images.
FAKE_COUNTS = {"train": 25, "validation": 5}


def _read(name: str, data_dir, split: str) -> list[tuple[np.ndarray, int]]:
  """(image, label) of every stored example of a prepared split, in stored order."""
  sources.open_split.cache_clear()
  source, _ = sources.open_split(name, str(data_dir), "", split)
  return [(np.asarray(source[i]["image"]), int(source[i]["label"])) for i in range(len(source))]


def _as_set(examples):
  return sorted((label, image.tobytes()) for image, label in examples)


@pytest.fixture(scope="module")
def fake_counts():
  """The published-count check, set to the fake archives' counts."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(resized_imagenet, "SPLIT_COUNTS", FAKE_COUNTS)
    yield


@pytest.fixture(scope="module")
def tfds_reference(tmp_path_factory):
  """What TFDS's own `imagenet_resized` builder writes from the `_npz` zips, per resolution.

  Its `_split_generators` and `_generate_examples` run unchanged, fed the local zips; only its
  PNG encoding (TensorFlow's) is Pillow's, as TensorFlow is not installed. Returns {size:
  {split: [(image, label)] in TFDS's stored order}}.
  """
  from tensorflow_datasets.core.features import image_feature

  def png(self, np_image):
    buffer = io.BytesIO()
    Image.fromarray(np_image).save(buffer, format="png")
    return buffer.getvalue()

  references = {}
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(image_feature._ImageEncoder, "_encode_image", png)  # noqa: SLF001
    for size in (32, 64):
      zips_dir = tmp_path_factory.mktemp(f"npz{size}")
      write_resized_imagenet_sources(zips_dir, size, kind="npz")

      class LocalDownloads:
        def __init__(self, folder: Path):
          self.folder = folder

        def download(self, urls):
          return [self.folder / url.rsplit("/", 1)[1] for url in urls]

        def iter_archive(self, path):
          # TFDS's own zip iteration, given an open file (for a path it opens tf.io.gfile).
          with open(path, "rb") as file:
            yield from tfds.download.iter_archive(file, tfds.download.ExtractMethod.ZIP)

      @no_checksums_lookup
      class TfdsBuilder(tfds.builder_cls("imagenet_resized"), skip_registration=True):
        name = "imagenet_resized"
        zips = zips_dir

        def _split_generators(self, dl_manager):
          return super()._split_generators(LocalDownloads(self.zips))

      data_dir = tmp_path_factory.mktemp(f"tfds_reference{size}")
      builder = TfdsBuilder(config=f"{size}x{size}", data_dir=str(data_dir),
                            file_format="array_record")
      builder.download_and_prepare()
      references[size] = {
          split: [(np.asarray(e["image"]), int(e["label"]))
                  for e in builder.as_data_source(split)]
          for split in ("train", "validation")
      }
  return references


CASES = [  # (size, kind, layout, Python 2 pickles)
    (32, "pickled", "zip", True),
    (32, "pickled", "zip", False),
    (32, "npz", "zip", False),
    (32, "pickled", "folders", True),
    (32, "npz", "folders", False),
    (64, "pickled", "zip", False),
]


@pytest.mark.parametrize(("size", "kind", "layout", "python2"), CASES,
                         ids=["-".join(map(str, c)) for c in CASES])
def test_resized_imagenet_reads_back_as_tfds_builds_it(
    tmp_path, fake_counts, tfds_reference, size, kind, layout, python2
):
  expected = write_resized_imagenet_sources(
      tmp_path / "src", size, kind=kind, layout=layout, python2=python2)
  name = f"imagenet{size}_resized"
  version_dir = Path(catalog.prepare(name, str(tmp_path / "tfds"), source_dir=tmp_path / "src"))
  assert version_dir == tmp_path / "tfds" / "imagenet_resized" / f"{size}x{size}" / "0.1.0"
  assert_tfds_layout(version_dir, f"imagenet_resized/{size}x{size}", FAKE_COUNTS,
                     extra=("label.labels.txt",))
  for split in ("train", "validation"):
    stored = _read(name, tmp_path / "tfds", split)
    # Pixel for pixel the arrays written, labels 0-based ...
    assert _as_set(stored) == _as_set(expected[split])
    # ... and in the order TFDS's own builder stores them (same keys, so the same shuffle).
    reference = tfds_reference[size][split]
    assert [label for _, label in stored] == [label for _, label in reference]
    assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(stored, reference, strict=True))
  info = pipeline.get_dataset_info(catalog_config(name, tmp_path / "tfds", (size, size, 3)))
  assert (info.num_train, info.num_eval, info.data_version) == (25, 5, "imagenet:chrabaszcz")


def test_resized_imagenet_source_errors_name_the_file(tmp_path, fake_counts):
  def prepare(src):
    sources.open_split.cache_clear()
    return catalog.prepare("imagenet32_resized", str(tmp_path / "tfds"), source_dir=src)

  src = tmp_path / "no_val"
  write_resized_imagenet_sources(src, 32)
  (src / "Imagenet32_val.zip").unlink()
  with pytest.raises(catalog.PrepareError, match=r"lacks val_data of Chrabaszcz et al.'s "
                     r"32x32 ImageNet: expected the zips Imagenet32_train.zip, "
                     r"Imagenet32_train_npz.zip, Imagenet32_val.zip, Imagenet32_val_npz.zip"):
    prepare(src)

  src = tmp_path / "twice"
  write_resized_imagenet_sources(src, 32, layout="folders")
  (src / "copy").mkdir()
  (src / "copy" / "val_data").write_bytes((src / "Imagenet32_val" / "val_data").read_bytes())
  with pytest.raises(catalog.PrepareError, match="val_data is in 2 places of the same kind"):
    prepare(src)

  assert not (tmp_path / "tfds" / "imagenet_resized" / "32x32" / "0.1.0").exists()


@pytest.mark.parametrize(("batch", "message"), [
    ({"data": np.zeros((2, 3 * 64 * 64), np.uint8), "labels": [1, 2]},
     r"data is uint8 \(2, 12288\), expected uint8 \(N, 3072\) for 32x32 images"),
    ({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 5]},
     r"labels span 0..5, expected the 1-based classes 1..1000"),
    ({"data": np.zeros((2, 3072), np.uint8), "labels": [1, 2, 3]},
     r"labels are int64 \(3,\), expected 2 integers"),
    ({"data": np.zeros((2, 3072), np.float32), "labels": [1, 2]}, r"data is float32"),
    ({"images": np.zeros((2, 3072), np.uint8)}, r"lacks \['data', 'labels'\]"),
])
def test_a_foreign_batch_is_refused_naming_the_file(tmp_path, batch, message):
  import pickle

  path = tmp_path / "train_data_batch_3"
  path.write_bytes(pickle.dumps(batch))
  with pytest.raises(ValueError, match=f"{path}: {message}"):
    resized_imagenet.read_batch(
        resized_imagenet.BatchFile("train_data_batch_3", resized_imagenet.PICKLED, path), 32)


def test_prepare_command_checks_the_published_counts(tmp_path, env):
  """The real command on the fake archives: their 25 images are not the published 1281167,
  and a missing zip is named, each in one line, nothing left half-prepared."""
  write_resized_imagenet_sources(tmp_path / "src", 32, python2=True)
  write_resized_imagenet_sources(tmp_path / "no_train", 32)
  (tmp_path / "no_train" / "Imagenet32_train.zip").unlink()
  procs = {
      name: subprocess.Popen(
          [sys.executable, "-m", "eiw_flow_jax.prepare", "--dataset=imagenet32_resized",
           f"--data_dir={tmp_path / 'tfds'}", f"--source_dir={tmp_path / name}"],
          env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for name in ("src", "no_train")
  }
  out = {name: (p, *p.communicate(timeout=300)) for name, p in procs.items()}
  for name, needle in (
      ("src", "the train split holds 25 images, but Chrabaszcz et al.'s has 1281167"),
      ("no_train", "lacks train_data_batch_1, train_data_batch_2, train_data_batch_3"),
  ):
    proc, _, stderr = out[name]
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(lines) == 1 and needle in lines[0], stderr[-3000:]
    assert "Traceback" not in stderr
  assert not list((tmp_path / "tfds").rglob("*.array_record*"))


# ----------------------------------------------------------------------------------------------
# A tiny run on Chrabaszcz's version: trained, evaluated, tabulated against DenseFlow's row.


def test_resized_imagenet_run_is_tabulated_against_denseflow_only(tmp_path, fake_counts):
  from eiw_flow_jax.training import train_loop

  write_resized_imagenet_sources(tmp_path / "src", 32, python2=True)
  catalog.prepare("imagenet32_resized", str(tmp_path / "tfds"), source_dir=tmp_path / "src")
  config = catalog_config("imagenet32_resized", tmp_path / "tfds", (32, 32, 3))
  config.model.num_levels, config.model.steps_per_level, config.model.hidden_channels = 1, 1, 4
  config.model.eiw.reduction = 2
  config.batch_size, config.eval_batch_size, config.init_batch_size = 8, 16, 16
  config.num_train_steps = config.log_every_steps = config.checkpoint_every_steps = 2
  config.sample.num_samples, config.sample.temperatures = 4, (0.7,)
  workdir = tmp_path / "runs" / "in32_chrabaszcz"
  train_loop.train_and_evaluate(config, str(workdir))
  results = json.loads((workdir / "results.json").read_text())
  assert results["dataset"] == "imagenet32_resized"
  assert results["data_version"] == "imagenet:chrabaszcz"
  assert results["num_evaluated"] == 5 and math.isfinite(results["bpd"])

  # The same numbers on van den Oord's version, from a results.json written before the field
  # existed (its version comes from the registry), are compared with the other papers.
  oord = tmp_path / "runs" / "in32_oord"
  oord.mkdir()
  old = {k: v for k, v in results.items() if k != "data_version"}
  (oord / "results.json").write_text(json.dumps({**old, "dataset": "imagenet32"}))
  rows, warnings = table.collect([str(tmp_path / "runs")])
  assert not warnings
  by_dir = {os.path.basename(r["workdir"]): r for r in rows}
  ours, theirs = by_dir["in32_chrabaszcz"], by_dir["in32_oord"]
  assert ours["benchmark"] == "ImageNet 32x32, Chrabaszcz et al."
  assert ours["published"] == {"DenseFlow": 3.63}
  assert ours["gap"]["DenseFlow"] == pytest.approx(results["bpd"] - 3.63)
  assert ours["not_compared"] == {
      "ImageNet 32x32, van den Oord et al.": {"RealNVP": 4.28, "Glow": 4.09, "Flow++": 3.86}}
  assert theirs["data_version"] == "imagenet:van_den_oord"
  assert theirs["published"] == {"RealNVP": 4.28, "Glow": 4.09, "Flow++": 3.86}
  assert theirs["not_compared"] == {"ImageNet 32x32, Chrabaszcz et al.": {"DenseFlow": 3.63}}
  text = table.markdown(rows)
  assert "| imagenet32_resized | imagenet:chrabaszcz | glow |" in text
  assert "  - DenseFlow 3.63, DenseFlow paper Table 1; version: DenseFlow's ImageNet" in text
  assert "- imagenet:chrabaszcz: Chrabaszcz, Loshchilov & Hutter (2017)" in text
  assert "- imagenet32 vs ImageNet 32x32, Chrabaszcz et al.: DenseFlow 3.63" in text


def _results(dataset: str, **fields) -> dict:
  return {"bpd": 3.0, "dataset": dataset, "split": "eiw", "eiw_mode": "global", "step": 1,
          "n_bits": 8, "image_shape": [64, 64, 3], **fields}


@pytest.mark.parametrize(("results", "published"), [
    (_results("celeba"), {}),  # this project's own crop: no published number
    (_results("celeba_realnvp", data_version="celeba:realnvp_crop"), {"RealNVP": 3.02}),
    (_results("celeba_denseflow", backbone="denseflow", iwbo_bpd=2.5, iwbo_k=200),
     {"DenseFlow": 1.99}),
    (_results("lsun_bedroom"), {}),
    (_results("lsun_bedroom_realnvp"), {"RealNVP": 2.72, "Glow": 2.38}),
    (_results("lsun_church_realnvp"), {"RealNVP": 3.08, "Glow": 2.67}),
    (_results("imagenet64_resized"), {"DenseFlow": 3.35}),
    (_results("imagenet64"), {"RealNVP": 3.98, "Glow": 3.81, "Flow++": 3.69}),
    # A recorded version wins over the dataset name's (the registry may change later).
    (_results("imagenet64", data_version="imagenet:chrabaszcz"), {"DenseFlow": 3.35}),
    (_results("celeba_realnvp", n_bits=5), {}),
    (_results("no_such_dataset"), {}),
])
def test_runs_are_compared_only_with_numbers_on_their_data_version(results, published):
  r = table.row(results, "/runs/x/results.json")
  assert r["published"] == published
  assert set(r["sources"]) == set(published)
  for model in published:
    assert r["sources"][model].startswith(table.REFERENCES[model])


def test_every_version_is_known_and_every_number_has_a_source():
  for name, spec in registry.DATASETS.items():
    assert spec.data_version in registry.DATA_VERSIONS, name
  versions = [b.data_version for b in table.BENCHMARKS if b.data_version is not None]
  assert set(versions) <= set(registry.DATA_VERSIONS)
  for bench in table.BENCHMARKS:
    assert bench.published
    for p in bench.published:
      assert p.model in table.REFERENCES and p.table and p.version, (bench.title, p)
  # One benchmark per version, size and bit depth: a run matches at most one.
  keys = [(b.data_version, b.image_shape, b.n_bits) for b in table.BENCHMARKS]
  assert len(keys) == len(set(keys))


# ----------------------------------------------------------------------------------------------
# CelebA: RealNVP's crop, DenseFlow's squashed whole image, this project's centred crop.


def _tf1_bilinear_reference(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """TF1 resize_bilinear (align_corners=False), one output pixel at a time, in float32."""
  in_h, in_w = image.shape[:2]
  x = image.astype(np.float32)
  scale_y, scale_x = np.float32(in_h / out_h), np.float32(in_w / out_w)
  out = np.zeros((out_h, out_w, image.shape[2]), np.float32)
  for i in range(out_h):
    y = np.float32(i) * scale_y
    y0, y1 = int(np.floor(y)), min(int(np.ceil(y)), in_h - 1)
    dy = np.float32(y - np.floor(y))
    for j in range(out_w):
      xx = np.float32(j) * scale_x
      x0, x1 = int(np.floor(xx)), min(int(np.ceil(xx)), in_w - 1)
      dx = np.float32(xx - np.floor(xx))
      top = x[y0, x0] + (x[y0, x1] - x[y0, x0]) * dx
      bottom = x[y1, x0] + (x[y1, x1] - x[y1, x0]) * dx
      out[i, j] = top + (bottom - top) * dy
  return out


@pytest.fixture(scope="module")
def celeb_a_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("celeb_a")
  write_celeb_a(data_dir, num_train=4, num_validation=2, num_test=3)
  return data_dir


def test_celeba_preprocessings_match_the_papers_code(celeb_a_dir):
  faces = [np.asarray(Image.open(io.BytesIO(blob))) for blob in celeb_a_jpegs("test", 3).values()]
  references = {
      # DenseFlow's loader: torchvision resize(img, (64, 64), BILINEAR) of the whole PIL image.
      "celeba_denseflow": [np.asarray(Image.fromarray(f).resize((64, 64), Image.BILINEAR))
                           for f in faces],
      # RealNVP: image[40:188, 15:163], resize_images(method=0, align_corners=False), rounded.
      "celeba_realnvp": [np.rint(_tf1_bilinear_reference(f[40:188, 15:163], 64, 64)).astype(
          np.uint8) for f in faces],
      # This project's: the centred 148x148 square (row 35), Lanczos.
      "celeba": [np.asarray(Image.fromarray(f[35:183, 15:163]).resize((64, 64), Image.LANCZOS))
                 for f in faces],
  }
  for name, expected in references.items():
    sources.open_split.cache_clear()
    config = catalog_config(name, celeb_a_dir, (64, 64, 3))
    images = pipeline.load_examples(config, "test", 3)
    assert images.shape == (3, 64, 64, 3) and images.dtype == np.uint8
    # TFDS stores the split in a hashed order: compare the sets of images, pixel for pixel.
    assert sorted(i.tobytes() for i in images) == sorted(w.tobytes() for w in expected), name
    assert pipeline.get_dataset_info(config).data_version == registry.DATASETS[name].data_version
  # The three are different data: whole faces squashed are not the crop.
  assert not np.array_equal(references["celeba_denseflow"][0], references["celeba_realnvp"][0])


def test_tf1_bilinear_is_the_legacy_kernel():
  image = np.random.RandomState(0).randint(0, 256, (218, 178, 3)).astype(np.uint8)
  # No half-pixel offset and no antialiasing: an exact 2x downsample takes every other pixel.
  np.testing.assert_array_equal(preprocess.tf1_resize_bilinear(image, (109, 89)),
                                image[::2, ::2].astype(np.float32))
  np.testing.assert_array_equal(
      preprocess.realnvp_celeba(image, (64, 64, 3)),
      np.rint(_tf1_bilinear_reference(image[40:188, 15:163], 64, 64)).astype(np.uint8))
  with pytest.raises(ValueError, match="needs images of at least 188x163"):
    preprocess.realnvp_celeba(image[:150], (64, 64, 3))


# ----------------------------------------------------------------------------------------------
# LSUN as RealNVP and Glow prepared it: smallest side 96, then 64x64 windows.


def _pyramid_reduce_reference(image: np.ndarray) -> np.ndarray:
  """lsun_formatting.py's `pyramid_reduce(image, downscale) * 255` as uint8, with scikit-image
  0.12's resize written per pixel (bilinear_interpolation at the warp's source coordinates)."""
  from scipy import ndimage

  rows, cols = image.shape[:2]
  downscale = min(rows / 96., cols / 96.)
  out_rows, out_cols = math.ceil(rows / downscale), math.ceil(cols / downscale)
  pixels = image * (1.0 / 255)
  smooth = np.stack([ndimage.gaussian_filter(pixels[..., c], 2 * downscale / 6.0, mode="reflect")
                     for c in range(3)], axis=-1)
  out = np.zeros((out_rows, out_cols, 3))
  for i in range(out_rows):
    r = (rows / out_rows) * (i + 0.5) - 0.5
    r0, r1, dr = math.floor(r), math.ceil(r), r - math.floor(r)
    for j in range(out_cols):
      c = (cols / out_cols) * (j + 0.5) - 0.5
      c0, c1, dc = math.floor(c), math.ceil(c), c - math.floor(c)
      top = (1 - dc) * smooth[r0, c0] + dc * smooth[r0, c1]
      bottom = (1 - dc) * smooth[r1, c0] + dc * smooth[r1, c1]
      out[i, j] = (1 - dr) * top + dr * bottom
  return (np.clip(out, smooth.min(), smooth.max()) * 255.0).astype(np.uint8)


def _window_positions(image: np.ndarray, window: np.ndarray) -> list[tuple[int, int]]:
  h, w = window.shape[:2]
  return [(top, left) for top in range(image.shape[0] - h + 1)
          for left in range(image.shape[1] - w + 1)
          if np.array_equal(image[top : top + h, left : left + w], window)]


def test_realnvp_lsun_downscale_shapes():
  image = np.random.RandomState(1).randint(0, 256, (256, 341, 3)).astype(np.uint8)
  assert preprocess.realnvp_lsun_downscale(image).shape == (96, 128, 3)
  assert preprocess.realnvp_lsun_downscale(image[:, :256]).shape == (96, 96, 3)
  with pytest.raises(ValueError, match=r"img7 is 96x341: RealNVP's LSUN downscaling needs"):
    preprocess.realnvp_lsun_downscale(image[:96], "img7")


def test_lsun_realnvp_is_prepared_downscaled_and_read_as_64x64_windows(tmp_path):
  import lmdb  # a requirement (requirements.txt) of LSUN's preparation
  src = write_lsun_lmdb(tmp_path / "src", "church_outdoor", num_train=4, num_val=3,
                        shape=(100, 131, 3))
  version_dir = Path(catalog.prepare("lsun_church_realnvp", str(tmp_path / "tfds"),
                                     source_dir=src))
  builder = LsunRealnvpBuilder(config="church_outdoor", data_dir=str(tmp_path / "tfds"))
  assert version_dir == tmp_path / "tfds" / "lsun_realnvp" / "church_outdoor" / "1.0.0"
  assert_tfds_layout(version_dir, "lsun_realnvp/church_outdoor", {"train": 4, "validation": 3},
                     builder=builder)
  # Stored: each webp decoded, downscaled as RealNVP's lsun_formatting.py does, pixel-exact.
  stored = {}
  for split, lmdb_split in (("train", "train"), ("validation", "val")):
    source = builder.as_data_source(split)
    env = lmdb.open(str(src / f"church_outdoor_{lmdb_split}_lmdb"), readonly=True, lock=False)
    with env.begin() as txn:
      originals = {key.decode(): np.asarray(Image.open(io.BytesIO(value)).convert("RGB"))
                   for key, value in txn.cursor()}
    env.close()
    stored[split] = [np.asarray(e["image"]) for e in source]
    for example in source:
      np.testing.assert_array_equal(example["image"],
                                    _pyramid_reduce_reference(originals[example["id"].decode()]))
  assert stored["train"][0].shape == (96, 126, 3)  # 100x131 -> smallest side 96

  # Read: 64x64 windows, at fixed positions for evaluation, fresh ones for every training draw.
  config = catalog_config("lsun_church_realnvp", tmp_path / "tfds", (64, 64, 3))
  sources.open_split.cache_clear()
  info = pipeline.get_dataset_info(config)
  assert (info.num_train, info.num_eval, info.data_version) == (4, 3, "lsun_church:realnvp")
  evaluation = pipeline.load_examples(config, "validation", 3)
  np.testing.assert_array_equal(evaluation, pipeline.load_examples(config, "validation", 3))
  positions = [_window_positions(full, window) for full, window in
               zip(stored["validation"], evaluation, strict=True)]
  assert all(positions) and len({p[0] for p in positions}) > 1
  config.batch_size = 4
  iterator = pipeline.create_train_iterator(config)
  batches = [next(iterator)["image"] for _ in range(3)]  # three epochs of the four images
  windows = {}
  for image in np.concatenate(batches):
    owner = [i for i, full in enumerate(stored["train"]) if _window_positions(full, image)]
    assert len(owner) == 1
    windows.setdefault(owner[0], set()).add(_window_positions(stored["train"][owner[0]],
                                                              image)[0])
  assert sorted(windows) == [0, 1, 2, 3] and all(len(p) == 3 for p in windows.values())


# ----------------------------------------------------------------------------------------------
# The configs: the paper's model on the authors' data, Glow's on Glow's.


def _load_config(name: str):
  import importlib.util

  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize(("config_name", "data_version"), [
    ("imagenet32_denseflow", "imagenet:chrabaszcz"),
    ("imagenet64_denseflow", "imagenet:chrabaszcz"),
    ("celeba_denseflow", "celeba:whole_squashed"),
    ("imagenet32", "imagenet:van_den_oord"),
    ("imagenet64", "imagenet:van_den_oord"),
    ("celeba", "celeba:realnvp_crop"),
    ("lsun_bedroom", "lsun_bedroom:realnvp"),
    ("lsun_church", "lsun_church:realnvp"),
])
def test_configs_default_to_the_data_their_published_target_used(config_name, data_version):
  config = _load_config(config_name)
  spec = registry.DATASETS[config.dataset.name]
  assert spec.data_version == data_version
  # The config's shape is a benchmark's of that version: its run gets compared.
  results = {"dataset": config.dataset.name, "n_bits": config.model.n_bits,
             "image_shape": list(config.model.image_shape)}
  assert table.benchmark_for(results) is not None
