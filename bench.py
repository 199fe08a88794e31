"""Benchmarks, one subcommand each; every number is printed next to its baseline from the same run.

    python bench.py cache      # teacher-cache build vs a plain teacher forward; reader vs a training step
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import data
import teacher_cache
from tests import tiny

MATH16 = Path(__file__).parent / "tests" / "data" / "math16.jsonl"


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_cache(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = tiny.make_tokenizer()
    work = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    rows = MATH16.read_text() * args.repeat
    (work / "rows.jsonl").write_text(rows)
    ds = data.tokenize_dataset(work / "rows.jsonl", tok, max_len=512, cache_dir=work / "tok")
    batches = teacher_cache.fixed_batches(ds, args.batch_tokens)
    tokens = sum(len(ds.input_ids(i)) for i in range(len(ds)))
    labels = int(teacher_cache.label_counts(ds).sum())
    print(f"{device}, {len(ds)} samples, {tokens} tokens ({labels} labels), {len(batches)} packed batches of "
          f"<= {args.batch_tokens} tokens, k={args.k}")
    for vocab in (len(tok), args.big_vocab):
        model = tiny.make_model(tok, seed=1).to(device)
        if vocab != len(tok):
            model.resize_token_embeddings(vocab)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = model.to(dtype)

        def plain_forward():
            with torch.no_grad():
                for b in batches:
                    batch = data.pack(ds, b)
                    model(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                          use_cache=False).logits.sum().item()

        plain_forward()  # warm-up
        plain = timed(plain_forward)
        build = timed(lambda: teacher_cache.build(model, ds, work / f"cache-{vocab}", k=args.k,
                                                  batch_tokens=args.batch_tokens))
        print(f"vocab {vocab:>6}: build {tokens / build:>9.0f} tok/s | plain forward {tokens / plain:>9.0f} tok/s"
              f" | build/forward {plain / build:.2f}x")

        cache = teacher_cache.TeacherCache(work / f"cache-{vocab}", ds, args.k)
        sampler = data.Sampler(len(ds), seed=0)
        micro = [data.pack(ds, sampler.take(args.micro_batch_size)) for _ in range(len(ds) // args.micro_batch_size)]
        read = timed(lambda: [teacher_cache.teacher_rows(cache, m, device)[1].sum().item() for m in micro])
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        model.train()

        def train_steps():
            for m in micro:
                out = model(input_ids=m["input_ids"].to(device), position_ids=m["position_ids"].to(device),
                            labels=m["labels"].to(device), use_cache=False)
                out.loss.backward()
                optimizer.step()
                optimizer.zero_grad()

        train = timed(train_steps)
        model.eval()
        micro_labels = sum(int((m["labels"] != -100).sum()) for m in micro)
        print(f"vocab {vocab:>6}: teacher_rows {micro_labels / read:>9.0f} label tok/s | training step (fwd+bwd+"
              f"AdamW, micro-batch {args.micro_batch_size}) {micro_labels / train:>9.0f} label tok/s | "
              f"reader/train {train / read:.0f}x")
        print(json.dumps({"vocab": vocab, "bytes_per_token": 4 * args.k,
                          "cache_bytes": (work / f"cache-{vocab}" / "topk.npy").stat().st_size}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    cache = commands.add_parser("cache", help="teacher-cache build and reader throughput")
    cache.add_argument("--repeat", type=int, default=4, help="copies of the 16 test rows to run on")
    cache.add_argument("--batch-tokens", type=int, default=2048)
    cache.add_argument("--k", type=int, default=64)
    cache.add_argument("--big-vocab", type=int, default=152064, help="Qwen2.5's vocabulary")
    cache.add_argument("--micro-batch-size", type=int, default=4)
    cache.set_defaults(run=bench_cache)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
