"""Small SentencePiece models in Gemma's piece layout, trained in seconds.

pad 0, eos 1, bos 2, unk 3 (pieces `<pad>`, `<eos>`, `<bos>`, `<unk>`),
then the 1024 `<locXXXX>` and 128 `<segXXX>` pieces, byte fallback, digits
split, no dummy prefix, whitespace kept: what Gemma's tokenizer does, at a
vocabulary small enough for tests and the demo model.
"""

import io

import sentencepiece

LOC_SEG = [f"<loc{i:04d}>" for i in range(1024)] + [f"<seg{i:03d}>" for i in range(128)]


def train(corpus: list[str], vocab_size: int = 1500) -> bytes:
  """-> the serialized model; its piece count is the config's image_token_index."""
  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus), model_writer=model, vocab_size=vocab_size,
      model_type="bpe", pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
      eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
      user_defined_symbols=LOC_SEG, byte_fallback=True, split_digits=True,
      add_dummy_prefix=False, remove_extra_whitespaces=False,
      normalization_rule_name="identity", hard_vocab_limit=False,
      allow_whitespace_only_pieces=True, minloglevel=2)
  return model.getvalue()


def piece_count(model: bytes) -> int:
  return sentencepiece.SentencePieceProcessor(model_proto=model).GetPieceSize()


def shapes_corpus(scenes: int = 3000, seed: int = 0) -> list[str]:
  """Every prompt and answer of `scenes` shapes scenes."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from paligemma import shapes  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  corpus = []
  for _ in range(scenes):
    _, objs = shapes.scene(rng, 224)
    for _, prefix, suffix in shapes.questions(objs, 224):
      corpus += [prefix, suffix]
  return corpus


if __name__ == "__main__":
  # python -m paligemma.spm OUT.model [VOCAB]: the demo model's tokenizer.
  import sys  # pylint: disable=import-outside-toplevel
  vocab = int(sys.argv[2]) if len(sys.argv) > 2 else 1700
  with open(sys.argv[1], "wb") as f:
    f.write(train(shapes_corpus(), vocab))
