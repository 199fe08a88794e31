"""eval.py's graders, metrics, data loading and input checks, against hand-checked answers."""
import math
import os
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from huggingface_hub import constants

import benchmarks
import compare
import data
import eval as evaluation
import generation
import grading
from common import UserError
from conftest import hub_snapshot

DATA = Path(__file__).parent / "data"

MATH_CASES = [  # (response, gold, correct under --protocol paper, under strict), each checked by hand
    ("so $x = \\frac{1}{2}$, i.e. \\boxed{0.5}", "\\frac{1}{2}", True, True),
    ("\\boxed{\\dfrac{14}{3}}", "\\frac{14}{3}", True, True),
    ("\\boxed{\\frac{14}{3}}", "\\frac{3}{14}", False, False),
    ("\\boxed{[0, 1)}", "[0,1)", True, True),
    ("\\boxed{(0, 1]}", "[0,1)", False, False),
    ("\\boxed{\\{3, 2, 1\\}}", "\\{1,2,3\\}", True, True),
    ("\\boxed{\\{1, 2\\}}", "\\{1,2,3\\}", False, False),
    ("first \\boxed{3}, then on reflection \\boxed{5}", "5", True, True),
    ("first \\boxed{3}, then on reflection \\boxed{5}", "3", False, False),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", True, True),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "(3, \\frac{\\pi}{2})", True, True),
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", True, True),
    ("\\boxed{\\text{Bob}}", "\\text{Evelyn}", False, False),
    ("\\boxed{\\frac{1}{2n+2}}", "$\\frac{1}{2 n+2}$", True, True),  # OlympiadBench golds come wrapped in $
    ("\\boxed{18.90}", "\\$18.90", True, True),  # an escaped dollar is not LaTeX math mode
    ("\\boxed{x = 3}", "3", True, True),
    ("\\boxed{4}", "5", False, False),
    ("\\boxed{}", "0", False, False),
    ("\\boxed{  }", "0", False, False),
    ("", "5", False, False),
    # a box holding $...$ or prose around math (point 3 of issue 10)
    ("\\boxed{Solution is: $[x=2, y=4, z=5]$}", "Solution is: $[x=2, y=4, z=5]$", True, True),
    ("\\boxed{The value is $7$}", "7", True, True),
    ("\\boxed{The value is $7$}", "8", False, False),
    # golds that are prose or several $...$ pieces: a box holding the gold's text grades right, another wrong
    ("\\boxed{A solution exists and is unique.}", "A solution exists and is unique.", True, True),
    ("\\boxed{A solution exists but is not unique.}", "A solution exists and is unique.", False, False),
    ("\\boxed{x=\\frac{\\pi}{3}+\\pi k$ or $x=\\frac{2 \\pi}{3}+\\pi k}",
     "$x=\\frac{\\pi}{3}+\\pi k$ or $x=\\frac{2 \\pi}{3}+\\pi k$", True, True),
    ("\\boxed{x=\\frac{\\pi}{3}+\\pi k$ or $x=\\frac{\\pi}{6}+\\pi k}",
     "$x=\\frac{\\pi}{3}+\\pi k$ or $x=\\frac{2 \\pi}{3}+\\pi k$", False, False),
    ("\\boxed{69, 84}", "$69$,$84$", True, True),
    ("\\boxed{69, 85}", "$69$,$84$", False, False),
    # the harness's fallbacks, in its order; strict reads only a closed \\boxed{...}
    ("Final Answer: The final answer is $\\frac{3}{4}$. I hope it is correct.", "\\frac34", True, False),
    ("\\boxed{2}. The final answer is $3$. I hope it is correct.", "3", True, False),  # 1. before 2.
    ("\\boxed{2}. The final answer is $3$. I hope it is correct.", "2", False, True),
    ("so \\boxed 5$ and more", "5", True, False),  # 2. "boxed" without braces: up to the next $
    ("\\boxed{5", "5", True, False),  # 2. an unclosed box runs to the end
    ("\\fbox{27}", "27", True, True),  # no "boxed" in it: the harness falls back to the last number
    ("So the answer is $\\frac{1}{2}$.", "0.5", True, False),  # 3. "he answer is"
    ("The answer is 5.", "5", True, False),
    # 3. everything after the phrase: the harness's own comparator fails "5. Check: 2 + 3 = 5" against 5;
    # math-verify reads the 5 out of it (README: where the verdicts can differ)
    ("The answer is 5. Check: 2 + 3 = 5.", "5", True, False),
    ("My final answer is 7", "7", True, False),  # 4. "final answer is"
    ("x is 2 and y is 1,024", "1024", True, False),  # 5. the last number, thousands separators dropped
    ("x is 2 and y is 1,024", "2", False, False),
    ("no number here", "0", False, False),
]


