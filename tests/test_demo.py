"""The demo: its synthetic teacher (errors concentrated on long carry chains), the protocol's bookkeeping, and
the whole pipeline end to end in --quick mode (so CI guards it)."""

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from scripts import demo, demo_base
import data
import verify

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("a, b", [(47, 38), (100, 100), (999, 999), (555, 445), (123, 877), (178, 825)])
def test_correct_teacher_traces_grade_correct(a, b):
    trace = demo.teacher_trace(a, b)
    assert verify.extract_answer(trace) == str(a + b)
    assert verify.grade(trace, str(a + b))


@pytest.mark.parametrize("a, b, carries, chain", [
    (123, 456, [0, 0, 0], (0, 0)),
    (159, 141, [1, 1, 0], (2, 0)),   # 9+1=10, 5+4+1=10, 1+1+1=3
    (178, 825, [1, 1, 1], (3, 0)),
    (191, 318, [0, 1, 0], (1, 1)),   # 1+8=9, 9+1=10, 1+3+1=5
    (519, 191, [1, 1, 0], (2, 0)),
])
def test_carries_and_longest_chain(a, b, carries, chain):
    assert demo.carry_outs(a, b) == carries
    assert demo.longest_carry_chain(a, b) == chain


def test_dropped_carry_is_the_error_family():
    # 178 + 825 = 1003; forgetting the carry into tens, hundreds or the final carry.
    assert demo.dropped_carry_answers(178, 825) == {993, 903, 3}
    assert demo.dropped_carry_answers(123, 456) == set()
    for a, b in demo.make_problems(200, seed=5):
        for column, carry in enumerate(demo.carry_outs(a, b)):
            if carry:
                trace = demo.teacher_trace(a, b, drop_carry_into=column + 1)
                answer = int(verify.extract_answer(trace))
                assert answer == a + b - 10 ** (column + 1) and answer in demo.dropped_carry_answers(a, b)
                assert not verify.grade(trace, str(a + b))


def test_dropped_carry_shares_the_rest_of_the_reasoning():
    right, wrong = demo.teacher_trace(159, 141), demo.teacher_trace(159, 141, drop_carry_into=1)
    assert right.splitlines()[0] == wrong.splitlines()[0] == "Add the ones: 9 + 1 = 10. Write 0, carry 1."
    assert "Add the tens: 5 + 4 = 9. Write 9." in wrong and "\\boxed{290}" in wrong
    assert "Add the tens: 5 + 4 + 1 = 10. Write 0, carry 1." in right and "\\boxed{300}" in right


def test_final_slip_is_wrong_and_outside_the_family():
    for a, b in demo.make_problems(50, seed=3):
        for slip in (-1, 1):
            trace = demo.teacher_trace(a, b, final_slip=slip)
            assert not verify.grade(trace, str(a + b))
            assert int(verify.extract_answer(trace)) not in demo.dropped_carry_answers(a, b)


def test_teacher_errs_only_where_told():
    """drop_carry by chain length: here only chains of 2+ fail, always; no slips. The profile counts it."""
    teacher = {"drop_carry": [0.0, 0.0, 1.0, 1.0], "final_slip": 0.0}
    rng = random.Random(0)
    for a, b in demo.make_problems(300, seed=7):
        trace, mistake = demo.teacher_generation(a, b, rng, teacher)
        hard = demo.longest_carry_chain(a, b)[0] >= 2
        assert (mistake == "dropped_carry") == hard and verify.grade(trace, str(a + b)) != hard


def test_teacher_profile(tmp_path):
    teacher = {"drop_carry": [0.0, 0.0, 1.0, 1.0], "final_slip": 0.0}
    problems = [(123, 456), (159, 141), (178, 825)]
    profile = demo.write_raw_generations(tmp_path / "raw.jsonl", problems, 3, teacher, seed=0)
    assert profile == {"0": {"problems": 1, "traces": 3, "wrong_traces": 0, "no_correct_trace": 0},
                       "2": {"problems": 1, "traces": 3, "wrong_traces": 3, "no_correct_trace": 1},
                       "3": {"problems": 1, "traces": 3, "wrong_traces": 3, "no_correct_trace": 1}}
    rows = [json.loads(line) for line in open(tmp_path / "raw.jsonl")]
    assert [r["answer"] for r in rows] == ["579", "300", "1003"] and all(len(r["generations"]) == 3 for r in rows)


