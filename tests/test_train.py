"""Fine-tuning as a user runs it: JSONL data, bad input, resuming, and a
result that loads in both binaries with identical greedy generations."""

import json
import os
import re

import numpy as np
import pytest

from paligemma import data
from paligemma.errors import UserError
from tests import helpers
from tests.binaries import run, run_each


def _jsonl(path, rows):
  with open(path, "w") as f:
    for r in rows:
      f.write(r if isinstance(r, str) else json.dumps(r))
      f.write("\n")
  return str(path)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """A tiny task: the answer is the image's dominant color."""
  d = tmp_path_factory.mktemp("data")
  from PIL import Image  # pylint: disable=import-outside-toplevel
  colors = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
  rows = []
  rng = np.random.default_rng(0)
  for i in range(24):
    name = list(colors)[i % 3]
    rgb = np.clip(np.array(colors[name]) + rng.integers(-20, 21, 3), 0, 255)
    Image.new("RGB", (20, 20), tuple(int(c) for c in rgb)).save(d / f"{i}.png")
    rows.append({"image": f"{i}.png", "prefix": "caption en", "suffix": f"a {name} square"})
  return _jsonl(d / "train.jsonl", rows[:18]), _jsonl(d / "eval.jsonl", rows[18:])


def test_jsonl_bad_lines(tmp_path, dataset):
  helpers.image_file(str(tmp_path / "ok.png"))
  rows = [{"image": "ok.png", "prefix": "a", "suffix": "b"}, "{not json",
          {"image": "ok.png", "prefix": "a"}, {"image": "gone.png", "prefix": "a", "suffix": "b"}]
  path = _jsonl(tmp_path / "bad.jsonl", rows)
  with pytest.raises(UserError, match=r"bad.jsonl:2: not JSON"):
    data.read_jsonl(path)
  with pytest.raises(UserError, match=r"b2.jsonl:2: missing or non-string field 'suffix'"):
    data.read_jsonl(_jsonl(tmp_path / "b2.jsonl", [rows[0], rows[2]]))
  with pytest.raises(UserError, match=r"b3.jsonl:1: image not found"):
    data.read_jsonl(_jsonl(tmp_path / "b3.jsonl", [rows[3]]))
  assert len(data.read_jsonl(path, on_error="skip")) == 1


def test_batch_masks(ckpt1):
  from paligemma import config as config_lib  # pylint: disable=import-outside-toplevel
  from paligemma.tokenizer import Tokenizer  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  cfg = config_lib.load(ckpt1)
  tok = Tokenizer(os.path.join(ckpt1, "tokenizer.model"), cfg.image_token_index)
  ex = data.Example(Image.new("RGB", (8, 8)), "caption en", "a red circle")
  b = data.make_batch(tok, cfg, [ex], 24)
  n_prefix = len(tok.prefix("caption en", cfg.num_image_tokens))
  n_suffix = len(tok.encode("a red circle")) + 1
  assert b.prefix.sum() == n_prefix and b.valid.sum() == n_prefix + n_suffix
  assert b.loss.sum() == n_suffix  # each suffix token and <eos> is predicted once
  targets = b.tokens[0, 1:][b.loss[0, :-1]]
  assert list(targets) == tok.encode("a red circle") + [tok.eos_id]


def test_loss_weighs_each_example_equally(ckpt1):
  """The batch loss is the mean of the examples' own losses, whatever their
  answer lengths (per-token averaging, the other choice, favours the longer
  answer)."""
  from paligemma_jax import load, loss  # pylint: disable=import-outside-toplevel
  from paligemma.tokenizer import Tokenizer  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  (model, params), cfg, tok_path = load.load(ckpt1, scan=True)
  tok = Tokenizer(tok_path, cfg.image_token_index)
  short = data.Example(Image.new("RGB", (8, 8), (200, 30, 30)), "answer en count", "2")
  long = data.Example(Image.new("RGB", (8, 8), (30, 30, 200)), "caption en",
                      "a red circle, a blue square and a yellow triangle")
  of = lambda exs: float(loss.loss_fn(model, params, vars(data.make_batch(tok, cfg, exs, 64))))
  both, a, b = of([short, long]), of([short]), of([long])
  assert abs(a - b) > 0.05  # the test can tell the two weightings apart
  np.testing.assert_allclose(both, (a + b) / 2, rtol=1e-5)
  # --loss_average=token: each answer token (and <eos>) weighs the same.
  n_a, n_b = (len(tok.encode(ex.suffix)) + 1 for ex in (short, long))
  per_token = float(loss.loss_fn(model, params, vars(data.make_batch(tok, cfg, [short, long], 64)),
                                 per_token=True))
  np.testing.assert_allclose(per_token, (a * n_a + b * n_b) / (n_a + n_b), rtol=1e-5)


