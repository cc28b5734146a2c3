"""The inference binaries as a user runs them: output contract and bad input."""

import json

import numpy as np
from PIL import Image
import pytest

from paligemma import cli, shapes
from tests.binaries import run, run_code, run_each

BINARIES = ["paligemma_torch.inference", "paligemma_jax.inference"]
# paligemma/demo/example.png is this scene: the first from seed 3000000 on
# with three shapes of three kinds whose centres are >= 20% of the canvas
# apart (README). hard_example.png, seed 3000006, is one the model misorders.
EXAMPLE_SEED = 3000055


@pytest.mark.parametrize("module", BINARIES)
def test_batch_and_json(module, ckpt2, images):
  rc, out, err = run(module, f"--checkpoint={ckpt2}", f"--image={images[0]}",
                     f"--image={images[1]}", "--prompt=caption en", "--prompt=detect cat",
                     "--max_new_tokens=6", "--json")
  assert rc == 0, err
  lines = [json.loads(l) for l in out.splitlines()]
  assert [(l["image"], l["prompt"]) for l in lines] == [(images[0], "caption en"),
                                                         (images[1], "detect cat")]
  assert all(len(l["token_ids"]) <= 6 and isinstance(l["text"], str) for l in lines)
  # Broadcast: one image, two prompts; plain text output is one line per pair.
  rc, out2, err = run(module, f"--checkpoint={ckpt2}", f"--image={images[0]}",
                      "--prompt=caption en", "--prompt=detect cat", "--max_new_tokens=6")
  assert rc == 0, err
  assert out2.splitlines()[0] == lines[0]["text"]
  assert len(out2.splitlines()) == 2


@pytest.mark.parametrize("module", BINARIES)
def test_bad_input(module, ckpt1, images, tmp_path):
  junk = tmp_path / "junk.jpg"
  junk.write_text("not an image")
  base = [f"--checkpoint={ckpt1}", f"--image={images[0]}", "--prompt=caption en"]
  cases = [
      ([f"--checkpoint={tmp_path}/nope", f"--image={images[0]}", "--prompt=x"], "checkpoint directory not found"),
      ([*base[:1], f"--image={tmp_path}/none.png", "--prompt=x"], "image not found"),
      ([*base[:1], f"--image={junk}", "--prompt=x"], "not a readable image"),
      ([*base[:1], f"--image={images[0]}", f"--image={images[1]}", f"--image={images[2]}",
        "--prompt=a", "--prompt=b"], "3 --image and 2 --prompt"),
      ([*base, "--top_p=0"], "--top_p must be in (0, 1]"),
      ([*base, "--top_p=1.5"], "--top_p must be in (0, 1]"),
      ([*base, "--temperature=-1"], "--temperature must be >= 0"),
      ([*base, "--top_k=-2"], "--top_k must be >= 0"),
      ([*base, "--max_new_tokens=0"], "--max_new_tokens must be at least 1"),
      ([*base, "--max_new_tokens=9000"], "exceeds max_position_embeddings"),
      ([*base, f"--tokenizer={tmp_path}/none.model"], "tokenizer not found"),
      ([*base, f"--draw={tmp_path}/no/such/dir/out.png"], "--draw: directory not found"),
  ]
  if module != BINARIES[0]:  # the flow is shared (paligemma/cli.py): a sample suffices
    cases = cases[:3] + cases[4:5]
  for (args, msg), (rc, out, err) in zip(cases, run_each([[module, *a] for a, _ in cases])):
    assert rc != 0, args
    assert out == "", args
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and msg in last, (args, err)


BLOCK = {"paligemma_jax.inference": ["torch", "transformers"],
         "paligemma_torch.inference": ["jax", "jaxlib", "flax", "optax", "transformers"]}


@pytest.mark.parametrize("module", BINARIES)
def test_runs_without_the_other_framework(module, ckpt1, images):
  """Each side imports and runs with the other framework absent."""
  code = ("import sys, runpy\n"
          f"for m in {BLOCK[module]!r}: sys.modules[m] = None\n"
          f"sys.argv = ['x', '--checkpoint={ckpt1}', '--image={images[0]}', '--prompt=caption en',"
          " '--max_new_tokens=3']\n"
          f"runpy.run_module({module!r}, run_name='__main__')\n")
  rc, out, err = run_code(code, timeout=300)
  assert rc == 0, err
  assert len(out.splitlines()) == 1


def test_demo_defaults_agree():
  """No flags: the bundled demo model on the bundled image, 'caption en',
  and the right caption from both binaries (the README's first command)."""
  image, truth = shapes.scene(np.random.default_rng(EXAMPLE_SEED), 224)
  bundled = Image.open(cli.DEMO_IMAGE).convert("RGB")
  assert np.array_equal(np.asarray(bundled), np.asarray(image)), "example.png is not its seed's scene"
  outs = []
  for module in BINARIES:
    rc, out, err = run(module, "--json")
    assert rc == 0, err
    (line,) = out.splitlines()
    outs.append(json.loads(line))
  assert outs[0]["prompt"] == "caption en" and outs[0]["image"].endswith("example.png")
  assert outs[0]["token_ids"] == outs[1]["token_ids"]
  assert outs[0]["text"] == shapes.caption(truth) == "a red circle, a green square and a yellow triangle"


def test_detection_json_and_draw(tmp_path):
  rc, out, err = run("paligemma_torch.inference", "--prompt=detect circle", "--json",
                     f"--draw={tmp_path}/boxes.png")
  assert rc == 0, err
  result = json.loads(out)
  if "<loc" in result["text"]:
    assert result["boxes"] or result["unparsed"]
  assert (tmp_path / "boxes.png").is_file()
