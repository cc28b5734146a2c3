"""Gemma 1 and Gemma 2 decoders (Flax) over a preallocated KV cache.

Mirrors paligemma_torch/gemma.py. Parameter names and shapes are
big_vision's (`llm/...`), in one of two layouts:
- training (`scan`): layers stacked on a leading axis and run by one scanned
  block (`layers`), every weight as checkpoints hold it;
- inference: one tree per layer (`layers_0`, `layers_1`, ..., big_vision's
  unscanned names), each matrix transposed to rows, [.., O, D] (ROWS below).
  A scan must slice each layer's weights out of the stack, and XLA copies
  the slice, tripling the bytes a decode step moves; and XLA's CPU
  matrix-vector product reads a matrix of rows faster than one of columns
  (BUILD.md has the measurements).
Axis names: see paligemma/__init__.py.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from paligemma.config import TextConfig
from paligemma_jax import decode_kernel

_init = nn.initializers.normal(0.02)

# The inference layout of each decoder matrix: big_vision's axes permuted so
# that the output dim O comes before the contracted D (the Hub's orientation).
ROWS = {
    "attn/q_einsum/w": (0, 2, 1),  # [N, D, H] -> [N, H, D]
    "attn/kv_einsum/w": (0, 1, 3, 2),  # [2, K, D, H] -> [2, K, H, D]
    "attn/attn_vec_einsum/w": (2, 0, 1),  # [N, H, D] -> [D, N, H]
    "mlp/gating_einsum": (0, 2, 1),  # [2, D, F] -> [2, F, D]
    "mlp/linear": (1, 0),  # [F, D] -> [D, F]
}


def weight(module: nn.Module, name: str, shape: tuple, rows: bool):
  """The parameter `name` (a ROWS key) of big_vision's `shape`, or in rows."""
  if rows:
    shape = tuple(shape[i] for i in ROWS[name])
  return module.param(name.rsplit("/", 1)[-1], _init, shape)


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
  """Holds big_vision's `w` of an einsum (or in rows); the caller contracts it."""
  shape: tuple
  rows: bool

  @nn.compact
  def __call__(self):
    return weight(self, f"attn/{self.name}/w", self.shape, self.rows)


def matmul(eqn, x, w):
  """jnp.einsum(eqn, x, w) in x's dtype. XLA's CPU backend has no fast
  bfloat16 matmul (bf16 decoder weights streamed at 4.7 GB/s here, f32 ones
  at 19): there, bf16 weights are widened inside the compiled step and
  multiplied in float32, which reads them 1.7x faster."""
  if w.dtype == jnp.bfloat16 and jax.default_backend() == "cpu":
    return jnp.einsum(eqn, x.astype(jnp.float32), w.astype(jnp.float32)).astype(x.dtype)
  return jnp.einsum(eqn, x, w)


def by_rows(x, w):
  """x [B, T, D] times each row of w [O, D] -> [B, T, O] in x's dtype: the
  inference layout's product. A decode step's few rows, and a bf16 model's
  prefill where the CPU has the bf16 dot, take the CPU kernel
  (paligemma_jax/decode_kernel.py)."""
  B, T, D = x.shape
  if decode_kernel.applies(x.dtype, B * T, w):
    return decode_kernel.product(x.reshape(B * T, D), w).reshape(B, T, -1).astype(x.dtype)
  return matmul("BTD,OD->BTO", x, w)


def project(x, w, rows: bool):
  """x [B, T, D] through each matrix of w [*E, D, O] (rows: [*E, O, D])
  -> [*E, B, T, O].

  Inference (rows): one matmul batched over w's leading axes E, so that XLA
  reads the weights in their stored layout: an einsum that contracts the
  middle axis of w (as "BTD,NDH->BTNH" does) makes XLA's CPU backend
  transpose a copy of the weights at every call, 5-20x slower when decoding
  one token; a decode step's few rows on the CPU take our kernel instead
  (by_rows, over the matrices' rows end to end). Training: one 2-D matmul
  against the weights laid side by side, [D, E * O]. Batched over E, the
  gradient of x was E matmuls contracting only O (32 for a query head) and
  a sum over E, 4.7 GFLOP/s on XLA's CPU backend; a training step is
  thousands of rows, so the per-call copy of the weights costs nothing
  there."""
  E = w.shape[:-2]
  B, T, D = x.shape
  if not rows:
    O = w.shape[-1]
    w2 = jnp.moveaxis(w.reshape(-1, D, O), 1, 0).reshape(D, -1)  # [D, E * O]
    y = matmul("MD,DO->MO", x.reshape(B * T, D), w2).reshape(B, T, -1, O)
    return jnp.moveaxis(y, 2, 0).reshape(*E, B, T, O)
  O = w.shape[-2]
  if decode_kernel.applies(x.dtype, B * T, w.reshape(-1, D)):  # the matrices' rows end to end
    y = by_rows(x, w.reshape(-1, D)).reshape(B, T, -1, O)
    return jnp.moveaxis(y, 2, 0).reshape(*E, B, T, O)
  w = w.reshape(-1, *w.shape[-2:])
  x = jnp.broadcast_to(x.reshape(1, B * T, D), (w.shape[0], B * T, D))
  y = matmul("EMD,EOD->EMO", x, w)
  return y.reshape(*E, B, T, -1)


