"""Attention that can run (common.attention_implementation) and the varlen arguments of packed rows
(data.model_inputs): flash-attn stand-ins on sys.path, and a recording attention that delegates to sdpa."""
import importlib.util
import sys

import numpy as np
import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import common
import data
import lens
import teacher_cache
from conftest import alone
from test_train import ROOT, metrics, run_in_process, train_args

STAND_INS = {  # flash_attn/__init__.py of a wheel that imports, and of one built against another torch
    "imports": "__version__ = '2.8.3'\n\ndef flash_attn_varlen_func(*args, **kwargs):\n"
               "    raise AssertionError('never called on a CPU')\n",
    "breaks": "raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEa')\n",
}


@pytest.fixture(params=sorted(STAND_INS))
def flash_stand_in(request, tmp_path, monkeypatch):
    """A flash_attn package on sys.path, found by importlib as an installed one is."""
    (tmp_path / "flash_attn").mkdir()
    (tmp_path / "flash_attn" / "__init__.py").write_text(STAND_INS[request.param])
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert importlib.util.find_spec("flash_attn") is not None  # what train.py's choice used to go by
    yield request.param
    sys.modules.pop("flash_attn", None)  # imported during the test (transformers looks): gone with the stand-in


@pytest.mark.parametrize("device, dtype, imports, breaks", [
    ("cuda", torch.bfloat16, ("flash_attention_2", "flash-attn's varlen kernel"),
     ("sdpa", "flash-attn does not import (ImportError: flash_attn_2_cuda.so: undefined symbol")),
    ("cuda", torch.float16, ("flash_attention_2", "flash-attn's varlen kernel"),
     ("sdpa", "flash-attn does not import")),
    ("cuda", torch.float32, ("sdpa", "flash-attn needs bf16/fp16"), ("sdpa", "flash-attn needs bf16/fp16")),
    ("cpu", torch.bfloat16, ("sdpa", "flash-attn needs a CUDA device"), ("sdpa", "flash-attn needs a CUDA device")),
])
def test_flash_attn_only_where_it_imports_on_cuda_in_bf16_or_fp16(flash_stand_in, device, dtype, imports, breaks):
    name, why = common.attention_implementation(torch.device(device), dtype)  # a device object: nothing runs on it
    expected_name, expected_why = imports if flash_stand_in == "imports" else breaks
    assert name == expected_name and why.startswith(expected_why)


