"""The PyTorch reference against transformers' PaliGemmaForConditionalGeneration,
and its own generation invariants (mask, cache, batching, sampling)."""

import numpy as np
import pytest
import torch

from paligemma import batch, image as image_lib
from paligemma.tokenizer import Tokenizer
from paligemma_torch import gemma, generate, load
from paligemma_torch.paligemma import attention_masks

PROMPTS = ["caption en", "answer en where is the cat standing?", "detect cat"]


def _inputs(model, cfg, tok_path, images, prompts):
  tok = Tokenizer(tok_path, cfg.image_token_index)
  pixels = np.stack([image_lib.preprocess(image_lib.load(p), cfg.vision.image_size) for p in images])
  tokens, valid = batch.left_pad([tok.prefix(p, cfg.num_image_tokens) for p in prompts], tok.pad_id)
  return torch.from_numpy(pixels), tokens, valid


def _forward(model, pixels, tokens, valid):
  B, T = tokens.shape
  cache = gemma.Cache.zeros(model.cfg.text, B, T, torch.float32)
  v = torch.from_numpy(valid)
  with torch.no_grad():
    x = model.embed(pixels, torch.from_numpy(tokens).long())
    return model(x, torch.from_numpy(batch.positions(valid)).long(), v, v, cache, 0)


@pytest.fixture(scope="module", params=["pg1", "pg2"])
def setup(request, ckpt1, ckpt2, images):
  path = ckpt1 if request.param == "pg1" else ckpt2
  model, cfg, tok = load.load(path)
  return path, model, cfg, tok, images


def _reference(path):
  transformers = pytest.importorskip("transformers")
  return transformers.PaliGemmaForConditionalGeneration.from_pretrained(
      path, attn_implementation="eager", dtype=torch.float32).eval()


def test_logits_match_transformers(setup):
  path, model, cfg, tok, images = setup
  ref = _reference(path)
  pixels, tokens, valid = _inputs(model, cfg, tok, images, PROMPTS)
  mine = _forward(model, pixels, tokens, valid)
  with torch.no_grad():
    want = ref(input_ids=torch.from_numpy(tokens).long(), pixel_values=pixels,
               attention_mask=torch.from_numpy(valid).long(),
               token_type_ids=torch.zeros(tokens.shape, dtype=torch.long),
               position_ids=torch.from_numpy(batch.positions(valid)).long()).logits
  v = torch.from_numpy(valid)
  assert want.abs().max() > 1.0  # not a degenerate comparison
  torch.testing.assert_close(mine[v], want[v], rtol=0, atol=2e-5)


def test_greedy_generation_matches_transformers(setup):
  path, model, cfg, tok, images = setup
  ref = _reference(path)
  for idx in ([0], [1], [2], [0, 1, 2]):  # alone and batched
    pixels, tokens, valid = _inputs(model, cfg, tok, [images[i] for i in idx],
                                    [PROMPTS[i] for i in idx])
    mine = generate.generate(model, pixels, tokens, valid, max_new_tokens=12)
    with torch.no_grad():
      want = ref.generate(input_ids=torch.from_numpy(tokens).long(), pixel_values=pixels,
                          attention_mask=torch.from_numpy(valid).long(),
                          token_type_ids=torch.zeros(tokens.shape, dtype=torch.long),
                          max_new_tokens=12, do_sample=False)[:, tokens.shape[1]:]
    for b in range(len(idx)):
      assert batch.until_eos(mine[b], cfg.eos_token_id) == batch.until_eos(want[b], cfg.eos_token_id)


def test_batch_equals_alone(setup):
  _, model, cfg, tok, images = setup
  pixels, tokens, valid = _inputs(model, cfg, tok, images, PROMPTS)
  together = generate.generate(model, pixels, tokens, valid, max_new_tokens=10)
  logits_together = _forward(model, pixels, tokens, valid)[:, -1]
  for b in range(3):
    p, t, v = _inputs(model, cfg, tok, [images[b]], [PROMPTS[b]])
    alone = generate.generate(model, p, t, v, max_new_tokens=10)
    assert batch.until_eos(alone[0], 1) == batch.until_eos(together[b], 1)
    torch.testing.assert_close(_forward(model, p, t, v)[0, -1], logits_together[b],
                               rtol=0, atol=1e-5)


