"""train.py builds its own teacher cache when given none (`torchrun train.py --loss target`): byte for byte
teacher_cache.py's, reused by a second method, finished after a kill, shared by runs started together."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common
import teacher_cache
from conftest import hub_snapshot, outside_any_world
from test_train import ROOT, TRAIN, metrics, run_in_process, train_args


def auto_args(setup, out, *extra):
    """train_args without a cache: the run builds its own, under cache/ of its working directory."""
    args = train_args(setup, out, "--max-steps", "1", "--micro-batch-size", "4", *extra)
    for flag in ("--teacher-cache", "--ref-cache"):
        at = args.index(flag)
        del args[at:at + 2]
    return args


def cache_folders(cwd):
    """The complete caches under cwd/cache/teacher (not the lock files, nor an unfinished build)."""
    return sorted(p for p in (Path(cwd) / "cache" / "teacher").iterdir() if not p.name.endswith((".lock", ".partial")))


def stamps(folder):
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}


@pytest.fixture(scope="module")
def cli_cache(setup):
    """teacher_cache.py's cache of the teacher on train.jsonl, as a user builds it with train.py's data options."""
    out = setup / "cli-cache"
    subprocess.run([sys.executable, str(ROOT / "teacher_cache.py"), "--teacher", str(setup / "teacher"),
                    "--tokenizer", str(setup / "student"), "--data", str(setup / "train.jsonl"), "--max-len", "256",
                    "--data-cache", str(setup / "tokenized"), "--out", str(out)], check=True, capture_output=True,
                   env=ONE_THREAD)
    return out


# one thread in every process, as torchrun sets it: the same matmul summation order, so the same bits
ONE_THREAD = outside_any_world(OMP_NUM_THREADS="1")


@pytest.fixture
def one_thread():
    """The same for a run in this process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("nproc", [1, 2])
