"""The one mapping between the Hub's weight layout and big_vision's.

Hub: one tensor per layer, torch layouts (Linear weights [out, in], Conv
OIHW). big_vision: '/'-joined keys, layers stacked on axis 0, einsum
layouts (Conv HWIO; q (N, D, H); kv (2, K, D, H); attn_vec (N, H, D);
gating (2, D, F); linear (F, D)). Its embedding has one row per
SentencePiece piece; the Hub adds <image> and pads to a multiple of 64.

Each direction is a dict of key -> `Stacked` or `Single`: a shape, a dtype
and a function producing the array (per layer, for stacked ones), so a
writer can stream one layer at a time.
"""

import dataclasses
from typing import Callable

import numpy as np

from convert import hub as hub_lib
from convert.hub import PROJECTOR, TEXT, VISION
from paligemma.config import PaliGemmaConfig

ENC = "img/Transformer/encoderblock/"
ATT = ENC + "MultiHeadDotProductAttention_0/"


@dataclasses.dataclass
class Single:
  shape: tuple
  dtype: np.dtype
  produce: Callable[[], np.ndarray]

  def __call__(self):
    return self.produce()


@dataclasses.dataclass
class Stacked:
  """[L, ...] built from L per-layer arrays."""
  shape: tuple
  dtype: np.dtype
  layer: Callable[[int], np.ndarray]

  def __call__(self):
    return np.stack([self.layer(i) for i in range(self.shape[0])])


def _vision_layer_map(cfg: PaliGemmaConfig):
  """bv key -> (hub suffix in layer i, hub->bv fn, bv->hub fn) for SigLIP layers."""
  v = cfg.vision
  D, N, H = v.hidden_size, v.num_attention_heads, v.head_dim
  t = lambda a: a.T
  m = {
      "LayerNorm_0/scale": ("layer_norm1.weight", None, None),
      "LayerNorm_0/bias": ("layer_norm1.bias", None, None),
      "LayerNorm_1/scale": ("layer_norm2.weight", None, None),
      "LayerNorm_1/bias": ("layer_norm2.bias", None, None),
      "MlpBlock_0/Dense_0/kernel": ("mlp.fc1.weight", t, t),
      "MlpBlock_0/Dense_0/bias": ("mlp.fc1.bias", None, None),
      "MlpBlock_0/Dense_1/kernel": ("mlp.fc2.weight", t, t),
      "MlpBlock_0/Dense_1/bias": ("mlp.fc2.bias", None, None),
  }
  for bv, hub in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
    m[f"MultiHeadDotProductAttention_0/{bv}/kernel"] = (
        f"self_attn.{hub}.weight", lambda a: a.T.reshape(D, N, H), lambda a: a.reshape(D, D).T)
    m[f"MultiHeadDotProductAttention_0/{bv}/bias"] = (
        f"self_attn.{hub}.bias", lambda a: a.reshape(N, H), lambda a: a.reshape(D))
  m["MultiHeadDotProductAttention_0/out/kernel"] = (
      "self_attn.out_proj.weight", lambda a: a.T.reshape(N, H, D), lambda a: a.reshape(D, D).T)
  m["MultiHeadDotProductAttention_0/out/bias"] = ("self_attn.out_proj.bias", None, None)
  return m