@pytest.mark.parametrize("response,gold,paper,strict", MATH_CASES)
def test_grade_math_under_both_protocols(response, gold, paper, strict):
    assert grading.grade_math(response, gold) is paper  # the paper's protocol is the default
    assert grading.grade_math(response, gold, protocol="paper") is paper
    assert grading.grade_math(response, gold, protocol="strict") is strict


@pytest.mark.parametrize("name", ["math500", "minerva", "olympiadbench", "aime24", "amc23", "golds_in_pieces"])
def test_every_gold_boxed_as_written_grades_right_and_another_gold_wrong(name):
    """Each real gold of the eval sets in tests/data, its outer $ removed and boxed, grades right under both
    protocols; the next row's different gold grades wrong. golds_in_pieces.jsonl: OlympiadBench and Minerva
    rows whose golds are several $...$ pieces (or hold a stray `$ $`), which failed this before plain_text."""
    golds = [benchmarks.to_item(row)["answer"] for row in data.read_jsonl(DATA / f"{name}.jsonl")]
    for gold, other in zip(golds, golds[1:] + golds[:1]):
        text = gold.strip()
        text = text[1:-1] if len(text) > 1 and text[0] == text[-1] == "$" else text
        for protocol in ("paper", "strict"):
            assert grading.grade_math(f"So \\boxed{{{text}}}", gold, protocol), (gold, protocol)
            if grading.plain_text(other) != grading.plain_text(gold):
                assert not grading.grade_math(f"So \\boxed{{{text}}}", other, protocol), (gold, other, protocol)


@pytest.mark.parametrize("response,answer", [
    ("Final Answer: The final answer is $x^2$. I hope it is correct.", "x^2"),
    ("\\boxed{\\frac{a}{b}} and \\boxed{\\sqrt{2}}.", "\\sqrt{2}"),
    ("so \\boxed 12$.", "12"),
    ("Thus the answer is: 42.", "42"),
    ("The final answer is\n  -3/", "-3"),
    ("We get 3, then 1,000.5 and -7.25 at last", "-7.25"),
    ("no number", ""),
])
def test_harness_answer_reads_as_the_qwen25_math_harness(response, answer):
    assert grading.harness_answer(response) == answer


OPTIONS = {"A": "Ibuprofen", "B": "Aspirin", "C": "Warfarin", "D": "Insulin"}
PUBMEDQA = {"A": "yes", "B": "no", "C": "maybe"}
CHOICE_CASES = [  # (response, gold, options, correct)
    ("\\boxed{B}", "B", None, True),
    ("\\boxed{(b)}", "B", None, True),
    ("\\boxed{\\text{C}}", "C", None, True),
    ("\\boxed{C. Warfarin}", "C", OPTIONS, True),
    ("\\boxed{C}", "B", None, False),
    ("I guess \\boxed{A}; no, finally \\boxed{D}", "D", None, True),
    ("I guess \\boxed{A}; no, finally \\boxed{D}", "A", None, False),
    ("Thus the answer is (C).", "C", None, True),
    ("Answer: B", "B", None, True),
    ("the answer is a drug", "A", None, False),  # a lowercase word, not a letter choice
    ("\\boxed{Aspirin}", "B", OPTIONS, True),
    ("\\boxed{B}", "Aspirin", OPTIONS, True),  # gold given as the option text
    ("Ibuprofen helps pain, but aspirin is what saves him here.", "B", OPTIONS, True),
    ("Ibuprofen helps pain, but aspirin is what saves him here.", "A", OPTIONS, False),
    ("I do not know.", "A", None, False),
    ("", "A", None, False),
    # option text as a whole word: "no" is not in "not" or "know"
    ("Yes: the trial did not show harm, as far as we know.", "A", PUBMEDQA, True),
    ("Yes at first sight, but no.", "B", PUBMEDQA, True),
    # HuatuoGPT-o1's standalone option letter, the last one, before option texts
    ("Aspirin is tempting, but (D) fits best.", "D", OPTIONS, True),
    ("Between **B** and **C**, I pick **C**", "C", OPTIONS, True),
    ("A patient like this needs B", "B", OPTIONS, True),  # "A patient" is an article, not a choice
    ("Between B and C, I pick C", "C", None, False),  # no options given: no letter range to look for
    ("BCD is not a letter", "A", OPTIONS, False),
]


@pytest.mark.parametrize("response,gold,options,correct", CHOICE_CASES)
def test_grade_choice(response, gold, options, correct):
    assert grading.grade_choice(response, gold, options) is correct