def write(cache, update, at):
  """lax.dynamic_update_slice(cache, update in cache's dtype, at), in place.
  XLA's CPU backend runs a bfloat16 update-slice in float32, converting
  the whole cache there and back at every write (36 writes of 13 MB, 27 ms
  of a 217 ms 3B bf16 decode step at batch 8); on the same bits as 16-bit
  integers the write is a plain in-place copy of the update."""
  update = update.astype(cache.dtype)
  if cache.dtype != jnp.bfloat16:
    return jax.lax.dynamic_update_slice(cache, update, at)
  bits = lambda a: jax.lax.bitcast_convert_type(a, jnp.uint16)
  out = jax.lax.dynamic_update_slice(bits(cache), bits(update), at)
  return jax.lax.bitcast_convert_type(out, jnp.bfloat16)


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
  rows: bool  # inference layout (see ROWS)

  @nn.compact
  def __call__(self, x, rope, mask, cache_k, cache_v, start, layer=None):
    """x [B, T, D]; mask [B, T, S]; cache_k/v [B, S, K, H], or with `layer`
    every layer's, [L, B, S, K, H]. Writes this step's keys and values at
    slots [start, start + T); returns the output and the updated cache."""
    c = self.cfg
    N, K, H, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size
    q = project(x, Einsum((N, D, H), self.rows, name="q_einsum")(), self.rows)
    q = q.transpose(1, 2, 0, 3)  # [B, T, N, H]
    kv = project(x, Einsum((2, K, D, H), self.rows, name="kv_einsum")(), self.rows)
    kv = kv.transpose(0, 2, 3, 1, 4)  # [2, B, T, K, H]
    q, k, v = apply_rope(q, *rope), apply_rope(kv[0], *rope), kv[1]  # k, v [B, T, K, H]
    if layer is None:
      cache_k = write(cache_k, k, (0, start, 0, 0))
      cache_v = write(cache_v, v, (0, start, 0, 0))
      keys, values = cache_k, cache_v
    else:  # written into the stack in place (see Gemma.__call__)
      at = (layer, 0, start, 0, 0)
      cache_k, cache_v = write(cache_k, k[None], at), write(cache_v, v[None], at)
      keys, values = cache_k[layer], cache_v[layer]
    B, T = x.shape[:2]
    q = q.reshape(B, T, K, N // K, H)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, keys) * c.attn_scale
    if c.attn_logit_softcapping is not None:
      logits = jnp.tanh(logits / c.attn_logit_softcapping) * c.attn_logit_softcapping
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(logits.dtype).min)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(x.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, values).reshape(B, T, N * H)
    # O = N * H: one 2-D matrix (contracting N and H of the 3-D weight made
    # XLA transpose it).
    w = Einsum((N, H, D), self.rows, name="attn_vec_einsum")()
    if self.rows:
      out = by_rows(out, w.reshape(D, N * H))
    else:
      out = matmul("BTO,OD->BTD", out, w.reshape(N * H, D))
    return out, cache_k, cache_v


class MLP(nn.Module):
  """GeGLU with the tanh-approximate GELU."""
  cfg: TextConfig
  rows: bool  # inference layout (see ROWS)

  @nn.compact
  def __call__(self, x):
    D, F = self.cfg.hidden_size, self.cfg.intermediate_size
    gating = weight(self, "mlp/gating_einsum", (2, D, F), self.rows)
    gate_up = project(x, gating, self.rows)  # [2, B, T, F]
    h = jax.nn.gelu(gate_up[0], approximate=True) * gate_up[1]
    linear = weight(self, "mlp/linear", (F, D), self.rows)
    return by_rows(h, linear) if self.rows else matmul("BTF,FD->BTD", h, linear)


