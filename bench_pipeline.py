"""bench.py's pipeline benchmarks: the scripts end to end (teacher cache, train.py, the real LM, the demo), the
cached logits' precision and the micro-batch balance behind them. Run through bench.py."""
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

import common
import data
import demo
import loss as L
import teacher_cache
from bench_kernels import MATH16, QWEN25_15B, REPO, TINY, print_rows, run_script, timed


def logged_steps(out):
    """train.py's metrics.jsonl under out, a dict per line."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------------
# bench.py cache: the teacher-cache build against a plain forward, the reader against a training step

def math16_dataset(prefix, tokenizer, repeat):
    """A fresh folder with `repeat` copies of the 16 test MATH solutions in rows.jsonl, tokenised (max-len 512):
    the folder, the dataset and its tokens."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    (work / "rows.jsonl").write_text(MATH16.read_text() * repeat)
    ds = data.tokenize_dataset(work / "rows.jsonl", tokenizer, max_len=512, cache_dir=work / "tok")
    return work, ds, sum(len(ds.input_ids(i)) for i in range(len(ds)))


def build_and_forward(model, ds, batch_tokens, out, k, device="cpu"):
    """Seconds of teacher_cache.build into out, and of a plain no-grad forward over the same packed batches (timed
    after an untimed one)."""
    batches = teacher_cache.fixed_batches(ds, batch_tokens)

    def plain_forward():
        with torch.no_grad():
            for b in batches:
                batch = data.pack(ds, b)
                model(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                      use_cache=False).logits.sum().item()

    plain = timed(plain_forward, device=device, warm_up=True)
    return timed(lambda: teacher_cache.build(model, ds, out, k=k, batch_tokens=batch_tokens), device=device), plain


