"""One implementation's measurements, in its own process (see decode.py).

python -m benchmarks.worker --impl=jax|torch|transformers --checkpoint=DIR
    --dtype=float32 --batch_sizes=1,8 --new_tokens=128 --repeats=3

Prints one JSON object on stdout. <eos> is disabled so every run decodes
exactly --new_tokens tokens.
"""

import dataclasses
import json
import statistics
import sys
import time

from absl import app, flags, logging
import numpy as np

from benchmarks import bandwidth
from paligemma import batch, image as image_lib
from paligemma.cli import DEMO_IMAGE
from paligemma.tokenizer import Tokenizer

flags.DEFINE_enum("impl", "jax", ["jax", "torch", "transformers"], "Implementation.")
flags.DEFINE_string("checkpoint", None, "Hub checkpoint directory.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weights and activations.")
flags.DEFINE_list("batch_sizes", ["1", "8"], "Decode batch sizes.")
flags.DEFINE_integer("new_tokens", 128, "Tokens decoded per run.")
flags.DEFINE_integer("repeats", 3, "Timed runs per figure (median).")
flags.DEFINE_enum("device", "cpu", ["cpu", "gpu"], "Where torch runs (JAX: its default backend, checked).")
flags.DEFINE_float("bandwidth_gib", 2.0, "Buffer streamed before and after each timed decode.")
FLAGS = flags.FLAGS


class Figures(dict):
  """The results; each figure is also written to stderr as soon as it is
  measured, so a run cut short still tells what it reached."""

  def __setitem__(self, key, value):
    super().__setitem__(key, value)
    print(f"{key} = {value}", file=sys.stderr, flush=True)


def rss_gb() -> float:
  """Peak RSS of this process (VmHWM: unlike ru_maxrss, not inherited from the parent)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 2**20
  return float("nan")


def median_time(fn, repeats):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


class Paired:
  """Times runs of a decode between two stretches (about a second each) of
  streaming reads in the worker's own framework: the bandwidth of that
  moment. On a shared machine it moves by a third within a minute, and a
  single best read set beside a run of another moment says little."""

  def __init__(self, read_and_bytes):
    self.read, self.nbytes = read_and_bytes
    self.read()  # warm-up (a first call compiles or allocates)

  def __call__(self, out, B, run):
    """Sets bandwidth_gb_s_b{B}_runs (each run's mean of the rates before
    and after it); -> run()'s results."""
    bws, results = [], []
    before = bandwidth.mean_gb_s(self.read, self.nbytes)
    for _ in range(FLAGS.repeats):
      results.append(run())
      after = bandwidth.mean_gb_s(self.read, self.nbytes)
      bws.append((before + after) / 2)
      before = after
    out[f"bandwidth_gb_s_b{B}_runs"] = bws
    return results


def inputs(cfg, tokenizer, B, prompt="caption en"):
  image = image_lib.preprocess(image_lib.load(DEMO_IMAGE), cfg.vision.image_size)
  pixels = np.stack([image] * B)
  tokens, valid = batch.left_pad([tokenizer.prefix(prompt, cfg.num_image_tokens)] * B,
                                 tokenizer.pad_id)
  return pixels, tokens, valid


def bench_jax(out):
  import jax  # pylint: disable=import-outside-toplevel
  from paligemma_jax import decode_kernel, generate, load  # pylint: disable=import-outside-toplevel
  from paligemma_jax.paligemma import PaliGemma  # pylint: disable=import-outside-toplevel
  if (jax.default_backend() == "gpu") != (FLAGS.device == "gpu"):
    raise SystemExit(f"--device={FLAGS.device} but JAX's backend is {jax.default_backend()}")
  if FLAGS.device == "cpu":  # which build of the decode kernel the figures are of
    out["cpu_kernel"] = decode_kernel.build_name()
  t0 = time.perf_counter()
  (model, params), cfg, tok_path = load.load(FLAGS.checkpoint, dtype=FLAGS.dtype)
  jax.block_until_ready(params)
  out["load_s"], out["load_peak_rss_gb"] = time.perf_counter() - t0, rss_gb()
  cfg = dataclasses.replace(cfg, eos_token_id=-1)
  gen = generate.Generator(PaliGemma(cfg, scan=model.scan), params)
  tok = Tokenizer(tok_path, cfg.image_token_index)
  n = FLAGS.new_tokens
  paired = Paired(bandwidth.xla_read(FLAGS.bandwidth_gib))

  def prefill(p, t, v):
    return jax.block_until_ready(gen.prefill(p, t, v, max_new_tokens=n))

  def decode(state, k=n):
    return jax.block_until_ready(gen.decode(state, max_new_tokens=k))

  p, t, v = inputs(cfg, tok, 1)
  t0 = time.perf_counter()
  state = prefill(p, t, v)
  first_prefill = time.perf_counter() - t0
  out["prefill_s"] = median_time(lambda: prefill(p, t, v), FLAGS.repeats)
  out["compile_prefill_s"] = first_prefill - out["prefill_s"]
  for B in map(int, FLAGS.batch_sizes):
    if B != 1:  # one prefill per batch size; each timed decode starts from a copy of it
      state = prefill(*inputs(cfg, tok, B))
    # max_new_tokens is traced: one step compiles the loop for every length.
    first_decode = _timed(lambda s: decode(s, 2), _copy(state))
    runs = [B * (n - 1) / dt for dt in paired(out, B, lambda: _timed(decode, _copy(state)))]
    out[f"decode_tok_s_b{B}_runs"] = runs
    out[f"decode_tok_s_b{B}"] = statistics.median(runs)
    dt = B * (n - 1) / out[f"decode_tok_s_b{B}"]
    if B == 1:
      out["compile_decode_s"] = first_decode - dt / (n - 1)
  traces = dict(gen.traces)
  p, t, v = inputs(cfg, tok, 1, prompt="answer en what color is the circle")
  shortest = generate.round_up(n, generate.STEPS_BUCKET) - generate.STEPS_BUCKET + 1
  gen.generate(p, t, v, max_new_tokens=shortest)  # the smallest length of n's cache bucket
  out["recompiles_for_new_prompt_and_length"] = sum(gen.traces.values()) - sum(traces.values())