class DecoderLayer(nn.Module):
  """One layer; nn.scan stacks L of them as `layers`, with their caches."""
  cfg: TextConfig
  rows: bool = False  # inference layout (see ROWS)

  @nn.compact
  def __call__(self, x, cache_k, cache_v, sliding, rope, masks, start, layer=None):
    c = self.cfg
    mask = jnp.where(sliding, masks[1], masks[0])
    attn, cache_k, cache_v = Attention(c, self.rows, name="attn")(
        RMSNorm(c.rms_norm_eps, name="pre_attention_norm")(x), rope, mask, cache_k, cache_v, start,
        layer)
    if c.is_gemma2:
      attn = RMSNorm(c.rms_norm_eps, name="post_attention_norm")(attn)
    x = x + attn
    out = MLP(c, self.rows, name="mlp")(RMSNorm(c.rms_norm_eps, name="pre_ffw_norm")(x))
    if c.is_gemma2:
      out = RMSNorm(c.rms_norm_eps, name="post_ffw_norm")(out)
    x = x + out
    self.sow("intermediates", "layer_out", x)
    return x, (cache_k, cache_v)


class Gemma(nn.Module):
  """big_vision's `llm`: embedder, scanned layers, final norm."""
  cfg: TextConfig
  vocab: int  # rows of the embedding: the SentencePiece pieces, no <image>/padding
  scan: bool = True  # the training layout, or the inference one (see above)

  def setup(self):
    c = self.cfg
    self.embedder = Embedder(self.vocab, c.hidden_size)
    if self.scan:
      self.layers = nn.scan(
          DecoderLayer, variable_axes={"params": 0, "intermediates": 0},
          split_rngs={"params": True}, in_axes=(0, 0, 0, nn.broadcast, nn.broadcast, nn.broadcast),
          length=c.num_hidden_layers)(c)
    else:
      self.layers = [DecoderLayer(c, rows=True) for _ in range(c.num_hidden_layers)]  # layers_{i}
    self.final_norm = RMSNorm(c.rms_norm_eps)

  def embed(self, tokens):
    return self.embedder.encode(tokens, rows=not self.scan)

  def __call__(self, x, positions, masks, cache, start, last=None):
    """x [B, T, D] at positions [B, T]; masks (full, sliding) [B, T, S];
    cache (k, v) [L, B, S, K, H]. -> (logits [B, T, V], new cache); with
    `last`, the logits of the last `last` positions only, [B, last, V]: a
    prefill samples from one, a training loss needs those of the text (the
    head is a D x V matmul per position).
    """
    c = self.cfg
    rope = rope_tables(positions, c.head_dim, c.rope_theta, x.dtype)
    if self.scan:
      sliding = jnp.array([c.is_sliding(i) for i in range(c.num_hidden_layers)])
      x, cache = self.layers(x, cache[0], cache[1], sliding, rope, masks, start)
    else:
      # Each layer writes its step into the stacked cache in place: slicing
      # a layer's cache out and setting it back made XLA copy the whole
      # stack, twice a layer (35 copies of 52 MB a step at 3B, batch 8).
      cache = jnp.asarray(cache[0]), jnp.asarray(cache[1])
      for i, layer in enumerate(self.layers):
        x, cache = layer(x, *cache, c.is_sliding(i), rope, masks, start, layer=i)
    if last is not None:
      x = x[:, -last:]
    logits = self.embedder.decode(self.final_norm(x), rows=not self.scan)
    if c.final_logit_softcapping is not None:
      logits = jnp.tanh(logits / c.final_logit_softcapping) * c.final_logit_softcapping
    return logits, cache


class Embedder(nn.Module):
  vocab: int
  dim: int

  def setup(self):
    self.input_embedding = self.param("input_embedding", _init, (self.vocab, self.dim))

  def encode(self, tokens, rows: bool):  # [B, T] -> [B, T, D], times sqrt(D) in the weights' dtype
    e = self.input_embedding
    # The inference layout only: the kernel has no gradient.
    x = decode_kernel.gather(e, tokens) if rows and decode_kernel.gathers(e) else e[tokens]
    return x * jnp.asarray(self.dim**0.5, x.dtype)

  def decode(self, h, rows: bool):  # [B, T, D] -> [B, T, V]: the tied output head
    if rows:  # the inference layout: may take the CPU kernel, which has no gradient
      return by_rows(h, self.input_embedding)
    return matmul("BTD,VD->BTV", h, self.input_embedding)
