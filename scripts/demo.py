"""`make demo`: the paper's experiment in miniature, on a laptop CPU, through the same command lines a real
run uses. `python -m scripts.demo --seeds 5` repeats it over seeds (the README's study table).

  1. A synthetic teacher solves three-digit additions column by column and errs the way a reasoning model
     does: rarely on easy problems, often on hard ones. Hardness is the longest carry chain (columns in a row
     that each produce a carry); the teacher's typical mistake forgets a carry that arrives inside that chain
     and carries the consequence honestly to \\boxed{}, so a wrong trace shares all its other steps with a
     correct one. A rare slip of the last digit is the teacher's only mistake on easy problems.
  2. A pretrained base, the miniature of the paper's Qwen2.5-Math-1.5B (scripts/demo_base.py): a tiny Qwen2
     (a byte-level BPE tokenizer trained on the toy's text, ChatML tokens) pretrained by next-token
     prediction on an unlabelled corpus of the task written by a noisier writer with the teacher's habit
     (it forgets a carry inside a chain far more often than the teacher), once for every seed. data.py
     labels the teacher's traces with verify.py (sft / pairs / groups files).
  3. The paper's protocol (Xu et al. 2025, Sec. 3.2 and App. C.3-C.4): Stage 1 SFT from the base, kept short
     so that the student still has the teacher's habit (the premise; a longer Stage 1 erases it, measured in
     README); Stage 2 from it, the same number of steps for REDI (α = 0.8), symmetric REDI (α = 1), DPO,
     SimPO and reward-weighted NLL (AdvDistill), each with its learning rate chosen on a validation split
     disjoint from the test split. Two controls the paper lacks: SFT continued for the same number of steps,
     and REDI with α = 0 (its positive term alone, same length normalisation), so the effect of the
     negatives themselves is isolated.
  4. Test pass@1 (evaluate.py, graded by verify.py) of the base, the SFT start and every method, mean ± std
     over seeds; the premise before and after each method (the share of the wrong test answers that are the
     teacher's kind of mistake, and the log-prob per token of the teacher's chosen and rejected traces); the
     α = 1 vs α = 0.8 story at the highest learning rate (validation accuracy at checkpoints, chosen /
     rejected log-probs from metrics.jsonl); runs/demo/results.json and figures (PNG, matplotlib).

Each step is a subprocess running the project's own command line, so the demo is also an end-to-end test of
those commands. `--quick` shrinks everything to seconds (used by tests/test_demo.py).
"""

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import torch

from common import InputError, OutputLock, cli, format_seconds, read_jsonl, write_json, write_text
from model import Qwen2, Qwen2Config
from scripts import demo_base, tiny
from scripts.demo_task import (carry_outs, dropped_carry_answers, longest_carry_chain, make_problems,  # noqa: F401
                               problem_text, problems_with_hard_share, teacher_generation, teacher_trace,
                               write_eval_set, write_raw_generations)

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root

# ----------------------------------------------------------------------------------------------------------
# 2. The tiny base checkpoint (its own tokenizer: BPE merges learned on the toy's text, so the toy's words are
#    single tokens and a trace is short)


def make_init_checkpoint(path, documents, config_overrides, seed):
    """Random Qwen2 + a BPE tokenizer trained on the first 300 corpus documents, saved in HF format: the
    starting point of the base's pretraining (scripts/demo_base.py)."""
    tokenizer = tiny.make_tokenizer(path, texts=documents[:300], vocab_size=config_overrides.get("vocab_size", 512))
    config = Qwen2Config.from_dict(tiny.tiny_config_dict(**{**config_overrides,
                                                             "vocab_size": tokenizer.get_vocab_size()}))
    torch.manual_seed(seed)
    model = Qwen2(config).init_weights()
    model.save_pretrained(path, generation_config={"eos_token_id": [tokenizer.token_to_id("<|im_end|>")],
                                                   "pad_token_id": tokenizer.token_to_id("<|endoftext|>")})


# ----------------------------------------------------------------------------------------------------------
# 3. The pipeline, through the project's command lines

# One thread per process: fp32 sums then do not depend on how many cores a machine has (a different thread
# count rounds differently, and this tiny model amplifies rounding), and `--jobs` processes share the cores.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run(cmd, log_path):
    """Run one step of the pipeline, its output going to a log file (shown on failure)."""
    print("$ " + " ".join(os.path.relpath(c, HERE) if os.path.isabs(c) else c for c in cmd), flush=True)
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w") as log:
        code = subprocess.call(cmd, cwd=HERE, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **ONE_THREAD})
    if code != 0:
        with open(log_path) as log:
            tail = log.read()[-2000:]
        raise StepFailed(f"{tail}\nstep failed (exit {code}): {' '.join(cmd)}\n  log: {log_path}")


class StepFailed(RuntimeError):
    """A pipeline command exited non-zero; its log says why."""


