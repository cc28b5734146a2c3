"""The CPU decode kernel (paligemma_jax/decode_kernel.cc): builds here,
multiplies exactly (float32 accumulation, any shape: tails of D, of the
rows of x and w, several tiles and threads), gathers bf16 rows exactly, is
what a compiled decode step calls, and leaves greedy generations unchanged."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from paligemma import batch, cli, image as image_lib
from paligemma.tokenizer import Tokenizer
from paligemma_jax import decode_kernel, generate, load
from paligemma_jax.paligemma import PaliGemma

pytestmark = pytest.mark.skipif(
    not decode_kernel._cpu_has_avx2_fma()  # pylint: disable=protected-access
    or jax.default_backend() != "cpu", reason="the kernel is for x86 CPUs with AVX2 and FMA")


@pytest.fixture(autouse=True)
def _registered():
  """`product` and `gather` call handlers that `available()` registers: each
  test must also pass alone (they failed under pytest-xdist, where another
  process had run `test_builds_and_registers`)."""
  decode_kernel.available()


def test_builds_and_registers():
  # A machine that can build it must: a broken build would otherwise only
  # show as slower decoding (the fallback is XLA's dot).
  assert decode_kernel.available()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "bfloat16 x and w"])
@pytest.mark.parametrize("m,r,d", [(1, 37, 24), (1, 5, 4100), (2, 9, 1003), (3, 2000, 256),
                                   (5, 7, 2048), (8, 13, 1003), (11, 3, 520), (13, 5, 1003),
                                   (16, 70, 96), (2, 21, 9000),
                                   (8, 5, 33000),  # rows over 64 KB, as the 28B down projection's
                                   (83, 19, 1003)])  # a bf16 prefill's rows (several passes of 8)
def test_product_matches_float64(dtype, m, r, d):
  rng = np.random.default_rng(m * 1000 + d)
  x = rng.standard_normal((m, d)).astype(np.float32)
  w = rng.standard_normal((r, d)).astype(np.float32)
  if dtype != "float32":
    w = w.astype(ml_dtypes.bfloat16)
  if dtype == "bfloat16 x and w":  # a bf16 model's activations: vdpbf16ps where the CPU has it
    x = x.astype(ml_dtypes.bfloat16)
  got = np.asarray(jax.jit(decode_kernel.product)(jnp.asarray(x), jnp.asarray(w)))
  _assert_float32_sums(got, x, w)


def _assert_float32_sums(got, x, w):
  """got is x @ w.T to float32 accumulation of d products: a few ulps of
  the sum of magnitudes, against float64."""
  x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
  want = x64 @ w64.T
  bound = 4 * np.finfo(np.float32).eps * np.sqrt(x64.shape[1]) * (np.abs(x64) @ np.abs(w64).T)
  assert got.shape == want.shape and got.dtype == np.float32
  assert (np.abs(got - want) <= bound).all(), np.abs(got - want).max()


def test_product_in_parts(monkeypatch):
  # An x larger than X_BYTES is multiplied in parts (here 3 of 32, 32, 19 rows).
  monkeypatch.setattr(decode_kernel, "X_BYTES", 32 * 1003 * 2)
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((83, 1003)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((19, 1003)), jnp.bfloat16)
  product = jax.jit(lambda x, w: decode_kernel.product(x, w))  # a trace of its own
  assert product.lower(x, w).as_text().count("custom_call @paligemma_rows") == 3
  _assert_float32_sums(np.asarray(product(x, w)), x, w)


def test_gather_is_indexing():
  table = jnp.asarray(np.random.default_rng(0).standard_normal((50, 24)), jnp.bfloat16)
  ids = jnp.asarray([[3, 0, 49], [7, 7, 12]])
  np.testing.assert_array_equal(np.asarray(jax.jit(decode_kernel.gather)(table, ids)),
                                np.asarray(table[ids]))


@pytest.fixture(scope="module")
def demo():
  loaded = {dtype: load.load(cli.DEMO_DIR, dtype=dtype) for dtype in ("float32", "bfloat16")}
  models = {dtype: model for dtype, (model, _, _) in loaded.items()}
  _, cfg, tok_path = loaded["float32"]
  tok = Tokenizer(tok_path, cfg.image_token_index)
  pixels = image_lib.preprocess(image_lib.load(cli.DEMO_IMAGE), cfg.vision.image_size)
  prompts = ["caption en", "answer en how many shapes are there", "detect square"]
  tokens, valid = batch.left_pad([tok.prefix(p, cfg.num_image_tokens) for p in prompts], tok.pad_id)
  return models, np.stack([pixels] * len(prompts)), tokens, valid


@pytest.mark.parametrize("dtype,rows,calls", [("float32", 1, False), ("float32", 3, True),
                                              ("bfloat16", 1, True), ("bfloat16", 3, True)])
def test_decode_step_calls_the_kernel(demo, dtype, rows, calls):
  models, pixels, tokens, valid = demo
  gen = generate.Generator(*models[dtype])
  args = gen.pad_to_bucket(tokens[:rows], valid[:rows])
  state = jax.eval_shape(lambda: gen._prefill_fn(  # pylint: disable=protected-access
      gen.params, pixels[:rows], *args, 64, generate.sampling.Params.make(), np.uint32(0)))
  hlo = gen._decode.lower(gen.params, state, np.int32(4),  # pylint: disable=protected-access
                          generate.sampling.Params.make()).as_text()
  assert ("paligemma_rows" in hlo) == calls
  assert ("paligemma_gather16" in hlo) == (dtype == "bfloat16")
  # A bf16 model's activations are bf16: they take the dot where it is built.
  assert ("paligemma_rows_bf16_dot" in hlo) == (dtype == "bfloat16" and decode_kernel.uses_bf16_dot())


def _kernel_rows(hlo):
  """{(target, rows of x)} of the kernel's calls in a lowered program."""
  return set(re.findall(r"custom_call @(paligemma_rows\w*)\(.*?\).*?: \(tensor<(\d+)x", hlo))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prefill_takes_only_the_bf16_dot(demo, dtype):
  # A prefill's rows (here 3 x 68) stay with XLA's GEMM, but for a bf16
  # model where the CPU has the bf16 dot (XLA widens bf16 to float32 first).
  # The head, on the last position only, is a decode step's few rows.
  models, pixels, tokens, valid = demo
  B = len(tokens)
  gen = generate.Generator(*models[dtype])
  hlo = gen._prefill.lower(gen.params, pixels, *gen.pad_to_bucket(tokens, valid),  # pylint: disable=protected-access
                           steps_room=64, sp=generate.sampling.Params.make(),
                           seed=np.uint32(0)).as_text()
  calls = _kernel_rows(hlo)
  assert any(int(rows) == B for _, rows in calls), calls  # the head
  many = {target for target, rows in calls if int(rows) > decode_kernel.MAX_ROWS}
  assert many == ({"paligemma_rows_bf16_dot"} if dtype == "bfloat16"
                  and decode_kernel.uses_bf16_dot() else set()), calls


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prefill_as_exact_without_it(demo, dtype, monkeypatch):
  models, pixels, tokens, valid = demo
  B, T = tokens.shape
  positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)

  def prefill(dtype):  # traced anew each call: the kernel is chosen at trace time
    model, params = models[dtype]
    c = model.cfg.text
    cache = tuple(jnp.zeros((c.num_hidden_layers, B, T, c.num_key_value_heads, c.head_dim),
                            dtype) for _ in range(2))

    @jax.jit
    def run(params):
      x = model.apply({"params": params}, pixels, tokens, method=PaliGemma.embed)
      return model.apply({"params": params}, x, positions, valid, valid, cache, 0)[0]
    return np.asarray(run(params), np.float32)[valid]
  with_kernel = prefill(dtype)
  monkeypatch.setattr(decode_kernel, "available", lambda: False)
  without = prefill(dtype)
  if dtype == "float32":  # a prefill's rows (the head here on every position) stay with XLA
    np.testing.assert_array_equal(with_kernel, without)
    return
  # bf16 rounds every layer's output, so the two part by an ulp here and
  # there (0.25 at logits of 17-22); each is held against the float32
  # model: the dot as close to it as XLA's widened products (mean 0.0346
  # against 0.0341 seen, max 0.24 against 0.23).
  exact = prefill("float32")
  err, err_xla = np.abs(with_kernel - exact), np.abs(without - exact)
  assert err.mean() <= 1.1 * err_xla.mean(), (err.mean(), err_xla.mean())
  assert err.max() <= 2e-2 * np.abs(exact).max(), err.max()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_step_same_logits_without_it(demo, dtype, monkeypatch):
  models, _, tokens, _ = demo
  model, params = models[dtype]
  c = model.cfg.text
  B, S = 3, 40
  rng = np.random.default_rng(0)
  cache = tuple(jnp.asarray(rng.standard_normal((c.num_hidden_layers, B, S, c.num_key_value_heads,
                                                 c.head_dim)), dtype) for _ in range(2))
  valid = np.broadcast_to(np.arange(S) <= 30, (B, S))

  def step():  # traced anew each call: the kernel is chosen at trace time
    @jax.jit
    def run(params):
      x = model.apply({"params": params}, None, tokens[:, -1:], method=PaliGemma.embed)
      return model.apply({"params": params}, x, np.full((B, 1), 30), valid, valid, cache, 30)[0]
    return np.asarray(run(params), np.float32)
  with_kernel = step()
  monkeypatch.setattr(decode_kernel, "available", lambda: False)
  without = step()
  scale = np.abs(without).max()
  # float32: summation order only (4.8e-7 seen). bfloat16: that, then each
  # product rounded to bf16 (2^-8 relative), through 4 layers (4.8e-3 seen).
  tol = 1e-5 if dtype == "float32" else 1e-2
  np.testing.assert_allclose(with_kernel, without, rtol=0, atol=tol * scale)


def test_turned_off_by_environment(monkeypatch):
  monkeypatch.setenv("PALIGEMMA_CPU_KERNEL", "0")
  decode_kernel.available.cache_clear()
  try:
    assert not decode_kernel.available()
  finally:
    monkeypatch.delenv("PALIGEMMA_CPU_KERNEL")
    decode_kernel.available.cache_clear()
  assert decode_kernel.available()


def _other_builds():
  """The builds this CPU can run besides its default: what CPUs with less
  run (AVX2 alone; AVX-512 without the bf16 dot)."""
  return ["avx2"] * decode_kernel.uses_avx512() + ["avx512"] * decode_kernel.uses_bf16_dot()


@pytest.mark.parametrize("build", _other_builds() or [pytest.param(None, marks=pytest.mark.skip(
    reason="no AVX-512: AVX2's is the one build"))])
def test_other_builds_multiply_exactly_too(build):
  # This process runs the default build; the others are held to the same
  # bounds in a process of their own.
  env = {**os.environ, "PALIGEMMA_CPU_KERNEL": build}
  run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                        "-k", "product_matches or builds"], env=env, capture_output=True, text=True,
                       check=False)
  assert run.returncode == 0 and " passed" in run.stdout, run.stdout[-2000:]
