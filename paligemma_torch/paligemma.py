"""PaliGemma (PyTorch): SigLIP image tokens, projected, in front of a Gemma
prompt, decoded with a prefix-LM mask.

Mirrors paligemma_jax/paligemma.py; parameter names are the Hub's, so a Hub
state dict loads as is. Axis names: see paligemma/__init__.py.
"""

import torch
from torch import nn

from paligemma.config import PaliGemmaConfig
from paligemma_torch import gemma, siglip


def attention_masks(valid, prefix, start: int, T: int, S: int, window):
  """(full, sliding) [B, T, S] masks for queries in cache slots [start, start+T).

  valid, prefix [B, >=S] bool: slot holds a real token / belongs to the prefix.
  The prefix (image, <bos>, prompt, "\\n") attends to itself in full; every
  other token causally; padding is never attended. Gemma 2's local layers
  also drop keys `window` or more slots back, except prefix-to-prefix, as
  transformers' masks do.
  """
  q = torch.arange(start, start + T, device=valid.device)[:, None]
  k = torch.arange(S, device=valid.device)[None, :]
  causal = k <= q
  both_prefix = prefix[:, start:start + T, None] & prefix[:, None, :S]
  keep = valid[:, None, :S]
  full = (causal | both_prefix) & keep
  if window is None:
    return full, full
  return full, ((causal & (q - k < window)) | both_prefix) & keep


class Projector(nn.Module):

  def __init__(self, cfg: PaliGemmaConfig):
    super().__init__()
    self.linear = nn.Linear(cfg.vision.hidden_size, cfg.text.hidden_size)

  def forward(self, x):
    return self.linear(x)


class PaliGemma(nn.Module):

  def __init__(self, cfg: PaliGemmaConfig):
    super().__init__()
    self.cfg = cfg
    self.vision_tower = siglip.VisionTower(cfg.vision)
    self.multi_modal_projector = Projector(cfg)
    self.language_model = gemma.LanguageModel(cfg.text)

  @property
  def decoder(self) -> gemma.Gemma:
    return self.language_model.model

  def embed(self, pixels, tokens):
    """pixels [B, 3, px, px], tokens [B, T] with image_token_index where the
    image goes -> [B, T, D]. Image features enter unscaled; text embeddings
    are scaled by sqrt(D)."""
    is_image = tokens == self.cfg.image_token_index
    x = self.decoder.embed(torch.where(is_image, 0, tokens))
    if pixels is None:
      return x
    image = self.multi_modal_projector(self.vision_tower(pixels)).to(x.dtype)  # [B, N, D]
    which = (torch.cumsum(is_image, dim=1) - 1).clamp(min=0)  # image token index of slot
    image = torch.gather(image, 1, which[..., None].expand(-1, -1, image.shape[-1]))
    return torch.where(is_image[..., None], image, x)

  def forward(self, x, positions, valid, prefix, cache: gemma.Cache, start: int = 0):
    """Runs embeddings x [B, T, D] at cache slots [start, start+T) -> logits [B, T, V]."""
    T = x.shape[1]
    masks = attention_masks(valid, prefix, start, T, start + T, self.cfg.text.sliding_window)
    h = self.decoder(x, positions, masks, cache, start)
    return self.language_model.logits(h)
