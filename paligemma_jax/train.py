"""python -m paligemma_jax.train --output=DIR (--data=FILE.jsonl | --task=shapes)
    (--checkpoint=CKPT | --init=demo --tokenizer=TOK) [--steps=N ...]

Fine-tunes (or trains from scratch) with optax: AdamW, warmup + cosine
decay, global-norm clipping; optionally the vision tower frozen, or only the
attention weights trained (big_vision's transfer recipes). Loss: next-token
cross-entropy on the suffix and its <eos>, under the inference prefix-LM
mask. Checkpoints land in DIR/checkpoint-STEP in the Hub layout (both
binaries load them) with the optimizer state beside, written then renamed;
--resume continues from the newest.
"""

import glob
import os
import queue
import sys
import threading
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from convert import big_vision, hub, layout
from paligemma import data, evaluate, shapes
from paligemma import errors
from paligemma.errors import UserError
from paligemma.tokenizer import Tokenizer
from paligemma_jax import generate, heap, load, resolution, xla_cache
from paligemma_jax.loss import loss_fn
from paligemma_jax.paligemma import PaliGemma

flags.DEFINE_string("output", None, "Directory for checkpoints.")
flags.DEFINE_string("data", None, "Training JSONL: {image, prefix, suffix} per line.")
flags.DEFINE_string("eval_data", None, "Held-out JSONL (for --data).")
flags.DEFINE_enum("task", None, ["shapes"], "A built-in synthetic task instead of --data.")
flags.DEFINE_integer("canvas", 224, "Image size of the shapes task.")
flags.DEFINE_list("shapes_tasks", list(shapes.TASKS),
                  "The shapes questions trained on, each TASK or TASK:WEIGHT (relative "
                  "frequency, default 1; evaluation asks them all).")
flags.DEFINE_list("shapes_weights", ["1", "1", "1"],
                  "Relative frequency of 1-, 2- and 3-shape training scenes (evaluation: "
                  "uniform); 1,0,0 is single shapes only.")
flags.DEFINE_enum("on_bad_line", "stop", ["stop", "skip"], "What a bad JSONL line does.")
flags.DEFINE_string("checkpoint", None, "Starting point: Hub directory or .npz.")
flags.DEFINE_string("init", None, "Train from scratch: 'demo' or a variant (paligemma-3b-224, ...).")
flags.DEFINE_string("tokenizer", None, "tokenizer.model (required with --init).")
flags.DEFINE_string("variant", None, "For a .npz --checkpoint.")
flags.DEFINE_string("config", None, "For a .npz --checkpoint.")
flags.DEFINE_integer("image_size", None,
                     "Continue --checkpoint at this resolution (a multiple of its patch size): "
                     "the patch position embedding is resampled to the new grid, as "
                     "PaliGemma's 224 -> 448 -> 896 px stages do.")
flags.DEFINE_integer("steps", 1000, "Optimizer steps.")
flags.DEFINE_integer("batch_size", 32, "Examples per step.")
flags.DEFINE_float("lr", 1e-3, "Peak learning rate.")
flags.DEFINE_integer("warmup_steps", 100, "Linear warmup steps.")
flags.DEFINE_float("weight_decay", 1e-4, "AdamW decoupled weight decay.")
flags.DEFINE_float("clip_norm", 1.0, "Global gradient norm clip; 0 is off.")
flags.DEFINE_enum("loss_average", "example", ["example", "token"],
                  "Average the answer tokens' loss per example, then over the batch "
                  "(big_vision's), or over all answer tokens of the batch.")
flags.DEFINE_bool("freeze_vision", False, "Keep the vision tower and projector fixed.")
flags.DEFINE_bool("train_only_attention", False, "Train only the decoder's attention weights.")
flags.DEFINE_integer("max_text", 48, "Text tokens per example (prompt + answer + specials).")
flags.DEFINE_integer("save_every", 500, "Checkpoint every this many steps (and at the end).")
flags.DEFINE_integer("eval_every", 500, "Evaluate every this many steps (and at the end).")
flags.DEFINE_integer("eval_examples", 100, "Held-out examples per evaluation; 0: no evaluation.")
flags.DEFINE_integer("log_every", 20, "Progress line every this many steps.")
flags.DEFINE_integer("seed", 0, "Initialisation and data seed.")
flags.DEFINE_bool("resume", False, "Continue from the newest checkpoint in --output.")
FLAGS = flags.FLAGS

