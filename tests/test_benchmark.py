"""Random real-layout checkpoints and the benchmark command, at toy size."""

import json

import sentencepiece

from convert import big_vision, hub, random_checkpoint
from paligemma.tokenizer import Tokenizer
from tests.binaries import run


def test_full_vocab_tokenizer():
  sp = sentencepiece.SentencePieceProcessor(
      model_proto=random_checkpoint.full_vocab_tokenizer(random_checkpoint.GEMMA_PIECES))
  assert sp.GetPieceSize() == 257152
  assert (sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()) == (0, 1, 2, 3)
  assert sp.PieceToId("<loc1023>") != sp.unk_id() and sp.PieceToId("<seg127>") != sp.unk_id()


def test_random_demo_checkpoint_loads(tmp_path):
  random_checkpoint.write("demo", str(tmp_path / "d"))
  ckpt = hub.read(str(tmp_path / "d"))
  assert ckpt.config == big_vision.variant_config("demo", ckpt.config.image_token_index)
  Tokenizer(ckpt.tokenizer_path, ckpt.config.image_token_index)
  emb = ckpt.tensors[hub.TEXT + "embed_tokens.weight"]
  assert not emb[ckpt.config.image_token_index:].any() and emb[:10].any()


def test_benchmark_command(tmp_path, ckpt1):
  out = tmp_path / "b.json"
  rc, stdout, stderr = run("benchmarks.decode", f"--checkpoint={ckpt1}", "--new_tokens=4",
                           "--repeats=1", "--batch_sizes=1,2", "--bandwidth_gib=0.25",
                           f"--json={out}")
  assert rc == 0, stderr
  r = json.loads(out.read_text())
  assert r["bandwidth_gb_s"] > 0 and set(r["roofline"]) == {"b1", "b2"}
  impls = {row["impl"]: row for row in r["rows"]}
  assert set(impls) == {"jax", "torch", "transformers"}, stderr
  assert impls["jax"]["recompiles_for_new_prompt_and_length"] == 0
  for row in impls.values():
    assert row["decode_tok_s_b1"] > 0 and row["load_peak_rss_gb"] > 0
  for row in impls.values():  # each timed run paired with the bandwidth read around it
    assert len(row["bandwidth_gb_s_b2_runs"]) == len(row["decode_tok_s_b2_runs"]) == 1
    assert row["roofline_fraction_paired_b2"] > 0
  assert "roofline b1" in stdout and "paired" in stdout


def test_benchmark_rejects_batch_sizes_without_one(ckpt1):
  rc, _, err = run("benchmarks.decode", f"--checkpoint={ckpt1}", "--batch_sizes=8", timeout=120)
  assert rc == 1 and "Traceback" not in err, err
  assert err.strip().splitlines()[-1].startswith("error: --batch_sizes: positive integers"), err
