"""The authors' PyTorch DenseFlow / EIW-Flow checkpoints: reading a .pt file (without torch where
it can) and mapping its state_dict onto the DenseFlow backbone's parameters.
Reading the .pt file: torch's zip format is parsed here without torch (a restricted unpickler
that only rebuilds tensors); an older torch's pickle, or a zip holding other objects, needs
torch, imported only then (`pip install torch==2.13.0`, for conversion only); a file that is
neither is refused as no checkpoint.

The mapping is by name and shape, and it must be complete both ways: every parameter of the
JAX model gets a value and every weight of the file is used (its constant buffers aside), or
`ConversionError` says which keys are missing or left over. Layout changes: conv kernels
OIHW -> HWIO, Linear weights transposed, (1, C, 1, 1) per-channel tensors flattened.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

# Buffers of the torch model that are constants of the architecture, not weights.
IGNORED_SUFFIXES = (
    ".initialized", ".num_batches_tracked", ".dist.buffer", "._shift", "._scale",
    ".ldj_per_dim", ".temperature",
)


class ConversionError(ValueError):
  """A file or state_dict that cannot become the configured model's variables (one line)."""


# ----------------------------------------------------------------------------------------------
# Reading .pt files without torch.

_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "BFloat16Storage": None,
}


class _StorageType:
  def __init__(self, name: str):
    self.name = name


def _rebuild_tensor(storage, offset, size, stride, *args):
  data, itemsize = storage
  if not size:
    return data[offset:offset + 1].reshape(())
  strides = tuple(s * itemsize for s in stride)
  return np.lib.stride_tricks.as_strided(data[offset:], shape=tuple(size), strides=strides).copy()


class _Unpickler(pickle.Unpickler):
  """Rebuilds only tensors (and plain containers); refuses every other global."""

  def __init__(self, file, zf: zipfile.ZipFile, prefix: str):
    super().__init__(file)
    self.zf, self.prefix, self.cache = zf, prefix, {}

  def find_class(self, module: str, name: str):
    if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
      return _rebuild_tensor
    if module == "torch" and name in _DTYPES:
      return _StorageType(name)
    if module == "collections" and name == "OrderedDict":
      import collections

      return collections.OrderedDict
    if module == "torch._utils" and name == "_rebuild_parameter":
      return lambda data, requires_grad, hooks: data
    raise pickle.UnpicklingError(f"unsupported global {module}.{name}")

  def persistent_load(self, pid):
    _, storage_type, key, _location, _numel = pid
    name = storage_type.name if isinstance(storage_type, _StorageType) else str(storage_type)
    dtype = _DTYPES.get(name)
    if dtype is None:
      raise pickle.UnpicklingError(f"unsupported storage {name}")
    if key not in self.cache:
      raw = self.zf.read(f"{self.prefix}/data/{key}")
      self.cache[key] = np.frombuffer(raw, dtype=dtype)
    return self.cache[key], np.dtype(dtype).itemsize


class TorchRequiredError(ConversionError):
  """A PyTorch checkpoint that only torch can read (and torch is not installed)."""


def _read_zip_pt(path: str) -> Any:
  with zipfile.ZipFile(path) as zf:
    pkl = [n for n in zf.namelist() if n.endswith("/data.pkl")]
    if not pkl:
      raise ConversionError(
          f"{path} is a zip archive but not a PyTorch checkpoint (it holds no data.pkl)."
      )
    prefix = pkl[0][: -len("/data.pkl")]
    return _Unpickler(io.BytesIO(zf.read(pkl[0])), zf, prefix).load()


def _starts_like_a_pickle(path: str) -> bool:
  """Whether the file starts as a pickle of protocol 2 or later (torch < 1.6's .pt format)."""
  with open(path, "rb") as f:
    head = f.read(2)
  return len(head) == 2 and head[0] == pickle.PROTO[0] and 2 <= head[1] <= pickle.HIGHEST_PROTOCOL


