"""python -m paligemma_jax.inference --checkpoint=DIR --image=PATH --prompt=TEXT

The same flags and output as paligemma_torch.inference (paligemma/cli.py);
runs with torch not installed.
"""

from absl import app
import jax

from paligemma import cli
from paligemma_jax import generate, load, xla_cache


def _load(*args):
  (model, params), cfg, tokenizer_path = load.load(*args)
  jax.block_until_ready(params)
  return generate.Generator(model, params), cfg, tokenizer_path


def _generate(generator: generate.Generator, pixels, tokens, valid, r: cli.Request):
  return generator.generate(pixels, tokens, valid, max_new_tokens=r.max_new_tokens,
                            temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                            seed=r.seed)


if __name__ == "__main__":
  xla_cache.persist_compilations()
  cli.define_flags()
  app.run(cli.main(cli.Backend(load=_load, generate=_generate)))
