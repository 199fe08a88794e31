import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import demo
import teacher_cache as tc
from common import UserError
from conftest import MATH16, alone, outside_any_world
from tiny import save_tiny

ROOT = Path(__file__).resolve().parent.parent
K = 16
BATCH_TOKENS = 600  # several samples per batch, several batches


@pytest.fixture(scope="module")
def teacher(tok):
    return demo.make_model(tok, seed=1)


@pytest.fixture(scope="module")
def built(math16, teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("built") / "cache"
    tc.build(teacher, math16, out, k=K, batch_tokens=BATCH_TOKENS)
    return out


def files(path):
    return {p.name: p.read_bytes() for p in sorted(Path(path).iterdir())}


def test_cached_topk_is_the_teachers_topk_at_label_positions(built, math16, teacher):
    cache = tc.TeacherCache(built, math16, K)
    assert len(cache) == len(math16)
    for i in range(len(math16)):
        ids, logprobs, label_logprobs = cache.rows([i])
        direct, labels = alone(teacher, math16, i)
        assert ids.shape == logprobs.shape == (math16.label_counts()[i], K)
        assert label_logprobs.shape == (math16.label_counts()[i],) and label_logprobs.dtype == torch.float32
        # the label's own log-prob over the full vocabulary, inside the top-k or not: fp32, as computed
        torch.testing.assert_close(label_logprobs.double(), direct.gather(1, labels[:, None]).squeeze(1),
                                   atol=1e-5, rtol=1e-6)
        direct = direct.float()
        tol = 1e-5 + direct.abs().max() * 2.0 ** -11  # fp16 precision
        torch.testing.assert_close(logprobs, direct.gather(1, ids), atol=tol, rtol=0)
        kth_next = direct.topk(K + 1, -1).values[:, -1:]
        assert (logprobs >= kth_next - tol).all()  # no token outside the stored k beats one inside
        assert (logprobs[:, :-1] >= logprobs[:, 1:]).all()
        assert all(len(set(row.tolist())) == K for row in ids)


def test_storage_error_on_renormalised_probabilities():
    torch.manual_seed(0)
    vocab = 152064
    logits = torch.randn(256, vocab) * torch.linspace(1, 12, 256)[:, None]  # flat to peaked rows
    values, ids = torch.log_softmax(logits, -1).topk(64, -1)
    ids[0, 0] = vocab - 1
    got_ids, got_values = tc.unpack_topk(tc.pack_topk(ids, values))
    assert torch.equal(got_ids, ids)
    assert torch.equal(tc.unpack_topk(tc.pack_topk(torch.tensor([[(1 << 18) - 1]]), torch.tensor([[-3.0]])))[0],
                       torch.tensor([[(1 << 18) - 1]]))
    error = (torch.softmax(got_values, -1) - torch.softmax(values, -1)).abs().max().item()
    print(f"max abs error on renormalised top-64 probabilities: {error:.2e}")
    assert 0 < error < 2e-4


def test_a_certain_teacher_keeps_its_ids():
    """An instruct teacher is often sure: log_softmax then gives exactly 0 for its top-1 (stored as -0.0)."""
    logits = torch.tensor([[30.0, 5.0, 0.0], [200.0, 0.0, -5.0]])
    values, ids = torch.log_softmax(logits, -1).topk(3, -1)
    assert values[0, 0] == 0 and values[1, 0] == 0
    ids = ids + torch.tensor([[0], [(1 << 18) - 3]])
    got_ids, got_values = tc.unpack_topk(tc.pack_topk(ids, values))
    assert torch.equal(got_ids, ids)
    assert torch.allclose(got_values, values.clamp(min=tc.LOGPROB_FLOOR), rtol=1e-3)


@pytest.mark.parametrize("flush_every", [1, 2, 3])
def test_resume_after_a_kill_is_byte_identical(built, math16, teacher, tmp_path, flush_every):
    """Killed during the third batch: only batches flushed in a full group of flush_every are marked done."""
    out = tmp_path / "cache"
    calls = []

    def die_on_third_batch(module, args, output):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated kill")

    hook = teacher.get_decoder().register_forward_hook(die_on_third_batch)
    try:
        with pytest.raises(KeyboardInterrupt):
            tc.build(teacher, math16, out, k=K, batch_tokens=BATCH_TOKENS, flush_every=flush_every)
    finally:
        hook.remove()
    partial = tmp_path / "cache.partial"
    done = sorted(b for chunk in tc.chunk_files(partial) for b in tc.chunk_batches(chunk))
    assert done == list(range(2 // flush_every * flush_every))
    with pytest.raises(UserError, match="unfinished build: rerun"):
        tc.TeacherCache(out)
    (partial / f".rank0-batch{len(done):07d}.npz.tmp").write_bytes(b"PK\x03\x04 torn")  # what a killed write left
    with pytest.raises(ValueError, match="unfinished build with other inputs"):
        tc.build(teacher, math16, out, k=K + 1, batch_tokens=BATCH_TOKENS)
    tc.build(teacher, math16, out, k=K, batch_tokens=BATCH_TOKENS)
    assert not partial.exists()
    assert files(out) == files(built)


def test_a_failed_write_marks_nothing_and_the_rerun_is_byte_identical(built, math16, teacher, tmp_path,
                                                                     monkeypatch):
    """The background writer's failure surfaces in build(); its batch is never marked done."""
    calls, to_host = [], tc.to_host

    def short_second_batch(rows):
        calls.append(1)
        return to_host((rows[0][:-1], rows[1]) if len(calls) == 2 else rows)

    monkeypatch.setattr(tc, "to_host", short_second_batch)
    with pytest.raises(ValueError, match="could not broadcast"):
        tc.build(teacher, math16, tmp_path / "cache", k=K, batch_tokens=BATCH_TOKENS, flush_every=1)
    assert [tc.chunk_batches(chunk) for chunk in tc.chunk_files(tmp_path / "cache.partial")] == [[0]]
    monkeypatch.setattr(tc, "to_host", to_host)
    tc.build(teacher, math16, tmp_path / "cache", k=K, batch_tokens=BATCH_TOKENS)
    assert files(tmp_path / "cache") == files(built)


def test_heads_the_cache_cannot_reproduce_and_bad_flush_groups_are_refused(math16, tok, tmp_path):
    with pytest.raises(ValueError, match="must be >= 1"):
        tc.build(demo.make_model(tok), math16, tmp_path / "a", k=K, flush_every=0)
    biased = demo.make_model(tok)
    biased.lm_head.bias = torch.nn.Parameter(torch.zeros(len(tok)))
    with pytest.raises(ValueError, match="lm_head has a bias"):
        tc.build(biased, math16, tmp_path / "b", k=K)


def corrupt(built, tmp_path, how):
    bad = tmp_path / "bad"
    shutil.copytree(built, bad)
    how(bad)
    return bad


def set_meta(path, **changes):
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, **changes}))


