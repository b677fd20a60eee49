"""Benchmark of `data.py build`: generations per second with 1 and with N worker processes, and the time
that projects to for OpenR1-Math-Raw (~516k problems, ~1M generations of ~6k tokens).

    python -m scripts.bench_build [--rows 120] [--workers 1 2] [--tokens-per-generation 6000]

The rows are synthetic but shaped like OpenR1-Math-Raw's (4 generations, correctness dict, every problem
with a correct and an incorrect trace, so every row's pair is length-counted: the build's worst case, since
only pairs are tokenized). The tokenizer is a byte-level BPE trained here on the same kind of text (no
download is possible); its speed per byte is of the same order as Qwen2.5's, not equal to it. The tokenizer's
own thread pool is off (TOKENIZERS_PARALLELISM=false), so N workers means N cores.
"""

import argparse
import json
import os
import platform
import random
import resource
import tempfile
import time

os.environ["TOKENIZERS_PARALLELISM"] = "false"

import data  # noqa: E402
from scripts import tiny  # noqa: E402

WORDS = ("Let me check the sum again . First , 12 + 35 = 47 . Then the tens : 1 + 3 = 4 . Wait , maybe the "
         "factor is \\frac{3}{4} so x^2 - 5x + 6 = 0 gives x = 2 or x = 3 . Hmm , so the answer is \\boxed{47} "
         "because the remainder mod 7 is 5 and 2^{10} = 1024 .").split()


def generation(rng: random.Random, n_words: int) -> str:
    return "<think>\n" + " ".join(rng.choice(WORDS) for _ in range(n_words)) + "\n</think>\nSo \\boxed{47}."


def write_raw(path, rows: int, words_per_generation: int) -> int:
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            gens = [generation(rng, words_per_generation) for _ in range(4)]
            f.write(json.dumps({"problem": f"Problem {i}: what is 12 + 35?", "answer": "47", "source": "olympiads",
                                "problem_is_valid": "Yes", "generations": gens,
                                "correctness": {"llama_verification": [False, True, True, False],
                                                "math_verify_answer": [False, True, True, True],
                                                "math_verify_reparsed_answer": [False, True, True, True]}}) + "\n")
    return 4 * rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rows", type=int, default=120, help="synthetic problems (4 generations each)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time")
    p.add_argument("--tokens-per-generation", type=int, default=6000, help="approximate tokens per generation")
    p.add_argument("--real-generations", type=float, default=1.0e6, help="generations of the file to project to")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "raw.jsonl")
        rng = random.Random(1)
        tokenizer = tiny.make_tokenizer(os.path.join(tmp, "tok"), [generation(rng, 2000) for _ in range(20)],
                                        vocab_size=4000)
        sample = generation(random.Random(2), 1000)
        words = int(1000 * args.tokens_per_generation / len(tokenizer.encode(sample).ids))
        n_generations = write_raw(raw, args.rows, words)
        tokens = len(tokenizer.encode(generation(random.Random(3), words)).ids)
        print(f"{args.rows} rows, {n_generations} generations of ~{tokens} tokens "
              f"({os.path.getsize(raw) / 1e6:.0f} MB); {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs visible; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
        for run, workers in enumerate(args.workers):
            start, cpu_start = time.perf_counter(), cpu_seconds()
            report = data.build_from_raw(raw, os.path.join(tmp, f"out{run}"), tokenizer=tokenizer,
                                         workers=workers)
            seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
            rate = n_generations / seconds
            print(f"workers {workers}: {seconds:.1f} s wall, {cpu:.1f} CPU-s, {rate:,.0f} generations/s, "
                  f"{n_generations / cpu:,.0f} generations per CPU-second "
                  f"({report['pairs_before_length_filter']} pairs length-counted); projected for "
                  f"{args.real_generations:,.0f} generations at this wall rate: "
                  f"{args.real_generations / rate / 3600:.2f} h")


def cpu_seconds() -> float:
    """CPU time of this process and of its finished worker processes: on a shared machine, what the build
    itself cost, whatever else competes for the cores."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


if __name__ == "__main__":
    main()
