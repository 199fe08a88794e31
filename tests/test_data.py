import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

import data
import demo
from conftest import MATH16



def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_ids_are_the_chat_template_and_labels_the_shifted_response(tok, math16):
    rows = [json.loads(line) for line in MATH16.read_text().splitlines()]
    assert len(math16) == len(rows)
    for i, row in enumerate(rows):
        messages = [{"role": "system", "content": data.SYSTEM_PROMPT}, {"role": "user", "content": row["prompt"]}]
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
        full = tok.apply_chat_template(messages + [{"role": "assistant", "content": row["response"]}],
                                       tokenize=True)["input_ids"]
        ids = math16.input_ids(i)
        assert ids.dtype == np.int32 and ids.tolist() == full[:-1]  # the template's trailing "\n" is not learnt
        labels = math16.labels(i)
        assert len(labels) == len(ids)
        learnt = labels[labels != -100]
        assert tok.decode(learnt) == row["response"] + "<|im_end|>"
        assert (labels[:len(prompt) - 1] == -100).all() and labels[-1] == -100
        assert (labels[len(prompt) - 1:-1] == ids[len(prompt):]).all()
        assert math16.label_counts()[i] == len(learnt)


def test_cache_is_reused_and_keyed_by_every_input(tok, tmp_path):
    first = data.tokenize_dataset(MATH16, tok, max_len=512, cache_dir=tmp_path)
    stamp = (first.path / "tokens.npy").stat().st_mtime_ns
    again = data.tokenize_dataset(MATH16, tok, max_len=512, cache_dir=tmp_path)
    assert again.path == first.path and (again.path / "tokens.npy").stat().st_mtime_ns == stamp
    others = [data.tokenize_dataset(MATH16, tok, max_len=400, cache_dir=tmp_path),
              data.tokenize_dataset(MATH16, tok, max_len=512, system_prompt="Be brief.", cache_dir=tmp_path),
              data.tokenize_dataset(MATH16, demo.make_tokenizer(vocab_size=400), max_len=512, cache_dir=tmp_path)]
    changed = write_jsonl(tmp_path / "changed.jsonl", [{"prompt": "1+1?", "response": "2"}])
    others.append(data.tokenize_dataset(changed, tok, cache_dir=tmp_path))
    assert len({d.fingerprint for d in [first] + others}) == 5
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == sorted(d.fingerprint for d in [first] + others)


def test_over_length_is_dropped_or_truncated(tok, math16, tmp_path):
    lengths = [len(math16.input_ids(i)) for i in range(len(math16))]
    max_len = sorted(lengths)[8]
    dropped = data.tokenize_dataset(MATH16, tok, max_len=max_len, cache_dir=tmp_path)
    assert len(dropped) == sum(n <= max_len for n in lengths)
    cut = data.tokenize_dataset(MATH16, tok, max_len=max_len, truncate=True, cache_dir=tmp_path)
    assert len(cut) == len(math16)
    for i in range(len(cut)):
        assert (cut.input_ids(i) == math16.input_ids(i)[:max_len]).all()
        assert cut.labels(i)[-1] == -100 and cut.label_counts()[i] == min(lengths[i], max_len) - math16.prompt_lens[i]


@pytest.mark.parametrize("bad, problem", [({"prompt": "x", "response": ""}, "response is empty"),
                                          ({"prompt": "x"}, "response is missing"),
                                          ({"prompt": 3, "response": "y"}, "prompt is a int")])
def test_bad_rows_name_the_row_or_are_skipped_and_counted(tok, tmp_path, bad, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "1+1?", "response": "2"}, bad,
                                                {"prompt": "2+2?", "response": "4"}])
    with pytest.raises(ValueError, match=f"row 1: {problem}.*skip_bad"):
        data.tokenize_dataset(path, tok, cache_dir=tmp_path)
    kept = data.tokenize_dataset(path, tok, cache_dir=tmp_path, skip_bad=True)
    assert [tok.decode(kept.labels(i)[kept.labels(i) != -100]) for i in range(len(kept))] == \
        ["2<|im_end|>", "4<|im_end|>"]
    assert json.loads((kept.path / "meta.json").read_text())["bad_rows"] == 1


