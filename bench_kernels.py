"""bench.py's kernel benchmarks: the chunked loss (eager and compiled) against the matmul floor, the naive
loss, TRL and Liger; the bf16 weight gradient against float64; one micro-batch's layout, packed or padded. Also the
helpers every bench_*.py shares. Run through bench.py."""
import importlib.util
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import common
import loss as L


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


def print_rows(rows, widths):
    for bench, case, result in rows:
        print(f"{bench:{widths[0]}} {case:{widths[1]}} {result}")


def run_script(*command, **kwargs):
    """`python *command`, checked. Its stderr is kept: a failure raises with its last lines, which bench.py gpu
    writes into the failed section's row (subprocess.run's CalledProcessError would say only the exit status)."""
    done = subprocess.run([sys.executable, *command], stderr=subprocess.PIPE, text=True, **kwargs)
    if done.returncode:
        tail = "\n".join(done.stderr.strip().splitlines()[-12:])
        raise RuntimeError(f"python {command[0][:40]} ... exited with status {done.returncode}; stderr ends:\n{tail}")
    return done


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


def loss_step(impl, variant, hidden, weight, labels, *side, chunk_size=None):
    """One forward and backward ("matmuls": its three products alone); leaves .grad on hidden and weight."""
    hidden.grad = weight.grad = None
    if impl in ("eager", "compiled"):  # the chunked loss, its chunk body run eagerly or through torch.compile
        value, _ = L.q_target_loss(hidden, weight, labels, L.Side(*side), loss=variant, chunk_size=chunk_size,
                                   compile=impl == "compiled")
    elif impl == "naive":
        value = L.reference_q_target_loss(hidden @ weight.T, labels, L.Side(*side), loss=variant)
    elif impl == "liger":  # Liger-Kernel's fused linear cross-entropy: plain CE only (sft)
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        labelled = labels != -100  # given the labelled rows only, like the chunked loss, and an fp32 grad_weight
        value = LigerFusedLinearCrossEntropyLoss(accum_dtype=torch.float32)(weight, hidden[labelled], labels[labelled])
    elif impl == "trl":  # TRL's log-probability of the labels (selective_log_softmax, a logsumexp row by row): sft
        from trl.trainer.utils import selective_log_softmax
        labelled = labels != -100
        value = -selective_log_softmax(hidden[labelled] @ weight.T, labels[labelled]).mean()
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


def peak_extra_bytes(impl, variant, sizes, dtype, device, chunk_size):
    """Peak memory of one step above what the inputs hold. On CPU: max RSS growth in a fresh process."""
    inputs = loss_inputs(*sizes, dtype, device)
    if device == "cpu":  # warm-up: lazily loaded kernels are not the step's memory
        loss_step(impl, variant, *inputs, chunk_size=chunk_size)
        inputs[0].grad = inputs[1].grad = None
    sync(device)
    before = held_bytes(device)
    common.reset_peak_memory(device)
    loss_step(impl, variant, *inputs, chunk_size=chunk_size)
    sync(device)
    return common.peak_memory_gib(device) * 2**30 - before


def measure_peak(impl, variant, sizes, dtype, device, chunk_size):
    if device == "cuda":
        return peak_extra_bytes(impl, variant, sizes, dtype, device, chunk_size)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(peak_extra_bytes, (impl, variant, sizes, dtype, device, chunk_size))


QWEN25_15B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)  # the paper's student's shape
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, vocab_size=4096)
QWEN_HEAD = (QWEN25_15B["hidden_size"], QWEN25_15B["vocab_size"])


def bench_loss(*, paper, tiny, qwen_rows, chunk_size, variants, repeats, liger):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    paper_sizes, cpu = ((16384, *QWEN_HEAD, 64), torch.bfloat16), ((2048, 512, 65536, 64), torch.float32)
    sizes, dtype = ((512, 128, 8192, 16), torch.float32) if tiny else paper_sizes if paper else cpu
    if qwen_rows:
        sizes = (qwen_rows, *QWEN_HEAD, 64)
    if paper and device != "cuda":
        raise SystemExit("--paper needs a GPU: the naive version alone holds ~30 GB of logits")
    n, h, v, _ = sizes
    # inductor's on-disk cache, empty: the compiled rows' compile time is what a first run pays
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-loss-inductor-")
    print(f"device={torch.cuda.get_device_name() if device == 'cuda' else 'cpu'} threads={torch.get_num_threads()} "
          f"N,H,V,k={sizes} dtype={dtype} torch={torch.__version__}")
    inputs = loss_inputs(*sizes, dtype, device)
    labelled = int((inputs[2] != -100).sum())
    print(f"chunks of {chunk_size or L.default_chunk_size(labelled, v, torch.device(device))} rows")

    def step_seconds(impl, variant):  # (the first step's seconds, the median of `repeats` steps after it)
        first = timed(lambda: loss_step(impl, variant, *inputs, chunk_size=chunk_size), 1, device)
        return first, timed(lambda: loss_step(impl, variant, *inputs, chunk_size=chunk_size), repeats, device)

    floor = step_seconds("matmuls", "sft")[1]
    print(f"three matmuls alone (the floor): {floor * 1e3:.1f} ms, {6 * labelled * h * v / floor / 1e12:.2f} TFLOPS "
          f"on 6 N H V\n")
    print(f"{'variant':10} {'impl':9} {'ms':>9} {'x naive':>8} {'x floor':>8} {'TFLOPS':>7} {'compile s':>9} "
          f"{'peak MiB':>9} {'x naive':>8}")
    rows = []
    for variant in variants.split(","):
        impls = ["naive", "eager", "compiled"] + (["trl"] if variant == "sft" and importlib.util.find_spec("trl")
                                                  else []) + (["liger"] if liger and variant == "sft" else [])
        results = {impl: (*step_seconds(impl, variant), measure_peak(impl, variant, sizes, dtype, device, chunk_size))
                   for impl in impls}
        naive_ms, naive_peak = results["naive"][1], results["naive"][2]
        for impl, (first, seconds, peak) in results.items():
            compile_s = f"{first - seconds:9.1f}" if impl == "compiled" else f"{'':9}"  # the first step's extra time
            tflops = 6 * labelled * h * v / seconds / 1e12
            print(f"{variant:10} {impl:9} {seconds * 1e3:9.1f} {seconds / naive_ms:8.2f} {seconds / floor:8.2f} "
                  f"{tflops:7.2f} {compile_s} {peak / 2**20:9.0f} {peak / naive_peak:8.3f}")
            rows.append(("loss", f"{variant} {impl} N={n} H={h} V={v}",
                         f"{seconds * 1e3:.1f} ms, {seconds / floor:.2f}x the floor, {tflops:.1f} TFLOPS, peak "
                         f"+{peak / 2**30:.2f} GiB" + (f", compiled in {first - seconds:.0f} s" if impl == "compiled"
                                                        else "")))
    return rows


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
    loss_step("eager", "target", hidden, weight, labels, *side)
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
