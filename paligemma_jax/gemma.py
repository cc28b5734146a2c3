"""Gemma 1 and Gemma 2 decoders (Flax) over a preallocated KV cache.

Mirrors paligemma_torch/gemma.py. Parameter names and shapes are
big_vision's (`llm/...`). Layers are either stacked on a leading axis and
run by one scanned block (`layers`, what checkpoints and training use) or
held one tree per layer (`layers_0`, `layers_1`, ..., big_vision's unscanned
names), which inference uses: a scan must slice each layer's weights out of
the stack, and XLA copies the slice, tripling the bytes a decode step moves.
Axis names: see paligemma/__init__.py.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from paligemma.config import TextConfig

_init = nn.initializers.normal(0.02)


class RMSNorm(nn.Module):
  """Computed in float32 and scaled by (1 + scale), as Gemma was trained."""
  eps: float

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.zeros, (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


class Einsum(nn.Module):
  """Holds big_vision's `w` of an einsum; the caller contracts it."""
  shape: tuple

  @nn.compact
  def __call__(self):
    return self.param("w", _init, self.shape)


def matmul(eqn, x, w):
  """jnp.einsum(eqn, x, w) in x's dtype. XLA's CPU backend has no fast
  bfloat16 matmul (bf16 decoder weights streamed at 4.7 GB/s here, f32 ones
  at 19): there, bf16 weights are widened inside the compiled step and
  multiplied in float32, which reads them 1.7x faster."""
  if w.dtype == jnp.bfloat16 and jax.default_backend() == "cpu":
    return jnp.einsum(eqn, x.astype(jnp.float32), w.astype(jnp.float32)).astype(x.dtype)
  return jnp.einsum(eqn, x, w)


def project(x, w):
  """x [B, T, D] through each matrix of w [*E, D, O] -> [*E, B, T, O].

  One matmul batched over w's leading axes E, so that XLA reads the weights
  in their stored layout: an einsum that contracts the middle axis of w (as
  "BTD,NDH->BTNH" does) makes XLA's CPU backend transpose a copy of the
  weights at every call, 5-20x slower when decoding one token."""
  E, (D, O) = w.shape[:-2], w.shape[-2:]
  w = w.reshape(-1, D, O)
  B, T = x.shape[:2]
  x = jnp.broadcast_to(x.reshape(1, B * T, D), (w.shape[0], B * T, D))
  return matmul("EMD,EDO->EMO", x, w).reshape(*E, B, T, O)