def test_messages_rows_and_unknown_sources(tok, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "1+1?"},
                                                               {"role": "assistant", "content": "2"}]}])
    chat = data.tokenize_dataset(path, tok, cache_dir=tmp_path)
    expected_end = "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n2<|im_end|>"
    assert tok.decode(chat.input_ids(0)).endswith(expected_end)
    with pytest.raises(ValueError, match="unknown data source 'numina'.*numina67k"):
        data.tokenize_dataset("numina", tok, cache_dir=tmp_path)


def test_sampler_shards_evenly_and_resumes():
    n, world = 23, 3
    sampler = data.Sampler(n, seed=5, world_size=world)
    epochs = [sampler.take_global(len(sampler)) for _ in range(2)]
    for epoch, dealt in enumerate(epochs):  # the seeded shuffle, cut to a multiple of world, dealt round-robin
        order = np.random.default_rng([5, epoch]).permutation(n)[:n - n % world]
        assert dealt == [order[r::world].tolist() for r in range(world)]
    assert epochs[0] != epochs[1] and sampler.state_dict() == {"epoch": 2, "position": 0}
    straight = data.Sampler(n, seed=5, world_size=world)
    expected = [a + b + c for a, b, c in zip(*(straight.take_global(k) for k in (5, 9, 4)))]  # into epoch 1
    interrupted = data.Sampler(n, seed=5, world_size=world)
    head = interrupted.take_global(5)
    resumed = data.Sampler(n, seed=5, world_size=world)
    resumed.load_state_dict(json.loads(json.dumps(interrupted.state_dict())))
    assert [h + a + b for h, a, b in zip(head, resumed.take_global(9), resumed.take_global(4))] == expected
    assert [e[:14] for e in expected] == [a + b for a, b in zip(*epochs)]


