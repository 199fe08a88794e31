"""The tiny model folder the tests and bench.py build from demo.py's toy parts (nothing downloads)."""
from pathlib import Path

import demo


def save_tiny(path, tie: bool = False, seed: int = 0) -> Path:
    """A loadable model folder (weights, config, tokenizer, generation config): demo.py's tokenizer and a 2-layer
    Qwen2 of hidden size 128."""
    tokenizer = demo.make_tokenizer()
    return demo.save_model(path, tokenizer, demo.make_model(tokenizer, tie=tie, seed=seed))
