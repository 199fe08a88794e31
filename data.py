"""From a dataset to training tensors: one token stream for train.py and teacher_cache.py.

tokenize_dataset() turns a source (a paper set's name, or a local .jsonl/.parquet) into prompt+response
token ids through the student's chat template, as the source's recipe (RECIPES) says, and caches them on
disk as a memory-mapped token array plus offsets, keyed by a fingerprint of everything that decides the ids.
Sampler shards samples over ranks; balanced_micro_batches() deals a step's samples to ranks and micro-batches,
which pack() and pad_batch() build.
"""
import argparse
import hashlib
import heapq
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple, Optional

import datasets
import numpy as np
import torch
from tqdm import tqdm

from common import UserError, on_rank0, path, summary

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."  # Qwen2.5-Math's default
HELPFUL_SYSTEM = "You are a helpful assistant."
BOXED_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
# Li et al.'s layout for Llama-3 base models (their sft_dataset.py, and the Qwen2.5-Math harness's prompt
# "llama-base-boxed-with-bos"): headers, each turn closed by <|eot_id|> and a newline, BOS written once.
LLAMA_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
IGNORE_INDEX = -100
OPENR1_SAMPLES = 15_000  # Appendix A: "we sample 15k from OpenR1-Math-46k-8192" (after the length filter)
OPENR1_SEED = 0


class Recipe(NamedTuple):
    """How one source becomes (prompt, response) token ids."""
    system: Optional[str]  # None: no system message, so the chat template writes its own default
    user_suffix: str  # appended to the question
    prompt: str  # field holding the question (a dotted path into nested dicts, or a messages list)
    response: tuple  # fields joined by a blank line
    max_len: int
    over_length: str  # "drop" the row, or "truncate" it on the right (verl's `truncation: right`)
    llama_form: bool = False  # LLAMA_TEMPLATE instead of the model's own for Llama-3 tokenizers
    strip_prefix: str = ""  # removed from the start of the response


RECIPES = {
    # Li et al., data/data_process_math.py + scripts/training/math: the bare question under the model's own
    # template and default system turn (for Qwen2.5-Math that is SYSTEM_PROMPT), max_length 3072, verl's
    # default `truncation: right`.
    "numina67k": Recipe(None, "", "extra_info.question", ("extra_info.answer",), 3072, "truncate"),
    # Appendix A: the responses that fit 3072 tokens, then a seeded 15k sample (build_cache).
    "openr1-15k": Recipe(SYSTEM_PROMPT, "", "prompt", ("target",), 3072, "drop", strip_prefix="<think>\n"),
    # Li et al., data/data_process_medical.py + scripts/training/medical: "qwen_prompt" (system "You are a
    # helpful assistant.", the boxed instruction after the question) and "qwen_reponse_no_thinking" (the
    # distilled answer alone), max_length 800; their Llama runs use LLAMA_TEMPLATE with the same turns.
    "m23k": Recipe(HELPFUL_SYSTEM, BOXED_SUFFIX, "prompt", ("distilled_answer_string",), 800, "truncate",
                   llama_form=True),
    # m1's setting (Huang et al.): the reasoning, then the answer.
    "m23k-reasoning": Recipe(SYSTEM_PROMPT, "", "prompt", ("reasoning", "distilled_answer_string"), 3072, "drop"),
}
LOCAL_RECIPE = Recipe(SYSTEM_PROMPT, "", "prompt", ("response",), 3072, "drop")  # .jsonl/.parquet files
HF_SOURCES = {"numina67k": "gaotang/numina-cot-subset-67k", "openr1-15k": "Elliott/Openr1-Math-46k-8192",
              "m23k": "UCSC-VLAA/m23k-tokenized", "m23k-reasoning": "UCSC-VLAA/m23k-tokenized"}


def check_source(source):
    """A data source is a paper set's name or an existing .jsonl/.parquet file."""
    path = Path(source)
    if source not in HF_SOURCES and (path.suffix not in (".jsonl", ".parquet") or not path.is_file()):
        raise UserError(f"unknown data source {source!r}: give one of {', '.join(HF_SOURCES)}, or an "
                         "existing .jsonl/.parquet file with prompt/response fields or a messages list")


