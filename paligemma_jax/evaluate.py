"""python -m paligemma_jax.evaluate [--checkpoint=DIR] [--examples=500] [--data=FILE.jsonl]

Held-out accuracy of greedy generations: on fresh "shapes" images (seeds
never used in training) per task, with detection scored as the fraction of
true boxes found with IoU >= 0.5; or exact match on a JSONL file.
Default checkpoint: the bundled demo model. Prints one JSON object.
"""

import json

from absl import app, flags

from paligemma import cli, data, errors, evaluate
from paligemma.errors import UserError
from paligemma.tokenizer import Tokenizer
from paligemma_jax import generate, load, xla_cache

flags.DEFINE_string("checkpoint", None, "Hub directory or .npz; default: the demo model.")
flags.DEFINE_string("data", None, "JSONL instead of the shapes task.")
flags.DEFINE_integer("examples", 500, "Held-out images (shapes: every question of each) or JSONL lines.")
flags.DEFINE_integer("canvas", 224, "Shapes image size.")
flags.DEFINE_integer("seed", 2_000_000, "Shapes seed (training uses small seeds).")
flags.DEFINE_integer("max_text", 32, "Most tokens generated per answer.")
FLAGS = flags.FLAGS


def evaluate_main():
  if FLAGS.examples < 1:
    raise UserError("--examples must be at least 1")
  (model, params), cfg, tok_path = load.load(FLAGS.checkpoint or cli.DEMO_DIR)
  tokenizer = Tokenizer(tok_path, cfg.image_token_index)
  if FLAGS.data:
    examples = data.read_jsonl(FLAGS.data)[:FLAGS.examples]
  else:
    examples = data.shapes_held_out(FLAGS.seed, FLAGS.examples, FLAGS.canvas)
  report = evaluate.run(generate.Generator(model, params), tokenizer, cfg, examples,
                        FLAGS.max_text)
  print(json.dumps(report))


if __name__ == "__main__":
  xla_cache.persist_compilations()
  app.run(errors.main(evaluate_main))