def read_torch_file(path: str) -> Any:
  """The object saved in a .pt file, tensors as numpy arrays (torch only as a fallback).

  A .npz file of key -> array is accepted as a state_dict too. Raises FileNotFoundError for a
  missing file and ConversionError (one line) for one that is no checkpoint: torch.save writes
  a zip archive holding `data.pkl` (torch >= 1.6) or, before, a pickle. Zip checkpoints of
  tensors are read here; others (older pickles, other objects than tensors) need torch, and
  without it raise TorchRequiredError saying so.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"No such checkpoint: {path}")
  if not os.path.isfile(path):
    raise ConversionError(f"{path} is not a file; expected a PyTorch checkpoint (.pt).")
  if path.endswith(".npz"):  # a state_dict saved with numpy.savez (key -> array)
    try:
      with np.load(path) as f:
        return {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
      raise ConversionError(f"{path} is not a readable .npz of arrays: {e}") from e
  if zipfile.is_zipfile(path):
    try:
      return _read_zip_pt(path)
    except (pickle.UnpicklingError, KeyError, ValueError, EOFError) as e:
      if isinstance(e, ConversionError):
        raise
      needs = f"it holds what the reader without torch does not rebuild ({e})"
  elif _starts_like_a_pickle(path):
    needs = "it is in the pickle format of torch before 1.6"
  else:
    raise ConversionError(
        f"{path} is not a PyTorch checkpoint: torch.save writes a zip archive (torch >= 1.6) "
        "or a pickle (older torch), and this file is neither."
    )
  try:
    import torch
  except ImportError as e:
    raise TorchRequiredError(
        f"{path} can only be read with torch: {needs}. Install it for the conversion: "
        "pip install torch==2.13.0."
    ) from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=False)
  except Exception as e:  # noqa: BLE001 - whatever torch raises for a damaged file
    detail = " ".join(str(e).split())[:300]
    raise ConversionError(f"torch could not read {path}: {type(e).__name__}: {detail}") from e
  return _to_numpy(obj)


def _to_numpy(obj: Any) -> Any:
  if hasattr(obj, "detach") and hasattr(obj, "numpy"):
    return obj.detach().cpu().numpy()
  if isinstance(obj, Mapping):
    return {k: _to_numpy(v) for k, v in obj.items()}
  return obj


def state_dict_from(obj: Any) -> dict[str, np.ndarray]:
  """The model's state_dict from what a .pt holds (their checkpoint dict or a state_dict)."""
  if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
    obj = obj["model"]
  if not isinstance(obj, Mapping):
    raise ConversionError(f"Expected a state_dict (a mapping), got {type(obj).__name__}.")
  out = {}
  for key, value in obj.items():
    key = key[len("module."):] if key.startswith("module.") else key
    out[key] = np.asarray(value)
  return out


# ----------------------------------------------------------------------------------------------
# Names.

# (pattern, replacement) applied in order to the torch key (without its leaf name).
_DENSE_BLOCK = [
    (r"\.(\d+)\.nn\.0$", r"/layer\1/conv0"),
    (r"\.(\d+)\.nn\.2$", r"/layer\1/conv2"),
    (r"\.\d+\.conv$", r"/gate/conv"),
]


def _sub_all(path: str, rules) -> str:
  for pattern, repl in rules:
    path = re.sub(pattern, repl, path)
  return path


