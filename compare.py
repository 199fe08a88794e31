"""Evaluated runs side by side (eval.py's results.json files), a bar chart, and the paper's own rows.

    python compare.py runs/eval/*/results.json                     # a table of your runs, compare.png
    python compare.py runs/eval/*/results.json --paper "Qwen2.5-Math-1.5B / NuminaMath-CoT" --plot cmp.png

--paper SETTING prints the paper's Tables 1, 2 and 6 rows of that setting ("model / training set") and each of
your runs' difference from the paper's row of its method, matched on the run's name (base, sft, dft, distill,
target), as README's paper recipe names its runs.
"""
import argparse
import json
import math
import re
from pathlib import Path

import numpy as np

import common
from benchmarks import SUITES, TABLE2_SINGLE_SAMPLE, columns, label, notes, run_average, table

MATH, MEDICAL = tuple(SUITES["math"]), tuple(SUITES["medical"])  # the tables' columns

# The paper's Tables 1, 2 and 6 as printed (underlines dropped): per setting "model / training set", its
# columns and "table | method | cells... | printed Avg." lines. Distill is c = 0.8 and TARGET-SFT's eta was
# chosen from {0.2, 0.5, 1.0} (Appendix A); Table 6 gives eta = 0.5 for Qwen2.5-Math-1.5B on NuminaMath-CoT.
_PAPER_TEXT = {
    ("Qwen3-1.7B-Base / NuminaMath-CoT", MATH): """
        1 | Base | 9.87 11.35 0.62 16.25 33.81 | 14.26
        1 | SFT | 10.78 8.64 0.00 10.78 34.61 | 12.99
        1 | SFT (p) | 18.91 17.81 1.24 27.66 53.86 | 24.20
        1 | Distill (c = 0.8) | 14.08 11.92 1.65 19.69 41.52 | 17.81
        1 | TARGET-SFT | 21.44 19.21 3.94 30.78 57.55 | 26.93""",
    ("Qwen2.5-Math-1.5B / NuminaMath-CoT", MATH): """
        1 | Base | 8.23 15.20 3.75 18.12 31.52 | 14.92
        1 | SFT | 12.61 12.11 0.82 16.41 42.29 | 16.72
        1 | SFT (p) | 25.19 27.38 7.72 38.12 65.79 | 32.94
        1 | Distill (c = 0.8) | 25.46 23.64 6.68 37.50 60.92 | 30.83
        1 | TARGET-SFT (eta = 0.5) | 32.20 31.59 8.96 47.03 70.20 | 38.05
        6 | Distill (c = 0.2) | 13.99 13.08 1.45 17.34 44.32 | 18.33
        6 | Distill (c = 0.5) | 19.13 18.94 4.16 26.56 53.81 | 24.92
        6 | Distill (c = 0.8) | 25.46 23.64 6.68 37.50 60.92 | 30.83
        6 | Distill (c = 1.0) | 18.07 18.49 4.38 28.28 45.22 | 22.81
        6 | TARGET-SFT (eta = 0.2) | 27.41 29.48 9.17 44.06 65.96 | 35.16
        6 | TARGET-SFT (eta = 0.5) | 32.20 31.59 8.96 47.03 70.20 | 38.05
        6 | TARGET-SFT (eta = 1.0) | 28.24 28.13 7.92 43.12 63.85 | 34.30""",
    ("Qwen2.5-Math-7B / NuminaMath-CoT", MATH): """
        1 | Base | 7.66 9.62 8.13 19.84 31.98 | 15.76
        1 | SFT | 21.33 18.77 2.70 22.81 53.55 | 23.88
        1 | SFT (p) | 28.48 32.78 8.56 49.38 67.93 | 37.33
        1 | Distill (c = 0.8) | 23.35 18.79 5.63 30.31 51.24 | 25.76
        1 | TARGET-SFT | 31.03 34.56 8.96 49.69 72.69 | 39.49""",
    ("Qwen3-1.7B-Base / OpenR1-15k", MATH): """
        1 | Base | 9.87 11.35 0.62 16.25 33.81 | 14.26
        1 | SFT | 14.30 12.55 1.65 20.62 41.68 | 18.31
        1 | SFT (p) | 25.86 23.66 7.29 35.62 62.41 | 31.23
        1 | Distill (c = 0.8) | 22.43 18.42 2.90 27.81 53.70 | 24.99
        1 | TARGET-SFT | 27.47 24.78 5.41 33.75 63.92 | 31.41""",
    ("Qwen2.5-Math-1.5B / OpenR1-15k", MATH): """
        1 | Base | 8.23 15.20 3.75 18.12 31.52 | 14.92
        1 | SFT | 14.45 15.35 1.87 24.22 43.99 | 19.71
        1 | SFT (p) | 31.18 33.56 11.45 47.34 70.75 | 39.00
        1 | Distill (c = 0.8) | 19.89 20.31 5.01 26.72 52.65 | 25.32
        1 | TARGET-SFT | 33.09 34.84 13.13 51.72 72.38 | 41.24
        6 | constant branch c = 0.2 | 22.09 23.23 5.00 33.44 58.24 | 28.48
        6 | constant branch c = 0.5 | 29.54 33.19 11.67 50.47 70.71 | 39.10
        6 | constant branch c = 1.0 | 22.27 27.26 8.14 41.72 60.32 | 31.82
        6 | TARGET-SFT | 33.09 34.84 13.13 51.72 72.38 | 41.24""",
    ("Qwen2.5-Math-7B / OpenR1-15k", MATH): """
        1 | Base | 7.66 9.62 8.13 19.84 31.98 | 15.76
        1 | SFT | 34.41 33.26 11.88 50.16 73.29 | 40.55
        1 | SFT (p) | 27.33 28.28 11.24 37.19 57.25 | 32.20
        1 | Distill (c = 0.8) | 42.04 39.94 13.32 62.34 80.26 | 47.36
        1 | TARGET-SFT | 43.61 42.42 18.13 61.88 80.75 | 49.50""",
    ("LLaMA-3.2-3B / m23k", MEDICAL): """
        2 | Base | 21.13 21.76 22.0 12.18 25.64 24.51 27.92 21.43 11.11 21.56 | 20.92
        2 | SFT | 34.19 38.02 57.0 25.93 30.26 36.17 36.04 28.25 11.73 32.34 | 32.99
        2 | SFT (p) | 40.43 40.93 61.4 33.42 34.87 43.45 34.09 25.97 9.87 40.30 | 36.47
        2 | Distill (c = 0.8) | 37.08 38.26 55.7 28.01 27.44 39.81 35.71 31.82 10.01 35.16 | 33.90
        2 | TARGET-SFT | 39.78 44.46 64.0 32.70 30.00 45.87 37.01 31.17 12.63 39.30 | 37.69""",
    ("LLaMA-3.1-8B / m23k", MEDICAL): """
        2 | Base | 22.81 29.30 21.2 19.02 29.49 22.82 29.87 20.78 10.14 20.07 | 22.55
        2 | SFT | 50.47 56.64 74.0 48.21 37.69 53.40 47.73 40.26 14.77 50.91 | 47.41
        2 | SFT (p) | 40.69 46.90 64.3 34.33 33.33 38.35 40.58 31.82 12.22 43.45 | 38.60
        2 | Distill (c = 0.8) | 45.52 51.61 63.3 42.35 35.64 47.57 38.31 35.71 13.18 45.44 | 41.86
        2 | TARGET-SFT | 49.32 60.17 74.7 50.42 46.15 55.34 41.56 38.96 13.60 47.10 | 47.73""",
    ("Qwen2.5-1.5B / m23k", MEDICAL): """
        2 | Base | 22.40 22.70 18.4 11.47 17.18 23.06 24.35 17.21 9.45 21.39 | 18.76
        2 | SFT | 39.35 41.16 68.5 34.07 34.36 39.32 35.39 30.19 10.35 32.67 | 36.54
        2 | SFT (p) | 38.92 37.55 67.6 37.79 35.64 42.72 35.71 30.19 10.49 36.48 | 37.31
        2 | Distill (c = 0.8) | 41.02 42.58 68.9 37.92 38.21 43.20 37.01 28.57 10.70 38.97 | 38.71
        2 | TARGET-SFT | 40.31 41.87 68.3 39.67 42.56 40.29 38.31 31.49 11.59 38.64 | 39.30""",
    ("Qwen2.5-7B / m23k", MEDICAL): """
        2 | Base | 51.35 57.03 69.7 54.01 45.64 56.80 42.21 40.26 12.22 55.56 | 48.48
        2 | SFT | 42.24 44.07 69.3 41.43 36.67 42.96 38.64 37.01 12.01 39.30 | 40.36
        2 | SFT (p) | 47.65 52.79 74.5 54.27 44.62 57.04 44.81 38.96 12.97 46.60 | 47.42
        2 | Distill (c = 0.8) | 52.28 58.84 72.3 58.89 40.77 58.01 50.65 41.56 13.73 54.73 | 50.18
        2 | TARGET-SFT | 54.53 62.37 74.9 60.85 48.21 59.95 52.92 42.86 14.01 56.55 | 52.72""",
}