def test_grade_choice_without_a_stated_answer_picks_the_most_similar_option():
    # HuatuoGPT's last resort: the option text closest to the response
    assert grading.grade_choice("insulim", "D", OPTIONS)
    assert not grading.grade_choice("insulim", "A", OPTIONS)


def test_last_boxed_handles_nesting_and_picks_the_last():
    assert grading.last_boxed("a \\boxed{1} b \\boxed{\\frac{a}{\\sqrt{b}}} c") == "\\frac{a}{\\sqrt{b}}"
    assert grading.last_boxed("no box") is None


# a sum of ten powers, and the same sum in reverse order: math-verify takes about 0.3 CPU s to parse each
TERMS = [f"y_{{{i}}}^{{{i}}}" for i in range(10)]
SLOW_SUM, SLOW_SUM_REVERSED = "+".join(TERMS), "+".join(reversed(TERMS))


def test_grade_item_counts_a_timeout_as_wrong_and_keeps_no_verdict():
    """A timeout inside math-verify's parse or verify, which catch their own TimeoutException, still counts as a
    timeout; the caches keep nothing of it, so the same sample with time enough gets its true verdict."""
    job = (f"\\boxed{{{SLOW_SUM}}}", {"answer": SLOW_SUM_REVERSED, "options": None})
    assert grading.grade_item(job, timeout=0.05, protocol="strict") == (False, True)
    assert grading.grade_item(job, timeout=10.0, protocol="strict") == (True, False)


def test_the_grading_timeout_counts_cpu_time_not_waiting(monkeypatch):
    """A worker kept off the cores (here: asleep) is not timed out; one that computes past the timeout is."""
    job = ("\\boxed{4}", {"answer": "4", "options": None})
    monkeypatch.setattr(grading, "grade_math", lambda response, answer, protocol: time.sleep(0.3) or True)
    assert grading.grade_item(job, timeout=0.1, protocol="paper") == (True, False)

    def computes(response, answer, protocol):
        end = time.process_time() + 0.3
        while time.process_time() < end:
            pass
        return True
    monkeypatch.setattr(grading, "grade_math", computes)
    assert grading.grade_item(job, timeout=0.1, protocol="paper") == (False, True)


def test_the_grading_pool_grades_a_problem_a_task_and_counts_timeouts():
    items = [{"answer": "5", "options": None}, {"answer": "B", "options": OPTIONS}]
    samples = [[("\\boxed{5}", 3, False), ("\\boxed{6}", 3, False)],
               [("\\boxed{A}", 3, False), ("the answer is (B)", 5, False)]]
    with grading.grading_pool(2) as pool:  # as eval.py submits them
        pending = [pool.apply_async(grading.grade_problem, (row, item, 10.0, "paper"))
                   for item, row in zip(items, samples)]
        assert [result.get() for result in pending] == [[(True, False), (False, False)],
                                                        [(False, False), (True, False)]]
        slow = [(f"\\boxed{{{SLOW_SUM}}}", 3, False)] * 2
        assert pool.apply(grading.grade_problem, (slow, {"answer": SLOW_SUM_REVERSED, "options": None}, 0.05,
                                                  "paper")) == [(False, True)] * 2


def test_pass_at_k_and_average_by_hand():
    correct = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=bool)
    # pass@1 = 7/16; pass@2 = mean(1 - C(4-c,2)/C(4,2)) = (1/2 + 5/6 + 0 + 1)/4; pass@4 = 3/4
    assert grading.pass_at_k(correct, 1) == pytest.approx(100 * 7 / 16)
    assert grading.pass_at_k(correct, 2) == pytest.approx(100 * (1 / 2 + 5 / 6 + 1) / 4)
    assert grading.pass_at_k(correct, 4) == pytest.approx(75.0)
    lengths = np.arange(1, 17).reshape(4, 4)
    truncated = lengths == 16
    m = grading.metrics(correct, lengths, truncated, np.zeros_like(correct), column_rounded=False)
    assert m["average"] == m["matrix_mean"] == pytest.approx(43.75)  # the first sample alone would give 75
    assert m["pass@k"] == pytest.approx({"1": 43.75, "2": 100 * (1 / 2 + 5 / 6 + 1) / 4, "4": 75.0})
    assert (m["length_mean"], m["length_p25"], m["length_p75"]) == (8.5, 4.75, 12.25)  # numpy's linear rule
    assert m["truncated"] == pytest.approx(100 / 16) and m["timeouts"] == 0


