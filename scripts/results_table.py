"""Several evaluations' summary.json (evaluate.py --out) as one table, like the paper's Table 1:

    python -m scripts.results_table runs/eval/*/* --out runs/results.md

One row per checkpoint, one column per benchmark (named as in the paper when the data file is one of its
five: math500.jsonl -> MATH-500, ...), each cell pass@1 ± its standard error in percent, as evaluate.py
computed them (--protocol redi: the paper's SEM, std over the n sample sets / √n). Avg.: the mean over the
row's benchmarks when it has every column, ± √(Σ SEM²) / B (the benchmarks' errors taken as independent; the
paper does not say how it computed the SEM of its average). Markdown on stdout, and in --out if given.
"""

import argparse
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402
from common import InputError  # noqa: E402

# Data file name (without .jsonl) -> the paper's column name, in the paper's order (Table 1).
PAPER_BENCHMARKS = {"math500": "MATH-500", "aime24": "AIME24", "amc23": "AMC23", "minerva": "Minerva",
                    "olympiadbench": "OlympiadBench"}


def read_summary(path) -> dict:
    """evaluate.py's summary.json (a directory holding one, or the file), with what the table needs."""
    file = os.path.join(path, "summary.json") if os.path.isdir(path) else path
    try:
        with open(file, encoding="utf-8") as f:
            summary = json.load(f)
        settings = summary["settings"]
        return {"model": settings["checkpoint"], "data": settings["data"], "pass@1": float(summary["pass@1"]),
                "sem": summary["pass@1_stderr"], "n": summary["n"], "problems": summary["problems"]}
    except FileNotFoundError:
        raise InputError(f"{path}: no summary.json; pass evaluate.py output directories (finished runs)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{file}: not a summary.json written by evaluate.py ({type(e).__name__}: {e})") from None


def benchmark_name(data_path: str) -> str:
    stem = os.path.splitext(os.path.basename(data_path))[0]
    return PAPER_BENCHMARKS.get(stem.lower().replace("_", "").replace("-", ""), stem)


def cell(value: float, sem) -> str:
    return f"{100 * value:.1f}" + (f" ± {100 * sem:.1f}" if sem is not None else "")


def build_table(summaries: list[dict]) -> str:
    """The markdown table (rows: checkpoints in first-seen order; columns: the paper's benchmarks first)."""
    models = list(dict.fromkeys(s["model"] for s in summaries))
    short = {m: os.path.basename(os.path.normpath(m)) for m in models}
    if len(set(short.values())) < len(models):  # two checkpoints of one name: show their paths
        short = {m: m for m in models}
    found = {benchmark_name(s["data"]) for s in summaries}
    columns = [b for b in PAPER_BENCHMARKS.values() if b in found] + sorted(found - set(PAPER_BENCHMARKS.values()))
    cells = {}
    for s in summaries:
        key = (s["model"], benchmark_name(s["data"]))
        if key in cells:
            raise InputError(f"two evaluations of {s['model']} on {key[1]}; pass one of them")
        cells[key] = s
    lines = ["| model | " + " | ".join(columns) + " | Avg. |", "|---" * (len(columns) + 2) + "|"]
    for m in models:
        row = [cells.get((m, b)) for b in columns]
        done = [s for s in row if s is not None]
        average = "—"
        if len(done) == len(columns):
            sems = [s["sem"] for s in done]
            sem = None if None in sems else math.sqrt(sum(x * x for x in sems)) / len(done)
            average = cell(sum(s["pass@1"] for s in done) / len(done), sem)
        lines.append(f"| {short[m]} | " + " | ".join(cell(s["pass@1"], s["sem"]) if s else "—" for s in row)
                     + f" | {average} |")
    sizes = {b: sorted({s["problems"] for s in summaries if benchmark_name(s["data"]) == b}) for b in columns}
    samples = sorted({s["n"] for s in summaries})
    lines.append(f"\npass@1 (%) ± standard error over {'/'.join(map(str, samples))} samples per problem; problems: "
                 + ", ".join(f"{b} {'/'.join(map(str, n))}" for b, n in sizes.items()) + ".")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.results_table", description=__doc__.splitlines()[0])
    p.add_argument("evals", nargs="+", help="evaluate.py output directories (or their summary.json files)")
    p.add_argument("--out", help="also write the table to this file (markdown)")
    args = p.parse_args(argv)
    table = build_table([read_summary(path) for path in args.evals])
    print(table, end="")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        common.write_text(args.out, table)
    return 0


if __name__ == "__main__":
    common.cli(main, "results_table")
