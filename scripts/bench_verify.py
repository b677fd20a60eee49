r"""bench_verify.py — our answer checker (verify.py) against Hugging Face's Math-Verify, side by side.

Both checkers grade the same (completion, gold) pairs in one run:

  math500_gold       each MATH-500 gold solution against its own answer field        (expected: accept)
  math500_rewritten  each answer rewritten into an equivalent form (a/b for \frac, 1,234 for 1234,
                     \sqrt{n} -> n^{1/2}, degree sign dropped, list order reversed, ...), boxed
                                                                                      (expected: accept)
  math500_shifted    solution i against the answer of problem i+1, where the two answers differ
                                                                                      (expected: reject,
                     except for the rare genuine equality such as "5" vs "x=5")
  challenge          hand-labelled pairs on the known failure modes of answer checkers (exactness,
                     extraction, formats, lists, intervals, units, text, multiple choice, injection)
  peer:FAMILY        the families collected from other projects' test suites (Math-Verify,
                     NeMo-Skills, MARIO_EVAL, rllm, lighteval), as tabled in tests/test_verify.py:
                     answer pairs are graded in both argument orders, completions as written

For each checker it prints accepted/rejected counts, agreement with the expected labels, and
pairs/second over the first three sets (the MATH-500 pairs), then the speed ratio, a side-by-side
table of agreement per peer family, and the slowest single pair. Caches of our checker are cleared
before its run (cold start); Math-Verify keeps its own small internal caches.

Math-Verify is a benchmark-only dependency (requirements-bench.txt); without it only our numbers
are reported. Results are written as JSON to --out (default bench_results/verify.json).

    python -m scripts.bench_verify [--data ../shared/data/math500.jsonl] [--out PATH] [--hang-cases]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import re
import time
from pathlib import Path

import verify
from common import InputError, cli, read_jsonl, write_text

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "math500.jsonl"


# ---------------------------------------------------------------------------------------------
# Pair sets
# ---------------------------------------------------------------------------------------------
def load_rows(path: Path) -> list[dict]:
    rows = []
    for line_no, row in read_jsonl(path):
        for key in ("solution", "answer"):
            if not isinstance(row.get(key), str):
                raise InputError(f"{path}:{line_no}: missing string field {key!r}")
        rows.append(row)
    return rows


def rewrite(answer: str) -> str | None:
    """An equivalent spelling of a MATH answer by the first rule that applies, or None."""
    if re.fullmatch(r"-?\d+", answer):
        n = int(answer)
        return f"{n:,}" if abs(n) >= 1000 else f"{n}.0"
    m = re.fullmatch(r"(-?)\\[dt]?frac\{?(\d+)\}?\{?(\d+)\}?", answer)
    if m:
        return f"{m.group(1)}{m.group(2)}/{m.group(3)}"
    if re.fullmatch(r"(?:\\\$)?\d{1,3}(?:,(?:\\!)? ?\d{3})+", answer):   # 58,500 -> 58500
        return re.sub(r",(?:\\!)? ?(?=\d{3})", "", answer)
    rules = [
        (r"\\mbox\{ ?[a-z]+\}\^2|\\text\{ [a-z]+\}", ""),     # units dropped
        (r"\^\\circ", ""),                                   # 90^\circ -> 90
        (r"\\text\{\s*\(([A-E])\)\s*\}", r"(\1)"),           # \text{(C)} -> (C)
        (r"\\text\{([A-Za-z ]+)\}", r"\1"),                  # \text{east} -> east
        (r"\\sqrt\{(\d+)\}", r"(\1)^{1/2}"),                 # \sqrt{13} -> (13)^{1/2}
        (r"\\sqrt(\d)", r"(\1)^{1/2}"),
        (r"\\left|\\right", ""),                            # \left( -> (
        (r"pmatrix", "bmatrix"),
        (r"\\frac\{", r"\\dfrac{"),
        (r"_(\d+)$", r"_{\1}"),                              # 52_8 -> 52_{8}
        (r"(?<=\d) ?\\pi", r" \\cdot \\pi"),                # 7\pi -> 7 \cdot \pi
        (r"\\\$", ""),
        (r"^x=", ""),
    ]
    for pattern, replacement in rules:
        new = re.sub(pattern, replacement, answer)
        if new != answer:
            return new
    if re.fullmatch(r"[^(){}\[\]]+(,[^(){}\[\]]+)+", answer):  # a bare list: reverse the order
        return ", ".join(reversed([p.strip() for p in answer.split(",")]))
    if re.fullmatch(r"\(.*\)", answer):                     # a tuple: respace it
        return answer.replace(",", " , ")
    return None


def peer_sets() -> dict[str, list[tuple[str, str, bool]]]:
    """The peer-suite families of tests/test_verify.py, one set each ("peer:NAME"). Answer pairs are
    wrapped as $pred$ completions and listed in both orders (our is_equiv is symmetric, Math-Verify's
    verify(gold, pred) need not be); completion tables are used as written."""
    spec = importlib.util.spec_from_file_location("verify_tables", ROOT / "tests" / "test_verify.py")
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    sets = {}
    for name, rows in tables.PEER_FAMILIES.items():
        sets[f"peer:{name}"] = ([(f"${p}$", g, want) for p, g, want in rows]
                                + [(f"${g}$", p, want) for p, g, want in rows])
    for name, rows in tables.PEER_COMPLETIONS.items():
        sets[f"peer:{name}"] = list(rows)
    return sets


def math500_sets(rows: list[dict]) -> dict[str, list[tuple[str, str, bool]]]:
    gold = [(r["solution"], r["answer"], True) for r in rows]
    rewritten = []
    for r in rows:
        new = rewrite(r["answer"])
        if new is not None:
            rewritten.append((f"The answer is $\\boxed{{{new}}}$.", r["answer"], True))
    shifted = []
    for i, r in enumerate(rows):
        other = rows[(i + 1) % len(rows)]["answer"]
        if other != r["answer"]:
            shifted.append((r["solution"], other, False))
    return {"math500_gold": gold, "math500_rewritten": rewritten, "math500_shifted": shifted}


B = r"\boxed"
CHALLENGE = [  # (completion, gold, expected, what it tests)
    (B + r"{\frac{1}{2^{98}}}", r"\frac{1}{2^{99}}", False, "exact: tiny rationals differ"),
    (B + r"{10^{20}+1}", r"10^{20}", False, "exact: big integers differ by 1"),
    (B + r"{100000000000000000001}", r"10^{20}+1", True, "exact: big integer forms"),
    (B + r"{\sqrt{10^{40}+1}}", r"10^{20}", False, "exact: precision grows with magnitude"),
    (B + r"{711}", "11", False, "no tail-of-number match"),
    ("The sum is 711.", "11", False, "no fallback grabbing digits from prose"),
    (r"<think>so it is \boxed{5} maybe", "5", False, "unfinished reasoning = truncated"),
    (r"<think>try \boxed{4}</think> The answer is \boxed{5}.", "5", True, "answer after </think>"),
    (r"So \boxed{\frac{1}{", r"\frac12", False, "truncated box"),
    ("", "5", False, "empty output"),
    (r"Final Answer: The final answer is $\frac{3}{4}$. I hope it is correct.", r"\frac34", True, "Minerva format"),
    ("the final answer is 42.", "42", True, "final answer phrase"),
    (r"\fbox{12}", "12", True, "fbox"),
    (r"\boxed 7", "7", True, "boxed without braces"),
    (B + r"{2} and " + B + r"{3}", "2, 3", True, "adjacent boxes form a list"),
    (B + r"{025}", "25", True, "AIME leading zero"),
    (B + r"{1 000}", "1000", True, "space thousands separator"),
    (B + r"{10{,}080}", "10080", True, "{,} thousands separator"),
    (B + r"{2\frac{1}{2}}", r"\frac52", True, "mixed number"),
    (B + r"{137 \frac{1}{2}}", "137.5", True, "mixed number with space"),
    (B + r"{\frac{9}{5}}", r"1\frac{4}{5}", True, "mixed number gold"),
    (B + r"{\sqrt[3]{-8}}", "-2", True, "real odd root"),
    (B + r"{e^{i\pi}}", "-1", True, "Euler identity"),
    (B + r"{i^2}", "-1", True, "imaginary unit"),
    (B + r"{\frac{2}{\sqrt5-1}}", r"\frac{1+\sqrt5}{2}", True, "rationalised radicals"),
    (B + r"{\sqrt{32}}", r"5\sqrt{2}", False, "different radicals"),
    (B + r"{0.333333}", r"\frac13", True, "decimal within tolerance"),
    (B + r"{0.33}", r"\frac13", False, "decimal outside tolerance"),
    (B + r"{3.14}", r"\pi", False, "pi is not 3.14"),
    (B + r"{326.53}", "326.5", False, "two decimal literals compare exactly"),
    (B + r"{3.210}", "3.21", True, "trailing zero"),
    (B + r"{6.72\times 10^{-5}}", ".0000672", True, "scientific notation"),
    (B + r"{1.5e3}", "1500", True, "e-notation"),
    (B + r"{\log_2 8}", "3", True, "log with base"),
    (B + r"{\binom{6}{3}}", "20", True, "binomial"),
    (B + r"{5!}", "120", True, "factorial"),
    (B + r"{\sin^{-1}(1)}", r"\frac{\pi}{2}", True, "inverse trig"),
    (B + r"{√2}", r"\sqrt2", True, "unicode root"),
    (B + r"{2π}", r"2\pi", True, "unicode pi"),
    (B + r"{90}", r"90^\circ", True, "degree sign dropped"),
    (B + r"{864}", r"864 \mbox{ inches}^2", True, "units dropped"),
    (B + r"{5 \text{ cm}}", "5", True, "units dropped (pred)"),
    (B + r"{50\%}", "0.5", True, "percent as fraction"),
    (B + r"{\$18.90}", r"18.9", True, "dollars"),
    (B + r"{52_{8}}", "52_8", True, "base subscript"),
    (B + r"{52}", "52_8", True, "base subscript omitted"),
    (B + r"{42}", "52_8", False, "decimal value of a base-8 numeral is not its digits"),
    (B + r"{x=5}", "5", True, "assignment vs value"),
    (B + r"{y - 2x = 3}", "y = 2x + 3", True, "equation rearranged"),
    (B + r"{-10x+14y-22z-8=0}", "5x - 7y + 11z + 4 = 0", True, "equation times a constant"),
    (B + r"{y = 2x + 4}", "y = 2x + 3", False, "different equation"),
    (B + r"{[-2,7]}", r"x \in [-2,7]", True, "membership"),
    (B + r"{-2 \le x \le 7}", r"[-2,7]", True, "inequality chain as interval"),
    (B + r"{(-2,7]}", r"[-2,7]", False, "interval openness"),
    (B + r"{(9,36) \cup (0,9)}", r"(0,9) \cup (9,36)", True, "union order"),
    (B + r"{(3,1)}", "(1,3)", False, "tuples are ordered"),
    (B + r"{3, 1}", "1, 3", True, "solution lists are unordered"),
    (B + r"{1}", "1, 3", False, "partial list"),
    (B + r"{1, 3, 5}", "1, 3", False, "extra element"),
    (B + r"{\{3,1,2\}}", r"\{1,2,3\}", True, "set order"),
    (B + r"{1-\sqrt{19}, 1+\sqrt{19}}", r"1 \pm \sqrt{19}", True, "plus-minus"),
    (B + r"{1+\sqrt{19}}", r"1 \pm \sqrt{19}", False, "half of plus-minus"),
    (B + r"{(-2,-14,-7)}", r"\begin{pmatrix} -2 \\ -14 \\ -7 \end{pmatrix}", True, "vector as tuple"),
    (B + r"{\begin{bmatrix}1&2\\3&4\end{bmatrix}}", r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", True, "matrix"),
    (B + r"{\begin{pmatrix}1&2\\4&3\end{pmatrix}}", r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", False, "matrix differs"),
    (B + r"{C}", r"\text{(C)}", True, "choice letter"),
    (B + r"{\textbf{(C)}}", r"\text{(C)}", True, "choice letter bold"),
    (B + r"{(D)}", r"\text{(C)}", False, "wrong choice"),
    (B + r"{\text{East}}", r"\text{east}", True, "text case"),
    (B + r"{west}", r"\text{east}", False, "different text"),
    (B + r"{\frac{\cos x}{\sin x}}", r"\cot x", True, "trig identity"),
    (B + r"{ab+2a+5b+10}", r"(a+5)(b+2)", True, "expanded product"),
    (B + r"{(x+1)^2}", "x^2+x+1", False, "different polynomial"),
    (B + r"{\frac{x^2-1}{x-1}}", "x+1", True, "rational function"),
    (B + r"{__import__('os').system('echo pwned')}", "0", False, "code injection is inert"),
]
HANG_CASES = [  # checked only with --hang-cases: Math-Verify needs its timeouts here
    (B + r"{9^{9^{9^9}}}", "5", False, "power tower"),
    (B + r"{1000000000!}", "5", False, "huge factorial"),
    (B + r"{(x+1)^{100000}}", "x", False, "huge polynomial power"),
]


# ---------------------------------------------------------------------------------------------
# Checkers
# ---------------------------------------------------------------------------------------------
def ours(completion: str, gold: str) -> bool:
    return verify.grade(completion, gold)


def load_math_verify():
    """Math-Verify's grade function, or None if the package is not installed."""
    try:
        from math_verify import parse, verify as mv_verify
    except ImportError:
        return None
    logging.getLogger("math_verify").setLevel(logging.ERROR)

    def math_verify(completion: str, gold: str) -> bool:
        try:
            return bool(mv_verify(parse(f"${gold}$"), parse(completion)))
        except Exception:
            return False
    return math_verify


