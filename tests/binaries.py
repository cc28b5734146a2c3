"""Runs the project's binaries as a user does: `python -m MODULE FLAGS...`
from the repository root, in a fresh process."""

import concurrent.futures
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(module: str, *args: str, timeout: int = 600):
  """-> (exit status, stdout, stderr)."""
  return _python(["-m", module, *args], timeout)


def run_code(code: str, *args: str, timeout: int = 600):
  """`python -c CODE ARGS...`, for what must happen before the imports (a
  module blocked, the allocator set). -> (exit status, stdout, stderr)."""
  return _python(["-c", code, *args], timeout)


def _python(argv, timeout):
  p = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                     timeout=timeout)
  return p.returncode, p.stdout, p.stderr


def run_each(calls):
  """`run(*call)` for each call ([module, *args]), as many at a time as
  there are cores: most of a short run is importing torch or jax and
  compiling, one core's work each. -> results in the order given."""
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
    return list(pool.map(lambda call: run(*call), calls))