def rope_tables(positions, head_dim: int, theta: float, dtype):
  """cos, sin [B, T, 1, H] for rotate-half RoPE, computed in float32."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x, cos, sin):  # x [B, T, N, H]
  x1, x2 = jnp.split(x, 2, axis=-1)
  return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class Attention(nn.Module):
  cfg: TextConfig

  @nn.compact
  def __call__(self, x, rope, mask, cache_k, cache_v, start):
    """x [B, T, D]; mask [B, T, S]; cache_k/v [B, S, K, H]. Writes this
    step's keys and values at slots [start, start + T); returns the output
    and the updated cache."""
    c = self.cfg
    N, K, H, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size
    q = project(x, Einsum((N, D, H), name="q_einsum")()).transpose(1, 2, 0, 3)  # [B, T, N, H]
    kv = project(x, Einsum((2, K, D, H), name="kv_einsum")()).transpose(0, 2, 3, 1, 4)
    q, k, v = apply_rope(q, *rope), apply_rope(kv[0], *rope), kv[1]  # k, v [B, T, K, H]
    cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, start, 0, 0))
    cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, start, 0, 0))
    B, T = x.shape[:2]
    q = q.reshape(B, T, K, N // K, H)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, cache_k) * c.attn_scale
    if c.attn_logit_softcapping is not None:
      logits = jnp.tanh(logits / c.attn_logit_softcapping) * c.attn_logit_softcapping
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(logits.dtype).min)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(x.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, cache_v).reshape(B, T, N * H)
    # O = N * H: one [N * H, D] matrix (contracting N and H of the 3-D weight
    # made XLA transpose it).
    w = Einsum((N, H, D), name="attn_vec_einsum")().reshape(N * H, D)
    out = matmul("BTO,OD->BTD", out, w)
    return out, cache_k, cache_v


class MLP(nn.Module):
  """GeGLU with the tanh-approximate GELU."""
  cfg: TextConfig

  @nn.compact
  def __call__(self, x):
    D, F = self.cfg.hidden_size, self.cfg.intermediate_size
    gate_up = project(x, self.param("gating_einsum", _init, (2, D, F)))  # [2, B, T, F]
    h = jax.nn.gelu(gate_up[0], approximate=True) * gate_up[1]
    return matmul("BTF,FD->BTD", h, self.param("linear", _init, (F, D)))


class DecoderLayer(nn.Module):
  """One layer; nn.scan stacks L of them as `layers`, with their caches."""
  cfg: TextConfig

  @nn.compact
  def __call__(self, x, cache_k, cache_v, sliding, rope, masks, start):
    c = self.cfg
    mask = jnp.where(sliding, masks[1], masks[0])
    attn, cache_k, cache_v = Attention(c, name="attn")(
        RMSNorm(c.rms_norm_eps, name="pre_attention_norm")(x), rope, mask, cache_k, cache_v, start)
    if c.is_gemma2:
      attn = RMSNorm(c.rms_norm_eps, name="post_attention_norm")(attn)
    x = x + attn
    out = MLP(c, name="mlp")(RMSNorm(c.rms_norm_eps, name="pre_ffw_norm")(x))
    if c.is_gemma2:
      out = RMSNorm(c.rms_norm_eps, name="post_ffw_norm")(out)
    x = x + out
    self.sow("intermediates", "layer_out", x)
    return x, (cache_k, cache_v)


class Gemma(nn.Module):
  """big_vision's `llm`: embedder, scanned layers, final norm."""
  cfg: TextConfig
  vocab: int  # rows of the embedding: the SentencePiece pieces, no <image>/padding
  scan: bool = True  # stacked `layers`, or `layers_0`, `layers_1`, ... (see above)

  def setup(self):
    c = self.cfg
    self.embedder = Embedder(self.vocab, c.hidden_size)
    if self.scan:
      self.layers = nn.scan(
          DecoderLayer, variable_axes={"params": 0, "intermediates": 0},
          split_rngs={"params": True}, in_axes=(0, 0, 0, nn.broadcast, nn.broadcast, nn.broadcast),
          length=c.num_hidden_layers)(c)
    else:
      self.layers = [DecoderLayer(c) for _ in range(c.num_hidden_layers)]  # named layers_{i}
    self.final_norm = RMSNorm(c.rms_norm_eps)

  def embed(self, tokens):
    return self.embedder.encode(tokens)

  def __call__(self, x, positions, masks, cache, start, last_only=False):
    """x [B, T, D] at positions [B, T]; masks (full, sliding) [B, T, S];
    cache (k, v) [L, B, S, K, H]. -> (logits [B, T, V], new cache); with
    last_only, logits [B, 1, V] of the last position (all a prefill samples
    from: the head is a 2-D x V matmul per position)."""
    c = self.cfg
    rope = rope_tables(positions, c.head_dim, c.rope_theta, x.dtype)
    if self.scan:
      sliding = jnp.array([c.is_sliding(i) for i in range(c.num_hidden_layers)])
      x, cache = self.layers(x, cache[0], cache[1], sliding, rope, masks, start)
    else:
      ks, vs = jnp.asarray(cache[0]), jnp.asarray(cache[1])
      for i, layer in enumerate(self.layers):
        x, (k, v) = layer(x, ks[i], vs[i], c.is_sliding(i), rope, masks, start)
        ks, vs = ks.at[i].set(k), vs.at[i].set(v)
      cache = (ks, vs)
    if last_only:
      x = x[:, -1:]
    logits = self.embedder.decode(self.final_norm(x))
    if c.final_logit_softcapping is not None:
      logits = jnp.tanh(logits / c.final_logit_softcapping) * c.final_logit_softcapping
    return logits, cache


class Embedder(nn.Module):
  vocab: int
  dim: int

  def setup(self):
    self.input_embedding = self.param("input_embedding", _init, (self.vocab, self.dim))

  def encode(self, tokens):  # [B, T] -> [B, T, D], times sqrt(D) in the weights' dtype
    x = self.input_embedding[tokens]
    return x * jnp.asarray(self.dim**0.5, x.dtype)

  def decode(self, h):  # [B, T, D] -> [B, T, V]: the tied output head
    return matmul("BTD,VD->BTV", h, self.input_embedding)
