"""Decode throughput: evaluate.generate against transformers' generate, greedy, on the same random model
and the same ragged-length prompts, at several batch sizes. Prints a table and writes JSON.

    python bench_decode.py --threads 1           # CPU, batches 1, 16, 64
    python bench_decode.py --device cuda --dtype bf16 --hidden 1536 --layers 28 --vocab 151936

Two workloads per batch size B:
  fixed   B prompts, no stop ids: every row generates exactly --max-new-tokens (pure decode speed).
  ragged  queue x B prompts whose greedy runs end at spread-out lengths, as an evaluation's answers do
          (the stop ids are tokens the runs themselves emit; see pick_stop_ids). transformers takes them in
          consecutive batches of B and each batch runs until its longest row ends; ours refills slots.
tokens/s = new tokens (stop tokens included) / wall time of the whole call, prefill included, best of
--repeats runs of each, alternated, after a warm-up. transformers runs as it is normally used:
left-padded batches with an attention mask. `agree` is the share of rows whose greedy tokens are
identical in both (left padding may move transformers' logits by rounding, so a near-tie could flip a
row). On a machine shared with other work, pass --threads 1: parallel regions that wait for a busy
core otherwise dominate both timings.
"""

import argparse
import json
import math
import os
import platform
import tempfile
import time

import torch
import transformers

import evaluate
from model import Qwen2


def make_checkpoint(path, args) -> transformers.Qwen2ForCausalLM:
    """A random Qwen2 saved to `path`; returns the transformers model (ours loads the same files). Weights
    are N(0, 0.1): with transformers' default 0.02 a random tied model only repeats its last token, which
    would make the stop-token workload below impossible to build."""
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate or 4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=4096, tie_word_embeddings=True, use_sliding_window=False,
        initializer_range=0.1)
    model = transformers.Qwen2ForCausalLM(config).eval()
    model.save_pretrained(path)
    return model


def ragged_prompts(count: int, vocab: int, low: int, high: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (count,), generator=g).tolist()
    return [torch.randint(10, vocab, (n,), generator=g).tolist() for n in lengths]


def until_stop(tokens: list[int], stop_ids: set) -> list[int]:
    """The tokens up to and including the first stop id."""
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[:i + 1]
    return tokens


def pick_stop_ids(free_runs: list[list[int]], seed: int) -> set:
    """Stop ids that end the greedy runs at spread-out lengths, as an evaluation's answers end: row r is
    meant to stop after ceil(L * u_r^2) tokens (u_r uniform; mean L / 3, a long tail), so its token there
    becomes a stop id; a row may stop earlier where another row's stop id appears first."""
    g = torch.Generator().manual_seed(seed)
    stops = set()
    for tokens in free_runs:
        u = torch.rand((), generator=g).item()
        stops.add(tokens[max(1, math.ceil(len(tokens) * u * u)) - 1])
    return stops


def hf_generate(model, prompts, max_new_tokens, device, stop_ids=None, batch=None) -> list[list[int]]:
    """transformers' greedy generate as normally used: consecutive left-padded batches of `batch` prompts
    with an attention mask; each row trimmed after its first stop id."""
    batch = batch or len(prompts)
    out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        kwargs = {"eos_token_id": sorted(stop_ids)} if stop_ids else {"eos_token_id": None,
                                                                         "min_new_tokens": max_new_tokens}
        result = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                                pad_token_id=0, **kwargs)
        out += [until_stop(row, stop_ids or set()) for row in result[:, width:].tolist()]
    return out


def compare(name, batch, ours_fn, hf_fn, repeats) -> dict:
    """Run both `repeats` times, alternating (so a change in machine load hits both alike); keep each
    one's best wall time."""
    best = {"ours": float("inf"), "hf": float("inf")}
    for _ in range(repeats):
        for who, fn in (("ours", ours_fn), ("hf", hf_fn)):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            best[who] = min(best[who], time.perf_counter() - start)
            if who == "ours":
                ours_out = out
            else:
                hf_out = out
    t_ours, t_hf = best["ours"], best["hf"]
    tokens = sum(map(len, ours_out))  # useful tokens (stop tokens included)
    agree = sum(a == b for a, b in zip(ours_out, hf_out)) / len(ours_out)
    r = {"workload": name, "batch": batch, "prompts": len(ours_out), "new_tokens": tokens,
         "ours_tokens_per_s": tokens / t_ours, "transformers_tokens_per_s": tokens / t_hf,
         "ratio": t_hf / t_ours, "ours_s": t_ours, "transformers_s": t_hf, "greedy_agree": agree}
    print(f"{name:<7} batch {batch:>3} ({len(ours_out):>3} prompts, {tokens:>6} tokens): ours "
          f"{r['ours_tokens_per_s']:8.1f} tok/s | transformers {r['transformers_tokens_per_s']:8.1f} tok/s | "
          f"ratio {r['ratio']:5.2f}x | agree {agree:.2f}", flush=True)
    return r


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", default="16,64", help="min,max prompt length (uniform)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=None, help="default 4 x hidden")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=3, help="best of this many timed runs each")
    p.add_argument("--queue", type=int, default=4, help="ragged workload: prompts per cache slot")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="bench_results/decode.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    low, high = map(int, args.prompt_len.split(","))

    with tempfile.TemporaryDirectory() as tmp:
        hf = make_checkpoint(tmp, args).to(device=args.device, dtype=dtype)
        ours = Qwen2.from_pretrained(tmp, dtype=dtype, device=args.device)
    results = []
    with torch.inference_mode():
        warm = ragged_prompts(2, args.vocab, low, high, seed=12345)  # first-call costs out of the timings
        evaluate.generate(ours, warm, 4)
        hf_generate(hf, warm, 4, args.device)
        for batch in map(int, args.batches.split(",")):
            # Fixed: `batch` prompts, every row exactly max_new_tokens long (no stop ids).
            prompts = ragged_prompts(batch, args.vocab, low, high, seed=batch)
            results.append(compare(
                "fixed", batch, lambda: evaluate.generate(ours, prompts, args.max_new_tokens, batch_size=batch),
                lambda: hf_generate(hf, prompts, args.max_new_tokens, args.device), args.repeats))
            # Ragged: queue x batch prompts whose greedy runs end at spread-out lengths (stop ids picked from
            # the runs themselves); transformers takes them in consecutive batches, ours refills its slots.
            prompts = ragged_prompts(args.queue * batch, args.vocab, low, high, seed=batch + 1)
            free_runs = evaluate.generate(ours, prompts, args.max_new_tokens, batch_size=batch)
            stops = pick_stop_ids(free_runs, seed=batch)
            results.append(compare(
                "ragged", batch, lambda: evaluate.generate(ours, prompts, args.max_new_tokens, stop_ids=stops,
                                                           batch_size=batch),
                lambda: hf_generate(hf, prompts, args.max_new_tokens, args.device, stops, batch), args.repeats))

    cpu = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    report = {"device": args.device if args.device != "cpu" else cpu,
              "dtype": args.dtype, "torch": torch.__version__, "transformers": transformers.__version__,
              "model": {"hidden": args.hidden, "intermediate": args.intermediate or 4 * args.hidden,
                        "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads,
                        "vocab": args.vocab},
              "max_new_tokens": args.max_new_tokens, "prompt_len": [low, high], "queue": args.queue,
              "results": results}
    if torch.cuda.is_available() and args.device.startswith("cuda"):
        report["device"] = torch.cuda.get_device_name()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
