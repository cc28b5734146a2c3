"""Generation with a preallocated KV cache (PyTorch reference).

Prefill runs the image and prompt once, filling cache slots [0, T); each
decode step then writes one slot. Mirrors paligemma_jax/generate.py, whose
loop is compiled; this one is a plain Python loop.
"""

import numpy as np
import torch

from paligemma import batch
from paligemma_torch import gemma, sampling
from paligemma_torch.paligemma import PaliGemma


@torch.no_grad()
def generate(model: PaliGemma, pixels, tokens: np.ndarray, valid: np.ndarray, *,
             max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0) -> np.ndarray:
  """pixels [B, 3, px, px]; tokens, valid [B, T] left-padded prefixes.

  Runs where the model's weights are (CPU, or a GPU after model.to("cuda")).
  Returns generated ids [B, steps] (steps <= max_new_tokens), each row
  padded with pad_token_id after its <eos>.
  """
  cfg = model.cfg
  weight = model.decoder.embed_tokens.weight
  dtype, device = weight.dtype, weight.device
  on = lambda a: torch.as_tensor(a).to(device)
  B, T = tokens.shape
  S = T + max_new_tokens
  cache = gemma.Cache.zeros(cfg.text, B, S, dtype, device)
  valid_s = torch.zeros(B, S, dtype=torch.bool, device=device)
  valid_s[:, :T] = on(valid)
  prefix = valid_s.clone()  # everything given before generation is the prefix
  positions = on(batch.positions(valid)).long()
  x = model.embed(None if pixels is None else on(pixels), on(tokens).long())
  logits = model(x, positions, valid_s, prefix, cache, 0)[:, -1]
  generator = torch.Generator(device).manual_seed(seed)
  next_pos = positions[:, -1] + 1
  done = torch.zeros(B, dtype=torch.bool, device=device)
  out = []
  for step in range(max_new_tokens):
    token = sampling.sample(logits, temperature, top_k, top_p, generator)
    token = torch.where(done, cfg.pad_token_id, token)
    out.append(token)
    done |= token == cfg.eos_token_id
    if done.all() or step == max_new_tokens - 1:
      break
    slot = T + step
    valid_s[:, slot] = True
    x = model.decoder.embed(token[:, None])
    logits = model(x, next_pos[:, None], valid_s, prefix, cache, slot)[:, -1]
    next_pos = next_pos + 1
  return torch.stack(out, dim=1).cpu().numpy() if out else np.zeros((B, 0), np.int64)
