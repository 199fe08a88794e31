import json
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import tiny
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
              data.tokenize_dataset(MATH16, tiny.make_tokenizer(vocab_size=400), max_len=512, cache_dir=tmp_path)]
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
    samplers = [data.Sampler(n, seed=5, rank=r, world_size=world) for r in range(world)]
    epoch0 = [s.take(len(s)) for s in samplers]
    assert all(len(e) == n // world for e in epoch0)
    flat = sum(epoch0, [])
    assert len(set(flat)) == len(flat) == n - n % world  # disjoint; the remainder is dropped
    epoch1 = [s.take(len(s)) for s in samplers]
    assert epoch1 != epoch0 and all(s.state_dict() == {"epoch": 2, "position": 0} for s in samplers)

    straight = data.Sampler(n, seed=5, rank=1, world_size=world)
    expected = straight.take(5) + straight.take(9) + straight.take(4)  # crosses into epoch 1
    interrupted = data.Sampler(n, seed=5, rank=1, world_size=world)
    head = interrupted.take(5)
    resumed = data.Sampler(n, seed=5, rank=1, world_size=world)
    resumed.load_state_dict(json.loads(json.dumps(interrupted.state_dict())))
    assert head + resumed.take(9) + resumed.take(4) == expected
    assert expected[:14] == epoch0[1] + epoch1[1]


def test_packing_and_padding_leak_nothing(tok, math16):
    model = tiny.make_model(tok, seed=0)
    ids = [3, 0, 7, 12]
    packed = data.pack(math16, ids)
    assert packed["sample_ids"] == ids
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                       use_cache=False).logits[0]
        padded = data.pad_batch(math16, ids)
        padded_logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                              use_cache=False).logits
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
            assert (padded["labels"][row, n:] == -100).all() and padded["attention_mask"][row].sum() == n
            start += n
    assert start == packed["input_ids"].shape[1]


def test_a_tokenizer_without_chat_template_is_refused_before_any_work(tmp_path):
    tok = tiny.make_tokenizer()
    tok.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        data.tokenize_dataset(MATH16, tok, cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())
