r"""Tests for verify.py, the answer checker.

What is proven here:
  * every MATH-500 gold solution is accepted against its own answer field, and answers of other
    problems are rejected (all but a handful of genuine equalities, printed);
  * every AIME gold accepts its zero-padded answer_raw form ("025");
  * one table per supported form (extraction, numbers, fractions, roots, functions, units, bases,
    equations, tuples, sets, intervals, matrices, choices, text, expressions, exactness), each with
    accepted and rejected pairs;
  * hostile input — code injection, power towers, huge factorials, deep nesting, 5,000-digit numbers —
    is inert and answered within the 2 s bound, also from threads; exceptions never escape grade;
  * the CLI prints the verdict and both parsed forms; the benchmark runs without Math-Verify;
  * issue 24: inverse trig, nested/adjacent bars, set operations, the empty set and closed forms (\sum,
    \prod, \lim, \int, \det) each beside negative twins; a numeric gold is that number; a repetition loop
    never hides the box before it and no regex backtracks over an answer; 8 threads in fresh processes give
    the single-thread verdicts (scripts/bench_degenerate.py measures the same at full size).
"""
from __future__ import annotations

import builtins
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import verify
from verify import extract_answer, grade, is_equiv

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BOUND_S = 2.0          # the issue's wall-time bound for any single call


def read_jsonl(name: str) -> list[dict]:
    path = DATA / name
    if not path.is_file():
        pytest.fail(f"{path} not found: the shared data folder must sit beside the checkout")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def check_table(table):
    """Assert every (pred, gold, expected) row; report all failures at once."""
    failures = [(p, g, want) for p, g, want in table if is_equiv(p, g) is not want]
    assert not failures, "\n".join(f"is_equiv({p!r}, {g!r}) should be {w}" for p, g, w in failures)


# ---------------------------------------------------------------------------------------------
# Acceptance on the real data
# ---------------------------------------------------------------------------------------------
def test_math500_every_gold_solution_is_accepted():
    rows = read_jsonl("math500.jsonl")
    assert len(rows) == 500
    rejected = [r["unique_id"] for r in rows if not grade(r["solution"], r["answer"])]
    assert rejected == []


def test_math500_answers_of_other_problems_are_rejected():
    rows = read_jsonl("math500.jsonl")
    accepted, compared = [], 0
    for shift in (1, 2, 7, 101):
        for i, row in enumerate(rows):
            other = rows[(i + shift) % len(rows)]["answer"]
            if other == row["answer"]:
                continue
            compared += 1
            if grade(row["solution"], other):
                accepted.append((row["answer"], other))
    print(f"\nmismatched MATH-500 pairs accepted: {len(accepted)} of {compared}: {accepted}")
    assert compared > 1900
    assert len(accepted) <= 5
    # The only such pair in the data is a genuine equality: the answer "5" vs the answer "x=5".
    assert all(is_equiv(a, b) for a, b in accepted)


@pytest.mark.parametrize("name", ["aime24.jsonl", "aime25.jsonl"])
def test_aime_golds_accept_answer_raw(name):
    rows = read_jsonl(name)
    assert len(rows) == 30
    assert any(r["answer_raw"] != r["answer"] for r in rows) or name == "aime25.jsonl"
    for r in rows:
        assert is_equiv(r["answer_raw"], r["answer"]), r["id"]
        assert grade(f"so the answer is $\\boxed{{{r['answer_raw']}}}$", r["answer"]), r["id"]
        assert not grade(f"\\boxed{{{int(r['answer']) + 1:03d}}}", r["answer"]), r["id"]
        assert not grade(f"\\boxed{{{r['answer']}0}}", r["answer"]), r["id"]


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------
EXTRACTION = [
    ("The answer is $\\boxed{5}$.", "5"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),                       # balanced braces
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),                             # escaped braces inside
    ("first \\boxed{1}, later we see \\boxed{2}", "2"),             # the last box
    ("\\boxed{1}, \\boxed{2}", "1, 2"),                              # adjacent boxes: a list
    ("$\\boxed{1}$ and $\\boxed{2}$", "1, 2"),
    ("$\\boxed{\\frac{639}{40}}$ or $\\boxed{15\\frac{39}{40}}$", "15\\frac{39}{40}"),  # alternatives
    ("\\fbox{7}", "7"),
    ("\\framebox{204} minutes", "204"),
    ("so $\\boxed 5$", "5"),
    ("\\boxed{3} and then \\boxed{}", "3"),                          # empty box ignored
    ("<think>maybe \\boxed{1}</think>The answer is \\boxed{2}.", "2"),
    ("reasoning</think>\n\\boxed{42}", "42"),                        # prompt holds the <think>
    ("<think>maybe \\boxed{1}</think> I give up.", None),            # nothing after </think>
    ("<think>maybe \\boxed{1} and the output was cut", None),        # unfinished: truncated
    ("so \\boxed{\\frac{1}{2", None),                                # truncated box
    ("Final Answer: The final answer is $12$. I hope it is correct.", "12"),
    ("Final Answer: The final answer is $\\frac{3}{4}$. I hope it is correct.", "\\frac{3}{4}"),
    ("Thus the final answer is 3.5.", "3.5"),
    ("The final answer is \\(x=2\\)", "x=2"),
    ("The result is 711", None),                                    # no tail-of-number fallback
    ("I think 11 is wrong, it's 711", None),
    ("025", "025"),                                                 # a bare answer
    ("$\\frac{1}{2}$", "$\\frac{1}{2}$"),
    ("", None),
    ("   \n ", None),
]


@pytest.mark.parametrize("text,expected", EXTRACTION)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_rejects_non_strings():
    assert extract_answer(None) is None
    assert extract_answer(42) is None


def test_no_fallback_reads_the_tail_of_a_number():
    assert not grade("\\boxed{711}", "11")
    assert not grade("The sum is 711.", "11")
    assert not grade("711", "11")
    assert grade("\\boxed{11}", "11")