def _copy(state):
  import jax  # pylint: disable=import-outside-toplevel
  return jax.block_until_ready(jax.tree.map(lambda x: x.copy(), state))


def _timed(fn, arg):
  t0 = time.perf_counter()
  fn(arg)
  return time.perf_counter() - t0


def bench_torch(out, reference: bool):
  import torch  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  device = "cuda" if FLAGS.device == "gpu" else "cpu"
  if reference:
    from paligemma_torch import generate, load  # pylint: disable=import-outside-toplevel
    model, cfg, tok_path = load.load(FLAGS.checkpoint, dtype=FLAGS.dtype)
    model = model.to(device)
    model.cfg = dataclasses.replace(cfg, eos_token_id=-1)
    run = lambda p, t, v, k: generate.generate(model, p, t, v, max_new_tokens=k)
  else:
    import transformers  # pylint: disable=import-outside-toplevel
    from paligemma import config as config_lib  # pylint: disable=import-outside-toplevel
    dtype = torch.float32 if FLAGS.dtype == "float32" else torch.bfloat16
    model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(
        FLAGS.checkpoint, dtype=dtype).eval().to(device)
    cfg, tok_path = config_lib.load(FLAGS.checkpoint), FLAGS.checkpoint + "/tokenizer.model"

    def run(p, t, v, k):
      on = lambda a, dt: torch.from_numpy(a).to(device=device, dtype=dt)
      with torch.no_grad():
        return model.generate(input_ids=on(t, torch.long), pixel_values=on(p, dtype),
                              attention_mask=on(v, torch.long),
                              token_type_ids=torch.zeros(t.shape, dtype=torch.long, device=device),
                              max_new_tokens=k, min_new_tokens=k, do_sample=False)
  out["load_s"], out["load_peak_rss_gb"] = time.perf_counter() - t0, rss_gb()
  tok = Tokenizer(tok_path, cfg.image_token_index)
  n = FLAGS.new_tokens
  # One forward per token: the first (image + prompt) ends the prefill, the
  # rest are decode steps, timed from the hook's stamps within one run.
  stamps = []

  def stamp(*_):  # returns None: a forward hook's return value would replace the output
    if FLAGS.device == "gpu":
      torch.cuda.synchronize()
    stamps.append(time.perf_counter())
  model.register_forward_hook(stamp)

  def timed_run(B):
    p, t, v = inputs(cfg, tok, B)
    stamps.clear()
    t0 = time.perf_counter()
    run(p, t, v, n)
    return stamps[0] - t0, B * (len(stamps) - 1) / (stamps[-1] - stamps[0])

  run(*inputs(cfg, tok, 1), 2)  # warm-up
  paired = Paired(bandwidth.torch_read(FLAGS.bandwidth_gib, FLAGS.device))
  for B in map(int, FLAGS.batch_sizes):
    runs = paired(out, B, lambda: timed_run(B))  # pylint: disable=cell-var-from-loop
    if B == 1:
      out["prefill_s"] = statistics.median(r[0] for r in runs)
    out[f"decode_tok_s_b{B}_runs"] = [r[1] for r in runs]
    out[f"decode_tok_s_b{B}"] = statistics.median(r[1] for r in runs)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  out = Figures(impl=FLAGS.impl, dtype=FLAGS.dtype, device=FLAGS.device,
                bandwidth_read="xla_matvec" if FLAGS.impl == "jax" else "torch_sum")
  if FLAGS.impl == "jax":
    bench_jax(out)
  else:
    bench_torch(out, reference=FLAGS.impl == "torch")
  out["peak_rss_gb"] = rss_gb()
  print(json.dumps(out))
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