def test_average_at_16_is_the_harness_column_rounded_mean():
    correct = np.zeros((3, 16), dtype=bool)
    correct[0, :] = True  # every column has problem 0 right: 1/3 = 33.3 after rounding
    correct[1, :4] = True  # columns 0-3: 2/3 = 66.7
    correct[2, 0] = True  # column 0: 3/3 = 100.0
    # by hand: columns [100.0, 66.7, 66.7, 66.7] + 12 x [33.3]; mean = (100 + 3 x 66.7 + 12 x 33.3) / 16
    expected = (100.0 + 3 * 66.7 + 12 * 33.3) / 16
    m = grading.metrics(correct, np.ones((3, 16)), correct & False, correct & False, column_rounded=True)
    assert m["average"] == pytest.approx(expected, abs=1e-9) and expected == pytest.approx(699.7 / 16)
    assert m["matrix_mean"] == pytest.approx(100 * 21 / 48)  # 43.75: the unrounded matrix mean, kept beside it
    assert grading.harness_average(np.array([[True, False]] * 8)) == 50.0


def test_pass_at_k_matches_the_combinatorial_formula():
    correct = np.random.default_rng(0).random((50, 16)) < 0.3
    for k in (1, 3, 8, 16):
        expected = np.mean([1 - math.comb(16 - c, k) / math.comb(16, k) for c in correct.sum(1)])
        assert grading.pass_at_k(correct, k) == pytest.approx(100 * expected)


@pytest.mark.parametrize("name,answers", [
    ("math500", ["\\left( 3, \\frac{\\pi}{2} \\right)", "p - q", "\\frac{14}{3}"]),
    ("minerva", ["1.6", "4.5e33", "41.8"]),  # the last \boxed of the solution
    ("olympiadbench", ["2", "$\\frac{1}{2 n+2}$", "$2^{1009}$"]),  # final_answer is a list
    ("aime24", ["204", "113", "371"]),
    ("amc23", ["27", "36", "45"]),  # stored as 27.0
])
def test_load_benchmark_finds_question_and_gold(name, answers):
    items = benchmarks.load_benchmark(name, str(DATA / f"{name}.jsonl"))
    assert [item["answer"] for item in items] == answers
    assert all(item["question"] and item["options"] is None for item in items)


def test_load_benchmark_warns_on_a_row_count_mismatch(capsys):
    benchmarks.load_benchmark("aime24", str(DATA / "aime24.jsonl"))
    assert "aime24 has 3 problems, the paper's set has 30" in capsys.readouterr().err


def test_m1_sources_are_read_by_their_exact_keys_and_grade_by_letter(tmp_path):
    full = str(DATA / "m1_eval_full_keys.json")  # shaped like m1's m1_eval_data.json, one item per source
    answers = {name: benchmarks.load_benchmark(name, full)[0]["answer"] for name in benchmarks.SUITES["medical"]}
    assert answers == {"medmcqa": "A", "medqa": "C", "pubmedqa": "A", "mmlupro": "B", "gpqa": "C", "lancet": "B",
                       "medbullets4": "B", "medbullets5": "B", "medxpertqa": "B", "nejm": "C"}
    items = benchmarks.load_benchmark("medqa", str(DATA / "m1_eval_sample.json"))
    assert [item["answer"] for item in items] == ["B", "C"]
    assert benchmarks.user_message(items[0]).endswith("\nA. Ibuprofen\nB. Aspirin\nC. Warfarin\nD. Insulin")
    with pytest.raises(UserError, match="has no source 'NEJM'.*m1_eval_data.json"):
        benchmarks.load_benchmark("nejm", str(DATA / "m1_eval_sample.json"))
    sets = evaluation.json.loads(Path(full).read_text())
    sets["MedQA_USMLE_test"] = sets.pop("MedQA_USLME_test")  # m1's key keeps HuatuoGPT-o1's spelling
    (tmp_path / "m1.json").write_text(evaluation.json.dumps(sets))
    with pytest.raises(UserError, match="has no source 'MedQA_USLME_test'"):
        benchmarks.load_benchmark("medqa", str(tmp_path / "m1.json"))


def test_table_2_sizes_are_m1s():
    sizes = {name: benchmarks.BENCHMARKS[name][3] for name in benchmarks.SUITES["medical"]}
    assert sizes["medxpertqa"] == 1449 and round(100 * 161 / 1449, 2) == 11.11  # Table 2's Base MedX cell


def test_benchmark_specs_expand_suites_in_table_order():
    specs = benchmarks.benchmark_specs("math500, mine.jsonl, math, amc23=/tmp/a.jsonl")
    assert specs == [("minerva", None), ("olympiadbench", None), ("aime24", None), ("amc23", "/tmp/a.jsonl"),
                     ("math500", None), ("mine", "mine.jsonl")]