def _text_layer_map(cfg: PaliGemmaConfig):
  """bv key -> list of (hub suffix, ...) for Gemma layers; multi-source keys
  (kv, gating) take several Hub tensors."""
  t = cfg.text
  D, N, K, H = t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim
  norms = {"pre_attention_norm/scale": "input_layernorm.weight"}
  if t.is_gemma2:
    norms.update({"post_attention_norm/scale": "post_attention_layernorm.weight",
                  "pre_ffw_norm/scale": "pre_feedforward_layernorm.weight",
                  "post_ffw_norm/scale": "post_feedforward_layernorm.weight"})
  else:  # Gemma 1's pre-MLP norm is called post_attention_layernorm on the Hub
    norms["pre_ffw_norm/scale"] = "post_attention_layernorm.weight"
  m = {k: ([v], lambda a: a, [lambda a: a]) for k, v in norms.items()}
  heads_in = lambda n: (lambda a: a.reshape(n, H, D).transpose(0, 2, 1))  # (nH, D) -> (n, D, H)
  heads_out = lambda n: (lambda a: a.transpose(0, 2, 1).reshape(n * H, D))
  m["attn/q_einsum/w"] = (["self_attn.q_proj.weight"], heads_in(N), [heads_out(N)])
  m["attn/kv_einsum/w"] = (["self_attn.k_proj.weight", "self_attn.v_proj.weight"],
                           lambda k, v: np.stack([heads_in(K)(k), heads_in(K)(v)]),
                           [lambda a: heads_out(K)(a[0]), lambda a: heads_out(K)(a[1])])
  m["attn/attn_vec_einsum/w"] = (["self_attn.o_proj.weight"],
                                 lambda a: a.reshape(D, N, H).transpose(1, 2, 0),
                                 [lambda a: a.transpose(2, 0, 1).reshape(D, N * H)])
  m["mlp/gating_einsum"] = (["mlp.gate_proj.weight", "mlp.up_proj.weight"],
                            lambda g, u: np.stack([g.T, u.T]), [lambda a: a[0].T, lambda a: a[1].T])
  m["mlp/linear"] = (["mlp.down_proj.weight"], lambda a: a.T, [lambda a: a.T])
  return m