def test_packing_and_padding_leak_nothing(tok, math16):
    model = demo.make_model(tok, seed=0)
    ids = [3, 0, 7, 12]
    packed = data.pack(math16, ids)
    assert packed["sample_ids"] == ids
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                       use_cache=False).logits[0]
        padded = data.pad_batch(math16, ids)
        padded_logits = model(input_ids=padded["input_ids"], use_cache=False).logits  # causal: no mask needed
        start = 0
        for row, i in enumerate(ids):
            alone = torch.from_numpy(math16.input_ids(i).astype(np.int64))[None]
            reference = model(input_ids=alone, use_cache=False).logits[0]
            n = alone.shape[1]
            torch.testing.assert_close(logits[start:start + n], reference, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(padded_logits[row, :n], reference, atol=1e-5, rtol=1e-5)
            assert packed["position_ids"][0, start:start + n].tolist() == list(range(n))
            assert (packed["labels"][0, start:start + n].numpy() == math16.labels(i)).all()
            assert (padded["labels"][row, :n].numpy() == math16.labels(i)).all()
            assert (padded["labels"][row, n:] == -100).all() and not padded["input_ids"][row, n:].any()
            start += n
    assert start == packed["input_ids"].shape[1]


def test_a_tokenizer_without_chat_template_is_refused_before_any_work(tmp_path):
    tok = demo.make_tokenizer()
    tok.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        data.tokenize_dataset(MATH16, tok, cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_take_global_crosses_epochs_and_resumes():
    n, world = 23, 3
    everyone = data.Sampler(n, seed=5, world_size=world)
    steps = [everyone.take_global(4) for _ in range(3)]  # 12 per rank: crosses into epoch 1
    whole = data.Sampler(n, seed=5, world_size=world)
    epochs = [whole.take_global(len(whole)) for _ in range(2)]
    for r in range(world):
        assert sum((step[r] for step in steps), []) == (epochs[0][r] + epochs[1][r])[:12]
    resumed = data.Sampler(n, seed=5, world_size=world)
    resumed.take_global(4)
    again = data.Sampler(n, seed=5, world_size=world)
    again.load_state_dict(resumed.state_dict())
    assert [again.take_global(4) for _ in range(2)] == steps[1:]


def test_longest_first_and_length_sorted_deals_by_hand():
    lengths = {10: 5, 11: 4, 12: 3, 13: 3, 14: 2, 15: 1}
    # longest first onto the least loaded bin: 5 4 | 3 on 4 | 3 on 5 | 2 on 7 | 1 on 8
    assert data.balanced_micro_batches(list(lengths), lengths, 2, 10) == [[[10, 13, 15]], [[11, 12, 14]]]
    # budget 5: one slot overflows (4 + 3), two fit: 5 | 4 | 3 | 3, then 2 on a 3 and 1 on the other 3
    assert data.balanced_micro_batches(list(lengths), lengths, 2, 5) == [[[10], [11]], [[12, 14], [13, 15]]]
    padded = {0: 8, 1: 4, 2: 8, 3: 4}  # rows x longest <= 16: [8, 8] and [4, 4]; mixing would pad 4s to 8
    assert data.balanced_micro_batches([0, 1, 2, 3], padded, 2, 16, padded=True) == [[[0, 2]], [[1, 3]]]
    assert data.balance([[[0, 2]], [[1, 3]]], padded, padded=True) == 0.75
    with pytest.raises(ValueError, match="5-token sample exceeds the micro-batch token budget 4.*--micro-batch"):
        data.balanced_micro_batches(list(lengths), lengths, 2, 4)
    with pytest.raises(ValueError, match="5 samples cannot be shared equally by 2 ranks"):
        data.balanced_micro_batches(list(lengths)[:5], lengths, 2, 10)


@pytest.mark.parametrize("world", [8, 64])
@pytest.mark.parametrize("padded", [False, True])
def test_balanced_micro_batches_deal_every_sample_within_budget_and_beat_fixed_counts(world, padded):
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.normal(700, 400, 4096), 64, 3072).astype(int)  # numina-like
    sampler = data.Sampler(len(lengths), seed=0, world_size=world)
    for _ in range(3):
        dealt = sampler.take_global(256 // world)
        ids = sum(dealt, [])
        plan = data.balanced_micro_batches(ids, lengths, world, 4 * 3072, padded=padded)
        assert sorted(sum(sum(plan, []), [])) == sorted(ids)
        assert len({len(slots) for slots in plan}) == 1 and all(all(slots) for slots in plan)
        costs = [data.micro_batch_cost([lengths[i] for i in mb], padded) for slots in plan for mb in slots]
        assert max(costs) <= 4 * 3072
        fixed = data.fixed_micro_batches(dealt, 4)
        assert data.balance(plan, lengths, padded) > data.balance(fixed, lengths, padded) + 0.1
        # what a step costs: per slot, the costliest rank
        step, fixed_step = (data.slot_costs(p, lengths, padded).max(0).sum() for p in (plan, fixed))
        assert step < fixed_step


def test_right_padded_rows_need_no_attention_mask(tok, math16):
    """Causal attention keeps the padding after a sequence out of it: without a mask (sdpa's causal kernel)
    the logits of every row's real tokens equal the sequence run alone."""
    model = demo.make_model(tok, seed=0)
    ids = [5, 1, 9]
    padded = data.pad_batch(math16, ids)
    with torch.no_grad():
        logits = model(input_ids=padded["input_ids"], use_cache=False).logits
        for row, i in enumerate(ids):
            alone = torch.from_numpy(math16.input_ids(i).astype(np.int64))[None]
            torch.testing.assert_close(logits[row, :alone.shape[1]], model(input_ids=alone, use_cache=False).logits[0],
                                       atol=1e-5, rtol=1e-5)


def test_packed_rows_carry_flash_attention_varlen_arguments(math16):
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids
    packed = data.pack(math16, [4, 11, 2])
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(packed["position_ids"])
    assert packed["cu_seq_lens_q"].dtype == torch.int32 and packed["cu_seq_lens_q"].tolist() == cu_q.tolist()
    assert packed["cu_seq_lens_k"].tolist() == cu_k.tolist()
    assert int(packed["cu_seq_lens_q"].diff().max()) == int(max_q) == int(max_k)


def test_flash_attention_packed_logits_equal_each_sequence_alone(tok, math16):
    pytest.importorskip("flash_attn")
    if not torch.cuda.is_available():
        pytest.skip("flash-attn runs on a GPU")
    model = demo.make_model(tok, seed=0).to("cuda", torch.bfloat16)
    model.config._attn_implementation = "flash_attention_2"
    ids = [3, 0, 7, 12]
    packed = data.pack(math16, ids)
    inputs = {k: v.cuda() for k, v in packed.items() if k not in ("labels", "sample_ids")}
    inputs["max_length_q"] = inputs["max_length_k"] = int(packed["cu_seq_lens_q"].diff().max())
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits[0].float()
        model.config._attn_implementation = "sdpa"
        start = 0
        for i in ids:
            alone = torch.from_numpy(math16.input_ids(i).astype(np.int64))[None].cuda()
            reference = model(input_ids=alone, use_cache=False).logits[0].float()
            torch.testing.assert_close(logits[start:start + alone.shape[1]], reference, atol=2e-2, rtol=2e-2)
            start += alone.shape[1]


# Rows shaped like each hub set's (field names and nesting as the hub files have them).
NUMINA_ROW = {"data_source": "AI-MO/NuminaMath-CoT-processed", "prompt": [{"role": "user", "content": "unused"}],
              "extra_info": {"question": "What is 1 + 1?", "answer": "We add: 1 + 1 = 2, so \\boxed{2}.",
                             "index": 0, "split": "train"}}
OPENR1_ROW = {"prompt": [{"role": "system", "content": "sys"}, {"role": "user", "content": "What is 2 + 2?"}],
              "target": [{"role": "assistant", "content": "<think>\nadd</think> 2 + 2 = \\boxed{4}"}]}
M23K_ROW = {"prompt": "Which drug?\nA. Aspirin\nB. Insulin", "reasoning": "It lowers glucose.",
            "distilled_answer_string": "The answer is \\boxed{B}.", "answer_letter": "B", "answer_string": "Insulin"}
QWEN_MATH_TEMPLATE = (  # as Qwen2.5-Math's: a default system turn when none is given
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nPlease reason step by step, and put your "
    "final answer within \\\\boxed{}.<|im_end|>\\n' }}{% endif %}" + demo.CHAT_TEMPLATE)


def hub_set(monkeypatch, rows):
    monkeypatch.setattr(data, "load_rows", lambda source: datasets.Dataset.from_list(rows))


def prompt_and_response(tok, ds, i=0):
    ids = ds.input_ids(i)
    return tok.decode(ids[:ds.prompt_lens[i]]), tok.decode(ids[ds.prompt_lens[i]:])


def recipe_meta(ds):
    return json.loads((ds.path / "meta.json").read_text())["recipe"]


def test_numina_recipe_is_lis_the_templates_default_system_and_right_truncation(monkeypatch, tmp_path):
    tok = demo.make_tokenizer()
    tok.chat_template = QWEN_MATH_TEMPLATE
    hub_set(monkeypatch, [NUMINA_ROW])
    ds = data.tokenize_dataset("numina67k", tok, cache_dir=tmp_path)
    prompt, response = prompt_and_response(tok, ds)
    assert prompt == ("<|im_start|>system\nPlease reason step by step, and put your final answer within "
                      "\\boxed{}.<|im_end|>\n<|im_start|>user\nWhat is 1 + 1?<|im_end|>\n<|im_start|>assistant\n")
    assert response == "We add: 1 + 1 = 2, so \\boxed{2}.<|im_end|>"
    assert (recipe_meta(ds)["max_len"], recipe_meta(ds)["over_length"]) == (3072, "truncate")
    short = data.tokenize_dataset("numina67k", tok, max_len=int(ds.prompt_lens[0]) + 3, cache_dir=tmp_path)
    assert len(short) == 1 and (short.input_ids(0) == ds.input_ids(0)[:ds.prompt_lens[0] + 3]).all()
    with pytest.raises(ValueError, match="no sample left"):  # an explicit flag beats the recipe
        data.tokenize_dataset("numina67k", tok, max_len=int(ds.prompt_lens[0]) + 3, truncate=False, cache_dir=tmp_path)


def test_openr1_recipe_reads_the_message_lists_and_filters_by_length(monkeypatch, tmp_path, tok):
    monkeypatch.setattr(data, "OPENR1_SAMPLES", 1)
    hub_set(monkeypatch, [OPENR1_ROW, {**OPENR1_ROW, "target": [{"role": "assistant", "content": "x " * 400}]}])
    ds = data.tokenize_dataset("openr1-15k", tok, max_len=300, cache_dir=tmp_path)
    prompt, response = prompt_and_response(tok, ds)
    assert prompt == (f"<|im_start|>system\n{data.SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?"
                      "<|im_end|>\n<|im_start|>assistant\n")
    assert response == "add</think> 2 + 2 = \\boxed{4}<|im_end|>" and len(ds) == 1  # the long one is dropped


def test_m23k_recipe_is_lis_qwen_prompt_and_the_answer_alone(monkeypatch, tmp_path, tok):
    hub_set(monkeypatch, [M23K_ROW])
    ds = data.tokenize_dataset("m23k", tok, cache_dir=tmp_path)
    prompt, response = prompt_and_response(tok, ds)
    # Li et al.'s QWEN_PROMPT, written out by hand
    assert prompt == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhich drug?\n"
                      "A. Aspirin\nB. Insulin\nPlease reason step by step, and put your final answer within "
                      "\\boxed{}.<|im_end|>\n<|im_start|>assistant\n")
    assert response == "The answer is \\boxed{B}.<|im_end|>"
    assert (recipe_meta(ds)["max_len"], recipe_meta(ds)["over_length"]) == (800, "truncate")
    reasoning = data.tokenize_dataset("m23k-reasoning", tok, cache_dir=tmp_path)
    assert prompt_and_response(tok, reasoning)[1] == "It lowers glucose.\n\nThe answer is \\boxed{B}.<|im_end|>"
    assert reasoning.fingerprint != ds.fingerprint
    custom = data.tokenize_dataset("m23k", tok, system_prompt="Be brief.", cache_dir=tmp_path)
    assert prompt_and_response(tok, custom)[0].startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_m23k_recipe_uses_lis_llama_layout_for_llama3_tokenizers(monkeypatch, tmp_path):
    tok = demo.make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|begin_of_text|>", "<|start_header_id|>",
                                                          "<|end_header_id|>", "<|eot_id|>"]})
    hub_set(monkeypatch, [M23K_ROW])
    ds = data.tokenize_dataset("m23k", tok, cache_dir=tmp_path)
    prompt, response = prompt_and_response(tok, ds)
    # Li et al.'s LLAMA_BASE_BOXED_WITH_BOS, written out by hand
    assert prompt == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant."
                      "<|eot_id|>\n<|start_header_id|>user<|end_header_id|>\n\nWhich drug?\nA. Aspirin\nB. Insulin\n"
                      "Please reason step by step, and put your final answer within \\boxed{}.<|eot_id|>\n"
                      "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert response == "The answer is \\boxed{B}.<|eot_id|>"
    assert ds.input_ids(0)[0] == tok.convert_tokens_to_ids("<|begin_of_text|>")  # BOS once
    assert tok.decode(ds.input_ids(0)[:2]) != "<|begin_of_text|><|begin_of_text|>"
    own, tok.chat_template = tok.chat_template, None  # Llama-3 base tokenizers may ship none: m23k still works
    assert (data.tokenize_dataset("m23k", tok, cache_dir=tmp_path).input_ids(0) == ds.input_ids(0)).all()
    assert data.end_of_turn_id(tok, None) == tok.convert_tokens_to_ids("<|eot_id|>")
    tok.chat_template = own
    monkeypatch.undo()
    local = data.tokenize_dataset(write_jsonl(tmp_path / "x.jsonl", [{"prompt": "q", "response": "r"}]), tok,
                                   cache_dir=tmp_path)
    assert "<|start_header_id|>" not in tok.decode(local.input_ids(0))  # other recipes keep the model's template


