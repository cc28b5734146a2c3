"""Compiled generation: one jitted prefill, one jitted decode loop.

Prefill runs the image and the (left-padded) prompt once, fills a
preallocated KV cache and samples the first token. Decode runs the whole
loop inside `jax.lax.while_loop`: each step writes its keys and values with
`lax.dynamic_update_slice`, samples, and the loop stops when every sequence
has produced <eos> or max_new_tokens are out. Prompt lengths are padded to
buckets and max_new_tokens, the sampling parameters and the seed are traced
values, so new prompts and settings within a bucket compile nothing new.
Mirrors paligemma_torch/generate.py.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np

from paligemma import batch
from paligemma_jax import sampling
from paligemma_jax.paligemma import PaliGemma

TEXT_BUCKET = 32  # prompt tokens (after the image) are padded to a multiple of this
STEPS_BUCKET = 64  # cache room for generated tokens, a multiple of this


def round_up(n: int, m: int) -> int:
  return -(-n // m) * m


@flax.struct.dataclass
class DecodeState:
  step: jax.Array  # tokens generated so far, one more than decoded
  token: jax.Array  # [B] the last sampled token, not yet in the cache
  position: jax.Array  # [B] its RoPE position
  done: jax.Array  # [B] has produced <eos>
  tokens: jax.Array  # [B, steps] generated so far; pad after <eos>
  valid: jax.Array  # [B, S] cache slot holds a real token
  prefix: jax.Array  # [B, S] cache slot belongs to the prefix
  cache: tuple  # (k, v) [L, B, S, K, H]
  rng: jax.Array


class Generator:
  """Holds the model and its parameters; compiles prefill and decode once
  per (batch, prompt bucket, cache length)."""

  def __init__(self, model: PaliGemma, params):
    self.model, self.params = model, params
    self.cfg = model.cfg
    self.traces = {"prefill": 0, "decode": 0}  # counts compilations, for tests and benchmarks
    self._prefill = jax.jit(self._prefill_fn, static_argnames=("steps_room",))
    self._decode = jax.jit(self._decode_fn, donate_argnums=(1,))

  def _prefill_fn(self, params, pixels, tokens, valid, steps_room, sp, seed):
    self.traces["prefill"] += 1
    c = self.cfg
    B, T = tokens.shape
    S = T + steps_room
    dtype = params["llm"]["embedder"]["input_embedding"].dtype
    shape = (c.text.num_hidden_layers, B, S, c.text.num_key_value_heads, c.text.head_dim)
    cache = (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
    valid_s = jnp.zeros((B, S), bool).at[:, :T].set(valid)
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    variables = {"params": params}
    x = self.model.apply(variables, pixels, tokens, method=PaliGemma.embed)
    logits, cache = self.model.apply(variables, x, positions, valid_s, valid_s, cache, 0,
                                     last=1)
    rng = jax.random.PRNGKey(seed)
    token = sampling.sample(logits[:, -1], sp, jax.random.fold_in(rng, 0))
    tokens_out = jnp.full((B, steps_room), c.pad_token_id, jnp.int32).at[:, 0].set(token)
    return DecodeState(step=jnp.int32(1), token=token, position=positions[:, -1] + 1,
                       done=token == c.eos_token_id, tokens=tokens_out, valid=valid_s,
                       prefix=valid_s, cache=cache, rng=rng)

  def _decode_fn(self, params, state: DecodeState, max_new_tokens, sp):
    self.traces["decode"] += 1
    c = self.cfg
    T = state.valid.shape[1] - state.tokens.shape[1]

    def should_continue(s: DecodeState):
      return (s.step < max_new_tokens) & ~jnp.all(s.done)

    def step(s: DecodeState):
      slot = T + s.step - 1  # where the last sampled token goes
      valid = jax.lax.dynamic_update_slice(s.valid, jnp.ones((s.valid.shape[0], 1), bool),
                                           (0, slot))
      variables = {"params": params}
      x = self.model.apply(variables, None, s.token[:, None], method=PaliGemma.embed)
      logits, cache = self.model.apply(variables, x, s.position[:, None], valid, s.prefix,
                                       s.cache, slot)
      token = sampling.sample(logits[:, -1], sp, jax.random.fold_in(s.rng, s.step))
      token = jnp.where(s.done, c.pad_token_id, token)
      tokens = jax.lax.dynamic_update_slice(s.tokens, token[:, None], (0, s.step))
      return s.replace(step=s.step + 1, token=token, position=s.position + 1,
                       done=s.done | (token == c.eos_token_id), tokens=tokens, valid=valid,
                       cache=cache)

    return jax.lax.while_loop(should_continue, step, state)

  def prefill(self, pixels, tokens, valid, *, max_new_tokens: int, temperature: float = 0.0,
              top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> DecodeState:
    """Image and prompt through the model; the first token sampled."""
    tokens, valid = self.pad_to_bucket(tokens, valid)
    return self._prefill(self.params, jnp.asarray(pixels), jnp.asarray(tokens),
                         jnp.asarray(valid), round_up(max_new_tokens, STEPS_BUCKET),
                         sampling.Params.make(temperature, top_k, top_p), jnp.uint32(seed))

  def decode(self, state: DecodeState, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0) -> DecodeState:
    """The rest of the tokens, in one compiled loop; `state` is donated."""
    return self._decode(self.params, state, jnp.int32(max_new_tokens),
                        sampling.Params.make(temperature, top_k, top_p))

  def generate(self, pixels: np.ndarray, tokens: np.ndarray, valid: np.ndarray, *,
               max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0) -> np.ndarray:
    """pixels [B, 3, px, px]; tokens, valid [B, T] left-padded prefixes.

    Returns generated ids [B, steps] (steps <= max_new_tokens), each row
    padded with pad_token_id after its <eos>.
    """
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    state = self.decode(self.prefill(pixels, tokens, valid, seed=seed, **kw), **kw)
    return np.asarray(state.tokens[:, :int(state.step)])

  def pad_to_bucket(self, tokens, valid):
    """Left-pads the text part so the prefix is image + a multiple of TEXT_BUCKET."""
    n = self.cfg.num_image_tokens
    T = n + round_up(max(tokens.shape[1] - n, 1), TEXT_BUCKET)
    seqs = [list(t[v]) for t, v in zip(tokens, valid)]
    return batch.left_pad(seqs, self.cfg.pad_token_id, T)
