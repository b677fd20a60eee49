"""`make demo`: the whole method on a laptop CPU, in minutes, through the same scripts a real run uses.

  1. A synthetic teacher solves three-digit additions column by column, several traces per problem, and makes
     the mistakes a teacher makes (a dropped carry, a wrong column sum, a slip in the final answer). Its raw
     generations are written like Open-R1's OpenR1-Math-Raw rows: problem, answer, generations.
  2. A tiny Qwen2 checkpoint (random weights, a byte-level BPE tokenizer with ChatML tokens) in Hugging Face
     format, so every later step loads it with from_pretrained exactly as it would load Qwen2.5-Math-1.5B.
  3. data.py labels every trace with verify.py and writes sft.jsonl, pairs.jsonl and groups.jsonl.
  4. train.py Stage 1 (SFT on the correct traces), then Stage 2 from the SFT checkpoint: REDI (alpha=0.8),
     symmetric REDI (alpha=1), DPO, SimPO and reward-weighted NLL.
  5. evaluate.py samples every model on held-out problems (several samples each) and verify.py grades them.
  6. runs/demo/results.json, a printed table, and plots (runs/demo/*.png) when matplotlib is installed.

Each step is a subprocess running the project's own command line, so the demo is also an end-to-end test of
those commands. `--quick` shrinks everything to seconds (used by tests/test_demo.py).
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time

import torch

from scripts import tiny
from data import SYSTEM_PROMPT
from model import Qwen2, Qwen2Config

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
COLUMN_NAMES = ["ones", "tens", "hundreds", "thousands"]
MISTAKES = ("dropped_carry", "wrong_column_sum", "final_slip")

# ----------------------------------------------------------------------------------------------------------
# 1. The synthetic teacher


def teacher_trace(a: int, b: int, rng: random.Random, mistake: str | None = None) -> str:
    """Column addition of a + b written step by step, ending in \\boxed{}. With `mistake`, one realistic
    error enters the reasoning and the wrong result is carried honestly to the box."""
    if mistake == "dropped_carry" and not has_carry(a, b):
        mistake = "wrong_column_sum"  # no carry to drop: make the other column error
    xs, ys = str(a)[::-1], str(b)[::-1]
    columns = max(len(xs), len(ys))
    bad_column = rng.randrange(columns)
    carry, digits, lines = 0, [], []
    for i in range(columns):
        x, y = int(xs[i]) if i < len(xs) else 0, int(ys[i]) if i < len(ys) else 0
        total = x + y + carry
        if mistake == "wrong_column_sum" and i == bad_column:
            total += rng.choice([-1, 1]) if total > 0 else 1
        terms = f"{x} + {y}" + (f" + {carry}" if carry else "")
        lines.append(f"Add the {COLUMN_NAMES[i]}: {terms} = {total}. Write {total % 10}"
                     + (", carry 1." if total >= 10 else "."))
        digits.append(total % 10)
        carry = 1 if total >= 10 else 0
        if mistake == "dropped_carry" and carry:
            carry, mistake = 0, None  # forget the first carry, then continue correctly
    if carry:
        digits.append(1)
        lines.append("Write the final carry 1.")
    result = int("".join(str(d) for d in reversed(digits)))
    if mistake == "final_slip":
        result += rng.choice([-10, -1, 1, 10])
    lines.append(f"So {a} + {b} = {result}. The answer is \\boxed{{{result}}}.")
    return "\n".join(lines)


def has_carry(a: int, b: int) -> bool:
    return any((a // 10**i % 10) + (b // 10**i % 10) >= 10 for i in range(4))


def make_problems(count: int, seed: int, exclude=frozenset()):
    """Distinct (a, b) pairs of three-digit numbers, none in `exclude`."""
    rng = random.Random(seed)
    problems = []
    seen = set(exclude)
    while len(problems) < count:
        pair = (rng.randint(100, 999), rng.randint(100, 999))
        if pair not in seen:
            seen.add(pair)
            problems.append(pair)
    return problems


def problem_text(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def write_raw_generations(path, problems, generations_per_problem, mistake_rate, seed):
    """OpenR1-Math-Raw-style rows; no `correctness` field, so data.py labels them with verify.py."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for a, b in problems:
            traces = [teacher_trace(a, b, rng, rng.choice(MISTAKES) if rng.random() < mistake_rate else None)
                      for _ in range(generations_per_problem)]
            f.write(json.dumps({"problem": problem_text(a, b), "answer": str(a + b), "generations": traces}) + "\n")


def write_eval_set(path, problems):
    with open(path, "w") as f:
        for i, (a, b) in enumerate(problems):
            f.write(json.dumps({"id": f"add-{i}", "problem": problem_text(a, b), "answer": str(a + b)}) + "\n")