def read_jsonl(path):
    """The rows of a .jsonl file; a line that is not a JSON object is an error naming the file and the line."""
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {number}: not valid JSON ({e.msg}, column {e.colno}); fix or "
                                 "remove that line") from None
            if not isinstance(row, dict):
                raise UserError(f"{path} line {number}: a JSON {type(row).__name__}, not an object with fields")
            rows.append(row)
    return rows


def load_rows(source):
    check_source(source)
    if source in HF_SOURCES:
        try:
            return datasets.load_dataset(HF_SOURCES[source], split="train")
        except (ConnectionError, OSError, datasets.exceptions.DatasetNotFoundError) as e:  # offline, not cached
            raise UserError(f"data source {source}: the hub dataset {HF_SOURCES[source]} could not be loaded "
                             f"({summary(e)}); check the network, "
                             "or download it first while online") from None
    path = Path(source)
    try:
        rows = datasets.load_dataset("json" if path.suffix == ".jsonl" else "parquet", data_files=str(path),
                                     split="train")
    except Exception:  # datasets' message names neither the bad line nor an empty file: find them
        if path.suffix == ".jsonl" and read_jsonl(path) == []:
            raise UserError(f"{path} holds no rows; give a file with one JSON object per line") from None
        raise
    if len(rows) == 0:
        raise UserError(f"{path} holds no rows; give a file with one row per sample")
    return rows


def recipe_for(source, columns=(), **overrides):
    """The source's recipe, with the explicitly given options (not None) in place of its own."""
    recipe = RECIPES.get(source, LOCAL_RECIPE)
    if source not in RECIPES and "messages" in columns:
        recipe = recipe._replace(prompt="messages", response=("messages",))
    return recipe._replace(**{k: v for k, v in overrides.items() if v is not None})


def field(row, path, role):
    """row's value at a dotted path; a list of chat turns gives the content of its first turn of `role`
    (the prompt) or its last (the response)."""
    value = row
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    if isinstance(value, list):
        turns = [m.get("content") for m in value if isinstance(m, dict) and m.get("role") == role]
        value = (turns[0] if role == "user" else turns[-1]) if turns else None
    return value


def prompt_response(recipe, row):
    """The (prompt, response) of a row as its recipe reads it, unchecked."""
    prompt = field(row, recipe.prompt, "user")
    parts = [field(row, path, "assistant") for path in recipe.response]
    bad = [p for p in parts if not isinstance(p, str)]
    response = bad[0] if bad else "\n\n".join(parts).removeprefix(recipe.strip_prefix)
    return (prompt + recipe.user_suffix if isinstance(prompt, str) else prompt), response


def is_llama3(tokenizer):
    return "<|start_header_id|>" in tokenizer.get_vocab()


def chat_template(tokenizer, llama_form):
    """The template prompts are rendered with: a recipe's Llama form for Llama-3 tokenizers, else the model's."""
    return LLAMA_TEMPLATE if llama_form and is_llama3(tokenizer) else tokenizer.chat_template


def render(tokenizer, template, system, user, response=None):
    """Chat-templated text: the prompt with the assistant header, or the whole exchange with its response."""
    messages = ([] if system is None else [{"role": "system", "content": system}]) + \
        [{"role": "user", "content": user}]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=response is None)


def source_fingerprint(source, rows):
    path = Path(source)
    if path.is_file():
        return hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()
    return rows._fingerprint  # datasets' own hash of the downloaded files


def tokenizer_fingerprint(tokenizer):
    text = tokenizer.backend_tokenizer.to_str() + str(tokenizer.chat_template) + str(tokenizer.all_special_tokens)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def bad_row_reason(prompt, response):
    for name, value in (("prompt", prompt), ("response", response)):
        if value is None:
            return f"{name} is missing"
        if not isinstance(value, str):
            return f"{name} is a {type(value).__name__}, not a string"
        if not value.strip():
            return f"{name} is empty"
    return None