# ---------------------------------------------------------------------------------------------
# Equivalence tables, one per supported form: (pred, gold, expected)
# ---------------------------------------------------------------------------------------------
INTEGERS_AND_SEPARATORS = [
    ("42", "42", True), ("+42", "42", True), ("-0", "0", True), ("025", "25", True), ("25", "025", True),
    ("10,080", "10080", True), ("10{,}080", "10080", True), ("10,\\!080", "10,080", True),
    ("1 000", "1000", True), ("1\\,000", "1000", True), ("11,\\! 111,\\! 111,\\! 100", "11111111100", True),
    ("1,000,000", "10^6", True), ("58,500", "58500", True),
    ("42", "43", False), ("-42", "42", False), ("10,080", "1080", False), ("1 000", "1", False),
    ("1,000", "1", False), ("(1,000)", "1000", False),               # inside brackets a comma separates
]
DECIMALS = [
    ("0.5", "\\frac12", True), (".35625", "0.35625", True), ("3.210", "3.21", True), ("5.", "5", True),
    ("0.333333", "\\frac13", True), ("3.14159", "\\pi", True), ("1.4142136", "\\sqrt2", True),
    ("0.3333", "\\frac13", False), ("3.14", "\\pi", False), ("326.53", "326.5", False),
    ("0.5", "0.05", False), ("1.5", "15", False),
]
FRACTIONS = [
    ("\\frac{1}{2}", "1/2", True), ("\\dfrac{3}{4}", "\\frac34", True), ("\\tfrac{3}{4}", "0.75", True),
    ("\\frac12", "\\frac{1}{2}", True), ("\\frac 59", "\\frac{5}{9}", True), ("\\frac9{19}", "9/19", True),
    ("\\frac{270}7", "\\frac{270}{7}", True), ("\\frac{6}{8}", "\\frac{3}{4}", True), ("-\\frac{1}{2}", "\\frac{-1}{2}", True),
    ("\\frac{1}{2}", "\\frac{2}{1}", False), ("\\frac{1}{3}", "0.33", False), ("-\\frac{1}{2}", "\\frac12", False),
]
MIXED_NUMBERS = [
    ("2\\frac{1}{2}", "\\frac52", True), ("137 \\frac{1}{2}", "137.5", True), ("1\\frac{4}{5}", "\\frac{9}{5}", True),
    ("-2\\frac{1}{2}", "-2.5", True), ("2\\frac12", "2.5", True), ("2\\frac{\\pi}{3}", "\\frac{2\\pi}{3}", True),
    ("2\\frac{1}{2}", "1", False), ("x^2\\frac{1}{2}", "x^{5/2}", False),
]
ROOTS_AND_POWERS = [
    ("\\sqrt{2}", "\\sqrt2", True), ("\\sqrt{8}", "2\\sqrt{2}", True), ("\\sqrt{117}", "3\\sqrt{13}", True),
    ("\\sqrt[3]{27}", "3", True), ("\\sqrt[3]{-8}", "-2", True), ("2^{10}", "1024", True),
    ("8^{2/3}", "4", True), ("\\frac{1}{\\sqrt3}", "\\frac{\\sqrt{3}}{3}", True), ("x^{1/2}", "\\sqrt{x}", True),
    ("\\frac{2}{\\sqrt5-1}", "\\frac{1+\\sqrt5}{2}", True), ("2^{-3}", "\\frac18", True), ("\\sqrt(2)", "\\sqrt2", True),
    ("\\sqrt{32}", "5\\sqrt{2}", False), ("\\sqrt[3]{8}", "\\sqrt{8}", False), ("2^{10}", "1000", False),
]
CONSTANTS = [
    ("\\pi", "\\pi", True), ("2\\pi", "\\pi \\cdot 2", True), ("e^{i\\pi}", "-1", True), ("i^2", "-1", True),
    ("\\infty", "\\infty", True), ("-\\infty", "-\\infty", True), ("6-5i", "6 - 5i", True), ("e^2", "\\exp(2)", True),
    ("\\pi", "3", False), ("e", "2.71", False), ("-\\infty", "\\infty", False), ("6+5i", "6-5i", False),
]
OPERATORS = [
    ("2 \\times 3", "6", True), ("2 \\cdot 3", "6", True), ("6 \\div 3", "2", True), ("2*3", "6", True),
    ("2\\left(3\\right)", "6", True), ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\pi/2)", True),
    ("3xy", "3yx", True), ("(a+5)(b+2)", "ab+2a+5b+10", True), ("|-3|", "3", True), ("\\left|-3\\right|", "3", True),
    ("2 \\times 3", "5", False), ("xy", "x+y", False), ("-x^2", "x^2", False),
]
FUNCTIONS = [
    ("\\sin(\\pi/6)", "\\frac12", True), ("\\cos^2 x + \\sin^2 x", "1", True), ("2\\sin x\\cos x", "\\sin 2x", True),
    ("\\frac{\\cos x}{\\sin x}", "\\cot x", True), ("\\tan x", "\\frac{\\sin x}{\\cos x}", True),
    ("\\arcsin 1", "\\frac{\\pi}{2}", True), ("\\sin^{-1}(1)", "\\frac{\\pi}{2}", True), ("\\log_2 8", "3", True),
    ("\\log_{2}(8)", "3", True), ("\\ln(e^3)", "3", True), ("\\ln 8", "3\\ln 2", True), ("\\sec x", "\\frac{1}{\\cos x}", True),
    ("\\sin x", "\\cos x", False), ("\\log_2 8", "4", False), ("\\ln 8", "\\ln 9", False),
]
BINOMIALS_AND_FACTORIALS = [
    ("\\binom{5}{2}", "10", True), ("\\dbinom{6}{3}", "20", True), ("\\tbinom{6}{3}", "\\binom{6}{3}", True),
    ("5!", "120", True), ("\\frac{10!}{8!}", "90", True), ("0!", "1", True),
    ("\\binom{5}{2}", "20", False), ("5!", "5", False),
]
SCIENTIFIC = [
    ("1.5e3", "1500", True), ("2e10", "2 \\times 10^{10}", True), ("1.5 \\times 10^{3}", "1500", True),
    ("6.72\\times 10^{-5}", ".0000672", True), ("1.5E-3", "0.0015", True),
    ("1.5e3", "150", False), ("6.72\\times 10^{-4}", ".0000672", False), ("2e-1", "0.2", False),  # 2e-1 = 2e - 1
]
PLUS_MINUS = [
    ("1 \\pm \\sqrt{19}", "1+\\sqrt{19}, 1-\\sqrt{19}", True), ("1-\\sqrt{19}, 1+\\sqrt{19}", "1 \\pm \\sqrt{19}", True),
    ("\\pm 3", "3, -3", True), ("3 \\mp 2", "1, 5", True), ("\\{1\\pm\\sqrt{5},-2\\}", "\\{-2, 1-\\sqrt5, 1+\\sqrt5\\}", True),
    ("\\frac{-1\\pm\\sqrt5}{2}", "\\frac{-1+\\sqrt5}{2}, \\frac{-1-\\sqrt5}{2}", True), ("x = 1 \\pm 2", "3, -1", True),
    ("1+\\sqrt{19}", "1 \\pm \\sqrt{19}", False), ("3", "\\pm 3", False), ("1 \\pm 2", "1, 2", False),
]
UNICODE = [
    ("√2", "\\sqrt2", True), ("2π", "2\\pi", True), ("3 × 4", "12", True), ("−5", "-5", True), ("90°", "90^\\circ", True),
    ("±2", "\\pm 2", True), ("√3", "\\sqrt2", False), ("π", "3.14", False),
]
UNITS_AND_ANNOTATIONS = [
    ("5 \\text{ cm}", "5", True), ("5 cm", "5", True), ("5 inches", "5", True), ("5\\mbox{ cm}^2", "5", True),
    ("864", "864 \\mbox{ inches}^2", True), ("864 \\text{ square inches}", "864 \\mbox{ inches}^2", True),
    ("\\frac{270}{7}", "\\frac{270}7\\text{ degrees}", True), ("90", "90^\\circ", True), ("90^{\\circ}", "90", True),
    ("5.4", "5.4 \\text{ cents}", True), ("50\\%", "50", True), ("50\\%", "0.5", True), ("50", "50\\%", True),
    ("\\$32,348", "\\$32,\\!348", True), ("32348", "\\$32,\\!348", True), ("\\$18.90", "18.9", True),
    ("6 \\text{ cm}", "5", False), ("89", "90^\\circ", False), ("25\\%", "0.5", False), ("\\$5", "6", False),
    # both name units: they must agree (by what they are: cm = centimeters, ^\\circ = degrees)
    ("5\\text{ cm}", "5 \\text{ centimeters}", True), ("30^\\circ", "30 \\text{ degrees}", True),
    ("5\\text{ cm}", "5\\text{ mm}", False), ("2\\text{ hours}", "2 minutes", False), ("5 dollars", "5 cents", False),
]
NUMBER_BASES = [
    ("52_8", "52_8", True), ("52_{8}", "52_8", True), ("52", "52_8", True), ("4210_{5}", "4210_5", True),
    ("A3_{16}", "a3_{16}", True),
    ("42", "52_8", False), ("52_9", "52_8", False), ("53_8", "52_8", False), ("101_2", "5", False),
]
EQUATIONS_AND_MEMBERSHIP = [
    ("x=5", "5", True), ("5", "x=5", True), ("5 = x", "5", True), ("y=2x+3", "2x+3", True), ("y = 2x + 3", "y=3+2x", True),
    ("y-2x=3", "y=2x+3", True), ("-10x+14y-22z-8=0", "5x - 7y + 11z + 4 = 0", True),
    ("5x - 7y + 11z = -4", "5x - 7y + 11z + 4 = 0", True), ("x = \\frac{4}{2} = 2", "2", True),
    ("x \\in [-2,7]", "[-2,7]", True), ("x \\in (1,2)", "(1,2)", True), ("x=1 \\text{ or } x=-2", "1,-2", True),
    ("x = 1, x = -2", "-2, 1", True),
    ("x=6", "5", False), ("y=2x+4", "y=2x+3", False), ("5x - 7y + 11z + 5 = 0", "5x - 7y + 11z + 4 = 0", False),
    ("x \\in [-2,7)", "[-2,7]", False), ("x = 1", "1, -2", False),
]
TUPLES = [
    ("(1,2,3)", "(1, 2, 3)", True), ("(6,31,-1)", "\\left(6, 31, -1\\right)", True), ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("(0.5, -13)", "\\left( \\frac{3}{2}, -13 \\right)", False), ("(1,3,2)", "(1,2,3)", False), ("(1,2)", "(1,2,3)", False),
    ("(-2,1)", "(1,-2)", False),
]
SETS_AND_LISTS = [
    ("\\{3,1,2\\}", "\\{1,2,3\\}", True), ("1,2", "\\{1,2\\}", True), ("3, 5, 7", "7,3,5", True), ("-2,1", "1,-2", True),
    ("2 \\text{ and } 3", "2, 3", True), ("\\{5\\}", "5", True), ("\\emptyset", "\\{\\}", True),
    ("1,2", "1,2,3", False), ("1", "1,2", False), ("1,2,3", "1,2", False), ("1,1", "1,2", False),
    ("\\{1,2\\}", "\\{1,3\\}", False),
]
INTERVALS = [
    ("[1,2)", "[1,2)", True), ("(3,4]", "\\left(3, 4\\right]", True), ("(2,\\infty)", "(2, \\infty)", True),
    ("(-\\infty, 0]", "x \\le 0", True), ("x > 5", "(5, \\infty)", True), ("x \\ge 5", "[5,\\infty)", True),
    ("1 < x < 2", "(1,2)", True), ("-2 \\le x \\le 7", "[-2,7]", True), ("\\mathbb{R}", "(-\\infty,\\infty)", True),
    ("(9,36) \\cup (0,9)", "(0,9) \\cup (9,36)", True), ("(-\\infty,2)\\cup(3,\\infty)", "(-\\infty, 2) \\cup (3, \\infty)", True),
    ("\\left[ \\frac{\\pi^2}{8}, \\frac{5 \\pi^2}{4} \\right]", "[\\pi^2/8, 5\\pi^2/4]", True),
    ("[1,2]", "[1,2)", False), ("(3,4)", "(3,4]", False), ("x < 0", "(-\\infty, 0]", False),
    ("(0,9) \\cup (9,37)", "(0,9) \\cup (9,36)", False), ("(0,36)", "(0,9) \\cup (9,36)", False),
]
MATRICES = [
    ("\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", True),
    ("\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}", "\\begin{pmatrix} -\\frac13 \\\\ \\frac23 \\\\ \\frac53 \\end{pmatrix}", True),
    ("(-2,-14,-7)", "\\begin{pmatrix} -2 \\\\ -14 \\\\ -7 \\end{pmatrix}", True),
    ("\\begin{pmatrix}1&2\\\\4&3\\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", False),
    ("\\begin{pmatrix}1&2\\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\\\3\\end{pmatrix}", False),
    ("(-2,-7,-14)", "\\begin{pmatrix} -2 \\\\ -14 \\\\ -7 \\end{pmatrix}", False),
]
MULTIPLE_CHOICE = [
    ("(C)", "\\text{(C)}", True), ("C", "\\text{(C)}", True), ("\\textbf{(C)}", "\\text{(C)}", True),
    ("\\text{(C)} 12", "\\text{(C)}", True), ("\\text{C}", "(C)", True), ("(c)", "\\text{(C)}", True),
    ("(D)", "\\text{(C)}", False), ("D", "\\text{(C)}", False), ("12", "\\text{(C)}", False),
]
TEXT_ANSWERS = [
    ("\\text{Evelyn}", "\\text{Evelyn}", True), ("Evelyn", "\\text{Evelyn}", True), ("\\text{EAST}", "\\text{east}", True),
    ("east", "\\text{east}", True), ("\\textbf{even}", "\\text{even}", True), ("\\text{ellipse.}", "\\text{ellipse}", True),
    ("west", "\\text{east}", False), ("\\text{odd}", "\\text{even}", False), ("\\text{Navin}", "\\text{Evelyn}", False),
    ("\\text{parabola}", "\\text{ellipse}", False),
]
EXPRESSIONS = [
    ("p - q", "-q + p", True), ("x^5 - x^4 + x^3 - x^2 + x - 1", "x^5+x^3+x-x^4-x^2-1", True), ("2k+2", "2(k+1)", True),
    ("(x+1)^2", "x^2+2x+1", True), ("\\frac{x^2-1}{x-1}", "x+1", True), ("\\frac{11+9a}{20}", "\\frac{9a}{20} + \\frac{11}{20}", True),
    ("6r^2-4r-24", "2(3r^2-2r-12)", True), ("3R^2", "3 R^2", True), ("\\sqrt{x^2}", "x", True),  # equal at positive points
    ("(x+1)^2", "x^2+x+1", False), ("3R^2", "3r^2", False), ("2k+2", "2k+1", False), ("p-q", "q-p", False),
    ("x", "y", False), ("x^8 + x^7 + 1", "x^8 + x^6 + 1", False),
]
EXACTNESS = [
    ("\\frac{1}{2^{98}}", "\\frac{1}{2^{99}}", False), ("10^{20}+1", "10^{20}", False),
    ("100000000000000000001", "10^{20}+1", True), ("\\sqrt{10^{40}+1}", "10^{20}", False),
    ("2^{64}", "18446744073709551616", True), ("2^{64}", "18446744073709551617", False),
    ("\\frac{1}{3} + 10^{-30}", "\\frac{1}{3}", False), ("\\pi + 10^{-30}", "\\pi", False),
    ("(\\sqrt2+1)(\\sqrt2-1)", "1", True),
]

