"""The decode step's products (and bf16 embedding lookups) on x86 CPUs, by
a kernel of our own.

A decode step multiplies a few rows of activations (the batch) by every
decoder matrix, held as rows [R, D]. XLA's CPU backend does that well for
one float32 row, but reads the weights at half speed for 8 rows (its small
GEMM), and has no fast bfloat16 dot at all (BUILD.md has the figures).
`decode_kernel.cc` reads each weight row once for all the rows of x and
widens bf16 in registers; it runs on XLA's own threads, as an FFI custom
call. It is compiled on first use with the machine's C++ compiler into
~/.cache/paligemma/kernels (PALIGEMMA_KERNEL_CACHE overrides), and where it
cannot be (no compiler, no AVX2 and FMA, not x86) XLA's dot is used and a
warning says why. Where the CPU has AVX-512 it is built for it (twice the
lanes and registers: at 8 rows, half the loads of x per FMA), and where
it also has AVX512-BF16, bf16 activations times bf16 weights take its
vdpbf16ps dot (exact products, float32 sums, as the widening path), at
any number of rows: a bf16 model's prefill too, where XLA would widen
every weight to float32 first (twice the time, and the widened copies
in memory).
PALIGEMMA_CPU_KERNEL=0 turns it off, =avx2 builds it for AVX2 alone,
=avx512 for AVX-512 without the bf16 dot (to compare).
"""

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import subprocess
import tempfile

from absl import logging
import jax
import jax.numpy as jnp

_SOURCE = pathlib.Path(__file__).with_name("decode_kernel.cc")
_FLAGS = ["-O3", "-mavx2", "-mfma", "-std=c++17", "-shared", "-fPIC"]
# Rows of x (a decode batch) the kernel takes; more (a prefill) stay with
# XLA's GEMM (at 11 rows the two were even), except on the bf16 dot.
MAX_ROWS = 16


@functools.cache
def _cpu_flags() -> frozenset:
  try:
    return frozenset(pathlib.Path("/proc/cpuinfo").read_text().split())
  except OSError:
    return frozenset()


def _cpu_has_avx2_fma() -> bool:
  return {"avx2", "fma"} <= _cpu_flags()


def uses_avx512() -> bool:
  """Whether the kernel is built for AVX-512 (the CPU has it, and
  PALIGEMMA_CPU_KERNEL does not ask for AVX2)."""
  return "avx512f" in _cpu_flags() and os.environ.get("PALIGEMMA_CPU_KERNEL") != "avx2"


def uses_bf16_dot() -> bool:
  """Whether the AVX-512 build has the bf16 dot (the CPU has AVX512-BF16, and
  PALIGEMMA_CPU_KERNEL does not ask for plain AVX-512)."""
  return (uses_avx512() and "avx512_bf16" in _cpu_flags()
          and os.environ.get("PALIGEMMA_CPU_KERNEL") != "avx512")


def _dot(x_dtype, w_dtype) -> bool:
  """Whether x times w takes the bf16 dot: both bf16, and it is built."""
  return x_dtype == jnp.bfloat16 and w_dtype == jnp.bfloat16 and uses_bf16_dot()


def build_name() -> str:
  """Which build decodes here: "avx512-bf16" (with the bf16 dot), "avx512",
  "avx2", or "off" (XLA's dot)."""
  if not available():
    return "off"
  return "avx512-bf16" if uses_bf16_dot() else "avx512" if uses_avx512() else "avx2"


def _build() -> pathlib.Path:
  """The kernel's shared library, compiled once per source, flags and jaxlib."""
  include = jax.ffi.include_dir()
  flags = _FLAGS + ["-mavx512f"] * uses_avx512() + ["-mavx512bf16"] * uses_bf16_dot()
  key = hashlib.sha256(_SOURCE.read_bytes()
                       + " ".join(flags + [include, jax.__version__]).encode())
  cache = pathlib.Path(os.environ.get("PALIGEMMA_KERNEL_CACHE",
                                      os.path.expanduser("~/.cache/paligemma/kernels")))
  lib = cache / f"decode_{key.hexdigest()[:16]}.so"
  if not lib.exists():
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:  # then renamed: no half-written library
      out = pathlib.Path(tmp) / lib.name
      subprocess.run([os.environ.get("CXX", "c++"), *flags, "-w", f"-I{include}", str(_SOURCE),
                      "-o", str(out)], check=True, capture_output=True, text=True)
      os.replace(out, lib)
  return lib


