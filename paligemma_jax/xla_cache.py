"""Compiled programs persist across runs of the binaries: the second run of
the same model and shapes (an inference bucket, a resumed training run)
loads its executables instead of compiling them again."""

import os

import jax


def persist_compilations():
  """Call before the first compilation. PALIGEMMA_JAX_CACHE overrides the directory."""
  jax.config.update("jax_compilation_cache_dir",
                    os.environ.get("PALIGEMMA_JAX_CACHE", os.path.expanduser("~/.cache/paligemma/jax")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