TABLES = {
    "integers_and_separators": INTEGERS_AND_SEPARATORS, "decimals": DECIMALS, "fractions": FRACTIONS,
    "mixed_numbers": MIXED_NUMBERS, "roots_and_powers": ROOTS_AND_POWERS, "constants": CONSTANTS,
    "operators": OPERATORS, "functions": FUNCTIONS, "binomials_and_factorials": BINOMIALS_AND_FACTORIALS,
    "scientific": SCIENTIFIC, "plus_minus": PLUS_MINUS, "unicode": UNICODE, "units": UNITS_AND_ANNOTATIONS,
    "number_bases": NUMBER_BASES, "equations": EQUATIONS_AND_MEMBERSHIP, "tuples": TUPLES,
    "sets_and_lists": SETS_AND_LISTS, "intervals": INTERVALS, "matrices": MATRICES,
    "multiple_choice": MULTIPLE_CHOICE, "text": TEXT_ANSWERS, "expressions": EXPRESSIONS, "exactness": EXACTNESS,
}


@pytest.mark.parametrize("category", list(TABLES))
def test_equivalence_table(category):
    table = TABLES[category]
    assert any(want for _, _, want in table) and not all(want for _, _, want in table), "need both kinds"
    check_table(table)


@pytest.mark.parametrize("category", list(TABLES))
def test_equivalence_is_symmetric(category):
    """Swapping prediction and gold never changes the verdict."""
    check_table([(g, p, want) for p, g, want in TABLES[category]])


def test_grade_extracts_then_compares():
    assert grade("We get $x=5$, so the answer is $\\boxed{5}$.", "x=5")
    assert grade("<think>it is 4? no</think>\n\nThe answer is $\\boxed{\\dfrac{1}{2}}$", "0.5")
    assert not grade("<think>\\boxed{5}", "5")
    assert not grade("The answer is \\boxed{6}.", "5")


