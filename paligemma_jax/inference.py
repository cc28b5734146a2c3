"""python -m paligemma_jax.inference --checkpoint=DIR --image=PATH --prompt=TEXT

The same flags and output as paligemma_torch.inference (paligemma/cli.py);
runs with torch not installed.
"""

import os

from absl import app
import jax

from paligemma import cli
from paligemma_jax import generate, load


def _load(*args):
  (model, params), cfg, tokenizer_path = load.load(*args)
  jax.block_until_ready(params)
  return generate.Generator(model, params), cfg, tokenizer_path


def _generate(generator: generate.Generator, pixels, tokens, valid, r: cli.Request):
  return generator.generate(pixels, tokens, valid, max_new_tokens=r.max_new_tokens,
                            temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                            seed=r.seed)


if __name__ == "__main__":
  # Compiled prefill and decode persist across runs: the second run of the
  # same model and bucket starts generating at once.
  jax.config.update("jax_compilation_cache_dir",
                    os.environ.get("PALIGEMMA_JAX_CACHE", os.path.expanduser("~/.cache/paligemma/jax")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  cli.define_flags()
  app.run(cli.main(cli.Backend(load=_load, generate=_generate)))
