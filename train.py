"""Supervised fine-tuning toward a Q-target (loss.py) with torch FSDP2: the whole run, top to bottom.

The paper's TARGET-SFT run (Qwen2.5-Math-1.5B on NuminaMath-CoT 67k, teacher Qwen2.5-Math-1.5B-Instruct), as typed:

    torchrun --nproc_per_node 8 train.py --loss target

--model and --data default to that setting; the teacher comes from the paper's pairs (teacher_cache.PAPER_TEACHERS,
or --teacher MODEL), and its top-64 cache is built first, by the same ranks, under cache/teacher/ (then reused:
a rerun, or --loss distill on the same data, builds nothing). A cache built beforehand is passed instead:

    torchrun --nproc_per_node 8 teacher_cache.py --teacher Qwen/Qwen2.5-Math-1.5B-Instruct \\
        --tokenizer Qwen/Qwen2.5-Math-1.5B --data numina67k --out cache/numina67k-top64
    torchrun --nproc_per_node 8 train.py --loss target --teacher-cache cache/numina67k-top64

Baselines: --loss sft, --loss dft, --loss distill --c 0.8 (Table 1); others: see loss.RULES, e.g.

    torchrun --nproc_per_node 8 train.py --loss psft      # pi_old: the starting model's own cache, built likewise
    torchrun --nproc_per_node 8 train.py --loss weighted --data mine.jsonl   # rows carry weight / weight_spans

`python train.py ...` runs the same code in one process, CPU included (gloo); `python demo.py` runs it all on a
toy world. A checkpoint is saved every --save-minutes (30) and on SIGTERM or SIGUSR1, after which the run stops
with exit status 75; the same command with --resume continues it.
"""
import argparse
import copy
import dataclasses
import gc
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import NamedTuple, Optional

# read when torch loads, so set before: micro-batches of varying shapes fragment fixed-size allocator segments
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

import checkpoint
import common
import data
import loss as qloss
import teacher_cache

# ----------------------------------------------------------------------------------------------------
# Config: the paper's setup (Appendix A, Table 3)
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="Qwen/Qwen2.5-Math-1.5B", type=common.path,
                    help="HF id or local folder of the student")
parser.add_argument("--teacher", type=common.path, help="target, distill: the teacher (hub id or folder) whose top-64 "
                    "cache is built under cache/teacher/ when no --teacher-cache is given (default: the paper's "
                    "teacher of --model, teacher_cache.PAPER_TEACHERS)")
parser.add_argument("--teacher-cache", type=common.path, help="target, distill: a teacher top-k cache built beforehand "
                    "(teacher_cache.py)")
parser.add_argument("--ref-cache", type=common.path, help="kl, asft, psft: a cache of the starting model, same format "
                    "(its label log-probs are psft's pi_old); default: built from --model under cache/teacher/")
parser.add_argument("--out", default="runs/default", type=common.path)
parser.add_argument("--loss", default="target", choices=sorted(qloss.RULES))
parser.add_argument("--eta", type=float, default=0.5, help="target: teacher intensity in the residual (Sec. 6)")
parser.add_argument("--c", type=float, default=None, help="target: constant residual weight (Table 6); "
                    "distill: teacher weight (default 0.8)")
parser.add_argument("--alpha", type=float, default=None, help="beyond-log (default 1.0)")
parser.add_argument("--tau", type=float, default=None, help="profit (default 0.1)")
parser.add_argument("--eaft-k", dest="k", type=int, default=None, help="eaft: top-k of the entropy (default 20)")
parser.add_argument("--lam", type=float, default=None, help="ls, kl, asft (default 0.1)")
parser.add_argument("--beta", type=float, default=None, help="gem (default 0.7)")
parser.add_argument("--eps", type=float, default=None, help="psft: clip range 1 +- eps (default 0.2)")
parser.add_argument("--quadrant-threshold", type=float, default=0.5, help="with a cache: p_theta(y) and p_T(y) at "
                    "or above it count as high in the logged Figure 4 quadrant shares")
parser.add_argument("--loss-chunk-size", type=int, default=None, help="rows per chunk of the loss (default: sized "
                    "from the device's memory, loss.default_chunk_size)")
