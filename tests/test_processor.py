"""Image preprocessing and prompt layout, against transformers' processor."""

import numpy as np
from PIL import Image
import pytest

from paligemma import image as image_lib
from paligemma.errors import UserError
from paligemma.tokenizer import Tokenizer
from tests import helpers


def _images():
  rng = np.random.default_rng(0)
  rgb = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
  rgba = Image.fromarray(rng.integers(0, 256, (61, 29, 4), dtype=np.uint8), "RGBA")
  palette = rgb.convert("P")
  palette.info["transparency"] = 3
  return {"rgb": rgb, "gray": rgb.convert("L"), "rgba": rgba, "palette": palette,
          "palette_opaque": rgb.convert("P"), "cmyk": rgb.convert("CMYK")}


@pytest.mark.parametrize("kind", list(_images()))
@pytest.mark.parametrize("size", [56, 224])
def test_bit_exact_with_transformers_pil_backend(kind, size):
  transformers = pytest.importorskip("transformers")
  image = _images()[kind]
  ref = transformers.SiglipImageProcessorPil(size={"height": size, "width": size})
  want = ref(image, return_tensors="np")["pixel_values"][0]
  got = image_lib.preprocess(image, size)
  assert got.dtype == np.float32 and got.shape == (3, size, size)
  np.testing.assert_array_equal(got, want)


def test_formula():
  image = Image.new("RGB", (5, 7), (0, 255, 51))
  x = image_lib.preprocess(image, 4)
  np.testing.assert_allclose(x[:, 0, 0], [-1.0, 1.0, 51 / 255 * 2 - 1], rtol=1e-6)


def test_bad_images(tmp_path):
  with pytest.raises(UserError, match="image not found"):
    image_lib.load(str(tmp_path / "nope.png"))
  (tmp_path / "junk.png").write_bytes(b"not an image at all")
  with pytest.raises(UserError, match="not a readable image"):
    image_lib.load(str(tmp_path / "junk.png"))
  good = helpers.image_file(str(tmp_path / "ok.png"))
  with open(good, "rb") as f:
    head = f.read(60)
  (tmp_path / "cut.png").write_bytes(head)
  with pytest.raises(UserError, match="not a readable image"):
    image_lib.load(str(tmp_path / "cut.png"))


def test_prompt_layout(tmp_path):
  n = helpers.write_tokenizer(str(tmp_path / "tokenizer.model"))
  tok = Tokenizer(str(tmp_path / "tokenizer.model"), n)
  ids = tok.prefix("caption en", 4)
  assert ids[:5] == [n] * 4 + [tok.bos_id]
  assert tok.decode(ids[5:]) == "caption en\n"
  assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
  assert tok.encode("<loc0012><loc1023>") == [tok.sp.PieceToId("<loc0012>"),
                                                tok.sp.PieceToId("<loc1023>")]


def test_prompt_layout_matches_transformers_processor(tmp_path):
  transformers = pytest.importorskip("transformers")
  helpers.write_tokenizer(str(tmp_path / "tokenizer.model"))
  try:
    hf_tok = transformers.GemmaTokenizer.from_pretrained(str(tmp_path))
  except Exception as e:  # pylint: disable=broad-except
    pytest.skip(f"transformers cannot build a Gemma tokenizer here: {e}")
  proc_img = transformers.SiglipImageProcessorPil(size={"height": 56, "width": 56})
  proc_img.image_seq_length = 16
  processor = transformers.PaliGemmaProcessor(image_processor=proc_img, tokenizer=hf_tok)
  tok = Tokenizer(str(tmp_path / "tokenizer.model"), processor.image_token_id)
  for prompt in ["caption en", "answer en where is the cat standing?", "detect cat ; dog"]:
    want = processor(images=Image.new("RGB", (9, 9)), text="<image>" + prompt)["input_ids"][0]
    assert list(want) == tok.prefix(prompt, 16), prompt


def test_bad_tokenizer(tmp_path):
  with pytest.raises(UserError, match="tokenizer not found"):
    Tokenizer(str(tmp_path / "none.model"), 5)
  (tmp_path / "bad.model").write_bytes(b"garbage")
  with pytest.raises(UserError, match="not a SentencePiece model"):
    Tokenizer(str(tmp_path / "bad.model"), 5)
