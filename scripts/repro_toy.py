"""The README's "Reproducing the paper" path, every command of it, at toy scale on a CPU:

    python -m scripts.repro_toy --out runs/repro_toy

The commands are read from README.md itself (the ```bash blocks of that section), so the README cannot drift
from what runs. They run in a work directory laid out as the repository root is in the README (checkpoints/,
data/, benchmarks/, runs/, recipes/ linked), with these substitutions, and nothing else skipped:
  - install (`make install`, activating the venv): this script already runs in the venv;
  - `hf download Qwen/Qwen2.5-Math-1.5B`: a tiny random Qwen2 with a BPE tokenizer (scripts/tiny.py) in its place;
  - `fetch_data openr1`: an OpenR1-Math-Raw-shaped file written here (problems with four traces each, LandMV
    labels in `correctness`, some invalid and cn_k12 rows that the build drops);
  - `fetch_data benchmarks`: run as written, from a local directory (--base-url file://...) holding DeepScaleR-
    shaped JSON lists made from ../shared/data: MATH-500 and AIME24 subsets, and, for AMC23, Minerva and
    OlympiadBench (not available here), other MATH-500 rows standing in;
  - every train.py run is cut to a few steps of batch 4, every evaluation to 2 samples of a few tokens
    (flags appended, so they win over the recipe's and the README's);
  - `torchrun --nproc_per_node 8` runs in this process as one process (the update is the same, README);
    --torchrun N runs those commands under torchrun with N processes instead (slower: a process per command).
Each command line is printed before it runs; the last one is the results table (Table 1's shape).
"""

import argparse
import contextlib
import glob
import json
import os
import random
import re
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402
from common import InputError  # noqa: E402
from scripts import tiny  # noqa: E402

SECTION = "## Reproducing the paper"
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
# Commands replaced by what this script makes itself (see the module docstring), by their first words.
SUBSTITUTED = ("make install", ". .venv/bin/activate", "hf download", "python -m scripts.fetch_data openr1")


# ----------------------------------------------------------------------------------------------------------
# 1. The README's commands


def readme_commands(readme=os.path.join(ROOT, "README.md")) -> list[str]:
    """Every command line of the section's ```bash blocks: continuation lines joined, comments dropped."""
    text = open(readme, encoding="utf-8").read()
    start = text.index(SECTION)
    section = text[start:text.find("\n## ", start + len(SECTION))]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*", "", line).strip()
            if line:
                commands.append(" ".join(line.split()))
    return commands


def expand_loops(command: str) -> list[str]:
    """`for V in A B; do BODY; done` (nested too) as the commands it runs, $V and ${V} replaced."""
    loop = re.fullmatch(r"for (\w+) in ([^;]+); do (.*); done", command)
    if not loop:
        return [command]
    name, values, body = loop.groups()
    return [c for v in values.split() for c in expand_loops(re.sub(rf"\${{?{name}\b}}?", v, body))]


# ----------------------------------------------------------------------------------------------------------
# 2. Stand-ins for the downloads


def write_raw_traces(path, problems: int, seed: int = 0) -> None:
    """OpenR1-Math-Raw-shaped rows: addition problems with four traces, each labelled by LandMV's two
    verifiers; every 7th row invalid, every 11th from cn_k12 (both dropped by data.py build)."""
    rng = random.Random(seed)
    rows = []
    for i in range(problems):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        answers = [a + b + (0 if rng.random() < 0.6 else rng.choice([-1, 1])) for _ in range(4)]
        traces = [f"<think>\nAdd {a} and {b}: {x}.\n</think>\nThe answer is \\boxed{{{x}}}." for x in answers]
        labels = [x == a + b for x in answers]
        rows.append({"problem": f"What is {a} + {b}?", "answer": str(a + b), "generations": traces,
                     "correctness": {"llama_verification": labels, "math_verify_reparsed_answer": labels},
                     "source": "cn_k12" if i % 11 == 10 else "olympiads",
                     "problem_is_valid": "no" if i % 7 == 6 else "yes"})
    common.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def write_benchmark_sources(directory, per_benchmark: int, shared: str = SHARED) -> None:
    """DeepScaleR-shaped JSON lists (what fetch_data benchmarks downloads) from subsets of `shared`'s
    math500.jsonl and aime24.jsonl."""
    math500 = [row for _, row in common.read_jsonl(os.path.join(shared, "math500.jsonl"))]
    aime24 = [row for _, row in common.read_jsonl(os.path.join(shared, "aime24.jsonl"))]
    k = per_benchmark
    sources = {"math.json": math500[:k], "aime.json": aime24[:k], "amc.json": math500[k:2 * k],
               "minerva.json": math500[2 * k:3 * k], "olympiad_bench.json": math500[3 * k:4 * k]}
    os.makedirs(directory, exist_ok=True)
    for name, rows in sources.items():
        common.write_json(os.path.join(directory, name), [{"problem": r["problem"], "answer": r["answer"]}
                                                          for r in rows])


