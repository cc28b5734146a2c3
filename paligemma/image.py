"""Image loading and preprocessing, as transformers' SiglipImageProcessor (PIL).

RGB (transparency composited onto white), bicubic resize to size x size with
no crop, x / 255 in float64 then float32, (x - 0.5) / 0.5, channels first:
the same float32 values as transformers' PIL backend, bit for bit.
"""

import numpy as np
from PIL import Image, UnidentifiedImageError

from paligemma.errors import UserError


def load(path: str) -> Image.Image:
  try:
    image = Image.open(path)
    image.load()
  except FileNotFoundError:
    raise UserError(f"image not found: {path}") from None
  except IsADirectoryError:
    raise UserError(f"image path is a directory: {path}") from None
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    raise UserError(f"{path}: not a readable image ({e})") from None
  return image


def to_rgb(image: Image.Image) -> Image.Image:
  if "A" in image.getbands() or image.info.get("transparency") is not None:
    image = image.convert("RGBA")
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, image).convert("RGB")
  return image.convert("RGB")


def preprocess(image: Image.Image, size: int) -> np.ndarray:
  """PIL image -> float32 [3, size, size] in [-1, 1]."""
  image = to_rgb(image).resize((size, size), resample=Image.Resampling.BICUBIC)
  x = (np.asarray(image).astype(np.float64) * (1 / 255)).astype(np.float32)
  x = (x - np.float32(0.5)) / np.float32(0.5)
  return x.transpose(2, 0, 1)
