"""Streaming reads of a buffer far larger than the caches: the memory
bandwidth a decode step's roofline is made of (see decode.py). Each read
is a function that touches every byte once; its GB/s is the fastest of a
few timed calls (the roof), or the mean rate over about a second (set
beside a decode run of the same moment)."""

import time


def best_gb_s(read, nbytes: int, repeats: int) -> float:
  """The fastest of `repeats` timed reads (after one warm-up): a roofline is
  the most the machine was seen to stream, not a typical run."""
  read()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    read()
    times.append(time.perf_counter() - t0)
  return nbytes / min(times) / 1e9


def mean_gb_s(read, nbytes: int, seconds: float = 1.0) -> float:
  """The rate of back-to-back reads for about `seconds`: what streaming
  gets over a stretch of time, to set beside a decode run of the same
  moment."""
  t0, done = time.perf_counter(), 0
  while (elapsed := time.perf_counter() - t0) < seconds:
    read()
    done += nbytes
  return done / elapsed / 1e9


def torch_read(gib: float, device: str = "cpu"):
  """-> (read, bytes): a multi-threaded torch reduction over a buffer far
  larger than the caches."""
  import torch  # pylint: disable=import-outside-toplevel
  x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32,
                 device="cuda" if device == "gpu" else "cpu")
  if device == "gpu":
    return lambda: x.sum().item(), x.numel() * 4
  return x.sum, x.numel() * 4


def xla_read(gib: float):
  """-> (read, bytes): an XLA matrix-vector product over a buffer far
  larger than the caches, on JAX's default device: what a decode step
  runs. On these CPUs it streamed faster than torch's reduction (28-29
  against 17-19 GB/s), so the reduction alone made a roofline that
  decoding exceeded."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  a = jnp.ones((int(gib * 2**30) // 4 // 4096, 4096), jnp.float32)
  v = jnp.ones((4096,), jnp.float32)
  matvec = jax.jit(jnp.dot)
  return lambda: matvec(a, v).block_until_ready(), a.size * 4


def torch_gb_s(gib: float = 2.0, repeats: int = 7) -> float:
  return best_gb_s(*torch_read(gib), repeats)


def xla_gb_s(gib: float = 2.0, repeats: int = 7) -> float:
  return best_gb_s(*xla_read(gib), repeats)