def test_base_corpus_has_the_teachers_habit_far_more_often():
    """The pretrained base's corpus (scripts/demo_base.py), measured per carry-chain length on 4,000 documents:
    its error rate is the writer's drop-carry rate (within 4 binomial standard errors), every error is a
    dropped carry (the teacher's family), no easy problem is wrong, and it errs far more than the teacher."""
    writer, teacher = demo.FULL["corpus_writer"], demo.FULL["teacher"]
    problems = demo.make_problems(4000, seed=11)
    documents, profile = demo_base.write_corpus(problems, writer, seed=3)
    assert len(documents) == 4000 and sum(p["documents"] for p in profile.values()) == 4000
    assert profile["0"]["wrong"] == 0
    for length, stats in profile.items():
        rate, n = writer["drop_carry"][int(length)], stats["documents"]
        assert stats["dropped_carry"] == stats["wrong"] and stats["error_rate"] == stats["wrong"] / n
        assert abs(stats["error_rate"] - rate) <= 4 * math.sqrt(rate * (1 - rate) / n) + 1e-9, length
    for length in (1, 2, 3):
        assert writer["drop_carry"][length] >= teacher["drop_carry"][length] + 0.2
    # A document is the chat as the qwen template writes it, closed by <|im_end|>; its answer is graded.
    (a, b), doc = problems[0], documents[0]
    assert doc.startswith("<|im_start|>system\n" + data.SYSTEM_PROMPT) and doc.endswith("<|im_end|>\n")
    assert f"<|im_start|>user\nWhat is {a} + {b}?<|im_end|>\n<|im_start|>assistant\nAdd the ones:" in doc


def test_corpus_problems_hard_share():
    exclude = frozenset(demo.make_problems(50, seed=9))
    problems = demo.problems_with_hard_share(1000, seed=4, hard_share=0.6, exclude=exclude)
    assert len(set(problems)) == 1000 and not set(problems) & exclude
    assert sum(demo.longest_carry_chain(a, b)[0] >= 2 for a, b in problems) == 600


def test_pretraining_learns_and_premise_logps(tmp_path):
    """A few pretraining steps lower the next-token loss and save a checkpoint that evaluate.py can load; the
    premise's log-probs are per-token means over the pairs, chosen and rejected."""
    problems = demo.make_problems(40, seed=2)
    documents, _ = demo_base.write_corpus(problems, demo.FULL["corpus_writer"], seed=0)
    demo.make_init_checkpoint(tmp_path / "init", documents, demo.QUICK["model"], seed=0)
    losses = demo_base.pretrain(tmp_path / "init", tmp_path / "base", documents, steps=12, batch_size=8, lr=3e-3,
                                seed=0)
    assert losses[0]["step"] == 1 and losses[-1]["step"] == 12 and losses[-1]["loss"] < losses[0]["loss"] - 0.5
    rows = [{"prompt": [{"role": "user", "content": demo.problem_text(159, 141)}],
             "chosen": demo.teacher_trace(159, 141), "rejected": demo.teacher_trace(159, 141, drop_carry_into=1)}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 3))
    result = demo_base.pair_logps_per_token(tmp_path / "base", tmp_path / "pairs.jsonl", max_pairs=2,
                                            pairs_per_forward=1)
    assert result["pairs"] == 2 and -20 < result["logp_per_token_chosen"] < 0
    assert -20 < result["logp_per_token_rejected"] < 0


def test_splits_are_disjoint():
    train = demo.make_problems(500, seed=0)
    val = demo.make_problems(100, seed=1000, exclude=frozenset(train))
    test = demo.make_problems(100, seed=2000, exclude=frozenset(train) | frozenset(val))
    assert len(set(train)) == 500 and len(set(val)) == 100 and len(set(test)) == 100
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)


def test_choose_lr_best_validation_ties_to_smaller():
    assert demo.choose_lr({"1e-05": 0.5, "4e-05": 0.6}) == 4e-5
    assert demo.choose_lr({"4e-05": 0.6, "1e-05": 0.6, "2.5e-06": 0.1}) == 1e-5


def test_mean_std():
    assert demo.mean_std([0.5]) == (0.5, None)
    mean, std = demo.mean_std([0.2, 0.4, 0.9])
    assert mean == pytest.approx(0.5) and std == pytest.approx(math.sqrt(((0.3**2) + 0.1**2 + 0.4**2) / 2))


def test_error_profile(tmp_path):
    problems = {"t-0": (178, 825), "t-1": (123, 456)}  # chain 3 (hard), chain 0
    rows = [{"id": "t-0", "correct": False, "answer": "993"},   # dropped carry into tens
            {"id": "t-0", "correct": False, "answer": "1004"},  # something else
            {"id": "t-0", "correct": True, "answer": "1003"},
            {"id": "t-1", "correct": False, "answer": None},
            {"id": "t-1", "correct": True, "answer": "579"}]
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert demo.error_profile(path, problems) == {"samples": 5, "wrong": 3, "wrong_in_teacher_family": 1,
                                                  "wrong_on_hard": 2, "samples_on_hard": 3}
    pooled = demo.pooled([demo.error_profile(path, problems)] * 2)
    assert pooled["wrong"] == 6 and pooled["share_in_teacher_family"] == pytest.approx(1 / 3)
    assert pooled["share_on_hard"] == pytest.approx(2 / 3) and pooled["hard_share_of_samples"] == pytest.approx(0.6)


