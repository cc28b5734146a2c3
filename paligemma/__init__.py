"""Framework-free PaliGemma pieces shared by the PyTorch and JAX models.

Nothing here may import torch or jax: each framework's side must run with
the other one absent.

Axis names, used in every einsum and shape comment of both models:
  B batch, T query length, S key length (the KV cache), N query heads,
  K key/value heads, G query heads per key/value head (N = K * G),
  H head dim, D model dim, F feed-forward dim, V vocabulary, L layers;
  in batched projections, E stacked matrices (heads, or gate and up),
  M rows (B * T), O one matrix's output dim.
"""