def trainable_labels(params):
  def label(path, _):
    keys = [p.key for p in path]
    if FLAGS.train_only_attention:
      return "train" if keys[:3] == ["llm", "layers", "attn"] else "freeze"
    if FLAGS.freeze_vision and keys[0] == "img":
      return "freeze"
    return "train"
  return jax.tree_util.tree_map_with_path(label, params)


def optimizer(params):
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, FLAGS.lr, min(FLAGS.warmup_steps, FLAGS.steps - 1), FLAGS.steps, end_value=FLAGS.lr * 0.01)
  decay_mask = jax.tree.map(lambda p: p.ndim > 1, params)  # no decay on norms and biases
  tx = optax.chain(
      optax.clip_by_global_norm(FLAGS.clip_norm) if FLAGS.clip_norm > 0 else optax.identity(),
      optax.adamw(schedule, b1=0.9, b2=0.999, weight_decay=FLAGS.weight_decay, mask=decay_mask))
  tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()},
                             trainable_labels(params))
  return tx, schedule


def validate_flags():
  if not FLAGS.output:
    raise UserError("--output is required")
  if (FLAGS.data is None) == (FLAGS.task is None):
    raise UserError("give exactly one of --data and --task")
  if (FLAGS.checkpoint is None) == (FLAGS.init is None):
    raise UserError("give exactly one of --checkpoint and --init")
  if FLAGS.init and not FLAGS.tokenizer:
    raise UserError("--init needs --tokenizer")
  for name in ("steps", "batch_size", "max_text", "save_every", "eval_every", "log_every"):
    if getattr(FLAGS, name) < 1:
      raise UserError(f"--{name} must be at least 1, got {getattr(FLAGS, name)}")
  if FLAGS.eval_examples < 0:
    raise UserError(f"--eval_examples must be at least 0, got {FLAGS.eval_examples}")
  if FLAGS.lr <= 0:
    raise UserError(f"--lr must be positive, got {FLAGS.lr}")
  if FLAGS.warmup_steps < 0 or FLAGS.weight_decay < 0 or FLAGS.clip_norm < 0:
    raise UserError("--warmup_steps, --weight_decay and --clip_norm must be >= 0")
  shapes_tasks()
  shapes_weights()
  if FLAGS.image_size is not None:
    if not FLAGS.checkpoint:
      raise UserError("--image_size needs --checkpoint (--init takes the variant's)")
    if FLAGS.image_size < 1:
      raise UserError(f"--image_size must be positive, got {FLAGS.image_size}")
  if FLAGS.freeze_vision and FLAGS.train_only_attention:
    raise UserError("--freeze_vision and --train_only_attention exclude each other")


def shapes_tasks() -> dict[str, float]:
  bad = UserError(f"--shapes_tasks: TASK or TASK:WEIGHT (weight > 0) among "
                  f"{','.join(shapes.TASKS)}, got {','.join(FLAGS.shapes_tasks)}")
  tasks = {}
  for item in FLAGS.shapes_tasks:
    name, _, weight = item.partition(":")
    try:
      w = float(weight) if weight else 1.0
    except ValueError:
      raise bad from None
    if name not in shapes.TASKS or name in tasks or not 0 < w < float("inf"):
      raise bad
    tasks[name] = w
  if not tasks:
    raise bad
  return tasks


def shapes_weights():
  bad = UserError("--shapes_weights: three numbers >= 0, not all zero (1-, 2-, 3-shape "
                  f"scenes), got {','.join(FLAGS.shapes_weights)}")
  try:
    w = [float(v) for v in FLAGS.shapes_weights]
  except ValueError:
    raise bad from None
  if len(w) != 3 or min(w) < 0 or sum(w) <= 0 or not all(np.isfinite(w)):
    raise bad
  return w


def latest_checkpoint(output: str):
  found = sorted(glob.glob(os.path.join(output, "checkpoint-*")))
  found = [f for f in found if os.path.isfile(os.path.join(f, "train_state.npz"))]
  return found[-1] if found else None


def save(path, cfg, params, opt_state, step, tokenizer_path):
  flat = {k: np.asarray(jax.device_get(v), np.float32) for k, v in load.flatten(params).items()}
  leaves = jax.tree.leaves(opt_state)

  def extra(tmp):
    np.savez(os.path.join(tmp, "train_state.npz"), step=np.int64(step),
             **{f"opt_{i:05d}": np.asarray(jax.device_get(x)) for i, x in enumerate(leaves)})
  hub.write(path, cfg, layout.big_vision_to_hub(cfg, flat), tokenizer_path, overwrite=True,
            extra=extra)