def bench_cache(*, repeat, batch_tokens, k, big_vocab, micro_batch_size):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = demo.make_tokenizer()
    work, ds, tokens = math16_dataset("bench-cache-", tok, repeat)
    labels = int(ds.label_counts().sum())
    print(f"{device}, {len(ds)} samples, {tokens} tokens ({labels} labels), "
          f"{len(teacher_cache.fixed_batches(ds, batch_tokens))} packed batches of <= {batch_tokens} tokens, k={k}")
    rows = []
    for vocab in (len(tok), big_vocab):
        model = demo.make_model(tok, seed=1).to(device)
        if vocab != len(tok):
            model.resize_token_embeddings(vocab)
        model = model.to(torch.bfloat16 if device.type == "cuda" else torch.float32)
        build, plain = build_and_forward(model, ds, batch_tokens, work / f"cache-{vocab}", k, device)
        print(f"vocab {vocab:>6}: build {tokens / build:>9.0f} tok/s | plain forward {tokens / plain:>9.0f} tok/s"
              f" | build/forward {plain / build:.2f}x")
        # the build writes each rank's chunk at its flush, the GPU idle meanwhile: what a writer thread could save
        rows.append(("cache", f"build, vocab {vocab}", f"{tokens / build:.0f} tok/s, {tokens / plain:.0f} tok/s plain "
                                                       f"forward: {build / plain:.2f}x its time"))

        cache = teacher_cache.TeacherCache(work / f"cache-{vocab}", ds, k)
        sampler = data.Sampler(len(ds), seed=0)
        micro = [data.pack(ds, sampler.take_global(micro_batch_size)[0]) for _ in range(len(ds) // micro_batch_size)]
        read = timed(lambda: [teacher_cache.teacher_rows(cache, m, device)[1].sum().item() for m in micro],
                     device=device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        model.train()

        def train_steps():
            for m in micro:
                out = model(input_ids=m["input_ids"].to(device), position_ids=m["position_ids"].to(device),
                            labels=m["labels"].to(device), use_cache=False)
                out.loss.backward()
                optimizer.step()
                optimizer.zero_grad()

        train = timed(train_steps, device=device)
        model.eval()
        micro_labels = sum(int((m["labels"] != -100).sum()) for m in micro)
        print(f"vocab {vocab:>6}: teacher_rows {micro_labels / read:>9.0f} label tok/s | training step (fwd+bwd+"
              f"AdamW, micro-batch {micro_batch_size}) {micro_labels / train:>9.0f} label tok/s | "
              f"reader/train {train / read:.0f}x")
        cache_bytes = sum(f.stat().st_size for f in (work / f"cache-{vocab}").rglob("*") if f.is_file())
        print(f"vocab {vocab:>6}: the cache holds {cache_bytes / labels:.1f} bytes per label token")
    return rows


# ----------------------------------------------------------------------------------------------------
# bench.py logits: what rounding the lm_head's output to bf16 costs the cached teacher probabilities

def teacher_like_logits_inputs(rows, hidden_size, vocab_size, seed=0):
    """bf16 hidden states and lm_head whose logits look like a confident teacher's: a per-token base logit
    N(14, 3) through one hidden unit held at 1, plus N(0, 1) from the rest; the top logits land at 25-30."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, hidden_size, generator=g) / hidden_size ** 0.5
    hidden[:, 0] = 1
    weight = torch.randn(vocab_size, hidden_size, generator=g)
    weight[:, 0] = 14 + 3 * torch.randn(vocab_size, generator=g)
    return hidden.bfloat16(), weight.bfloat16()


def bench_logits(*, rows, hidden, vocab, k):
    states, head = teacher_like_logits_inputs(rows, hidden, vocab)
    exact = states.double() @ head.double().T  # the bf16 inputs' product, in float64
    top_ids = exact.topk(k, dim=-1).indices
    label = top_ids[:, torch.randint(0, 8, (1,)).item()]  # an observed token among the teacher's top 8
    print(f"logits of {rows} rows, H={hidden}, V={vocab}: max {exact.max():.1f}, "
          f"mean top-1 {exact.max(-1).values.mean():.1f}; errors against float64\n")
    print(f"{'logits':42} {'top-k prob (max abs)':>21} {'label logprob (max abs)':>24}")
    fp32 = L.logits_fp32(states, head).double()
    paths = {"bf16 matmul output, then fp32 (before)": (states @ head.T).double(),
             "fp32 from the matmul (loss.logits_fp32)": fp32}
    reference_probs = exact.gather(1, top_ids).softmax(-1)
    reference_label = exact.log_softmax(-1).gather(1, label[:, None])
    for name, logits in paths.items():
        probs = logits.gather(1, top_ids).softmax(-1)
        label_logprob = logits.log_softmax(-1).gather(1, label[:, None])
        print(f"{name:42} {(probs - reference_probs).abs().max():21.2e} "
              f"{(label_logprob - reference_label).abs().max():24.2e}")
    packed = teacher_cache.unpack_topk(teacher_cache.pack_topk(top_ids, fp32.log_softmax(-1).gather(1, top_ids)
                                                               .float()))[1]
    packed_error = (packed.double().softmax(-1) - reference_probs).abs().max()
    print(f"{'fp32, then packed into the cache':42} {packed_error:21.2e} {'(stored as fp32)':>24}")


# ----------------------------------------------------------------------------------------------------
# bench.py train: train.py end to end, the target loss against sft, on a Qwen2.5-1.5B-shaped random model



def write_random_model(path, shape):
    """Random weights in the given shape (nothing downloads), with the tiny tokenizer: its ids are a subset
    of the vocabulary, so the lm_head and the loss still see every one of the V logits."""
    tokenizer = demo.make_tokenizer()
    config = Qwen2Config(**shape, max_position_embeddings=32768, bos_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # initialising 1.5B on a CPU is slow
        Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def train_world(prefix, shape, seq_len, samples):
    """A folder with a random model of `shape` and `samples` rows of seq_len tokens; returns it and the data
    flags of train.py and teacher_cache.py for them."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    write_random_model(work / "model", shape)
    words = MATH16.read_text().split()
    rows = [{"prompt": " ".join(words[i:i + 40]), "response": " ".join((words * 50)[i:i + seq_len])}
            for i in range(samples)]  # at least a token a word: --truncate cuts each to seq-len tokens
    (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return work, ["--data", str(work / "train.jsonl"), "--max-len", str(seq_len), "--truncate",
                  "--data-cache", str(work / "tokenized")]


def bench_train(*, tiny, seq_len, layers, vocab, samples, steps, micro_batch_size, accumulation, checkpointing,
                compile):
    shape = dict(QWEN25_15B, **TINY) if tiny else dict(QWEN25_15B)
    shape.update({key: value for key, value in (("num_hidden_layers", layers), ("vocab_size", vocab))
                  if value})  # the 1.5B layer at its width, fewer of them: what a CPU can run
    work, flags = train_world("bench-train-", shape, seq_len, samples)
    run_script("teacher_cache.py", "--teacher", str(work / "model"), "--out", str(work / "cache"), *flags)  # one
    print(f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}, model {shape}, "
          f"{samples} samples of {seq_len} tokens, micro-batch {micro_batch_size}")
    rows, peaks = [], {}
    both = [False, True]
    for ac, compiled in [(ac, c) for ac in (both if checkpointing == "both" else [checkpointing == "on"])
                         for c in (both if compile == "both" else [compile == "on"])]:
        step_seconds = {}
        for variant in ("sft", "target"):
            out = work / f"run-{variant}-{'ac' if ac else 'no-ac'}-{'compiled' if compiled else 'eager'}"
            # no checkpoint and no export: nothing reads them (train.py stops on a loss that is not finite)
            run_script("train.py", "--model", str(work / "model"), "--loss", variant, "--teacher-cache",
                       str(work / "cache"), "--out", str(out), "--max-steps", str(steps), "--save-minutes", "0",
                       "--no-export", "--global-batch-size", str(micro_batch_size * accumulation),
                       "--micro-batch-size", str(micro_batch_size), *flags, "--compile" if compiled else "--no-compile",
                       *(["--activation-checkpointing"] if ac else []))
            first, *logged = logged_steps(out)  # the first step compiles and warms up: left out of the rates
            step_seconds[variant] = statistics.median(s["seconds"] for s in logged)
            tokens_per_s = statistics.median(s["tokens_per_s"] for s in logged)
            # train.py logs MFU where it knows the device's peak FLOPS: not on a CPU
            mfu = f"MFU {statistics.median(s['mfu'] for s in logged):.1%}" if "mfu" in first else "MFU n/a"
            peak = max(s["peak_gib"] for s in logged)
            peaks[variant, ac, compiled] = max(s["peak_fwd_bwd_gib"] for s in logged)  # before the update
            case = f"{variant}, checkpointing {'on' if ac else 'off'}" + (", --compile" if compiled else "")
            memory = f"peak {peak:.1f} GiB ({peaks[variant, ac, compiled]:.1f} before the update)"
            extra = f"first step +{first['seconds'] - step_seconds[variant]:.1f} s"
            losses = f"loss {first['loss']:.3f} to {logged[-1]['loss']:.3f}, finite"
            print(f"{case:28} {tokens_per_s:10.0f} tokens/s  {mfu}  {memory}  "
                  f"step {step_seconds[variant]:.2f} s, {extra}, {losses}")
            rows.append(("train", case, f"{tokens_per_s:.0f} tokens/s, {mfu}, {memory}, {extra}, {losses}"))
        ratio = step_seconds["target"] / step_seconds["sft"]
        print(f"target / sft step time: {ratio:.3f}")
        case = f"target / sft, checkpointing {'on' if ac else 'off'}" + (", --compile" if compiled else "")
        rows.append(("train", case, f"{ratio:.3f}x the step time"))
    if checkpointing == "both":  # of L layers, checkpointing keeps the inputs of L and recomputes one in full
        for variant in ("sft", "target"):
            compiled = compile == "on"
            saved = peaks[variant, False, compiled] - peaks[variant, True, compiled]
            per_token = saved * 2**30 / (micro_batch_size * seq_len) / 1024
            print(f"{variant}: checkpointing saves {saved:.2f} GiB, {per_token:.1f} KiB per micro-batch token")
            rows.append(("train", f"{variant}, checkpointing saves", f"{saved:.2f} GiB, {per_token:.1f} KiB a token"))
    return rows


def bench_attention(*, tiny, layers, seq_len, samples, steps):
    """teacher_cache.py and train.py in fp32 and in bf16 on a random model: the attention each chose (its start-up
    line: flash-attn where it can run, else sdpa and why) and the throughput it got."""
    shape = dict(QWEN25_15B, **TINY) if tiny else dict(QWEN25_15B, num_hidden_layers=layers)
    work, flags = train_world("bench-attention-", shape, seq_len, samples)
    rows = []
    for dtype in ("fp32", "bf16"):
        cache = work / f"cache-{dtype}"
        started = time.perf_counter()  # one run, whose output is read too
        built = run_script("teacher_cache.py", "--teacher", str(work / "model"), "--out", str(cache), "--dtype", dtype,
                           *flags, stdout=subprocess.PIPE)
        seconds = time.perf_counter() - started  # with the interpreter's and the model's start
        labels = teacher_cache.TeacherCache(cache).meta["labels"]
        attention = re.search(r"attention: (.*)", built.stdout)[1]
        rows.append(("attention", f"teacher_cache.py {dtype}", f"{attention}; {labels / seconds:.0f} label tok/s "
                                                              "with start-up"))
        trained = run_script("train.py", "--model", str(work / "model"), "--loss", "target", "--teacher-cache",
                             str(cache), "--out", str(work / f"run-{dtype}"), "--dtype", dtype, "--max-steps",
                             str(steps), "--save-minutes", "0", "--no-export", "--no-compile", "--global-batch-size",
                             str(samples // steps), *flags, stdout=subprocess.PIPE)  # the train section compiles
        attention = re.search(r"attention: (.*?), (?:fp32|bf16), on", trained.stdout)[1]
        logged = logged_steps(work / f"run-{dtype}")
        rate = statistics.median(m["tokens_per_s"] for m in logged[1:] or logged)
        rows.append(("attention", f"train.py {dtype}", f"{attention}; {rate:.0f} tok/s"))
    print_rows(rows, (9, 22))
    return rows


# ----------------------------------------------------------------------------------------------------
# bench.py real: the scripts on a real pretrained LM, each against plain transformers on the same batches

def bench_real(*, repeat, batch_tokens, global_batch_size, micro_batch_size, steps):
    """SmolLM2-135M-Instruct (tests/real_models.py) on real MATH-500 solutions, fp32 on this machine's CPU:
    teacher_cache.build against a plain forward over the same packed batches, and train.py (one process, sft
    and target) against a plain transformers step, forward, cross-entropy backward and AdamW, over the same
    micro-batches. Tokens/s side by side in one run; train.py's and the plain steps' are those after the first."""
    from tests.real_models import real_model  # tests/ as a namespace package: the repository is on sys.path
    model_dir = real_model("smollm2-135m-instruct")
    work, ds, tokens = math16_dataset("bench-real-", AutoTokenizer.from_pretrained(model_dir), repeat)
    flags = ["--data", str(work / "rows.jsonl"), "--max-len", "512", "--data-cache", str(work / "tok")]
    model = common.load_model(str(model_dir), torch.device("cpu"))
    print(f"SmolLM2-135M-Instruct, cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads), fp32, "
          f"torch {torch.__version__}: {len(ds)} samples, {tokens} tokens")
    build, plain = build_and_forward(model, ds, batch_tokens, work / "cache", 64)
    rows = [("real", "teacher cache: build / plain forward", f"{tokens / build:.0f} / {tokens / plain:.0f} tok/s "
                                                             f"= {plain / build:.2f}")]

    sampler = data.Sampler(len(ds), seed=0)
    plan = [data.fixed_micro_batches(sampler.take_global(global_batch_size), micro_batch_size)[0]
            for _ in range(steps)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    model.train()

    def plain_step(step):
        for ids in step:
            batch = data.pad_batch(ds, ids)
            model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    rates = [sum(len(ds.input_ids(i)) for ids in step for i in ids) / timed(lambda: plain_step(step)) for step in plan]
    plain_train = statistics.median(rates[1:])
    for variant, compiled in [(v, c) for v in ("sft", "target") for c in (False, True)]:
        out = work / f"run-{variant}{'-compiled' if compiled else ''}"
        run_script("train.py", "--model", str(model_dir), "--loss", variant, "--teacher-cache", str(work / "cache"),
                   "--out", str(out), "--max-steps", str(steps), "--dtype", "fp32", "--save-minutes", "0",
                   "--no-export", "--global-batch-size", str(global_batch_size), "--micro-batch-size",
                   str(micro_batch_size), *flags, "--compile" if compiled else "--no-compile",
                   stdout=subprocess.DEVNULL)
        logged = logged_steps(out)
        rate = statistics.median(m["tokens_per_s"] for m in logged[1:])
        first = logged[0]["seconds"] - statistics.median(m["seconds"] for m in logged[1:])  # compiling, mostly
        rows.append(("real", f"train.py {variant}{' --compile' if compiled else ''} / plain step",
                     f"{rate:.0f} / {plain_train:.0f} tok/s = {rate / plain_train:.2f}; first step +{first:.0f} s"))
    print_rows(rows, (6, 40))
    return rows


# ----------------------------------------------------------------------------------------------------
# bench.py batching: how long ranks wait for each other, fixed sample counts against token-balanced micro-batches

LENGTHS = {"numina-like": (700, 400), "openr1-like": (1800, 700)}  # assumed (mean, sd) tokens, max-len 3072


def sample_lengths(mean, sd, count, max_len, rng):
    """Lognormal lengths with the given mean and sd, kept to [64, max_len]."""
    sigma2 = np.log(1 + (sd / mean) ** 2)
    return np.clip(rng.lognormal(np.log(mean) - sigma2 / 2, np.sqrt(sigma2), count), 64, max_len).astype(int)


def step_cost(plan, lengths, padded):
    """Tokens of compute time per step: in every slot, all ranks wait for the costliest."""
    return int(data.slot_costs(plan, lengths, padded).max(0).sum())


def bench_batching(*, samples, steps, global_batch_size, micro_batch_size, micro_batch_tokens, max_len, seed):
    rng = np.random.default_rng(seed)
    print(f"{steps} steps of {global_batch_size} samples, max-len {max_len}; fixed: "
          f"{micro_batch_size} samples per micro-batch; balanced: {micro_batch_tokens} tokens")
    print("useful = real tokens / (ranks x the step's cost), the share of rank time not spent waiting or on padding")
    print(f"{'lengths':12} {'ranks':>5} {'layout':7} {'balance fixed':>13} {'balanced':>9} {'useful fixed':>12} "
          f"{'balanced':>9} {'step x':>7} {'slots':>5}")
    for name, (mean, sd) in LENGTHS.items():
        lengths = sample_lengths(mean, sd, samples, max_len, rng)
        for world in (8, 64):
            for padded in (False, True):
                sampler = data.Sampler(len(lengths), seed, world_size=world)
                results = {"fixed": [], "balanced": []}
                for _ in range(steps):
                    dealt = sampler.take_global(global_batch_size // world)
                    plans = {"fixed": data.fixed_micro_batches(dealt, micro_batch_size),
                             "balanced": data.balanced_micro_batches(sum(dealt, []), lengths, world,
                                                                     micro_batch_tokens, padded)}
                    real = sum(lengths[i] for ids in dealt for i in ids)
                    for kind, plan in plans.items():
                        cost = step_cost(plan, lengths, padded)
                        results[kind].append((data.balance(plan, lengths, padded), real / (world * cost), cost,
                                              len(plan[0])))
                fixed, balanced = (np.mean(results[k], axis=0) for k in ("fixed", "balanced"))
                print(f"{name:12} {world:5} {'padded' if padded else 'packed':7} {fixed[0]:13.3f} {balanced[0]:9.3f} "
                      f"{fixed[1]:12.1%} {balanced[1]:9.1%} {fixed[2] / balanced[2]:7.2f} {balanced[3]:5.1f}")


# ----------------------------------------------------------------------------------------------------
# bench.py demo: the demo a newcomer runs, timed script by script

def bench_demo(*, demo_args):
    """The default demo end to end into a fresh folder: wall time, and the seconds of each script it ran, read
    from the `[N s: SCRIPT]` line it prints after each command as that line arrives (so runs side by side are
    seen as the span they cover together, not as the sum of their seconds)."""
    spans, seconds = [], {}
    with tempfile.TemporaryDirectory() as out, open(Path(out) / "stderr.log", "w+") as stderr:
        started = time.perf_counter()
        demo_run = subprocess.Popen([sys.executable, "demo.py", "--out", str(Path(out) / "demo"), *demo_args],
                                    text=True, stdout=subprocess.PIPE, stderr=stderr, cwd=REPO)
        for line in demo_run.stdout:
            finished = re.match(r"^\[(\d+) s: (\S+)\]$", line)
            if finished:
                took, script, now = float(finished.group(1)), finished.group(2), time.perf_counter() - started
                seconds.setdefault(script, []).append(took)
                spans.append((now - took, now))
        if demo_run.wait():
            stderr.seek(0)
            raise SystemExit(f"{stderr.read()[-3000:]}\ndemo.py failed (exit {demo_run.returncode})")
        wall = time.perf_counter() - started
    covered, reach = 0.0, 0.0  # the union of the scripts' spans
    for begin, end in sorted(spans):
        covered += max(0.0, end - max(begin, reach))
        reach = max(reach, end)
    print(f"python demo.py {' '.join(demo_args)}: {wall:.0f} s wall ({os.cpu_count()} cores, "
          f"torch {torch.__version__})")
    for script, took in seconds.items():
        print(f"  {script:18} {len(took):>2} runs {sum(took):6.0f} s ({min(took):.0f}-{max(took):.0f} s each)")
    print(f"  {'scripts, as spans':18} {'':>7} {covered:6.0f} s (several at once count once)")
    print(f"  {'in demo.py itself':18} {'':>7} {wall - covered:6.0f} s (the world, the analysis forwards, the figures)")