@pytest.mark.parametrize("argv,message", [
    (["--benchmarks", "math501"], "unknown benchmark 'math501'"),
    (["--benchmarks", "math500=/nonexistent.jsonl"], "/nonexistent.jsonl does not exist"),
    (["--n", "0"], "--n must be >= 1"),
    (["--top-p", "0"], "0 < --top-p <= 1"),
    (["--benchmarks", f"math500={DATA}/m1_eval_sample.json"], "local benchmark files are .jsonl"),
])
def test_bad_input_fails_early_with_the_fix(tmp_path, argv, message):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match=message):
        evaluation.check_args(evaluation.parse_args(["--model", str(tmp_path)] + argv))


def test_missing_model_dir_or_hub_id_fails_early(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="no such folder, and not a hub id"):
        evaluation.check_args(evaluation.parse_args(["--model", str(tmp_path / "nope")]))
    with pytest.raises(UserError, match="a folder without config.json"):
        evaluation.check_args(evaluation.parse_args(["--model", str(tmp_path)]))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="Qwen/Qwen2.5-Math-1.5B: not a local folder and not in the local hub cache"):
        evaluation.check_args(evaluation.parse_args(["--model", "Qwen/Qwen2.5-Math-1.5B"]))
    hub_snapshot(tmp_path / "hub", "Qwen/Qwen2.5-Math-1.5B").mkdir(parents=True)
    (hub_snapshot(tmp_path / "hub", "Qwen/Qwen2.5-Math-1.5B") / "config.json").write_text("{}")
    evaluation.check_args(evaluation.parse_args(["--model", "Qwen/Qwen2.5-Math-1.5B"]))  # in the hub cache


