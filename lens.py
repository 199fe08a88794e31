"""The lens on your own data (Figure 4, Appendix G): for a student, a teacher cache and a data set, where the
teacher rescues what the student lacks and where neither believes the label, token by token.

    python lens.py --student Qwen/Qwen2.5-Math-1.5B --teacher-cache cache/numina67k-top64 --data numina67k \
        --out runs/lens
    torchrun --nproc_per_node 8 lens.py ...       # the student's forward sharded over GPUs (bf16, fp32 logits)

Run it before training ("does my teacher rescue anything, on my data, for my student?") or after, on the
trained model. p_T(y_t) is the cache's label log-probability (the teacher over its full vocabulary); p_theta(y_t)
is the student's on the same token ids, which the cache checks as train.py does. Each label token falls in one
of Figure 4's quadrants at --quadrant-threshold (loss.quadrant): Q1 rescue (p_T high, p_theta low), Q2 filter
(both low), Q3 both high, Q4 student high. Writes to --out:

    figure4.png   the density of p_T(y_t) in each bin of p_theta(y_t), each quadrant's share annotated
    lens.json     per quadrant its count, share and most frequent tokens; the mean p_theta and p_T; the inputs
    tokens.html   Appendix G's view of --samples responses, tokens coloured by quadrant; hovering shows p_theta,
                  p_T, gamma and the top of TARGET-SFT's residual at --eta (loss.py's own rule)

Plain `python lens.py` runs on a CPU in fp32. Data options have train.py's names and defaults.
"""
import argparse
import html
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from transformers import AutoTokenizer

import common
import data
import loss as qloss
import teacher_cache

LABELS = dict(zip(qloss.QUADRANTS, ("Q1 rescue", "Q2 filter", "Q3 both high", "Q4 student high")))
COLOURS = dict(zip(qloss.QUADRANTS, ("#9be09b", "#f4a3a3", "#ffffff", "#a8c8f0")))


@torch.no_grad()
def label_probs(model, tokens, count=None, batch_tokens=8192):
    """p_theta(y_t) at the label positions of the first `count` samples (all by default), in the cache's
    order, computed as the teacher's are (teacher_cache.topk_rows: packed rows, fp32 logits). Under
    torch.distributed each rank scores every world-th batch and all ranks receive the whole."""
    rank, world = common.rank_and_world()
    batches = teacher_cache.fixed_batches(tokens, batch_tokens, count)
    mine = {}
    for b in range(rank, len(batches), world):
        label_logprobs = teacher_cache.topk_rows(model, data.pack(tokens, batches[b]), k=1)[1]
        mine[b] = label_logprobs.double().exp().cpu().numpy()
    if dist.is_initialized():
        shards = [None] * world
        dist.all_gather_object(shards, mine)
        mine = {b: probs for shard in shards for b, probs in shard.items()}
    return np.concatenate([mine[b] for b in range(len(batches))])


def quadrant_of(p_student, p_teacher, threshold):
    """Each label token's quadrant, an index into loss.QUADRANTS, as train.py logs them (loss.PerRow.sums)."""
    return qloss.quadrant(torch.as_tensor(p_student), torch.as_tensor(p_teacher), threshold).numpy()


def shares(p_student, p_teacher, threshold):
    """{quadrant: share of the label tokens}."""
    index = quadrant_of(p_student, p_teacher, threshold)
    return {name: float(np.mean(index == k)) for k, name in enumerate(qloss.QUADRANTS)}


def report(p_student, p_teacher, label_ids, tokenizer, threshold, top=20):
    """lens.json's numbers: per quadrant its count, share and `top` most frequent label tokens (decoded), and
    the means of p_theta(y_t) and p_T(y_t), over all label tokens."""
    index = quadrant_of(p_student, p_teacher, threshold)
    quadrants = {}
    for k, name in enumerate(qloss.QUADRANTS):
        frequent = Counter(label_ids[index == k].tolist()).most_common(top)
        quadrants[name] = {"count": int((index == k).sum()), "share": float(np.mean(index == k)),
                           "top_tokens": [[tokenizer.decode([i]), n] for i, n in frequent]}
    return {"labels": len(index), "threshold": threshold, "quadrants": quadrants,
            "mean_p_student": float(np.mean(p_student)), "mean_p_teacher": float(np.mean(p_teacher))}