def grade_sets(checker, sets: dict[str, list]) -> dict:
    """Grade every pair with checker; counts per set, pairs/s over the MATH-500 sets, slowest pair."""
    report, timed_pairs, timed_seconds = {}, 0, 0.0
    slowest = (0.0, None)
    for name, pairs in sets.items():
        accepted = agree = 0
        mistakes = []
        set_start = time.perf_counter()
        for completion, gold, expected, *_ in pairs:
            start = time.perf_counter()
            verdict = checker(completion, gold)
            pair_seconds = time.perf_counter() - start
            if pair_seconds > slowest[0]:
                slowest = (pair_seconds, {"set": name, "completion": completion[-120:], "gold": gold[:120]})
            accepted += verdict
            agree += verdict == expected
            if verdict != expected and len(mistakes) < 25:
                mistakes.append({"completion": completion[-120:], "gold": gold, "expected": expected})
        seconds = time.perf_counter() - set_start
        if name.startswith("math500"):
            timed_pairs += len(pairs)
            timed_seconds += seconds
        report[name] = {"pairs": len(pairs), "accepted": accepted, "rejected": len(pairs) - accepted,
                        "agree_with_expected": agree, "seconds": round(seconds, 3), "mistakes": mistakes}
    report["math500_pairs_per_second"] = round(timed_pairs / timed_seconds, 1) if timed_seconds else None
    report["slowest_pair"] = {"seconds": round(slowest[0], 4), **(slowest[1] or {})}
    return report


