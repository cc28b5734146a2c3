"""Hugging Face Hub checkpoints: a directory of config.json, tokenizer.model
and model.safetensors (or shards listed in model.safetensors.index.json).

Tensors are returned under the Hub's canonical names, whichever naming the
files use (the Hub's `language_model.model.*` or the `model.language_model.*`
that transformers >= 4.52 saves), checked against the shapes the config
implies: a missing, unexpected or wrongly shaped key is an error naming it.
"""

import dataclasses
import json
import os
import shutil
import tempfile

import numpy as np

from convert import safetensors
from paligemma import config as config_lib
from paligemma.errors import UserError

VISION = "vision_tower.vision_model."
TEXT = "language_model.model."
PROJECTOR = "multi_modal_projector.linear."
INDEX = "model.safetensors.index.json"


def shapes(cfg: config_lib.PaliGemmaConfig) -> dict[str, tuple]:
  """Every Hub weight of this config and its shape (lm_head excluded: tied)."""
  v, t = cfg.vision, cfg.text
  d, p = v.hidden_size, v.patch_size
  out = {
      VISION + "embeddings.patch_embedding.weight": (d, v.num_channels, p, p),
      VISION + "embeddings.patch_embedding.bias": (d,),
      VISION + "embeddings.position_embedding.weight": (v.num_patches, d),
      VISION + "post_layernorm.weight": (d,),
      VISION + "post_layernorm.bias": (d,),
      PROJECTOR + "weight": (t.hidden_size, d),
      PROJECTOR + "bias": (t.hidden_size,),
      TEXT + "embed_tokens.weight": (t.vocab_size, t.hidden_size),
      TEXT + "norm.weight": (t.hidden_size,),
  }
  for i in range(v.num_hidden_layers):
    pre = f"{VISION}encoder.layers.{i}."
    for n in ("layer_norm1", "layer_norm2"):
      out[pre + n + ".weight"] = out[pre + n + ".bias"] = (d,)
    for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
      out[f"{pre}self_attn.{n}.weight"] = (d, d)
      out[f"{pre}self_attn.{n}.bias"] = (d,)
    out[pre + "mlp.fc1.weight"] = (v.intermediate_size, d)
    out[pre + "mlp.fc1.bias"] = (v.intermediate_size,)
    out[pre + "mlp.fc2.weight"] = (d, v.intermediate_size)
    out[pre + "mlp.fc2.bias"] = (d,)
  D, F = t.hidden_size, t.intermediate_size
  norms = ["input_layernorm", "post_attention_layernorm"]
  if t.is_gemma2:
    norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
  for i in range(t.num_hidden_layers):
    pre = f"{TEXT}layers.{i}."
    out[pre + "self_attn.q_proj.weight"] = (t.num_attention_heads * t.head_dim, D)
    out[pre + "self_attn.k_proj.weight"] = (t.num_key_value_heads * t.head_dim, D)
    out[pre + "self_attn.v_proj.weight"] = (t.num_key_value_heads * t.head_dim, D)
    out[pre + "self_attn.o_proj.weight"] = (D, t.num_attention_heads * t.head_dim)
    out[pre + "mlp.gate_proj.weight"] = (F, D)
    out[pre + "mlp.up_proj.weight"] = (F, D)
    out[pre + "mlp.down_proj.weight"] = (D, F)
    for n in norms:
      out[f"{pre}{n}.weight"] = (D,)
  return out


def canonical_name(key: str) -> str | None:
  """Hub name for a key of either naming; None for the tied lm_head."""
  if key in ("lm_head.weight", "language_model.lm_head.weight"):
    return None
  if key.startswith("model.language_model."):
    return TEXT + key[len("model.language_model."):]
  if key.startswith("model.vision_tower."):
    rest = key[len("model.vision_tower."):]
    return "vision_tower." + (rest if rest.startswith("vision_model.") else "vision_model." + rest)
  if key.startswith("model.multi_modal_projector."):
    return key[len("model."):]
  return key


@dataclasses.dataclass
class Checkpoint:
  config: config_lib.PaliGemmaConfig
  tensors: dict[str, np.ndarray]  # Hub names -> lazy arrays, as stored
  tokenizer_path: str


