"""Offline teacher top-k (Appendix A: "we cache all teacher logits before training ... truncated to the
top-64 tokens"), computed on exactly data.py's token ids, stored only at label positions.

    python teacher_cache.py --teacher Qwen/Qwen2.5-Math-1.5B-Instruct --tokenizer Qwen/Qwen2.5-Math-1.5B \
        --data numina67k --out cache/teacher
    torchrun --nproc_per_node 8 teacher_cache.py ...        # shards batches over GPUs (gloo on CPU)

--tokenizer is the student's: the cache lines up with the token ids train.py sees (an instruct teacher's chat
template usually differs from its base model's). Data options must match train.py's (same flag names).

Format v3 (DIR/): topk.npy, int32 [labels, k], each entry `token_id << 14 | fp16 bits of -logprob / 256`
(4 bytes per entry; ids up to 2^18, so a 152k or 262,144 vocabulary fits; a larger one, Gemma-3 4B's 262,208,
gets int64 entries of the same layout, named in meta.json's `entry`); label_logprobs.npy, float32 [labels], the
teacher's log-probability of the observed label y_t over the full vocabulary, whether or not y_t is in its
top-k (Figure 4's p_T(y_t), Proximal SFT's pi_old(y_t)); offsets.npy, int64 [samples + 1], sample i owns rows
offsets[i]:offsets[i+1] (its label positions, in order); meta.json (teacher, k, format, tokenizer and data
fingerprints, a hash of every sample's token ids, counts, the entry type). 260 bytes per label token at k=64
(516 with int64 entries).
The same format serves the reference-model cache of the kl/asft/psft losses (--teacher REF_MODEL).

A build writes into DIR.partial/, each rank chunk files of its own (rank{r}-batch{b}.npz, the rows of --flush-every
batches), which rank 0 merges into the cache's files before it renames the folder to DIR: a killed build resumes
from its done batches, and a partial cache is never taken for a complete one. Batches are fixed by the data
alone (not by the number of ranks or the resume point), so every build of the same inputs is byte-identical.
"""
import argparse
import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from filelock import FileLock, Timeout
from tqdm import tqdm
from transformers import AutoConfig, AutoTokenizer

import common
from common import UserError
import data as data_lib
from loss import logits_fp32

TOP_K = 64  # Appendix A: the teacher's logits truncated to its top-64 tokens
# The paper's student -> teacher pairs (Appendix A, Section 7.1), by hub id exactly as typed: train.py builds
# this teacher's cache when --loss target or distill is given no --teacher-cache and no --teacher.
PAPER_TEACHERS = {
    "Qwen/Qwen2.5-Math-1.5B": "Qwen/Qwen2.5-Math-1.5B-Instruct",
    "Qwen/Qwen2.5-Math-7B": "Qwen/Qwen2.5-Math-7B-Instruct",
    "Qwen/Qwen3-1.7B-Base": "Qwen/Qwen3-4B-Instruct-2507",
    "Qwen/Qwen2.5-1.5B": "Qwen/Qwen2.5-1.5B-Instruct",
    "Qwen/Qwen2.5-7B": "Qwen/Qwen2.5-7B-Instruct",
    "meta-llama/Llama-3.2-3B": "meta-llama/Llama-3.2-3B-Instruct",  # gated: a hub token
    "meta-llama/Llama-3.1-8B": "meta-llama/Llama-3.1-8B-Instruct",
}
FORMAT = "int32 v3: token_id << 14 | fp16 bits of -logprob / 256; float32 label logprobs"
VALUE_BITS = 14  # the rest of an entry is the token id: 18 bits in int32, 50 in int64
LOGPROB_SCALE = 256.0  # -logprob / 256 < 1 has fp16 bits below 0x3C00: 14 bits keep fp16's full precision
LOGPROB_FLOOR = -255.9  # e^-255.9 is 0 to every loss; lower logprobs are stored as this


def entry_dtype(vocab_size):
    """int32 entries while every id fits their 18 bits (260 bytes a label token at k=64), else int64."""
    return torch.int32 if vocab_size <= 1 << (32 - VALUE_BITS) else torch.int64


