"""python -m benchmarks.decode --checkpoint=DIR [--dtype=float32] [--impls=jax,torch,transformers]

Puts JAX, the PyTorch reference and transformers side by side on the same
weights, each in its own process, against the memory-bandwidth roofline:
a decode step must read every decoder weight (and the tied output head)
once plus the KV cache in use, so tokens/s <= B * bandwidth / bytes per step.
Bandwidth is measured in this run by streaming reads far larger than the
caches (an XLA matrix-vector product and a torch reduction, the fastest
counts), and again inside each worker around each timed decode (its own
framework's read, about a second before and after), for a second fraction
that pairs each run with the bandwidth of its moment. Prints a table and
writes it as JSON.
"""

import json
import os
import subprocess
import sys

from absl import app, flags
import numpy as np

from convert import hub
from paligemma import config as config_lib
from paligemma import errors
from paligemma.errors import UserError

flags.DEFINE_string("checkpoint", None, "Hub checkpoint directory (see convert.random_checkpoint).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weights and activations.")
flags.DEFINE_list("impls", ["jax", "torch", "transformers"], "Implementations to run.")
flags.DEFINE_list("batch_sizes", ["1", "8"], "Decode batch sizes.")
flags.DEFINE_integer("new_tokens", 128, "Tokens decoded per run.")
flags.DEFINE_integer("repeats", 3, "Timed runs per figure (median).")
flags.DEFINE_float("bandwidth_gib", None,
                   "Buffer streamed for the roofline; default 2 GiB (CPU), 4 GiB (GPU).")
flags.DEFINE_string("json", "benchmark.json", "Where to write the results.")
flags.DEFINE_enum("device", "cpu", ["cpu", "gpu"],
                  "gpu: every implementation on the GPU, bandwidth of its memory.")
FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bandwidths(device: str, gib: float) -> dict:
  """Each way of streaming that is installed, each in its own process (JAX
  keeps the memory it took; a GPU's is the GPU's memory)."""
  ways = {"xla_matvec": f"xla_gb_s({gib})"}
  if device == "cpu":
    ways["torch_sum"] = f"torch_gb_s({gib})"
  found = {}
  for name, call in ways.items():
    p = subprocess.run([sys.executable, "-c", f"from benchmarks import bandwidth; print(bandwidth.{call})"],
                       capture_output=True, text=True, cwd=ROOT,
                       env=os.environ if device == "gpu" else dict(os.environ, JAX_PLATFORMS="cpu"))
    if p.returncode == 0:
      found[name] = float(p.stdout.split()[-1])
  if not found:
    raise UserError("could not measure the memory bandwidth (neither jax nor torch runs)")
  return found


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                  "unknown CPU")
  except OSError:
    return "unknown CPU"


def bytes_per_step(cfg, itemsize: int, B: int, cache_len: int) -> dict:
  decoder = sum(int(np.prod(s)) for n, s in hub.shapes(cfg).items() if n.startswith(hub.TEXT))
  t = cfg.text
  kv = 2 * t.num_hidden_layers * B * cache_len * t.num_key_value_heads * t.head_dim
  return {"weights": decoder * itemsize, "kv_cache": kv * itemsize}