def test_loss_is_cross_entropy_of_the_answer(ckpt1):
  """The loss runs the output head on the text positions only; it must equal
  the cross-entropy of each answer token (and <eos>) under the full logits,
  with answers of different lengths left-padded in one batch."""
  import jax  # pylint: disable=import-outside-toplevel
  from paligemma_jax import load, loss  # pylint: disable=import-outside-toplevel
  from paligemma.tokenizer import Tokenizer  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  (model, params), cfg, tok_path = load.load(ckpt1, scan=True)
  tok = Tokenizer(tok_path, cfg.image_token_index)
  exs = [data.Example(Image.new("RGB", (8, 8), (200, 30, 30)), "answer en count", "2"),
         data.Example(Image.new("RGB", (8, 8), (30, 30, 200)), "caption en",
                      "a red circle, a blue square and a yellow triangle")]
  b = vars(data.make_batch(tok, cfg, exs, 64))
  B, T = b["tokens"].shape
  c = cfg.text
  cache = [np.zeros((c.num_hidden_layers, B, T, c.num_key_value_heads, c.head_dim), np.float32)] * 2
  variables = {"params": params}
  x = model.apply(variables, b["pixels"], b["tokens"], method=type(model).embed)
  positions = np.maximum(np.cumsum(b["valid"], axis=1) - 1, 0)
  logits, _ = model.apply(variables, x, positions, b["valid"], b["prefix"], tuple(cache))
  logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
  want = []
  for i, ex in enumerate(exs):
    answer = tok.encode(ex.suffix) + [tok.eos_id]
    last = T - 1 - len(answer)  # the prompt's "\n": it predicts the answer's first token
    want.append(-np.mean([logp[i, last + j, t] for j, t in enumerate(answer)]))
  np.testing.assert_allclose(float(loss.loss_fn(model, params, b)), np.mean(want), rtol=1e-5)


def test_bad_flags(tmp_path, dataset, ckpt1):
  train, _ = dataset
  base = [f"--output={tmp_path}/o", f"--data={train}", f"--checkpoint={ckpt1}"]
  cases = [
      ([*base, "--batch_size=0"], "--batch_size must be at least 1"),
      ([*base, "--lr=-1"], "--lr must be positive"),
      ([*base, "--eval_examples=-1"], "--eval_examples must be at least 0"),
      ([*base, "--resume"], "no checkpoint to resume"),
      ([*base, "--shapes_tasks=caption,colour"], "--shapes_tasks: TASK or TASK:WEIGHT"),
      ([*base, "--shapes_tasks=caption:0,count"], "--shapes_tasks: TASK or TASK:WEIGHT"),
      ([*base, "--shapes_weights=1,0"], "--shapes_weights: three numbers"),
      ([f"--output={tmp_path}/o", f"--checkpoint={ckpt1}"], "exactly one of --data and --task"),
      ([f"--output={tmp_path}/o", f"--data={train}", "--init=demo"], "--init needs --tokenizer"),
      ([f"--output={tmp_path}/o", f"--data={tmp_path}/none.jsonl", f"--checkpoint={ckpt1}"], "data file not found"),
      ([*base[:2], f"--checkpoint={tmp_path}/none"], "checkpoint directory not found"),
      ([*base, "--image_size=60"], "--image_size must be a multiple of the patch size 14"),
      ([*base, "--image_size=0"], "--image_size must be positive"),
      ([*base[:2], "--init=demo", "--tokenizer=paligemma/demo/tokenizer.model", "--image_size=112"],
       "--image_size needs --checkpoint"),
  ]
  for (args, msg), (rc, _, err) in zip(cases, run_each([["paligemma_jax.train", *a] for a, _ in cases])):
    assert rc == 1 and "Traceback" not in err, err
    assert msg in err.strip().splitlines()[-1], (args, err)


def test_fine_tune_lowers_loss_resumes_and_loads_in_both(tmp_path, dataset, ckpt1, images):
  train, held_out = dataset
  out = str(tmp_path / "run")
  common = [f"--data={train}", f"--eval_data={held_out}", f"--checkpoint={ckpt1}",
            f"--output={out}", "--batch_size=6", "--lr=3e-3", "--warmup_steps=2",
            "--max_text=24", "--eval_every=8", "--save_every=8", "--log_every=4"]
  rc, _, err = run("paligemma_jax.train", *common, "--steps=8")
  assert rc == 0, err
  assert re.search(r"step 4/8  loss [\d.]+  lr [\d.e+-]+  [\d.]+ examples/s  ETA", err), err
  rc, _, err2 = run("paligemma_jax.train", *common, "--steps=16", "--resume")
  assert rc == 0, err2
  assert "resumed from" in err2 and "checkpoint-000008" in err2
  losses = [float(m) for m in re.findall(r"eval step \d+: .*loss ([\d.]+)", err + err2)]
  assert len(losses) == 2 and losses[1] < losses[0], err + err2
  assert sorted(os.listdir(out)) == ["checkpoint-000008", "checkpoint-000016"]
  final = os.path.join(out, "checkpoint-000016")
  args = [f"--checkpoint={final}", f"--image={images[0]}", f"--image={images[1]}",
          "--prompt=caption en", "--json", "--max_new_tokens=6"]
  outs = []
  for rc, stdout, err in run_each([[m, *args] for m in ("paligemma_torch.inference",
                                                        "paligemma_jax.inference")]):
    assert rc == 0, err
    outs.append([json.loads(l)["token_ids"] for l in stdout.splitlines()])
  assert outs[0] == outs[1]