def in_parallel(jobs: int, calls: list) -> list:
    """Run each zero-argument call, `jobs` at a time (threads that wait on subprocesses); results in order."""
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(lambda call: call(), calls))


def train(out, stage, model, data, flags):
    run([sys.executable, "train.py", "--stage", stage, "--model", model, "--data", data, "--out", out,
         "--template", "qwen", "--seed", "0"] + [str(x) for x in flags], out + ".log")


def evaluate(checkpoint, data, out, flags) -> float:
    """evaluate.py on `data`; returns its pass@1 (samples and summary.json stay in `out`)."""
    run([sys.executable, "evaluate.py", checkpoint, "--data", data, "--out", out, "--template", "qwen",
         "--seed", "0"] + [str(x) for x in flags], out + ".log")
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)["pass@1"]


def error_profile(samples_path, problems: dict) -> dict:
    """Where a model's wrong answers fall: in the teacher's error family (the answer a dropped carry gives)
    and on hard problems (a carry chain of 2 or more), against the share of hard problems among all samples."""
    profile = {"samples": 0, "wrong": 0, "wrong_in_teacher_family": 0, "wrong_on_hard": 0, "samples_on_hard": 0}
    for _, row in read_jsonl(samples_path):
        a, b = problems[row["id"]]
        hard = longest_carry_chain(a, b)[0] >= 2
        profile["samples"] += 1
        profile["samples_on_hard"] += hard
        if not row["correct"]:
            answer = (row["answer"] or "").strip()
            profile["wrong"] += 1
            profile["wrong_on_hard"] += hard
            profile["wrong_in_teacher_family"] += answer.isdigit() and int(answer) in dropped_carry_answers(a, b)
    return profile


# ----------------------------------------------------------------------------------------------------------
# 4. One seed of the protocol

# Stage 2 methods and the two controls: name -> (train.py stage, data file, loss flags). The loss settings are
# stated here, not inherited: DPO β 0.1 (the DPO paper's value; the REDI paper's 0.001 belongs with its lr 2e-7
# on a 1.5B model, while here every method's lr is chosen on the validation split), SimPO β 2, γ 1 (Table 2).
STAGE2 = {
    "sft_continued": ("sft", "sft.jsonl", []),
    "redi_alpha0": ("redi", "pairs.jsonl", ["--alpha", "0"]),
    "redi": ("redi", "pairs.jsonl", ["--alpha", "0.8"]),
    "redi_symmetric": ("redi", "pairs.jsonl", ["--alpha", "1"]),
    "dpo": ("dpo", "pairs.jsonl", ["--beta", "0.1"]),
    "simpo": ("simpo", "pairs.jsonl", ["--beta", "2", "--gamma", "1"]),
    "weighted": ("weighted", "groups.jsonl", []),
}
STORY = ("redi", "redi_symmetric")  # α = 0.8 vs α = 1 at the highest learning rate of the grid
MODELS = ["base", "sft_start"] + list(STAGE2)


def splits(plan, seed) -> tuple[list, list, list]:
    """One seed's three disjoint problem sets: train (the teacher's traces), validation and test."""
    train_problems = make_problems(plan["train_problems"], seed)
    val_problems = make_problems(plan["val_problems"], seed + 1000, exclude=frozenset(train_problems))
    test_problems = make_problems(plan["test_problems"], seed + 2000,
                                  exclude=frozenset(train_problems) | frozenset(val_problems))
    return train_problems, val_problems, test_problems


# The base is pretrained once and every seed starts Stage 1 from it, as every run of the paper starts from the
# one Qwen2.5-Math-1.5B. Its corpus never holds a validation or test problem of seeds 0-9 (nor of a seed asked
# for beyond them), so `make demo` (seed 0) and the five-seed study share the same base, bit for bit.
BASE_SEED = 0


def prepare_base(plan, seeds, out) -> dict:
    """The corpus (its writer's profile), the random init checkpoint with its tokenizer and the pretrained
    base in out/base; returns what results.json reports of them."""
    held_out = set()
    for seed in sorted(set(range(10)) | set(seeds)):
        held_out.update(*splits(plan, seed)[1:])
    problems = problems_with_hard_share(plan["corpus_problems"], BASE_SEED + 3000, plan["corpus_hard_share"],
                                        exclude=frozenset(held_out))
    documents, corpus = demo_base.write_corpus(problems, plan["corpus_writer"], BASE_SEED + 3000)
    make_init_checkpoint(os.path.join(out, "init"), documents, plan["model"], BASE_SEED)
    print(f"pretraining the base: {plan['pretrain']['steps']} steps on {len(documents)} documents", flush=True)
    started = time.time()
    losses = demo_base.pretrain(os.path.join(out, "init"), os.path.join(out, "base"), documents, seed=BASE_SEED,
                                **plan["pretrain"])
    info = {"corpus": corpus, "losses": losses, "seconds": round(time.time() - started, 1), **plan["pretrain"]}
    write_json(os.path.join(out, "base", "pretraining.json"), info)
    return info


