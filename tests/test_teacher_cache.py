import errno
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
    """A chunk whose write fails (a full disk) is not marked done: the build stops on the error, and the rerun
    redoes that chunk alone, byte for byte."""
    savez, calls = np.savez, []

    def full_disk_at_the_second_chunk(file, **arrays):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        savez(file, **arrays)

    monkeypatch.setattr(np, "savez", full_disk_at_the_second_chunk)
    with pytest.raises(OSError, match="No space left on device"):
        tc.build(teacher, math16, tmp_path / "cache", k=K, batch_tokens=BATCH_TOKENS, flush_every=1)
    assert [tc.chunk_batches(chunk) for chunk in tc.chunk_files(tmp_path / "cache.partial")] == [[0]]
    monkeypatch.setattr(np, "savez", savez)
    tc.build(teacher, math16, tmp_path / "cache", k=K, batch_tokens=BATCH_TOKENS)
    assert files(tmp_path / "cache") == files(built)


def test_a_disk_without_room_for_the_merge_stops_it_and_the_rerun_finishes(built, math16, teacher, tmp_path,
                                                                           monkeypatch):
    """The merge writes the whole cache beside its chunks: without that much free space it stops first, in one line
    naming the folder and the bytes, and the rerun (room made) resumes from the chunks to the same cache."""
    needed = int(math16.label_counts().sum()) * (K * 4 + 4)
    with monkeypatch.context() as full:
        full.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
        with pytest.raises(UserError) as refused:
            tc.build(teacher, math16, tmp_path / "cache", k=K, batch_tokens=BATCH_TOKENS)
    assert str(refused.value) == (f"{tmp_path / 'cache.partial'}: merging its chunks into the cache needs "
                                  f"{needed / 1e6:,.0f} MB free there, and 0 MB is; free that much and rerun (the "
                                  "build resumes from its chunks, which are deleted once merged)")
    assert tc.chunk_files(tmp_path / "cache.partial") and not (tmp_path / "cache").exists()
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


TORCHRUN = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def shared_fs(tmp_path_factory):
    """The 2-rank builds' world: a teacher folder, 64 MATH solutions (20 batches: time to kill a build midway) and
    the cache one rank builds of them, the reference a 2-rank build must equal byte for byte."""
    root = tmp_path_factory.mktemp("shared-fs")
    save_tiny(root / "teacher", seed=1)
    (root / "math64.jsonl").write_text(MATH16.read_text() * 4)
    subprocess.run(build_command(root, root / "one", sys.executable), check=True, env=ONE_THREAD, cwd=root)
    return root


ONE_THREAD = outside_any_world(OMP_NUM_THREADS="1")  # as torchrun sets it: the same summation order, the same bits


def build_command(root, out, *launcher):
    return [*launcher, str(ROOT / "teacher_cache.py"), "--teacher", str(root / "teacher"), "--data",
            str(root / "math64.jsonl"), "--out", str(out), "--k", str(K), "--max-len", "512", "--batch-tokens",
            str(BATCH_TOKENS), "--flush-every", "1", "--data-cache", str(out.parent / f"tok-{out.name}")]


