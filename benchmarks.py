"""The benchmarks of the paper's Tables 1 and 2: their names, sources and sizes, their problems as
{question, answer, options} items, from the hub, m1's medical file or local copies, and the tables of results that
eval.py prints and compare.py sets side by side.
"""
import json
import math
import sys
from pathlib import Path

import numpy as np

from common import UserError
from grading import last_boxed

# Table 2 as Li et al.'s medical protocol computes it, whatever its caption says
TABLE2_SINGLE_SAMPLE = ("Table 2's cells are k/N for one greedy sample per question (Li et al.'s protocol), though "
                        "its caption says Average@16; --n 16 --temperature 1 gives the caption's")

# name: (label in the paper's tables, suite, source, known row count). Order = the columns of Tables 1 and 2.
# Math sources are hub datasets (test split); medical ones are the exact keys of m1's eval file (the first five
# are HuatuoGPT-o1's eval_data.json, the rest m1's collect_eval_data.py). Every Table 2 cell is k/size for
# these sizes, e.g. MedXpertQA 161/1449 = 11.11%.
BENCHMARKS = {
    "minerva": ("Minerva Math", "math", "math-ai/minervamath", 272),
    "olympiadbench": ("Olympiad Bench", "math", "math-ai/olympiadbench", 675),
    "aime24": ("AIME24", "math", "math-ai/aime24", 30),
    "amc23": ("AMC23", "math", "math-ai/amc23", 40),
    "math500": ("Math500", "math", "HuggingFaceH4/MATH-500", 500),
    "medmcqa": ("MedMC", "medical", "MedMCQA_validation", 4183),
    "medqa": ("MedQA", "medical", "MedQA_USLME_test", 1273),
    "pubmedqa": ("PubMed", "medical", "PubMedQA_test", 1000),
    "mmlupro": ("MMLU-P", "medical", "MMLU-Pro_Medical_test", 1535),
    "gpqa": ("GPQA", "medical", "GPQA_Medical_test", 390),
    "lancet": ("Lancet", "medical", "Lancet", 412),
    "medbullets4": ("MedB (4)", "medical", "MedBullets_op4", 308),
    "medbullets5": ("MedB (5)", "medical", "MedBullets_op5", 308),
    "medxpertqa": ("MedX", "medical", "MedXpertQA", 1449),
    "nejm": ("NEJM", "medical", "NEJM", 603),
}
M1_EVAL = ("UCSC-VLAA/m1_eval_data", "m1_eval_data.json")

SUITES = {suite: [name for name, spec in BENCHMARKS.items() if spec[1] == suite] for suite in ("math", "medical")}


def benchmark_specs(text):
    """'math,x=a.jsonl,b.jsonl' -> [(name, local path or None)], suites expanded, in table order."""
    specs = []
    for part in filter(None, (s.strip() for s in text.split(","))):
        if "=" in part:
            specs.append(tuple(part.split("=", 1)))
        elif part.endswith(".jsonl"):
            specs.append((Path(part).stem, part))
        else:
            specs += [(name, None) for name in SUITES.get(part, [part])]
    return sorted(dict(specs).items(), key=lambda spec: table_order(spec[0]))


def spec(name):
    """(label, suite, source, known size); a local file is its own label, in the 'local' suite."""
    return BENCHMARKS.get(name, (name, "local", None, None))


def table_order(name):
    """Column position in Tables 1-2; local benchmarks go last."""
    return list(BENCHMARKS).index(name) if name in BENCHMARKS else len(BENCHMARKS)


def label(name):
    return spec(name)[0]


def load_rows(name, path):
    """Raw rows of one benchmark: a local .jsonl/.json, m1's medical file or a hub dataset."""
    _, suite, source, _ = spec(name)
    if path is not None and path.endswith(".jsonl"):
        import data  # here, not above: data imports torch, which eval.py's grading workers do without
        return data.read_jsonl(path)
    if suite == "medical":
        if path is None:
            from huggingface_hub import hf_hub_download
            path = hf_hub_download(M1_EVAL[0], M1_EVAL[1], repo_type="dataset")
        return m1_source(json.loads(Path(path).read_text()), source)
    from datasets import load_dataset
    return list(load_dataset(source, split="test"))