# ----------------------------------------------------------------------------------------------------------
# 2. The tiny base checkpoint


def make_base_checkpoint(path, problems, config_overrides, seed):
    """Random Qwen2 + a BPE tokenizer trained on the teacher's own kind of text, saved in HF format."""
    rng = random.Random(seed)
    corpus = [SYSTEM_PROMPT, "<|im_start|>system\n", "<|im_end|>\n<|im_start|>user\n", "<|im_start|>assistant\n"]
    corpus += [problem_text(a, b) + "\n" + teacher_trace(a, b, rng) for a, b in problems[:300]]
    tokenizer = tiny.make_tokenizer(path, texts=corpus, vocab_size=config_overrides.get("vocab_size", 512))
    config = Qwen2Config.from_dict(tiny.tiny_config_dict(**{**config_overrides,
                                                             "vocab_size": tokenizer.get_vocab_size()}))
    torch.manual_seed(seed)
    model = Qwen2(config).init_weights()
    end_of_turn = tokenizer.token_to_id("<|im_end|>")
    model.save_pretrained(path, generation_config={"eos_token_id": [end_of_turn],
                                                   "pad_token_id": tokenizer.token_to_id("<|endoftext|>")})


# ----------------------------------------------------------------------------------------------------------
# 3-5. The pipeline, through the project's command lines


def run(cmd, log_path):
    """Run one step of the pipeline, echoing its output to the terminal and a log file."""
    print("$ " + " ".join(cmd), flush=True)
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})  # stream progress lines
        for line in proc.stdout:
            log.write(line)
            print("  " + line, end="", flush=True)
        if proc.wait() != 0:
            sys.exit(f"demo: step failed (exit {proc.returncode}): {' '.join(cmd)}\n  log: {log_path}")
    print(f"  ({time.time() - start:.0f} s)", flush=True)


def train(out, stage, model, data, settings, extra=()):
    cmd = [sys.executable, "train.py", "--stage", stage, "--model", model, "--data", data, "--out", out,
           "--template", "qwen", "--seed", "0"] + [str(x) for x in settings] + list(extra)
    run(cmd, out + ".log")


def evaluate(checkpoint, data, out, settings):
    cmd = [sys.executable, "evaluate.py", checkpoint, "--data", data, "--out", out, "--template", "qwen",
           "--seed", "0"] + [str(x) for x in settings]
    run(cmd, out + ".log")
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------------------
# 6. Results


STAGE2 = {  # name: (train.py stage, data file, extra flags)
    "redi": ("redi", "pairs.jsonl", ["--alpha", "0.8"]),
    "redi_symmetric": ("redi", "pairs.jsonl", ["--alpha", "1.0"]),
    "dpo": ("dpo", "pairs.jsonl", []),
    "simpo": ("simpo", "pairs.jsonl", []),
    "weighted": ("weighted", "groups.jsonl", []),
}


def headline(summary: dict) -> dict:
    """The rates the results table reports, from evaluate.py's summary.json."""
    n = summary["n"]
    return {"pass@1": summary["pass@1"], "pass@1_stderr": summary["pass@1_stderr"],
            f"pass@{n}": summary["pass@k"][str(n)], f"maj@{n}": summary[f"maj@{n}"],
            "mean_response_tokens": summary["mean_response_tokens"], "truncated": summary["truncated"],
            "no_answer": summary["no_answer"], "samples": summary["samples"]}


def print_table(results):
    print(f"\n{'model':<16} {'pass@1':>8} {'± se':>6} {'pass@n':>8} {'maj@n':>8} {'no answer':>10}")
    for name, r in results.items():
        n_keys = [k for k in r if k.startswith("pass@") and k not in ("pass@1", "pass@1_stderr")]
        maj = next(k for k in r if k.startswith("maj@"))
        print(f"{name:<16} {100 * r['pass@1']:>7.1f}% {100 * r['pass@1_stderr']:>6.1f} "
              f"{100 * r[n_keys[0]]:>7.1f}% {100 * r[maj]:>7.1f}% {100 * r['no_answer']:>9.1f}%")


def plot(out, results, stage_dirs):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, d in stage_dirs.items():
        path = os.path.join(d, "metrics.jsonl")
        if os.path.exists(path):
            with open(path) as f:
                rows = [json.loads(line) for line in f]
            ax = axes[0] if name == "sft" else axes[1]  # the stages' losses live on different scales
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=name)
    for ax, title in zip(axes[:2], ["Stage 1 (SFT) loss", "Stage 2 losses"]):
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.legend()
    names = list(results)
    axes[2].bar(names, [100 * results[n]["pass@1"] for n in names])
    axes[2].set_title("held-out pass@1 (%)")
    axes[2].tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "demo.png"), dpi=100)
    print(f"wrote {os.path.join(out, 'demo.png')}")


