"""The inference binaries' flags and flow, shared by both frameworks.

`python -m paligemma_torch.inference` and `python -m paligemma_jax.inference`
differ only in the `Backend` they pass to `main`: how to load a checkpoint
and how to generate. Flags, validation, image and prompt handling and the
output contract live here once. Stdout carries only results.
"""

import dataclasses
import json
import os
import sys
import time
from typing import Callable

from absl import flags
import numpy as np

from paligemma import batch, detection, image as image_lib
from paligemma import errors
from paligemma.errors import UserError
from paligemma.tokenizer import Tokenizer

FLAGS = flags.FLAGS

# The bundled demo: a small PaliGemma trained on the "shapes" task, and an image.
DEMO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo")
DEMO_IMAGE = os.path.join(DEMO_DIR, "example.png")


def define_flags():
  flags.DEFINE_string("checkpoint", None, "Hub checkpoint directory or big_vision .npz; "
                      "default: the bundled demo model.")
  flags.DEFINE_multi_string("image", [], "Image path; repeat for a batch; default: the "
                            "bundled example.")
  flags.DEFINE_multi_string("prompt", [], "Prompt; repeat for a batch; default: 'caption en'.")
  flags.DEFINE_string("draw", None, "Write the image with detected boxes to this PNG "
                      "(-N is added before the extension for each result after the first).")
  flags.DEFINE_integer("max_new_tokens", 32, "Most tokens generated per prompt.")
  flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 is greedy.")
  flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens; 0 is off.")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1]; 1 is off.")
  flags.DEFINE_integer("seed", 0, "Sampling seed: the same seed gives the same output.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weights and activations.")
  flags.DEFINE_string("tokenizer", None, "tokenizer.model, overriding the checkpoint's.")
  flags.DEFINE_string("variant", None, "For a .npz: variant such as paligemma-3b-224.")
  flags.DEFINE_string("config", None, "For a .npz: a config.json instead of --variant.")
  flags.DEFINE_bool("json", False, "One JSON object per result line.")


@dataclasses.dataclass
class Request:
  images: list[str]
  prompts: list[str]
  max_new_tokens: int
  temperature: float
  top_k: int
  top_p: float
  seed: int


@dataclasses.dataclass
class Backend:
  # (checkpoint, tokenizer, dtype, variant, config) -> (model, PaliGemmaConfig, tokenizer path)
  load: Callable
  # (model, pixels [B,3,px,px] float32, tokens [B,T], valid [B,T], request) -> ids [B, steps]
  generate: Callable


def pair(images: list[str], prompts: list[str]):
  if not images or not prompts:
    raise UserError("give at least one --image and one --prompt")
  if len(images) == len(prompts):
    return list(zip(images, prompts))
  if len(images) == 1:
    return [(images[0], p) for p in prompts]
  if len(prompts) == 1:
    return [(i, prompts[0]) for i in images]
  raise UserError(f"{len(images)} --image and {len(prompts)} --prompt: give equal counts, "
                  "or one of either")


def validate_sampling(r: Request):
  if r.max_new_tokens < 1:
    raise UserError(f"--max_new_tokens must be at least 1, got {r.max_new_tokens}")
  if r.temperature < 0:
    raise UserError(f"--temperature must be >= 0, got {r.temperature}")
  if r.top_k < 0:
    raise UserError(f"--top_k must be >= 0, got {r.top_k}")
  if not 0 < r.top_p <= 1:
    raise UserError(f"--top_p must be in (0, 1], got {r.top_p}")


def prepare(cfg, tokenizer: Tokenizer, pairs, loaded, max_new_tokens: int):
  """-> pixels [B, 3, px, px], tokens and valid [B, T] (left-padded)."""
  once = {p: image_lib.preprocess(im, cfg.vision.image_size) for p, im in loaded.items()}
  pixels = np.stack([once[p] for p, _ in pairs])
  prefixes = [tokenizer.prefix(prompt, cfg.num_image_tokens) for _, prompt in pairs]
  longest = max(len(p) for p in prefixes)
  if longest + max_new_tokens > cfg.text.max_position_embeddings:
    raise UserError(f"prompt ({longest} tokens with the image) + max_new_tokens "
                    f"({max_new_tokens}) exceeds max_position_embeddings "
                    f"({cfg.text.max_position_embeddings})")
  tokens, valid = batch.left_pad(prefixes, tokenizer.pad_id)
  return pixels, tokens, valid


def run(backend: Backend):
  r = Request(FLAGS.image or [DEMO_IMAGE], FLAGS.prompt or ["caption en"], FLAGS.max_new_tokens,
              FLAGS.temperature, FLAGS.top_k, FLAGS.top_p, FLAGS.seed)
  validate_sampling(r)
  pairs = pair(r.images, r.prompts)
  checkpoint = FLAGS.checkpoint or DEMO_DIR
  if FLAGS.draw and not os.path.isdir(os.path.dirname(os.path.abspath(FLAGS.draw))):
    raise UserError(f"--draw: directory not found for {FLAGS.draw}")
  loaded = {path: image_lib.load(path) for path in dict.fromkeys(p for p, _ in pairs)}
  t0 = time.perf_counter()
  model, cfg, tokenizer_path = backend.load(checkpoint, FLAGS.tokenizer, FLAGS.dtype,
                                            FLAGS.variant, FLAGS.config)
  tokenizer = Tokenizer(tokenizer_path, cfg.image_token_index)
  print(f"loaded {checkpoint} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
  pixels, tokens, valid = prepare(cfg, tokenizer, pairs, loaded, r.max_new_tokens)
  t0 = time.perf_counter()
  ids = backend.generate(model, pixels, tokens, valid, r)
  print(f"generated in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
  for i, ((image, prompt), row) in enumerate(zip(pairs, ids)):
    row = batch.until_eos(row, cfg.eos_token_id)
    text = tokenizer.decode(row)
    width, height = loaded[image].size
    boxes, unparsed = detection.parse(text, width, height)
    if FLAGS.draw:
      stem, ext = os.path.splitext(FLAGS.draw)
      detection.draw(loaded[image], boxes, FLAGS.draw if i == 0 else f"{stem}-{i}{ext or '.png'}")
    if FLAGS.json:
      result = {"image": image, "prompt": prompt, "text": text, "token_ids": row}
      if boxes or unparsed:
        result.update(boxes=boxes, unparsed=unparsed)
      print(json.dumps(result))
    else:  # one line per result: escape what would break the line
      print(text.replace("\\", "\\\\").replace("\n", "\\n"))
  sys.stdout.flush()


def main(backend: Backend) -> Callable:
  """The absl main of an inference binary."""
  return errors.main(lambda: run(backend))