def weight_error(response, weight, spans):
    """Why a row's label weights (loss 'weighted') are unusable, or None. `weight`: iw-SFT's trajectory weight,
    a number >= 0 for every token; `weight_spans`: [[start, end, w], ...], character spans of the response
    with their own weight, e.g. CFT's critical tokens at 1 under a row `weight` of 0."""
    number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    if weight is None and spans is None:
        return "has neither a `weight` nor a `weight_spans` field (--loss weighted reads label trust from the data)"
    if weight is not None and not (number(weight) and weight >= 0):
        return f"weight {weight!r} is not a number >= 0"
    if spans is None:
        return None
    if not isinstance(spans, list) or not all(isinstance(x, (list, tuple)) and len(x) == 3 for x in spans):
        return "weight_spans is not a list of [start, end, weight]"
    if not all(number(a) and float(a).is_integer() and number(b) and float(b).is_integer() for a, b, _ in spans):
        return "weight_spans' start and end are not whole character offsets"
    previous = None
    for start, end, w in sorted(spans, key=lambda x: x[0]):
        if not 0 <= start < end <= len(response):
            return f"span [{start:g}, {end:g}) lies outside the response's {len(response)} characters"
        if not (number(w) and w >= 0):
            return f"span [{start:g}, {end:g}) has weight {w!r}, not a number >= 0"
        if previous is not None and start < previous[1]:
            return f"spans [{previous[0]:g}, {previous[1]:g}) and [{start:g}, {end:g}) overlap"
        previous = (start, end)
    return None


def response_token_weights(tokenizer, template, system_prompt, pair, num_prompt, num_response, weight, spans):
    """Each response token's weight: the largest weight among the spans its characters touch, else the row's
    weight (default 1). Spans are characters of the response, so they do not depend on the tokenizer; the
    tokenizer's offsets map them onto its tokens."""
    weights = np.full(num_response, 1.0 if weight is None else weight, dtype=np.float32)
    if spans is None:
        return weights
    prompt_text = render(tokenizer, template, system_prompt, pair[0])
    full_text = render(tokenizer, template, system_prompt, *pair)
    if not (full_text.startswith(prompt_text) and full_text[len(prompt_text):].startswith(pair[1])):
        raise UserError("the chat template rewrites the response text, so weight_spans cannot be mapped to its "
                         "tokens; give a per-row `weight` only, or a template that keeps the response as is")
    offsets = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    for j, (first, last) in enumerate(offsets[num_prompt:num_prompt + num_response]):
        first, last = first - len(prompt_text), last - len(prompt_text)
        touching = [w for start, end, w in spans if first < end and last > start]
        if touching:
            weights[j] = max(touching)
    return weights


def encode(tokenizer, pairs, system_prompt, template=None):
    """Prompt ids and response ids per pair. The response is what the template adds for the assistant
    turn up to and including its end-of-turn token; the whitespace the template puts after it is dropped."""
    out = []
    bar = tqdm(total=len(pairs), desc="tokenize", unit="rows", disable=len(pairs) < 100)
    for start in range(0, len(pairs), 1000):
        chunk = pairs[start:start + 1000]
        prompts = tokenizer([render(tokenizer, template, system_prompt, p) for p, _ in chunk],
                            add_special_tokens=False)["input_ids"]
        fulls = tokenizer([render(tokenizer, template, system_prompt, p, r) for p, r in chunk],
                          add_special_tokens=False)["input_ids"]
        for j, (prompt, full) in enumerate(zip(prompts, fulls)):
            if full[:len(prompt)] != prompt:
                raise UserError(f"row {start + j}: the chat template's prompt is not a token prefix of "
                                 "prompt+response; this template cannot be used to mask prompts")
            end = len(full)
            while end > len(prompt) and not tokenizer.decode(full[end - 1:end]).strip():
                end -= 1
            out.append((prompt, full[len(prompt):end]))
        bar.update(len(chunk))
    bar.close()
    return out


def end_of_turn_id(tokenizer, system_prompt=SYSTEM_PROMPT, template=None):
    """The token that closes the assistant's turn (the last label of every response): generation stops there.
    A Llama-3 tokenizer without a template of its own has m23k's Llama form (LLAMA_TEMPLATE)."""
    template = template or chat_template(tokenizer, llama_form=not tokenizer.chat_template)
    return encode(tokenizer, [("1 + 1?", "2")], system_prompt, template)[0][1][-1]


