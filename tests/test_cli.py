"""What every script does alike with its flags: an empty path is one `error:` line naming the flag, refused as the
flags are parsed (common.path), before anything loads or is written."""
import subprocess
import sys

import pytest

from common import UserError
from conftest import outside_any_world
from test_train import ROOT, run_in_process

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