def pack_topk(ids, logprobs, dtype=torch.int32):
    """ids [N, k] long and logprobs [N, k] float -> [N, k] entries of `dtype` (entry_dtype): the id, then a
    14-bit value (relative error <= 2^-11, as fp16; absolute <= 2^-17 near logprob 0)."""
    # the mask drops the sign bit of -0.0 (a top-1 logprob of exactly 0): sign-extended, it would wipe the id
    value = (-logprobs.clamp(LOGPROB_FLOOR, 0) / LOGPROB_SCALE).half().view(torch.int16).to(dtype)
    bits = value & ((1 << VALUE_BITS) - 1)
    return (ids.to(dtype) << VALUE_BITS) | bits


def unpack_topk(packed):
    """int32 or int64 [N, k] -> (ids [N, k] long, logprobs [N, k] float32); runs on the tensor's device."""
    id_bits = 8 * packed.element_size() - VALUE_BITS  # the mask undoes the sign extension of ids past 2^17
    ids = (packed >> VALUE_BITS) & ((1 << id_bits) - 1)
    bits = (packed & ((1 << VALUE_BITS) - 1)).to(torch.int16)
    return ids.long(), bits.view(torch.float16).float() * -LOGPROB_SCALE


def sample_hash(data, i):
    ids = np.ascontiguousarray(data.input_ids(i), dtype=np.int32)
    return hashlib.blake2b(ids.tobytes() + int(data.prompt_lens[i]).to_bytes(8, "little"),
                           digest_size=8).hexdigest()


class TeacherCache:
    """Read-only view of a complete cache: rows(sample_ids) decodes those samples' label positions alone, found in
    O(1) through offsets.npy."""

    def __init__(self, path, data=None, k=None):
        self.path = Path(path)
        check_complete(self.path)
        self.meta = json.loads((self.path / "meta.json").read_text())
        if self.meta.get("format") != FORMAT:
            raise UserError(f"{self.path}: storage format {self.meta.get('format')!r}, this code reads "
                             f"{FORMAT!r} (v3 adds the label's own log-probability); rebuild the cache with "
                             "this teacher_cache.py")
        if k is not None and self.meta["k"] != k:
            raise UserError(f"{self.path} holds top-{self.meta['k']}, but top-{k} was asked for; "
                             f"rebuild with --k {k} or ask for k={self.meta['k']}")
        self.offsets = np.load(self.path / "offsets.npy")
        try:
            self.packed = np.load(self.path / "topk.npy", mmap_mode="r")
            self.label_logprobs = np.load(self.path / "label_logprobs.npy", mmap_mode="r")
        except (ValueError, OSError) as e:
            raise UserError(f"{self.path}: a file is truncated or unreadable ({e}); rebuild the cache") from e
        labels = int(self.offsets[-1])
        entry = self.meta["entry"]
        if (self.packed.dtype != np.dtype(entry) or self.packed.shape != (labels, self.meta["k"])
                or self.label_logprobs.dtype != np.float32 or self.label_logprobs.shape != (labels,)
                or len(self) != self.meta["samples"]):
            raise UserError(f"{self.path}: topk.npy is {self.packed.dtype} {self.packed.shape} and label_logprobs.npy "
                             f"{self.label_logprobs.dtype} {self.label_logprobs.shape}, meta.json promises {entry} "
                             f"{(labels, self.meta['k'])} and float32 ({labels},) over {self.meta['samples']} "
                             "samples; rebuild the cache")
        if data is not None:
            self.check_matches(data)

    def __len__(self):
        return len(self.offsets) - 1

    def rows(self, sample_ids, device="cpu"):
        """(ids [n, k] long, logprobs [n, k] float32, label_logprobs [n] float32) of these samples' label
        positions, in order."""
        spans = [slice(self.offsets[i], self.offsets[i + 1]) for i in sample_ids]
        packed = data_lib.to_device(torch.from_numpy(np.concatenate([self.packed[s] for s in spans])), device)
        label_logprobs = data_lib.to_device(torch.from_numpy(np.concatenate([self.label_logprobs[s] for s in spans])),
                                            device)
        return *unpack_topk(packed), label_logprobs

    def check_matches(self, data):
        """Refuse a cache built on other token ids: the rows would silently belong to other tokens."""
        if self.meta["data_fingerprint"] != data.fingerprint:
            raise UserError(f"{self.path} was built on data {self.meta['data_fingerprint']}, training data is "
                             f"{data.fingerprint} (another source, tokenizer, template, system prompt or "
                             "max_len); rebuild the cache with the training run's data options")
        if len(self) != len(data) or not np.array_equal(np.diff(self.offsets), data.label_counts()):
            raise UserError(f"{self.path}: label counts differ from the data's; rebuild the cache")
        for i, h in enumerate(self.meta["sample_hashes"]):
            if sample_hash(data, i) != h:
                raise UserError(f"{self.path}: sample {i}'s token ids differ from those the cache was built "
                                 "on; rebuild the cache (or the tokenisation cache is corrupt)")