# --- Label weights for loss 'weighted' (iw-SFT's trajectory weight, CFT's critical tokens) ---------------

def test_weight_spans_map_characters_to_the_tokens_that_touch_them(tok, tmp_path):
    """Hand-checked: the span over "42" marks exactly the tokens of its two digits (Qwen2's pattern splits
    digits), the row weight covers every other response token, the end-of-turn token included."""
    response = "So the answer is 42, not 7."
    start = response.index("42")
    rows = [{"prompt": "What is 6 x 7?", "response": response, "weight": 0.25, "weight_spans": [[start, start + 2, 3]]},
            {"prompt": "What is 1 + 1?", "response": "It is 2.", "weight": 1.5}]
    tokens = data.tokenize_dataset(write_jsonl(tmp_path / "w.jsonl", rows), tok, cache_dir=tmp_path / "c",
                                   weights=True)
    labels, weights = tokens.labels(0), tokens.label_weights(0)
    learnt = labels != -100
    assert (weights[~learnt] == 0).all()
    pieces = [tok.decode([t]) for t in labels[learnt]]
    expected = [3.0 if piece in ("4", "2") else 0.25 for piece in pieces]
    assert pieces.count("4") == pieces.count("2") == 1 and weights[learnt].tolist() == expected
    assert (tokens.label_weights(1)[tokens.labels(1) != -100] == 1.5).all()
    batch = data.pack(tokens, [1, 0])
    assert torch.equal(batch["token_weights"][0], torch.from_numpy(np.concatenate([tokens.label_weights(1), weights])))
    padded = data.pad_batch(tokens, [0, 1])
    assert torch.equal(padded["token_weights"][0, :len(weights)], torch.from_numpy(weights))