def test_resumed_run_equals_uninterrupted(tmp_path):
  """Training from scratch, stopped after a checkpoint and resumed, ends
  with the weights of the run that was never stopped."""
  out = str(tmp_path / "run")
  args = ["--task=shapes", "--init=demo", "--tokenizer=paligemma/demo/tokenizer.model",
          f"--output={out}", "--steps=4", "--batch_size=2", "--warmup_steps=1",
          "--max_text=24", "--save_every=2", "--eval_examples=0", "--log_every=1"]
  rc, _, err = run("paligemma_jax.train", *args)
  assert rc == 0, err
  assert "eval step" not in err, err  # --eval_examples=0: no evaluation (and its compile)
  os.rename(os.path.join(out, "checkpoint-000004"), str(tmp_path / "uninterrupted"))
  rc, _, err2 = run("paligemma_jax.train", *args, "--resume")
  assert rc == 0, err2
  assert "resumed from" in err2 and "checkpoint-000002" in err2
  step_losses = lambda e: re.findall(r"step ([34])/4  loss ([\d.]+)", e)
  assert step_losses(err2) == step_losses(err) and len(step_losses(err)) == 2, err + err2
  from convert import hub  # pylint: disable=import-outside-toplevel
  want = hub.read(str(tmp_path / "uninterrupted")).tensors
  got = hub.read(os.path.join(out, "checkpoint-000004")).tensors
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-5, atol=1e-7,
                               err_msg=k)
  # From scratch, the decoder starts at std 1/sqrt(D), not the 0.02 placeholder
  # (4 steps of lr 1e-3 move it by far less than the 10% allowed here).
  for name in ("layers.0.mlp.gate_proj.weight", "layers.1.self_attn.q_proj.weight",
               "embed_tokens.weight"):
    w = np.asarray(want[hub.TEXT + name])
    assert abs(w.std() * w.shape[-1]**0.5 - 1) < 0.1, (name, w.std())


def test_position_embedding_resampled_bilinearly(ckpt1):
  """A position embedding linear in (row, column) stays so on the new grid,
  sampled at the old grid's coordinates of the new patch centers (clamped
  at the border); nothing else changes."""
  from paligemma_jax import load, resolution  # pylint: disable=import-outside-toplevel
  (_, params), cfg, _ = load.load(ckpt1, scan=True)
  old, D = 4, cfg.vision.hidden_size  # 56 px, patch 14
  a, b = np.random.default_rng(0).standard_normal((2, D)).astype(np.float32)
  r, c = np.divmod(np.arange(old * old), old)
  params["img"]["pos_embedding"] = (r[:, None] * a + c[:, None] * b)[None]
  cfg2, params2 = resolution.resize_image(cfg, params, 98)  # 7 x 7 patches
  assert cfg2.vision.image_size == 98 and cfg2.num_image_tokens == 49
  assert cfg2.text == cfg.text and cfg2.vision.patch_size == 14
  at = np.clip((np.arange(7) + 0.5) * old / 7 - 0.5, 0, old - 1)  # new centers on the old grid
  r2, c2 = np.divmod(np.arange(49), 7)
  want = at[r2][:, None] * a + at[c2][:, None] * b
  np.testing.assert_allclose(np.asarray(params2["img"]["pos_embedding"])[0], want, atol=1e-5)
  for k, v in load.flatten(params).items():
    if k != "img/pos_embedding":
      assert load.flatten(params2)[k] is v, k
  _, same = resolution.resize_image(cfg, params, 56)
  np.testing.assert_allclose(same["img"]["pos_embedding"], params["img"]["pos_embedding"],
                             atol=1e-6)


def test_fine_tune_at_another_resolution(tmp_path, dataset, ckpt1, images):
  """--image_size continues a checkpoint at a new resolution; the result
  says so in its config.json and loads in both binaries alike."""
  train, _ = dataset
  out = str(tmp_path / "run")
  rc, _, err = run("paligemma_jax.train", f"--data={train}", f"--checkpoint={ckpt1}",
                   "--image_size=70", f"--output={out}", "--steps=2", "--batch_size=3",
                   "--max_text=24", "--eval_examples=0")
  assert rc == 0, err
  final = os.path.join(out, "checkpoint-000002")
  with open(os.path.join(final, "config.json")) as f:
    assert json.load(f)["vision_config"]["image_size"] == 70
  args = [f"--checkpoint={final}", f"--image={images[0]}", "--prompt=caption en", "--json",
          "--max_new_tokens=6"]
  outs = []
  for rc, stdout, err in run_each([[m, *args] for m in ("paligemma_torch.inference",
                                                        "paligemma_jax.inference")]):
    assert rc == 0, err
    outs.append(json.loads(stdout)["token_ids"])
  assert outs[0] == outs[1]
