"""The pipeline on real pretrained LMs (from PyPI, real_models.py): SmolLM2-135M-Instruct (Llama, 49,152
tokens, tied embeddings, ChatML) and Gemma-3-270M (a base model: 262,144 tokens, sliding-window attention,
head_dim 256, Gemma's turn layout added as a user would copy it). On each: teacher_cache.py with the model as
its own teacher, torchrun --nproc_per_node 2 train.py --loss target, the export, eval.py through vLLM on real
MATH-500 rows, lens.py; every property checked against an independent computation. Small on purpose: eight
MATH-500 solutions, one step, one vLLM start per model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import data
import eval as evaluation
import generation
import teacher_cache
from conftest import MATH16, alone, outside_any_world
from real_models import REAL_MODELS, real_model

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data"
ENV = outside_any_world(VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
MAX_TOKENS = 48
HELPFUL = "You are a helpful assistant."  # short questions under it: SmolLM2 answers and ends its turn


def run(*command):
    result = subprocess.run([sys.executable, *map(str, command)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module", params=list(REAL_MODELS))
def pipeline(request, tmp_path_factory):
    model = real_model(request.param)
    root = tmp_path_factory.mktemp(request.param)
    (root / "sft.jsonl").write_text("".join(MATH16.read_text().splitlines(keepends=True)[:8]))
    data_flags = ["--data", root / "sft.jsonl", "--max-len", 256, "--data-cache", root / "tok"]
    run("teacher_cache.py", "--teacher", model, *data_flags, "--out", root / "cache")
    run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", 2, "train.py", "--model", model, *data_flags,
        "--teacher-cache", root / "cache", "--loss", "target", "--global-batch-size", 8, "--micro-batch-size", 4,
        "--max-steps", 1, "--warmup-ratio", 0, "--dtype", "fp32", "--out", root / "run")
    run("eval.py", "--model", root / "run" / "hf", "--benchmarks",
        f"math500={DATA / 'math500.jsonl'},short={DATA / 'short_questions.jsonl'}", "--n", 1, "--temperature", 0,
        "--max-tokens", MAX_TOKENS, "--protocol", "strict", "--system-prompt", HELPFUL, "--enforce-eager",
        "--workers", 1, "--out", root / "eval")
    run("lens.py", "--student", model, "--teacher-cache", root / "cache", *data_flags, "--out", root / "lens")
    tokens = data.tokenize_dataset(root / "sft.jsonl", AutoTokenizer.from_pretrained(model), max_len=256,
                                   cache_dir=root / "tok")
    return request.param, model, root, tokens


@pytest.fixture(scope="module")
def float64(pipeline):
    """Each sample run alone through a float64 copy of the model: log pi at its label positions, and labels."""
    name, model, root, tokens = pipeline
    reference = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float64).eval()
    return [alone(reference, tokens, i) for i in range(len(tokens))]


def test_the_cache_is_a_float64_forward_of_the_same_ids(pipeline, float64):
    name, model, root, tokens = pipeline
    cache = teacher_cache.TeacherCache(root / "cache", tokens, 64)
    high = []
    for i, (direct, labels) in enumerate(float64):
        ids, logprobs, label_logprobs = cache.rows([i])
        torch.testing.assert_close(label_logprobs.double(), direct.gather(1, labels[:, None])[:, 0], atol=2e-4,
                                   rtol=0)
        tol = 2e-4 + direct.abs().max() * 2.0 ** -11  # fp32 compute, then fp16's precision in storage
        torch.testing.assert_close(logprobs.double(), direct.gather(1, ids), atol=tol, rtol=0)
        assert (logprobs.double() >= direct.topk(65, -1).values[:, -1:] - tol).all()  # none outside beats one in
        high.append(ids.max().item())
    if name == "gemma3-270m":  # ids past 2^17 set int32's sign bit when packed: they must come back whole
        assert max(high) >= 1 << 17 and max(high) < 1 << 18


def test_step_one_with_the_model_as_its_own_teacher(pipeline, float64):
    """The teacher is the student: at step 1 the logged p_label equals p_teacher_label (fp32), and the loss is
    CE(Q, p) with Q = p_y onehot + (1 - p_y) res, res proportional to p^(1-eta) p_T^eta on the cached top-64
    (Eq. 7-8), here from float64 full logits; the step holds all eight samples."""
    name, model, root, tokens = pipeline
    (step,) = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert step["p_label"] == pytest.approx(step["p_teacher_label"], rel=1e-5)
    cache = teacher_cache.TeacherCache(root / "cache", tokens, 64)
    total, count = 0.0, 0
    for i, (logp, labels) in enumerate(float64):
        ids, logprobs, _ = cache.rows([i])
        p_y = logp.gather(1, labels[:, None])[:, 0].exp()
        logp_ids = logp.gather(1, ids)
        res = (0.5 * logp_ids + 0.5 * logprobs.double().log_softmax(-1)).softmax(-1)
        total += -(p_y * p_y.log() + (1 - p_y) * (res * logp_ids).sum(-1)).sum().item()
        count += len(labels)
    assert step["tokens"] == count
    assert step["loss"] == pytest.approx(total / count, rel=1e-4)


def item(row):
    """The problem a generations.jsonl row answered."""
    return {key: row[key] for key in ("question", "answer", "options")}


def test_the_fp32_export_greedy_decodes_alike_in_transformers_and_vllm(pipeline):
    name, model, root, tokens = pipeline
    exported = root / "run" / "hf"
    assert json.loads((exported / "config.json").read_text())["dtype"] == "float32"
    rows = [json.loads(line) for line in (root / "eval" / "generations.jsonl").read_text().splitlines()]
    results = json.loads((root / "eval" / "results.json").read_text())
    assert results["backend"] == "vllm" and len(rows) == 3 + 2
    tokenizer = AutoTokenizer.from_pretrained(exported)
    style = (tokenizer.chat_template, HELPFUL, "")
    stop = evaluation.stop_ids(tokenizer, style)
    prompts = [evaluation.prompt_ids(tokenizer, item(row), style) for row in rows]
    sampling = {"n": 1, "temperature": 0.0, "top_p": 1.0, "max_tokens": MAX_TOKENS, "seed": 0}
    requests = [(i, ids, sampling, stop, 0) for i, ids in enumerate(prompts)]
    hf = [samples for finished in generation.stream_hf(generation.load_hf(str(exported)), requests)
          for _, samples in finished]
    assert [(r["response"], r["tokens"], r["truncated"]) for r in rows] == [s[0] for s in hf]


@pytest.mark.parametrize("pipeline", ["smollm2-135m-instruct"], indirect=True)  # Gemma-3-270M is a base model
def test_the_instruct_model_ends_its_turn(pipeline):
    """SmolLM2-Instruct answers a short question and stops at <|im_end|>, before max tokens; the one sample
    per question holds no token after its end-of-turn: transformers' greedy answer ends with <|im_end|>, its
    first, at exactly vLLM's length."""
    name, model, root, tokens = pipeline
    rows = [json.loads(line) for line in (root / "eval" / "generations.jsonl").read_text().splitlines()]
    short = [r for r in rows if r["benchmark"] == "short"]
    assert short and all(not r["truncated"] and r["tokens"] < MAX_TOKENS for r in short), short
    tokenizer = AutoTokenizer.from_pretrained(root / "run" / "hf")
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn in json.loads((root / "eval" / "results.json").read_text())["benchmarks"]["short"][
        "stop_token_ids"]
    exported = AutoModelForCausalLM.from_pretrained(root / "run" / "hf").eval()
    for r in short:
        ids = evaluation.prompt_ids(tokenizer, item(r), (tokenizer.chat_template, HELPFUL, ""))
        with torch.no_grad():
            out = exported.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=MAX_TOKENS,
                                    eos_token_id=[end_of_turn], pad_token_id=end_of_turn)[0, len(ids):].tolist()
        assert out.index(end_of_turn) == len(out) - 1 == r["tokens"] - 1
        assert "<|im_start|>" not in tokenizer.decode(out)


