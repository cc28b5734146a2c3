"""A checkpoint continued at another input resolution.

Its own module, free of flags, so that tests and other binaries can import
it beside the inference flags (the trainer's flags would collide with them).
"""

import dataclasses

import jax

from paligemma.errors import UserError


def resize_image(cfg, params, image_size: int):
  """-> (config, params) at another input resolution: the patch grid's
  position embedding resampled bilinearly (half-pixel centers, as
  transformers' SigLIP `interpolate_pos_encoding`, bicubic there); every
  other weight is independent of the grid."""
  p = cfg.vision.patch_size
  if image_size % p:
    raise UserError(f"--image_size must be a multiple of the patch size {p}, got {image_size}")
  old, new = cfg.vision.image_size // p, image_size // p
  pos = params["img"]["pos_embedding"]  # [1, old * old, D]
  grid = pos.reshape(old, old, pos.shape[-1])
  grid = jax.image.resize(grid, (new, new, pos.shape[-1]), "bilinear", antialias=False)
  params = dict(params, img=dict(params["img"], pos_embedding=grid.reshape(1, new * new, -1)))
  return dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, image_size=image_size)), params