def check_complete(path, flag=None):
    """A cache folder that a finished build renamed into place (its meta.json is written last); a refusal names
    the flag that gave the folder."""
    path = Path(path)
    if not visible_soon(path / "meta.json"):
        partial = path.with_name(path.name + ".partial")
        raise UserError(
            f"{flag + ' ' if flag else ''}{path} is not a complete teacher cache (no meta.json); "
            + (f"{partial} holds an unfinished build: rerun the command that started it to finish it"
               if partial.exists() else "build it with teacher_cache.py"))


def visible_soon(path, seconds=120):
    """Whether the file `path` exists. Rank 0 answers at once. Another rank, perhaps on another node, looks again
    every second for `seconds` first: an NFS client caches a lookup's "no such file" (up to acdirmax, 60 s by
    default), which can outlive rank 0's renaming a finished cache into place. Read before any process group."""
    deadline = time.monotonic() + (seconds if os.environ.get("RANK", "0") != "0" else 0)
    while not path.is_file() and time.monotonic() < deadline:
        time.sleep(1)
    return path.is_file()


def complete_on_rank0(out):
    """Whether `out` is a complete cache, rank 0's answer on every rank: ranks deciding alone could split, some
    building while others, shown a stale listing, do not."""
    complete = [(Path(out) / "meta.json").is_file()]
    if dist.is_initialized():
        dist.broadcast_object_list(complete, src=0)
    return complete[0]


def teacher_rows(cache, batch, device):
    """(ids [n, k] long, logprobs [n, k] float32, label_logprobs [n] float32) for the batch's label positions,
    in the order of `batch["labels"].view(-1) != -100` (packed or padded: samples in order, label positions
    in order)."""
    n = int((batch["labels"] != data_lib.IGNORE_INDEX).sum())
    cached = int(sum(cache.offsets[i + 1] - cache.offsets[i] for i in batch["sample_ids"]))
    if cached != n:
        raise UserError(f"the batch has {n} label positions, the cache {cached} for its samples; the batch was "
                         "not built from the data this cache was checked against")
    return cache.rows(batch["sample_ids"], device)


def fixed_batches(data, batch_tokens, count=None):
    """Consecutive samples (the first `count`, default all) packed up to batch_tokens tokens (a longer sample
    goes alone)."""
    batches, current, tokens = [], [], 0
    for i in range(len(data) if count is None else min(count, len(data))):
        n = len(data.input_ids(i))
        if current and tokens + n > batch_tokens:
            batches.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += n
    return batches + [current]


@torch.no_grad()
def topk_rows(model, batch, k, chunk=1024):
    """(packed top-k [n, k] entries, label logprobs [n] float32) of the teacher's log-softmax at the label
    positions of a packed batch (data.pack, on the host). The lm head runs on `chunk` positions at a time, so no
    fp32 [T, V] tensor of the batch exists; log-softmax is never materialised either: top-k and the label are
    read off the logits, then shifted by their logsumexp."""
    device = next(model.parameters()).device
    hidden = model.get_decoder()(**data_lib.model_inputs(batch, device), use_cache=False).last_hidden_state[0]
    labels = batch["labels"][0].to(device)
    is_label = labels != data_lib.IGNORE_INDEX
    hidden, labels = hidden[is_label], labels[is_label]
    weight = model.get_output_embeddings().weight  # check_head: the head is this matmul alone
    dtype = entry_dtype(weight.shape[0])
    packed, label_logprobs = [], []
    for h, y in zip(hidden.split(chunk), labels.split(chunk)):
        z = logits_fp32(h, weight)
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        values, ids = z.topk(k, dim=-1)
        packed.append(pack_topk(ids, values - lse, dtype))
        label_logprobs.append((z.gather(1, y[:, None]) - lse).squeeze(1))
    return torch.cat(packed), torch.cat(label_logprobs)


