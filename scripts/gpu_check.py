"""`make gpu-check`: everything that needs a GPU, in one run of about eleven minutes on one H100/H200, into ONE
JSON report (default runs/gpu_check/report.json).

Parts, each in its own process with its own time limit, so that one failure or hang costs only its part
(its error is recorded and the next part runs); the report is rewritten after every part:
  tests    tests/test_gpu.py: CUDA bf16 log-probs = CPU emulation, bf16 step vs fp32 step, FlexAttention
           backward = dense, no host sync per micro-step (set_sync_debug_mode), compiled decode = eager,
           one-GPU NCCL DDP run of train.py.
  train    scripts.bench train section, Qwen2.5-1.5B shape, random weights: tokens/s, MFU and peak memory at
           2k/8k/16k/32k tokens per micro-batch, activation checkpointing, with and without torch.compile
           (one process per size: a size that runs out of time or memory does not lose the others).
  decode   scripts.bench_decode, 1.5B shape in bf16: evaluate.generate against transformers' generate at
           batch 1, 16 and 64, eager; at batch 64 also the compiled step (CUDA graphs), in a process of its
           own (compile is per batch size: compiling all three would not fit; a failure there keeps the rest),
           which also times the decode loop with one 12,000-token row among 63 short ones against an
           all-short batch (each row over its own length: eager runs of slots, compiled block mask; and every
           row over the longest, as before).
Without CUDA it says so and exits 0 (nothing to check). Exit status 1 if any part failed.

    python -m scripts.gpu_check [--out runs/gpu_check] [--parts tests,train,decode]
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree

import torch

import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_TOKENS = (2048, 8192, 16384, 32768)
QWEN25_15B_DECODE = ["--hidden", "1536", "--intermediate", "8960", "--layers", "28", "--heads", "12",
                     "--kv-heads", "2", "--vocab", "151936"]
# Seconds per process, together about eleven minutes with start-up: 160 + 4 x 65 (train, one per size) + 60 + 175.
# Estimates until a first GPU run: the report records each process's seconds, to re-fit them.
LIMITS = {"tests": 160, "train": 65, "decode": 60, "decode_compiled": 175}
# Decode runs: (batch sizes, compile). A compiled step is one graph per (batch size, cache length), tens of
# seconds each at the 1.5B shape, so only the evaluation's batch (64) is compiled; that run times eager and
# transformers there too, and the long-row workload (one more graph: 64 slots x a 12k-token cache).
DECODE_RUNS = (("1,16", False), ("64", True))


def run_process(command: list[str], limit_s: float) -> dict:
    """Run one part's process from the repository root; its exit status, time and output tail."""
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=limit_s)
        status, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        status = "timed out"
        output = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                         for x in (e.stdout, e.stderr))
    return {"command": " ".join(command), "exit": status, "seconds": round(time.perf_counter() - start, 1),
            "output_tail": output[-4000:]}


def junit_outcomes(path: str) -> dict:
    """test name -> passed / failed / error / skipped (with the message and the test's printed figures)."""
    outcomes = {}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcome = {"result": "passed", "seconds": float(case.get("time", 0))}
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome = {**outcome, "result": "failed" if tag == "failure" else tag,
                           "message": (found.get("message") or "")[:2000]}
        printed = case.find("system-out")
        if printed is not None and printed.text:
            outcome["printed"] = printed.text.strip()[-2000:]
        outcomes[case.get("name")] = outcome
    return outcomes


def part_tests(out: str) -> dict:
    junit = os.path.join(out, "tests.xml")
    # -k: the CUDA tests only, not this script's own tests (which would run this part again).
    result = run_process([sys.executable, "-m", "pytest", "-q", "-rA", "tests/test_gpu.py", "-k", "not gpu_check",
                          f"--junitxml={junit}", "-o", "junit_logging=system-out"], LIMITS["tests"])
    result["tests"] = junit_outcomes(junit) if os.path.exists(junit) else {}
    result["ok"] = result["exit"] == 0 and all(t["result"] == "passed" for t in result["tests"].values())
    return result