class TokenizedData:
    """Memory-mapped token ids of every sample; labels are derived, already shifted."""

    def __init__(self, path):
        self.path = Path(path)
        meta = json.loads((self.path / "meta.json").read_text())
        self.fingerprint = meta["fingerprint"]
        self.tokens = np.load(self.path / "tokens.npy", mmap_mode="r")
        self.offsets = np.load(self.path / "offsets.npy")
        self.prompt_lens = np.load(self.path / "prompt_lens.npy")
        weights = self.path / "weights.npy"  # per token, when tokenised for loss 'weighted'
        self.weights = np.load(weights, mmap_mode="r") if weights.exists() else None

    def __len__(self):
        return len(self.prompt_lens)

    def input_ids(self, i):
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def labels(self, i):
        """labels[j] is the token after position j; -100 where that token is still prompt, and at the end."""
        ids = self.input_ids(i)
        labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
        labels[self.prompt_lens[i] - 1:-1] = ids[self.prompt_lens[i]:]
        return labels

    def label_weights(self, i):
        """The data's weight of each label position, aligned with labels(i): the weight of the token predicted."""
        weights = np.zeros(len(self.input_ids(i)), dtype=np.float32)
        weights[self.prompt_lens[i] - 1:-1] = self.weights[self.offsets[i] + self.prompt_lens[i]:self.offsets[i + 1]]
        return weights

    def label_counts(self):
        """Label positions per sample: the response tokens, whose predictions the loss trains."""
        return np.diff(self.offsets) - self.prompt_lens


def add_options(parser, source="numina67k"):
    """The flags that decide a dataset's token ids, shared by train.py, teacher_cache.py and lens.py: a teacher
    cache built with other ones holds other ids, and TeacherCache refuses it. source: --data's default (None:
    required)."""
    group = parser.add_argument_group("data: pass the same to train.py, teacher_cache.py and lens.py")
    group.add_argument("--data", default=source, type=path, required=source is None,
                       help="numina67k, openr1-15k, m23k, or a local .jsonl/.parquet file")
    group.add_argument("--max-len", type=int, default=None, help="default: the data recipe's (data.RECIPES)")
    group.add_argument("--system-prompt", default=None, help="default: the recipe's")
    group.add_argument("--truncate", action=argparse.BooleanOptionalAction, help="cut over-long samples (or, with "
                       "--no-truncate, drop them) whatever the recipe does")
    group.add_argument("--skip-bad", action="store_true", help="skip and count malformed rows instead of failing")
    group.add_argument("--data-cache", default="cache/tokenized", type=path, help="the tokenisation cache's folder")


def options(args):
    """add_options' recipe flags, as tokenize_dataset's (and teacher_cache.auto_path's) keywords."""
    return {"max_len": args.max_len, "system_prompt": args.system_prompt, "truncate": args.truncate,
            "skip_bad": args.skip_bad}


def tokenize_dataset(source, tokenizer, *, max_len=None, system_prompt=None, cache_dir="cache/tokenized",
                     truncate=None, skip_bad=False, weights=False):
    """The tokenised dataset, from the on-disk cache when the key is unchanged. max_len, system_prompt and
    truncate left at None take the source's recipe (RECIPES). weights: also read every row's label weights
    (`weight`, `weight_spans`; see weight_error) for loss 'weighted'. Under torch.distributed, rank 0 builds
    and the other ranks wait for it."""
    template = chat_template(tokenizer, RECIPES.get(str(source), LOCAL_RECIPE).llama_form)
    if not template:
        raise UserError(f"{tokenizer.name_or_path} has no chat template, and prompts are templated with the "
                         "student's (some base models ship none): add one to the model folder, e.g. the instruct "
                         "model's chat_template.jinja")
    rows = load_rows(str(source))
    over_length = None if truncate is None else ("truncate" if truncate else "drop")
    recipe = recipe_for(str(source), rows.column_names, system=system_prompt, max_len=max_len,
                        over_length=over_length)
    key = {"source": str(source), "source_hash": source_fingerprint(str(source), rows),
           "tokenizer": tokenizer_fingerprint(tokenizer), "recipe": recipe._asdict(), "template": template,
           "skip_bad": skip_bad, **({"weights": True} if weights else {})}
    fingerprint = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=16).hexdigest()
    path = Path(cache_dir) / fingerprint

    def build():
        if not (path / "meta.json").exists():
            pairs = [prompt_response(recipe, row) for row in rows]
            weight_fields = [(row.get("weight"), row.get("weight_spans")) for row in rows] if weights else None
            build_cache(path, str(source), pairs, tokenizer, key, fingerprint, recipe, template, skip_bad,
                        weight_fields)

    on_rank0(build)
    return TokenizedData(path)