def reuse_base(source, out) -> dict:
    """--base: copy a base that an earlier demo run pretrained (its pretraining.json says how) to out/base."""
    if not os.path.isfile(os.path.join(source, "config.json")):
        raise InputError(f"--base {source}: not a checkpoint directory (no config.json); pass the base/ folder "
                         "of an earlier demo run")
    shutil.copytree(source, os.path.join(out, "base"))
    info_path = os.path.join(out, "base", "pretraining.json")
    info = json.load(open(info_path)) if os.path.isfile(info_path) else {}
    return dict(info, reused_from=os.path.abspath(source))


def prepare_seed(plan, seed, out) -> dict:
    """Teacher data, the three disjoint problem splits and data.py build for one seed. Returns the evaluation
    problems by id, the teacher's profile and data.py's report."""
    os.makedirs(out, exist_ok=True)
    train_problems, val_problems, test_problems = splits(plan, seed)
    teacher = write_raw_generations(os.path.join(out, "raw.jsonl"), train_problems, plan["generations"],
                                    plan["teacher"], seed)
    write_eval_set(os.path.join(out, "val.jsonl"), val_problems, "val")
    write_eval_set(os.path.join(out, "test.jsonl"), test_problems, "test")
    run([sys.executable, "data.py", "build", "--raw", os.path.join(out, "raw.jsonl"), "--out",
         os.path.join(out, "data"), "--tokenizer", os.path.join(out, "..", "base"), "--template", "qwen"],
        os.path.join(out, "data.log"))
    with open(os.path.join(out, "data", "report.json")) as f:
        report = json.load(f)
    problems = {f"val-{i}": p for i, p in enumerate(val_problems)}
    problems.update({f"test-{i}": p for i, p in enumerate(test_problems)})
    return {"problems": problems, "teacher": teacher, "data": {k: report[k] for k in (
        "sft_rows", "pairs_rows", "groups_rows", "correct", "incorrect", "problems_without_correct")}}


