"""lens.py: Figure 4's quadrants hand-checked and as train.py logs them, the whole data set's counts, the
shares train.py logs at a step that holds the whole data set, tokens.html, sharding over ranks, refusals."""
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import data
import demo
import lens
import loss as qloss
import teacher_cache
from conftest import alone, outside_any_world

ROOT = Path(__file__).resolve().parent.parent
ENV = outside_any_world(OMP_NUM_THREADS="1")


def test_quadrants_hand_checked_and_as_train_py_logs_them():
    p_student = np.array([0.1, 0.1, 0.9, 0.9, 0.5, 0.2])
    p_teacher = np.array([0.9, 0.1, 0.9, 0.1, 0.5, 0.7])
    assert lens.quadrant_of(p_student, p_teacher, 0.5).tolist() == [0, 1, 2, 3, 2, 0]
    assert list(lens.shares(p_student, p_teacher, 0.5).values()) == pytest.approx([2 / 6, 1 / 6, 2 / 6, 1 / 6])
    p_student, p_teacher = np.random.default_rng(0).random((2, 1000))
    per_row = qloss.PerRow(torch.from_numpy(p_student), torch.ones(1000), torch.zeros(1000),
                           torch.from_numpy(p_teacher))
    sums = per_row.sums(torch.zeros(1000, dtype=torch.long), torch.ones(1000, 1, dtype=torch.long), 0.3, "teacher")
    logged = [float(sums[key]) / 1000 for key in qloss.QUADRANTS]
    assert list(lens.shares(p_student, p_teacher, 0.3).values()) == pytest.approx(logged)


@pytest.mark.parametrize("threshold", [0.5, 0.2])
def test_logged_sums_of_one_loss_pass_against_direct_computation(threshold):
    """train.py's logged sums from q_target_loss's PerRow values: Figure 4's quadrants (Q1 rescue: p_T high,
    p_theta low; Q2 filter: both low; Q3 both high; Q4 p_theta high, p_T low), the labels in the cache's top-k,
    p_theta(y), p_T(y) and gamma, against p_theta and p_T computed directly."""
    n, v, k = 41, 96, 8
    g = torch.Generator().manual_seed(14)
    labels = torch.randint(0, v, (n,), generator=g)
    logits = torch.randn(n, v, generator=g)
    logits[torch.arange(n), labels] += torch.rand(n, generator=g) * 10  # p_theta(y) spread over (0, 1)
    t_logp, t_ids = torch.randn(n, v, generator=g).log_softmax(-1).topk(k, dim=-1)
    t_ids[::3, 0] = labels[::3]  # a third of the labels in the cache's top-k
    t_label = torch.rand(n, generator=g).log()  # p_T(y) spread over (0, 1)
    # hidden = logits and an identity lm_head: the student's logits are set directly
    _, per_row = qloss.q_target_loss(logits, torch.eye(v), labels, qloss.Side(t_ids, t_logp, t_label),
                                     loss="target", chunk_size=5)
    sums = per_row.sums(labels, t_ids, threshold, "teacher")
    p_s = logits.double().softmax(-1).gather(1, labels[:, None]).squeeze(1)
    p_t = t_label.double().exp()
    s_hi, t_hi = p_s >= threshold, p_t >= threshold
    expected = {"q1_rescue": t_hi & ~s_hi, "q2_filter": ~t_hi & ~s_hi, "q3_both_high": t_hi & s_hi,
                "q4_student_high": s_hi & ~t_hi}
    for key, mask in expected.items():
        assert int(sums[key]) == int(mask.sum()) > 0, key  # every quadrant is exercised
    assert sum(int(sums[key]) for key in expected) == n
    assert int(sums["in_topk"]) == int((t_ids == labels[:, None]).any(-1).sum()) >= n // 3
    for key, direct in (("p_label", p_s), ("trust", p_s), ("residual", 1 - p_s), ("p_teacher_label", p_t)):
        assert math.isclose(float(sums[key]), float(direct.sum()), rel_tol=1e-5), key
    # the starting model's own cache (kl, asft, psft) logs its p(y) as p_ref_label and no quadrants; no cache, neither
    assert list(per_row.sums(labels, t_ids, threshold, "ref")) == ["p_label", "trust", "residual", "in_topk",
                                                                   "p_ref_label"]
    assert list(per_row.sums(labels, None, threshold, None)) == ["p_label", "trust", "residual"]