def test_the_same_spans_on_another_tokenizer_mark_the_same_characters(tok, tmp_path):
    """Spans are characters, not tokens: a tokenizer with a larger vocabulary cuts the response differently,
    and the characters under weight 1 are the same."""
    response = "First, the triangle has sides 3, 4 and 5, so its area is 6."
    start = response.index("area")
    rows = [{"prompt": "Area?", "response": response, "weight": 0, "weight_spans": [[start, start + 4, 1]]}]
    path = write_jsonl(tmp_path / "w.jsonl", rows)
    for vocab in (300, 500):
        other = demo.make_tokenizer(vocab)
        tokens = data.tokenize_dataset(path, other, cache_dir=tmp_path / f"c{vocab}", weights=True)
        labels, weights = tokens.labels(0), tokens.label_weights(0)
        marked = other.decode(labels[(labels != -100) & (weights == 1)])
        assert marked.strip() == "area"


@pytest.mark.parametrize("fields, problem", [
    ({}, "neither a `weight` nor a `weight_spans`"),
    ({"weight": -1}, "weight -1 is not a number >= 0"),
    ({"weight": "high"}, "not a number"),
    ({"weight_spans": [[0, 99, 1]]}, r"span \[0, 99\) lies outside the response's 8 characters"),
    ({"weight_spans": [[0, 4, 1], [3, 6, 1]]}, r"spans \[0, 4\) and \[3, 6\) overlap"),
    ({"weight_spans": [[0, 4, -2]]}, "has weight -2"),
    ({"weight_spans": [[0, 4]]}, "not a list of \\[start, end, weight\\]"),
])
def test_malformed_weights_name_the_row_before_any_training(tok, tmp_path, fields, problem):
    rows = [{"prompt": "1 + 1?", "response": "It is 2.", "weight": 1}, {"prompt": "2 + 2?", "response": "It is 4.",
                                                                      **fields}]
    with pytest.raises(ValueError, match=rf"row 1: .*{problem}"):
        data.tokenize_dataset(write_jsonl(tmp_path / "w.jsonl", rows), tok, cache_dir=tmp_path / "c", weights=True)