parser.add_argument("--lr", type=float, default=5e-5)
parser.add_argument("--warmup-ratio", type=float, default=0.1)
parser.add_argument("--weight-decay", type=float, default=0.0)
parser.add_argument("--grad-clip", type=float, default=1.0)
parser.add_argument("--global-batch-size", type=int, default=256, help="sequences per optimiser step")
micro_batching = parser.add_mutually_exclusive_group()
micro_batching.add_argument("--micro-batch-tokens", type=int, default=None, help="token budget of a micro-batch "
                            "(default 4 x max-len); each step's samples are balanced over ranks and micro-batches")
micro_batching.add_argument("--micro-batch-size", type=int, default=None, help="instead, a fixed number of "
                            "sequences per micro-batch, in the sampler's order (ranks then wait for each other)")
parser.add_argument("--epochs", type=int, default=1)
parser.add_argument("--max-steps", type=int, default=None, help="cap on the schedule's length (default: epochs)")
parser.add_argument("--stop-after", type=int, default=None, help="exit after this step, e.g. to fit a time "
                    "limit; --resume continues exactly")
parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="compute dtype (master weights "
                    "and gradient reduction stay fp32)")
parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile each "
                    "decoder layer and the loss's per-chunk element-wise work (default: on with CUDA, off on a CPU)")
parser.add_argument("--activation-checkpointing", action="store_true", help="recompute each layer's activations "
                    "in backward: less memory, about a third more compute (not needed for 1.5B on 80 GB)")
parser.add_argument("--layout", default="auto", choices=["auto", "packed", "padded"], help="micro-batch layout: "
                    "packed rows (flash-attn's varlen kernel) or right-padded rows without an attention mask "
                    "(sdpa's causal flash kernel); auto: packed where flash-attn can run (CUDA, bf16), else padded")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--save-minutes", type=float, default=30, help="minutes between sharded checkpoints, on rank "
                    "0's clock (0: none by time); SIGTERM or SIGUSR1 also saves one, then the run stops")
parser.add_argument("--save-every", type=int, default=0, help="steps between sharded checkpoints as well (0: none "
                    "by count); with --save-minutes 0, no checkpoints at all")
parser.add_argument("--keep", type=int, default=2, help="checkpoints kept")
parser.add_argument("--export-on-save", action="store_true", help="also write a HF folder at each checkpoint")
parser.add_argument("--export", action=argparse.BooleanOptionalAction, default=True, help="at the end, write OUT/hf "
                    "(transformers and vLLM load it) and the curves (--no-export: a timing run, bench.py train)")
parser.add_argument("--resume", action="store_true")
parser.add_argument("--wandb", default=None, metavar="PROJECT")
data.add_options(parser)
common.report_user_errors(parser)  # a bad flag, bad data or a mismatched cache: one `error:` line, not a traceback
args = parser.parse_args()
UNFINISHED = 75  # sysexits.h's EX_TEMPFAIL: stopped before the end (preempted or --stop-after), --resume continues


# ----------------------------------------------------------------------------------------------------
# Helpers

class CacheSource(NamedTuple):
    """The cache a run reads: whose it is, "teacher" (target, distill: the teacher's top-k) or "ref" (kl, asft,
    psft: the starting model's own, the reference), its folder, and the model it is built from first (None: the
    folder was given)."""
    owner: str
    folder: str
    build_from: Optional[str]

    @property
    def flag(self):
        return f"--{self.owner}-cache"


def cache_source(args):
    """The CacheSource this run reads, None for a loss that reads no cache (psft reads a reference cache's label
    log-probabilities, pi_old). A cache not given is built under cache/teacher/, named by its inputs, as
    teacher_cache.py --teacher MODEL --tokenizer STUDENT would with this run's data options."""
    if args.loss not in qloss.NEEDS_CACHE:
        return None
    if args.loss in qloss.REFERENCE_LOSSES:
        if args.teacher:
            raise common.UserError(f"--loss {args.loss} reads the starting model's own cache (--ref-cache, else built "
                                   "from --model); --teacher names the teacher of target and distill")
        owner, given, model = "ref", args.ref_cache, args.model
    else:
        if args.teacher_cache and args.teacher:
            raise common.UserError("give --teacher or --teacher-cache, not both: a cache already names its teacher")
        owner, given = "teacher", args.teacher_cache
        model = args.teacher or teacher_cache.PAPER_TEACHERS.get(args.model)
        if given is None and model is None:
            pairs = "; ".join(f"{student} -> {t}" for student, t in teacher_cache.PAPER_TEACHERS.items())
            raise common.UserError(f"--loss {args.loss} needs a teacher, and --model {args.model} has none among the "
                                   "paper's pairs (matched on the hub id as typed): pass --teacher MODEL (its cache is "
                                   f"built), or --teacher-cache DIR (teacher_cache.py). The paper's pairs: {pairs}")
    if given is not None:
        return CacheSource(owner, given, None)
    return CacheSource(owner, teacher_cache.auto_path(model, args.model, args.data, **data.options(args)), model)