def _map_key(key: str, num_blocks: int) -> tuple[str, tuple[str, ...], str] | None:
  """torch key -> (collection, flax path, kind of layout change); None for constants."""
  if key.endswith(IGNORED_SUFFIXES):
    return None
  module, leaf = key.rsplit(".", 1)
  collection = "params"
  m = re.match(r"^base_dist$", module)
  if m:
    return collection, (f"base_{leaf}",), "flat"
  m = re.match(r"^transforms\.0\.encoder\.(.*)$", module)
  if m:
    rest = m.group(1)
    if rest == "base_dist":
      return collection, ("dequantizer", leaf), "flat"
    rest = re.sub(r"^context_init\.1", "context_block0", rest)
    rest = re.sub(r"^context_init\.2$", "context_down", rest)
    rest = re.sub(r"^context_init\.3", "context_block1", rest)
    t = re.match(r"^transforms\.(\d+)(.*)$", rest)
    if t:
      i, tail = int(t.group(1)), t.group(2)
      if tail == "":
        return collection, ("dequantizer", f"conv{i // 2}", leaf), "matrix"
      tail = tail.replace(".coupling_net.0.transform.0", "/net/conv_in")
      tail = tail.replace(".coupling_net.0.transform.2", "/net/conv_out")
      tail = tail.replace(".coupling_net.0.transform.1.dense", "/net/block")
      rest = f"coupling{(i - 1) // 2}" + _sub_all(tail, _DENSE_BLOCK)
    else:
      rest = _sub_all(rest, _DENSE_BLOCK)
    return collection, ("dequantizer", *rest.split("/")), _conv_leaf(leaf)
  m = re.match(r"^transforms\.(\d+)\.(.*)$", module)
  if not m:
    raise ConversionError(f"Unexpected key {key!r}.")
  index, rest = int(m.group(1)), m.group(2)
  if index < 3 or (index - 3) >= 2 * num_blocks - 1:
    raise ConversionError(f"Key {key!r} does not fit a model with {num_blocks} dense blocks.")
  scale = (index - 3) // 2
  if (index - 3) % 2:  # a transition
    names = {"SELayer.fc.0": "se_fc0", "SELayer.fc.2": "se_fc2",
             "weightGenerator.fc.0": "wg_fc0", "weightGenerator.fc.2": "wg_fc2"}
    if rest not in names or leaf != "weight":
      raise ConversionError(f"Unexpected transition key {key!r}.")
    return collection, (f"transition{scale}", names[rest]), "linear"
  block = f"block{scale}"
  n = re.match(r"^noise_params\.(\d+)\.transformation\.(0|2)$", rest)
  if n:
    return collection, (block, f"noise{n.group(1)}", f"conv{n.group(2)}"), _conv_leaf(leaf)
  u = re.match(r"^blocks\.(\d+)\.transforms\.(\d+)\.transforms\.(\d)(.*)$", rest)
  if not u:
    raise ConversionError(f"Unexpected dense-block key {key!r}.")
  unit, layer, part, tail = u.group(1), u.group(2), int(u.group(3)), u.group(4)
  prefix = (block, f"unit{unit}")
  if part == 0:
    return collection, (*prefix, f"layer{layer}_actnorm", leaf), "flat"
  if part == 1:
    return collection, (*prefix, f"layer{layer}_conv1x1", leaf), "matrix"
  tail = tail.replace(".coupling_net.0.dn.transform.0", "/net/conv_in")
  tail = tail.replace(".coupling_net.0.dn.transform.2", "/net/conv_out")
  tail = tail.replace(".coupling_net.0.dn.transform.1.mha.", "/net/block/mha/")
  tail = tail.replace(".coupling_net.0.dn.transform.1.mix_conv.2", "/net/block/mix")
  tail = tail.replace(".coupling_net.0.dn.transform.1.dense", "/net/block/dense")
  path = f"layer{layer}_coupling" + _sub_all(tail, _DENSE_BLOCK)
  if tail.startswith(".coupling_net.0.dn.transform.1.mix_conv.0"):
    path = f"layer{layer}_coupling/net/block/bn"
    bn = {"weight": ("params", "scale"), "bias": ("params", "bias"),
          "running_mean": ("constants", "mean"), "running_var": ("constants", "var")}
    collection, leaf = bn[leaf]
    return collection, (*prefix, *path.split("/"), leaf), "flat"
  return collection, (*prefix, *path.split("/")), _conv_leaf(leaf)


def _conv_leaf(leaf: str) -> str:
  return {"weight": "conv_kernel", "bias": "bias"}[leaf]


