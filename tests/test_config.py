import json

import pytest

from paligemma import config as config_lib
from paligemma.errors import UserError

# As published on the Hub (PaliGemma 1 3B, 224 px): only non-defaults.
PG1 = {
    "architectures": ["PaliGemmaForConditionalGeneration"], "bos_token_id": 2,
    "eos_token_id": 1, "hidden_size": 2048, "ignore_index": -100,
    "image_token_index": 257152, "model_type": "paligemma", "pad_token_id": 0,
    "projection_dim": 2048,
    "text_config": {"hidden_size": 2048, "intermediate_size": 16384, "model_type": "gemma",
                    "num_attention_heads": 8, "num_hidden_layers": 18, "num_image_tokens": 256,
                    "num_key_value_heads": 1, "torch_dtype": "float32", "vocab_size": 257216},
    "vision_config": {"hidden_size": 1152, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16,
                      "num_hidden_layers": 27, "num_image_tokens": 256, "patch_size": 14,
                      "projection_dim": 2048, "projector_hidden_act": "gelu_fast",
                      "vision_use_head": False},
    "torch_dtype": "float32", "transformers_version": "4.42.0.dev0",
}
PG2 = json.loads(json.dumps(PG1))
PG2["hidden_size"] = PG2["projection_dim"] = 2304
PG2["text_config"] = {"hidden_size": 2304, "intermediate_size": 9216, "model_type": "gemma2",
                      "num_attention_heads": 8, "num_hidden_layers": 26, "num_image_tokens": 1024,
                      "num_key_value_heads": 4, "vocab_size": 257216, "hidden_activation":
                      "gelu_pytorch_tanh", "torch_dtype": "bfloat16"}
PG2["vision_config"].update(image_size=448, num_image_tokens=1024, projection_dim=2304)


def test_defaults_filled_pg1():
  c = config_lib.from_dict(PG1)
  t, v = c.text, c.vision
  assert (t.head_dim, t.rope_theta, t.rms_norm_eps, t.max_position_embeddings) == (256, 10000.0, 1e-6, 8192)
  assert t.query_pre_attn_scalar is None and t.sliding_window is None and not t.is_gemma2
  assert (v.image_size, v.layer_norm_eps, v.gelu_approximate, v.head_dim) == (224, 1e-6, True, 72)
  assert c.num_image_tokens == 256 and c.image_token_index == 257152


def test_defaults_filled_pg2():
  t = config_lib.from_dict(PG2).text
  assert (t.query_pre_attn_scalar, t.sliding_window, t.attn_logit_softcapping,
          t.final_logit_softcapping) == (256, 4096, 50.0, 30.0)
  assert [t.is_sliding(i) for i in range(4)] == [True, False, True, False]
  assert config_lib.from_dict(PG2).num_image_tokens == 1024


@pytest.mark.parametrize("d", [PG1, PG2], ids=["pg1", "pg2"])
def test_matches_transformers(d):
  transformers = pytest.importorskip("transformers")
  ref = transformers.PaliGemmaConfig(**d)
  c = config_lib.from_dict(d)
  rt, t = ref.text_config, c.text
  for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
            "rms_norm_eps"):
    assert getattr(rt, f) == getattr(t, f), f
  assert rt.rope_parameters["rope_theta"] == t.rope_theta
  if t.is_gemma2:
    for f in ("query_pre_attn_scalar", "sliding_window", "attn_logit_softcapping",
              "final_logit_softcapping"):
      assert getattr(rt, f) == getattr(t, f), f
  rv, v = ref.vision_config, c.vision
  for f in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "image_size", "patch_size", "layer_norm_eps", "hidden_act"):
    assert getattr(rv, f) == getattr(v, f), f
  assert ref.text_config.num_image_tokens == c.num_image_tokens


@pytest.mark.parametrize("d", [PG1, PG2], ids=["pg1", "pg2"])
def test_hub_dict_round_trip(d):
  c = config_lib.from_dict(d)
  assert config_lib.from_dict(config_lib.to_hub_dict(c)) == c


@pytest.mark.parametrize("edit, msg", [
    (lambda d: d.update(model_type="llava"), "unknown model_type 'llava'"),
    (lambda d: d["text_config"].update(model_type="llama"), "unknown text_config.model_type"),
    (lambda d: d["vision_config"].update(model_type="clip"), "unknown vision_config.model_type"),
    (lambda d: d["text_config"].update(num_hidden_layers="x"), "num_hidden_layers"),
    (lambda d: d["text_config"].update(num_key_value_heads=3), "multiple"),
])
def test_bad_configs(edit, msg):
  d = json.loads(json.dumps(PG1))
  edit(d)
  with pytest.raises(UserError, match=msg):
    config_lib.from_dict(d)


def test_bad_files(tmp_path):
  with pytest.raises(UserError, match="config not found"):
    config_lib.load(str(tmp_path))
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(UserError, match="invalid JSON"):
    config_lib.load(str(tmp_path))
