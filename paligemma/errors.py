"""The one exception type for bad user input.

Binaries catch it and print its message as a single line on stderr with a
non-zero exit; anything else escaping is a bug and keeps its traceback.
"""


class UserError(Exception):
  """Bad input from the user: a file, a flag or a checkpoint we cannot use."""
