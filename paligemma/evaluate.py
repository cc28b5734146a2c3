"""Held-out evaluation: loss, exact match of greedy generations per task,
and for detection the fraction of true boxes found with IoU >= 0.5.

Framework-free: `generator.generate(pixels, tokens, valid, max_new_tokens=)`
is either framework's compiled or reference generation.
"""

import collections

import numpy as np

from paligemma import batch, data, detection, image as image_lib


def run(generator, tokenizer, cfg, examples, max_text: int, loss_of=None, batch_size: int = 50):
  correct, total = collections.Counter(), collections.Counter()
  boxes_found = boxes_total = 0
  losses = []
  for i in range(0, len(examples), batch_size):
    chunk = examples[i:i + batch_size]
    if loss_of is not None:
      b = data.make_batch(tokenizer, cfg, chunk, max_text)
      losses.append(loss_of(b) * len(chunk))
      pixels = b.pixels  # already preprocessed
    else:
      pixels = np.stack([image_lib.preprocess(ex.image, cfg.vision.image_size) for ex in chunk])
    tokens, valid = batch.left_pad([tokenizer.prefix(ex.prefix, cfg.num_image_tokens)
                                    for ex in chunk], tokenizer.pad_id)
    out = generator.generate(pixels, tokens, valid, max_new_tokens=max_text)
    for ex, row in zip(chunk, out):
      text = tokenizer.decode(batch.until_eos(row, tokenizer.eos_id))
      task = ex.task or "all"
      total[task] += 1
      correct[task] += text == ex.suffix
      if ex.task == "detect":
        kind = ex.prefix.split()[-1]
        truth = [s.box for s in ex.objects if s.kind == kind]
        found, _ = detection.parse(text, ex.size, ex.size)
        boxes_total += len(truth)
        for t in truth:
          boxes_found += any(b["label"] == kind and detection.iou(b["box"], t) >= 0.5 for b in found)
  report = {f"{t}_accuracy": correct[t] / total[t] for t in sorted(total)}
  if boxes_total:
    report["detect_box_recall"] = boxes_found / boxes_total
  if losses:
    report["loss"] = sum(losses) / len(examples)
  report["examples"] = len(examples)
  return report


def format_report(report: dict) -> str:
  return "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in report.items())
