"""Gemma 1 and Gemma 2 decoders (PyTorch) with a preallocated KV cache.

Mirrors paligemma_jax/gemma.py; parameter names are the Hub's.
Axis names: see paligemma/__init__.py.
"""

import dataclasses

import torch
from torch import nn
import torch.nn.functional as F

from paligemma.config import TextConfig


@dataclasses.dataclass
class Cache:
  k: torch.Tensor  # [L, B, S, K, H]
  v: torch.Tensor  # [L, B, S, K, H]

  @classmethod
  def zeros(cls, cfg: TextConfig, batch: int, length: int, dtype, device=None) -> "Cache":
    shape = (cfg.num_hidden_layers, batch, length, cfg.num_key_value_heads, cfg.head_dim)
    return cls(torch.zeros(shape, dtype=dtype, device=device),
               torch.zeros(shape, dtype=dtype, device=device))


class RMSNorm(nn.Module):
  """Computed in float32 and scaled by (1 + w), as Gemma was trained."""

  def __init__(self, dim: int, eps: float):
    super().__init__()
    self.weight = nn.Parameter(torch.zeros(dim))
    self.eps = eps

  def forward(self, x):
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
    return (y * (1.0 + self.weight.float())).type_as(x)


def rope_tables(positions, head_dim: int, theta: float, dtype):
  """cos, sin [B, T, 1, H] for rotate-half RoPE, computed in float32."""
  even = torch.arange(0, head_dim, 2, dtype=torch.float, device=positions.device)
  inv_freq = 1.0 / (theta ** (even / head_dim))
  freqs = positions[..., None].float() * inv_freq  # [B, T, H/2]
  emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
  return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):  # x [B, T, N, H]
  x1, x2 = x.chunk(2, dim=-1)
  return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):

  def __init__(self, cfg: TextConfig):
    super().__init__()
    D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    self.N, self.K, self.H = N, K, H
    self.scale = cfg.attn_scale
    self.softcap = cfg.attn_logit_softcapping
    self.q_proj = nn.Linear(D, N * H, bias=False)
    self.k_proj = nn.Linear(D, K * H, bias=False)
    self.v_proj = nn.Linear(D, K * H, bias=False)
    self.o_proj = nn.Linear(N * H, D, bias=False)

  def forward(self, x, rope, mask, cache_k, cache_v, start: int):
    """x [B, T, D]; mask [B, T, S] over cache slots [0, S); this step's
    keys and values are written to cache slots [start, start + T)."""
    B, T, _ = x.shape
    q = apply_rope(self.q_proj(x).view(B, T, self.N, self.H), *rope)
    cache_k[:, start:start + T] = apply_rope(self.k_proj(x).view(B, T, self.K, self.H), *rope)
    cache_v[:, start:start + T] = self.v_proj(x).view(B, T, self.K, self.H)
    S = mask.shape[-1]
    k, v = cache_k[:, :S], cache_v[:, :S]
    q = q.view(B, T, self.K, self.N // self.K, self.H)
    logits = torch.einsum("BTKGH,BSKH->BKGTS", q, k) * self.scale
    if self.softcap is not None:
      logits = torch.tanh(logits / self.softcap) * self.softcap
    logits = logits.masked_fill(~mask[:, None, None], torch.finfo(logits.dtype).min)
    probs = torch.softmax(logits.float(), dim=-1).to(x.dtype)
    out = torch.einsum("BKGTS,BSKH->BTKGH", probs, v)
    return self.o_proj(out.reshape(B, T, self.N * self.H))


class MLP(nn.Module):
  """GeGLU with the tanh-approximate GELU."""

  def __init__(self, cfg: TextConfig):
    super().__init__()
    self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
    self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
    self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

  def forward(self, x):
    return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class DecoderLayer(nn.Module):

  def __init__(self, cfg: TextConfig, sliding: bool):
    super().__init__()
    self.gemma2, self.sliding = cfg.is_gemma2, sliding
    eps = cfg.rms_norm_eps
    self.input_layernorm = RMSNorm(cfg.hidden_size, eps)
    self.self_attn = Attention(cfg)
    # Gemma 1 names its pre-MLP norm `post_attention_layernorm`; Gemma 2 uses
    # that name for a norm after attention and adds two around the MLP.
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)
    if self.gemma2:
      self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)
      self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)
    self.mlp = MLP(cfg)

  def forward(self, x, rope, masks, cache_k, cache_v, start: int):
    mask = masks[1] if self.sliding else masks[0]
    attn = self.self_attn(self.input_layernorm(x), rope, mask, cache_k, cache_v, start)
    if not self.gemma2:
      x = x + attn
      return x + self.mlp(self.post_attention_layernorm(x))
    x = x + self.post_attention_layernorm(attn)
    return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma(nn.Module):

  def __init__(self, cfg: TextConfig):
    super().__init__()
    self.cfg = cfg
    self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
    self.layers = nn.ModuleList(DecoderLayer(cfg, cfg.is_sliding(i))
                                for i in range(cfg.num_hidden_layers))
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

  def embed(self, tokens):  # [B, T] -> [B, T, D], times sqrt(D) in the weights' dtype
    x = self.embed_tokens(tokens)
    return x * torch.tensor(self.cfg.hidden_size**0.5, dtype=x.dtype, device=x.device)

  def forward(self, x, positions, masks, cache: Cache, start: int):
    """x [B, T, D] embeddings at positions [B, T]; masks (full, sliding) [B, T, S]."""
    rope = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
    for i, layer in enumerate(self.layers):
      x = layer(x, rope, masks, cache.k[i], cache.v[i], start)
    return self.norm(x)


class LanguageModel(nn.Module):
  """Gemma with its tied output head; the Hub keys read `language_model.model.*`."""

  def __init__(self, cfg: TextConfig):
    super().__init__()
    self.model = Gemma(cfg)
    self.softcap = cfg.final_logit_softcapping

  def logits(self, h):  # [B, T, D] -> [B, T, V]
    logits = F.linear(h, self.model.embed_tokens.weight)
    if self.softcap is not None:
      logits = torch.tanh(logits / self.softcap) * self.softcap
    return logits
