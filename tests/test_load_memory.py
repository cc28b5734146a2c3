"""Loading holds the weights once: the JAX loader's peak RSS over its
process's footprint before loading stays near the bytes of the weights it
returns (the issue's bound is 1.25x; 3B bf16 loaded at 1.04x, BUILD.md)."""

import json
import os
import subprocess
import sys

import pytest

from tests import helpers

_PROBE = """
import json, sys
import jax
from paligemma_jax import load

def status(field):
  for line in open("/proc/self/status"):
    if line.startswith(field + ":"):
      return int(line.split()[1]) * 1024

before = status("VmRSS")
(_, params), _, _ = load.load(sys.argv[1], dtype=sys.argv[2])
jax.block_until_ready(params)
print(json.dumps({"peak": status("VmHWM") - before,
                  "weights": sum(x.nbytes for x in jax.tree.leaves(params))}))
"""


@pytest.fixture(scope="module")
def wide_bf16(tmp_path_factory):
  """~150 MB of bf16 decoder weights in 12 layers: a stacked tensor's pages
  left mapped (or a copy of each tensor) would show."""
  cfg = helpers.tiny_config(hidden_size=256, intermediate_size=8192, num_hidden_layers=12,
                            num_attention_heads=8, head_dim=32)
  path = str(tmp_path_factory.mktemp("wide"))
  return helpers.write_checkpoint(path, cfg, helpers.random_weights(cfg), dtype="bfloat16")


def test_load_peak_rss_near_the_weights(wide_bf16):
  """bf16, the dtype that was copied (float32 takes the same path: 1.05x)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root)
  out = subprocess.run([sys.executable, "-c", _PROBE, wide_bf16, "bfloat16"], env=env, cwd=root,
                       capture_output=True, text=True, check=True)
  got = json.loads(out.stdout.strip().splitlines()[-1])
  assert got["weights"] > 100e6
  assert got["peak"] <= 1.15 * got["weights"], got  # was 1.84x (bf16) before
