"""safetensors, read lazily through a memory map and written as a stream.

Our own few lines rather than the safetensors package: numpy has no
bfloat16, the package's numpy reader refuses BF16, and we want every way a
file can be broken to become one clear error naming the file. Arrays come
back as views of a copy-on-write memory map, so nothing is read until used
and a checkpoint is never held in memory twice.
"""

import json
import mmap
import os
import struct

import ml_dtypes
import numpy as np

from paligemma.errors import UserError

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 << 20


def read(path: str) -> dict[str, np.ndarray]:
  """name -> array (a lazy view of the file); raises UserError if broken."""
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise UserError(f"{path}: truncated safetensors file ({size} bytes)")
      (n,) = struct.unpack("<Q", head)
      if n > min(size - 8, _MAX_HEADER):
        raise UserError(f"{path}: corrupt or truncated safetensors header")
      header = json.loads(f.read(n))
  except FileNotFoundError:
    raise UserError(f"checkpoint file not found: {path}") from None
  except (json.JSONDecodeError, UnicodeDecodeError):
    raise UserError(f"{path}: corrupt safetensors header") from None
  if not isinstance(header, dict):
    raise UserError(f"{path}: corrupt safetensors header")
  header.pop("__metadata__", None)
  data_size = size - 8 - n
  mm = np.memmap(path, dtype=np.uint8, mode="c", offset=8 + n, shape=(data_size,)) if data_size else None
  out = {}
  for name, info in header.items():
    try:
      dtype = DTYPES[info["dtype"]]
      shape = tuple(int(d) for d in info["shape"])
      begin, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
      raise UserError(f"{path}: corrupt header entry for {name!r}") from None
    if end > data_size:
      raise UserError(f"{path}: truncated: {name!r} ends at byte {end} of {data_size}")
    if end - begin != dtype.itemsize * int(np.prod(shape)) or begin < 0:
      raise UserError(f"{path}: corrupt header: {name!r} size does not match its shape")
    out[name] = mm[begin:end].view(dtype).reshape(shape) if end > begin else np.zeros(shape, dtype)
  return out


def mappings(arrays) -> list:
  """The distinct file mappings (mmap objects) under these memory-mapped arrays."""
  found = {}
  for a in arrays:
    while a is not None and getattr(a, "_mmap", None) is None:
      a = getattr(a, "base", None)
    if a is not None:
      found[id(a._mmap)] = a._mmap  # pylint: disable=protected-access
  return list(found.values())


def release(maps) -> None:
  """Drops the file pages these mappings hold in this process (they are read
  again if touched). A loader that copies weights out calls it as it goes:
  the mapped file pages would otherwise count in its RSS beside the copies."""
  for m in maps:
    m.madvise(mmap.MADV_DONTNEED)


def write(path: str, tensors: dict, metadata: dict | None = None) -> None:
  """Writes name -> array, one array at a time, to `path` (not atomic: callers
  write into a temporary directory and rename it). Values may be arrays, or
  callables with `.shape` and `.dtype` that produce one when called (see
  convert/layout.py), so a converter streams without holding every tensor."""
  header, offset = {}, 0
  for name, t in tensors.items():
    dtype = np.dtype(t.dtype)
    nbytes = dtype.itemsize * int(np.prod(t.shape))
    header[name] = {"dtype": _NAMES[dtype], "shape": list(t.shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  if metadata:
    header["__metadata__"] = metadata
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # keeps every tensor 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name, t in tensors.items():
      arr = t() if callable(t) else t
      arr = np.ascontiguousarray(arr, dtype=DTYPES[header[name]["dtype"]])
      if tuple(arr.shape) != tuple(header[name]["shape"]):
        raise ValueError(f"{name}: produced shape {arr.shape}, declared {header[name]['shape']}")
      f.write(arr.reshape(-1).view(np.uint8).data)

