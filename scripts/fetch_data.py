"""Download what the paper's runs read (needs network, once; `make install` installs the clients):

    python -m scripts.fetch_data openr1 --out openr1_raw.jsonl       # Open-R1's raw DeepSeek-R1 traces
    python -m scripts.fetch_data benchmarks --out benchmarks         # the five benchmarks of Table 1

openr1: the `open-r1/OpenR1-Math-Raw` data set (Hugging Face `datasets`, streamed row by row), keeping the
fields `data.py build` reads, one JSON object per line.

benchmarks: the evaluation sets the authors' rllm evaluation reads (DeepScaleR's test files, the `deepscaler`
branch of github.com/agentica-project/rllm, deepscaler/data/test/*.json: a JSON list of objects with
`problem` and `answer`), written as the JSONL evaluate.py reads: benchmarks/math500.jsonl, aime24.jsonl,
amc23.jsonl, minerva.jsonl, olympiadbench.jsonl (names scripts/results_table.py maps to the paper's columns).
--base-url points elsewhere (a mirror, or a local directory as file:///...). Each file is written whole or
not at all; a file already there is kept (delete it to fetch again).
"""

import argparse
import json
import os
import sys
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402
from common import InputError  # noqa: E402

OPENR1 = "open-r1/OpenR1-Math-Raw"
OPENR1_FIELDS = ("problem", "answer", "generations", "correctness", "source", "problem_is_valid")
BASE_URL = "https://raw.githubusercontent.com/agentica-project/rllm/deepscaler/deepscaler/data/test"
# Our file name -> DeepScaleR's file name.
BENCHMARKS = {"math500": "math.json", "aime24": "aime.json", "amc23": "amc.json", "minerva": "minerva.json",
              "olympiadbench": "olympiad_bench.json"}


def fetch_openr1(out) -> int:
    """OpenR1-Math-Raw's train split as JSONL with OPENR1_FIELDS; returns the number of rows."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise InputError("the datasets package is not installed: make install (or .venv/bin/pip install -r "
                         "requirements-download.txt)") from None
    count = 0

    def write(tmp):
        nonlocal count
        with open(tmp, "w", encoding="utf-8") as f:
            for row in load_dataset(OPENR1, split="train", streaming=True):
                f.write(json.dumps({k: row[k] for k in OPENR1_FIELDS}, ensure_ascii=False) + "\n")
                count += 1

    common.atomic_write(out, write)
    return count


def problems_jsonl(text: str, where: str) -> str:
    """A JSON list of {problem, answer, ...} objects as evaluate.py's JSONL: one object per line, every field
    kept (evaluate.py reads problem, answer, and id / unique_id, subject, level when present)."""
    try:
        rows = json.loads(text)
    except ValueError as e:
        raise InputError(f"{where}: not JSON ({e})") from None
    if not isinstance(rows, list) or not rows:
        raise InputError(f"{where}: expected a non-empty JSON list of problems")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "problem" not in row or "answer" not in row:
            raise InputError(f"{where}: item {i} lacks 'problem' or 'answer'")
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def fetch_benchmarks(out_dir, base_url: str = BASE_URL) -> dict[str, int]:
    """Every benchmark of BENCHMARKS not in out_dir yet; returns {file written: problems}."""
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    for name, remote in BENCHMARKS.items():
        path = os.path.join(out_dir, f"{name}.jsonl")
        if os.path.exists(path):
            continue
        url = f"{base_url.rstrip('/')}/{remote}"
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                text = response.read().decode("utf-8")
        except OSError as e:
            raise InputError(f"{url}: cannot download ({e}); check the network or pass --base-url") from None
        lines = problems_jsonl(text, url)
        common.write_text(path, lines)
        written[path] = lines.count("\n")
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.fetch_data", description=__doc__.splitlines()[0])
    commands = p.add_subparsers(dest="what", required=True)
    commands.add_parser("openr1", help=f"{OPENR1} -> JSONL").add_argument("--out", default="openr1_raw.jsonl")
    bench = commands.add_parser("benchmarks", help="MATH-500, AIME24, AMC23, Minerva, OlympiadBench -> JSONL")
    bench.add_argument("--out", default="benchmarks", help="directory for the five JSONL files")
    bench.add_argument("--base-url", default=BASE_URL, help="where DeepScaleR's test files are")
    args = p.parse_args(argv)
    if args.what == "openr1":
        print(f"wrote {args.out}: {fetch_openr1(args.out):,} rows")
    else:
        for path, count in fetch_benchmarks(args.out, args.base_url).items():
            print(f"wrote {path}: {count} problems")
    return 0


if __name__ == "__main__":
    common.cli(main, "fetch_data")