def test_compare_prints_runs_side_by_side_and_plots(tmp_path, capsys):
    for run, averages in {"sft": {"math500": 50.0, "aime24": 10.0}, "target": {"math500": 70.0}}.items():
        (tmp_path / run).mkdir()
        results = {"benchmarks": {k: {"average": v} for k, v in averages.items()}}
        (tmp_path / run / "results.json").write_text(evaluation.json.dumps(results))
    plot = tmp_path / "cmp.png"
    compare.main([str(tmp_path / "sft/results.json"), str(tmp_path / "target/results.json"), "--plot", str(plot)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["AIME24", "Math500", "Avg."]  # Table 1's column order
    assert lines[1].split() == ["sft", "10.00", "50.00", "30.00"]
    assert lines[2].split() == ["target", "-", "70.00", "-"]  # no Avg. over fewer benchmarks
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def paper_avg(setting, method, table="Table 1"):
    return next(r["avg"] for r in compare.PAPER_TABLES[setting] if (r["table"], r["method"]) == (table, method))


def test_paper_tables_agree_with_the_numbers_the_papers_text_quotes():
    qwen3, math15 = "Qwen3-1.7B-Base / NuminaMath-CoT", "Qwen2.5-Math-1.5B / NuminaMath-CoT"
    assert (paper_avg(qwen3, "Base"), paper_avg(qwen3, "SFT")) == (14.26, 12.99)  # "14.26 -> 12.99"
    assert paper_avg(qwen3, "Distill (c = 0.8)") == 17.81  # "(17.81 vs. 12.99)"
    assert paper_avg("Qwen2.5-Math-7B / NuminaMath-CoT", "Distill (c = 0.8)") == 25.76  # "(25.76 vs. 23.88)"
    assert paper_avg("Qwen2.5-Math-7B / NuminaMath-CoT", "SFT") == 23.88
    assert (paper_avg("LLaMA-3.1-8B / m23k", "SFT", "Table 2"),
            paper_avg("LLaMA-3.1-8B / m23k", "SFT (p)", "Table 2")) == (47.41, 38.60)  # "(47.41 vs. 38.60)"
    table6 = [r for r in compare.PAPER_TABLES[math15] if r["table"] == "Table 6"]
    etas = [r["avg"] for r in table6 if r["method"].startswith("TARGET-SFT")]
    distills = {r["method"]: r["avg"] for r in table6 if r["method"].startswith("Distill")}
    assert (min(etas), max(etas)) == (34.30, 38.05)
    # the text's "from 22.81 to 30.83" spans c = 0.5, 0.8, 1.0; Table 6's c = 0.2 row (18.33) lies below it
    assert distills.pop("Distill (c = 0.2)") == 18.33 and (min(distills.values()), max(distills.values())) == \
        (22.81, 30.83)
    # the printed Avg. is not the mean of the five columns (issue 12's two examples)
    means = {s: np.mean(list(compare.PAPER_TABLES[s][0]["cells"].values())) for s in (qwen3, math15)}
    assert (round(means[qwen3], 2), round(means[math15], 2)) == (14.38, 15.36)
    # Table 6 repeats Table 1's runs: the same cells in both places
    for setting in (math15, "Qwen2.5-Math-1.5B / OpenR1-15k"):
        t1, t6 = ([r for r in compare.PAPER_TABLES[setting] if r["table"] == t and "TARGET" in r["method"]]
                  for t in ("Table 1", "Table 6"))
        assert t1[0]["cells"] in [r["cells"] for r in t6]
    medx = next(r for r in compare.PAPER_TABLES["LLaMA-3.2-3B / m23k"] if r["method"] == "Base")
    assert medx["cells"]["medxpertqa"] == round(100 * 161 / 1449, 2)  # Table 2 is k/N
    assert all(len(r["cells"]) in (5, 10) for rows in compare.PAPER_TABLES.values() for r in rows)


def test_compare_sets_the_papers_rows_beside_yours(tmp_path, capsys):
    cells = {"minerva": 30.0, "olympiadbench": 31.59, "aime24": 10.0, "amc23": 47.03, "math500": 75.2}
    for run, averages in {"target": cells, "mystery": cells}.items():
        (tmp_path / run).mkdir()
        results = {"name": run, "model": f"/runs/{run}/hf",
                   "benchmarks": {k: {"average": v} for k, v in averages.items()}}
        (tmp_path / run / "results.json").write_text(evaluation.json.dumps(results))
    compare.main([str(tmp_path / "target/results.json"), str(tmp_path / "mystery/results.json"),
                  "--plot", str(tmp_path / "cmp.png"), "--paper", "Qwen2.5-Math-1.5B / NuminaMath-CoT"])
    out = capsys.readouterr().out
    base = next(line for line in out.splitlines() if line.startswith("Table 1 Base"))
    assert base.split()[-7:] == ["8.23", "15.20", "3.75", "18.12", "31.52", "14.92", "[15.36]"]
    diff = next(line for line in out.splitlines() if line.startswith("target - Table 1 TARGET-SFT"))
    # by hand, against 32.20 31.59 8.96 47.03 70.20 (mean 37.996): our mean is 38.764, +0.768
    assert diff.split()[-6:] == ["-2.20", "+0.00", "+1.04", "+0.00", "+5.00", "+0.77"]
    assert "mystery: no paper row" in out and "not always the mean of its columns" in out
    with pytest.raises(UserError, match="not one of the paper's settings"):
        compare.main([str(tmp_path / "target/results.json"), "--paper", "GPT-2 / nothing"])


def test_compare_plot_starts_at_zero_and_labels_every_bar(tmp_path):
    runs = [(f"run{i}", {"benchmarks": {n: {"average": 0.0} for n in benchmarks.SUITES["medical"]}})
            for i in range(5)]
    ax = compare.plot_runs(runs, tmp_path / "zeros.png")
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] > 0
    labels = [t.get_text() for t in ax.texts]
    assert len(labels) == 5 * 11 and set(labels) == {"0.0"}  # 10 benchmarks and Avg., 5 runs


def test_prompts_are_the_harness_qwen_boxed_and_llama_layouts():
    import demo
    tok = demo.make_tokenizer()
    item = {"question": "What is 1 + 1?", "options": None}

    def prompt(tokenizer, *argv):
        args = evaluation.parse_args(["--model", "m", *argv])
        return tokenizer.decode(evaluation.prompt_ids(tokenizer, item, evaluation.prompt_style(args, tokenizer)))
    # the Qwen2.5-Math harness's "qwen-boxed", written out by hand
    assert prompt(tok) == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                           "What is 1 + 1?\nPlease reason step by step, and put your final answer within \\boxed{}."
                           "<|im_end|>\n<|im_start|>assistant\n")
    assert prompt(tok, "--protocol", "strict") == (
        "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
        "<|im_start|>user\nWhat is 1 + 1?<|im_end|>\n<|im_start|>assistant\n")
    tok.add_special_tokens({"additional_special_tokens": ["<|begin_of_text|>", "<|start_header_id|>",
                                                          "<|end_header_id|>", "<|eot_id|>"]})
    # its "llama-base-boxed-with-bos"
    assert prompt(tok) == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful "
                           "assistant.<|eot_id|>\n<|start_header_id|>user<|end_header_id|>\n\nWhat is 1 + 1?\n"
                           "Please reason step by step, and put your final answer within \\boxed{}.<|eot_id|>\n"
                           "<|start_header_id|>assistant<|end_header_id|>\n\n")
    style = evaluation.prompt_style(evaluation.parse_args(["--model", "m"]), tok)
    assert evaluation.stop_ids(tok, style) == sorted(tok.convert_tokens_to_ids(["<|eot_id|>", "<|im_end|>"]))