def test_lens_on_the_diagonal(pipeline):
    """Teacher = student: p_T(y_t) is p_theta(y_t) to the bit (the same scoring code), so every label token
    sits on Figure 4's diagonal: no rescue and no student-high token; the counts add up to the cache's labels."""
    name, model, root, tokens = pipeline
    lens_json = json.loads((root / "lens" / "lens.json").read_text())
    quadrants = lens_json["quadrants"]
    assert sum(q["count"] for q in quadrants.values()) == teacher_cache.TeacherCache(root / "cache").meta["labels"]
    assert quadrants["q1_rescue"]["count"] == quadrants["q4_student_high"]["count"] == 0
    assert lens_json["mean_p_student"] == pytest.approx(lens_json["mean_p_teacher"], rel=1e-6)
    assert quadrants["q2_filter"]["count"] > 0 and quadrants["q3_both_high"]["count"] > 0


def test_a_base_model_without_a_chat_template_is_one_error_line(tmp_path):
    """Gemma-3-270M as shipped has no template: the existing one-line refusal, before any model loads."""
    bare = tmp_path / "gemma3-270m-bare"
    bare.mkdir()
    for f in real_model("gemma3-270m").iterdir():
        if f.name != "chat_template.jinja":
            (bare / f.name).symlink_to(f)
    result = subprocess.run([sys.executable, "teacher_cache.py", "--teacher", str(bare), "--data", str(MATH16),
                             "--data-cache", str(tmp_path / "tok"), "--out", str(tmp_path / "cache")], cwd=ROOT,
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "has no chat template" in line and "chat_template.jinja" in line
