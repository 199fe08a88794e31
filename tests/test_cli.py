"""What every script does alike with its flags: an empty path is one `error:` line naming the flag, refused as the
flags are parsed (common.path), before anything loads or is written."""
import socket
import subprocess
import sys

import pytest

from common import UserError
from conftest import outside_any_world
from test_train import ROOT, run_in_process, train_args

PATH_FLAGS = {  # every path flag of every script (data.add_options' --data and --data-cache for three of them)
    "train.py": ["--model", "--teacher", "--teacher-cache", "--ref-cache", "--out", "--data", "--data-cache"],
    "teacher_cache.py": ["--teacher", "--out", "--tokenizer", "--data", "--data-cache"],
    "lens.py": ["--student", "--teacher-cache", "--out", "--data", "--data-cache"],
    "eval.py": ["--model", "--out"],
    "compare.py": [""],  # its RESULTS_JSON files
    "demo.py": ["--out"],
    "loss.py": ["--plot"],
    "bench.py grade": ["--data"],
    "bench.py eval": ["--data"],
}


def command(script, flag):
    script, *subcommand = script.split()
    return script, [*subcommand, *([flag] if flag else []), ""]


@pytest.mark.parametrize("script, flag", [(s, f) for s, flags in PATH_FLAGS.items() for f in flags])
def test_an_empty_path_is_refused_naming_its_flag(script, flag, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)  # Path("") is the working folder: nothing may land in it
    script, args = command(script, flag)
    with pytest.raises((UserError, SystemExit)) as refusal:  # through the one-line hook, or argparse's own exit 2
        run_in_process(args, monkeypatch, str(ROOT / script))
    message = str(refusal.value) if refusal.type is UserError else capsys.readouterr().err
    assert refusal.type is UserError or refusal.value.code == 2
    assert f"argument {flag or 'RESULTS_JSON'}: an empty path; give a file or folder" in message
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("script", PATH_FLAGS)
def test_a_script_given_an_empty_path_prints_one_error_line(script, tmp_path):
    name, args = command(script, PATH_FLAGS[script][0])
    proc = subprocess.run([sys.executable, str(ROOT / name), *args], cwd=tmp_path, env=outside_any_world(),
                          capture_output=True, text=True, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(errors) == 1 and f"argument {PATH_FLAGS[script][0] or 'RESULTS_JSON'}: an empty path" in errors[0]
    assert not list(tmp_path.iterdir())


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("script, flag", [("train.py", "--out"), ("teacher_cache.py", "--data-cache"),
                                          ("lens.py", "--data-cache")])
def test_ranks_that_do_not_share_a_folder_stop_in_one_line_naming_its_flag(setup, tmp_path, script, flag):
    """Two nodes as torchrun starts them (each its LOCAL_RANK 0), rank 1 shown another folder than rank 0's, as a
    node without the shared filesystem sees a path: the run stops before any work, rank 0 saying so."""
    data_flags = ["--data", str(setup / "train.jsonl"), "--data-cache", str(tmp_path / "tokenized"), "--max-len", "256"]
    flags = {"train.py": train_args(setup, tmp_path / "run", "--loss", "sft"),
             "teacher_cache.py": ["--teacher", str(setup / "teacher"), "--tokenizer", str(setup / "student"),
                                  "--out", str(tmp_path / "cache" / "t"), "--k", "8", *data_flags],
             "lens.py": ["--student", str(setup / "student"), "--teacher-cache", str(setup / "cache"),
                         "--out", str(tmp_path / "lens"), *data_flags]}[script]
    shared = flags[flags.index(flag) + 1]
    port = free_port()
    ranks = []
    for rank in range(2):
        argv = [*flags, flag, str(tmp_path / "elsewhere")] if rank else flags  # the last of a flag counts
        env = outside_any_world(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                                MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        ranks.append(subprocess.Popen([sys.executable, str(ROOT / script), *argv], env=env, cwd=tmp_path,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    (out0, err0), (out1, err1) = (rank.communicate(timeout=300) for rank in ranks)
    assert [rank.returncode for rank in ranks] == [1, 1] and "Traceback" not in err0 + err1, err0[-2000:] + err1
    errors = [line for line in (err0 + err1).splitlines() if "error" in line.lower()]
    assert errors == [f"error: {flag} {shared}: rank 1 cannot read what rank 0 wrote into this folder, so the nodes "
                      f"do not share it; every node must see the same folder (a shared filesystem): point {flag} at "
                      "one they share"]
    assert not (tmp_path / "tokenized").exists() or not list((tmp_path / "tokenized").iterdir())  # nothing ran
