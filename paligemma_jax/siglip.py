"""SigLIP vision tower (Flax), as PaliGemma uses it: learned position
embeddings, no CLS token, post-layernorm, no pooling head.

Mirrors paligemma_torch/siglip.py. Parameter names and shapes are
big_vision's (`img/...`), layers stacked on a leading axis and run by one
scanned block. Axis names: see paligemma/__init__.py.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from paligemma.config import VisionConfig


def _layer_norm(cfg: VisionConfig, name: str):
  return nn.LayerNorm(epsilon=cfg.layer_norm_eps, use_fast_variance=False, name=name)


class Attention(nn.Module):
  cfg: VisionConfig

  @nn.compact
  def __call__(self, x):  # [B, T, D]
    heads = (self.cfg.num_attention_heads, self.cfg.head_dim)
    q = nn.DenseGeneral(heads, name="query")(x)  # [B, T, N, H]
    k = nn.DenseGeneral(heads, name="key")(x)
    v = nn.DenseGeneral(heads, name="value")(x)
    logits = jnp.einsum("BTNH,BSNH->BNTS", q, k) * self.cfg.head_dim**-0.5
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(x.dtype)
    out = jnp.einsum("BNTS,BSNH->BTNH", probs, v)
    return nn.DenseGeneral(self.cfg.hidden_size, axis=(-2, -1), name="out")(out)


class MLP(nn.Module):
  cfg: VisionConfig

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.cfg.intermediate_size, name="Dense_0")(x)
    x = jax.nn.gelu(x, approximate=self.cfg.gelu_approximate)
    return nn.Dense(self.cfg.hidden_size, name="Dense_1")(x)


class EncoderLayer(nn.Module):
  """One layer; nn.scan stacks L of them as `encoderblock`."""
  cfg: VisionConfig

  @nn.compact
  def __call__(self, x, _):
    x = x + Attention(self.cfg, name="MultiHeadDotProductAttention_0")(
        _layer_norm(self.cfg, "LayerNorm_0")(x))
    x = x + MLP(self.cfg, name="MlpBlock_0")(_layer_norm(self.cfg, "LayerNorm_1")(x))
    self.sow("intermediates", "layer_out", x)
    return x, None


class Encoder(nn.Module):
  cfg: VisionConfig

  @nn.compact
  def __call__(self, x):
    layers = nn.scan(EncoderLayer, variable_axes={"params": 0, "intermediates": 0},
                     split_rngs={"params": True}, length=self.cfg.num_hidden_layers)
    x, _ = layers(self.cfg, name="encoderblock")(x, None)
    return _layer_norm(self.cfg, "encoder_norm")(x)


class VisionModel(nn.Module):
  """big_vision's `img`: patch embedding, encoder, and the projector `head`."""
  cfg: VisionConfig
  out_dim: int

  @nn.compact
  def __call__(self, pixels):  # [B, 3, px, px] (channels first, as preprocessed)
    p, d = self.cfg.patch_size, self.cfg.hidden_size
    x = jnp.transpose(pixels, (0, 2, 3, 1))
    x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", name="embedding")(x)
    x = x.reshape(x.shape[0], -1, d)  # [B, T, D]
    pos = self.param("pos_embedding", nn.initializers.normal(0.02),
                     (1, self.cfg.num_patches, d))
    x = x + pos.astype(x.dtype)
    self.sow("intermediates", "embeddings", x)
    x = Encoder(self.cfg, name="Transformer")(x)
    self.sow("intermediates", "encoded", x)
    return nn.Dense(self.out_dim, name="head")(x)
