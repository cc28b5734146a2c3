import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests import helpers  # pylint: disable=wrong-import-position


@pytest.fixture(scope="session")
def ckpt1(tmp_path_factory):
  """Tiny PaliGemma 1 (Gemma decoder), Hub naming, float32, one file."""
  return helpers.make_checkpoint(str(tmp_path_factory.mktemp("pg1")), gemma2=False)


@pytest.fixture(scope="session")
def ckpt2(tmp_path_factory):
  """Tiny PaliGemma 2 (Gemma 2 decoder), Hub naming, float32, sharded."""
  return helpers.make_checkpoint(str(tmp_path_factory.mktemp("pg2")), gemma2=True, shards=3)


@pytest.fixture(scope="session")
def images(tmp_path_factory):
  d = tmp_path_factory.mktemp("images")
  return [helpers.image_file(str(d / f"img{i}.png"), seed=i, size=(40 + 7 * i, 30 + 5 * i))
          for i in range(3)]