def stage2_run(plan, out, name, lr, steps, story) -> float:
    """Train one Stage 2 run from the SFT start and return its validation pass@1. Every run takes the same
    number of optimizer steps at the same global batch (pairs, sequences or prompts per step)."""
    stage, data_file, extra = STAGE2[name]
    run_dir = os.path.join(out, "stage2", f"{name}-lr{lr:g}")
    flags = ["--lr", lr, "--epochs", 1, "--max-steps", steps, "--batch-size", plan["stage2_batch"],
             "--micro-batch-size", plan["micro_batch"][stage if stage in ("sft", "weighted") else "pairs"]] + extra
    if story:
        flags += ["--save-every", max(1, steps // plan["story_points"])]
    train(run_dir, stage, os.path.join(out, "sft"), os.path.join(out, "data", data_file), flags)
    return evaluate(run_dir, os.path.join(out, "val.jsonl"), os.path.join(out, "eval", "val", f"{name}-lr{lr:g}"),
                    plan["val_eval"])


def choose_lr(validation: dict[str, float]) -> float:
    """The learning rate with the best validation pass@1 ({"1e-05": 0.61, ...}); a tie goes to the smaller
    one (the gentler change to the SFT model)."""
    return max((float(lr) for lr in validation), key=lambda lr: (validation[f"{lr:g}"], -lr))


def run_seed(plan, seed, out, jobs: int, with_story: bool) -> dict:
    """The pretrained base; Stage 1; every Stage 2 method and control at every lr of the grid, each lr chosen
    by validation pass@1; test pass@1 and the premise of the base, the SFT start and every chosen run;
    (with_story) the α story."""
    prep = prepare_seed(plan, seed, out)
    sft, val, test = os.path.join(out, "sft"), os.path.join(out, "val.jsonl"), os.path.join(out, "test.jsonl")
    base = os.path.join(os.path.dirname(out), "base")
    in_parallel(jobs, [partial(train, sft, "sft", base, os.path.join(out, "data", "sft.jsonl"), plan["sft"]),
                       partial(evaluate, base, test, os.path.join(out, "eval", "test", "base"), plan["test_eval"])])
    steps = min(plan["stage2_steps"], math.ceil(prep["data"]["pairs_rows"] / plan["stage2_batch"]))  # <= 1 epoch
    top_lr = max(plan["lrs"])
    grid = [(name, lr) for name in reversed(STAGE2) for lr in sorted(plan["lrs"], reverse=True)]  # slowest first
    scores = in_parallel(jobs, [partial(evaluate, sft, val, os.path.join(out, "eval", "val", "sft_start"),
                                        plan["val_eval"])] +
                         [partial(stage2_run, plan, out, name, lr, steps, with_story and name in STORY and lr == top_lr)
                          for name, lr in grid])
    models = {"base": {"lr": None, "validation": {}, "run_dir": os.path.join("..", "base")},
              "sft_start": {"lr": None, "validation": {"-": scores[0]}, "run_dir": "sft"}}
    for (name, lr), score in zip(grid, scores[1:]):
        models.setdefault(name, {"validation": {}})["validation"][f"{lr:g}"] = score
    for name in STAGE2:
        best = choose_lr(models[name]["validation"])
        models[name].update(lr=best, run_dir=os.path.join("stage2", f"{name}-lr{best:g}"))
    in_parallel(jobs, [partial(evaluate, os.path.join(out, models[name]["run_dir"]), test,
                               os.path.join(out, "eval", "test", name), plan["test_eval"])
                       for name in MODELS if name != "base"])
    for name in MODELS:
        models[name].update(test_result(plan, out, name, models[name]["run_dir"], prep["problems"]))
    result = {"seed": seed, "teacher": prep["teacher"], "data": dict(prep["data"], stage2_steps=steps), "models": models,
              "premise": premise(models["sft_start"])}
    if with_story:
        result["alpha_story"] = alpha_story(plan, out, top_lr, models, jobs)
    write_json(os.path.join(out, "seed.json"), result)
    return result


def test_result(plan, out, name, run_dir, problems) -> dict:
    """A model's test pass@1 (from evaluate.py's summary), where its wrong answers fall, and its log-probs per
    token of the teacher's chosen and rejected traces."""
    with open(os.path.join(out, "eval", "test", name, "summary.json")) as f:
        score = json.load(f)["pass@1"]
    return {"pass@1": score,
            "errors": error_profile(os.path.join(out, "eval", "test", name, "samples.jsonl"), problems),
            "logps": demo_base.pair_logps_per_token(os.path.join(out, run_dir),
                                                    os.path.join(out, "data", "pairs.jsonl"), plan["premise_pairs"])}


def premise(model: dict) -> dict:
    """The paper's premise, measured on one model: the share of its wrong test answers that are in the
    teacher's error family, and its mean log-probability per token of the chosen and rejected traces."""
    errors = model["errors"]
    return {"student_errors_in_teacher_family": errors["wrong_in_teacher_family"] / max(errors["wrong"], 1),
            "wrong": errors["wrong"], "wrong_in_teacher_family": errors["wrong_in_teacher_family"],
            "logp_per_token_chosen": model["logps"]["logp_per_token_chosen"],
            "logp_per_token_rejected": model["logps"]["logp_per_token_rejected"], "pairs": model["logps"]["pairs"]}


def alpha_story(plan, out, lr, models, jobs) -> dict:
    """Validation pass@1 at every saved checkpoint of the α = 0.8 and α = 1 runs at learning rate `lr`, from
    the SFT start (step 0) to the end, and their chosen / rejected log-probs from metrics.jsonl."""
    story, points, calls = {"lr": lr}, [], []
    for name in STORY:
        run_dir = os.path.join(out, "stage2", f"{name}-lr{lr:g}")
        rows = metrics_rows(run_dir)
        story[name] = {"alpha": float(STAGE2[name][2][1]),
                       "logps": [{k: row[k] for k in ("step", "logps/chosen", "logps/rejected")} for row in rows]}
        points += [(name, 0, models["sft_start"]["validation"]["-"]),
                   (name, rows[-1]["step"], models[name]["validation"][f"{lr:g}"])]
        for step in saved_steps(run_dir):
            eval_dir = os.path.join(out, "eval", "val", f"{name}-lr{lr:g}-step-{step}")
            calls.append((name, step, partial(evaluate, os.path.join(run_dir, f"step-{step}"),
                                              os.path.join(out, "val.jsonl"), eval_dir, plan["val_eval"])))
    scores = in_parallel(jobs, [call for _, _, call in calls])
    points += [(name, step, score) for (name, step, _), score in zip(calls, scores)]
    for name in STORY:
        story[name]["val_pass@1"] = {str(step): score for n, step, score in sorted(points) if n == name}
    return story


def saved_steps(run_dir) -> list[int]:
    """N of every OUT/step-N checkpoint train.py --save-every wrote."""
    return [int(e[5:]) for e in os.listdir(run_dir) if e.startswith("step-") and e[5:].isdigit()]


# ----------------------------------------------------------------------------------------------------------
# 5. Over seeds: results.json, the table, the figures


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n − 1); no std from a single seed."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def aggregate(seed_results: list[dict], settings: dict) -> dict:
    """results.json: per model {"pass@1": mean over seeds, "std", "seeds": per-seed test pass@1, "vs_sft_start":
    the same for pass@1 minus the seed's SFT start, "lr": per-seed choice, "errors" pooled over seeds,
    "premise": per-seed premise of that model}; `premise`: the SFT start's (the paper's premise, at the start of
    Stage 2: errors pooled over seeds, log-probs averaged over seeds, per seed); the teacher's and the corpus
    writer's profiles and the α story (first seed)."""
    results = {"settings": settings}
    start = [r["models"]["sft_start"]["pass@1"] for r in seed_results]
    for name in MODELS:
        per_seed = [r["models"][name] for r in seed_results]
        mean, std = mean_std([m["pass@1"] for m in per_seed])
        # Paired with the seed's own SFT start: the seeds' SFT models differ more than Stage 2 moves them.
        gains = [m["pass@1"] - s for m, s in zip(per_seed, start)]
        gain_mean, gain_std = mean_std(gains)
        results[name] = {"pass@1": mean, "std": std, "seeds": [m["pass@1"] for m in per_seed],
                         "vs_sft_start": {"mean": gain_mean, "std": gain_std, "seeds": gains},
                         "lr": [m["lr"] for m in per_seed],
                         "validation": [m["validation"] for m in per_seed],
                         "errors": pooled([m["errors"] for m in per_seed]),
                         "premise": pooled_premise([premise(m) for m in per_seed])}
    results["premise"] = results["sft_start"]["premise"]
    for key in ("teacher", "data"):
        results[key] = [r[key] for r in seed_results]
    results["alpha_story"] = seed_results[0].get("alpha_story")
    return results


def pooled_premise(per_seed: list[dict]) -> dict:
    """The premise over seeds: the error share pooled (wrong answers summed), the log-probs averaged."""
    wrong = sum(p["wrong"] for p in per_seed)
    return {"student_errors_in_teacher_family": sum(p["wrong_in_teacher_family"] for p in per_seed) / max(wrong, 1),
            "logp_per_token_chosen": sum(p["logp_per_token_chosen"] for p in per_seed) / len(per_seed),
            "logp_per_token_rejected": sum(p["logp_per_token_rejected"] for p in per_seed) / len(per_seed),
            "wrong": wrong, "per_seed": per_seed}


def pooled(profiles: list[dict]) -> dict:
    """Counts summed over seeds, with the shares a reader wants."""
    total = {k: sum(p[k] for p in profiles) for k in profiles[0]}
    wrong = max(total["wrong"], 1)
    total["share_in_teacher_family"] = total["wrong_in_teacher_family"] / wrong
    total["share_on_hard"] = total["wrong_on_hard"] / wrong
    total["hard_share_of_samples"] = total["samples_on_hard"] / max(total["samples"], 1)
    return total


LABELS = {"base": "base (pretrained)", "sft_start": "SFT start", "sft_continued": "SFT continued", "redi_alpha0": "REDI α=0",
          "redi": "REDI α=0.8", "redi_symmetric": "REDI α=1", "dpo": "DPO", "simpo": "SimPO",
          "weighted": "weighted NLL"}


def percent(mean: float, std: float | None) -> str:
    """"56.6 ± 1.2" in percent; no ± from one seed."""
    return f"{100 * mean:.1f}" + ("" if std is None else f" ± {100 * std:.1f}")


def print_table(results):
    print(f"\ntest pass@1 (%) over seeds {results['settings']['seeds']}: mean ± std; minus the same seed's SFT "
          "start; per seed; Stage 2 lr chosen on validation; share of the wrong answers that are a dropped carry "
          "(the teacher's error family); log-prob per token of the teacher's chosen / rejected traces")
    for name in MODELS:
        r, gain, p = results[name], results[name]["vs_sft_start"], results[name]["premise"]
        lrs = "-" if r["lr"][0] is None else ", ".join(f"{lr:g}" for lr in r["lr"])
        print(f"  {LABELS[name]:<18} {percent(r['pass@1'], r['std']):>12}  {percent(gain['mean'], gain['std']):>12}  "
              f"({', '.join(f'{100 * v:.1f}' for v in r['seeds'])})  lr {lrs}  "
              f"family {100 * p['student_errors_in_teacher_family']:.0f}% of {p['wrong']}  "
              f"logp/token {p['logp_per_token_chosen']:.3f} / {p['logp_per_token_rejected']:.3f}")
    p = results["premise"]
    print(f"\npremise (SFT start): {100 * p['student_errors_in_teacher_family']:.0f}% of its {p['wrong']} wrong test "
          f"answers are a dropped carry; log-prob per token of the teacher's chosen traces "
          f"{p['logp_per_token_chosen']:.3f}, of its rejected ones {p['logp_per_token_rejected']:.3f}")
    story = results["alpha_story"]
    if story:
        for name in STORY:
            points = ", ".join(f"{k}: {100 * v:.0f}%" for k, v in story[name]["val_pass@1"].items())
            print(f"α story (lr {story['lr']:g}), α = {story[name]['alpha']:g}: validation pass@1 by step {points}")


def markdown_tables(results) -> str:
    """The README's two tables: per model (pass@1, paired with the SFT start, per seed, lr, premise after it)
    and per seed (the base, the SFT start and its premise)."""
    seeds = results["settings"]["seeds"]
    lines = [f"| test pass@1, % (seeds {', '.join(map(str, seeds))}) | mean ± std | minus the seed's SFT start | "
             "per seed | lr chosen | wrong answers a dropped carry | log π/token chosen / rejected |", "|---" * 7 + "|"]
    for name in MODELS:
        r, gain, p = results[name], results[name]["vs_sft_start"], results[name]["premise"]
        lrs = "—" if r["lr"][0] is None else ", ".join(f"{lr:g}" for lr in r["lr"])
        lines.append(f"| {LABELS[name]} | {percent(r['pass@1'], r['std'])} | "
                     f"{'—' if name == 'sft_start' else percent(gain['mean'], gain['std'])} | "
                     f"{', '.join(f'{100 * v:.1f}' for v in r['seeds'])} | {lrs} | "
                     f"{100 * p['student_errors_in_teacher_family']:.0f}% of {p['wrong']} | "
                     f"{p['logp_per_token_chosen']:.3f} / {p['logp_per_token_rejected']:.3f} |")
    lines += ["", "| seed | base pass@1 | SFT start pass@1 | SFT start: wrong answers a dropped carry | "
              "log π/token chosen | log π/token rejected |", "|---" * 6 + "|"]
    for seed, base, start, p in zip(seeds, results["base"]["seeds"], results["sft_start"]["seeds"],
                                    results["premise"]["per_seed"]):
        lines.append(f"| {seed} | {100 * base:.1f} | {100 * start:.1f} | "
                     f"{100 * p['student_errors_in_teacher_family']:.0f}% ({p['wrong_in_teacher_family']}/{p['wrong']}) | "
                     f"{p['logp_per_token_chosen']:.3f} | {p['logp_per_token_rejected']:.3f} |")
    return "\n".join(lines) + "\n"


def plot_figures(results, seed_results, out):
    """accuracy.png (test pass@1 per model, error bars = std over seeds, dots = seeds), premise.png (the premise
    before and after each method), logps.png and alpha_story.png (first seed)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figures (pip install -r requirements-demo.txt)")
        return []
    paths = [os.path.join(out, name) for name in ("accuracy.png", "premise.png", "logps.png", "alpha_story.png")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    bars(axes[0], [(results[n]["pass@1"], results[n]["std"], results[n]["seeds"]) for n in MODELS])
    bars(axes[1], [(results[n]["vs_sft_start"]["mean"], results[n]["vs_sft_start"]["std"],
                    results[n]["vs_sft_start"]["seeds"]) for n in MODELS])
    axes[0].set_ylabel("test pass@1 (%)")
    axes[0].set_title(f"test pass@1, mean ± std over {len(seed_results)} seed(s); dots: seeds; gray: controls",
                      fontsize=9)
    axes[1].set_ylabel("points")
    axes[1].set_title("test pass@1 minus the same seed's SFT start", fontsize=9)
    axes[1].axhline(0, color="black", linewidth=0.8)
    save(fig, paths[0])
    plot_premise(plt, results, paths[1])
    plot_logps(plt, results["settings"]["plan"]["lrs"], seed_results[0]["out"], paths[2])
    story = results["alpha_story"]
    if story:
        plot_alpha_story(plt, story, paths[3])
    return paths


def plot_premise(plt, results, path):
    """The premise before and after each method: the share of the wrong test answers that are a dropped carry,
    and the log-prob per token of the teacher's chosen and rejected traces (bars: over seeds; dots: seeds)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    premises = [results[n]["premise"] for n in MODELS]
    bars(axes[0], [(p["student_errors_in_teacher_family"], None,
                    [s["wrong_in_teacher_family"] / max(s["wrong"], 1) for s in p["per_seed"]]) for p in premises])
    axes[0].set_ylabel("% of wrong test answers")
    axes[0].set_title("wrong answers that are the teacher's kind of mistake (a dropped carry)", fontsize=9)
    for offset, side, color in ((-0.2, "chosen", "tab:green"), (0.2, "rejected", "tab:red")):
        key = f"logp_per_token_{side}"
        axes[1].bar([x + offset for x in range(len(MODELS))], [p[key] for p in premises], width=0.4, color=color,
                    label=f"{side} ({'correct' if side == 'chosen' else 'wrong'} teacher trace)")
        for x, p in enumerate(premises):
            axes[1].scatter([x + offset] * len(p["per_seed"]), [s[key] for s in p["per_seed"]], color="black", s=8,
                            zorder=3)
    axes[1].set_xticks(range(len(MODELS)), [LABELS[n] for n in MODELS], rotation=25, ha="right")
    axes[1].set_title("log π(y|x) / |y| of the teacher's traces, mean over pairs", fontsize=9)
    axes[1].legend(fontsize=7)
    save(fig, path)


def bars(ax, stats: list[tuple]):
    """One bar per model: (mean, std or None, per-seed values) -> bar, error bar, dots; controls in gray."""
    for x, (name, (mean, std, seeds)) in enumerate(zip(MODELS, stats)):
        ax.bar(x, 100 * mean, yerr=None if std is None else 100 * std, capsize=4,
               color="tab:gray" if name in ("base", "sft_start", "sft_continued", "redi_alpha0") else "tab:blue")
        ax.scatter([x] * len(seeds), [100 * v for v in seeds], color="black", s=8, zorder=3)
    ax.set_xticks(range(len(MODELS)), [LABELS[n] for n in MODELS], rotation=25, ha="right")


def plot_logps(plt, lrs, seed_dir, path):
    """Chosen and rejected log-probs over Stage 2 steps (metrics.jsonl) of every pair method, one row per
    learning rate. Every run sees the same batches in the same order, so the batch-to-batch wiggle is common
    to all lines and the gaps between them are the methods' doing. SimPO is left out: it logs length-averaged
    log-probs under these names (TRL's definition for SimPO), the others summed ones."""
    fig, axes = plt.subplots(len(lrs), 2, figsize=(10, 3 * len(lrs)), squeeze=False)
    summed = [n for n, (_, data_file, _) in STAGE2.items() if data_file == "pairs.jsonl" and n != "simpo"]
    for row_axes, lr in zip(axes, sorted(lrs)):
        for name in summed:
            rows = metrics_rows(os.path.join(seed_dir, "stage2", f"{name}-lr{lr:g}"))
            for ax, key in zip(row_axes, ("logps/chosen", "logps/rejected")):
                ax.plot([row["step"] for row in rows], [row[key] for row in rows], label=LABELS[name])
        for ax, title in zip(row_axes, ("chosen (correct trace)", "rejected (teacher's mistake)")):
            ax.set_title(f"log π(y|x) of the {title}, batch mean, lr {lr:g}", fontsize=9)
    row_axes[0].set_xlabel("Stage 2 step")
    row_axes[1].set_xlabel("Stage 2 step")
    axes[0][0].legend(fontsize=7)
    save(fig, path)


def plot_alpha_story(plt, story, path):
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name in STORY:
        label = f"α = {story[name]['alpha']:g}"
        points = story[name]["val_pass@1"]
        axes[0].plot([int(k) for k in points], [100 * v for v in points.values()], marker="o", label=label)
        for ax, key in zip(axes[1:], ("logps/chosen", "logps/rejected")):
            ax.plot([row["step"] for row in story[name]["logps"]], [row[key] for row in story[name]["logps"]],
                    label=label)
    for ax, title in zip(axes, ("validation pass@1 (%)", "log π(chosen)", "log π(rejected)")):
        ax.set_title(f"{title}, REDI at lr {story['lr']:g}")
        ax.set_xlabel("Stage 2 step")
        ax.legend()
    save(fig, path)


def metrics_rows(run_dir) -> list[dict]:
    return [row for _, row in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))]