def main():
  try:
    sizes = [int(b) for b in FLAGS.batch_sizes]
  except ValueError:
    sizes = []
  if not sizes or min(sizes) < 1 or 1 not in sizes:
    raise UserError("--batch_sizes: positive integers, 1 among them (prefill is timed at batch 1), "
                    f"got {','.join(FLAGS.batch_sizes)}")
  cfg = config_lib.load(FLAGS.checkpoint)
  itemsize = 4 if FLAGS.dtype == "float32" else 2
  gib = FLAGS.bandwidth_gib
  if gib is None:
    gib = 4.0 if FLAGS.device == "gpu" else 2.0
  if gib <= 0:
    raise UserError(f"--bandwidth_gib must be positive, got {gib}")
  before = bandwidths(FLAGS.device, gib)
  prompt_len = cfg.num_image_tokens + 8
  rows = []
  for impl in FLAGS.impls:
    p = subprocess.run([sys.executable, "-m", "benchmarks.worker", f"--impl={impl}",
                        f"--checkpoint={FLAGS.checkpoint}", f"--dtype={FLAGS.dtype}",
                        f"--batch_sizes={','.join(FLAGS.batch_sizes)}",
                        f"--new_tokens={FLAGS.new_tokens}", f"--repeats={FLAGS.repeats}",
                        f"--device={FLAGS.device}", f"--bandwidth_gib={gib}"],
                       stdout=subprocess.PIPE, text=True, cwd=ROOT)  # its figures go to stderr as measured
    if p.returncode:
      print(f"{impl}: failed (exit {p.returncode}; its stderr is above)", file=sys.stderr)
      continue
    rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
  # Measured again after the runs: this machine's streaming reads vary from
  # run to run (17-28 GB/s seen), and the roof is the best read seen.
  after = bandwidths(FLAGS.device, gib)
  by_way = {k: max(before.get(k, 0.0), after.get(k, 0.0)) for k in {**before, **after}}
  bw = max(by_way.values())
  result = {"checkpoint": FLAGS.checkpoint, "dtype": FLAGS.dtype, "bandwidth_gb_s": bw,
            "bandwidth_by_way_gb_s": by_way,
            "machine": f"{os.cpu_count()} cores, {_cpu_name()}", "device": FLAGS.device, "rows": rows,
            "roofline": {}}
  for B in sizes:
    b = bytes_per_step(cfg, itemsize, B, prompt_len + FLAGS.new_tokens // 2)
    step_bytes = b["weights"] + b["kv_cache"]
    result["roofline"][f"b{B}"] = dict(b, tok_s=B * bw * 1e9 / step_bytes)
  ways = ", ".join(f"{k} {v:.1f}" for k, v in by_way.items())
  print(f"bandwidth {bw:.1f} GB/s ({ways}); decoder + head bytes per step "
        f"{result['roofline']['b1']['weights'] / 1e9:.2f} GB ({FLAGS.dtype})")
  head = f"{'impl':<13}{'load s':>8}{'RSS GB':>8}{'compile s':>11}{'prefill s':>11}"
  for B in FLAGS.batch_sizes:
    head += f"{'tok/s b' + B:>11}{'roof b' + B:>9}{'paired b' + B:>11}"
  print(head)
  for r in rows:
    line = (f"{r['impl']:<13}{r['load_s']:>8.1f}{r['load_peak_rss_gb']:>8.2f}"
            f"{r.get('compile_prefill_s', 0) + r.get('compile_decode_s', 0):>11.1f}{r['prefill_s']:>11.3f}")
    for B in FLAGS.batch_sizes:
      tok_s = r[f"decode_tok_s_b{B}"]
      roof = result["roofline"][f"b{B}"]
      r[f"roofline_fraction_b{B}"] = tok_s / roof["tok_s"]
      # Each run against the reads around it: tok/s over B * GB/s / bytes.
      step_gb = (roof["weights"] + roof["kv_cache"]) / 1e9
      r[f"roofline_fraction_paired_b{B}"] = float(np.median(
          [t * step_gb / (int(B) * g) for t, g in zip(r[f"decode_tok_s_b{B}_runs"],
                                                       r[f"bandwidth_gb_s_b{B}_runs"])]))
      line += (f"{tok_s:>11.1f}{r[f'roofline_fraction_b{B}']:>9.0%}"
               f"{r[f'roofline_fraction_paired_b{B}']:>11.0%}")
    print(line)
  for B in FLAGS.batch_sizes:
    print(f"roofline b{B}: {result['roofline'][f'b{B}']['tok_s']:.1f} tok/s")
  print("paired: each run's tok/s against the roofline of the streaming its worker measured "
        "around it (jax: xla_matvec, torch and transformers: torch_sum; ~1 s before and after), "
        "median")
  print(f"machine: {result['machine']}" + "".join(
      f"; JAX CPU decode kernel: {r['cpu_kernel']}" for r in rows if "cpu_kernel" in r))
  with open(FLAGS.json, "w") as f:
    json.dump(result, f, indent=2)


if __name__ == "__main__":
  app.run(errors.main(main))