def test_cache_equals_full_recompute(setup):
  _, model, cfg, tok, images = setup
  pixels, tokens, valid = _inputs(model, cfg, tok, images[:2], PROMPTS[:2])
  out = generate.generate(model, pixels, tokens, valid, max_new_tokens=8, temperature=1.0, seed=3)
  steps = out.shape[1]
  # Recompute everything without a cache: generated tokens are causal, not prefix.
  full = np.concatenate([tokens, out], axis=1)
  valid_full = np.concatenate([valid, np.ones_like(out, bool)], axis=1)
  prefix = torch.from_numpy(np.concatenate([valid, np.zeros_like(out, bool)], axis=1))
  S = full.shape[1]
  cache = gemma.Cache.zeros(cfg.text, 2, S, torch.float32)
  positions = torch.from_numpy(batch.positions(valid_full)).long()
  with torch.no_grad():
    x = model.embed(pixels, torch.from_numpy(full).long())
    logits = model(x, positions, torch.from_numpy(valid_full), prefix, cache, 0)
  # Replay the cached path step by step and compare the logits it sampled from.
  cache2 = gemma.Cache.zeros(cfg.text, 2, S, torch.float32)
  vs = torch.from_numpy(valid_full)
  pref = prefix
  with torch.no_grad():
    T = tokens.shape[1]
    x = model.embed(pixels, torch.from_numpy(tokens).long())
    vs_prefill = vs.clone()
    vs_prefill[:, T:] = False
    step_logits = [model(x, positions[:, :T], vs_prefill, pref, cache2, 0)[:, -1]]
    for i in range(steps - 1):
      vs_prefill[:, T + i] = True
      xi = model.decoder.embed(torch.from_numpy(out[:, i:i + 1]).long())
      step_logits.append(model(xi, positions[:, T + i:T + i + 1], vs_prefill, pref, cache2, T + i)[:, -1])
  for i, sl in enumerate(step_logits):
    torch.testing.assert_close(sl, logits[:, T - 1 + i], rtol=0, atol=1e-5)


def test_mask_matrix():
  # Row 0: 2 pad slots, prefix of 3; row 1: prefix of 5. Then 2 generated slots.
  valid = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
  prefix = torch.tensor([[0, 0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
  full, sliding = attention_masks(valid, prefix, 0, 7, 7, window=2)
  want0 = torch.tensor([
      [0, 0, 0, 0, 0, 0, 0],
      [0, 0, 0, 0, 0, 0, 0],
      [0, 0, 1, 1, 1, 0, 0],  # prefix: bidirectional over the prefix
      [0, 0, 1, 1, 1, 0, 0],
      [0, 0, 1, 1, 1, 0, 0],
      [0, 0, 1, 1, 1, 1, 0],  # generated: causal
      [0, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
  assert torch.equal(full[0], want0)
  want_sliding1 = torch.tensor([
      [1, 1, 1, 1, 1, 0, 0],
      [1, 1, 1, 1, 1, 0, 0],
      [1, 1, 1, 1, 1, 0, 0],
      [1, 1, 1, 1, 1, 0, 0],
      [1, 1, 1, 1, 1, 0, 0],
      [0, 0, 0, 0, 1, 1, 0],  # window 2: itself and one back
      [0, 0, 0, 0, 0, 1, 1]], dtype=torch.bool)
  assert torch.equal(sliding[1], want_sliding1)
  # Decode step: one query at slot 6 sees the same row.
  f, s = attention_masks(valid, prefix, 6, 1, 7, window=2)
  assert torch.equal(f[:, 0], full[:, 6]) and torch.equal(s[:, 0], sliding[:, 6])


def test_seeded_sampling(setup):
  _, model, cfg, tok, images = setup
  pixels, tokens, valid = _inputs(model, cfg, tok, images, PROMPTS)
  kw = dict(max_new_tokens=10, temperature=1.5, top_p=0.9, top_k=50)
  a = generate.generate(model, pixels, tokens, valid, seed=1, **kw)
  b = generate.generate(model, pixels, tokens, valid, seed=1, **kw)
  c = generate.generate(model, pixels, tokens, valid, seed=2, **kw)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_sampling_filters():
  from paligemma_torch import sampling  # pylint: disable=import-outside-toplevel
  g = torch.Generator().manual_seed(0)
  logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
  seen = lambda **kw: set(sampling.sample(logits, 1.0, generator=g, **kw).tolist())
  assert seen(top_k=2, top_p=1.0) == {0, 1}
  assert seen(top_k=0, top_p=0.7) == {0, 1}  # 0.5 < 0.7 so the 0.3 token is needed too
  assert seen(top_k=0, top_p=0.5) == {0}
  assert seen(top_k=0, top_p=1.0) == {0, 1, 2, 3}
  assert sampling.sample(logits[:1], 0.0, 0, 1.0, g).tolist() == [0]


def test_bfloat16_close_to_float32(setup):
  path, model, cfg, tok, images = setup
  m16, _, _ = load.load(path, dtype="bfloat16")
  assert m16.decoder.embed_tokens.weight.dtype == torch.bfloat16
  pixels, tokens, valid = _inputs(model, cfg, tok, images, PROMPTS)
  a = _forward(model, pixels, tokens, valid)[:, -1]
  B, T = tokens.shape
  cache = gemma.Cache.zeros(cfg.text, B, T, torch.bfloat16)
  v = torch.from_numpy(valid)
  with torch.no_grad():
    x = m16.embed(pixels, torch.from_numpy(tokens).long())
    b = m16(x, torch.from_numpy(batch.positions(valid)).long(), v, v, cache, 0)[:, -1].float()
  # bf16 keeps 8 mantissa bits (relative step 2^-8 ~ 0.4%); through a few
  # layers of tiny random weights the logits drift by a few percent of their range.
  assert (a - b).abs().max() < 0.05 * a.abs().max()