# ---------------------------------------------------------------------------------------------
# Families from other projects' test suites (issue 12). Each table is written here in our own
# words and numbers; the comment names the suite whose family of cases it covers. Every family has
# accepted and rejected rows, and each row is checked in both argument orders.
# ---------------------------------------------------------------------------------------------
LABELLED_TUPLES = [  # Math-Verify tests/test_numina_cases.py: a gold "(p,q)=(..)" names its tuple
    ("(m,n)=(4,7)", "(4,7)", True), ("(a,b,c) = (1,-2,5)", "(1, -2, 5)", True),
    ("(x,y) = (2,9) \\text{ and } (9,2)", "(9,2), (2,9)", True), ("(m, n) = \\left(\\frac12, 3\\right)", "(0.5, 3)", True),
    ("(m,n)=(4,7)", "(7,4)", False), ("(a,b,c)=(1,-2,5)", "(1,2,5)", False), ("(m,n)=(4,7)", "(4,7,0)", False),
]
LINEAR_INEQUALITIES = [  # Math-Verify tests/test_all.py test_relations_math: sides that are not a lone variable
    ("-y > -4", "y < 4", True), ("-y \\geq -4", "y \\leq 4", True), ("5 - 2t \\le 1", "t \\ge 2", True),
    ("3 < 2z+1 \\le 9", "(1, 4]", True), ("-6 < -3w < 3", "-1 < w < 2", True), ("4 > -x", "x > -4", True),
    ("3x < x + 8", "(-\\infty, 4)", True),
    ("-y > -4", "y > 4", False), ("-y > -4", "y \\le 4", False), ("5 - 2t \\le 1", "t \\le 2", False),
    ("3 < 2z+1 \\le 9", "(1, 4)", False), ("y^2 < 9", "y < 3", False),
]
BRACE_SETS = [  # Math-Verify tests/test_yujianll.py (± vs a braced list); MARIO_EVAL test_is_equiv.py (set order)
    ("{-17, 17}", "\\pm 17", True), ("\\{17, -17\\}", "{-17,17}", True), ("{3, 1, 2}", "{1,2,3}", True),
    ("{a, a+1}", "{a+1, a}", True), ("{1\\pm\\sqrt2}", "\\{1-\\sqrt2, 1+\\sqrt2\\}", True),
    ("{-17, 17}", "17", False), ("{1,2}", "{1,2,3}", False), ("{1, 2}", "\\{1, 4\\}", False),
]
LIMITS = [  # latex2sympy / MARIO_EVAL notation family: \lim is compared structurally
    ("\\lim_{x\\to 0} \\frac{e^x - 1}{x}", "\\lim_{x \\rightarrow 0} \\frac{e^{x}-1}{x}", True),
    ("\\lim_{t \\to \\infty} \\left(1 + \\frac{2}{t}\\right)^t", "\\lim_{t\\to\\infty}(1+2/t)^{t}", True),
    ("\\lim_{x\\to 0^+} x \\ln x = 0", "0", True), ("\\lim\\limits_{x\\to 2} (x^2+x)", "\\lim_{x\\to 2} (x + x^2)", True),
    ("\\lim_{x\\to 0} \\frac{e^x - 1}{x}", "\\lim_{x\\to 1} \\frac{e^x - 1}{x}", False),
    ("\\lim_{x\\to 0} \\frac{e^x - 1}{x}", "\\lim_{x\\to 0} \\frac{e^x + 1}{x}", False), ("\\lim_{x\\to 0^+} x \\ln x = 0", "1", False),
]
MODULAR = [  # latex2sympy tests/mod_test.py family: \bmod, \pmod, \equiv
    ("23 \\bmod 6", "5", True), ("3^{40} \\bmod 11", "1", True), ("n \\equiv 4 \\pmod{9}", "4", True),
    ("x \\equiv 2 \\pmod 7", "x \\equiv 9 \\pmod 7", True), ("k \\equiv 5 \\; (\\bmod 8)", "5", True),
    ("23 \\bmod 6", "6", False), ("n \\equiv 4 \\pmod{9}", "5", False), ("23 \\bmod 6", "23", False),
]
DETERMINANTS = [  # MARIO_EVAL matrix family: a vmatrix is a value, not a matrix
    ("\\begin{vmatrix} 2 & 5 \\\\ 1 & 3 \\end{vmatrix}", "1", True), ("\\begin{vmatrix} p & q \\\\ r & s \\end{vmatrix}", "ps - qr", True),
    ("\\begin{vmatrix} 1 & 2 & 0 \\\\ 0 & 1 & 4 \\\\ 2 & 0 & 1 \\end{vmatrix}", "17", True),
    ("\\begin{vmatrix} 2 & 5 \\\\ 1 & 3 \\end{vmatrix}", "11", False), ("\\begin{vmatrix} p & q \\\\ r & s \\end{vmatrix}", "pq - rs", False),
    ("\\begin{vmatrix} 2 & 5 \\\\ 1 & 3 \\end{vmatrix}", "\\begin{pmatrix} 2 & 5 \\\\ 1 & 3 \\end{pmatrix}", False),
]
SUMS_AND_PRODUCTS = [  # Math-Verify tests/test_yujianll.py: reordered factors inside \sum
    ("a_n = \\sum_{j=1}^{n} b_j c_{n-j}", "a_n = \\sum_{j=1}^{n} c_{n-j} b_j", True), ("\\sum_{i=0}^{m} (i^2 + 1)", "\\sum_{i=0}^{m} (1 + i^2)", True),
    ("\\prod_{k=1}^{n} \\frac{k+1}{k}", "\\prod_{k=1}^{n} \\frac{1+k}{k}", True), ("3 + \\sum_{i=1}^{m} i", "\\sum_{i=1}^m i + 3", True),
    ("a_n = \\sum_{j=1}^{n} b_j c_{n-j}", "a_n = \\sum_{j=1}^{n-1} b_j c_{n-j}", False), ("\\sum_{i=0}^{m} 2^i", "\\sum_{i=1}^{m} 2^i", False),
    ("\\prod_{k=1}^{n} \\frac{k+1}{k}", "\\prod_{k=1}^{n} \\frac{k}{k+1}", False),
]
SEPARATOR_SPELLINGS = [  # Math-Verify tests/test_all.py test_latex_notation_math: "14 {, }916"
    ("27 {, }413", "27413", True), ("27{ , }413", "27,413", True), ("1 {,} 000 {,} 000", "10^6", True),
    ("27 {, }413", "27414", False), ("27 {, }413", "27.413", False),
]
UNICODE_FORMS = [  # issue 16: full-width digits and other compatibility forms (NFKC)
    ("４２", "42", True), ("x²", "x^2", True), ("３½", "3.5", True), ("ｘ＋１", "x+1", True), ("a₁ + a₂", "a_1+a_2", True),
    ("x⁻¹", "\\frac{1}{x}", True),
    ("４２", "24", False), ("x²", "2x", False), ("３½", "1.5", False), ("a₁", "a_2", False),
]
BIG_POLYNOMIALS = [  # issue 16: no relative tolerance between expressions that differ by a small term
    ("(x+1)^{1000}", "(x+1)^{1000}+x", False), ("(x+1)^{1000}", "(x+1)^{1000} - 10^{-20}", False),
    ("e^{300x}", "e^{300x}+1", False), ("y = (x+1)^{800}", "y = (x+1)^{800} + 1", False),
    ("(x+1)^{1000}", "(1+x)^{1000}", True), ("(y-2)^{500}(y+2)^{500}", "(y^2-4)^{500}", True),
    ("x(x+1)^{999}", "(x+1)^{1000} - (x+1)^{999}", True), ("2y = 2(x+1)^{800}", "y = (x+1)^{800}", True),
]
LIST_SPELLINGS = [  # NeMo-Skills tests/test_math_equal.py, MARIO_EVAL test_is_equiv.py: lists, labels, percent words
    ("4, 9, and 16", "16, 9, 4", True), ("4, 9, \\text{ and } 16", "4,9,16", True), ("35 percent", "35\\%", True),
    ("35 pct", "0.35", True), ("g(t) = t^2 - 1", "y = t^2 - 1", True), ("212\\\\", "212", True), ("3, 3, 5", "5, 3", True),
    ("4, 9, and 16", "4, 9", False), ("g(t) = t^2 - 1", "y = t^2 + 1", False), ("35 pct", "0.53", False),
]
DEGREES_IN_TRIG = [  # MARIO_EVAL tests/test_is_equiv.py (trigonometric), Qwen2.5-Math grader: degrees inside trig
    (r"\cos 60^\circ", r"\frac{1}{2}", True), (r"\tan 45^{\circ}", "1", True), (r"\sin(90^\circ)", "1", True),
    ("2\\sin 30°", "1", True), (r"\sin 45^\circ", r"\frac{\sqrt{2}}{2}", True),
    (r"\sin 30^\circ", r"\sin 30", False), (r"\cos 60^\circ", "60", False), (r"\tan 45^\circ", r"\tan 45", False),
]
EVALUATED_FUNCTIONS = [  # latex2sympy tests in MARIO_EVAL (floor, ceil, gcd, lcm, max, min): values of numbers
    (r"\lfloor 9.3 \rfloor", "9", True), (r"\left\lceil \frac{22}{5} \right\rceil", "5", True),
    (r"\lfloor \sqrt{20} \rfloor", "4", True), ("⌈2.1⌉", "3", True), (r"\gcd(36, 84)", "12", True),
    (r"\operatorname{lcm}(6, 10)", "30", True), (r"\text{lcm}(4, 6)", "12", True), (r"\max(2, 9, 4)", "9", True),
    (r"\min(-3, 5)", "-3", True),
    (r"\lfloor 9.3 \rfloor", "10", False), (r"\lceil x \rceil", "x", False), (r"\gcd(36, 84)", "36", False),
    (r"\max(2, 9, 4)", "2", False), (r"\min(5, 6)", "6", False),
]
ORDINALS_AND_SCALES = [  # lm-evaluation-harness minerva_math normalize_final_answer; PRM800K grader _normalize
    (r"7^{\text{th}}", "7", True), (r"21^\mathrm{st}", "21", True), ("3rd", "3", True), ("2.5 million", "2500000", True),
    (r"6 \text{ billion}", r"6 \times 10^9", True), ("40 thousand", "40000", True),
    (r"7^{\text{th}}", "8", False), ("2.5 million", "250000", False), ("6 billion", "6000000", False),
]
LABELLED_SYSTEMS = [  # Math-Verify tests/test_numina_cases.py (ratio labels, ";" between solutions); MARIO_EVAL cases
    ("2:7", "A_{1}:A_{2}=2:7", True), ("x:y:z = 1:2:4", "1:2:4", True), ("(1,4),(6,2)", "a=1,b=4;a=6,b=2", True),
    ("m=6, n=2; m=1, n=4", "(1,4),(6,2)", True),
    (r"\begin{cases} x+y=\frac{1}{2} \\ x-y=3 \end{cases}", r"\begin{cases} x-y=3 \\ x+y=0.5 \end{cases}", True),
    (r"\begin{cases} u &= 2 \\ v &= 9 \end{cases}", "u=2, v=9", True),
    ("2:7", "A_{1}:A_{2}=7:2", False), ("(1,4),(6,3)", "a=1,b=4;a=6,b=2", False),
    (r"\begin{cases} x+y=\frac{1}{2} \\ x-y=3 \end{cases}", r"\begin{cases} x+y=0.5 \\ x-y=4 \end{cases}", False),
    (r"\begin{cases} x^2 & x > 0 \\ 0 & x \le 0 \end{cases}", r"\begin{cases} x^3 & x > 0 \\ 0 & x \le 0 \end{cases}", False),
]
SAMPLE_DOMAINS = [  # NeMo-Skills tests/test_math_equal.py (incorrect examples), Qwen2.5-Math grader: right on part of the range
    ("|x-3|", "3-x", False), (r"\sqrt{(y-4)^2}", "4-y", False), ("|p-q|", "q-p", False), ("|b-a|", "a-b", False),
    ("x^{500}", "x^{500}+x^{-500}", False), (r"\frac{x-3}{|x-3|}", "1", False), (r"\arcsin(\sin t)", "t", False),
    ("|x-3|+|x+3|", "6", False),
    (r"\sqrt{x^2}", "x", True), ("|x|+|x|", "2x", True), (r"\ln(x^3)", r"3\ln x", True), ("|p-q|", "|q-p|", True),
]
DECIMAL_ROUNDINGS = [  # NeMo-Skills tests/test_math_equal.py (5 vs 5.001 incorrect), lm-eval minerva_math: a decimal is a rounding
    ("2024.001", "2024", False), ("0.1428572", r"\frac{1}{7}", False), ("1.0000001", "1", False), ("-0.3333335", r"-\frac13", False),
    ("0.1428571", r"\frac{1}{7}", True), ("0.666666", r"\frac23", True), ("0.666667", r"\frac23", True), ("3.14159", r"\pi", True),
    (r"\text{No}", r"\text{no}", True), ("NO", "no", True), ("No", "Yes", False),
]
PEER_FAMILIES = {
    "sample_domains": SAMPLE_DOMAINS, "decimal_roundings": DECIMAL_ROUNDINGS, "labelled_systems": LABELLED_SYSTEMS, "degrees_in_trig": DEGREES_IN_TRIG, "evaluated_functions": EVALUATED_FUNCTIONS,
    "ordinals_and_scales": ORDINALS_AND_SCALES, "labelled_tuples": LABELLED_TUPLES, "linear_inequalities": LINEAR_INEQUALITIES, "brace_sets": BRACE_SETS,
    "limits": LIMITS, "modular": MODULAR, "determinants": DETERMINANTS, "sums_and_products": SUMS_AND_PRODUCTS,
    "separator_spellings": SEPARATOR_SPELLINGS, "unicode_forms": UNICODE_FORMS, "big_polynomials": BIG_POLYNOMIALS,
    "list_spellings": LIST_SPELLINGS,
}

