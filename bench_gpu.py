"""bench.py gpu: the GPU questions in one lent window (README's GPU check, `bash run.sh gpu`), most important first,
inside a time budget. It prints a plan, each section's estimated seconds from its sizes, then runs the sections in
order, skipping by name any whose estimate does not fit in what is left of --budget. Each section imports what it
needs when it starts: one whose packages are missing is a row saying which, and the run goes on. Each section's rows
print, and are appended to --table, as it ends; a failed section's row holds the end of its failing child's stderr.
Run through bench.py."""
import gc
import importlib
import importlib.util
import time
import traceback
from pathlib import Path
from typing import NamedTuple

import torch

from bench_kernels import QWEN25_15B, QWEN_HEAD, TINY, print_rows, timed


class Section(NamedTuple):
    name: str
    run: str            # its bench function, "module:function"
    kwargs: dict
    needs: tuple = ()   # modules it runs that its bench module does not import: vllm in child processes
    processes: int = 0  # what its estimate counts: child Python processes started (each loads a model),
    compiles: int = 0   #   graph families inductor compiles cold (a decoder layer's forward and backward, a loss rule),
    engines: int = 0    #   vLLM engines started,
    flops: float = 0    #   and model FLOPs, at EFFICIENCY of the measured matmul rate


# Seconds each process, compile and engine adds to a plan's estimate. The CPU's were read off `bench.py gpu --tiny` on
# this project's CPU machine (MEASUREMENTS.md#gpu-check); CUDA's are guesses from the GPU image's documented start-up,
# since no GPU has run this yet: the summary prints each section's estimate beside its time, to correct them by.
OVERHEAD = {"cuda": {"process": 20, "compile": 40, "engine": 60}, "cpu": {"process": 9, "compile": 20, "engine": 40}}
EFFICIENCY = 0.35  # a whole training step's share of a bare matmul's FLOP rate (about the MFU train.py reaches)


def matmul_parameters(shape, layers=None):
    """Weights a token multiplies by in the decoder layers and the lm_head: 6 of these FLOPs a token trains, 2 infer."""
    h, kv = shape["hidden_size"], shape["hidden_size"] // shape["num_attention_heads"] * shape["num_key_value_heads"]
    layer = 2 * h * h + 2 * h * kv + 3 * h * shape["intermediate_size"]
    return (layers or shape["num_hidden_layers"]) * layer + h * shape["vocab_size"]


