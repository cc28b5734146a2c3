"""Next-token choice from logits: greedy, or temperature with top-k / top-p.

Mirrors paligemma_jax/sampling.py. The order is transformers': temperature,
then top-k, then top-p (the smallest set of tokens whose probability reaches
top_p, always at least the most likely one).
"""

import torch


def sample(logits, temperature: float, top_k: int, top_p: float, generator):
  """logits [B, V] -> token ids [B]."""
  logits = logits.float()
  if temperature == 0:
    return logits.argmax(-1)
  logits = logits / temperature
  if top_k:
    kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
    logits = logits.masked_fill(logits < kth, -torch.inf)
  if top_p < 1:
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, mass_before >= top_p)
    logits = logits.masked_fill(drop, -torch.inf)
  probs = torch.softmax(logits, dim=-1)
  return torch.multinomial(probs, 1, generator=generator)[:, 0]