def save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    fig.clf()
    print(f"wrote {path}")


# ----------------------------------------------------------------------------------------------------------

# Every setting, stated. The base: 1,000 steps x 16 corpus documents, lr 3e-3 (the tiny model learns to copy
# digits late; at 800 steps on the natural mix it still miscopied the hundreds digits of long traces), on 4,000
# problems of which 60% are hard (carry chain >= 2: the long traces, where the habit lives), written with
# drop-carry rates 0 / 0.8 / 0.8 / 0.9 for chains of 0..3 against the teacher's 0 / 0.05 / 0.35 / 0.7. The habit
# is as strong on chains of 1 as on chains of 2: chains of 1 are 45% of the test problems, and there, with a
# rate of 0.4, the student's wrong answers were mostly its own (a miscopied hundreds digit), so only 48% of the
# SFT start's were a dropped carry over five seeds; with 0.8, 73% and 80% on seeds 0-1. Stage 1: 10 steps x 16
# at lr 1e-4. The base already writes the format, and SFT on the teacher's correct traces erases the habit fast:
# with the 0.4 corpus, on seed 0's validation split the share of wrong answers that are a dropped carry was 53%
# after 10 steps at 1e-4, 29% after 20, 0% after 40 at 2e-4 and after 60 at 5e-4. Stage 2: the same number of
# steps for every method and control (a third of an epoch over the pairs at this budget; the paper trains one
# epoch), linear warmup over 10% then linear decay (train.py's schedule, as in the paper). The Stage 2 lr of
# every method and control is chosen from `lrs` on the validation split (as before this design: 1e-5 and 4e-5);
# the higher one carries the α story. Decoding as in the paper (temperature 0.6, top-p 0.95); 4 samples per test
# problem (the paper's intermediate evaluations), 2 per validation problem.
# Micro-batches hold 4 sequences per packed row: the math does not depend on it (losses are normalised over the
# global batch), only the speed does (on CPU the dense document mask is quadratic in the row length).
SAMPLING = ["--temperature", "0.6", "--top-p", "0.95", "--max-new-tokens", "160", "--batch-size", "64"]
FULL = dict(train_problems=2000, val_problems=100, test_problems=200, generations=4,
            teacher=dict(drop_carry=[0.0, 0.05, 0.35, 0.7], final_slip=0.03),
            corpus_problems=4000, corpus_hard_share=0.6,
            corpus_writer=dict(drop_carry=[0.0, 0.8, 0.8, 0.9], final_slip=0.0),
            pretrain=dict(steps=1000, batch_size=16, lr=3e-3), premise_pairs=128,
            model=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=512, max_position_embeddings=512),
            sft=["--lr", "1e-4", "--epochs", "1", "--max-steps", "10", "--batch-size", "16", "--micro-batch-size", "4"],
            lrs=[1e-5, 4e-5], stage2_steps=20, stage2_batch=16, micro_batch={"sft": 4, "pairs": 2, "weighted": 1},
            story_points=4, val_eval=["--num-samples", "2"] + SAMPLING, test_eval=["--num-samples", "4"] + SAMPLING)