def check_head(model):
    """topk_rows computes the logits as h W^T: a head with a bias or soft-capped logits would be cached wrong."""
    if getattr(model.get_output_embeddings(), "bias", None) is not None or getattr(
            model.config, "final_logit_softcapping", None):
        raise UserError(f"{model.config.model_type}'s lm_head has a bias or soft-caps its logits, which "
                         "teacher_cache.py's fp32 head (h W^T) leaves out; use a teacher without them")


def check_vocabularies(teacher_tok, student_tok, teacher_vocab_size):
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        raise UserError("teacher and student tokenizers have different vocabularies: the teacher's top-k ids "
                         "would name other tokens in the student; use a teacher of the student's family")
    if teacher_vocab_size < len(student_tok):
        raise UserError(f"teacher vocab_size {teacher_vocab_size} does not cover the tokenizer's "
                         f"{len(student_tok)} tokens: some label ids would have no teacher logit")


def build(model, data, out, k=TOP_K, batch_tokens=8192, teacher_name="", tokenizer_fingerprint="", flush_every=16):
    """Write the cache of `data` under `out`, resuming an unfinished build; a complete one is only checked
    against `data`. Every rank calls it and writes files of its own only: every `flush_every` batches, one chunk
    file of their rows (written to a temporary name, then renamed into place), which also marks them done. Rank 0
    then merges the chunks into the cache's files. No file is written by two ranks: on a network filesystem, nodes
    that write one memory-mapped file write back whole pages, and a node's stale copy of a shared page would
    overwrite another node's rows."""
    if flush_every < 1:
        raise UserError(f"flush_every (--flush-every) is {flush_every}; it must be >= 1")
    rank, world = common.rank_and_world()
    out = Path(out)
    if complete_on_rank0(out):  # model may be None then: nothing is computed
        TeacherCache(out, data, k)
        if rank == 0:
            print(f"{out} is complete: reused, not rebuilt")
        return
    check_head(model)
    partial = out.with_name(out.name + ".partial")
    batches = fixed_batches(data, batch_tokens)
    offsets = np.concatenate([[0], np.cumsum(data.label_counts())]).astype(np.int64)
    spans = [slice(offsets[batch[0]], offsets[batch[-1] + 1]) for batch in batches]
    entry = str(entry_dtype(model.get_output_embeddings().weight.shape[0])).removeprefix("torch.")
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")  # a resumed build computes as it began
    plan = {"teacher": teacher_name, "k": k, "format": FORMAT, "entry": entry, "dtype": dtype,
            "data_fingerprint": data.fingerprint,
            "tokenizer_fingerprint": tokenizer_fingerprint, "samples": len(data), "labels": int(offsets[-1]),
            "batch_tokens": batch_tokens}

    def start_or_check_partial():
        if (partial / "plan.json").exists() and json.loads((partial / "plan.json").read_text()) != plan:
            raise UserError(f"{partial} is an unfinished build with other inputs "
                             f"({(partial / 'plan.json').read_text()}); delete it or rerun that build")
        if not (partial / "plan.json").exists():
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            np.save(partial / "offsets.npy", offsets)
            (partial / "plan.json").write_text(json.dumps(plan, indent=1))
        for torn in partial.glob(".*.tmp"):  # a chunk whose writer was killed: its batches are not done
            torn.unlink()

    data_lib.on_rank0(start_or_check_partial)
    # rank 0 lists the done batches and every rank deals the rest from its list: a rank listing the folder itself
    # could already see another's new chunks, deal other batches, and leave some to nobody
    earlier = chunk_files(partial) if rank == 0 else []  # an unfinished build's chunks
    done = [{b for chunk in earlier for b in chunk_batches(chunk)}]
    if world > 1:
        dist.broadcast_object_list(done, src=0)
    mine = [b for b in range(len(batches)) if b not in done[0]][rank::world]
    bar = tqdm(total=sum(len(data.input_ids(i)) for b in mine for i in batches[b]), unit="tok",
               unit_scale=True, desc=f"teacher top-{k}", disable=rank != 0)

    chunk, written = [], []  # written: this rank's chunk files' names, which rank 0 opens by name
    for position, b in enumerate(mine, 1):
        batch = data_lib.pack(data, batches[b])
        chunk.append((b, *topk_rows(model, batch, k)))
        if len(chunk) == flush_every or position == len(mine):
            written.append(write_chunk(partial, rank, chunk))
            chunk = []
        bar.update(batch["input_ids"].shape[1])
    bar.close()
    # every rank's chunk names, gathered: rank 0 opens each by name, not from a listing of the folder, which an
    # NFS client caches for up to a minute and could show without the chunks other nodes have just renamed into place
    names = [written]
    if world > 1:
        names = [None] * world
        dist.all_gather_object(names, written)
    if rank == 0:
        chunks = earlier + [partial / name for rank_names in names for name in rank_names]
        merge(partial, spans, plan, chunks)
        meta = {**plan, "sample_hashes": [sample_hash(data, i) for i in range(len(data))]}
        (partial / "meta.json").write_text(json.dumps(meta, indent=1))
        for name in [*chunks, partial / "plan.json"]:
            name.unlink()
        os.rename(partial, out)
        print(f"wrote {out}: {len(data)} samples, {int(offsets[-1])} label tokens, top-{k}, "
              f"{np.dtype(entry).itemsize * k + 4} bytes per token")
    if world > 1:
        dist.barrier()


