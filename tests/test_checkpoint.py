"""Reading Hub checkpoints: both namings, shards, dtypes, and every broken input."""

import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest

from convert import hub, layout, safetensors
from paligemma.errors import UserError
from tests import helpers


@pytest.mark.parametrize("naming", ["hub", "new", "new-short"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shards", [1, 3])
def test_namings_shards_dtypes(tmp_path, naming, dtype, shards):
  cfg = helpers.tiny_config(gemma2=True)
  w = helpers.random_weights(cfg)
  helpers.write_checkpoint(str(tmp_path), cfg, w, naming=naming, dtype=dtype, shards=shards)
  ckpt = hub.read(str(tmp_path))
  assert ckpt.config == cfg
  assert set(ckpt.tensors) == set(w)
  want_dtype = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
  for name, arr in ckpt.tensors.items():
    assert arr.dtype == want_dtype
    np.testing.assert_array_equal(arr.astype(np.float32), w[name].astype(want_dtype).astype(np.float32))


def test_lazy(ckpt1):
  ckpt = hub.read(ckpt1)
  arr = ckpt.tensors[hub.TEXT + "embed_tokens.weight"]
  assert isinstance(arr.base, np.memmap) or isinstance(arr, np.memmap)


def test_safetensors_round_trip_readable_by_the_package(tmp_path):
  st = pytest.importorskip("safetensors.numpy")
  a = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "y": np.ones(5, np.float16)}
  safetensors.write(str(tmp_path / "a.safetensors"), a)
  back = st.load_file(str(tmp_path / "a.safetensors"))
  for k in a:
    np.testing.assert_array_equal(back[k], a[k])


def _break(path, how):
  if how == "missing_dir":
    shutil.rmtree(path)
  elif how == "no_config":
    os.remove(os.path.join(path, "config.json"))
  elif how == "no_tokenizer":
    os.remove(os.path.join(path, "tokenizer.model"))
  elif how == "no_weights":
    for f in os.listdir(path):
      if f.endswith(".safetensors") or f.endswith(".json") and f != "config.json":
        os.remove(os.path.join(path, f))
  elif how == "missing_shard":
    os.remove(os.path.join(path, "model-00002-of-00003.safetensors"))
  elif how == "truncated":
    f = os.path.join(path, "model-00001-of-00003.safetensors")
    with open(f, "r+b") as fh:
      fh.truncate(os.path.getsize(f) - 100)
  elif how == "corrupt_header":
    f = os.path.join(path, "model-00001-of-00003.safetensors")
    with open(f, "r+b") as fh:
      fh.seek(10)
      fh.write(b"\xff\xfe garbage")
  elif how == "tiny_file":
    with open(os.path.join(path, "model-00001-of-00003.safetensors"), "wb") as fh:
      fh.write(b"abc")
  elif how == "bad_index":
    with open(os.path.join(path, hub.INDEX), "w") as fh:
      fh.write("{")


@pytest.mark.parametrize("how, msg", [
    ("missing_dir", "checkpoint directory not found"),
    ("no_config", "config not found"),
    ("no_tokenizer", "tokenizer not found"),
    ("no_weights", "no model.safetensors"),
    ("missing_shard", "shard 'model-00002-of-00003.safetensors' named in"),
    ("truncated", "truncated"),
    ("corrupt_header", "corrupt"),
    ("tiny_file", "truncated safetensors file"),
    ("bad_index", "invalid safetensors index"),
])
def test_broken_files(tmp_path, how, msg):
  path = helpers.make_checkpoint(str(tmp_path / "c"), shards=3)
  _break(path, how)
  with pytest.raises(UserError, match=msg):
    hub.read(path)


def _rewrite(path, edit):
  cfg = helpers.tiny_config()
  w = helpers.random_weights(cfg)
  edit(w)
  helpers.write_checkpoint(path, cfg, w)


def test_missing_key(tmp_path):
  _rewrite(str(tmp_path), lambda w: w.pop(hub.TEXT + "layers.1.mlp.up_proj.weight"))
  with pytest.raises(UserError, match=r"missing weight 'language_model.model.layers.1.mlp.up_proj.weight'"):
    hub.read(str(tmp_path))


def test_unexpected_key(tmp_path):
  _rewrite(str(tmp_path), lambda w: w.update({"vision_tower.vision_model.head.weight": np.ones(3, np.float32)}))
  with pytest.raises(UserError, match=r"unexpected weight 'vision_tower.vision_model.head.weight'"):
    hub.read(str(tmp_path))


def test_wrong_shape(tmp_path):
  name = hub.PROJECTOR + "bias"
  _rewrite(str(tmp_path), lambda w: w.update({name: np.ones(7, np.float32)}))
  with pytest.raises(UserError, match=r"'multi_modal_projector.linear.bias' has shape \(7,\)"):
    hub.read(str(tmp_path))


def test_config_disagrees_with_weights(tmp_path):
  path = helpers.make_checkpoint(str(tmp_path))
  with open(os.path.join(path, "config.json")) as f:
    d = json.load(f)
  d["text_config"]["num_hidden_layers"] = 2
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(d, f)
  with pytest.raises(UserError, match="unexpected weight 'language_model.model.layers.2"):
    hub.read(path)


def test_writer_atomic_and_refuses_existing(tmp_path, ckpt1):
  src = hub.read(ckpt1)
  out = str(tmp_path / "out")
  hub.write(out, src.config, dict(src.tensors), src.tokenizer_path, shard_bytes=50_000)
  back = hub.read(out)
  for k, v in src.tensors.items():
    np.testing.assert_array_equal(back.tensors[k], v)
  with pytest.raises(UserError, match="output exists"):
    hub.write(out, src.config, dict(src.tensors), src.tokenizer_path)

  def boom():
    raise KeyboardInterrupt
  bad = dict(src.tensors)
  bad["x"] = layout.Single((2,), np.float32, boom)
  with pytest.raises(KeyboardInterrupt):
    hub.write(str(tmp_path / "half"), src.config, bad, src.tokenizer_path)
  assert os.listdir(tmp_path) == ["out"]
