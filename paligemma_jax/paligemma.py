"""PaliGemma (Flax): SigLIP image tokens, projected, in front of a Gemma
prompt, decoded with a prefix-LM mask.

Mirrors paligemma_torch/paligemma.py. The parameter tree is big_vision's
(`img/...`, `llm/...`), so a big_vision checkpoint loads as a tree lookup.
Axis names: see paligemma/__init__.py.
"""

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp

from paligemma.config import PaliGemmaConfig
from paligemma_jax import gemma, siglip


def attention_masks(valid, prefix, start, T: int, window):
  """(full, sliding) [B, T, S] masks for queries in cache slots [start, start+T).

  valid, prefix [B, S] bool: slot holds a real token / belongs to the prefix.
  The prefix (image, <bos>, prompt, "\\n") attends to itself in full; every
  other token causally; padding is never attended. Gemma 2's local layers
  also drop keys `window` or more slots back, except prefix-to-prefix, as
  transformers' masks do.
  """
  S = valid.shape[1]
  q = start + jnp.arange(T)[:, None]
  k = jnp.arange(S)[None, :]
  causal = k <= q
  q_prefix = jnp.take_along_axis(prefix, jnp.broadcast_to(q[:, 0], (prefix.shape[0], T)), axis=1)
  both_prefix = q_prefix[:, :, None] & prefix[:, None, :]
  keep = valid[:, None, :]
  full = (causal | both_prefix) & keep
  if window is None:
    return full, full
  return full, ((causal & (q - k < window)) | both_prefix) & keep


def exact(dtype):
  """float32 means float32 on every backend: XLA's GPU backend otherwise
  multiplies float32 matrices in TensorFloat-32 (10-bit mantissa; SigLIP's
  first layer was 6e-4 off torch's float32 on an H200), which the CPU
  backend never does. bfloat16 runs as it is."""
  if dtype == jnp.float32:
    return jax.default_matmul_precision("float32")
  return contextlib.nullcontext()


class PaliGemma(nn.Module):
  cfg: PaliGemmaConfig
  scan: bool = True  # the decoder's training layout, or the inference one (see gemma.py)

  def setup(self):
    self.img = siglip.VisionModel(self.cfg.vision, self.cfg.text.hidden_size)
    # big_vision's embedding has one row per SentencePiece piece: <image> and
    # the Hub's padding rows are not there.
    self.llm = gemma.Gemma(self.cfg.text, vocab=self.cfg.image_token_index,
                           scan=self.scan)

  def embed(self, pixels, tokens):
    """pixels [B, 3, px, px], tokens [B, T] with image_token_index where the
    image goes -> [B, T, D]. Image features enter unscaled; text embeddings
    are scaled by sqrt(D)."""
    is_image = tokens == self.cfg.image_token_index
    x = self.llm.embed(jnp.where(is_image, 0, tokens))
    if pixels is None:
      return x
    with exact(x.dtype):
      image = self.img(pixels.astype(x.dtype)).astype(x.dtype)  # [B, N, D]
    which = jnp.maximum(jnp.cumsum(is_image, axis=1) - 1, 0)  # image token index of slot
    image = jnp.take_along_axis(image, which[..., None], axis=1)
    return jnp.where(is_image[..., None], image, x)

  def __call__(self, x, positions, valid, prefix, cache, start=0, last=None):
    """Runs embeddings x [B, T, D] at cache slots [start, start+T).
    -> (logits [B, T, V], or of the last `last` positions, new cache)."""
    masks = attention_masks(valid, prefix, start, x.shape[1], self.cfg.text.sliding_window)
    with exact(x.dtype):
      return self.llm(x, positions, masks, cache, start, last)