class QTargetLM(torch.nn.Module):
    """The decoder and the Q-target loss on its lm_head, one module: FSDP's root, so that the root's parameters
    (the embeddings, the final norm and the lm_head, tied or not) are unsharded while the loss runs."""

    def __init__(self, lm, loss, hyper, chunk_size, compile):
        super().__init__()
        self.lm, self.loss, self.hyper, self.chunk_size, self.compile = lm, loss, hyper, chunk_size, compile

    def forward(self, batch, side, normalizer):
        """(the micro-batch's loss, divided by normalizer; its loss.PerRow values) at the label positions."""
        hidden = self.lm.model(**data.model_inputs(batch), use_cache=False)[0]
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["label_positions"])
        return qloss.q_target_loss(hidden, self.lm.lm_head.weight, batch["label_ids"], side, loss=self.loss,
                                   chunk_size=self.chunk_size, ignore_index=None, normalizer=normalizer,
                                   compile=self.compile, **self.hyper)


def check_compile(config, attention, batch, loss, hyper, dtype, device):
    """What torch.compile builds at the first step, built now on stand-ins in the run's dtype and device, so that a
    missing C++ compiler or Triton, or an op inductor refuses, raises here once instead of inside the first step on
    every rank: the loss's chunk body in the run's rule, on a few random rows and an lm_head of the model's shape
    (a Parameter, as the run's: the run reuses this compilation), and one decoder layer of the run's config, compiled
    as the run compiles each, through its forward and its backward on `batch` (inductor compiles a backward lazily,
    inside the first backward(), where no eager fallback exists)."""
    g = torch.Generator().manual_seed(0)
    rows, k = 4, 8
    logprobs, ids = torch.randn(rows, config.vocab_size, generator=g).log_softmax(-1).topk(k)
    side = qloss.Side(*(t.to(device) for t in (ids, logprobs, logprobs[:, 0], torch.rand(rows, generator=g))))
    hidden = torch.randn(rows, config.hidden_size, generator=g).to(device, dtype).requires_grad_(True)
    head = torch.nn.Parameter(torch.zeros(config.vocab_size, config.hidden_size, device=device, dtype=dtype))
    qloss.q_target_loss(hidden, head, side.ids[:, 0], side, loss=loss, compile=True, **hyper)
    one_layer = copy.deepcopy(config)
    one_layer.num_hidden_layers = 1
    if getattr(one_layer, "layer_types", None):  # per-layer attention kinds (sliding, full): the first layer's
        one_layer.layer_types = one_layer.layer_types[:1]
    with torch.device(device):
        probe = AutoModelForCausalLM.from_config(one_layer, dtype=dtype, attn_implementation=attention).train()
    probe.model.layers[0].compile()
    probe.model(**batch, use_cache=False)[0].float().square().mean().backward()


def micro_batch(sample_ids, layout, tokens, cache, device):
    """A micro-batch on the device: the model's inputs, where its labels are (found on the host, so that the GPU
    never has to report them: a boolean index would sync) and the side the loss reads (the cache's rows, the
    data's label weights)."""
    batch = (data.pack if layout == "packed" else data.pad_batch)(tokens, sample_ids)
    labels = batch["labels"].view(-1)
    positions = (labels != data.IGNORE_INDEX).nonzero().squeeze(1)
    weights = data.to_device(batch["token_weights"].view(-1)[positions], device) if "token_weights" in batch else None
    side = qloss.Side(*(teacher_cache.teacher_rows(cache, batch, device) if cache is not None else (None,) * 3),
                      weights)
    inputs = {**data.model_inputs(batch, device), "label_positions": data.to_device(positions, device),
              "label_ids": data.to_device(labels[positions], device)}
    return inputs, side


# dense bf16 peaks; names as torch reports them ("NVIDIA H100 80GB HBM3" is the SXM part): the first match wins
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200 NVL": 835e12, "H200": 989e12,
              "A100": 312e12, "A6000": 155e12}


