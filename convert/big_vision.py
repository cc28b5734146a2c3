"""big_vision PaliGemma checkpoints (.npz), read lazily and written streaming.

Keys are '/'-joined, with or without a leading `params/`; bf16 arrays are
stored as raw 2-byte void and viewed as bfloat16. Uncompressed members are
memory-mapped straight out of the zip, so nothing is read until used.

A .npz carries no config and no tokenizer: `--variant` (or `--config`) and
`--tokenizer` supply them, or the `<stem>.config.json` and
`<stem>.tokenizer.model` files our converter writes beside it. What the
file's shapes determine is checked against the config, naming the key.
"""

import json
import os
import shutil
import struct
import tempfile
import zipfile

import ml_dtypes
import numpy as np

from convert import hub, layout
from paligemma import config as config_lib
from paligemma.errors import UserError

_SIGLIP_SO400M = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                  "num_attention_heads": 16, "patch_size": 14}
_DECODERS = {
    "paligemma": {"model_type": "gemma", "hidden_size": 2048, "intermediate_size": 16384,
                  "num_hidden_layers": 18, "num_attention_heads": 8, "num_key_value_heads": 1},
    "paligemma2-3b": {"model_type": "gemma2", "hidden_size": 2304, "intermediate_size": 9216,
                      "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4},
    "paligemma2-10b": {"model_type": "gemma2", "hidden_size": 3584, "intermediate_size": 14336,
                       "num_hidden_layers": 42, "num_attention_heads": 16, "num_key_value_heads": 8},
    "paligemma2-28b": {"model_type": "gemma2", "hidden_size": 4608, "intermediate_size": 36864,
                       "num_hidden_layers": 46, "num_attention_heads": 32, "num_key_value_heads": 16,
                       "head_dim": 128, "query_pre_attn_scalar": 144},
}
VARIANTS = {f"{name if name != 'paligemma' else 'paligemma-3b'}-{px}": (dec, px)
            for name, dec in _DECODERS.items() for px in (224, 448, 896)}


# Small enough to train on two CPU cores in about an hour: the bundled demo.
DEMO = dict(
    vision=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                num_attention_heads=4, image_size=96, patch_size=16),
    text=dict(model_type="gemma", hidden_size=128, intermediate_size=512, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=1, head_dim=32))