def build_cache(path, source, pairs, tokenizer, key, fingerprint, recipe, template, skip_bad, weight_fields=None):
    bad = [(i, bad_row_reason(*p) or (weight_fields and weight_error(p[1], *weight_fields[i])))
           for i, p in enumerate(pairs)]
    bad = [(i, reason) for i, reason in bad if reason]
    if bad and not skip_bad:
        i, reason = bad[0]
        raise UserError(f"{source} row {i}: {reason} ({len(bad)} bad rows in all); fix the data or pass "
                         "skip_bad=True (--skip-bad) to skip and count them")
    bad_rows = {i for i, _ in bad}
    kept_rows = [i for i in range(len(pairs)) if i not in bad_rows]
    encoded = encode(tokenizer, [pairs[i] for i in kept_rows], recipe.system, template)
    max_len, drop_long = recipe.max_len, recipe.over_length == "drop"
    samples, too_long, no_room = [], 0, 0
    for row, (prompt, response) in zip(kept_rows, encoded):
        too_long += len(prompt) + len(response) > max_len
        if len(prompt) + len(response) > max_len and drop_long:
            continue
        ids = (prompt + response)[:max_len]
        if len(ids) <= len(prompt):  # truncation left no response token to learn
            no_room += 1
            continue
        weights = None if weight_fields is None else np.concatenate([np.zeros(len(prompt), np.float32), (
            response_token_weights(tokenizer, template, recipe.system, pairs[row], len(prompt), len(response),
                                   *weight_fields[row]))])[:max_len]
        samples.append((ids, len(prompt), weights))
    if source == "openr1-15k":  # Appendix A: keep the responses that fit, then sample 15k
        if len(samples) < OPENR1_SAMPLES:
            raise UserError(f"openr1-15k: only {len(samples)} responses fit max_len={max_len}, "
                             f"{OPENR1_SAMPLES} needed; raise --max-len")
        keep = np.random.default_rng(OPENR1_SEED).choice(len(samples), OPENR1_SAMPLES, replace=False)
        samples = [samples[i] for i in np.sort(keep)]
    if not samples:
        raise UserError(f"{source}: no sample left after dropping bad and over-length rows (max_len={max_len})")
    print(f"{source}: {len(samples)} samples; skipped {len(bad)} bad rows; "
          f"{'dropped' if drop_long else 'truncated'} {too_long} over max_len={max_len}"
          + (f", of which {no_room} dropped: no response token fit" if no_room else ""))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{fingerprint}."))
    lengths = np.array([len(ids) for ids, _, _ in samples])
    np.save(tmp / "tokens.npy", np.concatenate([ids for ids, _, _ in samples]).astype(np.int32))
    np.save(tmp / "offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    np.save(tmp / "prompt_lens.npy", np.array([p for _, p, _ in samples], dtype=np.int64))
    if weight_fields is not None:
        np.save(tmp / "weights.npy", np.concatenate([w for _, _, w in samples]))
    (tmp / "meta.json").write_text(json.dumps({"fingerprint": fingerprint, **key, "samples": len(samples),
                                               "bad_rows": len(bad), "over_max_len": too_long}, indent=1))
    try:
        os.rename(tmp, path)  # atomic: a killed build never leaves a cache that looks complete
    except OSError:  # another process finished the same build first
        shutil.rmtree(tmp)


class Sampler:
    """A seeded shuffle per epoch, the same on every rank, cut to a multiple of world_size (the remainder,
    different each epoch, is dropped) and dealt round-robin; resumable from (epoch, position)."""

    def __init__(self, num_samples, seed, world_size=1):
        if num_samples < world_size:
            raise UserError(f"{num_samples} samples cannot be shared by {world_size} ranks")
        self.num_samples, self.seed, self.world_size = num_samples, seed, world_size
        self.epoch, self.position = 0, 0

    def __len__(self):
        """Samples per rank per epoch."""
        return self.num_samples // self.world_size

    def epoch_order(self):
        """[world_size, samples per rank]: row r is rank r's deal of this epoch's shuffle."""
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)
        return order[:len(self) * self.world_size].reshape(len(self), self.world_size).T

    def take_global(self, count):
        """The next `count` sample ids of every rank ([rank][count]), continuing into the next epoch when one
        ends. Every rank computes the same lists, so a step's micro-batches can be balanced over all its samples."""
        out = [[] for _ in range(self.world_size)]
        while len(out[0]) < count:
            order = self.epoch_order()
            step = min(count - len(out[0]), order.shape[1] - self.position)
            for rank_ids, row in zip(out, order):
                rank_ids += row[self.position:self.position + step].tolist()
            self.position += step
            if self.position == order.shape[1]:
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state):
        self.epoch, self.position = state["epoch"], state["position"]


