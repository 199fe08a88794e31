"""Benchmarks of the repo's scripts, one subcommand each.

    python bench.py grade                                   # eval.py's grading pool on MATH-500 x 16
    python bench.py grade --data ../shared/data/math_eval/math500.jsonl --workers 16
"""
import argparse
import os
import time

import numpy as np

import eval as evaluation


def bench_grade(args):
    """Grade problems x n math responses through eval.py's pool; compare with the time to generate them.

    Responses are the reference solutions (reasoning ending in \\boxed{answer}); a share of them get another
    problem's answer in the box, so both verdicts and math-verify's slower mismatch path are exercised."""
    items = evaluation.load_benchmark("math500", args.data)
    rng = np.random.default_rng(0)
    samples, expected = [], []
    for item, row in zip(items, evaluation.load_rows("math500", args.data)):
        solution = row.get("solution") or f"\\boxed{{{item['answer']}}}"
        wrong = rng.random(args.n) < args.wrong
        others = rng.choice(len(items), args.n)
        samples.append([(wrong_box(solution, items[j]["answer"]) if w else solution, 0, False)
                        for w, j in zip(wrong, others)])
        expected.append(~wrong)
    start = time.perf_counter()
    correct, timed_out = evaluation.grade_samples(items, samples, args.workers, args.timeout)
    seconds = time.perf_counter() - start
    answers = correct.size
    generate = answers * args.tokens_per_response / args.gen_tokens_per_s
    print(f"graded {len(items)} x {args.n} = {answers} answers with {args.workers} workers in {seconds:.1f} s: "
          f"{answers / seconds:.0f} answers/s, {timed_out.sum()} timeouts, "
          f"{100 * np.mean(correct == np.array(expected)):.1f}% graded as constructed")
    print(f"generating them: {answers} x {args.tokens_per_response} tokens at {args.gen_tokens_per_s} tokens/s "
          f"(assumed) = {generate:.0f} s, {generate / seconds:.1f}x the grading time")


def wrong_box(solution, answer):
    """The solution with its last \\boxed{} replaced by one holding another answer."""
    content = evaluation.last_boxed(solution)
    if content is None:
        return solution + f" \\boxed{{{answer}}}"
    start = solution.rfind("\\boxed{")
    return solution[:start] + f"\\boxed{{{answer}}}" + solution[start + len(f"\\boxed{{{content}}}"):]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("grade", help="eval.py's grading throughput")
    g.add_argument("--data", help="math500.jsonl (default: the hub's HuggingFaceH4/MATH-500)")
    g.add_argument("--n", type=int, default=16, help="samples per problem")
    g.add_argument("--wrong", type=float, default=0.5, help="share of responses with a wrong boxed answer")
    g.add_argument("--workers", type=int, default=os.cpu_count())
    g.add_argument("--timeout", type=float, default=10.0)
    g.add_argument("--tokens-per-response", type=int, default=1000,
                   help="mean response length for the generation estimate")
    g.add_argument("--gen-tokens-per-s", type=float, default=20000,
                   help="assumed vLLM output throughput (a 1.5B model on one H100 at large batch)")
    g.set_defaults(func=bench_grade)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