# Completions: (completion, gold, expected) for grade(); extraction is the subject here.
JOINED_BOXES = [  # Math-Verify tests/test_open_thoughts.py: several boxes form one answer
    (r"so \( \boxed{4} \) and \( \boxed{-3} \).", "-3, 4", True),
    (r"$$\boxed{(1, 5)} \quad \text{and} \quad \boxed{(5, 1)}$$", "(5,1), (1,5)", True),
    (r"\[ \boxed{7} \quad \text{and} \quad \boxed{-1}. \]", "-1, 7", True),
    (r"$\boxed{m = 6}$, $\boxed{n = 11}$", "m = 6, n = 11", True),
    (r"\boxed{\boxed{9}}", "9", True), (r"\boxed{\boxed{1}} and \boxed{2}", "1, 2", True),
    (r"$\boxed{4}$ or $\boxed{9}$", "4, 9", False),               # alternatives: the last one counts
    (r"\( \boxed{4} \) and \( \boxed{-3} \)", "4", False),
    (r"first \boxed{2}, which doubled four times over the next few steps gives \boxed{32}", "2, 32", False),
    (r"\boxed{\boxed{9}}", "99", False),
]
ANSWER_PRECEDENCE = [  # Math-Verify tests/test_all.py: intermediate boxes, then "The final answer is X"
    (r"Partial sum: $\boxed{40}$. With the rest, 1,240. Final Answer: The final answer is $1{,}240$. I hope it is correct.",
     "1240", True),
    (r"Partial sum: $\boxed{40}$. With the rest, 1,240. Final Answer: The final answer is $1{,}240$. I hope it is correct.",
     "40", False),
    (r"The final answer is $6$. Wait, recounting the cases gives \boxed{7}.", "7", True),
    (r"The final answer is $6$. Wait, recounting the cases gives \boxed{7}.", "6", False),
    ("**Final Answer**\n\\boxed{840}", "840", True),
    (r"The final answer is \boxed{12}. Note that 13 would double-count.", "13", False),
    (r"So \boxed{12}. Had we doubled it, the answer is 24.", "12", True),        # a plain "answer" ranks below a box
    (r"So \boxed{12}. Had we doubled it, the answer is 24.", "24", False),
]
PROSE_ANSWERS = [  # rllm / lighteval (Math-Verify anchors): which unboxed phrases count
    ("The answer is 17.", "17", True), ("Final Answer: 17", "17", True), (r"**Answer:** $\dfrac{2}{7}$", r"\frac27", True),
    ("Final Answer: The smallest $k$ is 12.", "12", True), (r"Answer \( 45 \)", "45", True),
    ("Final Answer: The final answer is $x \\in [2, 5)$. I hope it is correct.", "[2,5)", True),
    ("We try 17 first, then 19 and 23.", "23", False),            # no anchor: nothing read from reasoning
    ("That gives the correct answer of 63.", "63", False),        # "answer of": not a statement of it
    ("The answer is 17, but that breaks step two, so we go on with 19.", "19", False),
    ("The answer is 17.", "71", False),
]
BARE_COMPLETIONS = [  # Math-Verify tests/test_all.py test_matrix_extraction: a completion that is only a formula
    (r"$\begin{pmatrix} 3 \\ -1 \end{pmatrix}$", r"\begin{pmatrix} 3 \\ -1 \end{pmatrix}", True),
    (r"\begin{bmatrix} 0 & 1 \\ 1 & 0 \end{bmatrix}", r"\begin{pmatrix} 0 & 1 \\ 1 & 0 \end{pmatrix}", True),
    ("$even$", r"\text{even}", True),
    (r"$\begin{pmatrix} 3 \\ -1 \end{pmatrix}$", r"\begin{pmatrix} -1 \\ 3 \end{pmatrix}", False),
    ("the matrix is symmetric", r"\text{symmetric}", False),
]
JOINED_SPANS = [  # Math-Verify parser.py (spans joined by "," / "and" / "or"); Qwen2.5-Math parser.py ("答案是")
    ("The final answer is $3$ and $8$. I hope it is correct.", "3, 8", True),
    ("So the answer is $7$, $-1$.", "-1, 7", True), (r"**Answer:** $a=2$ and $b=5$", "a=2, b=5", True),
    ("The answer is $12$ or, simplified, $12$.", "12", True), ("所以答案是 $\\frac{3}{7}$。", "\\frac{3}{7}", True),
    ("答案是 42", "42", True),
    ("The final answer is $3$ and $8$. I hope it is correct.", "3", False), ("So the answer is $7$, $-1$.", "7", False),
    ("The answer is $5$ or $6$.", "5", False), ("所以答案是 $\\frac{3}{7}$。", "\\frac{7}{3}", False),
]
PEER_COMPLETIONS = {
    "joined_spans": JOINED_SPANS,
    "joined_boxes": JOINED_BOXES, "answer_precedence": ANSWER_PRECEDENCE, "prose_answers": PROSE_ANSWERS,
    "bare_completions": BARE_COMPLETIONS,
}


@pytest.mark.parametrize("family", list(PEER_FAMILIES))
def test_peer_family_both_orders(family):
    table = PEER_FAMILIES[family]
    assert any(want for _, _, want in table) and not all(want for _, _, want in table), "need both kinds"
    check_table(table)
    check_table([(g, p, want) for p, g, want in table])


@pytest.mark.parametrize("family", list(PEER_COMPLETIONS))
def test_peer_completions(family):
    """grade() on whole completions; the extracted answer is also compared in the other order."""
    table = PEER_COMPLETIONS[family]
    assert any(want for _, _, want in table) and not all(want for _, _, want in table), "need both kinds"
    failures = []
    for completion, gold, want in table:
        answer = extract_answer(completion)
        reverse = answer is not None and is_equiv(gold, answer)
        if grade(completion, gold) is not want or reverse is not want:
            failures.append(f"grade({completion!r}, {gold!r}) should be {want}; extracted {answer!r}")
    assert not failures, "\n".join(failures)


def test_prose_policy_reads_only_the_last_anchor():
    """An earlier "the answer is" is superseded by a later one, even if the later one states nothing."""
    assert extract_answer("I guess the answer is 5. Checking shows the answer is not obvious yet") is None
    assert extract_answer("I guess the answer is 5. Checking, the answer is 6.") == "6"
    assert extract_answer("The answer is $\\boxed{5}$ since the answer is positive.") == "5"   # the box
    assert extract_answer("The answer is 5.\n\n\\boxed{6}") == "6"                            # box later


def test_strict_think_protocol():
    """require_think_close=True (the paper's evaluation, rllm's grader): no </think>, no answer."""
    assert not grade("\\boxed{5}", "5", require_think_close=True)
    assert grade("\\boxed{5}", "5")                                  # default: as before
    assert grade("<think>maybe \\boxed{4}</think> so \\boxed{5}", "5", require_think_close=True)
    assert not grade("<think>maybe \\boxed{4}</think> so \\boxed{5}", "4", require_think_close=True)
    assert grade("reasoning</think>\nThe answer is \\boxed{5}.", "5", require_think_close=True)   # prompt held <think>
    assert not grade("<think>\\boxed{5} and then it was cut off", "5", require_think_close=True)
    assert not grade("</think>", "5", require_think_close=True)
    assert extract_answer("\\boxed{5}", require_think_close=True) is None
    assert extract_answer("a</think>b</think>\\boxed{7}", require_think_close=True) == "7"   # after the last one
    assert not grade("<think>a</think> The answer is 5.", "5", require_think_close=True)    # rllm: boxes only
    assert grade("<think>a</think> The answer is 5.", "5")
    assert not grade("<think>a</think> $5$", "5", require_think_close=True)


