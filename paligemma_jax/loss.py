"""The training loss: next-token cross-entropy on the answer, under the
inference prefix-LM mask. Its own module so that it imports without the
trainer's flags."""

import jax
import jax.numpy as jnp

from paligemma_jax.paligemma import PaliGemma


def loss_fn(model: PaliGemma, params, b, per_token: bool = False):
  """Next-token cross-entropy over each example's suffix tokens and <eos>,
  averaged per example, then over the batch (big_vision's convention): a
  one-token answer ("2") weighs as much as a sixteen-token detection. With
  `per_token`, averaged over every answer token of the batch instead."""
  c = model.cfg.text
  B, T = b["tokens"].shape
  shape = (c.num_hidden_layers, B, T, c.num_key_value_heads, c.head_dim)
  dtype = params["llm"]["embedder"]["input_embedding"].dtype
  cache = (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
  positions = jnp.maximum(jnp.cumsum(b["valid"], axis=1) - 1, 0)
  variables = {"params": params}
  x = model.apply(variables, b["pixels"], b["tokens"], method=PaliGemma.embed)
  # Sequences are left-padded, so every answer lies in the last T - (image
  # tokens) positions: the head (a D x V matmul per position) runs on those.
  text = T - model.cfg.num_image_tokens
  logits, _ = model.apply(variables, x, positions, b["valid"], b["prefix"], cache, 0, text)
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  w = b["loss"][:, -text:-1].astype(jnp.float32)
  # Only answer tokens are looked up: the others include <image>, which has
  # no logit (big_vision's vocabulary), and an out-of-range gather is NaN
  # outside jit (clamped inside), and NaN * 0 is NaN.
  targets = jnp.where(w > 0, b["tokens"][:, -text + 1:], 0)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  if per_token:
    return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)
  per_example = jnp.sum(nll * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
  return jnp.mean(per_example)
