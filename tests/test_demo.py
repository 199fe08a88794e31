"""demo.py: the toy world against plain integer arithmetic, and `--quick` end to end through the real scripts
(every stage's artifact checked, a rerun that redoes nothing, the refusals before any work)."""
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import data
import demo
import lens
import teacher_cache

REPO = Path(__file__).resolve().parent.parent
ROWS = ["Base", "SFT", "SFT (p)", "Distill", "TARGET-SFT", "Teacher (reference)"]


def chain_lines(response):
    """(value, step, written sum) per chain-of-thought line, read back from the text."""
    return [tuple(map(int, m.groups())) for m in demo.LINE.finditer(response)]


def test_clean_chain_is_repeated_addition():
    rng = random.Random(1)
    for _ in range(300):
        start, step = demo.sample_problem(rng, "any")
        text = demo.response(start, step)
        assert demo.question(start, step) == f"What is {start}+{step}+{step}+{step}?"
        assert text.endswith(f"\\boxed{{{start + 3 * step}}}")
        assert chain_lines(text) == [(start + i * step, step, start + (i + 1) * step) for i in range(3)]
        assert all(len(str(v)) == 3 for line in chain_lines(text) for v in (line[0], line[2]))


def test_noise_rates_and_the_answer_survive_noise():
    rng = random.Random(2)
    lines = wrong = fillers = 0
    for _ in range(2000):
        start, step = demo.sample_problem(rng, "any")
        text = demo.response(start, step, rng, filler=0.3, wrong=0.2)
        assert text.endswith(f"\\boxed{{{start + 3 * step}}}")  # the noise is in the reasoning, not the answer
        clean, noisy = chain_lines(demo.response(start, step)), chain_lines(text)
        assert [n[:2] for n in noisy] == [c[:2] for c in clean]  # a slip does not carry into the next line
        wrong += sum(n[2] != c[2] for n, c in zip(noisy, clean))
        fillers += sum(text.count(f"{f},") for f in demo.FILLERS)
        lines += len(clean)
    assert wrong / lines == pytest.approx(0.2, abs=0.02)
    assert fillers / lines == pytest.approx(0.3, abs=0.02)