NEW_HOSTILE = [
    "\\sum_{k=1}^{n}" * 30 + "k", "\\lim_{x\\to 0}" * 30 + "x", "(x+1)^{2000} \\bmod 7", "2^{10^{20}} \\bmod 7",
    "{" * 30 + "1,2" + "}" * 30, "(x+1)^{10000}-x", "e^{10^{4} x}", "\\sum_{k=1}^{10^{100}} k^{k^{k}}",
    "\\begin{vmatrix}" + "\\\\".join("&".join(f"a_{i}{j}" for j in range(4)) for i in range(4)) + "\\end{vmatrix}",
    "\\begin{vmatrix}" + "\\\\".join(["1&" * 7 + "1"] * 8) + "\\end{vmatrix}", "-x" + "+x" * 3000 + "> -1",
    "1 < " + "x < " * 500 + "2", "(p,q)=" * 300 + "(1,2)", "x \\equiv 3 \\pmod{" * 40 + "5" + "}" * 40,
    "５" * 5000, "²" * 5000, "½" * 3000,
]


@pytest.mark.parametrize("index", range(len(NEW_HOSTILE)))
def test_new_notation_is_answered_within_bound(index):
    hostile = NEW_HOSTILE[index]
    for gold in ["5", "x", "(x+1)^{2000}", hostile]:
        verify._clear_caches()
        for completion in (f"\\boxed{{{hostile}}}", hostile):
            verdict, seconds = timed(grade, completion, gold)
            assert seconds < BOUND_S, (hostile[:40], gold[:40], seconds)
            assert isinstance(verdict, bool)


def test_new_notation_from_threads_is_bounded():
    jobs = [(f"\\boxed{{{h}}}", g) for h in NEW_HOSTILE for g in ("5", "x")]
    verify._clear_caches()
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda job: timed(grade, *job), jobs))
    assert all(isinstance(v, bool) for v, _ in results)
    assert max(s for _, s in results) < BOUND_S


@pytest.mark.parametrize("completion", [
    "\\boxed{" * 20000, "\\boxed{1} and " * 20000, "the answer is " * 20000, "Answer: " * 20000 + "5",
    "$" * 50000, "\\(" * 20000, "\\boxed{\\boxed{" * 5000 + "1" + "}}" * 5000,
])
def test_extraction_of_long_hostile_completions_is_bounded(completion):
    verdict, seconds = timed(grade, completion, "1")
    assert isinstance(verdict, bool) and seconds < BOUND_S


# ---------------------------------------------------------------------------------------------
# Issue 24 families: each acceptance beside its negative twin (zero false positives)
# ---------------------------------------------------------------------------------------------
INVERSE_TRIG = [
    (r"\sec^{-1} 2", r"\frac{\pi}{3}", True), (r"\csc^{-1}(2)", r"\frac{\pi}{6}", True), (r"\arcsec 2", r"\frac{\pi}{3}", True),
    (r"\arccsc 2", r"\frac{\pi}{6}", True), (r"\arccsc x", r"\arcsin \frac{1}{x}", True), (r"\operatorname{arcsec}(x)", r"\sec^{-1} x", True),
    (r"\tan^{-1} 1", r"\frac{\pi}{4}", True), (r"\sinh^{-1} 1", r"\ln(1+\sqrt{2})", True),
    (r"\sec^{-1} x", r"\cos x", False), (r"\csc^{-1} x", r"\sin x", False), (r"\sec^{-1} 2", r"\frac{1}{\sec 2}", False),
    (r"\arccsc 2", r"\frac{\pi}{3}", False), (r"\arcsec x", r"\arccos x", False), (r"\tan^{-1} 1", r"\cot 1", False),
    (r"\ln^{-1} x", r"\frac{1}{\ln x}", False),                     # ambiguous notation: compared as text only
]
ABSOLUTE_BARS = [
    ("||-3|-5|", "2", True), ("|2-|-7||", "5", True), ("|||-1|-2|-3|", "2", True), ("|-2||3|", "6", True),
    (r"\left|\left|x\right|-1\right|", "||x|-1|", True), (r"\lvert -4 \rvert \lvert 2 \rvert", "8", True), ("3|-2|", "6", True),
    ("||-3|-5|", "-2", False), ("|2-|-7||", "-5", False), ("|||-1|-2|-3|", "-6", False), ("|-2||3|", "-6", False),
    ("||x|-2|", "|x+2|", False), ("3|-2|", "-6", False),
    (r"\left|\begin{matrix} 1 & 2 \\ 3 & 4 \end{matrix}\right|", "-2", True),       # |A| of a matrix: its determinant
    (r"\left|\begin{matrix} 1 & 2 \\ 3 & 4 \end{matrix}\right|", "2", False),
]
SET_OPERATIONS = [
    (r"[1,3) \cup [2,5]", "[1,5]", True), (r"[1,3) \cap [2,5]", "[2,3)", True), (r"\mathbb{R} \setminus \{0\}", r"(-\infty,0)\cup(0,\infty)", True),
    (r"\{1,2,3\} \cap \{2,3,4\}", r"\{2,3\}", True), (r"\{1,2,3\} \setminus \{2\}", r"\{1,3\}", True),
    (r"[0,2] \setminus \{1\}", r"[0,1)\cup(1,2]", True), (r"(1,2)\cup\{2\}\cup(2,3)", "(1,3)", True),
    (r"(-\infty, 1] \cup [1, \infty)", r"\mathbb{R}", True), (r"[\sqrt{8}, 3] \cup [2\sqrt{2}, 4]", r"[2\sqrt{2}, 4]", True),
    (r"(0,1)\cap(2,3)", r"\emptyset", True), ("[1,2] ∩ [2,3]", r"\{2\}", True), (r"(0,5) \setminus [1,2]", r"(0,1) \cup (2,5)", True),
    (r"[1,3) \cup [2,5]", "[1,5)", False), (r"[1,3) \cap [2,5]", "[2,3]", False), (r"\mathbb{R} \setminus \{0\}", r"\mathbb{R}", False),
    (r"\{1,2,3\} \cap \{2,3,4\}", r"\{2,3,4\}", False), (r"[0,2] \setminus \{1\}", "[0,2]", False), (r"(1,2)\cup(2,3)", "(1,3)", False),
    (r"\mathbb{R}\backslash\{1\}", r"(-\infty, 1) \cup (1, \infty)", True), (r"\mathbb{R}\backslash\{1\}", r"(-\infty, 1]", False),
    (r"(0,1)\cap(2,3)", r"\{0\}", False), (r"(0,5) \setminus [1,2]", r"(0,1] \cup [2,5)", False), (r"\{a\} \cap \{b\}", r"\emptyset", False),
]
EMPTY_SETS = [
    ("∅", r"\emptyset", True), ("∅", r"\{\}", True), (r"\varnothing", r"\{ \}", True), ("∅", r"\varnothing", True),
    ("∅", "0", False), ("∅", r"\{0\}", False), (r"\emptyset", r"\{\emptyset\}", False), ("∅", "(0,1)", False),
    ("ℝ", r"(-\infty, \infty)", True), (r"ℝ \setminus \{0\}", r"(-\infty,0) ∪ (0,\infty)", True), ("ℝ", r"[0, \infty)", False),
]
CLOSED_FORMS = [
    (r"\sum_{k=1}^{10} k", "55", True), (r"\sum_{k=1}^{4} \frac{1}{k}", r"\frac{25}{12}", True), (r"\prod_{j=1}^{5} j", "120", True),
    (r"\sum_{i=1}^{3} x^i", "x+x^2+x^3", True), (r"\sum_{i=1}^{3}\sum_{j=1}^{i} ij", "25", True), (r"\sum_{k=-2}^{2} k^2", "10", True),
    (r"\lim_{x\to 0} \frac{\sin x}{x}", "1", True), (r"\lim_{x \to \infty} \left(1+\frac{1}{x}\right)^x", "e", True),
    (r"\lim_{n\to\infty} \frac{2n+1}{n}", "2", True), (r"\lim_{x\to 0}\frac{1-\cos x}{x^2}", r"\frac{1}{2}", True),
    (r"\lim_{x\to 0}\frac{1-\cos x}{x^2}", "1", False), (r"\lim_{x\to 0^+} \sin(2\pi \log_{10} x)", "0", False),  # no limit (r"\lim_{x\to 0^+} \frac{|x|}{x}", "1", True),
    (r"\int_0^1 x^2 \, dx", r"\frac{1}{3}", True), (r"\int_{0}^{\pi} \sin x \, \mathrm{d}x", "2", True), (r"\int_0^a x\,dx", r"\frac{a^2}{2}", True),
    (r"\det \begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}", "-2", True), (r"\det\left(\begin{matrix} a & b \\ c & d\end{matrix}\right)", "ad-bc", True),
    (r"\sum_{k=1}^{10} k", "56", False), (r"\prod_{j=1}^{5} j", "24", False), (r"\sum_{k=-2}^{2} k^2", "5", False),
    (r"\lim_{x\to 0} \frac{\sin x}{x}", "0", False), (r"\lim_{x \to \infty} \left(1+\frac{1}{x}\right)^x", "1", False),
    (r"\lim_{x\to 0} \frac{|x|}{x}", "1", False), (r"\lim_{x\to 0^-} \frac{|x|}{x}", "1", False), (r"\lim_{x\to 0} \sin\frac{1}{x}", "0", False),
    (r"\int_0^1 x^2 \, dx", r"\frac{1}{2}", False), (r"\int_0^1 \frac{1}{x} \, dx", "100", False), (r"\int_0^a x\,dx", "a^2", False),
    (r"\det \begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}", "2", False), (r"\det \begin{bmatrix} 2 & 0 \\ 0 & 3 \end{bmatrix}", "5", False),
    (r"\sum_{k=1}^{10^{100}} k", "5", False), (r"\sum_{k=1}^{100} k^{k^k}", "5", False),   # huge: inert, bounded
]
ISSUE24_FAMILIES = {
    "inverse_trig": INVERSE_TRIG, "absolute_bars": ABSOLUTE_BARS, "set_operations": SET_OPERATIONS,
    "empty_sets": EMPTY_SETS, "closed_forms": CLOSED_FORMS,
}