def m1_source(sets, key):
    """The items under key in m1's {source name: items} file (UCSC-VLAA/m1_eval_data)."""
    if key not in sets:
        raise UserError(f"m1 eval file has no source {key!r} (it has {list(sets)}); pass m1's own "
                        f"{M1_EVAL[1]} from the hub dataset {M1_EVAL[0]}")
    return sets[key]


def to_item(row):
    """One problem as {question, answer, options}, whatever the file's field names are.

    Gold answer: `answer`, else `final_answer` (OlympiadBench, a list), else the last \\boxed{} of
    `solution` (Minerva). Medical items grade against the option letter `answer_idx`."""
    question = row.get("problem") or row.get("question")
    options = row.get("options")
    answer = row.get("answer_idx") or row.get("answer")
    if answer is None:
        answer = row.get("final_answer")
    if answer is None:
        answer = last_boxed(row.get("solution") or "")
    if isinstance(answer, list):
        answer = ", ".join(map(str, answer))
    if isinstance(answer, float) and answer.is_integer():  # amc23 stores 27 as 27.0
        answer = int(answer)
    if question is None or answer is None:
        raise ValueError(f"row without a question or gold answer (fields: {sorted(row)})")
    return {"question": question, "answer": str(answer), "options": options}


def load_benchmark(name, path, limit=None):
    items = [to_item(row) for row in load_rows(name, path)]
    known = spec(name)[3]
    if known is not None and len(items) != known:
        print(f"warning: {name} has {len(items)} problems, the paper's set has {known}", file=sys.stderr)
    return items[:limit]


def user_message(item):
    """m1's prompt for multiple choice: the question, then one 'X. option' line per option."""
    if not item["options"]:
        return item["question"]
    return item["question"] + "\n" + "\n".join(f"{k}. {v}" for k, v in item["options"].items())


# ------------------------------------------------------------------------------------------ results tables


def columns(runs):
    return sorted({name for _, r in runs for name in r["benchmarks"]}, key=lambda n: (table_order(n), n))


def run_average(results, names):
    """The Avg. column: the mean over every column, or nan for a run that lacks one (its mean over fewer
    benchmarks would not compare with the others')."""
    if any(n not in results["benchmarks"] for n in names):
        return float("nan")
    return float(np.mean([results["benchmarks"][n]["average"] for n in names]))


def table(runs):
    """Table 1/2 layout: a row per run, Average@n per benchmark, then Avg."""
    names = columns(runs)
    width = max(10, *(len(label(n)) + 2 for n in names))
    row_w = max(len(run) for run, _ in runs) + 2
    lines = ["".ljust(row_w) + "".join(label(n).rjust(width) for n in names) + "Avg.".rjust(width)]
    for run, r in runs:
        cells = [f"{r['benchmarks'][n]['average']:.2f}" if n in r["benchmarks"] else "-" for n in names]
        avg = "-" if math.isnan(run_average(r, names)) else f"{run_average(r, names):.2f}"
        lines.append(run.ljust(row_w) + "".join(c.rjust(width) for c in cells) + avg.rjust(width))
    return "\n".join(lines)


def details(results):
    """pass@k, response length (mean [p25, p75] tokens, Appendix H), truncation and timeouts per benchmark."""
    lines = []
    for name, m in results["benchmarks"].items():
        passes = " ".join(f"pass@{k} {v:.1f}" for k, v in m["pass@k"].items())
        lines.append(f"{label(name):>16}  {passes}  length {m['length_mean']:.0f} [{m['length_p25']:.0f}, "
                     f"{m['length_p75']:.0f}]  truncated {m['truncated']:.1f}%  timeouts {m['timeouts']}")
    return "\n".join(lines)


def notes(runs):
    """One line per distinct averaging rule among the runs' benchmarks: what the numbers above are."""
    rules = {}
    for r in runs:
        for name, m in r["benchmarks"].items():
            if "average_rule" in m:
                rules.setdefault(m["average_rule"], []).append(label(name))
    return "\n".join(f"{', '.join(dict.fromkeys(names))}: {rule}" for rule, names in rules.items())