def sections(tiny, liger):
    """The suite in its order of importance, at the sizes it runs: toy sizes with tiny (a CPU's check)."""
    train = dict(seq_len=256, samples=16, steps=4, micro_batch_size=2, accumulation=2) if tiny else dict(
        seq_len=3072, samples=40, steps=5, micro_batch_size=4, accumulation=2)
    shape = dict(QWEN25_15B, **TINY) if tiny else QWEN25_15B
    step_tokens = train["micro_batch_size"] * train["accumulation"] * train["seq_len"]
    loss_rows, hidden, vocab = (512, 128, 8192) if tiny else (16384, *QWEN_HEAD)
    loss_steps = 4 + 2 * (3 + liger) * 6  # the floor's; then per variant and row: first, 3 timed, the peak's, naive's
    layout = dict(lengths="1400,1100,900,700", hidden=128 if tiny else 1536, layers=2 if tiny else 28, repeats=3)
    lengths = [int(n) for n in layout["lengths"].split(",")]
    layout_shape = dict(QWEN25_15B, hidden_size=layout["hidden"], intermediate_size=2 * layout["hidden"],
                        num_hidden_layers=layout["layers"], num_attention_heads=layout["hidden"] // 64, vocab_size=4096)
    attention = dict(layers=4, seq_len=256 if tiny else 2048, samples=16, steps=2)
    attention_tokens = attention["samples"] * attention["seq_len"]
    grad_rows, grad_hidden, grad_vocab = (1024, 256, 32768) if tiny else (2048, *QWEN_HEAD)
    evals = dict(problems=32 if tiny else 1024, n=4 if tiny else 16, max_tokens=64 if tiny else 1024,
                 mean_tokens=16 if tiny else 200, workers=2 if tiny else 16, rounds=1, data=None)
    return [
        Section("train", "bench_pipeline:bench_train",  # a cache build, then sft and target, eager and --compile
                dict(tiny=tiny, layers=None, vocab=None, checkpointing="off", compile="both", **train), processes=5,
                compiles=2, flops=matmul_parameters(shape) * (2 * train["samples"] * train["seq_len"]
                                                              + 4 * 6 * train["steps"] * step_tokens)),
        Section("loss", "bench_kernels:bench_loss", dict(paper=not tiny, tiny=tiny, qwen_rows=None, chunk_size=None,
                                                         variants="sft,target", repeats=3, liger=liger),
                compiles=2, flops=loss_steps * 6 * loss_rows * hidden * vocab),
        Section("cache", "bench_pipeline:bench_cache",  # a toy model: its Python, about a process's start, takes time
                dict(repeat=1 if tiny else 16, batch_tokens=2048 if tiny else 16384, k=64,
                     big_vocab=4096 if tiny else 152064, micro_batch_size=4), processes=1),
        Section("layout", "bench_kernels:bench_layout", layout,
                flops=3 * 4 * 6 * matmul_parameters(layout_shape) * len(lengths) * max(lengths)),  # 3 cases, 4 steps
        Section("grad", "bench_kernels:bench_grad", dict(tiny=tiny),
                flops=10 * 6 * grad_rows * grad_hidden * grad_vocab),  # float64: a tenth of the rate, or less
        Section("attention", "bench_pipeline:bench_attention", dict(tiny=tiny, **attention), processes=4,
                flops=2 * matmul_parameters(shape, attention["layers"]) * attention_tokens * (2 + 6)),
        Section("eval", "bench_eval:bench_eval", evals, needs=("vllm",), engines=3),
        Section("engine", "bench_eval:bench_engine", dict(tiny=tiny), needs=("vllm",), engines=7),
    ]


def matmul_rate(device):
    """FLOP/s of one square matmul in the suite's dtype (bf16 on a GPU, fp32 on a CPU): the plan's yardstick."""
    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / timed(lambda: a @ a, repeats=5, device=device, warm_up=True)


def estimate(section, device, rate):
    overhead = OVERHEAD[device]
    return (section.processes * overhead["process"] + section.compiles * overhead["compile"]
            + section.engines * overhead["engine"] + section.flops / (EFFICIENCY * rate))


def missing_module(modules):
    """The first of these that does not import (a stand-in that raises ImportError counts), else None."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as e:
            return e.name or module
    return None


def bench_gpu(*, tiny, budget, table):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not tiny:
        raise SystemExit("bench.py gpu needs a GPU; --tiny checks the script on a CPU at toy sizes")
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    heading = f"{name}, torch {torch.__version__}" + (" (--tiny: toy sizes, not measurements)" if tiny else "")
    rate = matmul_rate(device)
    liger = device == "cuda" and importlib.util.find_spec("liger_kernel") is not None  # Triton kernels: CUDA only
    plan = [(section, estimate(section, device, rate)) for section in sections(tiny, liger)]
    print(f"plan: --budget {budget:.0f} s, matmul {rate / 1e12:.2f} TFLOPS measured; "
          + ", ".join(f"{section.name} ~{seconds:.0f} s" for section, seconds in plan), flush=True)
    Path(table).write_text(heading + "\n")
    started, took, rows, widths = time.monotonic(), {}, [], (9, 44)
    for section, seconds in plan:
        left = budget - (time.monotonic() - started)
        module, function = section.run.split(":")
        missing = missing_module((*section.needs, module))
        if missing:
            done = [(section.name, "skipped", f"needs {missing}")]
        elif seconds > left:
            done = [(section.name, "skipped", f"~{seconds:.0f} s estimated, {max(left, 0):.0f} s left of the budget")]
        else:
            print(f"\n[bench.py gpu: {section.name}, ~{seconds:.0f} s estimated]", flush=True)
            began = time.monotonic()
            try:
                done = getattr(importlib.import_module(module), function)(**section.kwargs)
            except Exception as e:  # noqa: BLE001  any failure: the next sections still run
                traceback.print_exc()
                failed = f"{type(e).__name__}: {str(e).strip()}".replace("\n", "\n" + " " * 8)  # a child's stderr
                done = [(section.name, "FAILED", failed)]
            took[section.name] = time.monotonic() - began
            free_gpu_memory()
        rows += done
        print(f"\n[bench.py gpu: {section.name} done, its rows also in {table}]")
        print_rows(done, widths)
        with open(table, "a") as f:
            f.writelines(f"{bench:{widths[0]}} {case:{widths[1]}} {result}\n" for bench, case, result in done)
    print(f"\n{heading}")
    print_rows(rows, widths)
    print("\nestimated against taken (to correct bench_gpu.OVERHEAD by): " + ", ".join(
        f"{section.name} ~{seconds:.0f} s / {took[section.name]:.0f} s" for section, seconds in plan
        if section.name in took))


def free_gpu_memory():
    """What this process's allocator keeps cached goes back to the card (the next section may start vLLM)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