def model_flops(config, parameters, lengths, label_counts):
    """A step's model FLOPs: 6 per matmul parameter and token, the lm_head's on label rows only (the loss computes
    no other logits), plus causal attention; activation recompute not counted. An untied input embedding is a
    lookup, not matmul work."""
    head = config.vocab_size * config.hidden_size
    body = parameters - head - (0 if config.tie_word_embeddings else head)
    attention = 6 * config.num_hidden_layers * config.hidden_size * int((lengths ** 2).sum())
    return 6 * body * int(lengths.sum()) + 6 * head * int(label_counts.sum()) + attention


def plot_metrics(metrics_path, png_path, run_label):
    """A grid of the logged curves, three panels a row: whichever of the panels' keys metrics.jsonl holds."""
    plt = common.pyplot()
    panels = [  # (title with units, keys drawn in it)
        ("loss (nats / label token)", ("loss",)),
        ("grad norm (L2, all parameters)", ("grad_norm",)),
        ("learning rate", ("lr",)),
        ("mean p(label) (probability)", ("p_label", "p_teacher_label", "p_ref_label")),
        ("mean trust γ and residual weight b (Table 5)", ("trust", "residual")),
        ("label in the teacher's top-k (share)", ("in_topk",)),
        ("Q quadrants (share of labels)", qloss.QUADRANTS),
        ("balance", ("balance",)),
        ("throughput (tokens / s)", ("tokens_per_s",)),
        ("MFU (share of peak)", ("mfu",)),
    ]
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    panels = [(title, [k for k in keys if any(k in r for r in rows)]) for title, keys in panels]
    panels = [(title, keys) for title, keys in panels if keys]
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.0 * nrows), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels):
        for key in keys:
            steps, values = zip(*[(r["step"], r[key]) for r in rows if key in r])
            line, = ax.plot(steps, values, label=key, alpha=0.35 if key == "loss" else 1.0)
            if key == "loss":  # a debiased exponential moving average (TensorBoard's smoothing, 0.9)
                ema, average = [], 0.0
                for i, v in enumerate(values, 1):
                    average = 0.9 * average + 0.1 * v
                    ema.append(average / (1 - 0.9 ** i))
                ax.plot(steps, ema, color=line.get_color(), label="loss (smoothed)")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        if len(keys) > 1 or keys == ["loss"]:
            ax.legend(fontsize=8, frameon=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(run_label)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# Setup: the flags checked first (one `error:` line each, before the process group and any download), then
# distributed, data, the cache, the model, the optimiser

# A preempted job gets SIGTERM (Slurm, then SIGKILL after a grace period) or SIGUSR1, during setup (a cache build,
# say) too: every rank notes it, the step's all-reduce shares it, and after that step all save a checkpoint and exit
# with UNFINISHED
signalled = []
saving = args.save_minutes > 0 or args.save_every > 0
if saving:
    for name in ("SIGTERM", "SIGUSR1"):
        signal.signal(getattr(signal, name), lambda signum, frame: signalled.append(signal.Signals(signum).name))
flag_values = {keyword: getattr(args, keyword) for keyword, _ in qloss.FLAGS.values()}  # each flag's dest
try:
    hyper = qloss.variant_hyperparameters(args.loss, **{k: v for k, v in flag_values.items() if v is not None})
except ValueError as e:
    parser.error(str(e))
if args.save_minutes < 0 or args.save_every < 0:
    parser.error("--save-minutes and --save-every must be >= 0 (0: no checkpoints by time, or by steps)")
if args.keep < 1:
    parser.error("--keep must be at least 1")
source = cache_source(args)
if source is not None and source.build_from is None:
    teacher_cache.check_complete(source.folder, source.flag)
common.check_model("--model", args.model)
if source is not None and source.build_from not in (None, args.model):
    common.check_model("--teacher", source.build_from)
data.check_source(args.data)

rank, world_size, device = common.start_distributed(always=True)  # `python train.py`: a world of one, same code
common.check_shared_folders({"--out": args.out, "--data-cache": args.data_cache,
                             **({source.flag: Path(source.folder).parent} if source is not None else {})})
max_len = data.recipe_for(args.data, max_len=args.max_len).max_len
micro_batch_tokens = args.micro_batch_tokens  # the budget, None with --micro-batch-size; args keeps the flags as given
if micro_batch_tokens is None and args.micro_batch_size is None:
    micro_batch_tokens = 4 * max_len
per_rank, remainder = divmod(args.global_batch_size, world_size * (args.micro_batch_size or 1))
if remainder or per_rank == 0:
    parser.error(f"--global-batch-size {args.global_batch_size} must be a multiple of world size {world_size}" +
                 (f" x --micro-batch-size {args.micro_batch_size}" if args.micro_batch_size else ""))
if micro_batch_tokens is not None and micro_batch_tokens < max_len:
    parser.error(f"--micro-batch-tokens {micro_batch_tokens} is less than the max length {max_len}: a "
                 "longest sample would fit no micro-batch")
out = Path(args.out)
checkpoints = checkpoint.checkpoint_dirs(out)
if checkpoints and not args.resume:
    parser.error(f"{out} holds checkpoints of an earlier run: pass --resume to continue it, or another --out")
resume_from = checkpoints[-1] if args.resume and checkpoints else None
trainer_state = checkpoint.read_trainer_state(resume_from, args) if resume_from else None
if args.resume and resume_from is None and rank == 0:
    print(f"--resume: no checkpoint in {out}, starting from step 0")
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(args.seed + rank)

tokenizer = AutoTokenizer.from_pretrained(args.model)
end_of_turn = data.end_of_turn_id(tokenizer, args.system_prompt)  # where generation stops, in the export
tokens = data.tokenize_dataset(args.data, tokenizer, cache_dir=args.data_cache,
                              weights=args.loss in qloss.NEEDS_WEIGHTS, **data.options(args))
if source is not None and source.build_from is not None:
    if rank == 0:
        print(f"{'reference' if source.owner == 'ref' else 'teacher'} cache: {source.folder} (top-"
              f"{teacher_cache.TOP_K} of {source.build_from} on this run's token ids; built first unless complete)",
              flush=True)
    teacher_cache.build_by_name(source.build_from, tokenizer, tokens, source.folder, device)
cache = teacher_cache.TeacherCache(source.folder, data=tokens) if source is not None else None
if args.loss == "psft" and cache.meta["teacher"] != args.model and rank == 0:
    print(f"warning: psft reads pi_old(y) from {source.folder}, a cache of {cache.meta['teacher']}, not of the "
          f"starting model --model {args.model}; build it with teacher_cache.py --teacher {args.model} unless that is "
          "meant")
sampler = data.Sampler(len(tokens), args.seed, world_size)
lengths, label_counts = np.diff(tokens.offsets), tokens.label_counts()
steps_per_epoch = len(tokens) // args.global_batch_size
total_steps = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
if total_steps == 0:
    parser.error(f"{len(tokens)} samples make no step of --global-batch-size {args.global_batch_size}")

compute_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
attention, why = common.attention_implementation(device, compute_dtype)
layout = args.layout if args.layout != "auto" else "packed" if attention == "flash_attention_2" else "padded"
if rank == 0:
    sizing = (f"{args.micro_batch_size} sequences" if args.micro_batch_size
              else f"<= {micro_batch_tokens} tokens, balanced over ranks")
    slow = " (sdpa keeps packed rows apart with a dense [T, T] mask: slow)" if (attention, layout) == (
        "sdpa", "packed") else ""
    print(f"attention: {attention} ({why}), {args.dtype}, on {layout} micro-batches of {sizing}{slow}")
with torch.device("meta"):  # the structure only; load_pretrained fills the shards
    lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model), dtype=torch.float32,
                                          attn_implementation=attention)