# --- A user's mistake is one `error:` line naming the place, not a traceback ---------------------------

def test_malformed_and_empty_files_name_the_line_or_say_empty(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c", "response": oops}\n')
    with pytest.raises(ValueError, match=rf"{bad} line 3: not valid JSON .*fix or remove that line"):
        data.load_rows(str(bad))
    (tmp_path / "list.jsonl").write_text('{"prompt": "a", "response": "b"}\n[1, 2]\n')
    with pytest.raises(ValueError, match="line 2: a JSON list, not an object"):
        data.read_jsonl(tmp_path / "list.jsonl")
    for empty in ("", "\n\n"):
        (tmp_path / "empty.jsonl").write_text(empty)
        with pytest.raises(ValueError, match="empty.jsonl holds no rows"):
            data.load_rows(str(tmp_path / "empty.jsonl"))


def test_only_user_errors_lose_their_traceback(tmp_path):
    """The hook's rule, run in a child interpreter: a UserError prints one line; any other exception, a
    library's ValueError or open()'s FileNotFoundError (a bug), keeps its traceback."""
    import subprocess
    import sys
    root = Path(__file__).resolve().parent.parent
    for code, one_line in (("data.read_jsonl('/nonexistent/x.jsonl')", False),  # open() raising: not deliberate
                           ("data.load_rows('nope.txt')", True), ("int('x')", False)):
        script = f"import argparse, common, data; common.report_user_errors(argparse.ArgumentParser()); {code}"
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root)
        assert result.returncode == 1
        assert ("Traceback" not in result.stderr) == one_line, result.stderr
        if one_line:
            (line,) = result.stderr.strip().splitlines()
            assert line.startswith("error: unknown data source 'nope.txt': give one of numina67k")