def _shard_files(path: str) -> list[str]:
  single = os.path.join(path, "model.safetensors")
  index = os.path.join(path, INDEX)
  if os.path.isfile(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      names = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
      raise UserError(f"{index}: invalid safetensors index") from None
    for name in names:
      if os.path.basename(name) != name or not os.path.isfile(os.path.join(path, name)):
        raise UserError(f"{path}: shard {name!r} named in {INDEX} is missing")
    return [os.path.join(path, n) for n in names]
  if os.path.isfile(single):
    return [single]
  raise UserError(f"{path}: no model.safetensors or {INDEX}")


def check_shapes(want: dict, got: dict, where: str, noun: str) -> None:
  """Raises UserError on the first unexpected, misshapen or missing key."""
  for name in sorted(got):
    if name not in want:
      raise UserError(f"{where}: unexpected {noun} {name!r}")
    if tuple(got[name].shape) != want[name]:
      raise UserError(f"{where}: {noun} {name!r} has shape {tuple(got[name].shape)}, "
                      f"the config implies {want[name]}")
  for name in want:
    if name not in got:
      raise UserError(f"{where}: missing {noun} {name!r}")


def check(cfg: config_lib.PaliGemmaConfig, tensors: dict, where: str) -> None:
  check_shapes(shapes(cfg), tensors, where, "weight")


def read(path: str, tokenizer_path: str | None = None) -> Checkpoint:
  """Opens a Hub checkpoint directory; nothing is read into memory yet."""
  if not os.path.isdir(path):
    raise UserError(f"checkpoint directory not found: {path}")
  cfg = config_lib.load(path)
  tokenizer_path = tokenizer_path or os.path.join(path, "tokenizer.model")
  if not os.path.isfile(tokenizer_path):
    raise UserError(f"tokenizer not found: {tokenizer_path} (give --tokenizer)")
  tensors = {}
  for shard in _shard_files(path):
    for key, arr in safetensors.read(shard).items():
      name = canonical_name(key)
      if name is None:
        continue
      if name in tensors:
        raise UserError(f"{path}: weight {key!r} appears twice")
      if arr.dtype.kind != "f" and arr.dtype != safetensors.DTYPES["BF16"]:
        raise UserError(f"{shard}: weight {key!r} has non-float dtype {arr.dtype}")
      tensors[name] = arr
  check(cfg, tensors, path)
  return Checkpoint(cfg, tensors, tokenizer_path)


def write(path: str, cfg: config_lib.PaliGemmaConfig, tensors: dict, tokenizer_path: str,
          dtype: str = "float32", shard_bytes: int = 5 << 30, overwrite: bool = False,
          extra=None) -> None:
  """Writes a Hub checkpoint directory atomically: into a temporary sibling,
  renamed into place only once complete. `tensors` maps Hub names to arrays
  or lazy producers (convert/layout.py), made one at a time, so writing
  streams. `extra(tmp_dir)`, if given, adds files before the rename."""
  path = os.path.abspath(path)
  if os.path.exists(path) and not overwrite:
    raise UserError(f"output exists: {path} (pass --overwrite to replace it)")
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix="." + os.path.basename(path) + ".tmp-", dir=parent)
  try:
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
      nbytes = np.dtype(t.dtype).itemsize * int(np.prod(t.shape))
      if current and size + nbytes > shard_bytes:
        shards.append(current)
        current, size = {}, 0
      current[name] = t
      size += nbytes
    shards.append(current)
    meta = {"format": "pt"}
    if len(shards) == 1:
      safetensors.write(os.path.join(tmp, "model.safetensors"), shards[0], meta)
    else:
      weight_map, total = {}, 0
      for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        safetensors.write(os.path.join(tmp, fname), shard, meta)
        for name, t in shard.items():
          weight_map[name] = fname
          total += np.dtype(t.dtype).itemsize * int(np.prod(t.shape))
      with open(os.path.join(tmp, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(config_lib.to_hub_dict(cfg, dtype), f, indent=2)
    shutil.copyfile(tokenizer_path, os.path.join(tmp, "tokenizer.model"))
    if extra is not None:
      extra(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private
    if os.path.exists(path):
      shutil.rmtree(path)
    os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