if args.activation_checkpointing:
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
compile = args.compile if args.compile is not None else device.type == "cuda"
if compile:
    try:  # the toolchain, this run's loss and a decoder layer's backward, compiled now: a failure is one line
        first = (data.pack if layout == "packed" else data.pad_batch)(tokens, [0])  # a real sample, its layout
        check_compile(lm.config, attention, data.model_inputs(first, device), args.loss, hyper, compute_dtype, device)
    except Exception as e:  # noqa: BLE001  no C++ compiler or Triton, an op inductor refuses: whatever it raises
        compile = False
        if rank == 0:
            print(f"--compile: torch.compile fails here, so the run goes on eagerly ({common.summary(e)})")
    else:  # what is left to fail, a layer's forward at a shape the probe did not meet, runs eagerly with a warning
        torch._dynamo.config.suppress_errors = True
        if rank == 0:
            print("--compile: each decoder layer and the loss's chunk body through torch.compile (inductor)")
model = QTargetLM(lm, args.loss, hyper, args.loss_chunk_size, compile)
mesh = init_device_mesh(device.type, (world_size,))
policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
for layer in lm.model.layers:
    if compile:  # one decoder layer at a time, before sharding, as torchtitan does: every layer shares one graph
        layer.compile()
    fully_shard(layer, mesh=mesh, mp_policy=policy)
