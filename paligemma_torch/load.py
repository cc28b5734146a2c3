"""Builds the PyTorch model from a checkpoint without a second copy of it.

The model is made on the meta device and the checkpoint's memory-mapped
tensors are assigned as its parameters: weights already in the requested
dtype are never copied, others are cast one tensor at a time.
"""

import ml_dtypes
import numpy as np
import torch

from convert import hub
from paligemma_torch.paligemma import PaliGemma

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def to_torch(arr: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
  if arr.dtype == ml_dtypes.bfloat16:
    t = torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
  else:
    t = torch.from_numpy(arr)
  return t.to(dtype)


def from_checkpoint(ckpt: hub.Checkpoint, dtype: str = "float32") -> PaliGemma:
  with torch.device("meta"):
    model = PaliGemma(ckpt.config)
  state = {name: to_torch(arr, DTYPES[dtype]) for name, arr in ckpt.tensors.items()}
  model.load_state_dict(state, strict=True, assign=True)
  return model.eval().requires_grad_(False)


def load(path: str, tokenizer: str | None = None, dtype: str = "float32",
         variant: str | None = None, config: str | None = None):
  """-> (model, config, tokenizer path) from a Hub directory or a .npz."""
  if path.endswith(".npz"):
    from convert import big_vision  # pylint: disable=import-outside-toplevel
    ckpt = big_vision.read_as_hub(path, tokenizer, variant, config)
  else:
    ckpt = hub.read(path, tokenizer)
  return from_checkpoint(ckpt, dtype), ckpt.config, ckpt.tokenizer_path