def make_workspace(work, problems: int, per_benchmark: int, shared: str = SHARED) -> None:
    """The repository root as the README's commands expect it, with the downloads substituted."""
    os.makedirs(work, exist_ok=True)
    if not os.path.exists(os.path.join(work, "recipes")):
        os.symlink(os.path.join(ROOT, "recipes"), os.path.join(work, "recipes"))
    model = os.path.join(work, "checkpoints", "Qwen2.5-Math-1.5B")
    if not os.path.exists(model):
        corpus = tiny.DEFAULT_CORPUS + ["<think>\nAdd 12 and 35: 47.\n</think>\nThe answer is \\boxed{47}."]
        tiny.make_checkpoint(model, texts=corpus, vocab_size=600)
    write_raw_traces(os.path.join(work, "openr1_raw.jsonl"), problems)
    write_benchmark_sources(os.path.join(work, "deepscaler_test"), per_benchmark, shared)


# ----------------------------------------------------------------------------------------------------------
# 3. Running them


def toy_argv(argv: list[str], steps: int) -> list[str]:
    """The command's arguments with the toy's sizes appended (later flags win in argparse)."""
    script = argv[0]
    if script == "train.py":
        return argv + ["--batch-size", "4", "--max-steps", str(steps)] + (
            ["--eval-steps", "1", "--eval-max-new-tokens", "8", "--eval-limit", "2"] if "--eval-steps" in argv else [])
    if script == "evaluate.py":
        return argv + ["--num-samples", "2", "--max-new-tokens", "12"]
    if script == "data.py":
        return argv + ["--workers", "1"]
    if argv[:2] == ["-m", "scripts.fetch_data"] and argv[2] == "benchmarks":
        return argv + ["--base-url", "file://" + os.path.abspath("deepscaler_test")]
    return argv


def entry_point(argv: list[str]):
    """The main() a command line runs, and its arguments."""
    import data
    import evaluate
    import train
    from scripts import fetch_data, plot_runs, results_table

    scripts = {"train.py": train.main, "evaluate.py": evaluate.main, "data.py": data.main}
    modules = {"scripts.fetch_data": fetch_data.main, "scripts.plot_runs": plot_runs.main,
               "scripts.results_table": results_table.main}
    if argv[0] in scripts:
        return scripts[argv[0]], argv[1:]
    if argv[0] == "-m" and argv[1] in modules:
        return modules[argv[1]], argv[2:]
    raise InputError(f"README command not understood by the toy run: python {' '.join(argv)}")


def run_command(command: str, steps: int, torchrun: int) -> None:
    words = [w for part in shlex.split(command) for w in (sorted(glob.glob(part)) or [part])]  # bash's globbing
    if words[0] == "torchrun":
        words = ["python"] + words[words.index("--nproc_per_node") + 2:]
        distributed = torchrun > 1
    else:
        distributed = False
    if words[0] != "python":
        raise InputError(f"README command not understood by the toy run: {command}")
    argv = toy_argv(words[1:], steps)
    print(f"$ {command}\n  (toy: {' '.join(argv[len(words) - 1:]) or 'as written'})", flush=True)
    if distributed:
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                        str(torchrun), os.path.join(ROOT, argv[0]), *argv[1:]], check=True)
        return
    main, rest = entry_point(argv)
    main(rest)


def run_readme(work, steps: int = 2, problems: int = 28, per_benchmark: int = 3, torchrun: int = 0,
               shared: str = SHARED) -> list[str]:
    """Run every command of the README's section in `work`; returns them, substituted ones included."""
    make_workspace(work, problems, per_benchmark, shared)
    commands = readme_commands()
    with contextlib.chdir(work):
        for command in commands:
            if command.startswith(SUBSTITUTED):
                print(f"$ {command}\n  (toy: substituted, see scripts/repro_toy.py)", flush=True)
                continue
            for one in expand_loops(command):
                run_command(one, steps, torchrun)
    return commands


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.repro_toy", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/repro_toy", help="work directory (fresh: it must not exist)")
    p.add_argument("--steps", type=common.COUNT, default=2, help="optimizer steps of every training run")
    p.add_argument("--torchrun", type=common.COUNT, help="run the torchrun commands under torchrun with N processes")
    p.add_argument("--shared", default=SHARED, help="directory holding math500.jsonl and aime24.jsonl")
    args = p.parse_args(argv)
    if os.path.exists(args.out):
        raise InputError(f"--out {args.out} exists; the toy run starts from nothing: pick another or delete it")
    run_readme(os.path.abspath(args.out), args.steps, torchrun=args.torchrun or 0, shared=os.path.abspath(args.shared))
    return 0


if __name__ == "__main__":
    common.cli(main, "repro_toy")