def test_grading_workers_default_to_the_cores_at_most_16(monkeypatch):
    for cores, workers in ((2, 2), (200, 16)):
        monkeypatch.setattr(evaluation.os, "cpu_count", lambda: cores)
        assert evaluation.parse_args(["--model", "m"]).workers == workers
    assert evaluation.parse_args(["--model", "m", "--workers", "64"]).workers == 64


class Engine:
    """A stand-in vLLM engine whose weight swap fails as an older vLLM's does (no weights_path)."""
    started = []

    def __init__(self, model_dir, max_model_len, args, seed):
        self.model_dir, self.shut = model_dir, False
        self.llm_engine = SimpleNamespace(engine_core=SimpleNamespace(shutdown=self.shutdown))
        Engine.started.append(self)

    def collective_rpc(self, method, kwargs):
        raise TypeError(f"{method}() got an unexpected keyword argument 'weights_path'")

    def shutdown(self):
        self.shut = True


def test_a_refused_weight_swap_starts_a_fresh_engine(monkeypatch, capsys):
    monkeypatch.setattr(generation, "load_vllm", Engine)
    generators = evaluation.Generators()
    for name in ("a", "b"):  # the same engine_key: b's weights would be swapped into a's engine
        generators.load(SimpleNamespace(model=name, dp=1, seed=0, backend="vllm"), f"/models/{name}", 64,
                        key="same architecture")
    first, second = Engine.started
    assert first.shut and not second.shut and second.model_dir == "/models/b"
    assert generators.llm is second and generators.stream.args == (second,)
    assert capsys.readouterr().out.splitlines() == [
        "b: the running engine refused its weights (TypeError: reload_weights() got an unexpected keyword argument "
        "'weights_path'); starting a fresh engine"]


@pytest.mark.parametrize("gpu, backend, flag, mode", [
    (False, "vllm", None, "per-request seeds"),          # a CPU: seeded requests by default, as before
    (False, "vllm", False, "engine seed"),
    (True, "vllm", None, "engine seed"),                 # a GPU: the engine's seed unless asked
    (True, "vllm", True, "per-request seeds, batch-invariant"),
    (True, "hf", None, "per-request seeds"),             # one problem at a time: nothing shares its batch
])
def test_sampling_mode_says_where_samples_do_not_depend_on_batching(monkeypatch, gpu, backend, flag, mode):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    argv = ["--model", "m", "--backend", backend] + ({True: ["--reproducible"], False: ["--no-reproducible"]}
                                                     .get(flag, []))
    assert evaluation.sampling_mode(evaluation.parse_args(argv)) == mode


def test_the_grading_module_imports_no_torch_vllm_or_transformers():
    """grading.py is what eval.py's grading workers load: importing it, and eval.py's own top-level
    imports (which a worker re-runs), must not pull in torch, vLLM or transformers; the workers run niced, below
    the engine they share cores with."""
    import builtins
    import os
    import subprocess
    import sys
    root = Path(__file__).resolve().parent.parent
    for module in ("grading", "eval"):
        code = (f"import sys, {module}; heavy = sorted({{'torch', 'vllm', 'transformers'}} & set(sys.modules)); "
                "print(heavy); sys.exit(bool(heavy))")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
        assert result.returncode == 0, (module, result.stdout, result.stderr)
    # and grading works: a worker of the real pool grades a sample and reports what it imported
    with grading.grading_pool(1) as pool:
        assert pool.apply(grading.grade_problem, ([("so \\boxed{4}", 3, False)], {"answer": "4", "options": None},
                                                  10.0, "paper")) == [(True, False)]
        imported = "sorted({'torch', 'vllm', 'transformers'} & set(__import__('sys').modules))"
        assert pool.apply(builtins.eval, (imported,)) == []  # a builtin: unpickling it imports nothing
        assert pool.apply(os.nice, (0,)) == min(os.nice(0) + 10, 19)  # below the engine's priority


