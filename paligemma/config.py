"""PaliGemma config.json, parsed into typed configs with transformers' defaults.

Hub configs carry only what differs from transformers' class defaults, so
every omitted field is filled here with the value transformers would use
(transformers 5.x: GemmaConfig, Gemma2Config, SiglipVisionConfig,
PaliGemmaConfig). `to_hub_dict` writes the same minimal form back.
"""

import dataclasses
import json
import os

from paligemma.errors import UserError

# Activation names as config.json spells them, mapped to the two GELUs.
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """SigLIP vision tower (SiglipVisionConfig defaults)."""
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 16
  layer_norm_eps: float = 1e-6
  hidden_act: str = "gelu_pytorch_tanh"
  projection_dim: int = 2048

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def gelu_approximate(self) -> bool:
    return self.hidden_act in _GELU_TANH


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """Gemma 1 or Gemma 2 decoder (GemmaConfig / Gemma2Config defaults)."""
  model_type: str = "gemma"
  vocab_size: int = 256000
  hidden_size: int = 3072
  intermediate_size: int = 24576
  num_hidden_layers: int = 28
  num_attention_heads: int = 16
  num_key_value_heads: int = 16
  head_dim: int = 256
  max_position_embeddings: int = 8192
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  hidden_act: str = "gelu_pytorch_tanh"
  # Gemma 2 only; None on Gemma 1.
  query_pre_attn_scalar: float | None = None
  sliding_window: int | None = None
  attn_logit_softcapping: float | None = None
  final_logit_softcapping: float | None = None

  @property
  def is_gemma2(self) -> bool:
    return self.model_type == "gemma2"

  @property
  def attn_scale(self) -> float:
    if self.query_pre_attn_scalar is not None:
      return float(self.query_pre_attn_scalar) ** -0.5
    return float(self.head_dim) ** -0.5

  def is_sliding(self, layer: int) -> bool:
    """Gemma 2 alternates local and global layers, starting local at layer 0."""
    return self.is_gemma2 and self.sliding_window is not None and layer % 2 == 0


@dataclasses.dataclass(frozen=True)
class PaliGemmaConfig:
  vision: VisionConfig
  text: TextConfig
  image_token_index: int = 256000
  pad_token_id: int = 0
  bos_token_id: int = 2
  eos_token_id: int = 1

  @property
  def num_image_tokens(self) -> int:
    return self.vision.num_patches


_GEMMA2_DEFAULTS = dict(
    vocab_size=256000, hidden_size=2304, intermediate_size=9216,
    num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
    query_pre_attn_scalar=256, sliding_window=4096,
    attn_logit_softcapping=50.0, final_logit_softcapping=30.0)


def _fields(cls, d):
  names = {f.name for f in dataclasses.fields(cls)}
  out = {}
  for k, v in d.items():
    if k in names and v is not None:
      out[k] = v
  return out


def _int(d, key, where):
  v = d[key]
  if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
    raise UserError(f"config.json: {where}.{key} must be a positive integer, got {v!r}")
  return v


def _text_from_dict(d) -> TextConfig:
  model_type = d.get("model_type", "gemma")
  if model_type not in ("gemma", "gemma2"):
    raise UserError(f"config.json: unknown text_config.model_type {model_type!r} "
                    "(expected 'gemma' or 'gemma2')")
  kw = dict(_GEMMA2_DEFAULTS) if model_type == "gemma2" else {}
  kw.update(_fields(TextConfig, d))
  kw["model_type"] = model_type
  rope = d.get("rope_parameters") or {}
  if "rope_theta" in rope:
    kw["rope_theta"] = rope["rope_theta"]
  if rope.get("rope_type", "default") != "default":
    raise UserError(f"config.json: unsupported rope_type {rope['rope_type']!r}")
  if model_type == "gemma2":
    # Gemma 2 reads `hidden_activation`; its `hidden_act` is ignored by transformers.
    kw["hidden_act"] = d.get("hidden_activation") or "gelu_pytorch_tanh"
    layer_types = d.get("layer_types")
    if layer_types is not None:
      want = ["sliding_attention" if i % 2 == 0 else "full_attention"
              for i in range(kw["num_hidden_layers"])]
      if list(layer_types) != want:
        raise UserError("config.json: only alternating sliding/full layer_types "
                        "starting with sliding are supported")
  elif kw.get("hidden_act") == "gelu":
    # Legacy Gemma configs say "gelu" and mean the tanh approximation.
    kw["hidden_act"] = "gelu_pytorch_tanh"
  cfg = TextConfig(**kw)
  for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim"):
    _int(dataclasses.asdict(cfg), key, "text_config")
  if cfg.num_attention_heads % cfg.num_key_value_heads:
    raise UserError("config.json: num_attention_heads must be a multiple of num_key_value_heads")
  if cfg.hidden_act not in _GELU_TANH:
    raise UserError(f"config.json: unsupported text activation {cfg.hidden_act!r}")
  return cfg