QUICK = dict(train_problems=48, val_problems=4, test_problems=6, generations=4,
             teacher=dict(drop_carry=[0.0, 0.05, 0.35, 0.7], final_slip=0.03),
             corpus_problems=64, corpus_hard_share=0.6,
             corpus_writer=dict(drop_carry=[0.0, 0.8, 0.8, 0.9], final_slip=0.0),
             pretrain=dict(steps=3, batch_size=8, lr=3e-3), premise_pairs=8,
             model=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, vocab_size=400, max_position_embeddings=512),
             sft=["--lr", "1e-3", "--epochs", "1", "--max-steps", "3", "--batch-size", "8",
                  "--micro-batch-size", "4"],
             lrs=[4e-5], stage2_steps=4, stage2_batch=8, micro_batch={"sft": 4, "pairs": 2, "weighted": 1},
             story_points=2,
             val_eval=["--num-samples", "2"] + SAMPLING[:4] + ["--max-new-tokens", "24", "--batch-size", "8"],
             test_eval=["--num-samples", "2"] + SAMPLING[:4] + ["--max-new-tokens", "24", "--batch-size", "8"])


def cpu_seconds() -> float:
    import resource
    return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="demo.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds to run, from --seed up (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="first seed (default: 0)")
    parser.add_argument("--jobs", type=int, default=2,
                        help="pipeline commands run at a time, one thread each (default: 2; the results do not "
                             "depend on it)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds: for tests")
    parser.add_argument("--fresh", action="store_true", help="delete --out first")
    parser.add_argument("--base", help="start from the pretrained base/ of an earlier demo run (same --quick) "
                                       "instead of pretraining it again")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        raise InputError(f"--seeds must be >= 1, got {args.seeds}")
    if args.jobs < 1:
        raise InputError(f"--jobs must be >= 1, got {args.jobs}")
    return args