def run_lens(setup, out, *extra, nproc=1):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    command = (torchrun if nproc > 1 else [sys.executable]) + [
        str(ROOT / "lens.py"), "--student", str(setup / "student"), "--teacher-cache", str(setup / "cache"),
        "--data", str(setup / "train.jsonl"), "--max-len", "256", "--data-cache", str(setup / "tokenized"),
        "--out", str(out), *extra]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def lensed(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("lens") / "out"
    result = run_lens(setup, out, "--samples", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def tokens_of(setup):
    return data.tokenize_dataset(setup / "train.jsonl", AutoTokenizer.from_pretrained(setup / "student"),
                                 max_len=256, cache_dir=setup / "tokenized")


def test_lens_json_counts_every_label_token_of_the_cache_against_a_plain_forward(setup, lensed):
    out, stdout = lensed
    lens_json = json.loads((out / "lens.json").read_text())
    cache = teacher_cache.TeacherCache(setup / "cache")
    quadrants = lens_json["quadrants"]
    assert sum(q["count"] for q in quadrants.values()) == lens_json["labels"] == cache.meta["labels"]
    assert sum(q["share"] for q in quadrants.values()) == pytest.approx(1)
    # independently: p_theta from a plain forward of each sample alone, p_T from the cache's label log-probs
    tokens, model = tokens_of(setup), AutoModelForCausalLM.from_pretrained(setup / "student").eval()
    p_student, label_ids = [], []
    for i in range(len(tokens)):
        logp, labels = alone(model, tokens, i)
        p_student.append(logp.gather(1, labels[:, None])[:, 0].exp().numpy())
        label_ids.append(labels.numpy())
    p_student, label_ids = np.concatenate(p_student), np.concatenate(label_ids)
    p_teacher = np.exp(cache.label_logprobs.astype(np.float64))
    index = np.where(p_teacher >= 0.5, np.where(p_student >= 0.5, 2, 0), np.where(p_student >= 0.5, 3, 1))
    tokenizer = AutoTokenizer.from_pretrained(setup / "student")
    for k, name in enumerate(qloss.QUADRANTS):
        assert quadrants[name]["count"] == int((index == k).sum())
        ids, counts = np.unique(label_ids[index == k], return_counts=True)
        expected = sorted(zip(counts.tolist(), ids.tolist()), key=lambda pair: -pair[0])[:20]
        assert [n for _, n in quadrants[name]["top_tokens"]] == [n for n, _ in expected]
        decoded = {tokenizer.decode([i]) for n, i in expected if n == expected[0][0]}
        assert not expected or quadrants[name]["top_tokens"][0][0] in decoded
    assert lens_json["mean_p_student"] == pytest.approx(p_student.mean(), rel=1e-5)
    assert lens_json["mean_p_teacher"] == pytest.approx(p_teacher.mean(), rel=1e-9)
    assert lens_json["inputs"]["teacher"] == cache.meta["teacher"] and lens_json["inputs"]["samples_covered"] == 32
    assert "Q1 rescue" in stdout and (out / "figure4.png").stat().st_size > 10_000


def test_shares_equal_train_py_logged_at_a_step_holding_the_whole_data_set(setup, lensed, tmp_path):
    out, _ = lensed
    command = [sys.executable, str(ROOT / "train.py"), "--model", str(setup / "student"), "--data",
               str(setup / "train.jsonl"), "--max-len", "256", "--data-cache", str(setup / "tokenized"),
               "--teacher-cache", str(setup / "cache"), "--loss", "target", "--global-batch-size", "32",
               "--max-steps", "1", "--dtype", "fp32", "--out", str(tmp_path / "run")]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (step,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lens_json = json.loads((out / "lens.json").read_text())
    assert step["tokens"] == lens_json["labels"]
    for name in qloss.QUADRANTS:
        assert step[name] == pytest.approx(lens_json["quadrants"][name]["share"], abs=1e-12)
    assert step["p_label"] == pytest.approx(lens_json["mean_p_student"], rel=1e-5)
    assert step["p_teacher_label"] == pytest.approx(lens_json["mean_p_teacher"], rel=1e-6)


def test_tokens_html_shows_both_regimes_with_the_target_rule_on_hover(setup, lensed):
    out, _ = lensed
    page = (out / "tokens.html").read_text()
    headers = re.findall(r"<h3>Sample (\d+) &nbsp; Rescue · (\d+) &nbsp; Filter · (\d+) &nbsp; Response · (\d+) "
                         r"tokens</h3>", page)
    assert len(headers) == 3
    tokens, cache = tokens_of(setup), teacher_cache.TeacherCache(setup / "cache")
    p_student = lens.label_probs(AutoModelForCausalLM.from_pretrained(setup / "student").eval(), tokens)
    quadrant = lens.quadrant_of(p_student, np.exp(cache.label_logprobs.astype(np.float64)), 0.5)
    per_sample = np.split(quadrant, cache.offsets[1:-1])
    best = sorted((-min((q == 0).sum(), (q == 1).sum()), -((q == 0) | (q == 1)).sum(), i)
                  for i, q in enumerate(per_sample))[:3]
    assert [int(i) for i, *_ in headers] == [i for *_, i in best]  # ranked by the smaller of the two counts
    for i, rescue, filtered, n in headers:
        q = per_sample[int(i)]
        assert (int(rescue), int(filtered), int(n)) == ((q == 0).sum(), (q == 1).sum(), len(q))
    tips = re.findall(r'title="([^"]*)"', page)
    assert len(tips) == sum(int(n) for *_, n in headers)
    # TARGET-SFT's gamma is p_theta(y_t) itself (Eq. 7): every tip shows the same number twice
    for tip in tips:
        p_theta, gamma = re.search(r"p_θ=([\d.]+) p_T=[\d.]+ γ=([\d.]+)", tip).groups()
        assert abs(float(p_theta) - float(gamma)) <= 0.0015 and "res (η=0.5) top:" in tip


def test_two_ranks_give_the_same_lens(setup, lensed, tmp_path):
    out, _ = lensed
    result = run_lens(setup, tmp_path / "two", "--samples", "3", nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (json.loads((o / "lens.json").read_text()) for o in (out, tmp_path / "two"))
    assert {k: v for k, v in one.items() if k != "inputs"} == {k: v for k, v in two.items() if k != "inputs"}


def test_a_subset_counts_its_own_label_tokens(setup, tmp_path):
    result = run_lens(setup, tmp_path / "five", "--max-samples", "5", "--samples", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    lens_json = json.loads((tmp_path / "five" / "lens.json").read_text())
    assert lens_json["labels"] == int(tokens_of(setup).label_counts()[:5].sum())


def test_a_student_of_other_token_ids_is_refused(setup, tmp_path):
    """The cache was built on the student's tokenizer: a student with another is refused as train.py refuses
    it, in one line, before anything is written."""
    tokenizer = demo.make_tokenizer(400)
    other = demo.save_model(tmp_path / "other", tokenizer, demo.make_model(tokenizer))
    result = run_lens(setup, tmp_path / "refused", "--student", str(other))
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "was built on data" in line and "rebuild the cache" in line
    assert not (tmp_path / "refused").exists()
