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


def hub_snapshot(hub, repo_id):
    """The folder of a hub id's snapshot in a local hub cache (HF_HUB_CACHE=hub), its refs/main pointing at it:
    what a download leaves, so that offline runs resolve repo_id to whatever is saved there."""
    repo = Path(hub) / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text("0" * 40)
    return repo / "snapshots" / ("0" * 40)