def test_problem_kinds_by_the_tens_digit():
    rng = random.Random(3)
    for kind in ("none", "all"):
        for _ in range(200):
            start, step = demo.sample_problem(rng, kind)
            values = [start + i * step for i in range(4)]
            tens_changes = [a // 10 != b // 10 for a, b in zip(values, values[1:])]
            assert all(tens_changes) if kind == "all" else not any(tens_changes)
            assert 100 <= start and values[-1] <= 999


def test_parse_loss():
    assert demo.parse_loss("target --eta 1.0") == ["--loss", "target", "--eta", "1.0"]
    assert demo.parse_loss("beyond-log") == ["--loss", "beyond-log"]
    for bad, message in (("targt", "unknown loss 'targt'"), ("target --eta 2", "outside [0, 1]"),
                         ("sft --c 0.5", "not of 'sft'"), ("dft --alpha 2", "takes no hyperparameters"),
                         ("dft --eta", "pairs of"), ("weighted", "label weights")):
        with pytest.raises(ValueError, match=re.escape(message)):
            demo.parse_loss(bad)


def demo_cmd(out, *extra):
    return [sys.executable, "demo.py", "--quick", "--backend", "hf", "--out", str(out), *extra]


def test_bad_input_refused_before_work(tmp_path):
    proc = subprocess.run(demo_cmd(tmp_path / "a", "--losses", "sft,nope --c 1"), cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "unknown loss 'nope'" in proc.stderr
    assert not (tmp_path / "a").exists()


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "quick"
    proc = subprocess.run(demo_cmd(out), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_quick_artifacts(quick):
    out, stdout = quick
    world = demo.WORLDS["quick"]
    meta = json.loads((out / "cache" / "teacher" / "meta.json").read_text())
    assert meta["k"] == demo.TOP_K and meta["samples"] == world["sft"]
    for name, steps in [("base", world["base_steps"]), ("teacher", world["teacher_steps"])] + [
            (demo.run_name(spec, 0), world["sft_steps"]) for spec in demo.TABLE1]:
        metrics = [json.loads(line) for line in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == list(range(1, steps + 1))
        assert all(np.isfinite(m["loss"]) for m in metrics)
        assert AutoModelForCausalLM.from_pretrained(out / "runs" / name / "hf").config.model_type == "qwen2"
    commands = [line.split()[line.split().index("python") + 1] for line in stdout.splitlines() if line.startswith("$ ")]
    assert {script: commands.count(script) for script in set(commands)} == {
        "train.py": 6, "teacher_cache.py": 1, "eval.py": 1, "loss.py": 1}  # every stage's command is printed
    # the SFT runs went side by side, each into its own log; the six models were evaluated by one eval.py
    assert all((out / "runs" / demo.run_name(spec, 0) / "train.log").read_text().count("done: ") == 1
               for spec in demo.TABLE1)
    summary = (out / "summary.md").read_text().splitlines()
    for row, name in zip(ROWS, ["base", *(demo.run_name(spec, 0) for spec in demo.TABLE1), "teacher"]):
        results = json.loads((out / "eval" / name / "results.json").read_text())
        for split in demo.SPLITS:
            assert results["benchmarks"][split]["n"] == world["n"]
            assert results["benchmarks"][split]["problems"] == world["eval"]
        cells = next(line for line in summary if line.startswith(f"| {row} |")).split("|")[2:5]
        averages = [results["benchmarks"][split]["average"] for split in demo.SPLITS]
        assert [float(c) for c in cells] == pytest.approx([*averages, np.mean(averages)], abs=0.006)
    for png in ("results.png", "figure4.png", "figure3.png", "runs/base/metrics.png"):
        assert min(plt.imread(out / png).shape[:2]) > 100
    html = (out / "tokens.html").read_text()
    labels = sft_tokens(out).label_counts()
    shown = re.findall(r"<h3>Sample (\d+) &nbsp; Rescue · \d+ &nbsp; Filter · \d+ &nbsp; Response · (\d+) tokens</h3>",
                       html)
    assert len(shown) == 4 and all(int(n) == labels[int(i)] for i, n in shown)
    assert json.loads((out / "lens.json").read_text())["labels"] == labels.sum()  # lens.py's outputs, in-process
    assert html.count("<span style") == 4 + sum(int(n) for _, n in shown)  # the legend, then a span per label
    assert any(line.startswith("| TARGET-SFT (after) |") for line in summary)


def sft_tokens(out):
    tokenizer = AutoTokenizer.from_pretrained(out / "runs" / "base" / "hf")
    return data.tokenize_dataset(out / "world" / "sft.jsonl", tokenizer, max_len=demo.MAX_LEN,
                                 cache_dir=out / "cache" / "tokenized")


def test_quick_label_probs_match_an_unpacked_forward(quick):
    """analysis/base.npy (packed batches) against the base student run on sample 0 alone, and the printed
    Base quadrant shares against those recomputed from it and the cache's label log-probs."""
    out, stdout = quick
    base = out / "runs" / "base" / "hf"
    tokens = sft_tokens(out)
    ids = torch.tensor(np.asarray(tokens.input_ids(0), dtype=np.int64))[None]
    labels = torch.from_numpy(tokens.labels(0))
    with torch.no_grad():
        logp = AutoModelForCausalLM.from_pretrained(base).eval()(ids).logits[0].double().log_softmax(-1)
    expected = logp[labels != -100].gather(1, labels[labels != -100, None])[:, 0].exp().numpy()
    p_base = np.load(out / "analysis" / "base.npy")
    assert len(p_base) == tokens.label_counts().sum()
    np.testing.assert_allclose(p_base[:len(expected)], expected, rtol=1e-4, atol=1e-6)
    p_teacher = np.exp(teacher_cache.TeacherCache(out / "cache" / "teacher", data=tokens).label_logprobs)
    shares = lens.shares(p_base, p_teacher, demo.THRESHOLD)
    summary = (out / "summary.md").read_text().splitlines()
    base_row = next(line for line in summary if line.startswith("| Base (before)"))
    assert base_row.split("|")[2:6] == [f" {s:.1%} " for s in shares.values()]


def test_quick_rerun_redoes_nothing_and_other_config_is_refused(quick):
    out, _ = quick
    proc = subprocess.run(demo_cmd(out), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    commands = [line for line in proc.stdout.splitlines() if line.startswith("$ ")]
    assert all("loss.py --plot" in c for c in commands), commands
    other = subprocess.run(demo_cmd(out, "--seed", "1"), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert other.returncode != 0 and "another configuration" in other.stderr and "'seed': (0, 1)" in other.stderr