def _vision_from_dict(d, projection_dim) -> VisionConfig:
  model_type = d.get("model_type", "siglip_vision_model")
  if model_type != "siglip_vision_model":
    raise UserError(f"config.json: unknown vision_config.model_type {model_type!r}")
  if d.get("vision_use_head"):
    raise UserError("config.json: vision_use_head=true is not a PaliGemma vision tower")
  kw = _fields(VisionConfig, d)
  kw["projection_dim"] = projection_dim
  cfg = VisionConfig(**kw)
  for key in ("hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "image_size", "patch_size"):
    _int(dataclasses.asdict(cfg), key, "vision_config")
  if cfg.hidden_act not in _GELU_TANH + ("gelu",):
    raise UserError(f"config.json: unsupported vision activation {cfg.hidden_act!r}")
  if cfg.image_size % cfg.patch_size or cfg.hidden_size % cfg.num_attention_heads:
    raise UserError("config.json: image_size must be a multiple of patch_size and "
                    "hidden_size of num_attention_heads")
  return cfg


def from_dict(d: dict) -> PaliGemmaConfig:
  if not isinstance(d, dict):
    raise UserError("config.json: top level must be a JSON object")
  if d.get("model_type") != "paligemma":
    raise UserError(f"config.json: unknown model_type {d.get('model_type')!r} (expected 'paligemma')")
  try:
    text = _text_from_dict(d.get("text_config") or {})
    projection_dim = d.get("projection_dim", 2048)
    vision = _vision_from_dict(d.get("vision_config") or {}, projection_dim)
    top = {k: d[k] for k in ("image_token_index", "pad_token_id", "bos_token_id", "eos_token_id")
           if d.get(k) is not None}
    cfg = PaliGemmaConfig(vision=vision, text=text, **top)
  except TypeError as e:  # a field of the wrong kind, e.g. a string for a size
    raise UserError(f"config.json: {e}") from None
  if projection_dim != text.hidden_size:
    raise UserError(f"config.json: projection_dim {projection_dim} != text hidden_size {text.hidden_size}")
  return cfg


def load(path: str) -> PaliGemmaConfig:
  """Reads config.json (a file, or a directory holding one)."""
  if os.path.isdir(path):
    path = os.path.join(path, "config.json")
  try:
    with open(path) as f:
      d = json.load(f)
  except FileNotFoundError:
    raise UserError(f"config not found: {path}") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{path}: invalid JSON ({e})") from None
  return from_dict(d)


def _non_default(obj, defaults) -> dict:
  return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)
          if getattr(obj, f.name) != defaults.get(f.name, f.default)}


def to_hub_dict(cfg: PaliGemmaConfig, dtype: str = "float32") -> dict:
  """The config.json the Hub publishes: top-level ids plus only non-defaults."""
  text_defaults = dict(_GEMMA2_DEFAULTS) if cfg.text.is_gemma2 else {}
  text = _non_default(cfg.text, text_defaults)
  text.pop("model_type", None)
  if cfg.text.is_gemma2:
    text.pop("hidden_act", None)
  for k in ("query_pre_attn_scalar", "sliding_window", "attn_logit_softcapping",
            "final_logit_softcapping"):
    if text.get(k, 0) is None:
      del text[k]
  if "rope_theta" in text:
    text["rope_parameters"] = {"rope_theta": text.pop("rope_theta"), "rope_type": "default"}
  vision = _non_default(cfg.vision, {})
  vision.pop("projection_dim", None)
  return {
      "architectures": ["PaliGemmaForConditionalGeneration"],
      "bos_token_id": cfg.bos_token_id,
      "eos_token_id": cfg.eos_token_id,
      "pad_token_id": cfg.pad_token_id,
      "hidden_size": cfg.text.hidden_size,
      "ignore_index": -100,
      "image_token_index": cfg.image_token_index,
      "model_type": "paligemma",
      "projection_dim": cfg.text.hidden_size,
      "text_config": dict(text, model_type=cfg.text.model_type,
                          num_image_tokens=cfg.num_image_tokens, torch_dtype=dtype),
      "vision_config": dict(vision, model_type="siglip_vision_model",
                            num_image_tokens=cfg.num_image_tokens,
                            projection_dim=cfg.text.hidden_size,
                            projector_hidden_act="gelu_fast", vision_use_head=False),
      "torch_dtype": dtype,
      "transformers_version": "4.42.0.dev0",
  }
