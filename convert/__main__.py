"""python -m convert --input=SRC --output=DST [--dtype=bfloat16]

Hub directory -> big_vision .npz, or .npz -> Hub directory: the direction
follows from the input. For a .npz input, --tokenizer and --variant (or
--config) give what the file does not hold. Streams: at most one layer is
held beyond the memory-mapped input. Output appears only when complete.
"""

import sys

from absl import app, flags
import ml_dtypes
import numpy as np

from convert import big_vision, hub, layout
from paligemma import errors
from paligemma.errors import UserError

flags.DEFINE_string("input", None, "Hub checkpoint directory or big_vision .npz.")
flags.DEFINE_string("output", None, "Output: a .npz for a Hub input, a directory for a .npz.")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Output dtype; default: as stored.")
flags.DEFINE_string("tokenizer", None, "tokenizer.model (for a .npz input).")
flags.DEFINE_string("variant", None, f"For a .npz input: one of {', '.join(sorted(big_vision.VARIANTS))}.")
flags.DEFINE_string("config", None, "For a .npz input: a config.json instead of --variant.")
flags.DEFINE_bool("overwrite", False, "Replace an existing output.")
FLAGS = flags.FLAGS

NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def _dtype_name(dtype) -> str:
  return "bfloat16" if dtype == ml_dtypes.bfloat16 else np.dtype(dtype).name


def convert():
  if not FLAGS.input or not FLAGS.output:
    raise UserError("--input and --output are required")
  if FLAGS.input.endswith(".npz"):
    cfg, flat, tokenizer = big_vision.read(FLAGS.input, FLAGS.tokenizer, FLAGS.variant, FLAGS.config)
    tensors = layout.big_vision_to_hub(cfg, flat)
    dtype = NP_DTYPES[FLAGS.dtype] if FLAGS.dtype else flat["llm/embedder/input_embedding"].dtype
    for t in tensors.values():
      t.dtype = dtype
    hub.write(FLAGS.output, cfg, tensors, tokenizer, _dtype_name(dtype), overwrite=FLAGS.overwrite)
  else:
    if not FLAGS.output.endswith(".npz"):
      raise UserError("--output must end in .npz for a Hub checkpoint input")
    ckpt = hub.read(FLAGS.input, FLAGS.tokenizer)
    cfg = ckpt.config
    extra = ckpt.tensors[hub.TEXT + "embed_tokens.weight"][cfg.image_token_index:]
    if np.any(np.asarray(extra, np.float32)):
      print("warning: the embedding rows for <image> and padding are not zero; big_vision has "
            "no such rows, so they are dropped", file=sys.stderr)
    tensors = layout.hub_to_big_vision(cfg, ckpt.tensors)
    dtype = NP_DTYPES[FLAGS.dtype] if FLAGS.dtype else ckpt.tensors[hub.TEXT + "norm.weight"].dtype
    for t in tensors.values():
      t.dtype = dtype
    big_vision.write_npz(FLAGS.output, tensors, overwrite=FLAGS.overwrite)
    big_vision.write_sidecars(FLAGS.output, cfg, ckpt.tokenizer_path, _dtype_name(dtype))
  print(f"wrote {FLAGS.output}", file=sys.stderr)


if __name__ == "__main__":
  app.run(errors.main(convert))