def print_report(name: str, report: dict) -> None:
    print(f"\n== {name}")
    for set_name, r in report.items():
        if isinstance(r, dict) and "pairs" in r and not set_name.startswith("peer:"):
            print(f"  {set_name:18s} pairs {r['pairs']:4d}  accepted {r['accepted']:4d}  rejected {r['rejected']:4d}"
                  f"  agree with expected {r['agree_with_expected']:4d}/{r['pairs']:<4d}  {r['seconds']:8.3f} s")
    print(f"  MATH-500 pairs/s: {report['math500_pairs_per_second']}")
    slow = report["slowest_pair"]
    print(f"  slowest pair: {slow['seconds']:.3f} s ({slow.get('set')}: {slow.get('completion', '')[-60:]!r} vs "
          f"{slow.get('gold', '')[:30]!r})")


def print_peer_table(results: dict) -> None:
    """Agreement with the expected verdicts per peer family, ours and Math-Verify side by side."""
    mv = results.get("math_verify")
    print("\n== peer-suite families (agreement with the expected verdict)")
    print(f"  {'family':26s} {'pairs':>5s} {'verify.py':>10s} {'Math-Verify':>12s}")
    totals = [0, 0, 0]
    for name, r in results["ours"].items():
        if not name.startswith("peer:"):
            continue
        theirs = mv[name]["agree_with_expected"] if mv else None
        totals[0] += r["pairs"]
        totals[1] += r["agree_with_expected"]
        totals[2] += theirs or 0
        print(f"  {name[5:]:26s} {r['pairs']:5d} {r['agree_with_expected']:10d} {'-' if theirs is None else theirs:>12}")
    print(f"  {'all families':26s} {totals[0]:5d} {totals[1]:10d} {totals[2] if mv else '-':>12}")