def part_train(out: str) -> dict:
    rows, runs = [], []
    for tokens in TRAIN_TOKENS:
        path = os.path.join(out, f"train_{tokens}.json")
        run = run_process([sys.executable, "-m", "scripts.bench", "--device", "cuda", "--sections", "train",
                           "--tokens", str(tokens), "--variants", "ckpt,ckpt+compile", "--no-transformers",
                           "--warmup", "2", "--iters", "3", "--out", path], LIMITS["train"])
        if run["exit"] == 0:
            with open(path, encoding="utf-8") as f:
                rows += json.load(f)["train"]
        runs.append(run)
    return {"rows": rows, "runs": runs, "ok": all(r["exit"] == 0 for r in runs)}


def part_decode(out: str) -> dict:
    rows, runs = [], []
    for batches, compiled in DECODE_RUNS:
        path = os.path.join(out, f"decode_{'compiled' if compiled else 'eager'}.json")
        run = run_process([sys.executable, "-m", "scripts.bench_decode", "--device", "cuda", "--dtype", "bf16",
                           *QWEN25_15B_DECODE, "--batches", batches, "--compile" if compiled else "--no-compile",
                           "--long-row", "12000" if compiled else "0", "--long-steps", "8",
                           "--max-new-tokens", "128", "--queue", "2", "--repeats", "1", "--out", path],
                          LIMITS["decode_compiled" if compiled else "decode"])
        if run["exit"] == 0:
            with open(path, encoding="utf-8") as f:
                rows += json.load(f)["results"]
        runs.append(run)
    return {"rows": rows, "runs": runs, "ok": all(r["exit"] == 0 for r in runs)}


PARTS = {"tests": part_tests, "train": part_train, "decode": part_decode}


def summary_line(name: str, result: dict) -> str:
    if "error" in result:
        return f"{name}: ERROR {result['error']}"
    line = f"{name}: {'ok' if result['ok'] else 'FAILED'}"
    if name == "tests":
        line += " (" + ", ".join(f"{t}: {o['result']}" for t, o in result["tests"].items()) + ")"
    if name == "train":
        line += "".join(f"\n  {r['tokens']} tokens, compile={r['compile']}: "
                        + (f"{r['tokens_per_s']:,.0f} tok/s, MFU {r['mfu'] or 0:.1%}, {r['peak_mem_gib']:.1f} GiB"
                           if "error" not in r else r["error"]) for r in result["rows"])
    if name == "decode":
        line += "".join(f"\n  {r['workload']} batch {r['batch']}: ours {r['ours_tokens_per_s']:,.0f} tok/s, "
                        f"transformers {r['transformers_tokens_per_s']:,.0f} tok/s"
                        + (f", compiled {r['ours_compiled_tokens_per_s']:,.0f} tok/s"
                           if "ours_compiled_tokens_per_s" in r else "")
                        for r in result["rows"] if r["workload"] != "long_row")
        line += "".join(f"\n  one {r['long_context']}-token row among {r['batch'] - 1} short, per step vs all short: "
                        + ", ".join(f"{key.removeprefix('ratio_')} {value:.2f}x" for key, value in r.items()
                                    if key.startswith("ratio_"))
                        for r in result["rows"] if r["workload"] == "long_row")
    return line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/gpu_check", help="output directory (default: %(default)s)")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated of " + ",".join(PARTS))
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    if set(parts) - set(PARTS):
        raise common.InputError(f"--parts: unknown {sorted(set(parts) - set(PARTS))}; choose from {list(PARTS)}")
    if not torch.cuda.is_available():
        print(f"gpu_check.py: no CUDA device visible to torch {torch.__version__}: nothing to check here. "
              "Run `make gpu-check` on a machine with an NVIDIA GPU.", flush=True)
        return 0

    os.makedirs(args.out, exist_ok=True)
    report_path = os.path.join(args.out, "report.json")
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
              "torch": torch.__version__, "cuda": torch.version.cuda, "parts": {}}
    with common.OutputLock(args.out, "gpu_check.py"):
        for name in parts:
            print(f"[{name}]", flush=True)
            try:
                result = PARTS[name](args.out)
            except Exception as e:  # a bug in one part must not lose the others' results
                result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            report["parts"][name] = result
            common.write_json(report_path, report)
            print(summary_line(name, result), flush=True)
    print(f"wrote {report_path}")
    return 0 if all(r.get("ok") for r in report["parts"].values()) else 1


if __name__ == "__main__":
    common.cli(main, "gpu_check.py")