def variant_config(name: str, pieces: int = 257152) -> config_lib.PaliGemmaConfig:
  """The config.json the Hub publishes for a named variant (or the demo size);
  `pieces` (the tokenizer's) sets image_token_index and the padded vocabulary."""
  if name == "demo":
    return config_lib.from_dict({
        "model_type": "paligemma", "image_token_index": pieces,
        "projection_dim": DEMO["text"]["hidden_size"],
        "text_config": dict(DEMO["text"], vocab_size=-(-(pieces + 1) // 64) * 64),
        "vision_config": dict(DEMO["vision"], model_type="siglip_vision_model")})
  if name not in VARIANTS:
    raise UserError(f"unknown --variant {name!r}; known: {', '.join(sorted(VARIANTS))}")
  text, px = VARIANTS[name]
  return config_lib.from_dict({
      "model_type": "paligemma", "image_token_index": pieces,
      "projection_dim": text["hidden_size"],
      "text_config": dict(text, vocab_size=-(-(pieces + 1) // 64) * 64),
      "vision_config": dict(_SIGLIP_SO400M, image_size=px, model_type="siglip_vision_model"),
  })


def _member(f, info: zipfile.ZipInfo, path: str):
  """A lazy view of one stored .npy member, or None if it must be read."""
  if info.compress_type != zipfile.ZIP_STORED:
    return None
  f.seek(info.header_offset)
  local = f.read(30)
  name_len, extra_len = struct.unpack("<HH", local[26:30])
  f.seek(info.header_offset + 30 + name_len + extra_len)
  version = np.lib.format.read_magic(f)
  read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                 else np.lib.format.read_array_header_2_0)
  shape, fortran, dtype = read_header(f)
  if dtype.hasobject:
    raise UserError(f"{path}: {info.filename} holds Python objects; refusing to unpickle")
  if not int(np.prod(shape)):
    return np.zeros(shape, dtype)
  return np.memmap(path, dtype=dtype, mode="c", offset=f.tell(), shape=shape,
                   order="F" if fortran else "C")


def read_npz(path: str) -> dict[str, np.ndarray]:
  """key (without `params/`) -> lazy array."""
  if not os.path.isfile(path):
    raise UserError(f"checkpoint not found: {path}")
  out = {}
  try:
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
      for info in zf.infolist():
        if not info.filename.endswith(".npy"):
          continue
        arr = _member(f, info, path)
        if arr is None:
          with zf.open(info) as m:
            arr = np.lib.format.read_array(m, allow_pickle=False)
        key = info.filename[:-4]
        key = key[len("params/"):] if key.startswith("params/") else key
        if arr.dtype.kind == "V" and arr.dtype.itemsize == 2:
          arr = arr.view(ml_dtypes.bfloat16)
        out[key] = arr
  except (zipfile.BadZipFile, ValueError, OSError, EOFError, struct.error) as e:
    raise UserError(f"{path}: not a readable .npz ({e})") from None
  return out


def check(cfg: config_lib.PaliGemmaConfig, flat: dict, where: str) -> None:
  hub.check_shapes(layout.shapes(cfg), flat, where, "key")


def sidecars(path: str) -> tuple[str, str]:
  stem = path[:-len(".npz")]
  return stem + ".config.json", stem + ".tokenizer.model"


def read(path: str, tokenizer: str | None = None, variant: str | None = None,
         config: str | None = None):
  """-> (config, big_vision key -> lazy array, tokenizer path), checked."""
  flat = read_npz(path)
  side_config, side_tokenizer = sidecars(path)
  emb = flat.get("llm/embedder/input_embedding")
  if emb is None or emb.ndim != 2:
    raise UserError(f"{path}: missing key 'llm/embedder/input_embedding'")
  if variant and config:
    raise UserError("give --variant or --config, not both")
  if variant:
    cfg = variant_config(variant, emb.shape[0])
  elif config or os.path.isfile(side_config):
    cfg = config_lib.load(config or side_config)
  else:
    raise UserError(f"{path}: a .npz has no config: give --variant (e.g. paligemma-3b-224) "
                    "or --config")
  tokenizer = tokenizer or (side_tokenizer if os.path.isfile(side_tokenizer) else None)
  if tokenizer is None:
    raise UserError(f"{path}: a .npz has no tokenizer: give --tokenizer")
  if not os.path.isfile(tokenizer):
    raise UserError(f"tokenizer not found: {tokenizer}")
  check(cfg, flat, path)
  return cfg, flat, tokenizer


def read_as_hub(path, tokenizer=None, variant=None, config=None) -> hub.Checkpoint:
  """The .npz as a Hub checkpoint (for the PyTorch model): mapped in memory."""
  cfg, flat, tokenizer = read(path, tokenizer, variant, config)
  tensors = {name: t() for name, t in layout.big_vision_to_hub(cfg, flat).items()}
  return hub.Checkpoint(cfg, tensors, tokenizer)


def _npy_descr(dtype: np.dtype) -> str:
  return "|V2" if dtype == ml_dtypes.bfloat16 else np.lib.format.dtype_to_descr(dtype)


def write_npz(path: str, tensors: dict, overwrite: bool = False) -> None:
  """Writes key -> array / layout.Single / layout.Stacked under `params/`,
  one layer at a time, to a temporary file renamed into place when done."""
  if os.path.exists(path) and not overwrite:
    raise UserError(f"output exists: {path} (pass --overwrite to replace it)")
  fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".tmp-",
                             dir=os.path.dirname(os.path.abspath(path)))
  os.close(fd)
  try:
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
      for key, t in tensors.items():
        dtype = np.dtype(t.dtype)
        with zf.open(f"params/{key}.npy", "w", force_zip64=True) as m:
          np.lib.format.write_array_header_2_0(
              m, {"descr": _npy_descr(dtype), "fortran_order": False, "shape": tuple(t.shape)})
          parts = ((t.layer(i) for i in range(t.shape[0])) if isinstance(t, layout.Stacked)
                   else [t() if callable(t) else t])
          for part in parts:
            m.write(np.ascontiguousarray(part, dtype).reshape(-1).view(np.uint8).data)
    os.replace(tmp, path)
  except BaseException:
    os.remove(tmp)
    raise


def write_sidecars(path: str, cfg: config_lib.PaliGemmaConfig, tokenizer: str, dtype: str):
  side_config, side_tokenizer = sidecars(path)
  with open(side_config + ".tmp", "w") as f:
    json.dump(config_lib.to_hub_dict(cfg, dtype), f, indent=2)
  os.replace(side_config + ".tmp", side_config)
  shutil.copyfile(tokenizer, side_tokenizer + ".tmp")
  os.replace(side_tokenizer + ".tmp", side_tokenizer)