def write_chunk(partial, rank, chunk):
    """One rank's rows of a group of batches, [(batch, topk, label_logprobs)], as one file in the folder `partial`,
    written to a temporary name and renamed (a chunk file is whole); returns its name."""
    path = partial / f"rank{rank}-batch{chunk[0][0]:07d}.npz"
    tmp = partial / f".{path.name}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, batches=np.array([b for b, _, _ in chunk]),
                 topk=torch.cat([rows for _, rows, _ in chunk]).cpu().numpy(),
                 label_logprobs=torch.cat([logprobs for _, _, logprobs in chunk]).cpu().numpy())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path.name


def chunk_files(partial):
    return sorted(Path(partial).glob("rank*-batch*.npz"))


def chunk_batches(chunk):
    with np.load(chunk) as rows:
        return rows["batches"].tolist()


def merge(partial, spans, plan, chunks):
    """The ranks' chunk files into the cache's topk.npy and label_logprobs.npy (rank 0, once every rank is done).
    Until the chunks are deleted the folder holds the cache twice: the disk's free space is checked first."""
    needed = plan["labels"] * (plan["k"] * np.dtype(plan["entry"]).itemsize + 4)
    free = shutil.disk_usage(partial).free
    if free < needed:
        raise UserError(f"{partial}: merging its chunks into the cache needs {needed / 1e6:,.0f} MB free there, and "
                        f"{free / 1e6:,.0f} MB is; free that much and rerun (the build resumes from its chunks, which "
                        "are deleted once merged)")
    topk = np.lib.format.open_memmap(partial / "topk.npy", "w+", np.dtype(plan["entry"]), (plan["labels"], plan["k"]))
    label_logprobs = np.lib.format.open_memmap(partial / "label_logprobs.npy", "w+", np.float32, (plan["labels"],))
    merged = np.zeros(len(spans), bool)
    bar = tqdm(total=needed, unit="B", unit_scale=True, desc="merging the ranks' chunks")
    for chunk in chunks:
        with np.load(chunk) as rows:
            chunk_topk, chunk_label_logprobs, at = rows["topk"], rows["label_logprobs"], 0
            for b in rows["batches"]:
                n = spans[b].stop - spans[b].start
                topk[spans[b]], label_logprobs[spans[b]] = chunk_topk[at:at + n], chunk_label_logprobs[at:at + n]
                merged[b], at = True, at + n
            bar.update(chunk_topk.nbytes + chunk_label_logprobs.nbytes)
    bar.close()
    if not merged.all():
        raise RuntimeError(f"{partial}: {int((~merged).sum())} batches missing after the build; rerun")
    topk.flush()
    label_logprobs.flush()