def test_a_problems_repeated_answer_goes_to_math_verify_once(monkeypatch):
    """n samples that give the same answer cost one math-verify verdict, and get the verdict each would alone."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)
    real = grading.verify
    monkeypatch.setattr(grading, "verify", counted)
    grading.verified.cache_clear()
    item = {"answer": "0.5", "options": None}
    samples = [(f"step {j}: so \\boxed{{\\frac{{1}}{{2}}}}", 9, False) for j in range(8)]
    samples += [(f"step {j}: so \\boxed{{\\frac{{1}}{{3}}}}", 9, False) for j in range(8)]
    assert grading.grade_problem(samples, item, 10.0, "paper") == [(True, False)] * 8 + [(False, False)] * 8
    assert len(calls) == 2
    grading.verified.cache_clear()
    monkeypatch.setattr(grading, "verify", real)
    assert [grading.grade_math(text, "0.5") for text, _, _ in samples[7:9]] == [True, False]


@pytest.mark.parametrize("inherited, tp, dp, devices", [
    (None, 2, 4, [["0", "1"], ["2", "3"], ["4", "5"], ["6", "7"]]),   # no scheduler: every GPU of the node
    ("4,5,6,7", 2, 2, [["4", "5"], ["6", "7"]]),                       # the scheduler gave GPUs 4-7
    ("3,1", 1, 2, [["3"], ["1"]]),                                     # in the scheduler's order
    ("GPU-a1b2,GPU-c3d4,GPU-e5f6", 1, 3, [["GPU-a1b2"], ["GPU-c3d4"], ["GPU-e5f6"]]),  # UUIDs
    ("6,7", 1, 1, [["6"]]),
])
def test_dp_engines_take_the_gpus_the_job_was_given(monkeypatch, inherited, tp, dp, devices):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8 if inherited is None else len(inherited.split(",")))
    if inherited is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", inherited)
    args = evaluation.parse_args(["--model", "m", "--tp", str(tp), "--dp", str(dp)])
    assert evaluation.engine_devices(args) == devices


def test_more_engines_than_visible_gpus_is_refused_before_any_starts(monkeypatch, tmp_path):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-a1b2,GPU-c3d4,GPU-e5f6")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"--dp 2 x --tp 2 needs 4 GPUs, and this job sees 3 "
                                        r"\(CUDA_VISIBLE_DEVICES=GPU-a1b2,GPU-c3d4,GPU-e5f6\): lower --dp or --tp"):
        evaluation.check_args(evaluation.parse_args(["--model", str(tmp_path), "--tp", "2", "--dp", "2"]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU: no GPUs to deal
    evaluation.check_args(evaluation.parse_args(["--model", str(tmp_path), "--tp", "2", "--dp", "2"]))


def test_each_dp_engine_samples_with_its_own_seed_recorded_in_results(monkeypatch, tmp_path):
    """Engine-seed mode (a GPU's default): engine r of --dp starts with --seed + r, on the GPUs dealt to it, its
    engine core in a process of vLLM's own, and results.json records the seeds."""
    import queue
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    started = []

    def engine(model_dir, max_model_len, args, seed):  # where each engine's core runs: vLLM's own process, as on a GPU
        started.append((seed, os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")))
        return SimpleNamespace(llm_engine=SimpleNamespace(
            vllm_config=SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=4))))
    monkeypatch.setattr(generation, "load_vllm", engine)
    monkeypatch.setattr(generation, "stream_vllm", lambda llm, requests, capacity: iter(()))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    (args,) = evaluation.per_model(evaluation.parse_args(["--model", str(tmp_path), "--dp", "4", "--seed", "7"]))
    for rank, devices in enumerate(evaluation.engine_devices(args)):
        with monkeypatch.context() as each_process:  # each engine is a fresh process with the job's environment
            each_process.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
            for key in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_OMP_THREADS_BIND"):  # what it sets: undone after
                each_process.setenv(key, "")
                each_process.delenv(key)
            generation._dp_engine(args, str(tmp_path), 64, rank, devices, queue.Queue(), queue.Queue())
    assert started == [(7, "4", None), (8, "5", None), (9, "6", None), (10, "7", None)]
    info = evaluation.run_info(args)
    assert info["sampling_mode"] == "engine seed" and info["engine_seeds"] == [7, 8, 9, 10]
    assert "engine_seeds" not in evaluation.run_info(evaluation.per_model(evaluation.parse_args(
        ["--model", "m", "--reproducible"]))[0])


@pytest.mark.parametrize("set_by_user", [None, "fork"])
def test_vllm_starts_its_engine_core_by_spawn_unless_the_user_chose(monkeypatch, tmp_path, set_by_user):
    """Where NVML cannot answer (MIG devices, no libnvidia-ml), torch's device count starts CUDA unmarked and a forked
    engine core dies: load_vllm asks vLLM for spawn, unless VLLM_WORKER_MULTIPROC_METHOD was set."""
    import vllm
    seen = []
    monkeypatch.setattr(vllm, "LLM", lambda *a, **k: seen.append(os.environ.get("VLLM_WORKER_MULTIPROC_METHOD")))
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "")  # recorded, then set or cleared as the case needs
    if set_by_user:
        monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", set_by_user)
    else:
        monkeypatch.delenv("VLLM_WORKER_MULTIPROC_METHOD")
    (tmp_path / "config.json").write_text("{}")
    generation.load_vllm(str(tmp_path), 64, SimpleNamespace(tp=1, enforce_eager=True, backend="vllm", reproducible=None,
                                                            gpu_memory_utilization=0.9), seed=0)
    assert seen == [set_by_user or "spawn"]
