"""python -m convert.random_checkpoint --variant=paligemma-3b-224 --output=DIR [--dtype=bfloat16]

A Hub-layout checkpoint with random weights and the exact shapes and
config.json of a named variant (or the demo size), for benchmarks and tests
at real size with no download. Streams: one tensor is in memory at a time.
The tokenizer is a small SentencePiece model padded with unused pieces to
the variant's full vocabulary, so every id and shape is the real one.
"""

import os
import sys
import tempfile
import zlib

from absl import app, flags
import ml_dtypes
import numpy as np
from sentencepiece import sentencepiece_model_pb2

from convert import big_vision, hub, layout
from paligemma import spm
from paligemma import errors
from paligemma.errors import UserError

flags.DEFINE_string("variant", "paligemma-3b-224", f"One of {', '.join(sorted(big_vision.VARIANTS))}.")
flags.DEFINE_string("output", None, "Output directory.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Stored dtype.")
flags.DEFINE_integer("seed", 0, "Weights seed.")
flags.DEFINE_bool("overwrite", False, "Replace an existing output.")
FLAGS = flags.FLAGS

GEMMA_PIECES = 257152  # Gemma's 256000 + 1024 <loc> + 128 <seg>


def full_vocab_tokenizer(pieces: int) -> bytes:
  """The shapes tokenizer with unused pieces appended up to `pieces`."""
  m = sentencepiece_model_pb2.ModelProto()
  m.ParseFromString(spm.train(spm.shapes_corpus(300)))
  for i in range(len(m.pieces), pieces):
    p = m.pieces.add()
    p.piece, p.score, p.type = f"<unused{i}>", 0.0, sentencepiece_model_pb2.ModelProto.SentencePiece.UNUSED
  return m.SerializeToString()


def random_tensors(cfg, dtype, seed: int) -> dict:
  """Hub name -> lazy producer of N(0, 1/fan_in) weights (norms near their identity)."""
  out = {}
  for name, shape in hub.shapes(cfg).items():
    def make(name=name, shape=shape):
      rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
      if len(shape) == 1:
        base = 1.0 if "layer_norm" in name or "post_layernorm" in name else 0.0
        return (base + 0.02 * rng.standard_normal(shape, np.float32)).astype(dtype)
      a = rng.standard_normal(shape, np.float32) * np.float32(1 / np.sqrt(np.prod(shape[1:])))
      if name == hub.TEXT + "embed_tokens.weight":
        a[cfg.image_token_index:] = 0  # the Hub's <image> and padding rows
      return a.astype(dtype)
    out[name] = layout.Single(shape, np.dtype(dtype), make)
  return out


def write(variant: str, output: str, dtype: str = "float32", seed: int = 0,
          overwrite: bool = False) -> None:
  if variant == "demo":
    tok = spm.train(spm.shapes_corpus(), 1700)
    cfg = big_vision.variant_config("demo", spm.piece_count(tok))
  else:
    tok = full_vocab_tokenizer(GEMMA_PIECES)
    cfg = big_vision.variant_config(variant, GEMMA_PIECES)
  np_dtype = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
  with tempfile.TemporaryDirectory() as d:
    tok_path = os.path.join(d, "tokenizer.model")
    with open(tok_path, "wb") as f:
      f.write(tok)
    hub.write(output, cfg, random_tensors(cfg, np_dtype, seed), tok_path, dtype,
              overwrite=overwrite)


def main():
  if not FLAGS.output:
    raise UserError("--output is required")
  if FLAGS.variant != "demo" and FLAGS.variant not in big_vision.VARIANTS:
    raise UserError(f"unknown --variant {FLAGS.variant!r}")
  write(FLAGS.variant, FLAGS.output, FLAGS.dtype, FLAGS.seed, FLAGS.overwrite)
  print(f"wrote {FLAGS.output}", file=sys.stderr)


if __name__ == "__main__":
  app.run(errors.main(main))