@pytest.mark.parametrize("family", list(ISSUE24_FAMILIES))
def test_issue24_family_both_orders(family):
    table = ISSUE24_FAMILIES[family]
    assert sum(want for _, _, want in table) >= 4 and sum(not want for _, _, want in table) >= 4
    check_table(table)
    check_table([(g, p, want) for p, g, want in table])


NUMERIC_GOLDS = [  # (completion, gold as JSON gives it, expected): a number gold is that number
    (r"\boxed{10^{-7}}", 1e-07, True), (r"\boxed{1e-07}", 1e-07, True), (r"\boxed{0.0000001}", 1e-07, True),
    (r"\boxed{1e-7}", 1e-07, True), (r"\boxed{2.5}", 2.5, True), (r"\boxed{\frac{5}{2}}", 2.5, True),
    (r"\boxed{1,000,000}", 1000000, True), (r"\boxed{10^6}", 1000000, True), (r"\boxed{1e16}", 1e16, True), (r"\boxed{7}", 7.0, True),
    (r"\boxed{-3}", -3, True), ("The answer is $\\frac{1}{5}$.", 0.2, True), (r"\boxed{1 \times 10^{-7}}", "1e-07", True),
    (r"\boxed{e-7}", 1e-07, False), (r"\boxed{1e-06}", 1e-07, False), (r"\boxed{2.51}", 2.5, False), (r"\boxed{100000}", 1000000, False),
    (r"\boxed{7.5}", 7.0, False), (r"\boxed{3}", -3, False), (r"\boxed{1}", True, False), (r"\boxed{0}", float("nan"), False),
    (r"\boxed{1e-07}", "e-7", False),                # "1e-07" is a number literal: never e - 7
    (r"\boxed{2e-1}", 0.2, True), (r"\boxed{2e-1}", "0.2", False),   # a string gold keeps LaTeX's 2e - 1
    (r"\boxed{10^{-10}}", str(1e-10), True), (r"\boxed{e-10}", str(1e-10), False),   # a loader's str(1e-10)
    (r"\boxed{2.5 \times 10^{16}}", str(2.5e16), True), (r"\boxed{0.2}", "2e-1", False),
]


def test_numeric_gold_is_compared_as_that_number():
    failures = [(c, g, want) for c, g, want in NUMERIC_GOLDS if grade(c, g) is not want]
    assert not failures, failures
    assert is_equiv("0.0000001", 1e-07) and is_equiv(r"10^{-7}", 1e-07) and not is_equiv("e-7", 1e-07)
    assert grade(r"\boxed{" + "9" * 5000 + "}", 10**5000 - 1) and not grade(r"\boxed{9}", 10**5000 - 1)


# Repetition loops (issue 24): one unit repeated to a 32k-token limit, after or before a correct box.
LOOP_UNITS = ["\\(", "\\[", "$", "$$", "\\boxed{", "{", "7", "\\begin{pmatrix}", "|", "\\frac{", "\\left(",
              "The answer is 5. ", "\\boxed{1} and ", "Final answer: ", "\\( x", "1,"]


@pytest.mark.parametrize("unit", LOOP_UNITS)
def test_repetition_loop_never_hides_the_box(unit):
    loop = unit * (100_000 // len(unit))
    for completion, want in ((f"so the answer is $\\boxed{{42}}$. {loop}", unit != "\\boxed{1} and "),
                             (f"{loop}\nSo the final answer is $\\boxed{{42}}$.", True)):
        verdict, seconds = timed(grade, completion, "42")
        assert verdict is want and seconds < BOUND_S, (unit, completion[:60], verdict, seconds)
        assert not grade(completion, "41")
    if "boxed" not in unit:                                   # (a loop of boxes is a later answer)
        assert grade(f"\\boxed{{42}} The final answer is $42$ and {loop}", "42")
    assert extract_answer("so \\boxed{\\frac{1}{2") is None                # a truncated box is still no answer


SPLIT_RUNS = [  # inputs that made a regex try every way of splitting one run between two quantifiers
    "1^\\text" + " " * 9000 + "x", "\\mathbb" + " " * 9000 + "x", "a_" + " " * 9000 + "x", "1" + " 000" * 2400 + "1",
    "a=" + "1 : " * 2400 + "x", "x" + " {, }" * 1800,
]


@pytest.mark.parametrize("index", range(len(SPLIT_RUNS)))
def test_no_regex_backtracks_over_an_answer(index):
    answer = SPLIT_RUNS[index]
    for completion in (f"\\boxed{{{answer}}}", f"The answer is ${answer}$", "The answer is " + "$a$ or " * 15000 + "Q"):
        verify._clear_caches()
        verdict, seconds = timed(grade, completion, "5")
        assert verdict is False and seconds < BOUND_S, (answer[:20], completion[:30], seconds)


def test_grade_from_threads_matches_one_thread_in_fresh_processes():
    """Two fresh processes, 200 pairs each, graded first from 8 threads (imports and caches cold),
    then from one: the verdicts must be identical (scripts/bench_degenerate.py runs 20 x 1,000+)."""
    from scripts import bench_degenerate
    result = bench_degenerate.thread_check(processes=2, pairs=200, threads=8, timeout_s=240, heavy_copies=2)
    assert result["processes_ok"] == 2, result
    assert result["differing_verdicts"] == 0 and result["pairs_per_process"] == 200, result


# ---------------------------------------------------------------------------------------------
# Safety and bounds
# ---------------------------------------------------------------------------------------------
def test_injection_is_inert_and_never_evaluated(tmp_path, monkeypatch):
    """Python inside a box is parsed as (failing) LaTeX: nothing runs. eval and sympy's string parser
    are trapped while grading, so any use of them would fail this test."""
    marker = tmp_path / "pwned"
    payloads = [f"__import__('os').system('touch {marker}')", f"\\text{{__import__('os').system('touch {marker}')}}",
                f"eval(\"open('{marker}', 'w')\")", "lambda: 0", "exec('import os')", "().__class__.__bases__[0]"]
    forms = [("\\frac{x^2-1}{x-1}", "x+1"), ("y-2x=3", "y=2x+3"), ("\\log_2 8", "3"), ("0.333333", "\\frac13"),
             ("(1,2) \\cup (3,4)", "(3,4)\\cup(1,2)"), ("\\sqrt{8}", "2\\sqrt2")]
    for p, g in forms:                                   # warm up: sympy imports some modules lazily
        assert is_equiv(p, g)
    verify._clear_caches()

    def forbidden(*args, **kwargs):
        raise AssertionError("eval/parse_expr called on model output")
    import sympy.parsing.sympy_parser as sympy_parser
    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(sympy_parser, "parse_expr", forbidden)
    for payload in payloads:
        assert not grade(f"\\boxed{{{payload}}}", "0")
        assert not grade(payload, "0")
        assert not is_equiv(payload, "1")
    for p, g in forms:
        assert is_equiv(p, g)
    assert not marker.exists()
    source = (ROOT / "verify.py").read_text()
    for name in ("sympify(", "parse_expr(", "eval(", "exec(", "lambdify(", "parse_latex("):
        assert name not in source, name


FIVE_THOUSAND_DIGITS = "7" * 5000
HANG_INPUTS = [
    "9^{9^{9^9}}", "1000000000!", "(x+1)^{100000}", "10^{10^{10^{10}}}", "2^{2^{2^{2^{2^{2}}}}}",
    "\\binom{1000000000}{500000000}", "\\binom{-1000000}{1000000}", "(10^{5000}x)^{1000}",
    "\\sqrt{2}^{1000000000}", "2^{1000000000/3}", "(1+\\sqrt{2})^{100000}", "0.5^{100000}", "1e100000",
    "(" * 200 + "1" + ")" * 200, "\\frac{1}{" * 200 + "2" + "}" * 200, "\\sqrt{" * 200 + "2" + "}" * 200,
    "x^{" * 200 + "2" + "}" * 200, "-" * 5000 + "1", "x" * 9000, "1+" * 4000 + "1",
    FIVE_THOUSAND_DIGITS, FIVE_THOUSAND_DIGITS + "+1", f"\\sqrt{{{FIVE_THOUSAND_DIGITS}}}",
    f"\\sqrt[3]{{{FIVE_THOUSAND_DIGITS}1}}", f"\\sin({FIVE_THOUSAND_DIGITS})", f"\\log({FIVE_THOUSAND_DIGITS})",
    "\\sin(10^{10^{5}})", "(a+b+c+d+e+f)^{30}", "2^{10^{20}} - 2^{10^{20}}", "10^{9000} \\cdot 10^{9000} \\cdot 10^{9000}",
    "\\begin{pmatrix}" + "1&" * 2000 + "1\\end{pmatrix}", ",".join(["1"] * 3000), "\\frac{1}{0}", "0^{-1}",
    "+".join(f"\\sqrt{{{k}}}" for k in range(2, 300)),
]
HANG_GOLDS = ["5", "x", "(x+1)^{100000}", "+".join(f"\\sqrt{{{k}}}" for k in range(299, 1, -1))]


@pytest.mark.parametrize("index", range(len(HANG_INPUTS)))
def test_hostile_input_is_answered_within_bound(index):
    hostile = HANG_INPUTS[index]
    for gold in HANG_GOLDS + [hostile, "2" + hostile]:
        verify._clear_caches()
        verdict, seconds = timed(grade, f"\\boxed{{{hostile}}}", gold)
        assert seconds < BOUND_S, (hostile[:40], gold[:40], seconds)
        assert isinstance(verdict, bool)
        if gold == hostile:
            assert verdict                               # identical strings always match
        if gold == "5":
            assert not verdict


def test_frozen_values_compare_structurally():
    """Past the exact-size limit values stay unevaluated but identical structures still match."""
    assert is_equiv("9^{9^{9^9}}", "9^{9^{387420489}}")          # the small inner power is evaluated
    assert not is_equiv("9^{9^{9^9}}", "9^{9^{9^8}}")
    assert is_equiv("1000000000!", "1000000000 !")
    assert not is_equiv("1000000000!", "1000000001!")
    assert is_equiv("2^{2^{2^{2^{2}}}}", "2^{65536}")            # 19,729 digits: still exact
    assert not is_equiv("2^{65536}", "2^{65536}+1")


def test_hostile_input_from_threads_is_bounded():
    """No signals: calls from worker threads are bounded by the same deadline."""
    jobs = [(f"\\boxed{{{h}}}", g) for h in HANG_INPUTS[:20] for g in ("5", "x")]
    verify._clear_caches()

    def run(job):
        return timed(grade, *job)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, jobs))
    assert all(isinstance(v, bool) for v, _ in results)
    assert max(s for _, s in results) < BOUND_S
    with ThreadPoolExecutor(max_workers=4) as pool:                 # correct answers still work in threads
        assert all(pool.map(lambda p: grade(*p), [("\\boxed{\\frac{1}{2}}", "0.5"), ("\\boxed{x=5}", "5")] * 10))


