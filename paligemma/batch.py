"""Batches of prompts of different lengths, left-padded.

Left padding puts every prompt's last token in the same slot, so all rows
start generating at one cache index; padding is masked out and positions
count real tokens only, so each row computes what it would alone.
"""

import numpy as np


def left_pad(seqs: list[list[int]], pad_id: int, length: int | None = None):
  """-> tokens [B, T] int32, valid [B, T] bool, T = length or the longest."""
  T = max(len(s) for s in seqs) if length is None else length
  tokens = np.full((len(seqs), T), pad_id, np.int32)
  valid = np.zeros((len(seqs), T), bool)
  for b, s in enumerate(seqs):
    if len(s) > T:
      raise ValueError(f"sequence of {len(s)} tokens does not fit in {T}")
    tokens[b, T - len(s):] = s
    valid[b, T - len(s):] = True
  return tokens, valid


def positions(valid: np.ndarray) -> np.ndarray:
  """RoPE positions [B, T]: real tokens count from 0; padding gets 0."""
  return np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)


def until_eos(ids, eos_id: int) -> list[int]:
  ids = [int(i) for i in ids]
  return ids[:ids.index(eos_id)] if eos_id in ids else ids
