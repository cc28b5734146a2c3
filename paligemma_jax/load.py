"""Builds the Flax parameter tree from a checkpoint.

A Hub directory goes through the shared layout mapping (convert/layout.py)
one tensor at a time; a big_vision .npz is already in this tree's layout.
"""

import jax.numpy as jnp
import numpy as np

from convert import hub, layout
from paligemma_jax.paligemma import PaliGemma

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def unflatten(flat: dict) -> dict:
  tree = {}
  for key, value in flat.items():
    *path, leaf = key.split("/")
    node = tree
    for p in path:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def params_from_hub(ckpt: hub.Checkpoint, dtype: str = "float32") -> dict:
  flat = layout.hub_to_big_vision(ckpt.config, ckpt.tensors)
  return unflatten({k: jnp.asarray(np.asarray(t()), DTYPES[dtype]) for k, t in flat.items()})


def load(path: str, tokenizer: str | None = None, dtype: str = "float32",
         variant: str | None = None, config: str | None = None):
  """-> ((model, params), config, tokenizer path) from a Hub directory or a .npz."""
  if path.endswith(".npz"):
    from convert import big_vision  # pylint: disable=import-outside-toplevel
    cfg, flat, tokenizer_path = big_vision.read(path, tokenizer, variant, config)
    params = unflatten({k: jnp.asarray(v, DTYPES[dtype]) for k, v in flat.items()})
  else:
    ckpt = hub.read(path, tokenizer)
    cfg, tokenizer_path = ckpt.config, ckpt.tokenizer_path
    params = params_from_hub(ckpt, dtype)
  return (PaliGemma(cfg), params), cfg, tokenizer_path
