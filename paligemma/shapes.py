"""The synthetic task "shapes": colored circles, squares and triangles on a
light canvas, with captions, counts, colors and detection boxes.

Framework-free (PIL and numpy): the trainer draws training data from it, the
evaluation draws held-out images from other seeds.
"""

import dataclasses

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle")
TASKS = ("caption", "count", "color", "detect")
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220),
          "yellow": (230, 200, 40)}


@dataclasses.dataclass(frozen=True)
class Shape:
  kind: str
  color: str
  box: tuple  # (x0, y0, x1, y1) in pixels, x1/y1 exclusive

  @property
  def center_x(self) -> float:
    return (self.box[0] + self.box[2]) / 2


def _overlaps(a, b) -> bool:
  return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def scene(rng: np.random.Generator, size: int = 224, n: int | None = None):
  """-> (RGB image, shapes left to right): n non-overlapping shapes, or 1 to 3
  drawn uniformly."""
  background = tuple(int(c) for c in rng.integers(200, 256, 3))
  image = Image.new("RGB", (size, size), background)
  draw = ImageDraw.Draw(image)
  shapes = []
  if n is None:
    n = int(rng.integers(1, 4))
  while len(shapes) < n:
    side = int(round(size * rng.uniform(0.2, 0.4)))
    x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, 2))
    box = (x0, y0, x0 + side, y0 + side)
    if any(_overlaps(box, s.box) for s in shapes):
      continue
    kind = KINDS[int(rng.integers(3))]
    color = list(COLORS)[int(rng.integers(4))]
    rgb = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in COLORS[color])
    x1, y1 = box[2] - 1, box[3] - 1
    if kind == "circle":
      draw.ellipse((x0, y0, x1, y1), fill=rgb)
    elif kind == "square":
      draw.rectangle((x0, y0, x1, y1), fill=rgb)
    else:  # upward isosceles triangle filling its box
      draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=rgb)
    shapes.append(Shape(kind, color, box))
  return image, sorted(shapes, key=lambda s: s.center_x)


def loc(v: float, extent: int) -> str:
  return f"<loc{int(round(v / extent * 1023)):04d}>"


def caption(shapes) -> str:
  parts = [f"a {s.color} {s.kind}" for s in shapes]
  return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def detection(shapes, kind: str, size: int) -> str:
  return " ; ".join(
      f"{loc(s.box[1], size)}{loc(s.box[0], size)}{loc(s.box[3], size)}{loc(s.box[2], size)} {kind}"
      for s in shapes if s.kind == kind)


def questions(shapes, size: int) -> list[tuple[str, str, str]]:
  """Every (task, prefix, suffix) this scene answers."""
  out = [("caption", "caption en", caption(shapes)),
         ("count", "answer en how many shapes are there", str(len(shapes)))]
  for kind in KINDS:
    of_kind = [s for s in shapes if s.kind == kind]
    if len(of_kind) == 1:
      out.append(("color", f"answer en what color is the {kind}", of_kind[0].color))
    out.append(("detect", f"detect {kind}", detection(shapes, kind, size)))
  return out