def _convert_value(kind: str, value: np.ndarray) -> tuple[str | None, np.ndarray]:
  if kind == "conv_kernel":
    return "kernel", np.transpose(value, (2, 3, 1, 0))
  if kind == "bias":
    return "bias", value
  if kind == "linear":
    return None, value.T
  if kind == "flat":
    return None, value.reshape(-1)
  return None, value


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray], flow: Any
) -> dict[str, Any]:
  """state_dict (numpy) -> variables {"params", "constants"} for `flow` (a DenseFlow).

  Raises ConversionError listing missing or unused keys and shape mismatches.
  """
  import jax

  backbone = getattr(flow, "backbone", "glow")
  if backbone != "denseflow":
    raise ConversionError(
        f"The authors' checkpoints are DenseFlow models, but the config's model.backbone is "
        f"{backbone!r}: use a DenseFlow config (configs/*_denseflow.py)."
    )
  num_blocks = len(flow.model_config.denseflow.block_conf)
  shapes = jax.eval_shape(
      lambda: flow.init(jax.random.PRNGKey(0), np.zeros((1, *flow.image_shape), np.uint8)))
  out: dict[str, Any] = {"params": {}, "constants": {}}
  for key, value in state_dict.items():
    mapped = _map_key(key, num_blocks)
    if mapped is None:
      continue
    collection, path, kind = mapped
    leaf, value = _convert_value(kind, np.asarray(value, np.float32))
    if leaf is not None:  # a conv's path names the module; add the leaf
      path = (*path, leaf)
    node = out[collection]
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
  out = flow.migrate_layout(out)  # the torch model's per-layer names -> the stacked layout
  expected = _flatten(shapes)
  got = _flatten(out)
  missing = sorted(set(expected) - set(got))
  extra = sorted(set(got) - set(expected))
  bad = [f"{k}: expected {expected[k].shape}, got {got[k].shape}"
         for k in sorted(set(expected) & set(got)) if tuple(expected[k].shape) != got[k].shape]
  if missing or extra or bad:
    raise ConversionError(
        "The state_dict does not fit the configured model (check block_conf, layers_conf, "
        f"layer_mid_chnls, growth_rate, image_shape, split): missing ({len(missing)}): "
        f"{missing[:8]}; unused ({len(extra)}): {extra[:8]}; shape mismatches ({len(bad)}): "
        f"{bad[:8]}"
    )
  return out




def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    name = f"{prefix}/{k}" if prefix else k
    if isinstance(v, Mapping):
      out.update(_flatten(v, name))
    else:
      out[name] = v
  return out


def authors_weight_ties(variables: Mapping[str, Any]) -> dict[str, dict[str, int]]:
  """Per EIW transition of converted DenseFlow variables: where the authors' float32 channel
  weights tie exactly (`denseflow.authors_weight_ties`: counts, and whether a tie crosses the
  kept/factored split). Empty for vanilla transitions."""
  import jax

  from eiw_flow_jax.model.backbones import denseflow

  out = {}
  params = variables["params"]
  names = sorted((k for k in params if k.startswith("transition") and "wg_fc2" in params[k]),
                 key=lambda k: int(k[len("transition"):]))
  for name in names:
    wg_fc0, wg_fc2 = np.asarray(params[name]["wg_fc0"]), np.asarray(params[name]["wg_fc2"])
    logits = denseflow.weight_generator_logits(wg_fc0, wg_fc2, wg_fc2.shape[1])
    ties = jax.device_get(denseflow.authors_weight_ties(logits))
    out[name] = {"channels": wg_fc2.shape[1], **{k: int(v) for k, v in ties.items()}}
  return out


def describe_weight_ties(ties: Mapping[str, Mapping[str, int]]) -> str:
  """One line on `authors_weight_ties`: can the authors' own channel order be reproduced?"""
  if not ties:
    return "EIW channel order: no EIW transitions (vanilla split)."
  tied = {name: t for name, t in ties.items() if t["authors_tied_channels"]}
  if not tied:
    return ("EIW channel order: the authors' float32 channel weights are distinct at every "
            "transition, so their order is defined and reproduced (sorted by logit).")
  parts, undefined = [], False
  for name, t in tied.items():
    where = "all factored"
    if t["authors_ties_cross_split"]:
      where, undefined = "crossing the kept/factored split", True
    elif t["authors_tied_kept_channels"]:
      where, undefined = f"{t['authors_tied_kept_channels']} kept", True
    parts.append(f"{name} {t['authors_tied_channels']} of {t['channels']} channels ({where})")
  effect = ("the authors' likelihood depends on their sort's implementation" if undefined else
            "their likelihood does not depend on it, their regulariser does")
  return ("EIW channel order: the authors' float32 weights tie exactly (underflow) at "
          f"{'; '.join(parts)}; torch's unstable sort leaves the tied order undefined and "
          f"{effect}; here ties go by logit, then channel index.")