def test_the_cache_train_py_builds_is_teacher_cache_pys(setup, cli_cache, tmp_path, nproc):
    """--teacher without --teacher-cache: the same ranks build it with teacher_cache.py's code, byte for byte,
    before they train; the path is printed at start-up."""
    args = auto_args(setup, tmp_path / "run", "--teacher", str(setup / "teacher"))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    result = subprocess.run((torchrun if nproc > 1 else [sys.executable]) + [TRAIN, *args], cwd=tmp_path,
                            env=ONE_THREAD, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (folder,) = cache_folders(tmp_path)
    assert f"teacher cache: {folder.relative_to(tmp_path)} (top-64 of {setup / 'teacher'}" in result.stdout
    assert files(folder) == files(cli_cache)
    assert json.loads((folder / "meta.json").read_text())["teacher"] == str(setup / "teacher")
    assert [m["step"] for m in metrics(tmp_path, "run")] == [1]


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


def test_a_second_method_reuses_the_cache_and_changed_data_is_refused(setup, cli_cache, tmp_path, monkeypatch,
                                                                      one_thread):
    monkeypatch.chdir(tmp_path)
    run_in_process(auto_args(setup, tmp_path / "target", "--teacher", str(setup / "teacher")), monkeypatch)
    (folder,) = cache_folders(tmp_path)
    before, load_model = stamps(folder), common.load_model

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was loaded for a complete cache")
    monkeypatch.setattr(common, "load_model", no_teacher)
    run_in_process(auto_args(setup, tmp_path / "distill", "--loss", "distill", "--teacher", str(setup / "teacher")),
                   monkeypatch)
    assert cache_folders(tmp_path) == [folder] and stamps(folder) == before  # not one file rewritten
    assert files(folder) == files(cli_cache)
    assert metrics(tmp_path, "distill")[0]["p_teacher_label"] == metrics(tmp_path, "target")[0]["p_teacher_label"]
    # the same inputs by name, other contents: the data file changed since its cache was built
    monkeypatch.setattr(common, "load_model", load_model)
    edited = tmp_path / "train.jsonl"
    edited.write_text((setup / "train.jsonl").read_text().replace("answer is", "result is"))
    run_in_process(auto_args(setup, tmp_path / "edited-1", "--data", str(edited), "--teacher", str(setup / "teacher")),
                   monkeypatch)
    edited.write_text((setup / "train.jsonl").read_text())
    with pytest.raises(ValueError, match="was built on data .* rebuild the cache"):
        run_in_process(auto_args(setup, tmp_path / "edited-2", "--data", str(edited), "--teacher",
                                 str(setup / "teacher")), monkeypatch)


def test_a_build_killed_midway_is_finished_by_the_next_run(setup, cli_cache, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    topk_rows = teacher_cache.topk_rows

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("simulated kill")
    monkeypatch.setattr(teacher_cache, "topk_rows", killed)
    args = auto_args(setup, tmp_path / "run", "--teacher", str(setup / "teacher"))
    with pytest.raises(KeyboardInterrupt):
        run_in_process(args, monkeypatch)
    (partial,) = (tmp_path / "cache" / "teacher").glob("*.partial")
    assert (partial / "plan.json").is_file() and cache_folders(tmp_path) == []
    monkeypatch.setattr(teacher_cache, "topk_rows", topk_rows)
    run_in_process(args, monkeypatch)
    (folder,) = cache_folders(tmp_path)
    assert folder.name + ".partial" == partial.name and not partial.exists()
    assert files(folder) == files(cli_cache) and [m["step"] for m in metrics(tmp_path, "run")] == [1]


def test_two_runs_started_together_share_one_cache(setup, cli_cache, tmp_path):
    """target and distill launched side by side on the same data and teacher: one builds, the other waits for
    it (or finds it complete); both train, and the one cache is teacher_cache.py's."""
    runs = [subprocess.Popen([sys.executable, TRAIN, *auto_args(setup, tmp_path / loss, "--loss", loss, "--teacher",
                                                                  str(setup / "teacher"))],
                             cwd=tmp_path, env=ONE_THREAD, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for loss in ("target", "distill")]
    outputs = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    (folder,) = cache_folders(tmp_path)
    assert files(folder) == files(cli_cache)
    assert sum(f"wrote {folder.relative_to(tmp_path)}" in out for out, _ in outputs) == 1  # built once ...
    assert sum("is complete: reused, not rebuilt" in out for out, _ in outputs) == 1  # ... and found complete
    assert [len(metrics(tmp_path, loss)) for loss in ("target", "distill")] == [1, 1]


def test_a_run_waits_while_another_holds_the_cache_then_builds_it(setup, tmp_path):
    """The lock's other side, made deterministic: this test holds the cache's lock as a building run would."""
    from filelock import FileLock
    folder = teacher_cache.auto_path(str(setup / "teacher"), str(setup / "student"), str(setup / "train.jsonl"),
                                     max_len=256, system_prompt=None, truncate=None, skip_bad=False)
    (tmp_path / folder.parent).mkdir(parents=True)
    with FileLock(f"{tmp_path / folder}.lock"):
        run = subprocess.Popen([sys.executable, TRAIN, *auto_args(setup, tmp_path / "run", "--teacher",
                                                                   str(setup / "teacher"))],
                               cwd=tmp_path, env=ONE_THREAD, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines = []
        while not lines or not lines[-1].startswith("waiting for another run"):
            lines.append(run.stdout.readline())
            assert lines[-1] or run.poll() is None, "".join(lines) + run.stderr.read()
        assert lines[-1] == f"waiting for another run that is building {folder}\n"
        assert run.poll() is None and not (tmp_path / folder).exists()
    out, err = run.communicate(timeout=600)
    assert run.returncode == 0, err[-2000:]
    assert f"wrote {folder}" in out and cache_folders(tmp_path) == [tmp_path / folder]


def test_the_paper_pairs_give_the_teacher_of_the_command_as_typed(setup, tmp_path):
    """`train.py --loss target` with --model at its default: the teacher is the paper's pair, by hub id (here
    both ids resolve to the tiny models in an offline hub cache); an id with no pair and no --teacher is one
    error line naming --teacher and the pairs, before any tokenising."""
    hub = tmp_path / "hub"
    shutil.copytree(setup / "student", hub_snapshot(hub, "Qwen/Qwen2.5-Math-1.5B"))
    shutil.copytree(setup / "teacher", hub_snapshot(hub, "Qwen/Qwen2.5-Math-1.5B-Instruct"))
    env = outside_any_world(HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1")
    args = auto_args(setup, tmp_path / "run")
    at = args.index("--model")
    del args[at:at + 2]  # the default, Qwen/Qwen2.5-Math-1.5B
    result = subprocess.run([sys.executable, TRAIN, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (folder,) = cache_folders(tmp_path)
    assert json.loads((folder / "meta.json").read_text())["teacher"] == "Qwen/Qwen2.5-Math-1.5B-Instruct"
    assert "teacher cache: cache/teacher/Qwen-Qwen2.5-Math-1.5B-Instruct--train.jsonl--top64-" in result.stdout

    shutil.copytree(setup / "student", hub_snapshot(hub, "someone/unknown-base"))
    result = subprocess.run([sys.executable, TRAIN, *args, "--model", "someone/unknown-base", "--data-cache",
                             str(tmp_path / "never")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr + result.stdout, result.stderr[-2000:]
    (line,) = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error:")]
    assert line.startswith("error: --loss target needs a teacher, and --model someone/unknown-base has none")
    assert "pass --teacher MODEL" in line and "Qwen/Qwen2.5-Math-1.5B -> Qwen/Qwen2.5-Math-1.5B-Instruct" in line
    assert not (tmp_path / "never").exists()  # nothing tokenised


