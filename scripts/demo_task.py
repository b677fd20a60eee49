"""The demo's task and teacher: three-digit additions solved column by column with every carry written out,
and a synthetic teacher that errs the way a reasoning model does (rarely on easy problems, often on hard ones).
Shared by scripts/demo.py (the pipeline) and scripts/demo_base.py (the pretrained base's corpus)."""

import json
import random

from common import write_text

COLUMN_NAMES = ["ones", "tens", "hundreds", "thousands"]

# ----------------------------------------------------------------------------------------------------------
# 1. The synthetic teacher


def carry_outs(a: int, b: int) -> list[int]:
    """The carry (0 or 1) that each column of a + b passes to the next, ones column first."""
    carries, carry = [], 0
    for i in range(max(len(str(a)), len(str(b)))):
        carry = 1 if a // 10**i % 10 + b // 10**i % 10 + carry >= 10 else 0
        carries.append(carry)
    return carries


def longest_carry_chain(a: int, b: int) -> tuple[int, int]:
    """(length, first column) of the longest run of consecutive carry-producing columns (the first of equal
    runs); (0, 0) without carries. 178 + 825: ones, tens and hundreds all carry, a chain of 3."""
    best, best_start, run = 0, 0, 0
    for i, carry in enumerate(carry_outs(a, b)):
        run = run + 1 if carry else 0
        if run > best:
            best, best_start = run, i - run + 1
    return best, best_start


def dropped_carry_answers(a: int, b: int) -> set[int]:
    """The teacher's error family: every answer that forgetting one incoming carry gives. Forgetting the
    carry into column i (or the final carry, i = number of columns) and then adding honestly computes
    a + b − 10^i exactly, because a carry is one unit of 10^i."""
    return {a + b - 10 ** (i + 1) for i, carry in enumerate(carry_outs(a, b)) if carry}


def teacher_trace(a: int, b: int, drop_carry_into: int | None = None, final_slip: int = 0) -> str:
    """Column addition of a + b written step by step, ending in \\boxed{}. drop_carry_into=i forgets the carry
    arriving at column i (i = number of columns: the final carry) and continues honestly; final_slip adds
    that much to the stated result."""
    xs, ys = str(a)[::-1], str(b)[::-1]
    columns = max(len(xs), len(ys))
    carry, digits, lines = 0, [], []
    for i in range(columns):
        if i == drop_carry_into:
            carry = 0
        x, y = int(xs[i]) if i < len(xs) else 0, int(ys[i]) if i < len(ys) else 0
        total = x + y + carry
        terms = f"{x} + {y}" + (f" + {carry}" if carry else "")
        lines.append(f"Add the {COLUMN_NAMES[i]}: {terms} = {total}. Write {total % 10}"
                     + (", carry 1." if total >= 10 else "."))
        digits.append(total % 10)
        carry = 1 if total >= 10 else 0
    if carry and drop_carry_into != columns:
        digits.append(1)
        lines.append("Write the final carry 1.")
    result = int("".join(str(d) for d in reversed(digits))) + final_slip
    lines.append(f"So {a} + {b} = {result}. The answer is \\boxed{{{result}}}.")
    return "\n".join(lines)


def teacher_generation(a: int, b: int, rng: random.Random, teacher: dict) -> tuple[str, str | None]:
    """One sampled trace and its mistake ("dropped_carry", "final_slip" or None). With probability
    teacher["drop_carry"][L] (L = longest carry chain) the teacher forgets a carry arriving inside that chain,
    at a column drawn uniformly; otherwise, with probability teacher["final_slip"], the last digit slips by 1."""
    length, start = longest_carry_chain(a, b)
    if length and rng.random() < teacher["drop_carry"][length]:
        column = rng.randint(start + 1, start + length)  # receivers of the chain's carries
        return teacher_trace(a, b, drop_carry_into=column), "dropped_carry"
    if rng.random() < teacher["final_slip"]:
        return teacher_trace(a, b, final_slip=rng.choice([-1, 1])), "final_slip"
    return teacher_trace(a, b), None


def make_problems(count: int, seed: int, exclude=frozenset()) -> list[tuple[int, int]]:
    """Distinct (a, b) pairs of three-digit numbers, none in `exclude`."""
    rng = random.Random(seed)
    problems, seen = [], set(exclude)
    while len(problems) < count:
        pair = (rng.randint(100, 999), rng.randint(100, 999))
        if pair not in seen:
            seen.add(pair)
            problems.append(pair)
    return problems


def problems_with_hard_share(count: int, seed: int, hard_share: float, exclude=frozenset()) -> list:
    """`count` distinct problems (none in `exclude`) of which round(count * hard_share) have a carry chain of 2
    or more (hard: the long traces, where the teacher's habit lives), each part in drawing order."""
    pool = make_problems(4 * count, seed, exclude)
    hard = [p for p in pool if longest_carry_chain(*p)[0] >= 2]
    easy = [p for p in pool if longest_carry_chain(*p)[0] < 2]
    quota = round(count * hard_share)
    if len(hard) < quota or len(easy) < count - quota:
        raise ValueError(f"{len(pool)} candidates hold too few hard/easy problems for {count} at {hard_share}")
    return hard[:quota] + easy[:count - quota]


def problem_text(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def write_raw_generations(path, problems, generations_per_problem, teacher, seed) -> dict:
    """OpenR1-Math-Raw-style rows (no `correctness`: data.py labels them with verify.py). Returns the
    teacher's profile: per carry-chain length, problems, traces, wrong traces, problems with no right trace."""
    rng = random.Random(seed)
    profile = {}
    rows = []
    for a, b in problems:
        traces = [teacher_generation(a, b, rng, teacher) for _ in range(generations_per_problem)]
        rows.append(json.dumps({"problem": problem_text(a, b), "answer": str(a + b),
                                "generations": [trace for trace, _ in traces]}))
        stats = profile.setdefault(str(longest_carry_chain(a, b)[0]),
                                   {"problems": 0, "traces": 0, "wrong_traces": 0, "no_correct_trace": 0})
        wrong = sum(mistake is not None for _, mistake in traces)
        stats["problems"] += 1
        stats["traces"] += len(traces)
        stats["wrong_traces"] += wrong
        stats["no_correct_trace"] += wrong == len(traces)
    write_lines(path, rows)
    return dict(sorted(profile.items()))


def write_eval_set(path, problems, prefix):
    write_lines(path, [json.dumps({"id": f"{prefix}-{i}", "problem": problem_text(a, b), "answer": str(a + b)})
                       for i, (a, b) in enumerate(problems)])


def write_lines(path, lines):
    write_text(path, "".join(line + "\n" for line in lines))