def hub_to_big_vision(cfg: PaliGemmaConfig, hub: dict) -> dict:
  """Hub name -> array (lazy) to big_vision key -> Single/Stacked."""
  want = shapes(cfg)
  dt = hub[TEXT + "embed_tokens.weight"].dtype
  pieces = cfg.image_token_index
  singles = {
      "img/embedding/kernel": lambda: hub[VISION + "embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0),
      "img/embedding/bias": lambda: hub[VISION + "embeddings.patch_embedding.bias"],
      "img/pos_embedding": lambda: hub[VISION + "embeddings.position_embedding.weight"][None],
      "img/Transformer/encoder_norm/scale": lambda: hub[VISION + "post_layernorm.weight"],
      "img/Transformer/encoder_norm/bias": lambda: hub[VISION + "post_layernorm.bias"],
      "img/head/kernel": lambda: hub[PROJECTOR + "weight"].T,
      "img/head/bias": lambda: hub[PROJECTOR + "bias"],
      "llm/embedder/input_embedding": lambda: hub[TEXT + "embed_tokens.weight"][:pieces],
      "llm/final_norm/scale": lambda: hub[TEXT + "norm.weight"],
  }
  result = {key: Single(want[key], dt, fn) for key, fn in singles.items()}
  for key, (suffix, fwd, _) in _vision_layer_map(cfg).items():
    fwd = fwd or (lambda a: a)
    result[ENC + key] = Stacked(
        want[ENC + key], dt,
        lambda i, s=suffix, f=fwd: np.asarray(f(hub[f"{VISION}encoder.layers.{i}.{s}"])))
  for key, (suffixes, fwd, _) in _text_layer_map(cfg).items():
    result["llm/layers/" + key] = Stacked(
        want["llm/layers/" + key], dt,
        lambda i, ss=suffixes, f=fwd: np.asarray(f(*[hub[f"{TEXT}layers.{i}.{s}"] for s in ss])))
  return result


def big_vision_to_hub(cfg: PaliGemmaConfig, bv: dict) -> dict:
  """big_vision key -> array (lazy, stacked) to Hub name -> Single."""
  v, t = cfg.vision, cfg.text
  dt = bv["llm/embedder/input_embedding"].dtype
  pieces = cfg.image_token_index

  def embed():
    e = bv["llm/embedder/input_embedding"]
    return np.concatenate([e, np.zeros((t.vocab_size - pieces, e.shape[1]), e.dtype)])

  fns = {
      VISION + "embeddings.patch_embedding.weight": lambda: bv["img/embedding/kernel"].transpose(3, 2, 0, 1),
      VISION + "embeddings.patch_embedding.bias": lambda: bv["img/embedding/bias"],
      VISION + "embeddings.position_embedding.weight": lambda: bv["img/pos_embedding"][0],
      VISION + "post_layernorm.weight": lambda: bv["img/Transformer/encoder_norm/scale"],
      VISION + "post_layernorm.bias": lambda: bv["img/Transformer/encoder_norm/bias"],
      PROJECTOR + "weight": lambda: bv["img/head/kernel"].T,
      PROJECTOR + "bias": lambda: bv["img/head/bias"],
      TEXT + "embed_tokens.weight": embed,
      TEXT + "norm.weight": lambda: bv["llm/final_norm/scale"],
  }
  for i in range(v.num_hidden_layers):
    for key, (suffix, _, back) in _vision_layer_map(cfg).items():
      back = back or (lambda a: a)
      fns[f"{VISION}encoder.layers.{i}.{suffix}"] = lambda i=i, k=key, b=back: b(bv[ENC + k][i])
  for i in range(t.num_hidden_layers):
    for key, (suffixes, _, backs) in _text_layer_map(cfg).items():
      for s, b in zip(suffixes, backs):
        fns[f"{TEXT}layers.{i}.{s}"] = lambda i=i, k=key, b=b: b(bv["llm/layers/" + k][i])
  want = hub_lib.shapes(cfg)
  return {name: Single(want[name], dt, lambda f=f: np.ascontiguousarray(f()))
          for name, f in fns.items()}

_SINGLE_KEYS = ["img/embedding/kernel", "img/embedding/bias", "img/pos_embedding",
                "img/Transformer/encoder_norm/scale", "img/Transformer/encoder_norm/bias",
                "img/head/kernel", "img/head/bias", "llm/embedder/input_embedding",
                "llm/final_norm/scale"]


def shapes(cfg: PaliGemmaConfig) -> dict[str, tuple]:
  """Every big_vision key of this config and its (stacked) shape."""
  out = {key: _shape_of(cfg, key) for key in _SINGLE_KEYS}
  for key in _vision_layer_map(cfg):
    out[ENC + key] = (cfg.vision.num_hidden_layers,) + _shape_of(cfg, ENC + key)
  for key in _text_layer_map(cfg):
    out["llm/layers/" + key] = (cfg.text.num_hidden_layers,) + _shape_of(cfg, "llm/layers/" + key)
  return out



def _shape_of(cfg: PaliGemmaConfig, key: str) -> tuple:
  """Shape of one big_vision key (per layer for stacked keys)."""
  v, t = cfg.vision, cfg.text
  d, p, N, H = v.hidden_size, v.patch_size, v.num_attention_heads, v.head_dim
  D, F, Nt, K, Ht = t.hidden_size, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim
  table = {
      "img/embedding/kernel": (p, p, v.num_channels, d), "img/embedding/bias": (d,),
      "img/pos_embedding": (1, v.num_patches, d),
      "img/Transformer/encoder_norm/scale": (d,), "img/Transformer/encoder_norm/bias": (d,),
      "img/head/kernel": (d, D), "img/head/bias": (D,),
      "llm/embedder/input_embedding": (cfg.image_token_index, D), "llm/final_norm/scale": (D,),
      ATT + "out/kernel": (N, H, d), ATT + "out/bias": (d,),
      ENC + "MlpBlock_0/Dense_0/kernel": (d, v.intermediate_size),
      ENC + "MlpBlock_0/Dense_0/bias": (v.intermediate_size,),
      ENC + "MlpBlock_0/Dense_1/kernel": (v.intermediate_size, d),
      ENC + "MlpBlock_0/Dense_1/bias": (d,),
      "llm/layers/attn/q_einsum/w": (Nt, D, Ht), "llm/layers/attn/kv_einsum/w": (2, K, D, Ht),
      "llm/layers/attn/attn_vec_einsum/w": (Nt, Ht, D),
      "llm/layers/mlp/gating_einsum": (2, D, F), "llm/layers/mlp/linear": (F, D),
  }
  if key in table:
    return table[key]
  if key.startswith(ENC + "LayerNorm_"):
    return (d,)
  if key.startswith(ATT):
    return (d, N, H) if key.endswith("kernel") else (N, H)
  if key.startswith("llm/layers/") and key.endswith("norm/scale"):
    return (D,)
  raise KeyError(key)
