"""python -m paligemma_torch.inference --checkpoint=DIR --image=PATH --prompt=TEXT

Flags and output: paligemma/cli.py, shared with paligemma_jax.inference.
"""

from absl import app
import torch

from paligemma import cli
from paligemma_torch import generate, load


def _generate(model, pixels, tokens, valid, r: cli.Request):
  return generate.generate(model, torch.from_numpy(pixels), tokens, valid,
                           max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                           top_k=r.top_k, top_p=r.top_p, seed=r.seed)


if __name__ == "__main__":
  cli.define_flags()
  app.run(cli.main(cli.Backend(load=load.load, generate=_generate)))