# the root's inputs include the cache's fp32 logprobs: bf16 would keep 8 bits of them (cast_forward_inputs)
fully_shard(model, mesh=mesh, mp_policy=dataclasses.replace(policy, cast_forward_inputs=False))
model.to_empty(device=device)
checkpoint.load_pretrained(model, args.model)
model.train()
optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))
scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(args.warmup_ratio * total_steps), total_steps)
model_id = checkpoint.model_identity(args.model, lm.config)
parameters = sum(p.numel() for p in model.parameters())
peak_flops = next((f for name, f in PEAK_FLOPS.items()
                   if device.type == "cuda" and name in torch.cuda.get_device_name()), None)

step = 0
if trainer_state:
    checkpoint.load(resume_from, model, optimizer, trainer_state, scheduler, sampler)
    step = trainer_state["step"]
    if rank == 0:
        kept = [line for line in (out / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= step]
        (out / "metrics.jsonl.tmp").write_text("".join(line + "\n" for line in kept))
        os.replace(out / "metrics.jsonl.tmp", out / "metrics.jsonl")
        print(f"resumed from {resume_from} at step {step}")
elif rank == 0:
    (out / "metrics.jsonl").write_text("")
if rank == 0:
    (out / "args.json").write_text(json.dumps(vars(args), indent=2))
    if args.wandb:
        import wandb
        wandb.init(project=args.wandb, config=vars(args), dir=str(out))

if rank == 0 and not saving:
    print("checkpoints: off (--save-minutes 0 and --save-every 0): a killed run starts over")
elif rank == 0:
    every = " and ".join(([f"{args.save_minutes:g} minutes"] if args.save_minutes else [])
                         + ([f"{args.save_every} steps"] if args.save_every else []))
    print(f"checkpoints: every {every} into {out / 'checkpoints'}, the last {args.keep} kept; on SIGTERM or SIGUSR1 "
          f"one more, then exit {UNFINISHED} (--resume continues)")

# ----------------------------------------------------------------------------------------------------
# The loop: one optimiser step = global-batch-size sequences, normalised by the step's global label count

cache_owner = None if source is None else source.owner
progress = tqdm(total=total_steps, initial=step, disable=rank != 0, desc=f"{args.loss}", dynamic_ncols=True)
stop = min(total_steps, args.stop_after or total_steps)
last_save, stopping = time.monotonic(), False
while step < stop:
    started = time.perf_counter()
    dealt = sampler.take_global(args.global_batch_size // world_size)  # every rank's samples of this step
    step_ids = sum(dealt, [])
    plan = (data.balanced_micro_batches(step_ids, lengths, world_size, micro_batch_tokens, layout == "padded")
            if micro_batch_tokens else data.fixed_micro_batches(dealt, args.micro_batch_size))
    label_tokens = int(label_counts[step_ids].sum())
    step_loss, totals = torch.zeros((), dtype=torch.float64, device=device), {}  # totals: PerRow.sums' names
    common.reset_peak_memory(device)
    try:
        for sample_ids in plan[rank]:
            inputs, side = micro_batch(sample_ids, layout, tokens, cache, device)
            # FSDP averages gradients over ranks, so each rank divides by the global count / world size: the
            # step's gradient is then that of (sum of token losses) / (global label count)
            value, per_row = model(inputs, side, normalizer=label_tokens / world_size)
            value.backward()  # reduce-scatters now, leaving each rank its fp32 gradient shard
            step_loss += value.detach() / world_size
            # every rank has micro-batches (data.py deals them so), so every rank all-reduces the same names
            for name, summed in per_row.sums(inputs["label_ids"], side.ids, args.quadrant_threshold,
                                             cache_owner).items():
                totals[name] = totals.get(name, 0.0) + summed
    except torch.OutOfMemoryError as e:
        flag, budget = (("--micro-batch-size", f"{args.micro_batch_size} (rows of up to "
                         f"{args.micro_batch_size * max_len} tokens)") if args.micro_batch_size
                        else ("--micro-batch-tokens", str(micro_batch_tokens)))
        raise SystemExit(f"out of memory at step {step + 1} with {flag} {budget}: try a smaller {flag}" +
                         ("" if args.activation_checkpointing else " or --activation-checkpointing")) from e
    peak_fwd_bwd = common.peak_memory_gib(device)  # what --micro-batch-tokens and --activation-checkpointing govern
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
    # one all-reduce of named sums: the step's loss and logged sums, and whether to save (rank 0's clock) or to
    # stop (a rank was signalled)
    save_due = rank == 0 and args.save_minutes > 0 and time.monotonic() - last_save >= 60 * args.save_minutes
    sums = {"loss": step_loss, **totals, "save_due": save_due, "signalled": bool(signalled)}
    reduced = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in sums.values()])
    dist.all_reduce(reduced)
    sums = dict(zip(sums, reduced.tolist()))
    stopping = sums["signalled"] > 0
    if not (math.isfinite(sums["loss"]) and math.isfinite(grad_norm)):
        raise SystemExit(f"step {step + 1}: loss {sums['loss']} / grad norm {grad_norm} is not finite "
                         f"(rank {rank}'s samples {sum(plan[rank], [])}); the run stops before the update")
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    step += 1

    elapsed = time.perf_counter() - started
    flops = model_flops(lm.config, parameters, lengths[step_ids], label_counts[step_ids])
    metrics = {"step": step, "loss": sums["loss"], "lr": lr, "grad_norm": grad_norm, "tokens": label_tokens,
               "tokens_per_s": int(lengths[step_ids].sum()) / elapsed, "seconds": elapsed,
               "tflops": flops / elapsed / world_size / 1e12,
               "balance": data.balance(plan, lengths, layout == "padded"),
               **{name: sums[name] / label_tokens for name in totals}}  # the step's means
    if peak_flops:
        metrics["mfu"] = flops / elapsed / (peak_flops * world_size)
    if peak_fwd_bwd is not None:  # the step's peak, and its peak before the optimizer's update; the max because
        # a CPU's VmHWM is not kept strictly: read again after the update it can come out lower
        metrics.update(peak_gib=max(common.peak_memory_gib(device), peak_fwd_bwd), peak_fwd_bwd_gib=peak_fwd_bwd)
    if rank == 0:
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if args.wandb:
            wandb.log(metrics, step=step)
        progress.set_postfix(loss=f"{sums['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{metrics['tokens_per_s']:.0f}")
        progress.update()
    stopping_early = step == stop < total_steps  # --stop-after: the checkpoint is what --resume continues
    counted = args.save_every and (step % args.save_every == 0 or step == stop)
    if counted or sums["save_due"] > 0 or stopping_early or stopping:
        checkpoint.save(out, step, model, optimizer, checkpoint.trainer_state(step, scheduler, sampler, model_id,
                                                                             vars(args)), args.keep)
        last_save = time.monotonic()
        if args.export_on_save:
            checkpoint.export_hf(out / "checkpoints" / f"step_{step:08d}" / "hf", model, tokenizer, compute_dtype,
                                 end_of_turn)
    if stopping:
        break
progress.close()

# ----------------------------------------------------------------------------------------------------
# The export: a folder transformers and vLLM load, and the curves

if step == total_steps and not stopping and args.export:
    checkpoint.export_hf(out / "hf", model, tokenizer, compute_dtype, end_of_turn)
    if rank == 0:
        plot_metrics(out / "metrics.jsonl", out / "metrics.png", f"{args.loss} on {args.data}")
        print(f"done: {out / 'hf'} (transformers / vLLM), {out / 'metrics.png'}")
# the model and optimizer's DTensors hold the process group: freed first, its gloo/NCCL threads are joined by
# destroy_process_group, not at the interpreter's exit, where they can abort a rank that has finished (pytorch#179291)
del model, lm, optimizer, scheduler
gc.collect()
dist.barrier()  # every rank tears gloo/NCCL down together, none while rank 0 is still plotting
dist.destroy_process_group()
if stopping:
    if rank == 0:
        received = signalled[0] if signalled else "another rank's signal"
        print(f"stopped after step {step} on {received}: saved {out / 'checkpoints' / f'step_{step:08d}'}; rerun the "
              "same command with --resume to continue", flush=True)
    sys.exit(UNFINISHED)
