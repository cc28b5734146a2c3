"""The trainer's allocator settings: an XLA program whose temporaries exceed
glibc's 32 MB mmap ceiling reuses them instead of faulting in fresh pages
at every call."""

import sys

import pytest

from tests.binaries import run_code

_PROGRAM = """
import resource, sys
from paligemma_jax import heap
if sys.argv[1] == "keep":
  heap.keep_freed_memory()
import jax, jax.numpy as jnp

@jax.jit
def f(x):
  return (jnp.tanh(x @ x.T) @ x).sum()  # a [4096, 4096] temporary: 64 MB

x = jnp.ones((4096, 64))
f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
  f(x).block_until_ready()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def _faults_per_call(mode):
  rc, out, err = run_code(_PROGRAM, mode, timeout=300)
  assert rc == 0, err
  return float(out.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_large_temporaries_are_reused():
  fresh, kept = _faults_per_call("default"), _faults_per_call("keep")
  assert fresh > 10_000, fresh  # 64 MB of 4 KiB pages, faulted in again each call
  assert kept < fresh / 20, (kept, fresh)
