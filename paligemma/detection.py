"""PaliGemma's detection output: `<locYMIN><locXMIN><locYMAX><locXMAX> label`
groups joined by ` ; `, coordinates in 1/1023 of the image's height and
width. Parsed into pixel boxes of the original image, and drawn.
"""

import re

from PIL import Image, ImageDraw

_GROUP = re.compile(r"^((?:<loc\d{4}>){4})\s*(.*)$")
_LOC = re.compile(r"<loc(\d{4})>")


def parse(text: str, width: int, height: int):
  """-> (boxes [{"label", "box": [x0, y0, x1, y1]}], unparsed text parts).

  A group with fewer than four location tokens, or ymax < ymin / xmax < xmin,
  is returned as unparsed text, never an error.
  """
  boxes, unparsed = [], []
  if "<loc" not in text:
    return boxes, unparsed
  for part in text.split(";"):
    part = part.strip()
    if not part:
      continue
    m = _GROUP.match(part)
    if not m:
      unparsed.append(part)
      continue
    y0, x0, y1, x1 = (int(v) / 1023 for v in _LOC.findall(m.group(1)))
    if y1 < y0 or x1 < x0:
      unparsed.append(part)
      continue
    boxes.append({"label": m.group(2).strip(),
                  "box": [round(x0 * width, 1), round(y0 * height, 1),
                          round(x1 * width, 1), round(y1 * height, 1)]})
  return boxes, unparsed


def draw(image: Image.Image, boxes, path: str) -> None:
  image = image.convert("RGB")
  pen = ImageDraw.Draw(image)
  for b in boxes:
    x0, y0, x1, y1 = b["box"]
    pen.rectangle((x0, y0, x1, y1), outline=(255, 0, 255), width=max(1, image.width // 150))
    pen.text((x0 + 2, max(0, y0 - 12)), b["label"], fill=(255, 0, 255))
  image.save(path)


def iou(a, b) -> float:
  ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = ix * iy
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / union if union > 0 else 0.0
