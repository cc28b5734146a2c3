"""Training examples: JSONL files or the built-in "shapes" task, made into
fixed-shape batches for the prefix-LM loss.

A sequence is image tokens, <bos>, prefix + "\\n" (the prefix, attended in
full), then suffix + <eos> (causal); the loss covers the suffix and its
<eos> only. Framework-free: the JAX trainer feeds these arrays to jit.
"""

import dataclasses
import json
import os
import sys

import numpy as np

from paligemma import batch, image as image_lib, shapes
from paligemma.errors import UserError
from paligemma.tokenizer import Tokenizer


@dataclasses.dataclass
class Example:
  image: object  # PIL image
  prefix: str
  suffix: str
  task: str = ""
  objects: tuple = ()  # shapes.Shape, for scoring detection
  size: int = 0  # canvas size of `objects`


def read_jsonl(path: str, on_error: str = "stop") -> list[Example]:
  """Lines {"image": path relative to the file, "prefix", "suffix"}. A bad
  line (not JSON, missing field, missing image) stops with file:line, or is
  skipped with a warning naming it when on_error == "skip"."""
  if not os.path.isfile(path):
    raise UserError(f"data file not found: {path}")
  root = os.path.dirname(os.path.abspath(path))
  out = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        try:
          d = json.loads(line)
        except json.JSONDecodeError as e:
          raise UserError(f"not JSON ({e.msg})") from None
        if not isinstance(d, dict):
          raise UserError("not a JSON object")
        for field in ("image", "prefix", "suffix"):
          if not isinstance(d.get(field), str):
            raise UserError(f"missing or non-string field {field!r}")
        image = image_lib.load(os.path.join(root, d["image"]))
        out.append(Example(image, d["prefix"], d["suffix"]))
      except UserError as e:
        if on_error != "skip":
          raise UserError(f"{path}:{n}: {e}") from None
        print(f"warning: skipping {path}:{n}: {e}", file=sys.stderr)
  if not out:
    raise UserError(f"{path}: no usable examples")
  return out


def shapes_examples(seed: int, size: int = 224, tasks=shapes.TASKS, weights=(1, 1, 1)):
  """An endless stream of shapes examples, one random question per scene of
  1, 2 or 3 shapes (relative frequencies `weights`): a task drawn from
  `tasks` (a sequence, drawn uniformly, or {task: relative frequency}) among
  those the scene answers, then one of its questions (for `detect`, one
  about a kind the scene shows two times in three). Drawing questions
  uniformly instead made `detect` (three per scene) 45% of the data and
  captions 15%."""
  rng = np.random.default_rng(seed)
  p = np.asarray(weights, np.float64) / np.sum(weights)
  if not isinstance(tasks, dict):
    tasks = dict.fromkeys(tasks, 1.0)
  while True:
    image, objs = shapes.scene(rng, size, int(rng.choice(3, p=p)) + 1)
    by_task = {}
    for q in shapes.questions(objs, size):
      if q[0] in tasks:
        by_task.setdefault(q[0], []).append(q)
    if not by_task:  # e.g. only color questions, and every kind here twice
      continue
    w = np.array([tasks[t] for t in by_task])
    qs = list(by_task.values())[int(rng.choice(len(by_task), p=w / w.sum()))]
    if qs[0][0] == "detect":
      qs = _detect_mostly_present(qs, rng)
    task, prefix, suffix = qs[int(rng.integers(len(qs)))]
    yield Example(image, prefix, suffix, task, tuple(objs), size)


def _detect_mostly_present(qs, rng, present: float = 2 / 3):
  """The `detect` questions of a scene, narrowed to the kinds it shows (with
  probability `present`) or to those it lacks. Asked of all three kinds
  alike, half the training answers were empty (two in three of single
  shapes), and the model answered nothing for 28 of 116 lone shapes and 97
  of 150 two-shape scenes."""
  shown = [q for q in qs if q[2]]
  absent = [q for q in qs if not q[2]]
  if shown and (not absent or rng.random() < present):
    return shown
  return absent


@dataclasses.dataclass
class Batch:
  pixels: np.ndarray  # [B, 3, px, px] float32
  tokens: np.ndarray  # [B, T] int32, left-padded
  valid: np.ndarray  # [B, T] real token
  prefix: np.ndarray  # [B, T] image, <bos>, prefix, "\n"
  loss: np.ndarray  # [B, T] the next token is suffix or <eos>: counted in the loss


def encode(tokenizer: Tokenizer, cfg, ex: Example, max_text: int):
  prefix = tokenizer.prefix(ex.prefix, cfg.num_image_tokens)
  suffix = tokenizer.encode(ex.suffix) + [tokenizer.eos_id]
  if len(prefix) + len(suffix) - cfg.num_image_tokens > max_text:
    raise UserError(f"example of {len(prefix) + len(suffix) - cfg.num_image_tokens} text tokens "
                    f"exceeds --max_text={max_text}: {ex.prefix!r} -> {ex.suffix!r}")
  return prefix, suffix


def make_batch(tokenizer: Tokenizer, cfg, examples: list[Example], max_text: int) -> Batch:
  T = cfg.num_image_tokens + max_text
  seqs, n_prefix = [], []
  for ex in examples:
    prefix, suffix = encode(tokenizer, cfg, ex, max_text)
    seqs.append(prefix + suffix)
    n_prefix.append(len(prefix))
  tokens, valid = batch.left_pad(seqs, tokenizer.pad_id, T)
  pad = T - np.array([len(s) for s in seqs])
  slot = np.arange(T)[None, :]
  start = pad[:, None]
  prefix_mask = (slot >= start) & (slot < start + np.array(n_prefix)[:, None])
  # Position t predicts token t+1: counted when t+1 is in the suffix.
  loss = np.zeros_like(valid)
  loss[:, :-1] = valid[:, 1:] & ~prefix_mask[:, 1:]
  pixels = np.stack([image_lib.preprocess(ex.image, cfg.vision.image_size) for ex in examples])
  return Batch(pixels, tokens, valid, prefix_mask, loss)


def shapes_held_out(seed: int, images: int, size: int = 224) -> list[Example]:
  """Every question of `images` fresh scenes (for evaluation)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(images):
    image, objs = shapes.scene(rng, size)
    out += [Example(image, prefix, suffix, task, tuple(objs), size)
            for task, prefix, suffix in shapes.questions(objs, size)]
  return out