# ----------------------------------------------------------------------------------------------------------


# Hyperparameters follow the paper's recipe where it transfers to a 0.8M-parameter model: 5 SFT epochs,
# alpha 0.8, warmup 10%, one short Stage 2 pass from the SFT checkpoint (60 steps x 16 pairs, or prompts for
# weighted). The tiny model needs a larger SFT lr (2e-3). The Stage 2 lr, one for every method, was chosen on
# a validation set disjoint from the evaluation problems (README: 4e-5 pushed every method far below SFT,
# 4e-6 left every model unchanged, 1e-5 is used).
# Micro-batches hold ~16 sequences per packed row (the math does not depend on it: losses are normalised
# over the global batch); on CPU the dense document mask is quadratic in the row length.
FULL = dict(train_problems=2000, eval_problems=100, generations=4, mistake_rate=0.35, samples=4,
            model=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=512, max_position_embeddings=512),
            sft=["--lr", "2e-3", "--epochs", "5", "--batch-size", "16", "--micro-batch-size", "16"],
            stage2=["--lr", "1e-5", "--epochs", "1", "--max-steps", "60", "--batch-size", "16",
                    "--micro-batch-size", "8"],
            weighted_micro_batch=4,
            eval=["--n", "4", "--temperature", "0.6", "--top-p", "0.95", "--max-new-tokens", "160",
                  "--batch-size", "64"])
QUICK = dict(train_problems=48, eval_problems=6, generations=4, mistake_rate=0.35, samples=2,
             model=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, vocab_size=400, max_position_embeddings=512),
             sft=["--lr", "1e-3", "--epochs", "1", "--max-steps", "3", "--batch-size", "8",
                  "--micro-batch-size", "4"],
             stage2=["--lr", "2e-5", "--epochs", "1", "--max-steps", "2", "--batch-size", "4",
                     "--micro-batch-size", "2"],
             weighted_micro_batch=1,
             eval=["--n", "2", "--temperature", "0.6", "--top-p", "0.95", "--max-new-tokens", "24",
                   "--batch-size", "8"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds: for tests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true", help="delete --out first")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    out = os.path.abspath(args.out)
    if args.fresh and os.path.exists(out):
        shutil.rmtree(out)
    if os.path.exists(os.path.join(out, "results.json")):
        sys.exit(f"demo: {out} already holds a finished demo; pass --fresh to redo it or choose another --out")
    os.makedirs(out, exist_ok=True)
    start = time.time()

    train_problems = make_problems(plan["train_problems"], args.seed)
    eval_problems = make_problems(plan["eval_problems"], args.seed + 1, exclude=frozenset(train_problems))
    raw, eval_set = os.path.join(out, "raw.jsonl"), os.path.join(out, "eval.jsonl")
    write_raw_generations(raw, train_problems, plan["generations"], plan["mistake_rate"], args.seed)
    write_eval_set(eval_set, eval_problems)
    base = os.path.join(out, "base")
    if not os.path.exists(os.path.join(base, "config.json")):
        make_base_checkpoint(base, train_problems, plan["model"], args.seed)

    data_dir = os.path.join(out, "data")
    run([sys.executable, "data.py", "build", "--raw", raw, "--out", data_dir, "--tokenizer", base,
         "--template", "qwen"], os.path.join(out, "data.log"))

    stage_dirs = {"sft": os.path.join(out, "sft")}
    train(stage_dirs["sft"], "sft", base, os.path.join(data_dir, "sft.jsonl"), plan["sft"])
    for name, (stage, data_file, extra) in STAGE2.items():
        stage_dirs[name] = os.path.join(out, name)
        if stage == "weighted":  # 4 completions per prompt: fewer prompts per packed row
            extra = extra + ["--micro-batch-size", str(plan["weighted_micro_batch"])]
        train(stage_dirs[name], stage, stage_dirs["sft"], os.path.join(data_dir, data_file), plan["stage2"], extra)

    results = {}
    for name, checkpoint in [("base", base)] + list(stage_dirs.items()):
        summary = evaluate(checkpoint, eval_set, os.path.join(out, "eval", name), plan["eval"])
        results[name] = headline(summary)
    results_path = os.path.join(out, "results.json")
    with open(results_path + ".tmp", "w") as f:
        json.dump(results, f, indent=2)
    os.replace(results_path + ".tmp", results_path)
    print_table(results)
    plot(out, results, stage_dirs)
    print(f"\nwrote {results_path} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
