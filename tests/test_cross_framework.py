"""JAX against the PyTorch reference, layer by layer, on the same weights
(the Hub checkpoint mapped to big_vision's layout by the shared converter).

Tolerances: both run float32 with different matmul kernels (XLA vs oneDNN),
so every summation is ordered differently; errors are a few float32 ulps of
the largest values (~1e-7 relative) and grow slowly with depth. 2e-5
relative to each tensor's scale is far below any real defect (a wrong norm,
mask or RoPE moves values by 1e-2 or more) and far above the noise.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from paligemma import batch, image as image_lib
from paligemma.tokenizer import Tokenizer
from paligemma_jax import generate as jgenerate, load as jload
from paligemma_jax.paligemma import PaliGemma
from paligemma_torch import gemma as tgemma, generate as tgenerate, load as tload

PROMPTS = ["caption en", "answer en where is the cat standing? on the table"]


def close(a, b, what, rel=2e-5):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  assert a.shape == b.shape, (what, a.shape, b.shape)
  scale = max(np.abs(b).max(), 1e-6)
  err = np.abs(a - b).max() / scale
  assert err < rel, f"{what}: max error {err:.2e} of scale {scale:.2e}"


@pytest.fixture(scope="module", params=["pg1", "pg2"])
def both(request, ckpt1, ckpt2, images):
  path = ckpt1 if request.param == "pg1" else ckpt2
  tm, cfg, tok_path = tload.load(path)
  (jm, params), _, _ = jload.load(path)
  tok = Tokenizer(tok_path, cfg.image_token_index)
  pixels = np.stack([image_lib.preprocess(image_lib.load(p), cfg.vision.image_size)
                     for p in images[:2]])
  tokens, valid = batch.left_pad([tok.prefix(p, cfg.num_image_tokens) for p in PROMPTS], tok.pad_id)
  return tm, jm, params, cfg, pixels, tokens, valid


def test_layer_by_layer(both):
  tm, jm, params, cfg, pixels, tokens, valid = both
  B, T = tokens.shape
  # PyTorch: record every stage with forward hooks.
  seen = {}
  hook = lambda name: (lambda mod, inp, out: seen.__setitem__(name, out.detach().numpy().copy()))
  vm = tm.vision_tower.vision_model
  vm.embeddings.register_forward_hook(hook("embeddings"))
  for i, layer in enumerate(vm.encoder.layers):
    layer.register_forward_hook(hook(f"vision{i}"))
  vm.post_layernorm.register_forward_hook(hook("encoded"))
  tm.multi_modal_projector.register_forward_hook(hook("projector"))
  for i, layer in enumerate(tm.decoder.layers):
    layer.register_forward_hook(hook(f"decoder{i}"))
  cache = tgemma.Cache.zeros(cfg.text, B, T, torch.float32)
  v = torch.from_numpy(valid)
  with torch.no_grad():
    x_t = tm.embed(torch.from_numpy(pixels), torch.from_numpy(tokens).long())
    logits_t = tm(x_t, torch.from_numpy(batch.positions(valid)).long(), v, v, cache, 0)
  # JAX: the same stages, sown as intermediates.
  variables = {"params": params}
  x_j, inter = jm.apply(variables, jnp.asarray(pixels), jnp.asarray(tokens),
                        method=PaliGemma.embed, mutable=["intermediates"])
  img = inter["intermediates"]["img"]
  shape = (cfg.text.num_hidden_layers, B, T, cfg.text.num_key_value_heads, cfg.text.head_dim)
  (logits_j, cache_j), inter = jm.apply(
      variables, x_j, jnp.asarray(batch.positions(valid)), jnp.asarray(valid), jnp.asarray(valid),
      (jnp.zeros(shape), jnp.zeros(shape)), 0, mutable=["intermediates"])
  llm = inter["intermediates"]["llm"]

  close(img["embeddings"][0], seen["embeddings"], "patch + position embeddings")
  for i in range(cfg.vision.num_hidden_layers):
    close(img["Transformer"]["encoderblock"]["layer_out"][0][i], seen[f"vision{i}"], f"SigLIP layer {i}")
  close(img["encoded"][0], seen["encoded"], "SigLIP post-layernorm")
  is_image = tokens == cfg.image_token_index
  close(np.asarray(x_j)[is_image], seen["projector"].reshape(-1, seen["projector"].shape[-1]), "projector")
  close(x_j, x_t, "merged input embeddings")
  for i in range(cfg.text.num_hidden_layers):
    close(np.asarray(llm[f"layers_{i}"]["layer_out"][0])[valid], seen[f"decoder{i}"][valid], f"decoder layer {i}")
  pieces = cfg.image_token_index
  close(np.asarray(logits_j)[valid], logits_t[..., :pieces].numpy()[valid], "logits")
  assert np.all(logits_t[..., pieces:].numpy() == 0)  # zero Hub padding rows: no logit lost
  close(np.asarray(cache_j[0])[:, valid], cache.k.numpy()[:, valid], "K cache after prefill")
  close(np.asarray(cache_j[1])[:, valid], cache.v.numpy()[:, valid], "V cache after prefill")


def test_greedy_generations_identical(both):
  tm, jm, params, cfg, pixels, tokens, valid = both
  want = tgenerate.generate(tm, torch.from_numpy(pixels), tokens, valid, max_new_tokens=12)
  gen = jgenerate.Generator(jm, params)
  got = gen.generate(pixels, tokens, valid, max_new_tokens=12)
  for b in range(len(PROMPTS)):
    assert batch.until_eos(got[b], cfg.eos_token_id) == batch.until_eos(want[b], cfg.eos_token_id)
  # Alone equals batched.
  for b in range(len(PROMPTS)):
    t, v = batch.left_pad([list(tokens[b][valid[b]])], cfg.pad_token_id)
    alone = gen.generate(pixels[b:b + 1], t, v, max_new_tokens=12)
    assert batch.until_eos(alone[0], 1) == batch.until_eos(got[b], 1)


def test_no_recompilation_within_a_bucket(both):
  _, jm, params, cfg, pixels, tokens, valid = both
  gen = jgenerate.Generator(jm, params)
  gen.generate(pixels, tokens, valid, max_new_tokens=5)
  assert gen.traces == {"prefill": 1, "decode": 1}
  # Another prompt length in the same bucket, other max_new_tokens, sampling, seed.
  t, v = batch.left_pad([list(tokens[0][valid[0]]) + [5, 6], list(tokens[1][valid[1]])],
                        cfg.pad_token_id)
  gen.generate(pixels, t, v, max_new_tokens=9, temperature=0.7, top_k=5, top_p=0.9, seed=4)
  assert gen.traces == {"prefill": 1, "decode": 1}


def test_seeded_sampling_reproducible(both):
  _, jm, params, _, pixels, tokens, valid = both
  gen = jgenerate.Generator(jm, params)
  kw = dict(max_new_tokens=10, temperature=1.5, top_k=50, top_p=0.95)
  a = gen.generate(pixels, tokens, valid, seed=1, **kw)
  b = gen.generate(pixels, tokens, valid, seed=1, **kw)
  c = gen.generate(pixels, tokens, valid, seed=2, **kw)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_sampling_filters():
  from paligemma_jax import sampling  # pylint: disable=import-outside-toplevel
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, axis=0)
  seen = lambda **kw: set(np.asarray(sampling.sample(
      logits, sampling.Params.make(1.0, **kw), jax.random.PRNGKey(0))).tolist())
  assert seen(top_k=2) == {0, 1}
  assert seen(top_p=0.7) == {0, 1}
  assert seen(top_p=0.5) == {0}
  assert seen() == {0, 1, 2, 3}


def test_bfloat16(both):
  _, jm, params, cfg, pixels, tokens, valid = both
  params16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
  B, T = tokens.shape
  out = {}
  for name, p in (("f32", params), ("bf16", params16)):
    dt = jnp.float32 if name == "f32" else jnp.bfloat16
    shape = (cfg.text.num_hidden_layers, B, T, cfg.text.num_key_value_heads, cfg.text.head_dim)
    x = jm.apply({"params": p}, jnp.asarray(pixels), jnp.asarray(tokens), method=PaliGemma.embed)
    logits, _ = jm.apply({"params": p}, x, jnp.asarray(batch.positions(valid)), jnp.asarray(valid),
                         jnp.asarray(valid), (jnp.zeros(shape, dt), jnp.zeros(shape, dt)), 0)
    out[name] = np.asarray(logits[:, -1], np.float32)
  # bf16 keeps 8 significant bits: each rounding is up to 2^-9 = 0.2% relative;
  # the errors of ~10 rounded stages add up to a few percent of the logits' scale.
  err = np.abs(out["f32"] - out["bf16"]).max() / np.abs(out["f32"]).max()
  assert 1e-4 < err < 0.05, err  # and bf16 really ran: it is not bit-equal to f32
