"""The two JAX parameter layouts of the decoder (stacked for training, one
tree per layer of row matrices for inference) compute the same thing, and the compiled
decode step reads every weight where it lies: no per-step copy of a weight
(a scan's layer slice, or a transpose XLA inserts for an einsum that
contracts a weight's middle axis) that would multiply the bytes moved."""

import re

import jax
import numpy as np
import pytest

from paligemma import batch, image as image_lib
from paligemma.tokenizer import Tokenizer
from paligemma_jax import gemma, generate, load, sampling
from paligemma_jax.paligemma import PaliGemma

PROMPTS = ["caption en", "answer en where is the cat standing? on the table"]


@pytest.fixture(scope="module", params=["pg1", "pg2"])
def setup(request, ckpt1, ckpt2, images):
  path = ckpt1 if request.param == "pg1" else ckpt2
  (model, params), cfg, tok_path = load.load(path)
  (scanned, stacked), _, _ = load.load(path, scan=True)
  tok = Tokenizer(tok_path, cfg.image_token_index)
  pixels = np.stack([image_lib.preprocess(image_lib.load(p), cfg.vision.image_size)
                     for p in images[:2]])
  tokens, valid = batch.left_pad([tok.prefix(p, cfg.num_image_tokens) for p in PROMPTS], tok.pad_id)
  return model, params, scanned, stacked, cfg, pixels, tokens, valid


def test_layouts(setup):
  model, params, scanned, stacked, cfg, *_ = setup
  L = cfg.text.num_hidden_layers
  assert not model.scan and scanned.scan
  assert "layers" not in params["llm"] and f"layers_{L - 1}" in params["llm"]
  for key, w in load.flatten(stacked["llm"]["layers"]).items():
    perm = gemma.ROWS.get(key, tuple(range(w.ndim - 1)))
    for i in range(L):
      np.testing.assert_array_equal(load.flatten(params["llm"][f"layers_{i}"])[key],
                                    np.transpose(w[i], perm))
  assert params["llm"]["layers_0"]["mlp"]["linear"].shape == (cfg.text.hidden_size,
                                                             cfg.text.intermediate_size)


def test_same_logits_and_generations(setup):
  model, params, scanned, stacked, cfg, pixels, tokens, valid = setup
  B, T = tokens.shape
  c = cfg.text
  shape = (c.num_hidden_layers, B, T, c.num_key_value_heads, c.head_dim)
  cache = (np.zeros(shape, np.float32), np.zeros(shape, np.float32))

  def logits(m, p):
    x = m.apply({"params": p}, pixels, tokens, method=PaliGemma.embed)
    return np.asarray(m.apply({"params": p}, x, batch.positions(valid), valid, valid, cache)[0])
  # The same ops in the same order: equal up to XLA fusing them differently.
  np.testing.assert_allclose(logits(model, params)[valid], logits(scanned, stacked)[valid],
                             rtol=1e-5, atol=1e-5 * np.abs(logits(scanned, stacked)).max())
  kw = dict(max_new_tokens=10)
  np.testing.assert_array_equal(generate.Generator(model, params).generate(pixels, tokens, valid, **kw),
                                generate.Generator(scanned, stacked).generate(pixels, tokens, valid, **kw))


def _weight_sized_copies(hlo: str, params) -> list[str]:
  sizes = {int(np.prod(w.shape)) for w in jax.tree.leaves(params["llm"]) if w.ndim >= 2}
  sizes.discard(int(np.prod(params["llm"]["embedder"]["input_embedding"].shape)))  # gathered rows
  found = []
  for line in hlo.splitlines():
    m = re.search(r"= \w+\[([\d,]+)\]\{[\d,]*\} (copy|transpose|fusion|dynamic-slice|slice)\(", line)
    if m and int(np.prod([int(n) for n in m.group(1).split(",")])) in sizes:
      found.append(line.strip()[:160])
  return found


def test_decode_step_copies_no_weight(setup):
  model, params, scanned, stacked, cfg, pixels, tokens, valid = setup

  def decode_hlo(m, p):
    gen = generate.Generator(m, p)
    state = gen.prefill(pixels, tokens, valid, max_new_tokens=4)
    return gen._decode.lower(p, state, np.int32(4), sampling.Params.make()).compile().as_text()
  assert _weight_sized_copies(decode_hlo(model, params), params) == []
  # The check can fail: the scanned layout slices (copies) each layer's weights.
  assert _weight_sized_copies(decode_hlo(scanned, stacked), params)


def _widened_caches(hlo: str, cache_shape) -> list[str]:
  """Lines of a bf16 model's compiled step that write a whole cache in float32."""
  dims = ",".join(map(str, cache_shape))
  return [l.strip()[:160] for l in hlo.splitlines()
          if re.search(rf"= f32\[{dims}\]\{{[\d,]*\}} dynamic-update-slice\(", l)]


def test_bf16_cache_written_in_place(ckpt1, images, monkeypatch):
  (model, params), cfg, tok_path = load.load(ckpt1, dtype="bfloat16")
  tok = Tokenizer(tok_path, cfg.image_token_index)
  pixels = np.stack([image_lib.preprocess(image_lib.load(images[0]), cfg.vision.image_size)] * 2)
  tokens, valid = batch.left_pad([tok.prefix(p, cfg.num_image_tokens) for p in PROMPTS], tok.pad_id)

  def decode_hlo():
    gen = generate.Generator(model, params)
    state = gen.prefill(pixels, tokens, valid, max_new_tokens=4)
    hlo = gen._decode.lower(params, state, np.int32(4), sampling.Params.make()).compile().as_text()
    return hlo, state.cache[0].shape
  assert _widened_caches(*decode_hlo()) == []
  # The check can fail: a bf16 update-slice, as XLA's CPU backend runs it.
  monkeypatch.setattr(gemma, "write", lambda cache, update, at: jax.lax.dynamic_update_slice(
      cache, update.astype(cache.dtype), at))
  if jax.default_backend() == "cpu":
    assert _widened_caches(*decode_hlo())


def test_argmax_is_jnp_argmax():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((5, 1000)).astype(np.float32)
  logits[1, [10, 500]] = 9.0  # a tie: the first
  logits[2, 7] = np.inf
  logits[3, [3, 900]] = np.nan  # NaN wins, the first
  logits[4] = -np.inf
  np.testing.assert_array_equal(np.asarray(jax.jit(sampling.argmax)(logits)),
                                np.asarray(jax.numpy.argmax(logits, axis=-1)))
