import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the top-level scripts are the API
sys.path.insert(0, str(Path(__file__).resolve().parent))

import data  # noqa: E402
import demo  # noqa: E402
import teacher_cache  # noqa: E402
from tiny import save_tiny  # noqa: E402

# vLLM's engine core in the process that starts it, not in two more processes of its own (the engine core's and
# its worker's), each importing vLLM again (about 10 CPU s here): a third of every engine start in the suite. The
# samples do not change; test_several_models_share_an_engine_and_sample_as_if_alone runs vLLM's default layout too.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

MATH16 = Path(__file__).parent / "data" / "math16.jsonl"  # 16 short MATH-500 problems and solutions


# about 9, 5, 4, 2 and 1 min
LONGEST_FIRST = ["test_real_models.py", "test_train.py", "test_eval_e2e.py", "test_demo.py", "test_train_cache.py"]


def pytest_collection_modifyitems(items):
    """The longest modules first, the short ones after: run.sh's two workers take a module at a time, and short
    modules at the end let both finish together, where a long one started last would leave one worker idle."""
    items.sort(key=lambda item: LONGEST_FIRST.index(item.path.name) if item.path.name in LONGEST_FIRST
               else len(LONGEST_FIRST))


@pytest.fixture(scope="session")
def setup(tmp_path_factory):
    """train.py's and lens.py's world: a student, a teacher (another seed), 32 arithmetic samples of varied
    length (with CFT-style label weights), their tokenisation and the teacher's top-8 cache."""
    root = tmp_path_factory.mktemp("train")
    student, teacher = save_tiny(root / "student", seed=0), save_tiny(root / "teacher", seed=1)
    rng = random.Random(0)
    lines = []
    for _ in range(32):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        response = f"{a} + {b} = {a + b}. " * rng.randint(1, 4) + f"The answer is \\boxed{{{a + b}}}."
        answer = response.rindex(str(a + b))  # CFT-style: the final answer's digits are the critical tokens
        lines.append(json.dumps({"prompt": f"What is {a} + {b}?", "response": response, "weight": 0.5,
                                 "weight_spans": [[answer, answer + len(str(a + b)), 1.0]]}))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    tokens = data.tokenize_dataset(root / "train.jsonl", AutoTokenizer.from_pretrained(student), max_len=256,
                                   cache_dir=root / "tokenized")
    teacher_cache.build(AutoModelForCausalLM.from_pretrained(teacher), tokens, root / "cache", k=8)
    return root


@pytest.fixture(scope="module")
def tok():
    return demo.make_tokenizer()


@pytest.fixture(scope="module")
def math16(tok, tmp_path_factory):
    return data.tokenize_dataset(MATH16, tok, max_len=512, cache_dir=tmp_path_factory.mktemp("tok"))


def outside_any_world(**extra):
    """This process's environment, less the world an in-process run (common.start_distributed) leaves in it, plus
    extra: for a script started as a user starts it."""
    return {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")},
            **extra}


def hub_snapshot(hub, repo_id):
    """The folder of a hub id's snapshot in a local hub cache (HF_HUB_CACHE=hub), its refs/main pointing at it:
    what a download leaves, so that offline runs resolve repo_id to whatever is saved there."""
    repo = Path(hub) / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text("0" * 40)
    return repo / "snapshots" / ("0" * 40)


def alone(model, tokens, i):
    """Sample i of `tokens` run alone through `model`: float64 log-probabilities at its label positions (the
    independent reference for what packed rows, caches and lenses compute), and its labels there."""
    labels = torch.from_numpy(tokens.labels(i))
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(tokens.input_ids(i).astype(np.int64))[None], use_cache=False).logits
    return logits[0][labels != -100].double().log_softmax(-1), labels[labels != -100]