def test_row_weights_need_no_offsets_and_truncate_with_the_ids(tok, tmp_path):
    """A `weight`-only row is read even under a template that rewrites the response (here it trims it);
    truncation at max_len cuts the weights with the ids."""
    trimming = demo.make_tokenizer()
    trimming.chat_template = demo.CHAT_TEMPLATE.replace("message['content']", "(message['content'] | trim)")
    rows = [{"prompt": "1 + 1?", "response": "  It is 2.  ", "weight": 0.5}]
    tokens = data.tokenize_dataset(write_jsonl(tmp_path / "w.jsonl", rows), trimming, cache_dir=tmp_path / "c",
                                   weights=True)
    assert (tokens.label_weights(0)[tokens.labels(0) != -100] == 0.5).all()
    response = "So the answer is 42, not 7, and the steps were long."
    rows = [{"prompt": "6 x 7?", "response": response, "weight": 0.25, "weight_spans": [[17, 19, 3]]}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    full = data.tokenize_dataset(path, tok, cache_dir=tmp_path / "full", weights=True)
    cut = data.tokenize_dataset(path, tok, cache_dir=tmp_path / "cut", weights=True, truncate=True,
                                max_len=len(full.input_ids(0)) - 4)
    assert len(cut.input_ids(0)) == len(full.input_ids(0)) - 4
    assert np.array_equal(cut.label_weights(0)[:-1], full.label_weights(0)[:len(cut.input_ids(0)) - 1])
    assert cut.label_weights(0)[-1] == 0 and (cut.label_weights(0) == 3).sum() == 2
