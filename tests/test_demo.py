"""The demo: its synthetic teacher, and the whole pipeline end to end in --quick mode (so CI guards it)."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from scripts import demo
import verify

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("a, b", [(47, 38), (100, 100), (999, 999), (555, 445), (123, 877)])
def test_correct_teacher_traces_grade_correct(a, b):
    trace = demo.teacher_trace(a, b, random.Random(0))
    assert verify.extract_answer(trace) == str(a + b)
    assert verify.grade(trace, str(a + b))


@pytest.mark.parametrize("mistake", demo.MISTAKES)
def test_teacher_mistakes_give_wrong_answers(mistake):
    rng = random.Random(1)
    for a, b in demo.make_problems(50, seed=3):
        trace = demo.teacher_trace(a, b, rng, mistake)
        assert not verify.grade(trace, str(a + b)), (a, b, mistake, trace)


def test_dropped_carry_drops_a_carry():
    trace = demo.teacher_trace(47, 38, random.Random(0), "dropped_carry")
    assert "7 + 8 = 15. Write 5, carry 1." in trace
    assert "Add the tens: 4 + 3 = 7." in trace and "\\boxed{75}" in trace


def test_eval_problems_are_held_out():
    train = demo.make_problems(500, seed=0)
    held_out = demo.make_problems(100, seed=1, exclude=frozenset(train))
    assert len(set(train)) == 500 and not set(train) & set(held_out)


def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "scripts.demo", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "data" / "report.json") as f:
        report = json.load(f)
    assert report["sft_rows"] > 0 and report["pairs_rows"] > 0 and report["labelled_by_verifier"] > 0
    with open(out / "results.json") as f:
        results = json.load(f)
    assert list(results) == ["base", "sft", "redi", "redi_symmetric", "dpo", "simpo", "weighted"]
    for name, r in results.items():
        assert 0.0 <= r["pass@1"] <= 1.0 and 0.0 <= r["maj@2"] <= 1.0, name
        samples = [json.loads(line) for line in open(out / "eval" / name / "samples.jsonl")]
        assert len(samples) == r["samples"] == 12
        assert r["pass@1"] == pytest.approx(sum(s["correct"] for s in samples) / len(samples))
    for name in ["sft", "redi", "dpo", "simpo", "weighted"]:
        assert (out / name / "config.json").exists() and (out / name / "metrics.jsonl").exists()
    # A finished demo is never overwritten silently.
    again = subprocess.run([sys.executable, "-m", "scripts.demo", "--quick", "--out", str(out)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "--fresh" in again.stderr
