"""Builds the Flax parameter tree from a checkpoint.

A Hub directory goes through the shared layout mapping (convert/layout.py)
one layer at a time; a big_vision .npz is already in this tree's layout.
Each tensor is assembled in a 64-byte-aligned host buffer that XLA's CPU
client then adopts without a copy (`device_put(may_alias=True)`, float32 and
bfloat16 alike), so loading holds the weights once plus one tensor's pages
of the file.

The decoder comes in the training layout (`llm/layers/...` stacked, as
checkpoints hold it) or, by default, the inference one (`llm/layers_{i}/...`,
each matrix as rows): see paligemma_jax/gemma.py.
"""

import functools

import jax
import ml_dtypes
import numpy as np

from convert import hub, layout, safetensors
from paligemma_jax import gemma
from paligemma_jax.paligemma import PaliGemma

_NP = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def _aligned_empty(shape, dtype: np.dtype) -> np.ndarray:
  n = int(np.prod(shape)) * dtype.itemsize
  buf = np.empty(n + 64, np.uint8)
  start = -buf.ctypes.data % 64
  return buf[start:start + n].view(dtype).reshape(shape)


def to_jax(t, dtype: str, layer: int | None = None, perm: tuple | None = None,
           release=lambda: None):
  """A layout producer (or an array) -> a JAX array, assembled layer by
  layer (`release` called after each copy); with `layer`, that layer of a
  stacked one, its axes permuted by `perm` (in the same copy)."""
  shape = t.shape if layer is None else t.shape[1:]
  perm = perm or tuple(range(len(shape)))
  out = _aligned_empty(tuple(shape[i] for i in perm), _NP[dtype])
  if layer is not None:
    w = t.layer(layer) if isinstance(t, layout.Stacked) else t[layer]
    out[...] = np.transpose(w, perm)
    release()
  elif isinstance(t, layout.Stacked):
    for i in range(t.shape[0]):
      out[i] = t.layer(i)
      release()
  else:
    out[...] = t() if callable(t) else t
    release()
  # On the CPU, XLA adopts the aligned buffer instead of copying it.
  return jax.device_put(out, may_alias=True)


def unflatten(flat: dict) -> dict:
  tree = {}
  for key, value in flat.items():
    *path, leaf = key.split("/")
    node = tree
    for p in path:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def flatten(tree: dict, prefix: str = "") -> dict:
  """The inverse of `unflatten`: nested dict -> '/'-joined keys."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, prefix + key + "/"))
    else:
      flat[prefix + key] = value
  return flat


_LAYERS = "llm/layers/"


def params_from_flat(flat: dict, dtype: str = "float32", scan: bool = False,
                     sources: list | None = None) -> dict:
  """big_vision keys -> the parameter tree in the training layout (scan) or
  the inference one; the file mappings `sources` are released after each
  layer is copied."""
  # Released as each layer is copied: a stacked tensor's file pages, left
  # mapped until the whole stack was done, took bf16 3B's peak RSS from 1.04x
  # the weights to 1.26x.
  release = functools.partial(safetensors.release, sources or [])
  out = {}
  for key, t in flat.items():
    if scan or not key.startswith(_LAYERS):
      out[key] = to_jax(t, dtype, release=release)
    else:
      name = key[len(_LAYERS):]
      for i in range(t.shape[0]):
        out[f"llm/layers_{i}/{name}"] = to_jax(t, dtype, i, gemma.ROWS.get(name), release)
  return unflatten(out)


def load(path: str, tokenizer: str | None = None, dtype: str = "float32",
         variant: str | None = None, config: str | None = None, scan: bool = False):
  """-> ((model, params), config, tokenizer path) from a Hub directory or a
  .npz; `scan` gives the training layout (see gemma.py)."""
  if path.endswith(".npz"):
    from convert import big_vision  # pylint: disable=import-outside-toplevel
    cfg, flat, tokenizer_path = big_vision.read(path, tokenizer, variant, config)
    sources = safetensors.mappings(flat.values())
  else:
    ckpt = hub.read(path, tokenizer)
    cfg, tokenizer_path = ckpt.config, ckpt.tokenizer_path
    flat = layout.hub_to_big_vision(cfg, ckpt.tensors)
    sources = safetensors.mappings(ckpt.tensors.values())
  params = params_from_flat(flat, dtype, scan, sources)
  return (PaliGemma(cfg, scan=scan), params), cfg, tokenizer_path
