"""On a GPU, float32 is float32: the PyTorch reference on CUDA against
itself on the CPU. Skipped where there is no GPU (CI); run on a lent
machine with test_cross_framework.py, whose JAX side then runs on the GPU.
"""

import numpy as np
import pytest
import torch

from paligemma import batch, image as image_lib
from paligemma.tokenizer import Tokenizer
from paligemma_torch import gemma, generate, load

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _logits(model, pixels, tokens, valid):
  device = model.decoder.embed_tokens.weight.device
  on = lambda a: torch.from_numpy(a).to(device)
  B, T = tokens.shape
  cache = gemma.Cache.zeros(model.cfg.text, B, T, torch.float32, device)
  v = on(valid)
  with torch.no_grad():
    x = model.embed(on(pixels), on(tokens).long())
    return model(x, on(batch.positions(valid)).long(), v, v, cache, 0).cpu().numpy()


def test_torch_reference_on_gpu_equals_cpu(ckpt1, images):
  model, cfg, tok_path = load.load(ckpt1)
  tok = Tokenizer(tok_path, cfg.image_token_index)
  pixels = np.stack([image_lib.preprocess(image_lib.load(p), cfg.vision.image_size)
                     for p in images[:2]])
  tokens, valid = batch.left_pad([tok.prefix(p, cfg.num_image_tokens)
                                  for p in ["caption en", "detect cat"]], tok.pad_id)
  want = _logits(model, pixels, tokens, valid)
  want_ids = generate.generate(model, pixels, tokens, valid, max_new_tokens=12)
  model = model.to("cuda")
  got = _logits(model, pixels, tokens, valid)
  err = np.abs(got - want)[valid].max() / np.abs(want[valid]).max()
  assert err < 2e-5, f"logits on CUDA: max error {err:.2e} of the CPU's scale"
  np.testing.assert_array_equal(
      generate.generate(model, pixels, tokens, valid, max_new_tokens=12), want_ids)
