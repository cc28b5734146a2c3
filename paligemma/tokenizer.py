"""SentencePiece tokenizer with PaliGemma's prompt layout.

Gemma's layout: pad 0, eos 1, bos 2, unk 3, `<locXXXX>` and `<segXXX>` pieces
among the SentencePiece pieces, and `<image>` just past them, at the config's
`image_token_index`. No id is hard-coded: all come from the model file and
the config.
"""

import os

import sentencepiece

from paligemma.errors import UserError


class Tokenizer:

  def __init__(self, path: str, image_token_id: int):
    if not os.path.isfile(path):
      raise UserError(f"tokenizer not found: {path}")
    self.sp = sentencepiece.SentencePieceProcessor()
    try:
      self.sp.LoadFromFile(path)
    except (OSError, RuntimeError) as e:
      raise UserError(f"{path}: not a SentencePiece model ({str(e).splitlines()[0]})") from None
    self.pad_id = self.sp.pad_id()
    self.eos_id = self.sp.eos_id()
    self.bos_id = self.sp.bos_id()
    self.image_id = image_token_id
    if min(self.eos_id, self.bos_id) < 0:
      raise UserError(f"{path}: SentencePiece model lacks bos or eos")
    if image_token_id < self.sp.GetPieceSize():
      raise UserError(f"{path}: image_token_index {image_token_id} collides with piece "
                      f"{self.sp.IdToPiece(image_token_id)!r}")

  def prefix(self, prompt: str, num_image_tokens: int) -> list[int]:
    """What PaliGemmaProcessor builds: <image> x N, <bos>, prompt + "\\n"."""
    return [self.image_id] * num_image_tokens + [self.bos_id] + self.encode(prompt + "\n")

  def encode(self, text: str) -> list[int]:
    return self.sp.EncodeAsIds(text)

  def decode(self, ids) -> str:
    ids = [int(i) for i in ids if 0 <= int(i) < self.sp.GetPieceSize()]
    return self.sp.DecodeIds(ids)
