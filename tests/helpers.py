"""Tiny PaliGemma checkpoints in the exact Hub layout, for tests.

A small SentencePiece model with Gemma's piece layout (pad 0, eos 1, bos 2,
unk 3, `<locXXXX>` and `<segXXX>` pieces, byte fallback, no dummy prefix),
minimal config.json files like the Hub's, random weights, written with
either key naming, sharded or not, in float32 or bfloat16.
"""

import functools
import json
import os

import ml_dtypes
import numpy as np

from convert import hub, safetensors
from paligemma import config as config_lib, spm

CORPUS = """a red circle and a blue square
a photo of a cat sitting on a bench in the snow
answer en how many shapes are there
caption en
detect cat ; dog
the quick brown fox jumps over the lazy dog 0123456789
where is the cat standing? on the table, next to the window.
describe the image in detail: people, cars, trees and a river.
""".splitlines()

@functools.lru_cache(maxsize=None)
def tokenizer_bytes() -> bytes:
  return spm.train(CORPUS * 20)


def write_tokenizer(path: str) -> int:
  """Writes tokenizer.model; returns its piece count (= image token id)."""
  data = tokenizer_bytes()
  with open(path, "wb") as f:
    f.write(data)
  return spm.piece_count(data)


def tiny_config(gemma2: bool = False, n_pieces: int | None = None, **text) -> config_lib.PaliGemmaConfig:
  if n_pieces is None:
    n_pieces = spm.piece_count(tokenizer_bytes())
  vocab = -(-(n_pieces + 1) // 64) * 64  # <image> after the pieces, padded to 64 like the Hub
  vision = config_lib.VisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, image_size=56, patch_size=14,
                                   projection_dim=64)
  kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=1, head_dim=16)
  if gemma2:
    kw.update(model_type="gemma2", num_key_value_heads=2, query_pre_attn_scalar=24,
              sliding_window=12, attn_logit_softcapping=5.0, final_logit_softcapping=3.0)
  kw.update(text)
  return config_lib.PaliGemmaConfig(vision=vision, text=config_lib.TextConfig(**kw),
                                    image_token_index=n_pieces)


def random_weights(cfg: config_lib.PaliGemmaConfig, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in hub.shapes(cfg).items():
    if len(shape) == 1:  # norms and biases: around their neutral value
      base = 1.0 if name.endswith(("layer_norm1.weight", "layer_norm2.weight",
                                   "post_layernorm.weight")) else 0.0
      out[name] = (base + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    else:
      fan_in = int(np.prod(shape[1:]))
      out[name] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
  # The Hub's rows for <image> and the vocabulary padding are zeros.
  out[hub.TEXT + "embed_tokens.weight"][cfg.image_token_index:] = 0
  return out


def new_naming(name: str, drop_vision_model: bool = False) -> str:
  """The naming transformers >= 4.52 saves (the inverse of hub.canonical_name)."""
  if name.startswith(hub.TEXT):
    return "model.language_model." + name[len(hub.TEXT):]
  if name.startswith("vision_tower."):
    rest = name[len("vision_tower."):]
    if drop_vision_model:
      rest = rest[len("vision_model."):]
    return "model.vision_tower." + rest
  return "model." + name


def write_checkpoint(path: str, cfg: config_lib.PaliGemmaConfig, weights: dict, *,
                     dtype: str = "float32", naming: str = "hub", shards: int = 1) -> str:
  """Writes a Hub checkpoint directory as the Hub or transformers would."""
  os.makedirs(path, exist_ok=True)
  np_dtype = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
  tensors = {}
  for name, w in weights.items():
    if naming == "new":
      name = new_naming(name)
    elif naming == "new-short":
      name = new_naming(name, drop_vision_model=True)
    tensors[name] = w.astype(np_dtype)
  if naming != "hub":
    tensors["lm_head.weight"] = tensors["model.language_model.embed_tokens.weight"]
  names = list(tensors)
  groups = [names[i::shards] for i in range(shards)]
  if shards == 1:
    safetensors.write(os.path.join(path, "model.safetensors"), tensors, {"format": "pt"})
  else:
    weight_map = {}
    for i, group in enumerate(groups):
      fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
      safetensors.write(os.path.join(path, fname), {n: tensors[n] for n in group})
      weight_map.update({n: fname for n in group})
    with open(os.path.join(path, hub.INDEX), "w") as f:
      json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config_lib.to_hub_dict(cfg, dtype), f, indent=2)
  write_tokenizer(os.path.join(path, "tokenizer.model"))
  return path


def make_checkpoint(path: str, gemma2: bool = False, seed: int = 0, **kw) -> str:
  cfg = tiny_config(gemma2)
  return write_checkpoint(path, cfg, random_weights(cfg, seed), **kw)


def image_file(path: str, seed: int = 0, size=(40, 30), mode: str = "RGB") -> str:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  Image.fromarray(arr).convert(mode).save(path)
  return path