def test_without_flash_attn_it_is_sdpa(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "flash_attn" else real_find_spec(name, *rest))
    assert common.attention_implementation(torch.device("cuda"), torch.bfloat16) == (
        "sdpa", "flash-attn is not installed")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_each_script_runs_beside_a_flash_attn_stand_in(setup, flash_stand_in, dtype, tmp_path, monkeypatch, capsys):
    """train.py, teacher_cache.py and lens.py, each in fp32 and bf16, on this CPU: sdpa, and why, at start-up."""
    data_flags = ["--data", str(setup / "train.jsonl"), "--max-len", "256", "--data-cache", str(setup / "tokenized")]
    run_in_process(train_args(setup, tmp_path / "run", "--max-steps", "1", "--micro-batch-size", "8", "--dtype",
                              dtype, "--save-minutes", "0"), monkeypatch)
    assert len(metrics(setup, tmp_path / "run")) == 1
    run_in_process(["--teacher", str(setup / "teacher"), "--tokenizer", str(setup / "student"), *data_flags, "--k", "8",
                    "--out", str(tmp_path / "cache"), "--dtype", dtype], monkeypatch, str(ROOT / "teacher_cache.py"))
    built_in = teacher_cache.TeacherCache(tmp_path / "cache").meta["dtype"]
    assert built_in == {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    run_in_process(["--student", str(setup / "student"), "--teacher-cache", str(tmp_path / "cache"), *data_flags,
                    "--samples", "1", "--out", str(tmp_path / "lens"), "--dtype", dtype], monkeypatch,
                   str(ROOT / "lens.py"))
    assert (tmp_path / "lens" / "lens.json").is_file()
    out = capsys.readouterr().out
    assert f"attention: sdpa (flash-attn needs a CUDA device), {dtype}, on padded micro-batches" in out
    assert out.count("attention: sdpa (flash-attn needs a CUDA device)") == 3


# --- The varlen arguments reach the attention call --------------------------------------------------------

VARLEN = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


@pytest.fixture
def recording_attention():
    """An attention implementation that records the varlen arguments of each call, then runs sdpa."""
    calls = []

    def recording(module, query, key, value, attention_mask, **kwargs):
        calls.append({name: kwargs.get(name) for name in VARLEN})
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    AttentionInterface.register("recording", recording)
    AttentionMaskInterface.register("recording", sdpa_mask)
    return calls


def expected_varlen(tokens, batches):
    """What each packed row must hand the attention: its sequences' offsets, and the longest as a Python int."""
    for sample_ids in batches:
        lengths = [len(tokens.input_ids(i)) for i in sample_ids]
        yield np.concatenate([[0], np.cumsum(lengths)]).tolist(), max(lengths)


def assert_calls_carry(calls, expected, layers):
    assert len(calls) == layers * len(expected)
    for at, (offsets, longest) in enumerate(expected):
        for call in calls[at * layers:(at + 1) * layers]:
            assert call["cu_seq_lens_q"].tolist() == call["cu_seq_lens_k"].tolist() == offsets
            assert call["cu_seq_lens_q"].dtype == torch.int32
            assert type(call["max_length_q"]) is int and call["max_length_q"] == call["max_length_k"] == longest


def test_the_cache_build_and_the_lens_pass_the_varlen_arguments(setup, recording_attention, tmp_path):
    tokens = data.tokenize_dataset(setup / "train.jsonl", AutoTokenizer.from_pretrained(setup / "student"),
                                   max_len=256, cache_dir=setup / "tokenized")
    teacher = AutoModelForCausalLM.from_pretrained(setup / "teacher", attn_implementation="recording")
    layers = teacher.config.num_hidden_layers
    teacher_cache.build(teacher, tokens, tmp_path / "cache", k=8, batch_tokens=300)
    batches = teacher_cache.fixed_batches(tokens, 300)
    assert len(batches) > 2
    assert_calls_carry(recording_attention, list(expected_varlen(tokens, batches)), layers)
    cache = teacher_cache.TeacherCache(tmp_path / "cache", tokens)
    plain = AutoModelForCausalLM.from_pretrained(setup / "teacher", attn_implementation="eager")
    for i in (0, 13, len(tokens) - 1):  # each sequence of a packed row as if run alone
        logprobs, labels = alone(plain, tokens, i)
        assert np.allclose(cache.rows([i])[2].double(), logprobs.gather(1, labels[:, None]).squeeze(1), atol=2e-6)

    recording_attention.clear()
    student = AutoModelForCausalLM.from_pretrained(setup / "student", attn_implementation="recording")
    p_student = lens.label_probs(student, tokens, batch_tokens=300)
    assert_calls_carry(recording_attention, list(expected_varlen(tokens, batches)), layers)
    plain = AutoModelForCausalLM.from_pretrained(setup / "student", attn_implementation="eager")
    offsets = cache.offsets
    for i in (0, 13, len(tokens) - 1):
        logprobs, labels = alone(plain, tokens, i)
        assert np.allclose(p_student[offsets[i]:offsets[i + 1]], logprobs.gather(1, labels[:, None]).squeeze(1).exp(),
                           atol=2e-6)


def test_train_py_packed_micro_batches_pass_the_varlen_arguments(setup, recording_attention, monkeypatch):
    """A packed step hands each layer its micro-batch's offsets, and trains as the padded run does."""
    run_in_process(train_args(setup, "padded-step", "--micro-batch-size", "8", "--max-steps", "1"), monkeypatch)
    assert not recording_attention
    monkeypatch.setattr(common, "attention_implementation", lambda device, dtype: ("recording", "a test's"))
    run_in_process(train_args(setup, "packed-recorded", "--micro-batch-size", "8", "--layout", "packed",
                              "--max-steps", "1"), monkeypatch)
    layers = AutoModelForCausalLM.from_pretrained(setup / "student").config.num_hidden_layers
    forwards = [call for call in recording_attention if call["cu_seq_lens_q"] is not None]
    assert len(forwards) == len(recording_attention) and len(forwards) % layers == 0 and forwards
    for call in forwards:
        offsets = call["cu_seq_lens_q"]
        assert type(call["max_length_q"]) is int and call["max_length_q"] == int(offsets.diff().max())
        assert offsets[0] == 0 and len(offsets) == 9  # the micro-batch's 8 sequences
    assert metrics(setup, "packed-recorded")[0]["loss"] == pytest.approx(metrics(setup, "padded-step")[0]["loss"],
                                                                         rel=1e-5)