def run(data: Path = DEFAULT_DATA, hang_cases: bool = False) -> dict:
    """The whole benchmark: both checkers on the same pairs; prints a report, returns it as a dict
    (also what bench.py's "verify" section calls)."""
    if not Path(data).is_file():
        raise InputError(f"--data {data}: MATH-500 jsonl not found (expected ../shared/data beside "
                         "the checkout; pass --data PATH)")
    rows = load_rows(Path(data))
    sets = math500_sets(rows)
    sets["challenge"] = CHALLENGE + (HANG_CASES if hang_cases else [])
    sets.update(peer_sets())
    print(f"{len(rows)} MATH-500 rows; " + ", ".join(f"{k}: {len(v)} pairs" for k, v in sets.items()))

    verify._clear_caches()
    results = {"data": str(data), "ours": grade_sets(ours, sets)}
    print_report("verify.py (ours)", results["ours"])
    math_verify = load_math_verify()
    if math_verify is None:
        print("\nMath-Verify is not installed (pip install -r requirements-bench.txt): reporting ours only")
        results["math_verify"] = None
        print_peer_table(results)
        return results
    results["math_verify"] = grade_sets(math_verify, sets)
    print_report("Math-Verify", results["math_verify"])
    print_peer_table(results)
    ratio = results["ours"]["math500_pairs_per_second"] / results["math_verify"]["math500_pairs_per_second"]
    results["speed_ratio_ours_over_math_verify"] = round(ratio, 2)
    print(f"\nspeed ratio (ours / Math-Verify, MATH-500 pairs): {ratio:.1f}x")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_verify.py", description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MATH-500 jsonl (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("bench_results/verify.json"), help="JSON output path")
    parser.add_argument("--hang-cases", action="store_true",
                        help="also grade power towers / huge factorials (Math-Verify takes its 5 s timeouts)")
    args = parser.parse_args(argv)
    results = run(args.data, args.hang_cases)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    cli(main, "bench_verify.py")
