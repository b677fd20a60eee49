r"""verify.py — decide whether a model's final answer matches the gold answer (MATH-500, AIME).

    grade(completion, gold, require_think_close=False) -> bool
                                           extract the final answer from a completion, then compare
                                           (gold: a string, or a number as JSON gives it: int, float)
    extract_answer(text, require_think_close=False) -> str|None
                                           the answer a completion commits to, or None
    is_equiv(pred, gold)    -> bool        compare two answers (gold as for grade)
    python verify.py [--require-think-close] PRED GOLD
                                           print the verdict and both parsed forms (answers may
                                           begin with '-': python verify.py -x -x)

Every accuracy, every positive/negative split of teacher traces and every reward in this project goes
through `grade`, so the checker must be right, must never hang, and must never run model output.

Extraction (the policy; tests/test_verify.py tables JOINED_BOXES, ANSWER_PRECEDENCE, PROSE_ANSWERS)
    1. Only the text after the last `</think>` counts. Without one: a `<think>` that never closes is
       truncated output (no answer). require_think_close=True is the paper's evaluation, graded as
       rllm grades (rllm/rewards/math_reward.py + math_utils/utils.py extract_answer): a completion
       without `</think>` has no answer, and after it only a box (rule 2) counts, no phrase or bare
       formula. Unlike rllm we read after the LAST `</think>` (rllm: between the first and a second
       one) and join adjacent boxes (rllm: the last box alone).
    2. Box candidate: the last top-level `\boxed{...}` / `\fbox{...}` / `\boxed 5` (nested boxes
       are one box), joined with the boxes just before it that only punctuation, math delimiters,
       spacing (`\quad`) or "and" separate: `\boxed{1} \quad \text{and} \quad \boxed{-2}` is the
       list 1, -2; "or" separates alternatives, so only the last counts. A last box whose braces never
       close is truncated output: no answer (a closed box after unclosed ones is still a box). A
       repetition loop ending the text (the same unit, say `\boxed{` or `\(`, 16+ times over 512+
       characters) is read as written once, or else as absent: it cannot hide the box before it.
    3. Phrase candidate: the LAST whole word "answer" (any case), read like rllm's and lighteval's
       final-answer anchors: "answer is $X$", "Answer: X", "**Answer:** \(X\)", "answer $X$",
       Minerva's "final answer is $X$. I hope it is correct", and "Final Answer: The largest $n$ is
       X" (the formula after the sentence's last "is"/"are"/":"), and Qwen's "答案是 X". X must be a
       math span or a short formula with no prose word; otherwise the anchor states nothing and there
       is no phrase candidate (an earlier anchor is never consulted, so a number from the middle of
       reasoning is never picked up). Spans that only "," or "and" separate are one list, as boxes
       are ("the answer is $4$ and $9$" is 4, 9); after "or" the last alternative counts.
    4. A box beats a plain "answer" phrase; a "final answer" phrase after the last box beats the box
       ("boxes intermediate values, then says The final answer is X" gives X). This is the order of
       Math-Verify's anchors, which lighteval uses: "final answer is" ties with or outranks a box
       (the later one wins), a bare "answer" ranks below it.
    5. Neither: the whole text, if it is one formula (a single math span such as
       `$\begin{pmatrix}...\end{pmatrix}$`, or a short line with no prose word). Nothing ever grabs
       the tail of a number out of prose ("711" can never be read as "11").

Parsing (never `eval`, `sympify` or `parse_expr`)
    A small tokenizer and recursive-descent parser turn the answer subset of LaTeX into values built
    only with sympy constructors (Integer, Rational, Add, Mul, Pow, sin, log, ...) and a few plain
    containers (tuple, list, set, interval, union, matrix, equation, text, choice letter, base-b
    numeral). Input that falls outside the subset is compared as normalized text instead.

Comparison policy
    * Exact numbers compare exactly: integers and rationals by exact equality (so 1/2^98 != 1/2^99 and
      10^20+1 != 10^20); irrational constants numerically at a precision that grows with the size of
      the integers involved (30 digits + their digit count), to an absolute 10^-(precision-5).
    * A relative tolerance of 1e-6 applies only when a decimal literal is involved (0.333333 = 1/3,
      3.14159 = pi), but never between two bare decimal literals (326.5 != 326.53: both are roundings),
      and a bare decimal must also be the exact value rounded or truncated to its places (2024.001 is
      not 2024, nor 0.1428572 1/7: 1/7 = 0.1428571...).
      It is relative to the value, so with a decimal literal in it an expression can still hide a
      term below 1e-6 of its value ((x+1)^{1000} + 0.5 vs (x+1)^{1000}): a known limit.
    * Expressions with variables: equal if structurally equal after sympy's automatic evaluation; small
      polynomials with rational coefficients are decided exactly by `expand(a - b) == 0`; anything else
      by numeric evaluation at three fixed pseudo-random points with every variable positive: one in
      (0.3, 0.95), one in (1.05, 2.95), one in (3.05, 6.95), pairs in no fixed order (answers usually
      assume positive variables, so sqrt(x^2) = x passes; |x-3| = 3-x and |a-b| = b-a do not). No
      unbounded `simplify`.
      Numeric checks are absolute, not relative: each value is computed with as many extra digits as
      its largest intermediate has, so (x+1)^1000 + x never equals (x+1)^1000 (see _evaluate).
    * Closed forms with numeric bounds are values: `\sum_{k=1}^{10} k` is 55 and `\prod` likewise
      (at most 1,000 terms, each built by the bounded helpers); `\lim_{x\to 0} \frac{\sin x}{x}` is 1
      and `\int_0^1 x^2\,dx` is 1/3, evaluated numerically when compared (a limit from three points per
      side that must agree, a definite integral over finite ends by quadrature whose error bound must
      be small; neither nested). Otherwise (a symbolic or huge range, an infinite bound, no limit)
      they stay inert and compare structurally: reordered factors match, a different body or bound
      does not. `a \bmod n`, `\pmod{n}` and `\equiv` are computed for rationals; a vmatrix, `\det M`
      and `|M|` of a matrix are the determinant. `\sin^{-1}`, `\sec^{-1}`, `\csc^{-1}` (any trig or hyperbolic
      f^{-1}) are inverse functions, as are `\arcsec`, `\arccsc`; f^{-1} of another function is
      ambiguous (text). Absolute-value bars nest and sit side by side: `||x|-1|`, `|a||b|`.
    * Tuples `(a,b)` and matrices are ordered; sets `\{a,b\}` (also written `{a, b}`) and bare lists
      `a, b` (solutions) are unordered and a repeated item counts once; a partial list is wrong;
      `1 \pm \sqrt2` is the list of both values. A column/row vector equals the tuple of its
      entries; a tuple of names only labels its value: `(p,q) = (3,2)` is `(3,2)`.
    * Intervals compare ends and openness (openness at an infinite end is ignored); a pair `(a,b)`
      equals the open interval (a,b); `\cup`, `\cap` and `\setminus` of intervals and finite sets of
      numbers (`\backslash` is `\setminus`) are computed to one canonical set (`[1,3) \cup [2,5]` is `[1,5]`, `\mathbb{R}
      \setminus \{0\}` is `(-\infty,0) \cup (0,\infty)`, an empty result is `\emptyset` = `∅` =
      `\{\}`); unions of other sets compare their parts unordered; `x \in S` is S, and
      inequalities in one variable become intervals whatever linear form the variable takes
      (`a < x <= b`, `x > a`, `-x > -1`, `1 < 2x - 1 < 5`).
    * `x=5` matches `5` (an equation whose one side is a lone variable, or `2+3=5`, stands for its other
      side); two equations match up to swapping sides and a nonzero constant factor. A system in a
      cases environment is the list of its equations; `p=3, q=2; p=5, q=2` (semicolons between groups
      of labelled values) is the solutions (3, 2), (5, 2); a ratio labelled by names, `V_1:V_2=3:10`,
      is its value 3:10 (ratios compare as written). `2e-1` is 2e - 1 (Euler's e): only a decimal
      mantissa (`2.0e-1`), an unsigned exponent (`2e10`) or one written as programs print it (`1e-07`,
      `1e+16`) is scientific notation. A gold answer that is a number (a JSON number: int or float) is
      compared as that number (never via str(): "1e-07" would be e - 7); against such a gold, a
      prediction that is only a scientific literal (`1e-7`, `2.5e-3`) is read as one (_equiv_to_gold).
    * Functions of numbers are their values: `\lfloor 7.6 \rfloor` is 7, `\gcd(42, 56)` 14, `\max(3, 11)`
      11 (gcd and lcm of integers, max and min of real numbers; of variables these four stay text). A
      trig function's argument in degrees is converted: `\sin 30^\circ` is 1/2, never sin(30 radians).
    * Ordinal suffixes and scale words after a number are read: `12^{\text{th}}` and `12th` are 12,
      `3.2 million` is 3200000 (thousand, million, billion, trillion).
    * Units and annotations (`\text{ cm}`, inches, degrees, `^\circ`, `\$`) are dropped, unless both
      answers name units and they differ (5 cm is not 5 mm; units, not their powers). `50\%` equals
      `50` and also `0.5`. A base subscript `52_8` equals `52_8`, `52_{8}` or `52`, not 42.
    * Text answers compare case-insensitively with whitespace collapsed; multiple-choice letters
      `\text{(C)}`, `(C)`, `C` compare as letters. Unicode is folded first: x², a₁, 3½ become
      x^{2}, a_{1}, 3\frac{1}{2}, then NFKC (full-width ５ is 5), then √ π ≤ ... become commands.

Bounds
    No call spends more than about 1.5 s of its thread's CPU time, whatever the input, and nothing
    uses signals or shared mutable state, so 8 threads give the verdicts one thread gives (see
    _with_deadline; a caller's time under load is that times the load). Extraction is linear in the
    completion: no regex can backtrack over it (math spans and braces are scanned, not matched by
    nested quantifiers) and a repetition loop that ends it (`\(` or `\boxed{` repeated to the token
    limit) is read once, or dropped, so the box before it still counts (_repetition_loop).
    Cost is bounded structurally before sympy sees anything: answers over 10,000 characters or
    2,000 tokens are only string-compared; nesting deeper than 32 is refused; a power, factorial,
    binomial, root or product whose exact value would exceed 20,000 digits is built unevaluated ("frozen") and then
    compared structurally only; polynomial expansion only runs when the expanded size is small;
    numeric evaluation refuses operations on magnitudes beyond 2^30000 or sin/exp of numbers beyond
    2^64. The backstop is a per-call deadline enforced by a per-thread trace hook (see
    _with_deadline), which stops even a slow step inside sympy. `grade` never raises.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import math
import random
import re
import sys
import threading
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal
from typing import NamedTuple

import mpmath
import sympy.assumptions.wrapper   # noqa: F401 -- imported lazily by sympy in the middle of a comparison
import sympy.combinatorics         # noqa: F401    (floor of a root, power expansion, ...): imported here,
import sympy.sets.setexpr          # noqa: F401    never inside a timed call (see _with_deadline)
import sympy.tensor.tensor         # noqa: F401
from sympy import (Abs, Add, E, I, Integer, Integral, Limit, Max, Min, Mod, Mul, Pow, Product, Rational, Sum,
                   Symbol, acos, acosh, acot, acsc, asec, asin, asinh, atan, atanh, binomial, ceiling, cos, cosh,
                   cot, csc, exp, expand, factorial, floor, gamma, integer_nthroot, log, nan, oo, pi, root, sec, sin,
                   sinh, sqrt, tan, tanh, zoo)

# ---------------------------------------------------------------------------------------------
# Limits. Each one bounds the cost of some step; see "Bounds" in the module docstring.
# ---------------------------------------------------------------------------------------------
MAX_ANSWER_CHARS = 10_000     # longer answers are compared as text only
MAX_TOKENS = 2_000            # answers with more tokens are compared as text only
MAX_NESTING = 32              # brackets, braces, command arguments deeper than this: not parsed
MAX_EXACT_DIGITS = 20_000     # exact integers beyond this many digits are never computed
MAX_ROOT_DIGITS = 100         # sympy factors radicands to simplify roots: only small ones
MAX_NUMERIC_DIGITS = 2_000    # numbers bigger than this are compared structurally, not numerically
MAX_ITEMS = 64                # elements of one tuple/list/set/matrix
MAX_POLY_TERMS = 400          # `expand` only when the expanded polynomial stays this small
NUMERIC_DIGITS = 30           # base working precision of numeric checks
DECIMAL_REL_TOL = Rational(1, 10**6)
TIME_BUDGET_S = 1.5
LOG10_2 = math.log10(2)


class _ParseError(ValueError):
    """The answer is outside the supported LaTeX subset (it is then compared as text)."""


class _OutOfTime(BaseException):
    """The per-call deadline passed; the comparison answers False. A BaseException, so that no
    `except Exception` inside sympy can swallow it."""


_state = threading.local()    # per-thread deadline and mpmath context: no globals shared by threads


_UNSAFE_TO_STOP = frozenset({"__exit__", "__aexit__", "__del__", "close", "release", "_release_save"})
DEADLINE_CHECK_EVERY = 16      # function calls between two reads of the thread's CPU clock


def _with_deadline(fn, *args, seconds: float | None = None):
    """fn(*args), stopped with _OutOfTime once TIME_BUDGET_S (or seconds) of this thread's CPU time
    have been spent.

    The structural limits above keep every step small; this is the backstop for whatever they miss
    (sympy's assumption system can spend seconds on a convoluted expression). It needs no signal, so
    it works in any thread: a trace hook, installed for this thread only, reads the clock at every
    16th Python function call and raises at the first call past the deadline (CPython then removes
    the hook, so cleanup code runs normally). Nested calls share the outermost deadline. A tracer that
    was already installed (a debugger, coverage) is paused during the call and restored after it.

    Why this is the same verdict from 8 threads as from one:
      * the clock is this thread's CPU time (time.thread_time), not wall time: waiting for the GIL
        behind 7 other graders spends none of the budget, so load cannot turn a verdict into False;
      * it never raises inside an import or a cleanup call (`__exit__`, a lock's release): a lazy import
        stopped half way would leave a module half-initialised, or its import lock held, for every
        other thread (a deadlock); the hook waits for the next call outside them;
      * the modules sympy would import lazily in the middle of a comparison are imported with
        verify (the imports at the top of this file)."""
    if getattr(_state, "deadline", None) is not None:
        return fn(*args)
    deadline = time.thread_time() + (TIME_BUDGET_S if seconds is None else seconds)
    calls = 0

    def stop_at_deadline(frame, event, arg):
        nonlocal calls
        calls += 1
        if calls % DEADLINE_CHECK_EVERY == 0 and time.thread_time() > deadline and _safe_to_stop(frame):
            raise _OutOfTime
        return None                              # no line-by-line tracing inside the frame

    previous = sys.gettrace()
    _state.deadline = deadline
    sys.settrace(stop_at_deadline)
    try:
        return fn(*args)
    finally:
        sys.settrace(previous)
        _state.deadline = None


def _safe_to_stop(frame) -> bool:
    """May _OutOfTime be raised as this frame is called? Not in a cleanup call, nor anywhere inside
    the import machinery (walks the stack: runs only once the deadline has passed)."""
    if frame.f_code.co_name in _UNSAFE_TO_STOP:
        return False
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return False
        frame = frame.f_back
    return True


# ---------------------------------------------------------------------------------------------
# Extraction: from a completion to the answer string it commits to.
# ---------------------------------------------------------------------------------------------
_BOX_RE = re.compile(r"\\(?:boxed|fbox|framebox)(?![A-Za-z])")
# What may stand between boxes that together are one answer ("\boxed{1}, \boxed{2}",
# "\( \boxed{1} \) \quad \text{and} \quad \( \boxed{2} \)"): punctuation, math delimiters, spacing, "and".
_BOX_GAP_RE = re.compile(
    r"(?:[\s$,;]|\\[()\[\],;:! ]|\\q?quad(?![A-Za-z])|and\b|\\text\s*\{\s*,?\s*and\s*\})*", re.I)
MAX_BOX_GAP = 200             # longer text between two boxes is prose: they are not one answer
_ANSWER_LEAD_RE = re.compile(r"[\s*]*(is\b|are\b|:|=|是|为|：)?[\s*:：]*", re.I)  # "Answer:** ", " is ", "答案是"
_OR_GAP_RE = re.compile(r"[\s$,]*(?:or\b|\\text\s*\{\s*or\s*\})[\s$]*", re.I)   # "$4$ or $9$": alternatives
_FINAL_BEFORE_RE = re.compile(r"final[\s*]*$", re.I)                      # "Final **Answer"
_LAST_VERB_RE = re.compile(r".*\s(?:is|are)\s+|.*:\s*", re.I | re.S)      # "The largest $n$ is "
_SENTENCE_END_RE = re.compile(r"\.(?:\s|$)|。")
_ENV_NAME_RE = re.compile(r"\\(?:begin|end)\s*\{[A-Za-z*]*\}")
_PROSE_RE = re.compile(r"[A-Za-z]{3,}")


def extract_answer(text: str, require_think_close: bool = False) -> str | None:
    """The answer a completion commits to (policy: "Extraction" in the module docstring), or None
    when it has none or is truncated. require_think_close (the paper's strict protocol): a completion
    without `</think>` has none, and only a box after it counts, as in rllm's grader."""
    if not isinstance(text, str):
        return None
    close = text.rfind("</think>")
    if close >= 0:
        text = text[close + len("</think>"):]
    elif require_think_close or "<think>" in text:
        return None                                   # reasoning never finished: truncated
    if not text.strip():
        return None
    loop = _repetition_loop(text)
    if loop is None:
        return _final_answer(text, require_think_close)
    head, unit = text[:loop[0]], text[loop[0]:loop[0] + loop[1]]
    answer = _final_answer(head + unit, require_think_close)   # the loop said once: "\boxed{5}. " x 1000
    return answer if answer is not None else _final_answer(head, require_think_close)   # "\boxed{" x 1000


MAX_LOOP_PERIOD = 256         # a repetition loop repeats a unit of at most this many characters
MIN_LOOP_REPEATS = 16         # ... at least this many times
MIN_LOOP_CHARS = 512          # ... over at least this many characters, up to the end of the text


def _repetition_loop(text: str) -> tuple[int, int] | None:
    """(start, period) of a repetition loop that ends the text (a model repeating `\\(` or a sentence
    until its token limit: the tail text[start:] has period `period`), or None.

    Cost O(MAX_LOOP_PERIOD * 64 + n log n) in C string comparisons: a period p is tried only if the last
    64 characters repeat with it; its run is then found by doubling and bisection on slice equality
    (text[n-r-p:n-p] == text[n-r:] holds for every r up to the run length, and for none beyond)."""
    n = len(text)
    if n < MIN_LOOP_CHARS:
        return None
    tail, hi = text[n - 8:], n - 1
    while (i := text.rfind(tail, n - 8 - MAX_LOOP_PERIOD, hi)) >= 0:   # periods p whose last 8 repeat
        hi, p = i + 7, n - 8 - i
        if text[n - 64 - p:n - p] != text[n - 64:]:
            continue
        good, bad = 64, n - p + 1                      # the run r: good <= r < bad
        while 2 * good < bad:                          # doubling, then bisection
            if text[n - 2 * good - p:n - p] != text[n - 2 * good:]:
                bad = 2 * good
                break
            good *= 2
        while bad - good > 1:
            mid = (good + bad) // 2
            if text[n - mid - p:n - p] == text[n - mid:]:
                good = mid
            else:
                bad = mid
        span = good + p
        if span >= max(MIN_LOOP_CHARS, MIN_LOOP_REPEATS * p):
            return n - span, p
    return None


def _final_answer(text: str, require_think_close: bool) -> str | None:
    """extract_answer's rules 2-5 on the text after `</think>`."""
    boxes_end, boxed = _last_boxes(text)
    if require_think_close:                           # rllm's grader reads boxes only
        return boxed or None
    phrase_start, phrase = _answer_phrase(text)
    final = _FINAL_BEFORE_RE.search(text, max(phrase_start - 20, 0), max(phrase_start, 0)) is not None
    if phrase is not None and (boxed is None or (final and phrase_start >= boxes_end)):
        return phrase                                 # a "final answer" after the last box wins
    if boxed is not None:
        return boxed or None                          # "" means the last box is cut off
    return _bare_answer(text)


def _match_brace(text: str, open_index: int) -> int | None:
    """Index of the `}` closing the `{` at open_index (escaped `\\{` `\\}` skipped), or None."""
    depth, i = 0, open_index
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _box_content(text: str, m: re.Match, pairs: dict[int, int] | None) -> tuple[int, str] | None:
    """(end, content) of the box whose command m matched; None when its braces never close. pairs:
    _brace_pairs(text), once a box has been found unclosed (then every later search would be long)."""
    j = m.end()
    while j < len(text) and text[j] in " \t":
        j += 1
    if j < len(text) and text[j] == "[":              # \framebox[width]{...}
        k = text.find("]", j)
        j = k + 1 if k > 0 else j
    if j < len(text) and text[j] == "{":
        close = _match_brace(text, j) if pairs is None else pairs.get(j)
        return None if close is None else (close + 1, text[j + 1:close])
    token = re.match(r"[^\s$]*", text[j:j + 200]).group(0)   # "\boxed 5": one token
    return j + len(token), token


_BRACE_TOKEN_RE = re.compile(r"\\.|[{}]", re.S)


def _brace_pairs(text: str) -> dict[int, int]:
    """{index of `{`: index of its `}`} for the whole text in one pass (escaped `\\{` `\\}` skipped), as
    _match_brace would find them one by one: a thousand unclosed `\\boxed{` then cost one scan, not a
    thousand."""
    pairs, stack = {}, []
    for m in _BRACE_TOKEN_RE.finditer(text):
        if m.group() == "{":
            stack.append(m.start())
        elif m.group() == "}" and stack:
            pairs[stack.pop()] = m.start()
    return pairs


def _top_level_boxes(text: str) -> list[tuple[int, int, str | None]]:
    """(start, end, content) of every box not nested in another closed box, in order. A box whose
    braces never close has content None and end len(text) (cut off); the boxes inside it still count,
    so `\\boxed{` repeated in a loop cannot hide the closed `\\boxed{5}` that ends the text.
    Linear time: braces are matched in one pass and nested boxes are skipped."""
    boxes, cursor, pairs = [], 0, None
    for m in _BOX_RE.finditer(text):
        if m.start() < cursor:
            continue                                  # \boxed{\boxed{5}}: the inner box is content
        box = _box_content(text, m, pairs)
        if box is None and pairs is None:             # the first unclosed box: match all braces once
            pairs = _brace_pairs(text)
        if box is None:
            boxes.append((m.start(), len(text), None))
            continue
        content = box[1].strip()
        for _ in range(8):                            # \boxed{\boxed{5}}: the innermost content
            content, outer = _unbox(content), content
            if content == outer:
                break
        if content:                                   # an empty box states nothing
            boxes.append((m.start(), box[0], content))
        cursor = box[0]
    return boxes


def _unbox(s: str) -> str:
    """The content of s if s is exactly one box, \\boxed{...}; else s."""
    m = _BOX_RE.match(s)
    if m and s.endswith("}"):
        j = s.find("{", m.end())
        if j >= 0 and not s[m.end():j].strip() and _match_brace(s, j) == len(s) - 1:
            return s[j + 1:-1].strip()
    return s


def _last_boxes(text: str) -> tuple[int, str | None]:
    """(end, answer): the last box joined with the boxes just before it that only punctuation,
    spacing or "and" separates ("or" separates alternatives: only the last counts); answer "" if the
    last box is cut off, (-1, None) if the text has no box."""
    boxes = _top_level_boxes(text)
    if not boxes:
        return -1, None
    start, end, content = boxes[-1]
    if content is None:
        return end, ""
    parts = [content]
    for prev_start, prev_end, prev in reversed(boxes[:-1]):
        gap = text[prev_end:start]
        if prev is None or len(parts) >= MAX_ITEMS or len(gap) > MAX_BOX_GAP or not _BOX_GAP_RE.fullmatch(gap):
            break
        parts.insert(0, prev)
        start = prev_start
    return end, ", ".join(parts)


def _answer_phrase(text: str) -> tuple[int, str | None]:
    """(start, X) for the LAST word "answer" when its sentence states a formula X ("the final answer
    is $X$", "Answer: X", "Final Answer: The largest $n$ is X"); (-1, None) otherwise. Only the last
    anchor is read, so a number stated earlier in the reasoning is never picked up."""
    start, anchor = max((_last_word(text, "answer"), "answer"), (text.rfind("答案"), "答案"))
    if start < 0:
        return -1, None
    rest = text[start + len(anchor):]
    lead = _ANSWER_LEAD_RE.match(rest)
    span = _span_at(rest, lead.end())
    if span is not None:                              # "answer is $X$.", "Answer \(X\)": the span,
        return start, _joined_spans(rest, span) or None   # with those "," or "and" join to it
    connective = lead.group(1) is not None            # "answer is X", "Answer: X"
    sentence = _SENTENCE_END_RE.split(rest[lead.end() if connective else 0:].split("\n", 1)[0], 1)[0]
    formula = _formula(sentence) if connective else None
    if formula is None:                               # "The largest $n$ is 34": after the last verb
        verb = _LAST_VERB_RE.match(sentence)
        formula = _formula(sentence[verb.end():]) if verb else None
    return (start, formula) if formula else (-1, None)


MAX_JOINED_SPANS = 4 * MAX_ITEMS   # spans read after "answer is": more are a loop, not an answer


def _joined_spans(text: str, first: _Span) -> str:
    """The span `first` and the spans after it that only punctuation, spacing or "and" separate, as one
    list ("the answer is $4$ and $9$" is 4, 9); "or" separates alternatives, of which the last counts,
    as with boxes."""
    parts, end = [first.content], first.end
    for _ in range(MAX_JOINED_SPANS):                 # "$a$ or $b$ or ..." 20,000 times: bounded
        span = _next_span(text, end, end + MAX_BOX_GAP) if len(parts) < MAX_ITEMS else None
        if span is None:
            break
        gap = text[end:span.start]
        if len(gap) > MAX_BOX_GAP:
            break
        if _BOX_GAP_RE.fullmatch(gap):
            parts.append(span.content)
        elif _OR_GAP_RE.fullmatch(gap):
            parts = [span.content]
        else:
            break
        end = span.end
    return ", ".join(p for p in parts if p)


def _last_word(text: str, word: str) -> int:
    """Start of the last whole-word occurrence of word (lower, Capitalized or UPPER case) in text, or
    -1. Searches back from the end: a case-blind regex over a long completion costs ~50x more."""
    best = -1
    for variant in (word, word.capitalize(), word.upper()):
        i = text.rfind(variant)
        while i > best:
            before = text[i - 1] if i > 0 else " "
            after = text[i + len(word)] if i + len(word) < len(text) else " "
            if not (before.isalnum() or before == "_" or after.isalnum() or after == "_"):
                best = i
                break
            i = text.rfind(variant, 0, i)
    return best


class _Span(NamedTuple):
    start: int
    end: int
    content: str              # stripped


# Math delimiters, longest first: "$$" must be tried before "$" at the same position.
_SPAN_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def _span_at(text: str, start: int) -> _Span | None:
    """The math span ($$X$$, $X$, \\(X\\), \\[X\\]) opening exactly at start, X non-empty and free of
    its closer (and of `$` for the dollar forms); None if there is none. A hand-written scanner, not a
    regex: `\\((?:(?!\\)).)+\\)` searched over a text with thousands of unclosed `\\(` rescans the
    rest of the text from each of them (quadratic, inside C code that no deadline can interrupt);
    here each opener costs one str.find."""
    for opener, closer in _SPAN_DELIMITERS:
        if not text.startswith(opener, start):
            continue
        body = start + len(opener)
        close = text.find(closer, body)
        if opener[0] == "$" and text.find("$", body) != close:
            close = -1                                # "$$a$b": the first `$` after X must close
        if close > body:
            return _Span(start, close + len(closer), text[body:close].strip())
        return None                                   # ("$" after a failed "$$" fails too: X = "")
    return None


def _next_span(text: str, pos: int, last_start: int) -> _Span | None:
    """The leftmost math span starting in [pos, last_start]. Linear in the text: each opener kind's
    next occurrence is found once per position passed, and a kind whose closer never occurs again is
    dropped (no later opener of that kind can close either)."""
    upcoming = {"$": -1, "\\(": -1, "\\[": -1}        # opener -> its next index at or after i
    i = pos
    while upcoming and i <= last_start:
        for opener in list(upcoming):
            if upcoming[opener] < i:                  # only openers starting by last_start matter
                upcoming[opener] = text.find(opener, i, last_start + len(opener))
                if upcoming[opener] < 0:
                    del upcoming[opener]
        if not upcoming:
            return None
        i = min(upcoming.values())
        if i > last_start:
            return None
        span = _span_at(text, i)
        if span is not None:
            return span
        for opener, closer in _SPAN_DELIMITERS[2:]:
            if opener in upcoming and text.startswith(opener, i) and text.find(closer, i) < 0:
                del upcoming[opener]                  # unclosed `\\(`: no later one closes either
        i += 1
    return None


def _formula(s: str) -> str | None:
    """The formula s states, if s is one: a single math span ($X$, $$X$$, \\(X\\), \\[X\\]) gives X;
    a short line with no word of 3+ letters outside commands gives itself; anything else None."""
    s = s.strip().strip("*").strip()
    span = _span_at(s, 0)
    if span is not None and span.end == len(s):
        return span.content
    if not s or len(s) > 200 or "\n" in s:
        return None
    probe = _ENV_NAME_RE.sub(" ", s)                  # \begin{pmatrix}: not prose
    probe = re.sub(r"\\(?:text|textbf|mbox|mathrm)\s*\{[^{}]*\}|\\[A-Za-z]+", " ", probe)
    return None if _PROSE_RE.search(probe) else s


def _bare_answer(text: str) -> str | None:
    """The whole text, if it is one formula (see _formula): a completion that is only an answer."""
    s = text.strip()
    return s if _formula(s) is not None else None


# ---------------------------------------------------------------------------------------------
# Normalization: one canonical spelling for the many LaTeX ways to write the same answer.
# ---------------------------------------------------------------------------------------------
_UNICODE = {"√": r"\sqrt", "π": r"\pi ", "×": r"\times ", "·": r"\cdot ", "÷": r"\div ", "−": "-",
            "–": "-", "∞": r"\infty ", "±": r"\pm ", "∓": r"\mp ", "≤": r"\le ", "≥": r"\ge ",
            "≠": r"\ne ", "∪": r"\cup ", "∩": r"\cap ", "∖": r"\setminus ", "∅": r"\emptyset ", "∈": r"\in ",
            "≈": r"\approx ", "°": r"\degree ", "％": "%",
            "⌊": r"\lfloor ", "⌋": r"\rfloor ", "⌈": r"\lceil ", "⌉": r"\rceil ", "\u00a0": " ", "\u2044": "/"}
_UNICODE_RE = re.compile("|".join(map(re.escape, _UNICODE)))
_SCRIPT_DIGITS = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁻₀₁₂₃₄₅₆₇₈₉₊₋", "0123456789+-0123456789+-")
_SUPERSCRIPT_RE = re.compile("[⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁻]+")
_SUBSCRIPT_RE = re.compile("[₀₁₂₃₄₅₆₇₈₉₊₋]+")
_VULGAR_FRACTION_RE = re.compile("[\u00bc-\u00be\u2150-\u215e]")           # ¼ ½ ¾ ⅓ ... ⅞
# An ordinal suffix after a digit, in any spelling: 12th, 12^{th}, 12^\text{th}, 12^{\mathrm{th}}.
_ORDINAL_RE = re.compile(r"(?<=\d)(?:\s*\^\s*(?:\{\s*)?(?:\\(?:text|textrm|mathrm|rm)(?:\s*\{)?\s*)?(?:st|nd|rd|th)"
                         r"(?:\s*\})*|(?:st|nd|rd|th)(?![A-Za-z]))")
_SCALE_WORDS = {"thousand": 3, "million": 6, "billion": 9, "trillion": 12}
_SCALE_WORD_RE = re.compile(r"(?<=\d)\s*(?:\\text\s*\{\s*)?(thousand|million|billion|trillion)(?![A-Za-z])(?:\s*\})?",
                            re.IGNORECASE)
_REWRITES = [  # (pattern, replacement), applied in order
    (re.compile(r"\\(?:left|right|[bB]igg?[lr]?|middle)(?![A-Za-z])\s*\.?|\\(?:no)?limits(?![A-Za-z])"), ""),
    (re.compile(r"(?<=\d)\s*\{\s*,\s*\}\s*(?=\d)"), ""),             # 10{,}080, 14 {, }916
    (re.compile(r"(?<=\d),\\!\s*(?=\d)"), ""),                     # 10,\!080
    (re.compile(r"(?<!\\)\\[,:;! ]|\\q?quad|~|\\(?:display|text|script)style(?![A-Za-z])"), " "),
    (re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![A-Za-z])|\\circ(?![A-Za-z])"), r" \\degree "),
    (_ORDINAL_RE, ""),                                             # 12^{\text{th}}, 12^\mathrm{th}, 2nd: 12, 2
    (_SCALE_WORD_RE, lambda m: r" \times 10^{%d} " % _SCALE_WORDS[m.group(1).lower()]),   # 3.2 million
    (re.compile(r"\\l(floor|ceil)(?![A-Za-z])"), r" \\\1("),        # \lfloor x \rfloor: the function \floor(x)
    (re.compile(r"\\r(?:floor|ceil)(?![A-Za-z])"), ") "),
    (re.compile(r"\\[dtc]frac(?![A-Za-z])"), r"\\frac"),
    (re.compile(r"\\[dt]binom(?![A-Za-z])"), r"\\binom"),
    (re.compile(r"\\(?:textbf|textit|textrm|textnormal|textup|textsf|mbox|hbox)(?![A-Za-z])"), r"\\text"),
    (re.compile(r"\\(?:mathrm|mathbf|mathit|mathsf|mathnormal|boldsymbol|bm|operatorname)\s*\{([^{}]*)\}"),
     r" \1 "),
    (re.compile(r"\\mathbb(?:\s*\{)?\s*R(?:\s*\})?"), r" \\reals "),
    (re.compile(r"\\%"), "%"),
    (re.compile(r"\\\$|\$|\\textdollar(?![A-Za-z])"), " "),
    (re.compile(r"\\(?:lbrace)(?![A-Za-z])"), r"\\{"),
    (re.compile(r"\\(?:rbrace)(?![A-Za-z])"), r"\\}"),
    (re.compile(r"(?<![\d.])(\d{1,3})((?: \d{3})+)(?![\d.])"), lambda m: m.group(1) + m.group(2).replace(" ", "")),
    (re.compile(r"\s+"), " "),
]
_OUTER_WRAPPERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
# A system of equations in a cases environment (no `&` but an aligned `&=`: a piecewise function stays as it is).
_CASES_RE = re.compile(r"\\begin\s*\{cases\}(.*)\\end\s*\{cases\}", re.DOTALL)
# A ratio labelled by names on the left: S_{ABC}:S_{DEF} = 5:18 states 5:18.
_RATIO_LABEL_RE = re.compile(r"(?=[^=<>]*[A-Za-z])([^=<>]*)=\s*(\d+(?:\.\d+)?(?:\s*:\s*\d+(?:\.\d+)?)+)")  # linear


CACHE_KEY_CHARS = 512         # only answers this short are cached (bounds the caches' memory)


def _cached(fn):
    """fn with an LRU cache for short string arguments; long ones are computed every time."""
    cached = functools.lru_cache(maxsize=1 << 14)(fn)

    @functools.wraps(fn)
    def wrapper(*args: str):
        return cached(*args) if sum(map(len, args)) <= CACHE_KEY_CHARS else fn(*args)
    wrapper.cache_clear = cached.cache_clear
    return wrapper


@_cached
def _clean(answer: str) -> str:
    """Canonical spelling: math delimiters and a whole-answer \\boxed{} peeled, spacing, \\left/\\right,
    thousands separators, \\dfrac etc. rewritten, trailing punctuation dropped."""
    s = answer.strip()
    if len(s) > MAX_ANSWER_CHARS:
        return s
    if not s.isascii():
        s = _unicode_to_latex(s)
    for _ in range(8):                              # peel nested wrappers: $\boxed{$5$}$ ...
        before = s
        for opener, closer in _OUTER_WRAPPERS:
            if len(s) >= len(opener) + len(closer) and s.startswith(opener) and s.endswith(closer):
                s = s[len(opener):len(s) - len(closer)].strip()
        s = _unbox(s).rstrip(".,;: ").strip()
        if s == before:
            break
    for pattern, replacement in _REWRITES:
        s = pattern.sub(replacement, s)
    if (m := _CASES_RE.fullmatch(s)) and "&" not in re.sub(r"&\s*=|=\s*&", "=", m.group(1)):
        s = ", ".join(row.strip() for row in re.sub(r"&\s*=|=\s*&", "=", m.group(1)).split("\\\\") if row.strip())
    if ":" in s and (m := _RATIO_LABEL_RE.fullmatch(s)) and m.group(1).count(":") == m.group(2).count(":"):
        s = m.group(2)
    return s.strip().rstrip(".,;:\\").strip()                   # "185\\": a stray line break


def _unicode_to_latex(s: str) -> str:
    """x², a₁, 3½, ℝ become x^{2}, a_{1}, 3\\frac{1}{2}, \\mathbb{R} (NFKC would flatten them to x2, a1,
    31/2, R); then NFKC folds full-width digits and letters, ligatures etc. into ASCII; then √ π ≤ ...
    become commands."""
    s = _VULGAR_FRACTION_RE.sub(
        lambda m: r"\frac{%s}{%s}" % tuple(unicodedata.normalize("NFKC", m.group(0)).split("\u2044")), s)
    s = _SUPERSCRIPT_RE.sub(lambda m: "^{" + m.group(0).translate(_SCRIPT_DIGITS) + "}", s)
    s = _SUBSCRIPT_RE.sub(lambda m: "_{" + m.group(0).translate(_SCRIPT_DIGITS) + "}", s)
    s = s.replace("ℝ", r"\mathbb{R}")                # before NFKC, which would make it the letter R
    s = unicodedata.normalize("NFKC", s)
    return _UNICODE_RE.sub(lambda m: _UNICODE[m.group(0)], s)


# ---------------------------------------------------------------------------------------------
# Values an answer can parse to.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Num:
    """A scalar: a sympy expression plus where it came from.
    decimal: a decimal literal took part (enables the relative tolerance);
    literal: the whole value is one decimal literal (two literals compare exactly);
    frozen:  built unevaluated to bound its cost (compared structurally only);
    percent: written with %; digits: bound on the digits of the exact integers inside."""
    expr: object
    decimal: bool = False
    literal: bool = False
    frozen: bool = False
    percent: bool = False
    digits: float = 0.0


@dataclass(frozen=True)
class TupleV:       # (a, b, c): ordered
    items: tuple


@dataclass(frozen=True)
class ListV:        # a, b, c: a bare list of solutions, unordered
    items: tuple


@dataclass(frozen=True)
class SetV:         # \{a, b\}: unordered
    items: tuple


@dataclass(frozen=True)
class IntervalV:
    lo: Num
    hi: Num
    lo_open: bool
    hi_open: bool


@dataclass(frozen=True)
class UnionV:       # parts are IntervalV / SetV, unordered
    parts: tuple


@dataclass(frozen=True)
class MatrixV:
    rows: tuple


@dataclass(frozen=True)
class EquationV:
    lhs: Num
    rhs: Num
    lhs_label: bool = False    # the left side is written f(x): a name for the right side


@dataclass(frozen=True)
class RelationV:    # lhs op rhs with op in {"<", "<=", "!="} (">" is stored swapped)
    op: str
    lhs: Num
    rhs: Num


@dataclass(frozen=True)
class TextV:
    text: str


@dataclass(frozen=True)
class ChoiceV:
    letter: str


@dataclass(frozen=True)
class BasedV:       # a numeral with a base subscript, e.g. 52_8
    digits: str
    base: int


_PM = Symbol("±")   # stands for the sign in a ± b; expanded into both values per list item


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Tok:
    kind: str       # num id const func cmd op rel pm pct deg setl setr setop in sep text word begin end
    text: str
    space: bool = False   # whitespace precedes it


_TOKEN_RE = re.compile(r"""
    (?P<space>\s+)
  | (?P<num>\d+\.\d+[eE][-+]?\d+(?![A-Za-z])|\d+[eE](?:\+?\d+|-0\d+)(?![A-Za-z])|\d+(?:\.\d+)?|\.\d+)
  | (?P<cmd>\\[A-Za-z]+|\\.)
  | (?P<letters>[A-Za-z]+)
  | (?P<rel><=|>=|!=|=<|=>)
  | (?P<op>[-+*/^_!=<>(),;\[\]{}|&'%:])
""", re.VERBOSE)

_GREEK = frozenset("""alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda
    mu nu xi rho varrho sigma varsigma tau upsilon phi varphi chi psi omega Gamma Delta Theta Lambda Xi
    Sigma Upsilon Phi Psi Omega ell""".split())
_FUNCS = {"sin": sin, "cos": cos, "tan": tan, "cot": cot, "sec": sec, "csc": csc, "arcsin": asin,
          "arccos": acos, "arctan": atan, "arccot": acot, "arcsec": asec, "arccsc": acsc, "arcsinh": asinh,
          "arccosh": acosh, "arctanh": atanh, "sinh": sinh, "cosh": cosh, "tanh": tanh,
          "exp": exp, "ln": log, "log": log, "lg": log, "sqrt": sqrt, "floor": floor, "ceil": ceiling}
_TRIG = frozenset({"sin", "cos", "tan", "cot", "sec", "csc"})    # an argument in degrees is converted
_MULTI_FUNCS = frozenset({"gcd", "lcm", "max", "min"})         # f(a, b, ...), computed for numbers only
# f^{-1} is the inverse function for these (\sec^{-1} x = arcsec x, never 1/sec x = cos x); for any other
# function (\ln^{-1} x, \exp^{-1}) the notation is ambiguous and the answer is compared as text.
_INVERSE = {"sin": "arcsin", "cos": "arccos", "tan": "arctan", "cot": "arccot", "sec": "arcsec", "csc": "arccsc",
            "sinh": "arcsinh", "cosh": "arccosh", "tanh": "arctanh"}
_COMMANDS = {  # LaTeX command -> token
    "cdot": ("op", "*"), "times": ("op", "*"), "ast": ("op", "*"), "div": ("op", "/"),
    "pm": ("pm", "+-"), "mp": ("pm", "-+"), "le": ("rel", "<="), "leq": ("rel", "<="),
    "leqslant": ("rel", "<="), "ge": ("rel", ">="), "geq": ("rel", ">="), "geqslant": ("rel", ">="),
    "lt": ("rel", "<"), "gt": ("rel", ">"), "ne": ("rel", "!="), "neq": ("rel", "!="),
    "approx": ("rel", "~"), "in": ("in", "in"), "cup": ("setop", "cup"), "cap": ("setop", "cap"),
    "setminus": ("setop", "setminus"), "smallsetminus": ("setop", "setminus"), "backslash": ("setop", "setminus"),
    "{": ("setl", "{"),
    "}": ("setr", "}"), "langle": ("op", "("), "rangle": ("op", ")"), "lvert": ("op", "|"),
    "rvert": ("op", "|"), "vert": ("op", "|"), "mid": ("op", "|"), "\\": ("op", "\\\\"),
    "%": ("pct", "%"), "degree": ("deg", "deg"), "infty": ("const", "oo"), "infin": ("const", "oo"),
    "pi": ("const", "pi"), "emptyset": ("const", "empty"), "varnothing": ("const", "empty"),
    "reals": ("const", "reals"), "frac": ("cmd", "frac"), "sqrt": ("cmd", "sqrt"),
    "binom": ("cmd", "binom"), "and": ("sep", "and"), "or": ("sep", "or"), "equiv": ("rel", "="),
    "bmod": ("op", "mod"), "mod": ("op", "mod"), "pmod": ("cmd", "pmod"), "to": ("rel", "->"),
    "rightarrow": ("rel", "->"), "longrightarrow": ("rel", "->"), "sum": ("cmd", "sum"),
    "prod": ("cmd", "prod"), "lim": ("cmd", "lim"), "int": ("cmd", "int"), "det": ("cmd", "det"),
}
# Unit words, by what they measure, to one name each (a bare "m", "s" or "g" is a variable, never a unit).
_UNIT_NAMES = {name: unit for unit, names in {
    "mm": "mm millimeter millimeters millimetre millimetres", "cm": "cm centimeter centimeters centimetre centimetres",
    "km": "km kilometer kilometers kilometre kilometres", "m": "meter meters metre metres",
    "in": "inch inches", "ft": "ft foot feet", "yd": "yd yard yards", "mi": "mi mile miles",
    "s": "second seconds sec secs", "min": "min minute minutes mins", "h": "hour hours hr hrs", "day": "day days",
    "week": "week weeks", "month": "month months", "year": "year years", "mg": "mg milligram milligrams",
    "g": "gram grams", "kg": "kg kilogram kilograms", "lb": "lb lbs pound pounds", "oz": "oz ounce ounces",
    "ml": "ml milliliter milliliters millilitre millilitres", "l": "liter liters litre litres",
    "gal": "gallon gallons", "deg": "degree degrees \\degree", "rad": "radian radians", "$": "dollar dollars",
    "cent": "cent cents", "mph": "mph", "kph": "kph"}.items() for name in names.split()}
# Words dropped as units: the named units, and words that only qualify them ("in" is inches, never compared).
_UNIT_WORDS = frozenset(n for n in _UNIT_NAMES if n.isalpha()) | frozenset("in unit units square cubic sq cc".split())
_MATH_WORDS = frozenset(_FUNCS) | {"pi", "inf", "infty", "infinity", "and", "or"}
_OPENERS = {"(", "[", "{"}
_CLOSERS = {")", "]", "}"}


def _letter_tokens(run: str, space: bool) -> list[_Tok]:
    """A run of plain letters: a function name, pi, a unit, "and"/"or", or single-letter variables."""
    if run in _FUNCS or run in ("gcd", "lcm", "max"):               # not "min": also minutes
        return [_Tok("func", run, space)]
    if run == "pi":
        return [_Tok("const", "pi", space)]
    if run in ("inf", "infty", "infinity"):
        return [_Tok("const", "oo", space)]
    if run in ("and", "or"):
        return [_Tok("sep", run, space)]
    if run == "mod":
        return [_Tok("op", "mod", space)]
    if run.lower() in _UNIT_WORDS:
        return [_Tok("word", run, space)]
    if run.lower() in ("percent", "percentage", "pct"):
        return [_Tok("pct", "%", space)]
    for name in sorted(_FUNCS, key=len, reverse=True):          # "sinx" -> sin x
        if run.startswith(name) and len(run) - len(name) <= 2:
            return [_Tok("func", name, space)] + _letter_tokens(run[len(name):], False)
    if len(run) > 12:
        raise _ParseError("a long run of letters is prose, not a formula")
    if len(run) >= 3:
        return [_Tok("word", run, space)]
    return [_Tok("id", c, space and k == 0) for k, c in enumerate(run)]


def _tokenize(s: str) -> list[_Tok]:
    """Split a cleaned answer into tokens; \\text{...} becomes one token; thousands commas are joined."""
    toks: list[_Tok] = []
    pos, space = 0, False
    while pos < len(s):
        m = _TOKEN_RE.match(s, pos)
        if m is None:
            raise _ParseError(f"unexpected character {s[pos]!r}")
        kind, text = m.lastgroup, m.group(0)
        pos = m.end()
        if kind == "space":
            space = True
            continue
        if kind == "num":
            toks.append(_Tok("num", text, space))
        elif kind == "letters":
            toks.extend(_letter_tokens(text, space))
        elif kind == "rel":
            toks.append(_Tok("rel", {"=<": "<=", "=>": ">="}.get(text, text), space))
        elif kind == "op":
            if text in "=<>":
                toks.append(_Tok("rel", text, space))
            elif text == "%":
                toks.append(_Tok("pct", "%", space))
            else:
                toks.append(_Tok("op", text, space))
        else:
            pos = _command_token(s, text[1:], pos, space, toks)
        space = False
        if len(toks) > MAX_TOKENS:
            raise _ParseError("too many tokens")
    return _join_thousands(toks)


def _command_token(s: str, name: str, pos: int, space: bool, toks: list[_Tok]) -> int:
    """Append the token(s) for the command \\name found before pos; return the new position."""
    if name in ("text", "begin", "end"):
        m = re.compile(r"\s*\{").match(s, pos)
        if m is None:
            raise _ParseError(f"\\{name} without a braced argument")
        close = _match_brace(s, m.end() - 1)
        if close is None:
            raise _ParseError(f"unbalanced braces after \\{name}")
        content = s[m.end():close].strip()
        if name != "text":
            toks.append(_Tok(name, content, space))
        elif content.lower() in ("and", "or", ","):
            toks.append(_Tok("sep", content.lower(), space))
        elif content and not re.search(r"[A-Za-z\\]", content):   # \text{(113)}: math after all
            toks.extend(_tokenize(content))
        elif content in _MULTI_FUNCS or content in _FUNCS:           # \text{lcm}(8, 12)
            toks.append(_Tok("func", content, space))
        elif content:
            toks.append(_Tok("text", content, space))
        return close + 1
    if name in _COMMANDS:
        kind, text = _COMMANDS[name]
        toks.append(_Tok(kind, text, space))
    elif name in _FUNCS or name in _MULTI_FUNCS:
        toks.append(_Tok("func", name, space))
    elif name in _GREEK:
        toks.append(_Tok("id", name, space))
    else:
        raise _ParseError(f"unsupported command \\{name}")
    return pos


def _join_thousands(toks: list[_Tok]) -> list[_Tok]:
    """At bracket depth 0, `10,080` (no space after the comma, groups of 3) is one number."""
    out: list[_Tok] = []
    merged_at = -1                      # index in out of a number already joined from groups
    depth = 0
    for t in toks:
        if t.kind == "op" and t.text in _OPENERS or t.kind in ("setl", "begin"):
            depth += 1
        elif t.kind == "op" and t.text in _CLOSERS or t.kind in ("setr", "end"):
            depth -= 1
        if (depth == 0 and t.kind == "num" and not t.space and re.fullmatch(r"\d{3}(?:\.\d+)?", t.text)
                and len(out) >= 2 and out[-1].kind == "op" and out[-1].text == "," and not out[-1].space
                and out[-2].kind == "num"
                and (merged_at == len(out) - 2 or (re.fullmatch(r"[1-9]\d{0,2}", out[-2].text)
                     and not (len(out) >= 3 and out[-3].kind == "op" and out[-3].text == ",")))):
            out[-2:] = [_Tok("num", out[-2].text + t.text, out[-2].space)]
            merged_at = len(out) - 1
            continue
        out.append(t)
    return out


# ---------------------------------------------------------------------------------------------
# Building sympy values with bounded cost. Every arithmetic step goes through these helpers, which
# estimate the size of the exact result first and build it unevaluated ("frozen") when too large.
# ---------------------------------------------------------------------------------------------
def _int_from_digits(digits: str) -> int:
    """int(digits) without tripping Python's 4300-digit str->int limit."""
    if len(digits) <= 4000:
        return int(digits)
    value = 0
    for k in range(0, len(digits), 4000):
        chunk = digits[k:k + 4000]
        value = value * 10 ** len(chunk) + int(chunk)
    return value


def _rational_digits(r) -> float:
    """log10 |p| + log10 q of a sympy Rational: the size of the exact number."""
    return (max(abs(r.p).bit_length() - 1, 0) + max(r.q.bit_length() - 1, 0)) * LOG10_2


def _num(expr, *parts: Num, frozen: bool = False, digits: float | None = None, **flags) -> Num:
    """A Num whose flags combine those of the operands it was built from."""
    if digits is None:
        digits = _rational_digits(expr) if getattr(expr, "is_Rational", False) else sum(p.digits for p in parts)
    return Num(expr, decimal=any(p.decimal for p in parts) or flags.get("decimal", False),
               literal=flags.get("literal", False), frozen=frozen or any(p.frozen for p in parts),
               percent=any(p.percent for p in parts), digits=digits)


def _literal(text: str) -> Num:
    """A number literal: 25, 025, 3.21, .5, 1.5e-3 -> an exact Rational."""
    mantissa, _, exponent = text.lower().partition("e")
    whole, _, frac = mantissa.partition(".")
    if frac:
        value = Rational(_int_from_digits(whole + frac), 10 ** len(frac))
    else:
        value = Integer(_int_from_digits(whole))
    is_decimal = bool(frac) or bool(exponent)
    num = Num(value, decimal=is_decimal, literal=is_decimal, digits=_rational_digits(value))
    if exponent:
        scale = _pow(Num(Integer(10)), Num(Integer(int(exponent))))
        num = _num(_mul(num, scale).expr, num, scale, literal=not scale.frozen, decimal=True)
    return num


def _need_num(*values) -> None:
    for v in values:
        if not isinstance(v, Num):
            raise _ParseError("arithmetic on a tuple, set, interval or equation")


def _add_all(terms: list) -> Num:
    """The sum, built once (adding term by term would rebuild the sum each time: quadratic)."""
    if len(terms) == 1:
        return terms[0]
    _need_num(*terms)
    frozen = any(t.frozen for t in terms) or sum(t.digits for t in terms) > MAX_EXACT_DIGITS
    return _num(Add(*(t.expr for t in terms), evaluate=not frozen), *terms, frozen=frozen)


def _mul_all(factors: list) -> Num:
    """The product, built once."""
    if len(factors) == 1:
        return factors[0]
    _need_num(*factors)
    frozen = any(f.frozen for f in factors) or sum(f.digits for f in factors) > MAX_EXACT_DIGITS
    return _num(Mul(*(f.expr for f in factors), evaluate=not frozen), *factors, frozen=frozen)


def _add(a: Num, b: Num) -> Num:
    return _add_all([a, b])


def _neg(a: Num) -> Num:
    _need_num(a)
    return _num(Mul(Integer(-1), a.expr, evaluate=not a.frozen), a, literal=a.literal)


def _mul(a: Num, b: Num) -> Num:
    return _mul_all([a, b])


def _reciprocal(a: Num) -> Num:
    _need_num(a)
    return _pow(a, Num(Integer(-1)))


def _div(a: Num, b: Num) -> Num:
    return _mul(a, _reciprocal(b))


def _magnitude(expr) -> float:
    """|expr| as a float for a number without variables; inf if too large or not evaluable."""
    try:
        if expr.is_Rational:
            return abs(expr.p) / expr.q
        value = _evaluate(expr, 15)
        return math.inf if value is None else float(abs(value))
    except (OverflowError, TypeError, ValueError):
        return math.inf


def _pow_digits(base, exponent) -> float:
    """Digits of the exact integers sympy would compute for base**exponent (0 if it computes none)."""
    if not exponent.is_number:
        return 0.0
    e = _magnitude(exponent)
    if e == 0:
        return 0.0
    if base.free_symbols:
        coeff = base.as_coeff_Mul()[0] if base.is_Mul else Integer(1)   # (c x)^n -> c^n x^n
        return _rational_digits(coeff) * e if coeff.is_Rational else 0.0
    if base.is_Rational:
        return _rational_digits(base) * e
    size = _magnitude(base)
    if size == 0:
        return 0.0
    return abs(math.log10(size)) * e if math.isfinite(size) else math.inf


def _pow(base: Num, exponent: Num) -> Num:
    _need_num(base, exponent)
    frozen = base.frozen or exponent.frozen
    size = 0.0
    if not frozen:
        size = _pow_digits(base.expr, exponent.expr)
        frozen = not size <= MAX_EXACT_DIGITS
        # A fractional power makes sympy factor the base to pull out perfect powers: small bases only.
        if exponent.expr.is_Rational and not exponent.expr.is_Integer and base.digits > MAX_ROOT_DIGITS:
            frozen = True
    expr = Pow(base.expr, exponent.expr, evaluate=not frozen)
    digits = _rational_digits(expr) if expr.is_Rational else min(size + base.digits + exponent.digits, 1e18)
    return _num(expr, base, exponent, frozen=frozen, digits=digits)


def _root(radicand: Num, index: Num) -> Num:
    """The index-th root; odd roots of negative numbers are real (\\sqrt[3]{-8} = -2)."""
    _need_num(radicand, index)
    x, n = radicand.expr, index.expr
    if radicand.frozen or index.frozen or not (n.is_Integer and 1 < n <= 1000):
        return _pow(radicand, _div(Num(Integer(1)), index))
    if radicand.digits > MAX_ROOT_DIGITS:                  # sympy would try to factor it
        if x.is_Rational and x >= 0:
            p, p_exact = _integer_root(x.p, int(n))
            q, q_exact = _integer_root(x.q, int(n))
            if p_exact and q_exact:
                return _num(Rational(p, q), radicand)
        return _num(Pow(x, Rational(1, n), evaluate=False), radicand, frozen=True)
    if n % 2 == 1 and x.is_number and x.is_negative:
        return _num(-root(-x, n), radicand)
    return _num(root(x, n), radicand)


def _integer_root(value: int, n: int) -> tuple[int, bool]:
    return integer_nthroot(value, n)


def _log10_factorial(n: float) -> float:
    return math.lgamma(n + 1) / math.log(10)


def _factorial(a: Num) -> Num:
    """n! evaluated for a natural number of bounded size, left symbolic for an expression with
    variables; anything else ((1/2)!, e!, huge n) is frozen: sympy would go through gamma."""
    _need_num(a)
    n = a.expr
    if not a.frozen and n.free_symbols:
        return _num(factorial(n), a)
    if not a.frozen and n.is_Integer and (n < 0 or (n <= 10**7 and _log10_factorial(float(n)) <= MAX_EXACT_DIGITS)):
        return _num(factorial(n), a)             # n < 0 gives zoo, rejected as undefined
    return _num(factorial(n, evaluate=False), a, frozen=True)


def _binomial(top: Num, bottom: Num) -> Num:
    """C(n, k) evaluated for integers of bounded size or a small natural k (a polynomial in n);
    anything else is frozen: sympy would loop k times or go through gamma."""
    _need_num(top, bottom)
    n, k = top.expr, bottom.expr
    safe = False
    if not (top.frozen or bottom.frozen) and k.is_Integer:
        if 0 <= k <= 50 and top.digits <= MAX_NUMERIC_DIGITS:
            safe = True
        elif n.is_Integer and abs(n) <= 10**7 and abs(k) <= 10**7:
            if 0 <= k <= n:
                size = _log10_factorial(float(n)) - _log10_factorial(float(k)) - _log10_factorial(float(n - k))
                safe = size <= MAX_EXACT_DIGITS
            else:                                # 0 for k > n >= 0 or k < 0; a product of k factors for n < 0
                safe = n >= 0 or k < 0 or k <= 1000
    if safe:
        return _num(binomial(n, k), top, bottom)
    return _num(binomial(n, k, evaluate=False), top, bottom, frozen=True)


def _apply(name: str, arg: Num, base: Num | None = None) -> Num:
    """A named function of one argument (log with an optional base)."""
    _need_num(arg)
    frozen = _too_big_for_function(arg) or (base is not None and _too_big_for_function(base))
    if name == "sqrt":
        return _root(arg, Num(Integer(2)))
    fn = _FUNCS[name]
    if base is not None:
        _need_num(base)
        if frozen:
            return _num(Mul(log(arg.expr, evaluate=False), Pow(log(base.expr, evaluate=False), -1,
                                                                 evaluate=False), evaluate=False),
                        arg, base, frozen=True)
        return _num(log(arg.expr, base.expr), arg, base)
    return _num(fn(arg.expr, evaluate=not frozen), arg, frozen=frozen)


def _too_big_for_function(a: Num) -> bool:
    """sympy simplifies f(x) for a non-rational number x through square roots of its parts
    (|a+bi| = sqrt(a^2+b^2)), which means factoring: only small ones are evaluated."""
    return a.frozen or a.digits > MAX_NUMERIC_DIGITS or (a.digits > MAX_ROOT_DIGITS and not a.expr.is_Rational)


def _abs(a: Num) -> Num:
    _need_num(a)
    return _num(Abs(a.expr, evaluate=not _too_big_for_function(a)), a, frozen=_too_big_for_function(a))


def _mod(a: Num, n: Num) -> Num:
    """a mod n (\\bmod, \\pmod): computed for rationals (exact, cheap), kept unevaluated for anything
    else (sympy's symbolic Mod can run for seconds in C code the deadline cannot stop)."""
    _need_num(a, n)
    exact = a.expr.is_Rational and n.expr.is_Rational and not (a.frozen or n.frozen)
    return _num(Mod(a.expr, n.expr, evaluate=exact), a, n, frozen=a.frozen or n.frozen)


MAX_DETERMINANT_SIZE = 4      # |A| by the Leibniz formula: n! products of n entries


def _determinant(rows: list[tuple]) -> Num:
    """det A = sum over permutations s of sign(s) * prod_i A[i][s(i)], built with the bounded helpers
    (a vmatrix is a determinant, a value; exact for any entries, numbers or expressions)."""
    n = len(rows)
    if len(rows[0]) != n or n > MAX_DETERMINANT_SIZE:
        raise _ParseError("determinant of a non-square or large matrix")
    terms = []
    for perm in itertools.permutations(range(n)):
        inversions = sum(perm[i] > perm[j] for i in range(n) for j in range(i + 1, n))
        product = _mul_all([rows[i][perm[i]] for i in range(n)])
        terms.append(_neg(product) if inversions % 2 else product)
    return _add_all(terms)


def _with_percent(a: Num) -> Num:
    return Num(a.expr, a.decimal, a.literal, a.frozen, True, a.digits)


# ---------------------------------------------------------------------------------------------
# Parser: recursive descent over tokens.
#   item     := relation                  (items are split at depth-0 commas, "and", "or", \cup)
#   relation := sum ((= | < | <= | ...) sum)* | sum \in set
#   sum      := term ((+ | - | \pm) term)*
#   term     := signed ((* | / ) signed | <implicit> power | <unit>)*
#   signed   := (- | + | \pm)* power
#   power    := postfix (^ script)?
#   postfix  := atom (! | % | degree)*
#   atom     := number | variable | constant | function | \frac | \sqrt | \binom | (..) | [..]
#               | {..} | \{..\} | |..| | matrix
# ---------------------------------------------------------------------------------------------
def _is_opener(t: _Tok) -> bool:
    return (t.kind == "op" and t.text in _OPENERS) or t.kind in ("setl", "begin")


def _is_closer(t: _Tok) -> bool:
    return (t.kind == "op" and t.text in _CLOSERS) or t.kind in ("setr", "end")


def _split(toks: list[_Tok], is_sep) -> list[tuple[int, int]]:
    """(lo, hi) ranges between depth-0 separators."""
    ranges, depth, lo = [], 0, 0
    for k, t in enumerate(toks):
        if _is_opener(t):
            depth += 1
        elif _is_closer(t):
            depth -= 1
            if depth < 0:
                raise _ParseError(f"unbalanced {t.text!r}")
        elif depth == 0 and is_sep(t):
            ranges.append((lo, k))
            lo = k + 1
    if depth != 0:
        raise _ParseError("unbalanced brackets")
    ranges.append((lo, len(toks)))
    return ranges


def _find_close(toks: list[_Tok], start: int) -> int:
    """Index of the token closing the opener at start; ( and [ may close with ) or ] (intervals)."""
    depth = 0
    for k in range(start, len(toks)):
        if _is_opener(toks[k]):
            depth += 1
        elif _is_closer(toks[k]):
            depth -= 1
            if depth == 0:
                return k
    raise _ParseError("unclosed bracket")


def _ends_operand(t: _Tok) -> bool:
    """Can an operand end with token t (so that a `|` after it closes an absolute value)? A `|` itself
    is decided by the caller: a closing bar ends an operand, an opening one does not."""
    return t.kind in ("num", "id", "const", "setr", "end", "pct", "deg", "word", "text") or (
        t.kind == "op" and t.text in (")", "]", "}", "!"))


def _is_item_sep(t: _Tok) -> bool:
    return t.kind == "sep" or (t.kind == "op" and t.text in ",;")


def _parse_items(toks: list[_Tok], depth: int, expand_pm: bool = False) -> list:
    """A comma/"and"-separated list. In a list of solutions (top level, a set) an item with ± becomes
    its two values; elsewhere (inside braces, a tuple) ± stays a symbol until the enclosing item."""
    values = []
    for lo, hi in _split(toks, _is_item_sep):
        if lo == hi and 0 < lo < len(toks) and toks[lo - 1].text == "," and toks[hi].kind == "sep":
            continue                                   # "1, 2, and 3": the comma before "and"
        if lo == hi:
            raise _ParseError("empty list item")
        value = _parse_union(toks[lo:hi], depth)
        values.extend(_expand_pm(value) if expand_pm else [value])
        if len(values) > MAX_ITEMS:
            raise _ParseError("too many items")
    return values


def _parse_union(toks: list[_Tok], depth: int):
    """A \\cup B \\cap C \\setminus D, left to right. Of numeric sets (intervals, finite sets of real
    numbers) the result is computed (_set_algebra); of anything else only a union is kept, as its parts."""
    ranges = _split(toks, lambda t: t.kind == "setop")
    if len(ranges) == 1:
        return _Parser(toks, depth).item()
    ops = [toks[hi].text for _, hi in ranges[:-1]]
    operands = [_as_interval(_Parser(toks[lo:hi], depth).item()) for lo, hi in ranges]
    if not all(isinstance(v, (IntervalV, SetV, UnionV)) for v in operands):
        raise _ParseError("a set operation on something that is not a set")
    computed = _set_algebra(operands, ops)
    if computed is not None:
        return computed
    if any(op != "cup" for op in ops):
        raise _ParseError("\\cap or \\setminus of sets that are not numeric")
    parts = []
    for value in operands:
        parts.extend(value.parts if isinstance(value, UnionV) else [value])
    return UnionV(tuple(parts))


# ---------------------------------------------------------------------------------------------
# Set algebra on the real line: \cup, \cap, \setminus of intervals and finite sets of numbers.
#   All endpoints of all operands are sorted once into keys k_0 < ... < k_m (with -oo and +oo). The
#   line is then the points k_j and the open gaps (k_j, k_j+1); membership of each in each operand is
#   decided from endpoint indices alone (no arithmetic on the values), the operation is applied
#   element by element, and maximal runs of members become the canonical result: disjoint intervals
#   in order, isolated points as one finite set. Two spellings of one set then compare equal:
#   [1,3) \cup [2,5] = [1,5], \mathbb{R} \setminus \{0\} = (-\infty,0) \cup (0,\infty).
# ---------------------------------------------------------------------------------------------
MAX_SET_ENDPOINT_DIGITS = 40   # endpoints are ordered at 60 digits: only numbers this small


def _set_algebra(operands: list, ops: list[str]):
    """The canonical value of operands[0] op operands[1] ... (left to right), or None if an end is
    not a real number of bounded size (the caller then keeps the structure)."""
    pieces = [_pieces(v) for v in operands]
    if any(p is None for p in pieces):
        return None
    keys, key_of = _sorted_keys([num for p in pieces for lo, hi in p for num in (lo[0], hi[0])])
    if keys is None:
        return None
    members = []
    for p in pieces:
        indexed = [(key_of[id(lo)], lo_closed, key_of[id(hi)], hi_closed) for (lo, lo_closed), (hi, hi_closed) in p]
        if any(i_lo > i_hi for i_lo, _, i_hi, _ in indexed):
            return None                               # (5, 1): not an interval
        members.append(_membership(indexed, len(keys)))
    result = members[0]
    for op, other in zip(ops, members[1:]):
        if op == "cup":
            result = [a or b for a, b in zip(result, other)]
        elif op == "cap":
            result = [a and b for a, b in zip(result, other)]
        else:
            result = [a and not b for a, b in zip(result, other)]
    return _canonical_set(result, keys)


def _pieces(value) -> list[tuple] | None:
    """value as ((lo, closed), (hi, closed)) pairs of Num ends; a point a is ((a, True), (a, True));
    None when an end is not a real number of bounded size."""
    parts = value.parts if isinstance(value, UnionV) else (value,)
    pieces = []
    for part in parts:
        if isinstance(part, IntervalV):
            pieces.append(((part.lo, not part.lo_open), (part.hi, not part.hi_open)))
        else:
            pieces.extend(((v, True), (v, True)) for v in part.items)
    for (lo, _), (hi, _) in pieces:
        for num in (lo, hi):
            if (not isinstance(num, Num) or num.frozen or num.digits > MAX_SET_ENDPOINT_DIGITS
                    or num.expr.free_symbols):
                return None
    return pieces


def _sorted_keys(nums: list[Num]) -> tuple[list | None, dict]:
    """(keys, key_of): the distinct values of nums in increasing order, as (value, a Num with it),
    starting at -oo and ending at +oo; key_of maps id(num) to its key's index. (None, {}) if a value
    is not real. Values within 10^-40 (relative) are one key: ordered at 60 digits, bounded numbers
    that close are equal (sqrt 8 and 2 sqrt 2)."""
    ctx = _mp()
    values = {}
    for num in nums:
        if num.expr in (oo, -oo):
            values[id(num)] = ctx.inf if num.expr == oo else -ctx.inf
            continue
        value = _evaluate(num.expr, 60)
        if value is None or value.imag != 0:
            return None, {}
        values[id(num)] = value.real
    by_id = {id(num): num for num in nums}
    keys, key_of = [(-ctx.inf, Num(-oo))], {}
    for ident in sorted(by_id, key=values.__getitem__):
        v, last = values[ident], keys[-1][0]
        same = v == last or (ctx.isfinite(v) and ctx.isfinite(last)
                             and abs(v - last) <= ctx.mpf(10) ** -40 * max(1, abs(v)))
        if not same:
            keys.append((v, by_id[ident]))
        key_of[ident] = len(keys) - 1
    if ctx.isfinite(keys[-1][0]):
        keys.append((ctx.inf, Num(oo)))
    return keys, key_of


def _membership(indexed: list[tuple], n_keys: int) -> list[bool]:
    """Membership of the line's elements, in order: point 0, gap (0, 1), point 1, ..., point n-1
    (element 2j is the point k_j, element 2j+1 the gap (k_j, k_j+1)); the points +-oo are never in."""
    inside = [False] * (2 * n_keys - 1)
    for i_lo, lo_closed, i_hi, hi_closed in indexed:
        for element in range(2 * i_lo + (0 if lo_closed else 1), 2 * i_hi + (1 if hi_closed else 0)):
            inside[element] = True
    inside[0] = inside[-1] = False
    return inside


def _canonical_set(inside: list[bool], keys: list):
    """Maximal runs of members as disjoint intervals in order, isolated points as one finite set:
    an IntervalV, a SetV, or a UnionV of both kinds."""
    intervals, points, element = [], [], 0
    while element < len(inside):
        if not inside[element]:
            element += 1
            continue
        start = element
        while element < len(inside) and inside[element]:
            element += 1
        last = element - 1
        if start == last and start % 2 == 0:
            points.append(keys[start // 2][1])
            continue
        lo, hi = keys[start // 2][1], keys[(last + 1) // 2][1]
        intervals.append(IntervalV(lo, hi, start % 2 == 1, last % 2 == 1))
    parts = intervals + ([SetV(tuple(points))] if points else [])
    if len(parts) == 1:
        return parts[0]
    return UnionV(tuple(parts)) if parts else SetV(())


def _as_interval(value):
    """A pair (a, b) read as the open interval it may denote."""
    if isinstance(value, TupleV) and len(value.items) == 2 and all(isinstance(v, Num) for v in value.items):
        return IntervalV(value.items[0], value.items[1], True, True)
    return value


def _expand_pm(value) -> list:
    """a ± b -> [a + b, a - b] (the same sign everywhere in the item)."""
    if isinstance(value, Num) and not value.frozen and _PM in value.expr.free_symbols:
        return [_num(value.expr.xreplace({_PM: s}), value) for s in (Integer(1), Integer(-1))]
    if (isinstance(value, EquationV) and not (value.lhs.frozen or value.rhs.frozen)
            and _PM in (value.lhs.expr.free_symbols | value.rhs.expr.free_symbols)):
        return [EquationV(_num(value.lhs.expr.xreplace({_PM: s}), value.lhs),
                          _num(value.rhs.expr.xreplace({_PM: s}), value.rhs)) for s in (Integer(1), Integer(-1))]
    return [value]


class _Parser:
    """Parses one item (no depth-0 commas) from its tokens."""

    def __init__(self, toks: list[_Tok], depth: int):
        self.toks = list(toks)
        self.i = 0
        self.depth = depth
        self.level = 0            # atoms currently being parsed (recursion below this item)

    # ---- token access
    def peek(self) -> _Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def at(self, kind: str, text: str | None = None) -> bool:
        t = self.peek()
        return t is not None and t.kind == kind and (text is None or t.text == text)

    def take(self) -> _Tok:
        t = self.peek()
        if t is None:
            raise _ParseError("unexpected end of answer")
        self.i += 1
        return t

    def sub_items(self, lo: int, hi: int, expand_pm: bool = False) -> list:
        return _parse_items(self.toks[lo:hi], self.depth + self.level + 1, expand_pm)

    # ---- grammar
    def item(self):
        value = self.relation()
        if self.i < len(self.toks):
            raise _ParseError(f"unexpected {self.toks[self.i].text!r}")
        return value

    def relation(self):
        start = self.i
        first = self.sum()
        if self.at("in"):                          # x \in S: the answer is S
            self.take()
            return self.sum()
        label = self.is_call(start, self.i)        # f(x) = ...
        terms, ops = [first], []
        while self.at("rel"):
            op = self.take().text
            if op == "~" and (ops or not _lone_symbol(first)):   # a = b \approx 1.23: drop the rest
                self.i = len(self.toks)
                break
            op = "=" if op == "~" else op            # x \approx 1.23 is all there is
            ops.append(op)
            terms.append(self.sum())
        return _relation_value(terms, ops, label) if ops else first

    def is_call(self, lo: int, hi: int) -> bool:
        """Tokens lo..hi are exactly `f(...)`: a single-letter name applied to an argument."""
        return (hi - lo >= 3 and self.toks[lo].kind == "id" and self.toks[lo + 1].kind == "op"
                and self.toks[lo + 1].text == "(" and not self.toks[lo + 1].space
                and _find_close(self.toks, lo + 1) == hi - 1)

    def sum(self):
        terms = [self.term()]
        while True:
            if self.at("op", "+"):
                self.take()
                terms.append(self.term())
            elif self.at("op", "-"):
                self.take()
                terms.append(_neg(self.term()))
            elif self.at("pm"):
                sign = self.take().text
                signed = _mul(Num(_PM), self.term())
                terms.append(signed if sign == "+-" else _neg(signed))
            else:
                return _add_all(terms)

    def term(self):
        factors = [self.signed()]
        while True:
            t = self.peek()
            if t is None:
                break
            if t.kind == "op" and t.text in ("*", "/", "mod"):
                self.take()
                rhs = self.signed()
                if t.text == "mod":                # a b \bmod c = (a b) mod c, like a product
                    factors = [_mod(_mul_all(factors), rhs)]
                else:
                    factors.append(rhs if t.text == "*" else _reciprocal(rhs))
            elif (modulus := self.modulus()) is not None:
                factors = [_mod(_mul_all(factors), modulus)]
            elif t.kind == "text" or (t.kind == "word" and t.text.lower() in _UNIT_WORDS):
                self.take()                        # a unit or annotation: dropped
                if self.at("op", "^"):
                    self.take()
                    self.script()
            elif self.starts_atom(t):
                factors.append(self.power())
            else:
                break
        return _mul_all(factors)

    def modulus(self) -> Num | None:
        """After a value: `\\pmod{n}` or `(\\bmod n)` is taken and gives n; otherwise None."""
        if self.at("cmd", "pmod"):
            self.take()
            return self.argument()
        after = self.toks[self.i + 1] if self.i + 1 < len(self.toks) else None
        if not (self.at("op", "(") and after is not None and after.kind == "op" and after.text == "mod"):
            return None
        close = _find_close(self.toks, self.i)
        items = self.sub_items(self.i + 2, close)
        self.i = close + 1
        if len(items) != 1:
            raise _ParseError("bad modulus")
        return items[0]

    def starts_atom(self, t: _Tok) -> bool:
        if t.kind in ("num", "id", "const", "func", "cmd", "setl", "begin", "word"):
            return True
        return t.kind == "op" and t.text in "([{|"         # "|" : |a||b|, 2|x|: a product

    def signed(self):
        negate, pm = False, None
        while True:
            if self.at("op", "-"):
                negate = not negate
            elif self.at("op", "+"):
                pass
            elif self.at("pm") and pm is None:
                pm = self.peek().text
            else:
                break
            self.take()
        value = self.power()
        if pm is not None:
            value = _mul(Num(_PM), value)
        return _neg(value) if negate else value

    def power(self):
        value = self.postfix()
        if self.at("op", "^"):
            self.take()
            value = _pow(value, self.script())
            if self.at("op", "^"):
                raise _ParseError("double superscript")
            value = self.postfix_ops(value)
        return value

    def postfix(self):
        return self.postfix_ops(self.atom())

    def postfix_ops(self, value):
        while True:
            if self.at("op", "!"):
                self.take()
                value = _factorial(value)
            elif self.at("pct"):
                self.take()
                _need_num(value)
                value = _with_percent(value)
            elif self.at("deg"):
                self.take()
            else:
                return value

    def atom(self):
        self.level += 1
        if self.depth + self.level > MAX_NESTING:
            raise _ParseError("nested too deeply")
        try:
            return self._atom()
        finally:
            self.level -= 1

    def _atom(self):
        t = self.take()
        if t.kind == "num":
            return self.number(t)
        if t.kind == "id":
            return self.variable(t.text)
        if t.kind == "const":
            return {"pi": lambda: Num(pi), "oo": lambda: Num(oo), "empty": lambda: SetV(()),
                    "reals": lambda: IntervalV(Num(-oo), Num(oo), True, True)}[t.text]()
        if t.kind == "func":
            return self.function(t.text)
        if t.kind == "cmd" and t.text in ("sum", "prod", "lim"):
            return self.big_operator(t.text)
        if t.kind == "cmd" and t.text == "int":
            return self.integral()
        if t.kind == "cmd" and t.text == "det":
            return self.determinant()
        if t.kind == "cmd":
            if t.text == "frac":
                return _div(self.argument(), self.argument())
            if t.text == "binom":
                return _binomial(self.argument(), self.argument())
            index = Num(Integer(2))
            if self.at("op", "["):                 # \sqrt[3]{x}
                close = _find_close(self.toks, self.i)
                items = self.sub_items(self.i + 1, close)
                self.i = close + 1
                if len(items) != 1:
                    raise _ParseError("bad root index")
                index = items[0]
            return _root(self.argument(), index)
        if t.kind == "op" and t.text in "([":
            return self.bracket()
        if t.kind == "op" and t.text == "{":
            return self.group(set_allowed=True)
        if t.kind == "setl":
            close = _find_close(self.toks, self.i - 1)
            items = self.sub_items(self.i, close, expand_pm=True) if close > self.i else []
            self.i = close + 1
            return SetV(tuple(items))
        if t.kind == "op" and t.text == "|":
            return self.absolute()
        if t.kind == "begin":
            return self.matrix(t.text)
        if t.kind == "word" and t.text.lower() not in _UNIT_WORDS:
            value = Num(Integer(1))                # an unknown word: a product of variables
            for c in t.text:
                value = _mul(value, self.variable(c))
            return value
        raise _ParseError(f"unexpected {t.text!r}")

    def number(self, t: _Tok) -> Num:
        if self.at("op", "_"):                     # 52_8: a numeral in base 8
            self.take()
            base = self.script()
            if not (base.expr.is_Integer and 2 <= base.expr <= 36) or "." in t.text:
                raise _ParseError("bad number base")
            try:
                return Num(Integer(int(t.text, int(base.expr))))
            except ValueError:
                raise _ParseError("digit out of range for its base") from None
        value = _literal(t.text)
        if t.text.isdigit() and self.at("cmd", "frac"):
            mixed = self.mixed_fraction(value)
            if mixed is not None:
                return mixed
        return value

    def mixed_fraction(self, whole: Num) -> Num | None:
        """2\\frac{1}{2} = 5/2: an integer followed by a proper fraction of integer literals."""
        saved_i, saved = self.i, list(self.toks)
        try:
            self.take()
            parts = []
            for _ in range(2):
                t = self.peek()
                if t is not None and t.kind == "op" and t.text == "{":
                    close = _find_close(self.toks, self.i)
                    inner = self.toks[self.i + 1:close]
                    if len(inner) != 1 or inner[0].kind != "num" or not inner[0].text.isdigit():
                        raise _ParseError("not a mixed number")
                    parts.append(int(inner[0].text))
                    self.i = close + 1
                elif t is not None and t.kind == "num" and t.text.isdigit():
                    parts.append(self.argument().expr)
                else:
                    raise _ParseError("not a mixed number")
            numerator, denominator = (int(p) for p in parts)
            if not 0 < numerator < denominator:
                raise _ParseError("not a proper fraction")
            return _add(whole, Num(Rational(numerator, denominator)))
        except _ParseError:
            self.i, self.toks = saved_i, saved
            return None

    def variable(self, name: str) -> Num:
        if self.at("op", "_"):                     # x_1, a_{n}
            self.take()
            t = self.peek()
            if t is not None and t.kind == "op" and t.text == "{":
                close = _find_close(self.toks, self.i)
                sub = "".join(x.text for x in self.toks[self.i + 1:close])
                self.i = close + 1
            elif t is not None and t.kind in ("num", "id"):
                sub = self.take().text
                if t.kind == "num" and len(sub) > 1:   # x_12 is x_1 times 2 in LaTeX; keep it simple
                    self.i -= 1
                    self.toks[self.i] = _Tok("num", sub[1:])
                    sub = sub[0]
            else:
                raise _ParseError("bad subscript")
            return Num(Symbol(f"{name}_{sub}"))
        if name == "e":
            return Num(E)
        if name == "i":
            return Num(I)
        return Num(Symbol(name))

    def argument(self):
        """A command argument: {group} or a single character (\\frac12, \\sqrt2)."""
        t = self.peek()
        if t is None:
            raise _ParseError("missing argument")
        if t.kind == "num" and len(t.text) > 1 and t.text[0].isdigit():
            self.toks[self.i] = _Tok("num", t.text[1:])
            return _literal(t.text[0])
        if t.kind == "num":
            self.take()
            return _literal(t.text)
        if t.kind == "op" and t.text == "{":
            self.take()
            return self.group()
        if t.kind in ("num", "id", "const", "cmd", "func") or (t.kind == "op" and t.text == "("):
            return self.power() if t.kind == "func" else self.atom()
        raise _ParseError(f"bad argument {t.text!r}")

    def script(self):
        """What follows ^ or _: an argument, optionally signed (x^-1)."""
        if self.at("op", "-"):
            self.take()
            return _neg(self.argument())
        if self.at("op", "+"):
            self.take()
        return self.argument()

    def group(self, set_allowed: bool = False):
        """After `{`: the braced content, a single item; where a value may stand (not a command's
        argument), `{-2021, 2021}` is the set \\{-2021, 2021\\} written without backslashes."""
        close = _find_close(self.toks, self.i - 1)
        items = self.sub_items(self.i, close)
        self.i = close + 1
        if len(items) == 1:
            return items[0]
        if not set_allowed:
            raise _ParseError("a list inside braces")
        return SetV(tuple(v for item in items for v in _expand_pm(item)))

    def big_operator(self, name: str) -> Num:
        """\\sum_{k=a}^{b} f, \\prod_{k=a}^{b} f, \\lim_{x \\to a} f, where f is the term that follows.
        A sum or product over a range of integers is computed (_series); over a symbolic or huge range
        it stays unevaluated (sympy's inert Sum, Product) and compares structurally: reordered factors
        or terms in f still match, a different f or bound does not. A limit is an inert Limit whose
        value numeric comparison approaches (_mp_limit): a bare limit equals its value."""
        if not (self.at("op", "_") and self.i + 1 < len(self.toks) and self.toks[self.i + 1].text == "{"):
            raise _ParseError(f"\\{name} without a braced subscript")
        close = _find_close(self.toks, self.i + 1)
        inner = self.toks[self.i + 2:close]
        self.i = close + 1
        relation = "->" if name == "lim" else "="
        if len(inner) < 3 or inner[0].kind != "id" or inner[1].kind != "rel" or inner[1].text != relation:
            raise _ParseError(f"bad \\{name} subscript")
        point, direction = inner[2:], "+-"
        if name == "lim" and len(point) > 2 and point[-2].text == "^" and point[-1].text in ("+", "-"):
            point, direction = point[:-2], point[-1].text          # one-sided: x \to 0^+
        start = self.single(point)
        end = None
        if name != "lim":
            if not self.at("op", "^"):
                raise _ParseError(f"\\{name} without an upper bound")
            self.take()
            end = self.script()
        body_start = self.i
        body = self.term()
        parts = [p for p in (body, start, end) if p is not None]
        _need_num(*parts)
        var = Symbol(inner[0].text)
        if name == "lim":
            return _num(Limit(body.expr, var, start.expr, direction), *parts)
        value = _series(name, inner[0].text, self.toks[body_start:self.i], start, end, self.depth + self.level + 1)
        if value is not None:
            return value
        expr = (Sum if name == "sum" else Product)(body.expr, (var, start.expr, end.expr))
        return _num(expr, *parts)

    def integral(self) -> Num:
        """\\int_a^b f \\, dx (bounds in either order; \\mathrm{d}x too): sympy's inert Integral, whose
        value numeric comparison computes by quadrature (_mp_integral). An indefinite integral is text."""
        bounds = {}
        while self.at("op", "_") or self.at("op", "^"):
            side = self.take().text
            if side in bounds:
                raise _ParseError("double bound on \\int")
            bounds[side] = self.script()
        if len(bounds) != 2:
            raise _ParseError("an indefinite integral")
        depth = 0
        for k in range(self.i, len(self.toks) - 1):
            t, after = self.toks[k], self.toks[k + 1]
            depth += _is_opener(t) - _is_closer(t)
            if depth == 0 and t.kind == "id" and t.text == "d" and after.kind == "id" and k > self.i:
                body = self.single(self.toks[self.i:k])
                self.i = k + 2
                _need_num(body, bounds["_"], bounds["^"])
                integral = Integral(body.expr, (Symbol(after.text), bounds["_"].expr, bounds["^"].expr))
                return _num(integral, body, bounds["_"], bounds["^"])
        raise _ParseError("\\int without a differential dx")

    def determinant(self) -> Num:
        """\\det M for a matrix M (a pmatrix, a bracketed matrix ...): its value, as for a vmatrix."""
        value = self.atom()
        if not isinstance(value, MatrixV):
            raise _ParseError("\\det of something that is not a matrix")
        return _determinant(list(value.rows))

    def single(self, toks: list[_Tok]):
        items = _parse_items(toks, self.depth + self.level + 1)
        if len(items) != 1:
            raise _ParseError("a list where one value belongs")
        return items[0]

    def bracket(self):
        """After `(` or `[`: grouping, a tuple, or an interval, by the closer and the item count."""
        opener = self.toks[self.i - 1].text
        close = _find_close(self.toks, self.i - 1)
        closer = self.toks[close].text
        if closer not in ")]":
            raise _ParseError("mismatched brackets")
        items = self.sub_items(self.i, close)
        self.i = close + 1
        if len(items) == 1 and opener + closer in ("()", "[]"):
            return items[0]
        if len(items) == 2 and opener + closer != "()":
            _need_num(*items)
            return IntervalV(items[0], items[1], opener == "(", closer == ")")
        if opener + closer in ("()", "[]"):
            return TupleV(tuple(items))
        raise _ParseError("bad interval")

    def absolute(self) -> Num:
        """After `|`: |x|, up to its closing `|`. A bar closes when it follows something that ends an
        operand (a number, a variable, a closer, a closed bar, x!); otherwise it opens an inner |..|:
        ||x| - 1| and |2 - |x|| nest, |a||b| is two adjacent values."""
        depth, bars, closed_bar = 0, 0, -1          # closed_bar: index of the last closing `|`
        for k in range(self.i, len(self.toks)):
            t = self.toks[k]
            if _is_opener(t):
                depth += 1
            elif _is_closer(t):
                depth -= 1
            elif depth == 0 and t.kind == "op" and t.text == "|":
                before = self.toks[k - 1]
                if k > self.i and (closed_bar == k - 1 if before.text == "|" else _ends_operand(before)):
                    closed_bar = k
                    if bars == 0:
                        items = self.sub_items(self.i, k)
                        self.i = k + 1
                        if len(items) != 1:
                            raise _ParseError("a list inside |...|")
                        if isinstance(items[0], MatrixV):       # |A|: the determinant
                            return _determinant(list(items[0].rows))
                        return _abs(items[0])
                    bars -= 1
                else:
                    bars += 1
        raise _ParseError("unclosed |")

    def matrix(self, env: str) -> MatrixV:
        if env not in ("pmatrix", "bmatrix", "Bmatrix", "vmatrix", "Vmatrix", "matrix", "smallmatrix", "array"):
            raise _ParseError(f"unsupported environment {env}")
        close = _find_close(self.toks, self.i - 1)
        body = self.toks[self.i:close]
        self.i = close + 1
        if env == "array" and body and body[0].kind == "op" and body[0].text == "{":
            body = body[_find_close(body, 0) + 1:]          # drop the column spec {cc}
        rows = []
        for lo, hi in _split(body, lambda t: t.kind == "op" and t.text == "\\\\"):
            if lo == hi and rows:
                continue                                      # trailing \\
            cells = []
            for clo, chi in _split(body[lo:hi], lambda t: t.kind == "op" and t.text == "&"):
                items = _parse_items(body[lo:hi][clo:chi], self.depth + self.level + 1)
                if len(items) != 1 or not isinstance(items[0], Num):
                    raise _ParseError("bad matrix entry")
                cells.append(items[0])
            rows.append(tuple(cells))
        if not rows or len({len(r) for r in rows}) != 1 or len(rows) * len(rows[0]) > MAX_ITEMS:
            raise _ParseError("ragged or oversized matrix")
        return _determinant(rows) if env == "vmatrix" else MatrixV(tuple(rows))

    def multi_function(self, name: str) -> Num:
        """\\gcd(a, b), \\max(a, b, c), ...: a parenthesised argument list."""
        if not self.at("op", "("):
            raise _ParseError(f"{name} without an argument list")
        self.take()
        close = _find_close(self.toks, self.i - 1)
        args = self.sub_items(self.i, close)
        self.i = close + 1
        return _multi_function(name, args)

    def function(self, name: str) -> Num:
        """\\sin x, \\sin(x), \\sin^2 x, \\sin^{-1} x, \\log_2 8, \\ln x; \\sin 30^\\circ in degrees."""
        if name in _MULTI_FUNCS:
            return self.multi_function(name)
        power = base = None
        if self.at("op", "^"):
            self.take()
            power = self.script()
        if name in ("log", "lg") and self.at("op", "_"):
            self.take()
            base = self.script()
        elif name == "lg":
            base = Num(Integer(10))
        start = self.i
        if self.at("op", "("):
            self.take()
            arg = self.bracket()
        else:                                      # \sin 2x: juxtaposed factors
            arg = self.power()
            while (t := self.peek()) is not None and t.kind in ("num", "id", "const"):
                arg = _mul(arg, self.power())
        if name in _TRIG and any(t.kind == "deg" for t in self.toks[start:self.i]):   # sin 30° = sin(π/6)
            arg = _mul(arg, _div(Num(pi), Num(Integer(180))))
        if power is not None and power.expr == -1:
            if name not in _INVERSE:
                raise _ParseError(f"\\{name}^{{-1}} is ambiguous")
            return _apply(_INVERSE[name], arg)
        value = _apply(name, arg, base)
        return _pow(value, power) if power is not None else value


MAX_SERIES_TERMS = 1_000      # \sum / \prod over a longer range of integers stay unevaluated
MAX_SERIES_WORK = 5_000       # body tokens re-parsed per answer, all sums (nested ones too) together


def _series(name: str, index: str, body: list[_Tok], start: Num, end: Num, depth: int) -> Num | None:
    """\\sum_{k=a}^{b} f or \\prod_{k=a}^{b} f for integers a, b: the body's tokens are parsed again for
    each k with k written in (so every term is built by the bounded helpers: k^{k^k} is frozen, never
    computed), and the terms are added or multiplied exactly. None (keep it inert) for a symbolic
    bound, more than MAX_SERIES_TERMS terms, or once this answer's MAX_SERIES_WORK is spent."""
    a, b = start.expr, end.expr
    if start.frozen or end.frozen or not (a.is_Integer and b.is_Integer) or b - a + 1 > MAX_SERIES_TERMS:
        return None
    work = (int(b - a) + 1) * len(body) if b >= a else 0
    if work > getattr(_state, "series_work", 0):
        return None
    _state.series_work -= work
    terms = []
    for k in range(int(a), int(b) + 1):
        written = [_Tok("op", "{"), *([_Tok("op", "-")] if k < 0 else []), _Tok("num", str(abs(k))), _Tok("op", "}")]
        toks = [x for t in body for x in (written if t.kind == "id" and t.text == index else [t])]   # k -> {3}
        parser = _Parser(toks, depth)
        terms.append(parser.term())
        if parser.i != len(toks):
            raise _ParseError("a sum's body did not parse again")
    if name == "sum":
        return _add_all(terms) if terms else Num(Integer(0))
    return _mul_all(terms) if terms else Num(Integer(1))


def _multi_function(name: str, args: list) -> Num:
    """gcd / lcm of integers, max / min of real numbers; anything else (a variable, a frozen giant) is
    left to the string comparison: sympy's symbolic forms of these are slow and rarely the answer."""
    _need_num(*args)
    if any(a.frozen or a.digits > MAX_NUMERIC_DIGITS or a.expr.free_symbols for a in args):
        raise _ParseError(f"{name} of non-numbers")
    if name in ("gcd", "lcm"):
        if not all(a.expr.is_Integer for a in args):
            raise _ParseError(f"{name} of non-integers")
        value = (math.gcd if name == "gcd" else math.lcm)(*(int(a.expr) for a in args))
        return _num(Integer(value), *args)
    if not all(a.expr.is_extended_real for a in args):
        raise _ParseError(f"{name} of non-real numbers")
    return _num((Max if name == "max" else Min)(*(a.expr for a in args)), *args)


def _lone_symbol(v) -> bool:
    return isinstance(v, Num) and isinstance(v.expr, Symbol) and v.expr != _PM


def _relation_value(terms: list, ops: list[str], lhs_label: bool = False):
    """a = b (= c): an equation of the first and last sides, except that a tuple of names on the left
    only labels the value: (p, q) = (3, 2) is the tuple (3, 2). Inequalities in one variable become
    intervals, whatever linear form the variable takes (x > a, a < x <= b, -x > -1, 3 - 2x <= 5);
    other inequalities stay relations."""
    if all(op == "=" for op in ops) and _is_label_tuple(terms[0]):
        return terms[-1]
    _need_num(*terms)
    if all(op == "=" for op in ops):
        return EquationV(terms[0], terms[-1], lhs_label)
    if "=" in ops or "!=" in ops and len(ops) > 1:
        raise _ParseError("mixed relation chain")
    if len(ops) == 1 and ops[0] == "!=":
        return RelationV("!=", terms[0], terms[1])
    if ops[0] in (">", ">="):                      # write every chain increasing
        terms, ops = terms[::-1], [{">": "<", ">=": "<="}.get(op, op) for op in ops[::-1]]
    if any(op not in ("<", "<=") for op in ops):
        raise _ParseError("inconsistent inequality chain")
    opens = [op == "<" for op in ops]
    if len(ops) == 2:
        interval = _solved_interval(terms[0], terms[1], terms[2], *opens)
        if interval is None:
            raise _ParseError("unsupported inequality chain")
        return interval
    lhs, rhs = terms
    if not rhs.expr.free_symbols:                  # f(x) < c
        interval = _solved_interval(Num(-oo), lhs, rhs, True, opens[0])
    elif not lhs.expr.free_symbols:                # c < f(x)
        interval = _solved_interval(lhs, rhs, Num(oo), opens[0], True)
    else:                                          # f(x) < g(x): f - g < 0
        interval = _solved_interval(Num(-oo), _add(lhs, _neg(rhs)), Num(Integer(0)), True, opens[0])
    return interval if interval is not None else RelationV(ops[0], lhs, rhs)


def _is_label_tuple(value) -> bool:
    return isinstance(value, TupleV) and all(_lone_symbol(v) for v in value.items)


def _solved_interval(lo: Num, middle: Num, hi: Num, lo_open: bool, hi_open: bool) -> IntervalV | None:
    """The x with lo < a x + b < hi (each < possibly <=), when middle = a x + b is linear in its one
    variable x and lo, hi are numbers: ((lo - b)/a, (hi - b)/a), ends swapped when a < 0."""
    if lo.frozen or hi.frozen or lo.expr.free_symbols or hi.expr.free_symbols:
        return None
    linear = _linear_form(middle)
    if linear is None:
        return None
    a, b = linear
    left, right = _num((lo.expr - b) / a, lo, middle), _num((hi.expr - b) / a, hi, middle)
    if a < 0:
        return IntervalV(right, left, hi_open, lo_open)
    return IntervalV(left, right, lo_open, hi_open)


def _linear_form(m: Num) -> tuple | None:
    """(a, b), rationals with a != 0, when m = a x + b for the one variable x of m; else None."""
    symbols = m.expr.free_symbols
    if m.frozen or len(symbols) != 1 or _PM in symbols:
        return None
    (x,) = symbols
    if m.expr == x:
        return Integer(1), Integer(0)
    size = _poly_terms(m.expr)
    if size is None or size > MAX_POLY_TERMS:
        return None
    e = expand(m.expr)
    a, b = e.coeff(x, 1), e.coeff(x, 0)
    if not (a.is_Rational and b.is_Rational) or a == 0 or expand(e - a * x - b) != 0:
        return None
    return a, b


# ---------------------------------------------------------------------------------------------
# Whole answers: special forms first (choice letter, base-b numeral, text), then the parser.
# ---------------------------------------------------------------------------------------------
_TEXT_WRAP_RE = re.compile(r"\\text\s*\{([^{}]*)\}")
_CHOICE_RE = re.compile(r"\(\s*([A-Za-z])\s*\)(?:\s.*)?")
_BASED_RE = re.compile(r"([0-9A-Za-z]+)\s*_(?:\s*\{)?\s*(\d+)(?:\s*\})?")
_TEXT_RE = re.compile(r"[A-Za-z][A-Za-z\s'\-]*")
_INT_RE = re.compile(r"[-+]?\d+")


def _unwrap_text(s: str) -> str:
    return _TEXT_WRAP_RE.sub(lambda m: m.group(1), s).strip()


def _special_form(s: str):
    """A choice letter, a base-b numeral or a text answer, or None for everything else."""
    plain = _unwrap_text(s).rstrip(".,;: ")
    if m := _CHOICE_RE.fullmatch(plain):
        return ChoiceV(m.group(1).upper())
    if plain != s and len(plain) == 1 and plain.isalpha():   # \text{C}
        return ChoiceV(plain.upper())
    if m := _BASED_RE.fullmatch(plain):
        digits, base = m.group(1).upper().lstrip("0") or "0", int(m.group(2))
        if 2 <= base <= 36 and re.search(r"\d", digits) and all(int(c, 36) < base for c in digits):
            return BasedV(digits, base)
    if plain.lower() in ("yes", "no"):                       # two letters, yet a word, not n times o
        return TextV(plain.lower())
    if _TEXT_RE.fullmatch(plain) and any(w.lower() not in _MATH_WORDS for w in _PROSE_RE.findall(plain)):
        return TextV(" ".join(plain.lower().replace("-", " ").split()))
    return None


@_cached
def _parse(s: str):
    """The value of a cleaned answer, or None when it is outside the supported subset."""
    if not s or len(s) > MAX_ANSWER_CHARS:
        return None
    _state.series_work = MAX_SERIES_WORK
    try:
        special = _special_form(s)
        if special is not None:
            return special
        toks = _tokenize(s)
        values = _solution_groups(toks) or _parse_items(toks, 0, expand_pm=True)
        for v in values:
            _check_defined(v)
        return values[0] if len(values) == 1 else ListV(tuple(values))
    except Exception:                            # _ParseError, or sympy refusing an odd construct
        return None


def _solution_groups(toks: list[_Tok]) -> list | None:
    """p=3, q=2; p=5, q=2: semicolons between groups of labelled values (every item `name = value`) separate
    solutions, each a tuple. None for any other answer (a semicolon is then a comma)."""
    ranges = _split(toks, lambda t: t.kind == "op" and t.text == ";")
    if len(ranges) < 2:
        return None
    try:
        groups = [_parse_items(toks[lo:hi], 0) for lo, hi in ranges]
    except _ParseError:
        return None
    if all(len(g) >= 2 and all(isinstance(v, EquationV) and _lone_symbol(v.lhs) for v in g) for g in groups):
        return [TupleV(tuple(g)) for g in groups]
    return None


def _check_defined(value) -> None:
    """Reject 1/0 and the like (sympy's zoo / nan)."""
    for num in _scalars(value):
        if not num.frozen and num.expr.has(zoo, nan):
            raise _ParseError("undefined value")


def _scalars(value):
    if isinstance(value, Num):
        yield value
    elif isinstance(value, (TupleV, ListV, SetV)):
        for v in value.items:
            yield from _scalars(v)
    elif isinstance(value, UnionV):
        for v in value.parts:
            yield from _scalars(v)
    elif isinstance(value, MatrixV):
        for row in value.rows:
            yield from row
    elif isinstance(value, (IntervalV,)):
        yield value.lo
        yield value.hi
    elif isinstance(value, (EquationV, RelationV)):
        yield value.lhs
        yield value.rhs


# ---------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------
def _equal(a, b) -> bool:
    """Are two parsed values the same answer? (policy: module docstring)"""
    if a == b:
        return True
    for x, y in ((a, b), (b, a)):
        verdict = _compare_directed(x, y)
        if verdict is not None:
            return verdict
    return False


def _compare_directed(a, b) -> bool | None:
    """The rule for the pair (type(a), type(b)) in this order, or None if there is none."""
    if isinstance(a, EquationV) and not isinstance(b, EquationV):
        side = _assigned_value(a)                # x = 5 stands for 5
        return side is not None and _equal(side, b)
    if isinstance(a, Num) and isinstance(b, Num):
        return _num_equal(a, b)
    if isinstance(a, EquationV) and isinstance(b, EquationV):
        return _equation_equal(a, b)
    if isinstance(a, RelationV) and isinstance(b, RelationV):
        return a.op == b.op and _proportional(_difference(a), _difference(b), positive=a.op != "!=")
    if isinstance(a, TextV) and isinstance(b, TextV):
        return a.text == b.text
    if isinstance(b, ChoiceV):                   # (C) vs (C), \text{C}, or a bare C
        if isinstance(a, ChoiceV):
            return a.letter == b.letter
        letter = a.text if isinstance(a, TextV) else str(a.expr) if _lone_symbol(a) else ""
        return letter.upper() == b.letter
    if isinstance(b, BasedV):                    # 52_8 vs 52_{8}, or 52 (the subscript dropped)
        if isinstance(a, BasedV):
            return a.base == b.base and a.digits == b.digits
        return (isinstance(a, Num) and a.expr.is_Integer and b.digits.isdigit()
                and a.expr == Integer(_int_from_digits(b.digits)))
    if isinstance(a, (ListV, SetV)) and isinstance(b, (ListV, SetV)):
        return _unordered_equal(a.items, b.items)
    if isinstance(a, (TupleV, ListV)) and isinstance(b, TupleV):
        return _ordered_equal(a.items, b.items)
    if isinstance(a, IntervalV) and isinstance(b, TupleV):
        return _equal(a, _as_interval(b))
    if isinstance(a, IntervalV) and isinstance(b, IntervalV):
        return (_end_equal(a.lo, b.lo, a.lo_open, b.lo_open) and _end_equal(a.hi, b.hi, a.hi_open, b.hi_open))
    if isinstance(a, UnionV) and isinstance(b, UnionV):
        return _unordered_equal(a.parts, b.parts)
    if isinstance(a, ListV) and isinstance(b, UnionV):    # x < 1 or x > 2
        parts = tuple(_as_interval(v) for v in a.items)
        return all(isinstance(p, (IntervalV, SetV)) for p in parts) and _unordered_equal(parts, b.parts)
    if isinstance(b, MatrixV):
        if isinstance(a, MatrixV):
            return (len(a.rows) == len(b.rows) and len(a.rows[0]) == len(b.rows[0])
                    and _ordered_equal(sum(a.rows, ()), sum(b.rows, ())))
        if isinstance(a, (TupleV, ListV)) and (len(b.rows) == 1 or len(b.rows[0]) == 1):
            return _ordered_equal(a.items, sum(b.rows, ()))   # a vector written as a tuple
        return False
    if isinstance(a, SetV) and len(a.items) == 1 and isinstance(b, Num):
        return _equal(a.items[0], b)             # {5} vs 5
    return None


def _assigned_value(eq: EquationV) -> Num | None:
    """The value an equation states: x = 5 -> 5, 5 = x -> 5, 2 + 3 = 5 -> 5; else None."""
    if _lone_symbol(eq.lhs) or eq.lhs_label:
        return eq.rhs
    if _lone_symbol(eq.rhs):
        return eq.lhs
    if not eq.lhs.expr.free_symbols and not eq.rhs.expr.free_symbols:
        return eq.rhs
    return None


def _ordered_equal(xs: tuple, ys: tuple) -> bool:
    return len(xs) == len(ys) and all(_equal(x, y) for x, y in zip(xs, ys))


def _unordered_equal(xs: tuple, ys: tuple) -> bool:
    """Set equality: a repeated item counts once (a solution listed twice is still one solution);
    identical items are paired first (cheap), the rest by _equal."""
    left, right = Counter(set(xs)), Counter(set(ys))
    if len(left) != len(right):
        return False
    common = left & right
    rest_x = list((left - common).elements())
    rest_y = list((right - common).elements())
    for x in rest_x:
        for k, y in enumerate(rest_y):
            if _equal(x, y):
                del rest_y[k]
                break
        else:
            return False
    return True


def _end_equal(a: Num, b: Num, a_open: bool, b_open: bool) -> bool:
    if a.expr in (oo, -oo) or b.expr in (oo, -oo):
        return a.expr == b.expr                  # openness at an infinite end does not matter
    return a_open == b_open and _num_equal(a, b)


def _num_equal(a: Num, b: Num) -> bool:
    """Scalars: exact, or within 1e-6 relative when a decimal literal is involved; 50% = 50 = 0.5."""
    if _scalar_equal(a, b, a.expr, b.expr):
        return True
    if a.percent != b.percent and not (a.frozen or b.frozen):
        pa = a.expr / 100 if a.percent else a.expr
        pb = b.expr / 100 if b.percent else b.expr
        return _scalar_equal(a, b, pa, pb)
    return False


def _scalar_equal(a: Num, b: Num, x, y) -> bool:
    if x == y:
        return True
    if a.frozen or b.frozen:
        return False                             # too big to evaluate: structural equality only
    tolerant = (a.decimal or b.decimal) and not (a.literal and b.literal)
    if tolerant and a.literal != b.literal and not _is_rounding(*((x, y) if a.literal else (y, x))):
        return False                             # 2024.001 vs 2024: close, but not what 2024 rounds to
    if x.is_Rational and y.is_Rational:
        return tolerant and bool(abs(x - y) <= DECIMAL_REL_TOL * max(abs(x), abs(y)))
    digits = max(a.digits, b.digits)
    if digits > MAX_NUMERIC_DIGITS:
        return False
    precision = NUMERIC_DIGITS + int(digits)
    rel_tol = DECIMAL_REL_TOL if tolerant else None
    if not (x.free_symbols or y.free_symbols):
        return _numbers_close(x, y, precision, rel_tol)
    return _expressions_equal(x, y, precision, rel_tol)


MAX_ROUNDING_PLACES = 400    # a decimal with more places is judged by the relative tolerance alone


def _is_rounding(literal, exact) -> bool:
    """Is the decimal literal (k places) `exact` rounded or truncated to k places? 0.333333, 0.666666 and
    0.666667 are 1/3 and 2/3 so written; 2024.001, 0.1428572 (1/7 = 0.1428571...) and 1.0000001 are no
    rounding of 2024, 1/7 and 1, however close. True when it cannot tell (the tolerance then decides)."""
    if not literal.is_Rational:
        return True
    q, places = int(literal.q), 0
    while 10**places % q:
        places += 1
        if places > MAX_ROUNDING_PLACES:
            return True
    target = int(literal * 10**places)           # the literal's digits, as an integer
    if exact.is_Rational:
        scaled = exact * 10**places
        return target in (math.floor(scaled + Rational(1, 2)), math.ceil(scaled - Rational(1, 2)), int(scaled))
    ctx, precision = _mp(), NUMERIC_DIGITS + places + len(str(abs(target)))
    value = _evaluate(exact, precision)
    if value is None or value.imag:
        return True
    with ctx.workdps(precision):
        scaled = value.real * ctx.mpf(10) ** places
        return target in (int(ctx.floor(scaled + 0.5)), int(ctx.ceil(scaled - 0.5)), int(scaled))


def _mp() -> mpmath.MPContext:
    """This thread's private mpmath context (mpmath's global one is not thread-safe)."""
    ctx = getattr(_state, "mp", None)
    if ctx is None:
        ctx = _state.mp = mpmath.MPContext()
    return ctx


class _Unsafe(Exception):
    """Numeric evaluation would need an unbounded range or precision (or meets an unknown node)."""


MAX_MAGNITUDE_BITS = 30_000   # |values| met during numeric evaluation stay within 2^(+-30,000)
_MP_FUNCTIONS = {sin: "sin", cos: "cos", tan: "tan", cot: "cot", sec: "sec", csc: "csc", asin: "asin",
                 acos: "acos", atan: "atan", acot: "acot", sinh: "sinh", cosh: "cosh", tanh: "tanh",
                 asinh: "asinh", acosh: "acosh", atanh: "atanh", asec: "asec", acsc: "acsc", exp: "exp",
                 log: "log", Abs: "fabs"}


_CHEAP_AT_ANY_SIZE = (log, Abs, atan, acot, asinh, acosh, atanh, asec, acsc)


def _bits(value) -> int:
    """log2 |value| (rounded), as mpmath's mag; very negative for 0."""
    return _mp().mag(value) if value != 0 else -(10**9)


def _guard(value):
    """value, unless it is infinite, NaN, or so large that further steps could not be bounded.
    Records the largest magnitude met (_state.peak_bits): see _evaluate."""
    ctx = _mp()
    bits = _bits(value) if ctx.isfinite(value) else MAX_MAGNITUDE_BITS + 1
    if bits > MAX_MAGNITUDE_BITS:
        raise _Unsafe
    _state.peak_bits = max(_state.peak_bits, bits)
    return value


def _mp_value(expr, point: dict):
    """expr at `point` (symbol -> Rational) in this thread's mpmath context at its current precision.
    Every operation whose cost grows with the size of its operands (argument reduction of sin of a
    huge number, a power with a huge exponent, gamma of a huge number) is refused before it runs."""
    ctx = _mp()
    if expr.is_Rational:
        return _guard(ctx.mpf(expr.p) / expr.q)
    if expr.is_Symbol:
        if expr not in point:
            raise _Unsafe
        value = point[expr]                           # a Rational sample, or an mpf (_mp_limit, _mp_integral)
        return ctx.mpf(value.p) / value.q if getattr(value, "is_Rational", False) else value
    if expr == pi:
        return +ctx.pi
    if expr == E:
        return +ctx.e
    if expr == I:
        return ctx.mpc(0, 1)
    if isinstance(expr, Limit):
        return _mp_limit(expr, point)
    if isinstance(expr, Integral):
        return _mp_integral(expr, point)
    args = [_mp_value(a, point) for a in expr.args]
    if expr.is_Add:
        return _guard(ctx.fsum(args))
    if expr.is_Mul:
        return _guard(ctx.fprod(args))
    if expr.is_Pow:
        base, exponent = args
        if base == 0:
            return _guard(ctx.power(base, exponent))
        if abs(exponent) * abs(ctx.log(abs(base), 2)) > MAX_MAGNITUDE_BITS:
            raise _Unsafe                        # |base^exponent| = 2^(exponent log2 |base|): (1 + 1/x)^x is fine
        return _guard(ctx.power(base, exponent))
    func = type(expr)
    if func in _MP_FUNCTIONS and len(args) == 1:
        (arg,) = args
        if _bits(arg) > 64 and func not in _CHEAP_AT_ANY_SIZE:  # mod pi, exp
            raise _Unsafe
        return _guard(getattr(ctx, _MP_FUNCTIONS[func])(arg))
    if func is factorial and abs(args[0]) < 10**4:
        return _guard(ctx.gamma(args[0] + 1))
    if func is gamma and abs(args[0]) < 10**4:
        return _guard(ctx.gamma(args[0]))
    if func is binomial and abs(args[0]) < 10**4 and abs(args[1]) < 10**4:
        return _guard(ctx.binomial(*args))
    raise _Unsafe                                 # oo, zoo, an unevaluated giant, an unknown function


QUADRATURE_DEGREE = 6         # tanh-sinh levels: ~2^7 nodes; smooth integrands converge by then
# A limit is read at x = a + m 10^-(d+k) for these (k, m) (d: working digits). The mantissas m are not powers
# of 10 apart, so a function periodic in log x (sin(2 pi log10 x), no limit) cannot agree with itself by chance.
LIMIT_STEPS = ((5, "0.6180339887498949"), (10, "0.7071067811865476"), (15, "0.5772156649015329"))


def _mp_limit(expr, point: dict):
    """lim_{x -> a} f numerically: f at three points approaching a from each side the limit names
    (a +- m 10^-(d+k), LIMIT_STEPS; +-10^(d+k)/m at an infinite a), computed with 4d + 80 digits
    (so that x - a is exact and cancellation up to third order, as in (1 - cos x)/x^2 or
    (x - sin x)/x^3, costs nothing). If all agree to d - 10
    digits, that is the limit; otherwise (no limit, |x|/x, sin(1/x), one that converges too slowly to
    see, such as 1/ln x) _Unsafe: the limit is then compared structurally only."""
    body, var, target, direction = expr.args
    if body.has(Limit, Integral):
        raise _Unsafe                             # nested: 6 evaluations per level, 6^depth in all
    ctx = _mp()
    digits = ctx.dps
    with ctx.workdps(4 * digits + 80):
        if target in (oo, -oo):
            sign = 1 if target == oo else -1
            xs = [sign * ctx.mpf(10) ** (digits + k) / ctx.mpf(m) for k, m in LIMIT_STEPS]
        else:
            a = _mp_value(target, point)
            signs = {"+": (1,), "-": (-1,), "+-": (1, -1)}[str(direction)]
            xs = [a + s * ctx.mpf(m) * ctx.mpf(10) ** -(digits + k) for s in signs for k, m in LIMIT_STEPS]
        values = [_mp_value(body, {**point, var: x}) for x in xs]
        ref = values[-1]
        if any(abs(v - ref) > ctx.mpf(10) ** (10 - digits) * max(1, abs(ref)) for v in values):
            raise _Unsafe
    return _guard(+ref)


def _mp_integral(expr, point: dict):
    """A definite integral over finite ends by mpmath's tanh-sinh quadrature (QUADRATURE_DEGREE levels at
    most); _Unsafe unless its error estimate is below 10^-(d-10) of the value (d: working digits): a
    divergent, badly oscillating or improper integral is then compared structurally only (improper
    ones would put nodes at |x| ~ 10^100, where e^-x alone is a refused, unbounded computation)."""
    if expr.function.has(Limit, Integral):
        raise _Unsafe                             # nested: ~2^7 evaluations per level
    ctx = _mp()
    (var, lo, hi), = expr.limits
    ends = [_mp_value(end, point) for end in (lo, hi)]   # an infinite end is _Unsafe: structural only
    value, error = ctx.quad(lambda t: _mp_value(expr.function, {**point, var: t}), ends, error=True,
                            maxdegree=QUADRATURE_DEGREE)
    if not ctx.isfinite(value) or error > ctx.mpf(10) ** (10 - ctx.dps) * max(1, abs(value)):
        raise _Unsafe
    return _guard(value)


def _evaluate(expr, precision: int, point: dict | None = None):
    """expr as an mpmath number (variables taken from point) with an ABSOLUTE error below
    10^-(precision+10), or None if it is not a finite number or cannot be evaluated within bounded cost.

    Why absolute: (x+1)^1000 + x and (x+1)^1000 differ by x, a relative 1e-460 of either value; at a
    fixed 30 significant digits they would look equal. So a first pass finds the largest magnitude
    met on the way (_state.peak_bits, which also bounds cancellation), and the value is computed
    again with that many more digits."""
    ctx = _mp()
    try:
        extra = 0
        for _ in range(2):
            ctx.dps = precision + extra + 10
            _state.peak_bits = 0
            value = ctx.mpc(_mp_value(expr, point or {}))
            needed = int(_state.peak_bits * LOG10_2) + 1
            if needed <= extra + 10:                 # the 10 guard digits already cover it
                break
            extra = needed
        return value
    except (_Unsafe, ArithmeticError, ValueError, TypeError, RecursionError):
        return None


def _close(u, v, precision: int, rel_tol, scale=1) -> bool:
    """u = v: "exactly" (rel_tol None) means |u - v| <= 10^(5-precision) * scale, an absolute bound
    (values come from _evaluate, accurate to 10^-(precision+10)); with a decimal literal involved,
    within rel_tol of the larger value."""
    ctx = _mp()
    if rel_tol is None:
        return abs(u - v) <= ctx.mpf(10) ** (5 - precision) * scale
    return abs(u - v) <= ctx.mpf(rel_tol.p) / rel_tol.q * max(abs(u), abs(v))


def _close_at(x, y, precision: int, rel_tol, point: dict | None = None) -> bool | None:
    """x = y evaluated at point (see _close); None if either side cannot be evaluated there."""
    u, v = _evaluate(x, precision, point), _evaluate(y, precision, point)
    return None if u is None or v is None else _close(u, v, precision, rel_tol)


def _numbers_close(x, y, precision: int, rel_tol) -> bool:
    return bool(_close_at(x, y, precision, rel_tol))


def _sample_rows(seed: int = 20240735) -> list[list[Rational]]:
    """Three rows of 16 fixed pseudo-random positive values, one row in each of (0.3, 0.95), (1.05, 2.95)
    and (3.05, 6.95); the seed is one whose rows order every pair of the first four variables both ways
    (a < b at one point, a > b at another) and give each of them a value above 1.5 and one above 4.5.
    Positive, so logs and roots stay real (sqrt(x^2) = x passes: answers assume positive variables);
    spread out and in no fixed order, so an answer right on only part of the range fails somewhere
    (|x - 3| = 3 - x, x^k + x^-k = x^k, |a - b| = b - a)."""
    rng = random.Random(seed)
    return [[Rational(rng.randint(lo, hi), 10**9) for _ in range(16)]
            for lo, hi in ((3 * 10**8, 95 * 10**7), (105 * 10**7, 295 * 10**7), (305 * 10**7, 695 * 10**7))]


_SAMPLES = _sample_rows()


def _sample_points(symbols: list) -> list[dict]:
    """The three points (_sample_rows) for these variables; the 17th and later shifted by 1, 2, ..."""
    return [{s: row[k % len(row)] + k // len(row) for k, s in enumerate(symbols)} for row in _SAMPLES]


def _poly_terms(expr) -> int | None:
    """Terms of expr once expanded, if it is a polynomial with rational (Gaussian) coefficients."""
    if expr.is_Symbol or expr.is_Rational or expr == I:
        return 1
    if expr.is_Add or expr.is_Mul:
        sizes = [_poly_terms(a) for a in expr.args]
        if None in sizes:
            return None
        return sum(sizes) if expr.is_Add else math.prod(sizes)
    if expr.is_Pow and expr.exp.is_Integer and 0 < expr.exp <= 40:
        base = _poly_terms(expr.base)
        return None if base is None else math.comb(base + int(expr.exp) - 1, base - 1)
    return None


def _expressions_equal(x, y, precision: int, rel_tol) -> bool:
    """Equality of expressions with variables: exact for small polynomials, else at sample points."""
    if rel_tol is None:
        size_x, size_y = _poly_terms(x), _poly_terms(y)
        if size_x is not None and size_y is not None and size_x + size_y <= MAX_POLY_TERMS:
            return expand(x - y) == 0
    symbols = sorted(x.free_symbols | y.free_symbols, key=str)
    agreed = 0
    for point in _sample_points(symbols):
        verdict = _close_at(x, y, precision, rel_tol, point)
        if verdict is False:
            return False
        agreed += verdict is True                # None: a singular point for one side
    return agreed > 0


def _difference(rel) -> Num | None:
    if rel.lhs.frozen or rel.rhs.frozen:
        return None
    return _add(rel.lhs, _neg(rel.rhs))


def _equation_equal(a: EquationV, b: EquationV) -> bool:
    """Same equation up to swapping sides and a nonzero constant factor."""
    a_named, b_named = _lone_symbol(a.lhs) or a.lhs_label, _lone_symbol(b.lhs) or b.lhs_label
    if a_named and b_named and (a.lhs == b.lhs or a.lhs_label or b.lhs_label):
        return _num_equal(a.rhs, b.rhs)          # y = f(x) vs y = g(x), f(x) = ... vs y = ...: compare f, g
    if (a.lhs == b.rhs and a.rhs == b.lhs) or (_num_equal(a.lhs, b.lhs) and _num_equal(a.rhs, b.rhs)):
        return True
    if (_assigned_value(a) is not None and _assigned_value(b) is not None
            and not (a.lhs.expr.free_symbols or a.rhs.expr.free_symbols)):
        return _num_equal(_assigned_value(a), _assigned_value(b))
    return _proportional(_difference(a), _difference(b), positive=False)


def _proportional(d1: Num | None, d2: Num | None, positive: bool) -> bool:
    """d1 = c * d2 for a constant c != 0 (c > 0 if positive), checked at the sample points."""
    if d1 is None or d2 is None:
        return False
    if d1.expr == d2.expr or (not positive and d1.expr == -d2.expr):
        return True
    symbols = sorted(d1.expr.free_symbols | d2.expr.free_symbols, key=str)
    if not symbols:
        return False
    precision = NUMERIC_DIGITS + int(min(max(d1.digits, d2.digits), MAX_NUMERIC_DIGITS))
    ratio = None
    for point in _sample_points(symbols):
        u, v = _evaluate(d1.expr, precision, point), _evaluate(d2.expr, precision, point)
        if u is None or v is None or abs(v) == 0:
            return False
        if ratio is None:                        # c from the first point, then d1 = c d2 at the others
            ratio = u / v
            if abs(ratio) == 0 or (positive and (abs(ratio.imag) > abs(ratio) * 1e-20 or ratio.real <= 0)):
                return False
        elif not _close(u, ratio * v, precision, None, max(abs(ratio), 1)):
            return False
    return True


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def _loose(s: str) -> str:
    """Last-resort spelling for answers that do not parse: text wrappers, braces and spaces removed."""
    return re.sub(r"[\s{}]", "", _unwrap_text(s))


@_cached
def _equiv(pred: str, gold: str) -> bool:
    p, g = _clean(pred), _clean(gold)
    if not p or not g:
        return False
    if p == g:
        return True
    units_p, units_g = _units(p), _units(g)
    if units_p and units_g and units_p != units_g:              # 5 cm vs 5 mm: units are dropped, not ignored
        return False
    if _INT_RE.fullmatch(p) and _INT_RE.fullmatch(g):           # the common case: plain integers
        return _canonical_int(p) == _canonical_int(g)
    pv, gv = _parse(p), _parse(g)
    if pv is None or gv is None:
        return _loose(p) == _loose(g)
    return _equal(pv, gv)


_UNIT_WORD_RE = re.compile(r"\\?[A-Za-z]+")


def _units(s: str) -> frozenset:
    """The units an answer names (5 \\text{ cm}, 30^\\circ, 2 hours), by what they are, so that two answers
    naming different units never match; an answer naming none matches either (the MATH convention)."""
    return frozenset(_UNIT_NAMES[w] for w in map(str.lower, _UNIT_WORD_RE.findall(s)) if w in _UNIT_NAMES)


def _canonical_int(s: str) -> str:
    sign = "-" if s.startswith("-") else ""
    digits = s.lstrip("+-").lstrip("0") or "0"
    return ("" if digits == "0" else sign) + digits


def is_equiv(pred: str, gold: str | int | float) -> bool:
    """Is answer string pred the same answer as gold? (policy: module docstring). A gold that is a
    number (int, float: a JSON number) is compared as that number (see _gold_text). Never raises."""
    gold_text, numeric = _gold_text(gold)
    if not isinstance(pred, str) or gold_text is None:
        return False
    try:
        return bool(_with_deadline(_equiv_to_gold, pred, gold_text, numeric))
    except (_OutOfTime, Exception):              # out of time, or a sympy failure on odd input
        return False


def grade(completion: str, gold: str | int | float, require_think_close: bool = False) -> bool:
    """True iff the completion's final answer (extract_answer) is equivalent to gold (a string, or a
    number: see is_equiv). Never raises. require_think_close=True is the paper's strict protocol (rllm's
    grader): a completion without `</think>` scores False; otherwise the answer is read from the text
    after the last `</think>`."""
    gold_text, numeric = _gold_text(gold)
    if gold_text is None:
        return False
    try:
        return bool(_with_deadline(_grade, completion, gold_text, bool(require_think_close), numeric))
    except (_OutOfTime, Exception):
        return False


def _grade(completion: str, gold: str, require_think_close: bool, numeric: bool = False) -> bool:
    answer = extract_answer(completion, require_think_close)
    return answer is not None and _equiv_to_gold(answer, gold, numeric)


# A number literal in scientific notation, as JSON and Python write numbers: 1e-07, 2.5E+3, -3e8.
_SCIENTIFIC_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)[eE][-+]?\d+")
_PRINTED_FLOAT_RE = re.compile(r"[-+]?\d+(?:\.\d+)?[eE][-+]\d{2,}")   # repr(1e-10), repr(2.5e+16)
MAX_SCIENTIFIC_EXPONENT = 1_000   # beyond this, the literal is left to the parser (bounded there)


def _gold_text(gold) -> tuple[str | None, bool]:
    """(the gold answer as text, whether it is a number literal). A JSON number arrives as int or
    float: str(1e-07) would be "1e-07", which LaTeX reads as 1*e - 7 (Euler's e), so the number is
    written out in positional notation ("0.0000001": exactly the decimal the literal denotes). A gold
    string that is exactly a float as Python and JSON writers print one (a signed exponent of two or
    more digits: "1e-10", "2.5e+16"; a loader that did str(number)) is that number too; any other
    string is taken as written (the tokenizer reads "1e-07", "1e+16" as numbers anywhere; "2e-1" and
    "2e-x" stay 2e - 1, 2e - x). (None, False) for anything else (bool, NaN, None, ...)."""
    if isinstance(gold, bool):
        return None, False                       # JSON true/false: not a number answer
    if isinstance(gold, int):
        return _int_text(gold), True
    if isinstance(gold, float):
        return (_positional(repr(gold)), True) if math.isfinite(gold) else (None, False)
    if not isinstance(gold, str):
        return None, False
    printed = _scientific_literal(gold, _PRINTED_FLOAT_RE)
    return (printed, True) if printed is not None else (gold, False)


def _scientific_literal(text: str, pattern: re.Pattern = _SCIENTIFIC_RE) -> str | None:
    """text written out positionally if it is exactly one scientific-notation literal (optionally in
    $...$) with a bounded exponent; else None. Used for a prediction against a numeric gold only."""
    s = text.strip()
    if len(s) > 200:
        return None
    s = s[1:-1].strip() if len(s) > 2 and s[0] == s[-1] == "$" else s
    if not pattern.fullmatch(s):
        return None
    exponent = int(re.split("[eE]", s)[1])
    return _positional(s) if abs(exponent) <= MAX_SCIENTIFIC_EXPONENT else None


def _positional(literal: str) -> str:
    """A decimal literal written without an exponent: 1e-07 -> 0.0000001, 2.5e+3 -> 2500, 1.0 -> 1.0."""
    text = format(Decimal(literal), "f")
    return "0" if text in ("-0", "-0.0") else text


def _int_text(n: int) -> str:
    """str(n), also past Python's 4,300-digit int-to-str limit."""
    if abs(n) < 10**4000:
        return str(n)
    chunks, rest = [], abs(n)
    while rest:
        rest, chunk = divmod(rest, 10**4000)
        chunks.append(chunk)
    return ("-" if n < 0 else "") + str(chunks[-1]) + "".join(str(c).zfill(4000) for c in reversed(chunks[:-1]))


def _equiv_to_gold(pred: str, gold: str, numeric_gold: bool) -> bool:
    """_equiv, with a prediction that is exactly a scientific literal (1e-07, 2.5e-3) read as that
    number when the gold is a number. Elsewhere `2e-1` stays 2e - 1 (Euler's e): only against a numeric
    gold is the scientific reading the one that can match (2e - 1 is irrational, a number gold never is),
    so it cannot turn a wrong answer into a right one."""
    if numeric_gold and (literal := _scientific_literal(pred)) is not None:
        pred = literal
    return _equiv(pred, gold)


def _clear_caches() -> None:
    """Forget cached parses and verdicts (for benchmarks that want cold-cache timings)."""
    _clean.cache_clear()
    _parse.cache_clear()
    _equiv.cache_clear()


# ---------------------------------------------------------------------------------------------
# CLI: python verify.py PRED GOLD
# ---------------------------------------------------------------------------------------------
def describe(value) -> str:
    """A readable rendering of a parsed value."""
    if value is None:
        return "(not parsed: compared as text)"
    if isinstance(value, Num):
        try:
            text = str(value.expr)
        except ValueError:                       # an integer past Python's str() digit limit
            text = f"<number with about {int(value.digits)} digits>"
        flags = [f for f in ("decimal", "frozen", "percent") if getattr(value, f)]
        return text + (f"  [{', '.join(flags)}]" if flags else "")
    if isinstance(value, (TupleV, ListV, SetV)):
        inner = ", ".join(describe(v) for v in value.items)
        return {"TupleV": f"tuple({inner})", "ListV": f"list[{inner}]", "SetV": f"set{{{inner}}}"}[type(value).__name__]
    if isinstance(value, IntervalV):
        left, right = "(" if value.lo_open else "[", ")" if value.hi_open else "]"
        return f"interval{left}{describe(value.lo)}, {describe(value.hi)}{right}"
    if isinstance(value, UnionV):
        return " U ".join(describe(p) for p in value.parts)
    if isinstance(value, MatrixV):
        return "matrix[" + "; ".join(", ".join(describe(c) for c in row) for row in value.rows) + "]"
    if isinstance(value, EquationV):
        return f"equation {describe(value.lhs)} = {describe(value.rhs)}"
    if isinstance(value, RelationV):
        return f"relation {describe(value.lhs)} {value.op} {describe(value.rhs)}"
    if isinstance(value, TextV):
        return f"text {value.text!r}"
    if isinstance(value, ChoiceV):
        return f"choice ({value.letter})"
    if isinstance(value, BasedV):
        return f"numeral {value.digits} in base {value.base}"
    return repr(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="verify.py", description="Compare a predicted answer (or a whole completion) with a gold "
        "answer. Exit status 0 if equivalent, 1 if not, 2 on a usage error. Answers may begin with "
        "'-' (python verify.py -x -x): every argument is an answer, except a lone -h/--help.")
    parser.add_argument("pred", help="predicted answer, or a completion containing \\boxed{...}")
    parser.add_argument("gold", help="gold answer")
    parser.add_argument("--require-think-close", action="store_true",
                        help="the paper's strict protocol: no </think> in pred means no answer")
    argv = sys.argv[1:] if argv is None else list(argv)
    strict = "--require-think-close" in argv
    answers = [a for a in argv if a != "--require-think-close"]
    if answers in (["-h"], ["--help"]):
        parser.parse_args(answers)                   # prints the help and exits
    if answers[:1] == ["--"]:
        answers = answers[1:]
    args = parser.parse_args((["--require-think-close"] if strict else []) + ["--", *answers])
    extracted = extract_answer(args.pred, args.require_think_close)
    if extracted is None and args.require_think_close:
        print("pred: no answer after </think> (strict protocol)")
        print("verdict: not equivalent")
        return 1
    answer = extracted if extracted is not None else args.pred
    if extracted is None:
        print("pred: no boxed or 'final answer' found; comparing the argument as given")
    try:
        pred_value = _with_deadline(lambda: _parse(_clean(answer)))
        gold_value = _with_deadline(lambda: _parse(_clean(args.gold)))
    except _OutOfTime:
        pred_value = gold_value = None
    verdict = is_equiv(answer, args.gold)
    print(f"pred answer: {answer}")
    print(f"pred parsed: {describe(pred_value)}")
    print(f"gold answer: {args.gold}")
    print(f"gold parsed: {describe(gold_value)}")
    print(f"verdict: {'equivalent' if verdict else 'not equivalent'}")
    return 0 if verdict else 1


if __name__ == "__main__":
    from common import cli                       # not at the top: common imports torch, verify does not

    cli(main, "verify.py")