def test_deadline_is_a_backstop(monkeypatch):
    """With no time left a comparison answers False instead of running on; the failure is not cached."""
    verify._clear_caches()
    monkeypatch.setattr(verify, "TIME_BUDGET_S", 0.0)
    assert not is_equiv("\\frac{2}{4}", "\\frac{1}{2}")
    monkeypatch.setattr(verify, "TIME_BUDGET_S", 1.5)
    assert is_equiv("\\frac{2}{4}", "\\frac{1}{2}")


@pytest.mark.parametrize("completion,gold", [
    (None, "5"), (5, "5"), (b"\\boxed{5}", "5"), ("\\boxed{5}", None), ("\\boxed{\\}", "5"), ("\\boxed{}{", "5"),
    ("\\boxed{\\frac}", "5"), ("\\boxed{\\sqrt[}", "5"), ("\\boxed{((}", "5"), ("\\boxed{\\begin{pmatrix}}", "5"),
    ("\\boxed{^^^}", "5"), ("\\boxed{\\log 0}", "5"), ("\\boxed{0^0}", "1"), ("\\boxed{x_}", "5"), ("\\boxed{1_{x}}", "5"),
    ("\\boxed{\\frac{1}{0}}", "\\frac{1}{0}"), ("\\boxed{5}", "}{"), ("\\boxed{\x00}", "\x00"), ("\\boxed{\ud800}", "5"),
    ("\\boxed{" + "\\left(" * 50 + "}", "5"), ("\\boxed{\\text{" + "a" * 20000 + "}}", "5"),
])
def test_exceptions_never_escape_grade(completion, gold):
    assert isinstance(grade(completion, gold), bool)
    assert isinstance(is_equiv(completion, gold), bool)


def test_integer_answers_are_fast():
    """The common case: thousands of integer-answer traces must not be the bottleneck."""
    completion = "Let me think about this. " * 800 + "So the answer is $\\boxed{204}$."
    verify._clear_caches()
    _, seconds = timed(lambda: [grade(completion.replace("204", str(k)), str(k)) for k in range(1000)])
    assert seconds < 1.0, f"{seconds * 1000:.2f} ms per call"


# ---------------------------------------------------------------------------------------------
# CLI and benchmark script
# ---------------------------------------------------------------------------------------------
def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "verify.py"), *args], capture_output=True, text=True, timeout=60)


def test_cli_prints_verdict_and_parsed_forms():
    ok = run_cli("The answer is \\boxed{025}.", "25")
    assert ok.returncode == 0, ok.stderr
    assert "pred answer: 025" in ok.stdout and "pred parsed: 25" in ok.stdout
    assert "gold parsed: 25" in ok.stdout and "verdict: equivalent" in ok.stdout
    bad = run_cli("(1, 3)", "\\{1,2\\}")
    assert bad.returncode == 1
    assert "tuple(1, 3)" in bad.stdout and "set{1, 2}" in bad.stdout and "verdict: not equivalent" in bad.stdout


def test_cli_accepts_answers_beginning_with_a_dash():
    """Every argument is an answer (python verify.py -x -x), except a lone -h; usage errors exit 2
    in common.cli's style. Two real subprocesses; the other cases call main() in-process."""
    same = run_cli("-x", "-x")
    assert same.returncode == 0 and "verdict: equivalent" in same.stdout, same.stderr
    usage = run_cli("5")
    assert usage.returncode == 2 and "verify.py: error:" in usage.stderr and "Traceback" not in usage.stderr
    assert verify.main(["-x", "x"]) == 1
    assert verify.main(["--", "-5", "-5"]) == 0
    assert verify.main(["-2\\frac{1}{2}", "-2.5"]) == 0
    for argv, code in ((["-5", "--", "-5"], 2), (["-h"], 0)):      # three answers: a usage error
        with pytest.raises(SystemExit) as stop:
            verify.main(argv)
        assert stop.value.code == code


def test_cli_strict_think_flag(capsys):
    assert verify.main(["--require-think-close", "\\boxed{5}", "5"]) == 1
    assert "no answer after </think>" in capsys.readouterr().out
    assert verify.main(["--require-think-close", "<think>a</think>\\boxed{5}", "5"]) == 0
    assert verify.main(["\\boxed{5}", "5"]) == 0


def test_benchmark_runs_without_math_verify(tmp_path, monkeypatch):
    from scripts import bench_verify
    monkeypatch.setattr(bench_verify, "load_math_verify", lambda: None)
    out = tmp_path / "verify.json"
    assert bench_verify.main(["--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["math_verify"] is None
    ours = result["ours"]
    assert ours["math500_gold"]["accepted"] == 500
    assert ours["math500_shifted"]["accepted"] <= 5
    assert ours["challenge"]["agree_with_expected"] == ours["challenge"]["pairs"]
    assert ours["math500_pairs_per_second"] > 0
    peer = {k: v for k, v in ours.items() if k.startswith("peer:")}
    assert len(peer) == len(PEER_FAMILIES) + len(PEER_COMPLETIONS)
    assert all(v["agree_with_expected"] == v["pairs"] for v in peer.values())
    assert 0 < ours["slowest_pair"]["seconds"] < BOUND_S
    assert not list(tmp_path.glob("*.tmp"))                       # written atomically
