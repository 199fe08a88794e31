"""bench.py gpu, the check a lent GPU's window runs (bash run.sh gpu), on a CPU at toy sizes: the plan comes first,
sections run in order while their estimates fit in what is left of --budget, and a section whose packages are
missing is skipped by name."""
import re
import subprocess
import sys
from pathlib import Path

import bench_gpu
from bench_kernels import run_script
from conftest import outside_any_world

ROOT = Path(__file__).resolve().parent.parent
ORDER = ["train", "loss", "cache", "layout", "grad", "attention", "eval", "engine"]


def test_gpu_check_plans_then_runs_what_fits_and_names_what_is_missing(tmp_path):
    unimportable = tmp_path / "site" / "vllm"  # a vllm that raises on import, as where it is not installed
    unimportable.mkdir(parents=True)
    (unimportable / "__init__.py").write_text("raise ImportError('vllm is not installed here')\n")
    table = tmp_path / "table.txt"
    proc = subprocess.run([sys.executable, "bench.py", "gpu", "--tiny", "--budget", "12", "--table", str(table)],
                          cwd=ROOT, env=outside_any_world(PYTHONPATH=str(tmp_path / "site")), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = proc.stdout.splitlines()[0]
    assert plan.startswith("plan: --budget 12 s, matmul "), proc.stdout[:2000]
    estimates = dict(re.findall(r"(\w+) ~(\d+) s", plan))
    assert list(estimates) == ORDER

    heading, *lines = table.read_text().splitlines()
    assert heading.startswith("cpu, torch ") and heading.endswith("(--tiny: toy sizes, not measurements)")
    rows = [line.split(None, 2) for line in lines]
    outcome = {}  # each section's rows: run, or one row saying why not
    for section, case, result in rows:
        outcome.setdefault(section, []).append((case, result))
    assert list(outcome) == ORDER  # every section answers, in order
    assert not [row for row in rows if row[1] == "FAILED"], table.read_text()
    ran = [s for s, results in outcome.items() if results[0][0] != "skipped"]
    assert ran, table.read_text()
    # train's estimate (five processes, two compilations) cannot fit in 12 s: skipped for the budget, by name
    assert outcome["train"] == [("skipped", outcome["train"][0][1])]
    assert re.fullmatch(rf"~{estimates['train']} s estimated, \d+ s left of the budget", outcome["train"][0][1])
    for section in ran:
        assert int(estimates[section]) <= 12
    assert outcome["eval"] == outcome["engine"] == [("skipped", "needs vllm")]


def failing_child():
    """A section whose child process fails, as train.py or eval.py would: its reason on stderr, last."""
    run_script("-c", "import sys; print('loading...', file=sys.stderr); sys.exit('CUDA error: no kernel image')")


def test_a_failed_section_is_a_row_ending_with_its_childs_stderr(monkeypatch, tmp_path):
    monkeypatch.setattr(bench_gpu, "sections", lambda tiny, liger: [
        bench_gpu.Section("broken", "test_bench_gpu:failing_child", {}),
        bench_gpu.Section("layout", "bench_kernels:bench_layout",
                          dict(lengths="8,4", hidden=128, layers=1, repeats=1))])
    bench_gpu.bench_gpu(tiny=True, budget=60, table=str(tmp_path / "table.txt"))
    _, failed, *rest = (tmp_path / "table.txt").read_text().splitlines()
    assert failed.split(None, 2)[:2] == ["broken", "FAILED"] and "exited with status 1" in failed
    assert [line.strip() for line in rest[:2]] == ["loading...", "CUDA error: no kernel image"]
    assert [line.split()[0] for line in rest[2:]] == ["layout"] * 3  # the next section still ran