@functools.cache
def available() -> bool:
  """Whether the kernel is built and registered with XLA (once a process)."""
  if os.environ.get("PALIGEMMA_CPU_KERNEL", "1") == "0":
    return False
  if platform.machine().lower() not in ("x86_64", "amd64") or not _cpu_has_avx2_fma():
    logging.warning("paligemma: no AVX2/FMA on this CPU; decode products use XLA's dot")
    return False
  try:
    lib = ctypes.cdll.LoadLibrary(str(_build()))
  except (OSError, subprocess.CalledProcessError) as e:
    why = getattr(e, "stderr", None) or str(e)
    logging.warning("paligemma: CPU decode kernel not built (%s); decode products use XLA's dot",
                    why.strip().splitlines()[-1] if why.strip() else type(e).__name__)
    return False
  targets = [("paligemma_rows_f32", lib.RowsF32), ("paligemma_rows_bf16", lib.RowsBF16),
             ("paligemma_gather16", lib.Gather16)]
  if uses_bf16_dot():
    targets.append(("paligemma_rows_bf16_dot", lib.RowsBF16Dot))
  for name, fn in targets:
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(fn), platform="cpu")
  return True


def applies(x_dtype, m: int, w) -> bool:
  """Whether m rows of x times w take the kernel: on the CPU, for a decode
  step's few rows; a single float32 row stays with XLA's matrix-vector
  product, as fast (within 3%, BUILD.md). bf16 x with bf16 w, where the
  bf16 dot is built, takes it at any number of rows: at a prefill's 272 the
  dot ran 2.3x faster than XLA, which widens both to float32 (BUILD.md,
  "Session 18")."""
  if jax.default_backend() != "cpu" or w.ndim != 2:
    return False
  if w.dtype == jnp.float32 and m == 1 or w.dtype not in (jnp.float32, jnp.bfloat16):
    return False
  if m > MAX_ROWS and not _dot(x_dtype, w.dtype):
    return False
  return available()


def gathers(table) -> bool:
  """Whether rows of this bf16 table are gathered by the kernel (on the CPU,
  where XLA would widen the whole table first)."""
  return jax.default_backend() == "cpu" and table.dtype == jnp.bfloat16 and available()


def gather(table, ids):
  """table [V, D] bf16, ids [...] int -> [..., D]: table[ids], ids clamped."""
  out = jax.ShapeDtypeStruct((*ids.shape, table.shape[1]), table.dtype)
  return jax.ffi.ffi_call("paligemma_gather16", out)(table, ids.astype(jnp.int32))


# The kernel meets each chunk of w with every row of x, so x has to stay in
# cache: at 1088 rows of 16384 columns in bf16 (36 MB, a bf16 prefill's
# down projection at batch 4) the dot fell to half its rate, below XLA's.
# A larger x goes in parts of at most this many bytes, w streamed once a
# part (BUILD.md, "Session 18").
X_BYTES = 8 << 20


def product(x, w):
  """x [M, D] times each row of w [R, D] (float32 or bfloat16) -> [M, R]
  float32, accumulated in float32. Only where `applies`. bf16 x with bf16
  w takes the bf16 dot where it is built; otherwise x is widened first."""
  dot = _dot(x.dtype, w.dtype)
  name = ("paligemma_rows_bf16_dot" if dot else
          "paligemma_rows_bf16" if w.dtype == jnp.bfloat16 else "paligemma_rows_f32")
  x = x if dot else x.astype(jnp.float32)
  rows = max(1, X_BYTES // (x.shape[1] * x.dtype.itemsize))
  parts = [jax.ffi.ffi_call(name, jax.ShapeDtypeStruct((len(part), w.shape[0]), jnp.float32))(part, w)
           for part in (x[i:i + rows] for i in range(0, x.shape[0], rows))]
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts)