def pack(data, sample_ids):
    """One padding-free row. position_ids restart at 0 per sequence, which is what makes flash-attn varlen
    and transformers' sdpa (attention_mask=None, use_cache=False) keep the sequences apart. The sequence
    boundaries come along as flash-attn's varlen arguments (int32 offsets, the longest length): given them,
    transformers does not re-derive them from position_ids in every layer, with two host syncs each time."""
    ids = [np.asarray(data.input_ids(i), dtype=np.int64) for i in sample_ids]
    lengths = [len(x) for x in ids]
    cu_seq_lens = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    return {"input_ids": torch.from_numpy(np.concatenate(ids))[None],
            "position_ids": torch.from_numpy(np.concatenate([np.arange(n) for n in lengths]))[None],
            "labels": torch.from_numpy(np.concatenate([data.labels(i) for i in sample_ids]))[None],
            # the maxima as Python ints: as tensors they would cost a host sync in every layer
            "cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": max(lengths), "max_length_k": max(lengths),
            **({} if data.weights is None else {"token_weights": torch.from_numpy(
                np.concatenate([data.label_weights(i) for i in sample_ids]))[None]}),
            "sample_ids": list(sample_ids)}


# what a packed (pack) or padded (pad_batch) batch hands the model: no attention_mask, since right padding
# follows each sequence and causal attention never looks ahead
MODEL_INPUTS = ("input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def model_inputs(batch, device=None):
    """The model's keyword arguments in a batch, its tensors moved to `device` (None: left where they are).
    Every packed forward (train.py, the teacher cache, the lens) goes through here, varlen arguments included."""
    return {k: to_device(v, device) if device is not None and torch.is_tensor(v) else v
            for k, v in batch.items() if k in MODEL_INPUTS}


def to_device(tensor, device):
    """A host tensor on `device`, the host not waiting for the GPU: from pageable memory a host-to-device copy
    waits for the stream (CUDA runtime API, "API synchronization behavior": the driver stages pageable memory and
    may synchronize with the stream), so the host would wait for the last backward before building the next
    micro-batch. From pinned memory it is queued, and PyTorch's caching host allocator keeps the pinned block
    until the copy is done. On a CPU: the tensor itself, as before."""
    if torch.device(device).type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def pad_batch(data, sample_ids):
    """Right-padded [B, T]. Causal attention never lets a real token see the padding after it, so the model
    needs no attention_mask: sdpa then runs its causal flash kernel instead of a dense-mask one."""
    width = max(len(data.input_ids(i)) for i in sample_ids)
    input_ids = torch.zeros(len(sample_ids), width, dtype=torch.long)
    labels = torch.full((len(sample_ids), width), IGNORE_INDEX, dtype=torch.long)
    token_weights = None if data.weights is None else torch.zeros(len(sample_ids), width)
    for row, i in enumerate(sample_ids):
        n = len(data.input_ids(i))
        input_ids[row, :n] = torch.from_numpy(np.asarray(data.input_ids(i), dtype=np.int64))
        labels[row, :n] = torch.from_numpy(data.labels(i))
        if token_weights is not None:
            token_weights[row, :n] = torch.from_numpy(data.label_weights(i))
    return {"input_ids": input_ids, "labels": labels,
            **({} if token_weights is None else {"token_weights": token_weights}), "sample_ids": list(sample_ids)}


def micro_batch_cost(lengths, padded):
    """Tokens a micro-batch computes on: packed, the sum of lengths; right-padded, rows x the longest."""
    return len(lengths) * max(lengths) if padded else sum(lengths)


def balanced_micro_batches(sample_ids, lengths, world_size, token_budget, padded=False):
    """One step's samples (every rank's; lengths[i] is sample i's token count) dealt as [rank][slot]
    micro-batches of at most token_budget tokens (micro_batch_cost), the same number of slots on every rank,
    slot j costing about the same on every rank.

    FSDP's collectives make every rank wait for the slowest in each micro-batch, so a slot costs its most
    expensive rank. Packed: longest-first onto the least loaded of world_size x slots bins (LPT). Right-padded:
    length-sorted runs, so rows have similar lengths, with the smallest cost cap that gives enough runs.
    Either way the fewest slots that fit the budget, then bins sorted by cost and dealt slot by slot."""
    if len(sample_ids) % world_size:
        raise UserError(f"{len(sample_ids)} samples cannot be shared equally by {world_size} ranks")
    longest = max(lengths[i] for i in sample_ids)
    if longest > token_budget:
        raise UserError(f"a {longest}-token sample exceeds the micro-batch token budget {token_budget}: "
                         "raise --micro-batch-tokens to at least --max-len")
    by_length = sorted(((lengths[i], i) for i in sample_ids), key=lambda pair: -pair[0])
    for slots in range(1, len(sample_ids) // world_size + 1):
        bins = (padded_runs if padded else longest_first_bins)(by_length, world_size * slots, token_budget)
        if bins is not None:
            break
    bins.sort(key=lambda b: -micro_batch_cost([n for n, _ in b], padded))
    return [[[i for _, i in bins[slot * world_size + rank]] for slot in range(slots)] for rank in range(world_size)]


def longest_first_bins(by_length, count, budget):
    """(length, id) pairs, longest first, each onto the least loaded of `count` bins; None if one overflows."""
    heap = [(0, b) for b in range(count)]
    bins = [[] for _ in range(count)]
    for pair in by_length:
        load, b = heapq.heappop(heap)
        if load + pair[0] > budget:
            return None
        bins[b].append(pair)
        heapq.heappush(heap, (load + pair[0], b))
    return bins


def padded_runs(by_length, count, budget):
    """Exactly `count` runs of consecutive (length, id) pairs, longest first, with the smallest cap on
    rows x longest that needs at most `count` runs; None if the budget needs more runs."""
    def runs_under(cap):
        runs = []
        for pair in by_length:
            if runs and (len(runs[-1]) + 1) * runs[-1][0][0] <= cap:
                runs[-1].append(pair)
            else:
                runs.append([pair])
        return runs

    if len(runs_under(budget)) > count:
        return None
    low, high = by_length[0][0], budget
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if len(runs_under(mid)) <= count else (mid + 1, high)
    runs = runs_under(low)
    while len(runs) < count:  # split the costliest run of several rows: every rank needs a micro-batch per slot
        run = max((r for r in runs if len(r) > 1), key=lambda r: len(r) * r[0][0])
        at = runs.index(run)
        runs[at:at + 1] = [run[:len(run) // 2], run[len(run) // 2:]]
    return runs


def fixed_micro_batches(dealt, size):
    """Instead of balancing: each rank's samples ([rank][count]) in the sampler's order, `size` a micro-batch."""
    return [[ids[i:i + size] for i in range(0, len(ids), size)] for ids in dealt]


def slot_costs(plan, lengths, padded):
    """[rank, slot]: the tokens each micro-batch of a [rank][slot] plan computes on (micro_batch_cost)."""
    return np.array([[micro_batch_cost([lengths[i] for i in ids], padded) for ids in rank] for rank in plan])


def balance(plan, lengths, padded):
    """Mean over slots of (mean cost / max cost across ranks): 1 when no rank waits for another."""
    costs = slot_costs(plan, lengths, padded)
    return float(np.mean(costs.mean(0) / costs.max(0)))