@contextmanager
def exclusive(path, poll_seconds=60):
    """One run at a time builds `path`, whichever runs want it (jobs launched side by side on one shared
    filesystem): rank 0 holds an exclusive lock on path.lock (flock, released if the process dies), and its
    ranks follow it. A waiting run says so once, and its rank 0 checks in every poll_seconds, so no rank sits
    in one collective past the process group's timeout while another run builds."""
    rank = common.rank_and_world()[0]
    lock = None
    if rank == 0:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(f"{path}.lock")
    waiting = False
    while True:
        held = [True]
        if rank == 0:
            try:
                lock.acquire(timeout=poll_seconds if waiting else 0)
            except Timeout:
                held = [False]
        if dist.is_initialized():
            dist.broadcast_object_list(held, src=0)
        if held[0]:
            break
        if rank == 0 and not waiting:
            print(f"waiting for another run that is building {path}", flush=True)
        waiting = True
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def build_by_name(teacher, tokenizer, data, out, device, k=TOP_K, batch_tokens=8192, flush_every=16, dtype="auto"):
    """teacher_cache.py's whole job, and train.py's when it builds its own cache: `teacher` (a name or folder)
    scores `data`, tokenised with `tokenizer` (the student's), into `out`. A complete cache is checked and
    reused without loading the teacher; otherwise every rank loads it, builds (or finishes) the cache, and
    frees it. One run at a time (exclusive). dtype: the teacher's compute dtype (common.load_model's --dtype)."""
    with exclusive(out):
        model = None
        if not complete_on_rank0(out):
            check_vocabularies(AutoTokenizer.from_pretrained(teacher), tokenizer,
                               AutoConfig.from_pretrained(teacher).vocab_size)
            model = common.load_model(teacher, device, dtype)
        build(model, data, out, k=k, batch_tokens=batch_tokens, teacher_name=teacher,
              tokenizer_fingerprint=data_lib.tokenizer_fingerprint(tokenizer), flush_every=flush_every)
        if model is not None:
            common.free(model)


def auto_path(teacher, student, source, k=TOP_K, **data_options):
    """Where train.py keeps the cache it builds for itself: cache/teacher/<teacher>--<data>--top<k>-<hash>,
    named by the inputs as given (names, not contents: meta.json's fingerprints refuse changed contents). The
    student is among them because its tokenizer gives the token ids."""
    key = json.dumps({"teacher": teacher, "student": student, "data": str(source), "k": k, **data_options},
                     sort_keys=True)
    digest = hashlib.blake2b(key.encode(), digest_size=4).hexdigest()
    name = (f"{common.slug('-'.join(Path(teacher).parts[-2:]))}--{common.slug(Path(str(source)).name)}"
            f"--top{k}-{digest}")
    return Path("cache") / "teacher" / name


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, type=common.path, help="teacher (or reference) model name or folder")
    p.add_argument("--out", required=True, type=common.path, help="cache folder to write")
    p.add_argument("--tokenizer", type=common.path,
                   help="the student's tokenizer (default: the teacher's); the ids train.py sees")
    p.add_argument("--k", type=int, default=TOP_K)
    p.add_argument("--batch-tokens", type=int, default=8192, help="tokens per packed teacher forward")
    p.add_argument("--flush-every", type=int, default=16, help="batches between flushes to disk (a killed build "
                   "redoes at most this many per rank)")
    p.add_argument("--dtype", default="auto", choices=common.DTYPES, help="the teacher's compute dtype (auto: bf16 "
                   "on GPU, fp32 on CPU); its logits are fp32 either way")
    data_lib.add_options(p, source=None)
    common.report_user_errors(p)
    args = p.parse_args()
    common.check_model("--teacher", args.teacher)  # before the process group and any download
    if args.tokenizer:
        common.check_model("--tokenizer", args.tokenizer)
    data_lib.check_source(args.data)
    _, _, device = common.start_distributed()
    common.check_shared_folders({"--out": Path(args.out).parent, "--data-cache": args.data_cache})
    student_tok = AutoTokenizer.from_pretrained(args.tokenizer or args.teacher)
    data = data_lib.tokenize_dataset(args.data, student_tok, cache_dir=args.data_cache, **data_lib.options(args))
    build_by_name(args.teacher, student_tok, data, args.out, device, k=args.k, batch_tokens=args.batch_tokens,
                  flush_every=args.flush_every, dtype=args.dtype)
    common.stop_distributed()


if __name__ == "__main__":
    main()
