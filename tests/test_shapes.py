"""The synthetic task and the detection format."""

import collections
import itertools

import numpy as np
from PIL import Image
import pytest

from paligemma import data, detection, shapes


def test_scenes_follow_the_spec():
  rng = np.random.default_rng(0)
  for _ in range(200):
    image, objs = shapes.scene(rng, 224)
    assert image.size == (224, 224) and 1 <= len(objs) <= 3
    assert [s.center_x for s in objs] == sorted(s.center_x for s in objs)
    for i, s in enumerate(objs):
      x0, y0, x1, y1 = s.box
      assert 0 <= x0 and 0 <= y0 and x1 <= 224 and y1 <= 224
      assert x1 - x0 == y1 - y0 and 0.2 * 224 - 1 <= x1 - x0 <= 0.4 * 224 + 1
      assert s.kind in shapes.KINDS and s.color in shapes.COLORS
      for t in objs[i + 1:]:
        assert not shapes._overlaps(s.box, t.box)  # pylint: disable=protected-access
      # The center pixel carries the shape's color, within the jitter.
      c = np.asarray(image)[(y0 + y1) // 2 + (s.box[3] - s.box[1]) // 6, (x0 + x1) // 2]
      assert np.abs(c.astype(int) - shapes.COLORS[s.color]).max() <= 25
    corner = np.asarray(image)[0, 0]
    assert all(corner >= 200) or any(s.box[0] == 0 and s.box[1] == 0 for s in objs)


def test_answers():
  objs = [shapes.Shape("circle", "red", (10, 20, 60, 70)),
          shapes.Shape("square", "blue", (100, 20, 150, 70)),
          shapes.Shape("circle", "yellow", (160, 100, 210, 150))]
  qs = {p: a for _, p, a in shapes.questions(objs, 224)}
  assert qs["caption en"] == "a red circle, a blue square and a yellow circle"
  assert shapes.caption(objs[:2]) == "a red circle and a blue square"
  assert shapes.caption(objs[:1]) == "a red circle"
  assert qs["answer en how many shapes are there"] == "3"
  assert qs["answer en what color is the square"] == "blue"
  assert "answer en what color is the circle" not in qs  # two circles: not asked
  assert qs["detect triangle"] == ""
  assert qs["detect square"] == "<loc0091><loc0457><loc0320><loc0685> square"
  assert qs["detect circle"].count(" ; ") == 1


def test_training_stream_balances_tasks():
  """Each task about as often as the others (color a little less: a scene
  with two shapes of every kind it shows has no color question), and only
  the tasks and scene sizes asked for."""
  seen = collections.Counter(ex.task for ex in itertools.islice(data.shapes_examples(0, 64), 800))
  assert set(seen) == set(shapes.TASKS)
  assert all(140 < seen[t] < 260 for t in shapes.TASKS), seen
  some = list(itertools.islice(data.shapes_examples(0, 64, ("caption", "color"), (1, 0, 0)), 100))
  assert {ex.task for ex in some} == {"caption", "color"}
  assert {len(ex.objects) for ex in some} == {1}
  sizes = collections.Counter(
      len(ex.objects) for ex in itertools.islice(data.shapes_examples(0, 64, weights=(0, 1, 3)), 400))
  assert sizes[1] == 0 and 2.2 < sizes[3] / sizes[2] < 4.2, sizes
  weighted = collections.Counter(ex.task for ex in itertools.islice(
      data.shapes_examples(0, 64, {"caption": 3, "count": 1}), 800))
  assert set(weighted) == {"caption", "count"} and 2.4 < weighted["caption"] / weighted["count"] < 3.8
  detect = list(itertools.islice(data.shapes_examples(0, 64, ("detect",)), 400))
  empty = sum(ex.suffix == "" for ex in detect) / len(detect)
  assert 0.2 < empty < 0.37, empty  # three kinds asked alike: 0.47


def test_parse_boxes_and_malformed():
  text = "<loc0091><loc0457><loc0320><loc0685> square ; <loc0100><loc0200> cat ; " \
         "<loc0500><loc0100><loc0400><loc0200> dog"
  boxes, unparsed = detection.parse(text, 448, 224)
  assert boxes == [{"label": "square", "box": [200.1, 19.9, 300.0, 70.1]}]
  assert unparsed == ["<loc0100><loc0200> cat", "<loc0500><loc0100><loc0400><loc0200> dog"]
  assert detection.parse("a red circle", 10, 10) == ([], [])


def test_draw(tmp_path):
  image = Image.new("RGB", (100, 80), (255, 255, 255))
  detection.draw(image, [{"label": "x", "box": [10, 10, 50, 40]}], str(tmp_path / "o.png"))
  out = np.asarray(Image.open(tmp_path / "o.png"))
  assert tuple(out[10, 30]) == (255, 0, 255) and tuple(out[25, 30]) == (255, 255, 255)


@pytest.mark.parametrize("a, b, want", [((0, 0, 10, 10), (0, 0, 10, 10), 1.0),
                                        ((0, 0, 10, 10), (5, 0, 15, 10), 1 / 3),
                                        ((0, 0, 1, 1), (2, 2, 3, 3), 0.0)])
def test_iou(a, b, want):
  assert detection.iou(a, b) == pytest.approx(want)