def test_bad_flags_are_one_line_errors(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "scripts.demo", "--seeds", "0", "--out", str(tmp_path / "d")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == "demo.py: error: --seeds must be >= 1, got 0"


def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "scripts.demo", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_quick_demo(out)
    # A finished demo is never overwritten silently.
    again = subprocess.run([sys.executable, "-m", "scripts.demo", "--quick", "--out", str(out)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "--fresh" in again.stderr


def check_quick_demo(out):
    """results.json's structure, and every number in it traced back to the files it came from."""
    with open(out / "results.json") as f:
        results = json.load(f)
    seed_dir = out / "seed-0"
    assert results["settings"]["seeds"] == [0]
    plan = results["settings"]["plan"]
    for name in demo.MODELS:
        r = results[name]
        assert set(r) >= {"pass@1", "std", "seeds", "lr", "premise"}, name
        assert r["std"] is None and len(r["seeds"]) == 1 and r["pass@1"] == r["seeds"][0]
        assert r["vs_sft_start"]["seeds"] == [r["pass@1"] - results["sft_start"]["pass@1"]]
        samples = [json.loads(line) for line in open(seed_dir / "eval" / "test" / name / "samples.jsonl")]
        n = int(plan["test_eval"][plan["test_eval"].index("--num-samples") + 1])
        assert len(samples) == plan["test_problems"] * n
        assert r["pass@1"] == pytest.approx(sum(s["correct"] for s in samples) / len(samples)), name
        assert r["errors"]["wrong"] == sum(not s["correct"] for s in samples)
        assert r["premise"]["wrong"] == r["errors"]["wrong"], name
        if name not in ("base", "sft_start"):
            run_dir = seed_dir / "stage2" / f"{name}-lr{r['lr'][0]:g}"
            assert r["lr"][0] in plan["lrs"] and (run_dir / "config.json").exists(), name
    # The base: pretrained once (out/base), evaluated as it is; its corpus's profile and losses reported.
    assert (out / "base" / "config.json").exists() and results["base"]["lr"] == [None]
    pretraining = results["base_pretraining"]
    assert pretraining["steps"] == plan["pretrain"]["steps"] and pretraining["losses"][-1]["step"] == pretraining["steps"]
    assert sum(p["documents"] for p in pretraining["corpus"].values()) == plan["corpus_problems"]
    # The premise, as the issue names it: the SFT start's, with its parts traced to the samples.
    premise = results["premise"]
    assert set(premise) >= {"student_errors_in_teacher_family", "logp_per_token_chosen", "logp_per_token_rejected"}
    errors = results["sft_start"]["errors"]
    assert premise["student_errors_in_teacher_family"] == errors["wrong_in_teacher_family"] / max(errors["wrong"], 1)
    assert premise["logp_per_token_chosen"] < 0 and premise["logp_per_token_rejected"] < 0
    assert premise["per_seed"][0]["pairs"] == min(plan["premise_pairs"], results["data"][0]["pairs_rows"])
    # Every Stage 2 run takes the same number of steps: one epoch over the pairs.
    steps = results["data"][0]["stage2_steps"]
    assert steps == math.ceil(results["data"][0]["pairs_rows"] / plan["stage2_batch"])
    for name in demo.STAGE2:
        run_dir = seed_dir / "stage2" / f"{name}-lr{results[name]['lr'][0]:g}"
        rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
        assert rows[-1]["step"] == steps, name
    story = results["alpha_story"]
    assert story["lr"] == max(plan["lrs"])
    for name in demo.STORY:
        assert list(story[name]["val_pass@1"])[0] == "0" and list(story[name]["val_pass@1"])[-1] == str(steps)
        assert len(story[name]["val_pass@1"]) >= 3 and len(story[name]["logps"]) == steps
    tables = (out / "tables.md").read_text()  # the README's tables, one row per model and one per seed
    assert all(f"| {demo.LABELS[name]} |" in tables for name in demo.MODELS) and "\n| 0 | " in tables
    pytest.importorskip("matplotlib")
    assert results["figures"] == ["accuracy.png", "premise.png", "logps.png", "alpha_story.png"]
    for figure in results["figures"]:
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