def _paper_rows(text, names):
    rows = []
    for line in text.strip().splitlines():
        table_no, method, cells, avg = (part.strip() for part in line.split("|"))
        rows.append({"table": f"Table {table_no}", "method": method,
                     "cells": dict(zip(names, map(float, cells.split()), strict=True)), "avg": float(avg)})
    return rows


# setting -> rows of {table, method, cells {benchmark: value}, avg (the printed Avg.)}
PAPER_TABLES = {setting: _paper_rows(text, names) for (setting, names), text in _PAPER_TEXT.items()}


# ------------------------------------------------------------------------------------------------ your runs


def compare(paths, plot, paper=None):
    """Several results.json side by side (rows named after their runs), a grouped bar chart, and with paper
    the paper's rows of that setting beside them."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    runs = [(r.get("name") or Path(p).resolve().parent.name, r) for p, r in zip(paths, runs)]
    print(table(runs))
    print(notes([r for _, r in runs]))
    if paper is not None:
        print(paper_comparison(runs, paper))
    plot_runs(runs, plot)
    print(f"wrote {plot}")


def plot_runs(runs, plot):
    """Grouped bars, one group per benchmark and Avg., the value written on each bar; the y axis from 0.
    Returns the axes (closed figure) for checks."""
    plt = common.pyplot()
    names = columns(runs)
    x = np.arange(len(names) + 1)
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(min(18.0, max(1.4 * len(x), 0.3 * len(x) * len(runs)) + 2), 4.5))
    top = 0.0
    for i, (run, r) in enumerate(runs):
        values = [r["benchmarks"].get(n, {}).get("average", np.nan) for n in names] + [run_average(r, names)]
        bars = ax.bar(x + i * width, np.nan_to_num(values), width, label=run)
        ax.bar_label(bars, labels=["" if math.isnan(v) else f"{v:.1f}" for v in values], rotation=90,
                     padding=2, fontsize=7)
        top = max(top, np.nanmax(values) if not np.all(np.isnan(values)) else 0.0)
    ax.set_ylim(0, max(top, 1.0) * 1.18)  # room for the labels; all-zero runs still get an axis from 0
    ax.set_xticks(x + width * (len(runs) - 1) / 2, [label(n) for n in names] + ["Avg."])
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Average@n per benchmark (see results.json's average_rule)", pad=24)
    ax.legend(ncol=min(len(runs), 6), fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(plot, dpi=120)
    plt.close(fig)
    return ax


def paper_method(run, results):
    """The paper's method a run stands for, read from its name as README's recipe names runs (base, sft,
    dft, distill, target); a hub model (not a local folder) is a Base row."""
    name = run.lower()
    for key, method in (("target", "TARGET-SFT"), ("distill", "Distill"), ("dft", "SFT (p)"),
                        ("sft-p", "SFT (p)"), ("p-loss", "SFT (p)"), ("sft", "SFT"), ("base", "Base")):
        if key in name:
            return method
    return "Base" if common.is_hub_id(results.get("model", "")) else None


def paper_comparison(runs, setting):
    """The paper's rows for a setting, then each run's difference from the paper's row of its method."""
    rows = PAPER_TABLES[setting]
    names = list(rows[0]["cells"])
    width = max(10, *(len(label(n)) + 2 for n in names))
    row_w = max(34, *(len(run) + 30 for run, _ in runs))
    head = f"paper, {setting}".ljust(row_w) + "".join(label(n).rjust(width) for n in names)
    lines = ["", head + "Avg.".rjust(width) + "[mean]".rjust(9)]
    for row in rows:
        cells = "".join(f"{row['cells'][n]:.2f}".rjust(width) for n in names)
        mean = np.mean(list(row["cells"].values()))
        lines.append(f"{row['table']} {row['method']}".ljust(row_w) + cells + f"{row['avg']:.2f}".rjust(width) +
                     f"[{mean:.2f}]".rjust(9))
    lines.append("yours - paper's row of the same method (Avg.: your mean - the paper's [mean])")
    for run, r in runs:
        method = paper_method(run, r)
        match = [row for row in rows if re.sub(r" \((c|eta) = .*\)$", "", row["method"]) == method]
        if not match:
            lines.append(f"{run}: no paper row (name runs base, sft, dft, distill or target to match)")
            continue
        row, mine = match[0], r["benchmarks"]
        cells = "".join((f"{mine[n]['average'] - row['cells'][n]:+.2f}" if n in mine else "-").rjust(width)
                        for n in names)
        avg = run_average(r, names) - np.mean(list(row["cells"].values()))
        lines.append(f"{run} - {row['table']} {row['method']}".ljust(row_w) + cells +
                     ("-" if math.isnan(avg) else f"{avg:+.2f}").rjust(width))
    lines.append("The paper's Avg. is shown as printed; it is not always the mean of its columns (in brackets), "
                 "e.g. Qwen2.5-Math-1.5B Base: 14.92 printed, 15.36 the mean.")
    if "medxpertqa" in names:
        lines.append(f"{TABLE2_SINGLE_SAMPLE}.")
    else:
        lines.append("Table 1/6 are Average@16 as the Qwen2.5-Math harness reports it (--protocol paper).")
    return "\n".join(lines)


def main(argv=None):
    common.report_user_errors()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", metavar="RESULTS_JSON", type=common.path,
                   help="eval.py's results.json files, a row each")
    p.add_argument("--plot", default="compare.png", type=common.path, help="the bar chart written")
    p.add_argument("--paper", metavar="SETTING", help="the paper's rows for this setting (Tables 1, 2, 6) beside "
                   "yours, e.g. 'Qwen2.5-Math-1.5B / NuminaMath-CoT'")
    args = p.parse_args(argv)
    missing = [f for f in args.results if not Path(f).is_file()]
    if missing:
        raise common.UserError(f"no such file {missing}; pass paths to eval.py's results.json files")
    if args.paper is not None and args.paper not in PAPER_TABLES:
        raise common.UserError(f"--paper {args.paper!r} is not one of the paper's settings: {'; '.join(PAPER_TABLES)}")
    compare(args.results, args.plot, args.paper)


if __name__ == "__main__":
    main()
