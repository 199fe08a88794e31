import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the top-level scripts are the API
sys.path.insert(0, str(Path(__file__).resolve().parent))

import data  # noqa: E402
import demo  # noqa: E402

MATH16 = Path(__file__).parent / "data" / "math16.jsonl"  # 16 short MATH-500 problems and solutions


@pytest.fixture(scope="module")
def tok():
    return demo.make_tokenizer()


@pytest.fixture(scope="module")
def math16(tok, tmp_path_factory):
    return data.tokenize_dataset(MATH16, tok, max_len=512, cache_dir=tmp_path_factory.mktemp("tok"))
