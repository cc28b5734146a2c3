"""The one exception type for bad user input.

Binaries catch it and print its message as a single line on stderr with a
non-zero exit; anything else escaping is a bug and keeps its traceback.
"""

import sys

from absl import logging


class UserError(Exception):
  """Bad input from the user: a file, a flag or a checkpoint we cannot use."""


def main(run):
  """An absl main for `run()`: UserError becomes one `error: ...` line on
  stderr and exit status 1; absl's own INFO lines (jax probing for
  backends) stay off stderr."""

  def _main(argv):
    logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
      print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
      sys.exit(2)
    try:
      run()
    except UserError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(1)

  return _main