def truncate(path):
    with open(path / "topk.npy", "r+b") as f:
        f.truncate(f.seek(0, 2) - 4 * K)


def swap_one_token(path):
    tokens = np.load(path / "tokens.npy")
    tokens[-1] = (tokens[-1] + 1) % 300
    np.save(path / "tokens.npy", tokens)


@pytest.mark.parametrize("how, message", [
    (lambda p: (p / "meta.json").unlink(), "not a complete teacher cache"),
    (lambda p: (p / "topk.npy").unlink(), "truncated or unreadable"),
    (lambda p: (p / "label_logprobs.npy").unlink(), "truncated or unreadable"),
    (truncate, "truncated or unreadable"),
    (lambda p: np.save(p / "label_logprobs.npy", np.load(p / "label_logprobs.npy")[:-1]), r"float32 \(\d+,\)"),
    (lambda p: set_meta(p, format="int32 v2: token_id << 14 | fp16 bits of -logprob / 256"), "v3 adds the label"),
    (lambda p: np.save(p / "topk.npy", np.load(p / "topk.npy").astype(np.int64)), "is int64"),
    (lambda p: set_meta(p, format="int32 ids + fp16 logprobs"), "storage format"),
    (lambda p: set_meta(p, data_fingerprint="0" * 32), "was built on data"),
    (lambda p: set_meta(p, sample_hashes=["0" * 16] * 16), "sample 0's token ids differ"),
])
def test_corrupt_or_foreign_caches_are_refused(built, math16, tmp_path, how, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        tc.TeacherCache(corrupt(built, tmp_path, how), math16, K)


def test_other_data_k_or_token_ids_are_refused(built, math16, tok, tmp_path):
    with pytest.raises(ValueError, match="holds top-16, but top-64"):
        tc.TeacherCache(built, math16, 64)
    other = data.tokenize_dataset(MATH16, tok, max_len=500, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="was built on data"):
        tc.TeacherCache(built, other)
    edited = data.TokenizedData(corrupt(math16.path, tmp_path, swap_one_token))
    with pytest.raises(ValueError, match="sample 15's token ids differ"):
        tc.TeacherCache(built, edited)


def test_teacher_rows_line_up_with_packed_and_padded_label_positions(built, math16):
    cache = tc.TeacherCache(built, math16, K)
    sample_ids = [9, 2, 14]
    expected_ids = torch.cat([cache.rows([i])[0] for i in sample_ids])
    for batch in (data.pack(math16, sample_ids), data.pad_batch(math16, sample_ids)):
        ids, logprobs, label_logprobs = tc.teacher_rows(cache, batch, "cpu")
        assert ids.dtype == torch.long and logprobs.dtype == label_logprobs.dtype == torch.float32
        assert torch.equal(ids, expected_ids)
        assert len(ids) == len(label_logprobs) == (batch["labels"].view(-1) != -100).sum()
        torch.testing.assert_close(logprobs, torch.cat([cache.rows([i])[1] for i in sample_ids]))
        assert torch.equal(label_logprobs, torch.cat([cache.rows([i])[2] for i in sample_ids]))
    with pytest.raises(ValueError, match="label positions"):
        tc.teacher_rows(cache, {**data.pack(math16, sample_ids), "sample_ids": [9, 2, 13]}, "cpu")


def test_top64_cache_fits_272_bytes_per_label_token(math16, teacher, tmp_path):
    """All files counted: 256 bytes of packed top-64, 4 of the label's log-prob, offsets and meta.json."""
    tc.build(teacher, math16, tmp_path / "k64", k=64, batch_tokens=BATCH_TOKENS)
    total = sum(p.stat().st_size for p in (tmp_path / "k64").iterdir())
    labels = int(math16.label_counts().sum())
    print(f"{total / labels:.1f} bytes per label token over {labels} label tokens")
    assert total / labels <= 272
    assert len(tc.TeacherCache(tmp_path / "k64", math16, 64).rows([0])) == 3


def test_vocabularies_must_match():
    with pytest.raises(ValueError, match="different vocabularies"):
        tc.check_vocabularies(demo.make_tokenizer(400), demo.make_tokenizer(), 400)
    with pytest.raises(ValueError, match="does not cover the tokenizer's 384 tokens"):
        tc.check_vocabularies(demo.make_tokenizer(), demo.make_tokenizer(), 300)
    tc.check_vocabularies(demo.make_tokenizer(), demo.make_tokenizer(), 262_208)  # Gemma-3 4B's size is fine


def teacher_backing(tok, vocab_size, ids):
    """A tiny teacher of `vocab_size` logits whose top ones at every position are `ids`, in that order: a
    residual stream held on one dimension (no layer writes to it), read by those ids' lm_head rows alone."""
    model = demo.make_model(tok)
    model.resize_token_embeddings(vocab_size)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 100.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        for rank, i in enumerate(ids):
            model.lm_head.weight[i, 0] = 0.2 - 0.05 * rank
    return model


@pytest.mark.parametrize("vocab_size, ids, entry", [
    (1 << 18, [(1 << 18) - 1, 5, 300], "int32"),                    # Gemma-3-270M's 262,144: the 18 bits' last id
    (262_208, [1 << 18, 262_207, (1 << 18) - 1], "int64"),          # Gemma-3 4B+: past 18 bits
])
def test_ids_past_18_bits_keep_their_value_precision(tok, tmp_path, vocab_size, ids, entry):
    rows = [{"prompt": "1 + 1?", "response": "It is 2."}, {"prompt": "2 + 3?", "response": "The answer is 5."}]
    (tmp_path / "two.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    two = data.tokenize_dataset(tmp_path / "two.jsonl", tok, cache_dir=tmp_path / "tok")
    teacher = teacher_backing(tok, vocab_size, ids)
    tc.build(teacher, two, tmp_path / "cache", k=4)
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta["entry"] == entry and meta["format"] == tc.FORMAT
    cache = tc.TeacherCache(tmp_path / "cache", two, 4)
    assert cache.packed.dtype == np.dtype(entry)
    for i in range(len(two)):
        got_ids, logprobs, label_logprobs = cache.rows([i])
        direct, labels = alone(teacher, two, i)
        assert (got_ids[:, :3] == torch.tensor(ids)).all()
        tol = 1e-5 + direct.abs().max() * 2.0 ** -11  # fp16's precision, as for 18-bit ids
        torch.testing.assert_close(logprobs.double(), direct.gather(1, got_ids), atol=tol, rtol=0)
        torch.testing.assert_close(label_logprobs.double(), direct.gather(1, labels[:, None])[:, 0], atol=1e-5,
                                   rtol=1e-6)
    labels = int(two.label_counts().sum())
    assert (tmp_path / "cache" / "topk.npy").stat().st_size - 128 == labels * 4 * np.dtype(entry).itemsize


def test_two_rank_builds_whole_or_killed_and_resumed_equal_a_one_rank_build(tmp_path):
    """torchrun with 2 ranks gives the 1-rank cache byte for byte, also when SIGKILL stops it midway and the same
    command finishes it; before the merge, each rank has written only chunk files of its own batches."""
    teacher = save_tiny(tmp_path / "teacher", seed=1)
    rows = (tmp_path / "math64.jsonl")
    rows.write_text(MATH16.read_text() * 4)  # 20 batches: time to kill the build midway
    env = outside_any_world(OMP_NUM_THREADS="1")
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2"]

    def command(*launcher, name):
        return [*launcher, str(ROOT / "teacher_cache.py"), "--teacher", str(teacher), "--data", str(rows), "--out",
                str(tmp_path / name), "--k", str(K), "--max-len", "512", "--batch-tokens", str(BATCH_TOKENS),
                "--flush-every", "1", "--data-cache", str(tmp_path / f"tok-{name}")]

    subprocess.run(command(sys.executable, name="one"), check=True, env=env, cwd=tmp_path)
    subprocess.run(command(*torchrun, name="two"), check=True, env=env, cwd=tmp_path)
    assert files(tmp_path / "one") == files(tmp_path / "two")
    [tok_one], [tok_two] = (list((tmp_path / f"tok-{n}").iterdir()) for n in ("one", "two"))
    assert files(tok_one) == files(tok_two)

    partial = tmp_path / "killed.partial"
    job = subprocess.Popen(command(*torchrun, name="killed"), env=env, cwd=tmp_path, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while {c.name[:5] for c in tc.chunk_files(partial)} != {"rank0", "rank1"} and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert not (tmp_path / "killed").exists()
    chunks = tc.chunk_files(partial)
    for chunk in chunks:  # rank r was dealt batches r, r + 2, ...: its files hold those alone
        rank = int(chunk.name[len("rank"):chunk.name.index("-")])
        assert all(b % 2 == rank for b in tc.chunk_batches(chunk)), (chunk.name, tc.chunk_batches(chunk))
    torn = {p.name for p in partial.glob(".rank*.npz.tmp")}
    assert {p.name for p in partial.iterdir()} == {"plan.json", "offsets.npy", *(c.name for c in chunks), *torn}
    done = sum(len(tc.chunk_batches(chunk)) for chunk in chunks)
    assert 2 <= done < len(tc.fixed_batches(data.tokenize_dataset(rows, demo.make_tokenizer(), max_len=512,
                                                                  cache_dir=tmp_path / "tok-count"), BATCH_TOKENS))
    subprocess.run(command(*torchrun, name="killed"), check=True, env=env, cwd=tmp_path)
    assert files(tmp_path / "killed") == files(tmp_path / "one") and not partial.exists()
