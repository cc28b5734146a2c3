"""SigLIP vision tower (PyTorch), as PaliGemma uses it: learned position
embeddings, no CLS token, post-layernorm, no pooling head.

Mirrors paligemma_jax/siglip.py; parameter names are the Hub's.
Axis names: see paligemma/__init__.py.
"""

import torch
from torch import nn
import torch.nn.functional as F

from paligemma.config import VisionConfig


class Embeddings(nn.Module):

  def __init__(self, cfg: VisionConfig):
    super().__init__()
    self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size,
                                     stride=cfg.patch_size)
    self.position_embedding = nn.Embedding(cfg.num_patches, cfg.hidden_size)

  def forward(self, pixels):  # [B, 3, px, px] -> [B, T, D]
    x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))
    return x.flatten(2).transpose(1, 2) + self.position_embedding.weight


class Attention(nn.Module):

  def __init__(self, cfg: VisionConfig):
    super().__init__()
    d = cfg.hidden_size
    self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
    self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d)
    self.v_proj, self.out_proj = nn.Linear(d, d), nn.Linear(d, d)

  def forward(self, x):  # [B, T, D]
    heads = lambda y: y.unflatten(-1, (self.num_heads, self.head_dim))
    q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
    logits = torch.einsum("BTNH,BSNH->BNTS", q, k) * self.head_dim**-0.5
    probs = torch.softmax(logits.float(), dim=-1).to(x.dtype)
    out = torch.einsum("BNTS,BSNH->BTNH", probs, v)
    return self.out_proj(out.flatten(2))


class MLP(nn.Module):

  def __init__(self, cfg: VisionConfig):
    super().__init__()
    self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
    self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
    self.approximate = "tanh" if cfg.gelu_approximate else "none"

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class EncoderLayer(nn.Module):

  def __init__(self, cfg: VisionConfig):
    super().__init__()
    self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
    self.self_attn = Attention(cfg)
    self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
    self.mlp = MLP(cfg)

  def forward(self, x):
    x = x + self.self_attn(self.layer_norm1(x))
    return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):

  def __init__(self, cfg: VisionConfig):
    super().__init__()
    self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))

  def forward(self, x):
    for layer in self.layers:
      x = layer(x)
    return x


class VisionModel(nn.Module):

  def __init__(self, cfg: VisionConfig):
    super().__init__()
    self.embeddings = Embeddings(cfg)
    self.encoder = Encoder(cfg)
    self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

  def forward(self, pixels):  # [B, 3, px, px] -> [B, T, D]
    return self.post_layernorm(self.encoder(self.embeddings(pixels)))


class VisionTower(nn.Module):
  """Only a name: the Hub keys read `vision_tower.vision_model.*`."""

  def __init__(self, cfg: VisionConfig):
    super().__init__()
    self.vision_model = VisionModel(cfg)

  def forward(self, pixels):
    return self.vision_model(pixels)
