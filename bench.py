"""Benchmarks: speed and memory ratios measured side by side in one run, printed as tables. Not tests.

    python bench.py loss                      # chunked Q-target loss vs naive full logits, CPU sizes
    python bench.py loss --paper              # paper scale: N=16384, H=1536, V=151936, bf16 (GPU)
    python bench.py loss --qwen-rows 1024     # Qwen2.5-1.5B's head (H=1536, V=151936) on 1024 rows, fp32 on a CPU
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
    python bench.py eval                      # eval.py (its request stream) vs one plain LLM.generate
    bash run.sh gpu                           # on a GPU machine: bench.py gpu on its own torch (README's GPU check):
                                              # train +-compile, loss --paper, cache, layout, grad, attention, and with
                                              # vLLM eval and engine, in that order, inside --budget 360 s
    python bench.py gpu --tiny --budget 240   # the same at toy sizes, to check the script on a CPU
    python bench.py demo                      # `python demo.py` at its defaults into a fresh folder, timed
    python bench.py real                      # teacher_cache and train.py on SmolLM2-135M vs plain transformers
"""
import argparse
import importlib
import os

import common


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    loss_cmd = commands.add_parser("loss", help="chunked Q-target loss vs naive full logits")
    loss_cmd.add_argument("--paper", action="store_true", help="paper scale, bf16, needs a GPU")
    loss_cmd.add_argument("--tiny", action="store_true", help="toy sizes, to check the script")
    loss_cmd.add_argument("--qwen-rows", type=int, help="instead, this many rows at Qwen2.5-1.5B's width and "
                          "vocabulary (H=1536, V=151936); fp32, bf16 with --paper")
    loss_cmd.add_argument("--chunk-size", type=int, help="rows per chunk (default: loss.default_chunk_size)")
    loss_cmd.add_argument("--variants", default="sft,dft,target")
    loss_cmd.add_argument("--repeats", type=int, default=3)
    loss_cmd.add_argument("--liger", action="store_true", help="also time Liger-Kernel's fused linear CE on sft")
    loss_cmd.set_defaults(run="bench_kernels:bench_loss")
    logits = commands.add_parser("logits", help="bf16-rounded vs fp32 logits: error on cached probabilities")
    logits.add_argument("--rows", type=int, default=256)
    logits.add_argument("--hidden", type=int, default=1536)
    logits.add_argument("--vocab", type=int, default=151936)
    logits.add_argument("--k", type=int, default=64)
    logits.set_defaults(run="bench_pipeline:bench_logits")
    grad = commands.add_parser("grad", help="the bf16 weight gradient's error against float64, before and after")
    grad.add_argument("--tiny", action="store_true", help="CPU sizes on a GPU too")
    grad.set_defaults(run="bench_kernels:bench_grad")
    attention = commands.add_parser("attention", help="the attention teacher_cache.py and train.py chose, fp32 "
                                    "and bf16")
    attention.add_argument("--tiny", action="store_true", help="a tiny model, to check the script on a CPU")
    attention.add_argument("--layers", type=int, default=4, help="layers of the Qwen2.5-1.5B shape")
    attention.add_argument("--seq-len", type=int, default=2048)
    attention.add_argument("--samples", type=int, default=16)
    attention.add_argument("--steps", type=int, default=2)
    attention.set_defaults(run="bench_pipeline:bench_attention")
    cache = commands.add_parser("cache", help="teacher-cache build and reader throughput")
    cache.add_argument("--repeat", type=int, default=4, help="copies of the 16 test rows to run on")
    cache.add_argument("--batch-tokens", type=int, default=2048)
    cache.add_argument("--k", type=int, default=64)
    cache.add_argument("--big-vocab", type=int, default=152064, help="Qwen2.5's vocabulary")
    cache.add_argument("--micro-batch-size", type=int, default=4)
    cache.set_defaults(run="bench_pipeline:bench_cache")
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
    grade.set_defaults(run="bench_eval:bench_grade")
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
    train.add_argument("--compile", default="both", choices=["off", "on", "both"], help="train.py's --compile")
    train.set_defaults(run="bench_pipeline:bench_train")
    batching = commands.add_parser("batching", help="micro-batch balance across ranks, fixed counts vs balanced")
    batching.add_argument("--samples", type=int, default=67_000, help="synthetic dataset size")
    batching.add_argument("--steps", type=int, default=20)
    batching.add_argument("--global-batch-size", type=int, default=256)
    batching.add_argument("--micro-batch-size", type=int, default=4, help="samples per micro-batch, fixed")
    batching.add_argument("--micro-batch-tokens", type=int, default=4 * 3072, help="token budget, balanced")
    batching.add_argument("--max-len", type=int, default=3072)
    batching.add_argument("--seed", type=int, default=0)
    batching.set_defaults(run="bench_pipeline:bench_batching")
    layout = commands.add_parser("layout", help="one micro-batch, packed vs right-padded, without flash-attn")
    layout.add_argument("--lengths", default="1400,1100,900,700", help="the micro-batch's sequence lengths")
    layout.add_argument("--hidden", type=int, default=512)
    layout.add_argument("--layers", type=int, default=4)
    layout.add_argument("--repeats", type=int, default=3)
    layout.set_defaults(run="bench_kernels:bench_layout")
    demo_cmd = commands.add_parser("demo", help="python demo.py at its defaults, timed")
    demo_cmd.add_argument("demo_args", nargs="*", help="extra demo.py arguments, e.g. -- --seeds 3")
    demo_cmd.set_defaults(run="bench_pipeline:bench_demo")
    real = commands.add_parser("real", help="teacher_cache and train.py on SmolLM2-135M against plain transformers")
    real.add_argument("--repeat", type=int, default=4, help="copies of the 16 MATH-500 solutions")
    real.add_argument("--batch-tokens", type=int, default=2048, help="teacher cache: tokens per packed forward")
    real.add_argument("--global-batch-size", type=int, default=16)
    real.add_argument("--micro-batch-size", type=int, default=4)
    real.add_argument("--steps", type=int, default=4, help="the first is a warm-up, left out")
    real.set_defaults(run="bench_pipeline:bench_real")
    eval_cmd = commands.add_parser("eval", help="eval.py against one plain LLM.generate over the same requests")
    eval_cmd.add_argument("--data", type=common.path, help="math500.jsonl, the paper's eval set, its problems repeated "
                          "(marked as copies) up to --problems (default: ../shared/data/math_eval/math500.jsonl, else "
                          "tests/data/math500.jsonl)")
    eval_cmd.add_argument("--problems", type=int, default=256)
    eval_cmd.add_argument("--n", type=int, default=16)
    eval_cmd.add_argument("--max-tokens", type=int, default=256)
    eval_cmd.add_argument("--mean-tokens", type=int, default=48, help="the model's mean sample length")
    eval_cmd.add_argument("--workers", type=int, default=2, help="grading processes")
    eval_cmd.add_argument("--rounds", type=int, default=8, help="each round runs every row once, in an order rotated "
                          "round by round; the ratio is the median of the rounds' ratios (one run's time varies by "
                          "about 7%% here)")
    eval_cmd.set_defaults(run="bench_eval:bench_eval")
    gpu = commands.add_parser("gpu", help="the GPU questions, most important first, inside a time budget")
    gpu.add_argument("--tiny", action="store_true", help="toy sizes, to check the script on a CPU")
    gpu.add_argument("--budget", type=float, default=360, help="seconds: a section whose estimate does not fit in "
                     "what is left is skipped (the default leaves a lent 15-minute window room for a rerun)")
    gpu.add_argument("--table", default="bench-gpu.txt", type=common.path, help="the table, written section by "
                     "section as each ends")
    gpu.set_defaults(run="bench_gpu:bench_gpu")
    options = vars(parser.parse_args())
    del options["command"]
    # the benchmark's module imported only now: bench.py gpu runs where vLLM, datasets or math-verify may be missing
    module, function = options.pop("run").split(":")
    getattr(importlib.import_module(module), function)(**options)


if __name__ == "__main__":
    main()
