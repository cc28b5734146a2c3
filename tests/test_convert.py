"""The converter binary: exact round trips, .npz twins, bad input."""

import os
import zipfile

import numpy as np
import pytest

from convert import big_vision, hub, layout
from paligemma import batch, image as image_lib
from paligemma.tokenizer import Tokenizer
from tests import helpers
from tests.binaries import run


def convert(*args):
  rc, _, err = run("convert", *args)
  return rc, err


@pytest.mark.parametrize("gemma2", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_bit_exact(tmp_path, gemma2, dtype):
  src = helpers.make_checkpoint(str(tmp_path / "hub"), gemma2=gemma2, dtype=dtype, shards=2)
  rc, err = convert(f"--input={src}", f"--output={tmp_path}/m.npz")
  assert rc == 0, err
  flat = big_vision.read_npz(str(tmp_path / "m.npz"))
  cfg = hub.read(src).config
  big_vision.check(cfg, flat, "npz")  # exactly big_vision's keys and shapes
  with zipfile.ZipFile(tmp_path / "m.npz") as zf:
    assert all(n.startswith("params/") for n in zf.namelist())
  rc, err = convert(f"--input={tmp_path}/m.npz", f"--output={tmp_path}/back")
  assert rc == 0, err
  a, b = hub.read(src), hub.read(str(tmp_path / "back"))
  assert a.config == b.config
  for name, arr in a.tensors.items():
    assert b.tensors[name].dtype == arr.dtype
    np.testing.assert_array_equal(b.tensors[name].view(np.uint8), arr.view(np.uint8), err_msg=name)


def test_mapping_matches_transformers_conventions(ckpt1):
  """The formulas transformers' converter uses, on one layer, written out."""
  ckpt = hub.read(ckpt1)
  cfg, t = ckpt.config, ckpt.tensors
  bv = {k: s() for k, s in layout.hub_to_big_vision(cfg, t).items()}
  D, N, H = cfg.text.hidden_size, cfg.text.num_attention_heads, cfg.text.head_dim
  q = bv["llm/layers/attn/q_einsum/w"][1]
  np.testing.assert_array_equal(q.transpose(0, 2, 1).reshape(N * H, D), t[hub.TEXT + "layers.1.self_attn.q_proj.weight"])
  o = bv["llm/layers/attn/attn_vec_einsum/w"][1]
  np.testing.assert_array_equal(o.transpose(2, 0, 1).reshape(D, N * H), t[hub.TEXT + "layers.1.self_attn.o_proj.weight"])
  np.testing.assert_array_equal(bv["llm/layers/pre_ffw_norm/scale"][0],
                                t[hub.TEXT + "layers.0.post_attention_layernorm.weight"])
  k = bv["img/embedding/kernel"]
  np.testing.assert_array_equal(k.transpose(3, 2, 0, 1), t[hub.VISION + "embeddings.patch_embedding.weight"])
  qv = bv[layout.ATT + "query/kernel"][0]
  np.testing.assert_array_equal(qv.reshape(qv.shape[0], -1).T,
                                t[hub.VISION + "encoder.layers.0.self_attn.q_proj.weight"])


@pytest.mark.parametrize("module", ["paligemma_torch.inference", "paligemma_jax.inference"])
def test_npz_twin_generates_the_same(tmp_path, ckpt2, images, module):
  rc, err = convert(f"--input={ckpt2}", f"--output={tmp_path}/m.npz")
  assert rc == 0, err
  cfg_path, tok_path = big_vision.sidecars(str(tmp_path / "m.npz"))
  os.rename(cfg_path, tmp_path / "config.json")  # make --config and --tokenizer necessary
  os.rename(tok_path, tmp_path / "tok.model")
  outs = []
  for ck in (ckpt2, f"{tmp_path}/m.npz"):
    extra = [] if ck == ckpt2 else [f"--config={tmp_path}/config.json", f"--tokenizer={tmp_path}/tok.model"]
    rc, out, err = run(module, f"--checkpoint={ck}", *extra, f"--image={images[0]}",
                       "--prompt=caption en", "--prompt=detect cat", "--max_new_tokens=8", "--json")
    assert rc == 0, err
    outs.append(out)
  assert outs[0] == outs[1]


def test_variant_configs():
  c = big_vision.variant_config("paligemma-3b-224")
  assert (c.text.hidden_size, c.text.num_hidden_layers, c.num_image_tokens, c.text.vocab_size) == (2048, 18, 256, 257216)
  c = big_vision.variant_config("paligemma2-28b-896")
  assert (c.text.head_dim, c.text.query_pre_attn_scalar, c.num_image_tokens) == (128, 144, 4096)
  # The published parameter count of paligemma-3b (Hub layout, tied head counted once).
  assert sum(np.prod(s) for s in hub.shapes(big_vision.variant_config("paligemma-3b-224")).values()) \
      == 2_923_466_480


def test_bad_input(tmp_path, ckpt1):
  rc, err = convert(f"--input={ckpt1}", f"--output={tmp_path}/m.npz")
  assert rc == 0, err
  npz = str(tmp_path / "m.npz")
  cfg_side, tok_side = big_vision.sidecars(npz)
  os.rename(cfg_side, tmp_path / "config.json")
  os.rename(tok_side, tmp_path / "tok.model")
  flat = big_vision.read_npz(npz)
  drop = dict(flat)
  del drop["llm/layers/mlp/linear"]
  extra = dict(flat, **{"llm/extra": np.zeros(3, np.float32)})
  wrong = dict(flat, **{"img/head/bias": np.zeros(3, np.float32)})
  for name, d in (("drop", drop), ("extra", extra), ("wrong", wrong)):
    big_vision.write_npz(str(tmp_path / f"{name}.npz"), d)
  (tmp_path / "junk.npz").write_bytes(b"PK not really")
  ok = [f"--config={tmp_path}/config.json", f"--tokenizer={tmp_path}/tok.model"]
  cases = [
      ([f"--input={npz}", f"--output={tmp_path}/o", f"--tokenizer={tmp_path}/tok.model"], "give --variant"),
      ([f"--input={npz}", f"--output={tmp_path}/o", f"--config={tmp_path}/config.json"], "give --tokenizer"),
      ([f"--input={tmp_path}/drop.npz", f"--output={tmp_path}/o", *ok], "missing key 'llm/layers/mlp/linear'"),
      ([f"--input={tmp_path}/extra.npz", f"--output={tmp_path}/o", *ok], "unexpected key 'llm/extra'"),
      ([f"--input={tmp_path}/wrong.npz", f"--output={tmp_path}/o", *ok], "key 'img/head/bias' has shape (3,)"),
      ([f"--input={tmp_path}/junk.npz", f"--output={tmp_path}/o", *ok], "not a readable .npz"),
      ([f"--input={npz}", f"--output={tmp_path}/o", "--variant=paligemma-3b-224",
        f"--tokenizer={tmp_path}/tok.model"], "has shape"),
      ([f"--input={npz}", f"--output={tmp_path}/o", "--variant=nope", *ok[1:]], "unknown --variant"),
      ([f"--input={ckpt1}", f"--output={npz}"], "output exists"),
      ([f"--input={ckpt1}", f"--output={tmp_path}/x"], "must end in .npz"),
  ]
  for args, msg in cases:
    rc, err = convert(*args)
    assert rc == 1 and "Traceback" not in err, (args, err)
    assert msg in err.strip().splitlines()[-1], (args, err)
  assert not os.path.exists(tmp_path / "o")
  leftovers = [f for f in os.listdir(tmp_path) if ".tmp-" in f]
  assert not leftovers