def restore_opt_state(path, opt_state):
  with np.load(os.path.join(path, "train_state.npz"), allow_pickle=False) as z:
    leaves, treedef = jax.tree.flatten(opt_state)
    restored = [jnp.asarray(z[f"opt_{i:05d}"], leaf.dtype) for i, leaf in enumerate(leaves)]
    return jax.tree.unflatten(treedef, restored), int(z["step"])


def progress(step, total, loss, lr, rate, t_left):
  eta = time.strftime("%H:%M:%S", time.gmtime(max(t_left, 0)))
  print(f"step {step}/{total}  loss {loss:.4f}  lr {lr:.2e}  {rate:.1f} examples/s  ETA {eta}",
        file=sys.stderr, flush=True)


def train():
  validate_flags()
  resume_from = latest_checkpoint(FLAGS.output) if FLAGS.resume else None
  if FLAGS.resume and resume_from is None:
    raise UserError(f"--resume: no checkpoint to resume in {FLAGS.output}")
  if resume_from:
    (model, params), cfg, tokenizer_path = load.load(resume_from, scan=True)
  elif FLAGS.checkpoint:
    (model, params), cfg, tokenizer_path = load.load(FLAGS.checkpoint, FLAGS.tokenizer, "float32",
                                                     FLAGS.variant, FLAGS.config, scan=True)
    if FLAGS.image_size is not None and FLAGS.image_size != cfg.vision.image_size:
      cfg, params = resolution.resize_image(cfg, params, FLAGS.image_size)
      model = PaliGemma(cfg, scan=True)
  else:
    tokenizer_path = FLAGS.tokenizer
    pieces = Tokenizer(tokenizer_path, 1 << 30).sp.GetPieceSize()
    cfg = big_vision.variant_config(FLAGS.init, pieces)
    model = PaliGemma(cfg)
  tokenizer = Tokenizer(tokenizer_path, cfg.image_token_index)
  if not (resume_from or FLAGS.checkpoint):  # from scratch (a resumed run keeps its weights)
    params = init_params(model, cfg, tokenizer)

  if FLAGS.task == "shapes":
    stream = data.shapes_examples(FLAGS.seed, FLAGS.canvas, shapes_tasks(),
                                  shapes_weights())
    held_out = list(_take(data.shapes_examples(10**6 + FLAGS.seed, FLAGS.canvas), FLAGS.eval_examples))
  else:
    examples = data.read_jsonl(FLAGS.data, FLAGS.on_bad_line)
    held_out = (data.read_jsonl(FLAGS.eval_data, FLAGS.on_bad_line)[:FLAGS.eval_examples]
                if FLAGS.eval_data else [])
    stream = _shuffled(examples, FLAGS.seed)
  for ex in held_out:
    data.encode(tokenizer, cfg, ex, FLAGS.max_text)  # fail now, not at the first evaluation

  tx, schedule = optimizer(params)
  opt_state = tx.init(params)
  step = 0
  if resume_from:
    opt_state, step = restore_opt_state(resume_from, opt_state)
    print(f"resumed from {resume_from} at step {step}", file=sys.stderr)
    for _ in range(step * FLAGS.batch_size):  # the same data order as an uninterrupted run
      next(stream)

  per_token = FLAGS.loss_average == "token"

  @jax.jit
  def train_step(params, opt_state, b):
    loss, grads = jax.value_and_grad(lambda p: loss_fn(model, p, b, per_token))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  eval_loss = jax.jit(lambda p, b: loss_fn(model, p, b, per_token))
  generator = generate.Generator(model, params)
  t_start, seen, losses = time.perf_counter(), 0, []
  batches = _prefetched(lambda: data.make_batch(
      tokenizer, cfg, list(_take(stream, FLAGS.batch_size)), FLAGS.max_text))
  while step < FLAGS.steps:
    b = next(batches)
    params, opt_state, loss = train_step(params, opt_state, vars(b))
    step += 1
    seen += FLAGS.batch_size
    losses.append(loss)
    if step % FLAGS.log_every == 0 or step == FLAGS.steps:
      elapsed = time.perf_counter() - t_start
      rate = seen / elapsed
      progress(step, FLAGS.steps, float(np.mean(jax.device_get(losses))), float(schedule(step)),
               rate, (FLAGS.steps - step) * FLAGS.batch_size / rate)
      losses = []
    if held_out and (step % FLAGS.eval_every == 0 or step == FLAGS.steps):
      generator.params = params
      report = evaluate.run(generator, tokenizer, cfg, held_out, FLAGS.max_text,
                            lambda b: float(eval_loss(params, vars(b))))
      print(f"eval step {step}: " + evaluate.format_report(report), file=sys.stderr, flush=True)
    if step % FLAGS.save_every == 0 or step == FLAGS.steps:
      path = os.path.join(FLAGS.output, f"checkpoint-{step:06d}")
      save(path, cfg, params, opt_state, step, tokenizer_path)
      print(f"saved {path}", file=sys.stderr, flush=True)


