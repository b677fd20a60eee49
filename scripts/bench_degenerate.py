r"""bench_degenerate.py — the answer checker (verify.py) on degenerate completions, and from threads.

Two checks from issue 24, each printed as a table and written as JSON to --out
(default bench_results/degenerate.json):

  loops    A model that loops repeats one unit until its token limit: `\(` or `\[` (one token each),
           `$`, an unclosed `\boxed{`, `{` nesting, a digit run, a sentence, ... For every shape and
           every position (the loop after a correct `\boxed{42}`, before it, after a "final answer"
           phrase, inside the box) a completion is graded at loop sizes of 1k, 2k, ... up to
           --max-tokens tokens (a unit counts as one token per 3.5 characters, at least one).
           Reported: seconds per size, whether every verdict is right (True where the correct box or
           phrase is there, False where the loop is the answer), the worst case and, per row, the
           slope of log(time) against log(size) over the four largest sizes (linear cost: 1;
           quadratic: 2). Times are the fastest of 3 runs with cold caches.
  threads  --processes fresh Python processes each grade the same --pairs (completion, gold) pairs
           (slow correct ones 8 times in a row, then MATH-500 gold / rewritten / shifted, the challenge
           set, the peer-suite and issue-24 families, numeric golds) first from --threads threads, with
           cold imports and caches, then again from one thread.
           Reported: pairs whose verdicts differ (must be 0) and processes that did not finish within
           --timeout (a deadlock on the import lock would show here).

    python -m scripts.bench_degenerate [--out PATH] [--max-tokens 32768] [--processes 20] [--pairs 1200]
                                       [--threads 8] [--timeout 600] [--skip-loops] [--skip-threads]
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import verify
from common import InputError, cli, write_text

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# 1. Repetition loops
# ---------------------------------------------------------------------------------------------
LOOP_SHAPES = {
    "\\(": "\\(", "\\[": "\\[", "\\( space": "\\( ", "\\( newline": "\\(\n", "$": "$", "$$": "$$",
    "\\boxed{ unclosed": "\\boxed{", "{ nesting": "{", "\\left(": "\\left(", "\\frac{": "\\frac{",
    "\\sqrt{": "\\sqrt{", "\\begin{pmatrix}": "\\begin{pmatrix}", "\\text{": "\\text{", "|": "|", "^{": "x^{",
    "digit run": "7", "digit groups": "1234567890", "1, 1, ...": "1, ", "sentence": "So x = 5 here. ",
    "wait sentence": "Wait, let me recompute that step. ", "Answer:": "Answer: ", "**": "**",
    "\\( x": "\\( x", "$ and $": "$ and $", "$a$ or": "$a$ or ", "spaces": " ", "newlines": "\n", "backslashes": "\\",
}
POSITIONS = {  # position -> (completion around the loop, the right verdict against the gold 42)
    "after box": (lambda loop: f"So the answer is $\\boxed{{42}}$. {loop}", True),
    "before box": (lambda loop: f"{loop}\nSo the final answer is $\\boxed{{42}}$.", True),
    "after phrase": (lambda loop: f"The final answer is $42$. {loop}", True),
    "in the box": (lambda loop: f"So the answer is $\\boxed{{{loop}}}$.", False),   # the loop is the answer
}


def unit_tokens(unit: str) -> int:
    return max(1, round(len(unit) / 3.5))


def time_grade(completion: str, gold: str, repeats: int = 3) -> tuple[bool, float]:
    """(verdict, fastest of `repeats` cold-cache calls: on a shared machine the minimum is the cost,
    the rest is other jobs' load)."""
    seconds, verdict = [], None
    for _ in range(repeats):
        verify._clear_caches()
        start = time.perf_counter()
        verdict = verify.grade(completion, gold)
        seconds.append(time.perf_counter() - start)
    return verdict, min(seconds)


def loop_sizes(max_tokens: int) -> list[int]:
    sizes, n = [], 1024
    while n < max_tokens:
        sizes.append(n)
        n *= 2
    return sizes + [max_tokens]


def bench_loops(max_tokens: int) -> dict:
    sizes = loop_sizes(max_tokens)
    rows, worst = [], {"seconds": 0.0}
    print(f"\n== repetition loops: seconds per grade at loop sizes {sizes} tokens (fastest of 3, cold caches)")
    print(f"  {'shape':22s} {'position':13s} " + " ".join(f"{n:>8d}" for n in sizes) + "   slope  verdicts")
    for shape, unit in LOOP_SHAPES.items():
        for position, (build, right) in POSITIONS.items():
            times, verdicts = [], []
            for n in sizes:
                completion = build(unit * (n // unit_tokens(unit)))
                verdict, seconds = time_grade(completion, "42")
                times.append(seconds)
                verdicts.append(verdict is right)
                if seconds > worst["seconds"]:
                    worst = {"seconds": seconds, "shape": shape, "position": position, "tokens": n,
                             "characters": len(completion)}
            slope = loglog_slope(sizes[-4:], times[-4:])
            rows.append({"shape": shape, "position": position, "seconds": [round(t, 5) for t in times],
                         "loglog_slope": round(slope, 2), "all_correct": all(verdicts)})
            print(f"  {shape:22s} {position:13s} " + " ".join(f"{t:8.4f}" for t in times)
                  + f"   {slope:5.2f}  {'all right' if all(verdicts) else 'WRONG at ' + str(verdicts)}")
    wrong = [f"{r['shape']} / {r['position']}" for r in rows if not r["all_correct"]]
    measurable = [r["loglog_slope"] for r in rows if r["seconds"][-1] >= 0.01]
    print(f"  log-log slope over the last 4 sizes, rows whose largest time is >= 10 ms: "
          f"{min(measurable, default=0):.2f}-{max(measurable, default=0):.2f} ({len(measurable)} rows; linear 1, quadratic 2)")
    print(f"  worst case: {worst['seconds']:.4f} s ({worst.get('shape')}, {worst.get('position')}, "
          f"{worst.get('tokens')} tokens, {worst.get('characters')} characters); wrong verdicts: {wrong or 'none'}")
    return {"sizes_tokens": sizes, "rows": rows, "worst": worst, "wrong_verdicts": wrong,
            "slope_range_measurable": [min(measurable, default=0), max(measurable, default=0)]}


def loglog_slope(sizes: list[int], times: list[float]) -> float:
    """Least-squares slope of log(time) against log(size): 1 for linear cost, 2 for quadratic."""
    if len(sizes) < 2:
        return 0.0                                     # one size (--max-tokens <= 1024): no slope
    xs, ys = [math.log(n) for n in sizes], [math.log(max(t, 1e-7)) for t in times]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


# ---------------------------------------------------------------------------------------------
# 2. Threads: fresh processes, 8 threads first, then one thread
# ---------------------------------------------------------------------------------------------
# Correct pairs that cost 0.05-0.25 s of CPU each: with a wall-clock deadline, 8 threads grading them at
# once would see each take 8x longer and time out to False; with the thread-CPU deadline they cannot.
HEAVY_PAIRS = [(r"$\prod_{k=1}^{300} \frac{k+1}{k}$", "301"), (r"$\int_0^{\pi} \sin^2 x \, dx$", r"\frac{\pi}{2}"),
               (r"$\sum_{k=1}^{1000} k^3$", r"\left(\frac{1000 \cdot 1001}{2}\right)^2")]


def collect_pairs(limit: int, heavy_copies: int = 8) -> list[tuple[str, object]]:
    """`limit` (completion, gold) pairs: HEAVY_PAIRS, each `heavy_copies` times in a row (so that the
    threads grade them at the same moment), then pairs spread evenly over every set bench_verify grades,
    the issue-24 families and the numeric golds."""
    import importlib.util

    from scripts import bench_verify
    spec = importlib.util.spec_from_file_location("verify_tables", ROOT / "tests" / "test_verify.py")
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    data = bench_verify.DEFAULT_DATA
    if not data.is_file():
        raise InputError(f"{data}: MATH-500 jsonl not found (expected ../shared/data beside the checkout)")
    sets = bench_verify.math500_sets(bench_verify.load_rows(data))
    sets["challenge"] = bench_verify.CHALLENGE
    sets.update(bench_verify.peer_sets())
    pairs = [(c, g) for rows in sets.values() for c, g, *_ in rows]
    for rows in tables.ISSUE24_FAMILIES.values():
        pairs += [(f"${p}$", g) for p, g, _ in rows] + [(f"${g}$", p) for p, g, _ in rows]
    pairs += [(c, g) for c, g, _ in tables.NUMERIC_GOLDS if isinstance(g, (str, int)) or g == g]   # not NaN
    heavy = [pair for pair in HEAVY_PAIRS for _ in range(heavy_copies)][:limit]
    rest = limit - len(heavy)
    step = len(pairs) / rest if rest else 1
    return heavy + ([pairs[int(k * step)] for k in range(rest)] if rest < len(pairs) else pairs)


def worker(pairs_file: str, threads: int) -> dict:
    """In a fresh process: grade every pair from `threads` threads (nothing warmed up), then from one
    thread with caches cleared; the indices whose verdicts differ."""
    pairs = json.loads(Path(pairs_file).read_text(encoding="utf-8"))
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        threaded = list(pool.map(lambda p: verify.grade(p[0], p[1]), pairs))
    threaded_seconds = time.perf_counter() - start
    verify._clear_caches()
    start = time.perf_counter()
    single = [verify.grade(c, g) for c, g in pairs]
    differ = [k for k, (a, b) in enumerate(zip(threaded, single)) if a != b]
    return {"pairs": len(pairs), "accepted": sum(single), "differ": differ,
            "threaded_seconds": round(threaded_seconds, 2), "single_seconds": round(time.perf_counter() - start, 2)}


def thread_check(processes: int, pairs: int, threads: int, timeout_s: float, heavy_copies: int = 8) -> dict:
    """Run `processes` fresh workers one after the other on the same pairs; summarise."""
    chosen = collect_pairs(pairs, heavy_copies)
    results, timeouts, differing = [], 0, []
    with tempfile.TemporaryDirectory() as tmp:
        pairs_file = Path(tmp) / "pairs.json"
        pairs_file.write_text(json.dumps(chosen), encoding="utf-8")
        for k in range(processes):
            command = [sys.executable, "-m", "scripts.bench_degenerate", "--worker", str(pairs_file),
                       "--threads", str(threads)]
            try:
                done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timeouts += 1
                print(f"  process {k + 1}: no answer within {timeout_s:.0f} s (deadlock?)")
                continue
            if done.returncode != 0:
                print(f"  process {k + 1}: exit {done.returncode}: {done.stderr.strip()[-300:]}")
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results.append(result)
            differing += [{"completion": chosen[i][0][-120:], "gold": str(chosen[i][1])[:60]} for i in result["differ"]]
            print(f"  process {k + 1}: {result['pairs']} pairs, {len(result['differ'])} differ; "
                  f"{threads} threads {result['threaded_seconds']} s, 1 thread {result['single_seconds']} s")
    return {"processes": processes, "processes_ok": len(results), "timeouts": timeouts, "threads": threads,
            "pairs_per_process": len(chosen), "differing_verdicts": len(differing), "examples": differing[:10],
            "accepted_per_process": sorted({r["accepted"] for r in results})}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_degenerate.py", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench_results/degenerate.json"), help="JSON output path")
    parser.add_argument("--max-tokens", type=int, default=32768, help="largest loop, in tokens (default %(default)s)")
    parser.add_argument("--processes", type=int, default=20, help="fresh processes for the thread check")
    parser.add_argument("--pairs", type=int, default=1200, help="pairs per process (default %(default)s)")
    parser.add_argument("--threads", type=int, default=8, help="threads per process (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds a process may take (default %(default)s)")
    parser.add_argument("--skip-loops", action="store_true")
    parser.add_argument("--skip-threads", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.threads)))
        return 0
    for flag, value in (("--max-tokens", args.max_tokens), ("--processes", args.processes), ("--pairs", args.pairs),
                        ("--threads", args.threads), ("--timeout", args.timeout)):
        if value < 1:
            raise InputError(f"{flag} {value}: must be at least 1")
    results = {"date": time.strftime("%Y-%m-%d"), "python": sys.version.split()[0]}
    if not args.skip_loops:
        results["loops"] = bench_loops(args.max_tokens)
    if not args.skip_threads:
        print(f"\n== threads: {args.processes} fresh processes x {args.pairs} pairs, {args.threads} threads then 1")
        results["threads"] = thread_check(args.processes, args.pairs, args.threads, args.timeout)
        t = results["threads"]
        print(f"  {t['processes_ok']}/{t['processes']} processes finished, {t['timeouts']} timed out; "
              f"{t['differing_verdicts']} differing verdicts over {t['pairs_per_process']} pairs each")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    cli(main, "bench_degenerate.py")