def main(argv=None):
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    out = os.path.abspath(args.out)
    if os.path.exists(out) and os.listdir(out):
        if not args.fresh:
            raise InputError(f"--out {args.out} already holds a demo run; pass --fresh to delete and redo it, "
                             "or choose another --out")
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(1)  # the base's pretraining runs in this process: one thread, as every step does
    with OutputLock(out, "demo.py"):
        start, cpu_start = time.time(), cpu_seconds()
        seeds = list(range(args.seed, args.seed + args.seeds))
        base = reuse_base(args.base, out) if args.base else prepare_base(plan, seeds, out)
        seed_results = []
        for seed in seeds:
            seed_dir = os.path.join(out, f"seed-{seed}")
            print(f"\n== seed {seed} ({format_seconds(time.time() - start)} elapsed)", flush=True)
            seed_results.append(dict(run_seed(plan, seed, seed_dir, args.jobs, with_story=seed == seeds[0]),
                                     out=seed_dir, wall_seconds=round(time.time() - start, 1)))
            # Results so far after every seed: a long study that is stopped still reports the seeds it ran.
            settings = {"seeds": seeds[:len(seed_results)], "seeds_requested": seeds, "quick": args.quick,
                        "plan": plan, "jobs": args.jobs, "threads_per_process": 1, "cpu_count": os.cpu_count(),
                        "wall_seconds": round(time.time() - start, 1),
                        "wall_seconds_after_seed": [r["wall_seconds"] for r in seed_results],
                        "cpu_seconds": round(cpu_seconds() - cpu_start, 1)}
            results = dict(aggregate(seed_results, settings), base_pretraining=base)
            results["figures"] = [os.path.basename(p) for p in plot_figures(results, seed_results, out)]
            write_json(os.path.join(out, "results.json"), results)
            write_text(os.path.join(out, "tables.md"), markdown_tables(results))
        print_table(results)
        print(f"\nwrote {os.path.join(out, 'results.json')}: {format_seconds(settings['wall_seconds'])} wall, "
              f"{format_seconds(settings['cpu_seconds'])} CPU (all processes)")


if __name__ == "__main__":
    cli(main, "demo.py")