def init_params(model: PaliGemma, cfg, tokenizer: Tokenizer):
  """Random initialisation for training from scratch, with two structured
  starts that a from-scratch model would otherwise spend most of its data on:
  big_vision's 2-D sin-cos position embedding for the patches, and `<locXXXX>`
  embeddings that are sinusoids of the coordinate, so that neighbouring
  locations start similar (the output head is tied to them) instead of as
  1024 unrelated classes."""
  B, T = 1, cfg.num_image_tokens + 1
  c = cfg.text
  shape = (c.num_hidden_layers, B, T, c.num_key_value_heads, c.head_dim)
  px = jnp.zeros((B, 3, cfg.vision.image_size, cfg.vision.image_size))
  tokens = jnp.zeros((B, T), jnp.int32)
  valid = jnp.ones((B, T), bool)

  def f(m):
    x = m.embed(px, tokens)
    return m(x, jnp.zeros((B, T), jnp.int32), valid, valid, (jnp.zeros(shape), jnp.zeros(shape)))
  params = model.init(jax.random.PRNGKey(FLAGS.seed), method=f)["params"]
  # The decoder's matrices are declared as normal(0.02), a placeholder that
  # checkpoints overwrite. Trained from scratch at a small width, that makes
  # every path from an image feature to a logit a product of near-zero
  # matrices: on single-shape captions the kind stayed at chance for 300
  # steps. At std 1/sqrt(D) (so embeddings times sqrt(D) have unit variance,
  # Gemma's design) it is learned nearly as fast as by a classifier on the vision
  # tower alone (BUILD.md, "The demo model"). Norm scales are zeros: unchanged.
  params["llm"] = jax.tree.map(lambda w: w * (c.hidden_size**-0.5 / 0.02), params["llm"])
  # Gemma's norms scale by (1 + w): zero is the identity; SigLIP LayerNorms start at 1.
  side = cfg.vision.image_size // cfg.vision.patch_size
  params["img"]["pos_embedding"] = posemb_sincos_2d(side, cfg.vision.hidden_size)
  loc_ids = [tokenizer.sp.PieceToId(f"<loc{i:04d}>") for i in range(1024)]
  if all(tokenizer.sp.IdToPiece(i) == f"<loc{n:04d}>" for n, i in enumerate(loc_ids)):
    table = params["llm"]["embedder"]["input_embedding"]
    params["llm"]["embedder"]["input_embedding"] = table.at[jnp.array(loc_ids)].set(
        loc_embedding(1024, c.hidden_size, float(jnp.std(table))))
  return params


def posemb_sincos_2d(side: int, width: int, temperature: float = 10_000.0):
  """[1, side * side, width], row-major patches, as big_vision's ViT."""
  y, x = jnp.mgrid[:side, :side]
  omega = 1.0 / temperature ** (jnp.arange(width // 4) / (width // 4 - 1))
  y = y.reshape(-1)[:, None] * omega[None]
  x = x.reshape(-1)[:, None] * omega[None]
  return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)[None]


def loc_embedding(n: int, width: int, std: float):
  """[n, width]: sin and cos of the location at periods from 2n down to 8
  locations, with the per-entry spread of the other rows."""
  period = 2 * n * (8 / (2 * n)) ** (jnp.arange(width // 2) / (width // 2 - 1))
  angle = jnp.arange(n)[:, None] * (2 * jnp.pi / period)[None]
  return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=1) * (std * 2**0.5)


def _take(stream, n):
  for _ in range(n):
    yield next(stream)


def _prefetched(make, depth: int = 2):
  """make() called on a thread, `depth` ahead: drawing and preprocessing the
  next batch overlaps the train step (XLA releases the GIL)."""
  q = queue.Queue(depth)

  def work():
    while True:
      try:
        q.put(make())
      except Exception as e:  # pylint: disable=broad-except  # re-raised on the main thread
        q.put(e)
        return
  threading.Thread(target=work, daemon=True).start()
  while True:
    item = q.get()
    if isinstance(item, Exception):
      raise item
    yield item


def _shuffled(examples, seed):
  rng = np.random.default_rng(seed)
  while True:
    for i in rng.permutation(len(examples)):
      yield examples[i]


if __name__ == "__main__":
  heap.keep_freed_memory()
  xla_cache.persist_compilations()
  app.run(errors.main(train))
