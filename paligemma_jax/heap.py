"""Training steps reuse freed memory instead of faulting in fresh pages.

XLA's CPU runtime allocates each execution's temporaries as one block (354
MB for a demo training step of 32), and glibc serves any block over 32 MB by
mmap and returns it by munmap: every step the kernel zeroed and mapped
87,000 fresh pages, a sixth of the step's time (BUILD.md, "The demo
model"). Kept in glibc's main heap instead, the block is reused.
"""

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_freed_memory():
  """Call before XLA starts its threads. One arena (a thread's own arena
  could only mmap so large a block), no mmap, no trimming of the top of the
  heap below 1 GiB. A no-op without glibc. The price: memory freed stays
  with the process (for training, whose memory is all reused each step)."""
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallopt  # pylint: disable=pointless-statement
  except (OSError, AttributeError):
    return
  libc.mallopt(_M_ARENA_MAX, 1)
  libc.mallopt(_M_MMAP_MAX, 0)
  libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