def test_two_rank_builds_whole_or_killed_and_resumed_equal_a_one_rank_build(shared_fs, tmp_path):
    """torchrun with 2 ranks gives the 1-rank cache byte for byte, also when SIGKILL stops it midway and the same
    command finishes it; before the merge, each rank has written only chunk files of its own batches."""
    subprocess.run(build_command(shared_fs, tmp_path / "two", *TORCHRUN), check=True, env=ONE_THREAD, cwd=tmp_path)
    assert files(tmp_path / "two") == files(shared_fs / "one")
    [tok_one], [tok_two] = (list(folder.iterdir()) for folder in (shared_fs / "tok-one", tmp_path / "tok-two"))
    assert files(tok_one) == files(tok_two)

    partial = tmp_path / "killed.partial"
    job = subprocess.Popen(build_command(shared_fs, tmp_path / "killed", *TORCHRUN), env=ONE_THREAD, cwd=tmp_path,
                           start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
    assert 2 <= done < len(tc.fixed_batches(data.tokenize_dataset(shared_fs / "math64.jsonl", demo.make_tokenizer(),
                                                                  max_len=512, cache_dir=tmp_path / "tok-count"),
                                            BATCH_TOKENS))
    subprocess.run(build_command(shared_fs, tmp_path / "killed", *TORCHRUN), check=True, env=ONE_THREAD, cwd=tmp_path)
    assert files(tmp_path / "killed") == files(shared_fs / "one") and not partial.exists()


# sitecustomize modules that show a rank the cache folder as a network filesystem can (NFS, Lustre)
STALE_LISTINGS = """
import os, re
if os.environ.get("RANK") == "0":  # rank 0's listings show only the files it wrote itself, as a cached listing can
    others = re.compile(r"rank[1-9][0-9]*-batch")
    listdir, scandir = os.listdir, os.scandir

    class Listing:  # os.scandir's iterator, the other ranks' chunks left out (glob and pathlib list through it)
        def __init__(self, path):
            self.entries = scandir(path)
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self.entries.close()
        def __iter__(self):
            return (entry for entry in self.entries if not others.match(entry.name))
        def close(self):
            self.entries.close()

    os.listdir = lambda path=".": [name for name in listdir(path) if not others.match(name)]
    os.scandir = lambda path=".": Listing(path)
"""
NO_FLOCK = """
import errno, fcntl, os
real_flock, folder = fcntl.flock, os.environ["NO_FLOCK_UNDER"]
def flock(fd, operation):  # the cache's filesystem has none: Lustre without -o flock, some NFS mounts
    if os.readlink(f"/proc/self/fd/{fd if isinstance(fd, int) else fd.fileno()}").startswith(folder):
        raise OSError(errno.ENOSYS, "Function not implemented")
    return real_flock(fd, operation)
fcntl.flock = flock
"""
LATE_META = """
import os
if os.environ.get("RANK") == "1":  # rank 1's first 3 lookups of an existing meta.json say it is not there
    stat, hidden = os.stat, []
    def stale_stat(path, *args, **kwargs):
        result = stat(path, *args, **kwargs)
        if os.fspath(path).endswith("meta.json") and len(hidden) < 3:
            hidden.append(path)
            with open(os.environ["HIDDEN_LOG"], "a") as log:
                log.write("x")
            raise FileNotFoundError(2, "No such file or directory", os.fspath(path))
        return result
    os.stat = stale_stat
"""


def with_site(tmp_path, sitecustomize, **extra):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(sitecustomize)
    return {**ONE_THREAD, "PYTHONPATH": str(tmp_path / "site"), **extra}


@pytest.mark.parametrize("view", ["stale listings", "no flock"])
def test_a_two_rank_build_on_a_network_filesystem_equals_a_one_rank_build(shared_fs, tmp_path, view):
    """Rank 0 whose listings hide the other rank's chunks (an NFS client's cached listing) still finds them, by the
    names the ranks gather; where flock fails with ENOSYS, filelock falls back to its soft lock by itself."""
    env = with_site(tmp_path, STALE_LISTINGS if view == "stale listings" else NO_FLOCK, NO_FLOCK_UNDER=str(tmp_path))
    built = subprocess.run(build_command(shared_fs, tmp_path / "cache", *TORCHRUN), env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    assert files(tmp_path / "cache") == files(shared_fs / "one")
    if view == "no flock":
        assert "flock not supported on this filesystem, falling back to SoftFileLock" in built.stderr


def test_a_rank_shown_no_meta_json_for_a_while_waits_for_it(shared_fs, tmp_path):
    """A complete cache, and rank 1 on a node whose NFS client still caches "no such file" for its meta.json:
    rank 0's answer decides for every rank, and rank 1 looks again until it sees the file."""
    shutil.copytree(shared_fs / "one", tmp_path / "cache")
    env = with_site(tmp_path, LATE_META, HIDDEN_LOG=str(tmp_path / "hidden"))
    reused = subprocess.run(build_command(shared_fs, tmp_path / "cache", *TORCHRUN), env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert reused.returncode == 0, reused.stderr[-3000:]
    assert f"{tmp_path / 'cache'} is complete: reused, not rebuilt" in reused.stdout
    assert (tmp_path / "hidden").read_text() == "xxx"  # rank 1 was shown no meta.json three times
    assert files(tmp_path / "cache") == files(shared_fs / "one")