def figure4(p_student, p_teacher, png, threshold, title, bins=20):
    """P(p_T | p_theta): each column a p_theta bin, coloured by the density of p_T in it (the paper's Fig. 4)."""
    plt = common.pyplot()
    counts, _, _ = np.histogram2d(p_student, p_teacher, bins=bins, range=[[0, 1], [0, 1]])
    density = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    image = ax.imshow(density.T, origin="lower", extent=(0, 1, 0, 1), cmap="viridis", aspect="auto")
    fig.colorbar(image, label="P(p_T | p_θ bin)")
    ax.axhline(threshold, color="w", ls="--", lw=1)
    ax.axvline(threshold, color="w", ls="--", lw=1)
    corners = {"q1_rescue": (0, 1), "q2_filter": (0, 0), "q3_both_high": (1, 1), "q4_student_high": (1, 0)}
    for name, share in shares(p_student, p_teacher, threshold).items():
        x, y = (threshold * (1 - side) / 2 + (1 + threshold) * side / 2 for side in corners[name])
        ax.text(x, y, f"{LABELS[name]}\n{share:.1%}", color="w", ha="center", va="center", fontsize=9,
                weight="bold")
    ax.set_xlabel("student p_θ(y_t)")
    ax.set_ylabel("teacher p_T(y_t)")
    ax.set_title(f"{title}, {len(p_student)} label tokens", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def shown_samples(quadrant, offsets, count):
    """The samples tokens.html shows: those richest in both regimes, ranked by the smaller of their rescue and
    filter counts, then by the two together."""
    counts = [np.bincount(quadrant[offsets[i]:offsets[i + 1]], minlength=4) for i in range(len(offsets) - 1)]
    return sorted(range(len(counts)), key=lambda i: (-min(counts[i][0], counts[i][1]),
                                                     -counts[i][0] - counts[i][1], i))[:count], counts


@torch.no_grad()
def tokens_html(model, tokenizer, tokens, cache, p_student, p_teacher, path, threshold, samples=4, eta=0.5):
    """Appendix G's view: responses with each label token coloured by quadrant; hovering shows p_theta, p_T,
    gamma_t and the top of TARGET-SFT's residual (loss.RULES["target"] on the student's logits)."""
    device = next(model.parameters()).device
    quadrant = quadrant_of(p_student, p_teacher, threshold)
    offsets = np.concatenate([[0], np.cumsum(tokens.label_counts()[:len(p_student)])])
    chosen, counts = shown_samples(quadrant, offsets, samples)
    blocks = []
    for i in chosen:
        ids = torch.from_numpy(np.asarray(tokens.input_ids(i), dtype=np.int64)).to(device)
        labels = torch.from_numpy(tokens.labels(i)).to(device)
        rows = labels != data.IGNORE_INDEX
        z = model(input_ids=ids[None], use_cache=False).logits[0][rows].float()
        z = z - z.amax(-1, keepdim=True)
        teacher_ids, teacher_logprobs, _ = cache.rows([i], device)
        q = qloss.RULES["target"](z, z.logsumexp(-1), labels[rows], qloss.Side(teacher_ids, teacher_logprobs),
                                  eta=eta)
        gamma = qloss.trust(q.a, q.b)
        spans = []
        for t, y in enumerate(labels[rows].tolist()):
            at = offsets[i] + t
            name = qloss.QUADRANTS[quadrant[at]]
            top = q.res[t].topk(3)
            residual = ", ".join(f"{tokenizer.decode([int(q.res_ids[t, j])])!r} {v:.2f}"
                                 for v, j in zip(top.values.tolist(), top.indices.tolist()))
            tip = (f"{LABELS[name]}: p_θ={p_student[at]:.3f} p_T={p_teacher[at]:.3f} γ={float(gamma[t]):.3f}; "
                   f"Q = γ·onehot + (1-γ)·res, res (η={eta}) top: {residual}")
            spans.append(f'<span style="background:{COLOURS[name]}" title="{html.escape(tip)}">'
                         f"{html.escape(tokenizer.decode([y])).replace(chr(10), '⏎<br>')}</span>")
        prompt = tokenizer.decode(ids[:int(tokens.prompt_lens[i])].tolist())
        blocks.append(f"<h3>Sample {i} &nbsp; Rescue · {counts[i][0]} &nbsp; Filter · {counts[i][1]} &nbsp; "
                      f"Response · {len(spans)} tokens</h3><pre>{html.escape(prompt)}</pre>"
                      f"<p class=r>{''.join(spans)}</p>")
    legend = " ".join(f'<span style="background:{COLOURS[n]}">{html.escape(LABELS[n])}</span>'
                      for n in qloss.QUADRANTS)
    Path(path).write_text(
        "<!doctype html><meta charset=utf-8><title>The lens: tokens by quadrant</title><style>body{font-family:"
        "sans-serif;max-width:60em}.r{font-family:monospace;font-size:15px;line-height:1.8}span{padding:1px}"
        "</style><h2>Responses by quadrant (hover a token)</h2><p>" + legend + "</p>" + "".join(blocks))


def write(out, model, tokenizer, tokens, cache, p_student, threshold=0.5, samples=4, eta=0.5, title="the data",
          inputs=None, top=20):
    """figure4.png, lens.json and tokens.html into `out`, for the label tokens p_student covers (the first
    samples of `tokens`, in the cache's order). Returns lens.json's contents."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    p_teacher = np.exp(cache.label_logprobs[:len(p_student)].astype(np.float64))
    covered = int(np.searchsorted(cache.offsets, len(p_student)))
    label_ids = np.concatenate([y[y != data.IGNORE_INDEX] for y in map(tokens.labels, range(covered))])
    lens = {**report(p_student, p_teacher, label_ids, tokenizer, threshold, top),
            "inputs": {**(inputs or {}), "samples_covered": covered}}
    (out / "lens.json").write_text(json.dumps(lens, indent=1, ensure_ascii=False))
    figure4(p_student, p_teacher, out / "figure4.png", threshold, title)
    tokens_html(model, tokenizer, tokens, cache, p_student, p_teacher, out / "tokens.html", threshold, samples, eta)
    return lens


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", required=True, type=common.path,
                   help="student model: hub id or folder (e.g. train.py's OUT/hf)")
    p.add_argument("--teacher-cache", required=True, type=common.path, help="teacher top-k cache "
                   "(teacher_cache.py, or the one train.py built under cache/teacher/)")
    p.add_argument("--out", default="runs/lens", type=common.path)
    p.add_argument("--quadrant-threshold", type=float, default=0.5, help="p_theta(y) and p_T(y) at or above it "
                   "count as high (Figure 4's quadrants, as train.py logs them)")
    p.add_argument("--samples", type=int, default=4, help="responses shown in tokens.html")
    p.add_argument("--eta", type=float, default=0.5, help="TARGET-SFT's teacher intensity for the residual shown")
    p.add_argument("--max-samples", type=int, default=None, help="only the first N samples (default: all)")
    p.add_argument("--top-tokens", type=int, default=20, help="most frequent tokens listed per quadrant")
    p.add_argument("--dtype", default="auto", choices=common.DTYPES, help="the student's compute "
                   "dtype (auto: bf16 on GPU, fp32 on CPU); its logits are fp32 either way")
    data.add_options(p)
    common.report_user_errors(p)
    args = p.parse_args()
    if not 0 < args.quadrant_threshold < 1:
        p.error(f"--quadrant-threshold {args.quadrant_threshold} must lie in (0, 1)")
    common.check_model("--student", args.student)  # before the process group and any download
    teacher_cache.check_complete(args.teacher_cache, "--teacher-cache")
    data.check_source(args.data)
    rank, _, device = common.start_distributed()
    common.check_shared_folders({"--data-cache": args.data_cache, "--teacher-cache": Path(args.teacher_cache).parent})
    tokenizer = AutoTokenizer.from_pretrained(args.student)
    tokens = data.tokenize_dataset(args.data, tokenizer, cache_dir=args.data_cache, **data.options(args))
    cache = teacher_cache.TeacherCache(args.teacher_cache, data=tokens)  # other token ids: refused
    model = common.load_model(args.student, device, args.dtype)
    p_student = label_probs(model, tokens, args.max_samples)
    if rank == 0:
        inputs = {**{k: v for k, v in vars(args).items() if k != "out"}, "teacher": cache.meta["teacher"]}
        lens = write(args.out, model, tokenizer, tokens, cache, p_student, args.quadrant_threshold, args.samples,
                     args.eta, f"{Path(args.student).name} on {Path(str(args.data)).name}", inputs, args.top_tokens)
        for name, quadrant in lens["quadrants"].items():
            print(f"{LABELS[name]:16} {quadrant['share']:7.1%} {quadrant['count']:9}  "
                  + " ".join(repr(t) for t, _ in quadrant["top_tokens"][:8]))
        print(f"mean p_θ(y_t) {lens['mean_p_student']:.3f}, p_T(y_t) {lens['mean_p_teacher']:.3f} over "
              f"{lens['labels']} label tokens; wrote {args.out}/: figure4.png, lens.json, tokens.html")
    if dist.is_initialized():
        dist.barrier()  # rank 0 writes while the others wait
    common.stop_distributed()


if __name__ == "__main__":
    main()
