"""Decode throughput: evaluate.generate, eager and compiled, against transformers' generate, greedy, on the
same random model and the same ragged-length prompts, at several batch sizes. Prints a table, writes JSON.

    python -m scripts.bench_decode --threads 1                     # CPU: batches 1, 16, 64, eager only
    python -m scripts.bench_decode --device cuda --dtype bf16 --hidden 1536 --intermediate 8960 --layers 28 \\
        --heads 12 --kv-heads 2 --vocab 151936 --out bench_results/decode.json      # Qwen2.5-1.5B shape
    python -m scripts.bench_decode --threads 1 --batches ''       # the long-row workload alone (README)

Two workloads per batch size B:
  fixed   B prompts, no stop ids: every row generates exactly --max-new-tokens (pure decode speed).
  ragged  queue x B prompts whose greedy runs end at spread-out lengths, as an evaluation's answers do
          (the stop ids are tokens the runs themselves emit; see pick_stop_ids). transformers takes them in
          consecutive batches of B and each batch runs until its longest row ends; ours refills slots.
--compile (default: on with CUDA, off on CPU) adds evaluate's compiled decode step (torch.compile, CUDA
graphs on CUDA) on the fixed workload (and on ragged with --compile-ragged: the cache shrinking at its tail
compiles a graph per slot count). Compilation happens in an untimed warm-up run of the same shapes.
tokens/s = new tokens (stop tokens included) / wall time of the whole call, prefill included, best of
--repeats runs of each, alternated, after a warm-up. transformers runs as it is normally used: left-padded
batches with an attention mask. `agree` is the share of rows whose greedy tokens are identical to
transformers' (left padding may move its logits by rounding, so a near-tie could flip a row);
`compiled_agree` the share identical between our eager and compiled steps. On a machine shared with other
work, pass --threads 1: parallel regions that wait for a busy core otherwise dominate both timings.

A third workload, long_row (--long-row, 0 to skip): the decode loop's time per step with one --long-row-token
context among --long-batch - 1 short ones (--short-context) against an all-short batch, with each row reading
its own length (decode_step's runs of slots; with --compile the compiled block-mask step) and with every row
reading the longest row's length (run_cost=inf, the step before runs existed), side by side.
"""

import argparse
import math
import os
import platform
import tempfile
import time

import torch
import transformers

import common
import evaluate
from model import Qwen2
from scripts import tiny


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


def compare(name, batch, runners: dict, repeats) -> dict:
    """Run each of `runners` {who: fn} `repeats` times, alternating (so a change in machine load hits all
    alike); keep each one's best wall time. `runners` has "ours" and "transformers", maybe "ours_compiled"."""
    best, outputs = {who: math.inf for who in runners}, {}
    for _ in range(repeats):
        for who, fn in runners.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            outputs[who] = fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            best[who] = min(best[who], time.perf_counter() - start)
    ours = outputs["ours"]
    tokens = sum(map(len, ours))  # useful tokens (stop tokens included)
    agree = lambda other: sum(a == b for a, b in zip(ours, outputs[other])) / len(ours)
    r = {"workload": name, "batch": batch, "prompts": len(ours), "new_tokens": tokens,
         **{f"{who}_tokens_per_s": tokens / best[who] for who in runners},
         **{f"{who}_s": best[who] for who in runners},
         "ratio": best["transformers"] / best["ours"], "greedy_agree": agree("transformers")}
    line = (f"{name:<7} batch {batch:>3} ({len(ours):>3} prompts, {tokens:>6} tokens): ours "
            f"{tokens / best['ours']:8.1f} tok/s | transformers {tokens / best['transformers']:8.1f} tok/s | "
            f"ratio {r['ratio']:5.2f}x | agree {r['greedy_agree']:.2f}")
    if "ours_compiled" in runners:
        r["compiled_ratio"] = best["transformers"] / best["ours_compiled"]
        r["compiled_agree"] = agree("ours_compiled")
        line += f" | compiled {tokens / best['ours_compiled']:8.1f} tok/s ({r['compiled_ratio']:5.2f}x, agree " \
                f"{r['compiled_agree']:.2f})"
    print(line, flush=True)
    return r


def decode_loop_ms(start, steps: int, decode, repeats: int, cuda_graphs: bool = False) -> float:
    """Wall time per step of `steps` greedy decode steps from `start` = (first tokens, their positions: each
    row's position after its prompt), best of `repeats`; each run restarts there, so each overwrites the same
    cache entries. `decode(tokens, positions)` is one decode step (cuda_graphs: a compiled one on CUDA)."""
    tokens0, start_positions = start
    cuda = start_positions.is_cuda
    best = math.inf
    for _ in range(repeats):
        positions, tokens = start_positions.clone(), tokens0.clone()
        if cuda:
            torch.cuda.synchronize()
        began = time.perf_counter()
        for _ in range(steps):
            if cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            tokens = decode(tokens, positions).argmax(dim=-1)
            positions = positions + 1
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - began)
    return 1000 * best / steps


def fill_cache(model, contexts: list[int], cache_len: int, vocab: int, seed: int):
    """A cache of len(contexts) slots x cache_len positions, slot i prefilled with a random prompt of
    contexts[i] tokens; returns the first decode step's (tokens, positions)."""
    model.setup_cache(len(contexts), cache_len)
    g = torch.Generator().manual_seed(seed)
    device = model.embed.weight.device
    for slot, n in enumerate(contexts):
        model.prefill(torch.randint(10, vocab, (n,), generator=g).tolist(), [slot])
    return torch.randint(10, vocab, (len(contexts),), generator=g).to(device), torch.tensor(contexts, device=device)


def cached_row(model, slot: int, length: int) -> list:
    """A copy of one slot's first `length` keys and values in every layer."""
    return [(b.attn.cache.k[slot:slot + 1, :, :length].clone(), b.attn.cache.v[slot:slot + 1, :, :length].clone())
            for b in model.layers]


def restore_row(model, slot: int, row: list) -> None:
    """Write a cached_row back into `slot` (through KVCache.update, the cache's one write path)."""
    device = model.embed.weight.device
    for block, (k, v) in zip(model.layers, row):
        block.attn.cache.update(torch.tensor([slot], device=device), torch.arange(k.shape[2], device=device)[None],
                                k, v)


def long_row(args, model) -> dict:
    """The decode loop's cost with one long row among short ones against an all-short batch (issue 21): time
    per greedy step (decode step + argmax) with rows attending in runs of neighbouring slots (decode_step:
    the long row, in the middle slot, becomes a run of its own), with every row over the longest row's length
    (run_cost=inf: one run, the step before runs existed), and with --compile the compiled block-mask step.
    The two batches differ in the middle slot only, swapped in place between runs, so that every (batch,
    step) pair is timed alternately: a change in the machine's load hits all alike."""
    low, high = map(int, args.short_context.split(","))
    short = torch.randint(low, high + 1, (args.long_batch,), generator=torch.Generator().manual_seed(7)).tolist()
    middle, g = args.long_batch // 2, torch.Generator().manual_seed(8)
    # One cache shape for both batches (as in an evaluation: the cache is sized for the longest sample), so
    # the compiled step is one graph.
    tokens, positions = fill_cache(model, short, args.long_row + args.long_steps + 1, args.vocab, seed=7)
    rows = {"all_short": cached_row(model, middle, short[middle])}
    model.prefill(torch.randint(10, args.vocab, (args.long_row,), generator=g).tolist(), [middle])
    rows["one_long"] = cached_row(model, middle, args.long_row)
    starts = {"all_short": (tokens, positions), "one_long": (tokens, positions.clone())}
    starts["one_long"][1][middle] = args.long_row
    runners = {"runs": model.decode_step, "one_run": lambda t, p: model.decode_step(t, p, run_cost=math.inf)}
    if args.compile:
        runners["compiled"] = model.compiled_decode_step()
    cuda_graphs = args.compile and model.embed.weight.is_cuda
    ms = {}
    for repeat in range(args.repeats + args.compile):  # with --compile, a first round compiles the graph, untimed
        for name in starts:
            restore_row(model, middle, rows[name])
            for who, decode in runners.items():
                step_ms = decode_loop_ms(starts[name], args.long_steps, decode, 1, cuda_graphs and who == "compiled")
                if repeat >= args.compile:
                    ms[f"{name}_{who}_ms"] = min(ms.get(f"{name}_{who}_ms", math.inf), step_ms)
    model.free_cache()
    r = {"workload": "long_row", "batch": args.long_batch, "long_context": args.long_row, "short_context": [low, high],
         "steps": args.long_steps, **ms,
         **{f"ratio_{who}": ms[f"one_long_{who}_ms"] / ms[f"all_short_{who}_ms"] for who in runners}}
    print(f"long row: 1 x {args.long_row} tokens among {args.long_batch - 1} of {low}-{high}, per decode step: "
          + " | ".join(f"{who} {ms[f'all_short_{who}_ms']:.1f} ms all short, {ms[f'one_long_{who}_ms']:.1f} ms "
                       f"with the long row ({r[f'ratio_{who}']:.2f}x)" for who in runners), flush=True)
    return r


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="bench_decode.py", description=__doc__.splitlines()[0],
                                formatter_class=common.HelpFormatter)
    add = p.add_argument
    add("--batches", default="1,16,64", help="batch sizes (KV cache slots), comma-separated; '' for none")
    add("--max-new-tokens", type=common.COUNT, default=128, help="new tokens per row at most")
    add("--prompt-len", default="16,64", help="min,max prompt length (uniform)")
    add("--hidden", type=common.COUNT, default=256, help="model width")
    add("--intermediate", type=common.COUNT, default=None, help="MLP width (default: 4 x hidden)")
    add("--layers", type=common.COUNT, default=4, help="decoder layers")
    add("--heads", type=common.COUNT, default=4, help="query heads")
    add("--kv-heads", type=common.COUNT, default=2, help="key/value heads")
    add("--vocab", type=common.COUNT, default=32000, help="vocabulary size")
    add("--repeats", type=common.COUNT, default=3, help="best of this many timed runs each")
    add("--queue", type=common.COUNT, default=4, help="ragged workload: prompts per cache slot")
    add("--device", default="cpu", help="cpu, cuda or cuda:N")
    add("--dtype", choices=["fp32", "bf16"], default="fp32", help="weights and activations")
    add("--compile", action=argparse.BooleanOptionalAction, default=None,
        help="also time the compiled decode step (default: on with CUDA, off on CPU)")
    add("--compile-ragged", action="store_true", help="the compiled step on the ragged workload too")
    add("--long-row", type=int, default=12000, help="long-row workload: the long row's context, 0 = skip it")
    add("--short-context", default="256,1024", help="long-row workload: min,max context of the short rows")
    add("--long-batch", type=common.COUNT, default=64, help="long-row workload: rows (one of them long)")
    add("--long-steps", type=common.COUNT, default=16, help="long-row workload: decode steps timed")
    add("--threads", type=common.COUNT, default=None, help="torch CPU threads (default: torch's choice)")
    add("--out", default="bench_results/decode.json", help="JSON report")
    args = p.parse_args(argv)
    args.compile = args.device.startswith("cuda") if args.compile is None else args.compile
    return args


def load_models(args, dtype):
    """A random checkpoint of the requested shape (scripts.tiny: N(0, 0.1) weights, so greedy runs vary and
    end at spread-out stop ids), loaded by ours and by transformers."""
    shape = {"vocab_size": args.vocab, "hidden_size": args.hidden, "num_hidden_layers": args.layers,
             "intermediate_size": args.intermediate or 4 * args.hidden, "num_attention_heads": args.heads,
             "num_key_value_heads": args.kv_heads,
             "max_position_embeddings": max(4096, args.long_row + args.long_steps + 1)}
    with tempfile.TemporaryDirectory() as tmp:
        tiny.make_checkpoint(tmp, dtype=dtype, **shape)
        hf = transformers.Qwen2ForCausalLM.from_pretrained(tmp, dtype=dtype).to(args.device).eval()
        ours = Qwen2.from_pretrained(tmp, dtype=dtype, device=args.device)
    return hf, ours


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    low, high = map(int, args.prompt_len.split(","))
    hf, ours = load_models(args, dtype)
    results = []
    with torch.inference_mode():
        warm = ragged_prompts(2, args.vocab, low, high, seed=12345)  # first-call costs out of the timings
        evaluate.generate(ours, warm, 4)
        hf_generate(hf, warm, 4, args.device)
        for batch in [int(b) for b in args.batches.split(",") if b]:
            prompts = ragged_prompts(batch, args.vocab, low, high, seed=batch)
            fixed = {"ours": lambda: evaluate.generate(ours, prompts, args.max_new_tokens, batch_size=batch),
                     "transformers": lambda: hf_generate(hf, prompts, args.max_new_tokens, args.device)}
            if args.compile:
                fixed["ours_compiled"] = lambda: evaluate.generate(ours, prompts, args.max_new_tokens,
                                                                   batch_size=batch, compile=True)
                fixed["ours_compiled"]()  # compiles this batch's graphs, untimed
            results.append(compare("fixed", batch, fixed, args.repeats))
            # Ragged: stop ids picked from the runs themselves; transformers takes consecutive batches.
            prompts_r = ragged_prompts(args.queue * batch, args.vocab, low, high, seed=batch + 1)
            stops = pick_stop_ids(evaluate.generate(ours, prompts_r, args.max_new_tokens, batch_size=batch), batch)
            ragged = {"ours": lambda: evaluate.generate(ours, prompts_r, args.max_new_tokens, stop_ids=stops,
                                                        batch_size=batch),
                      "transformers": lambda: hf_generate(hf, prompts_r, args.max_new_tokens, args.device, stops,
                                                          batch)}
            if args.compile and args.compile_ragged:
                ragged["ours_compiled"] = lambda: evaluate.generate(ours, prompts_r, args.max_new_tokens,
                                                                    stop_ids=stops, batch_size=batch, compile=True)
                ragged["ours_compiled"]()
            results.append(compare("ragged", batch, ragged, args.repeats))
        if args.long_row:
            results.append(long_row(args, ours))

    cuda = torch.cuda.is_available() and args.device.startswith("cuda")
    report = {"device": torch.cuda.get_device_name() if cuda else
              f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
              "dtype": args.dtype, "torch": torch.__version__, "transformers": transformers.__version__,
              "date": time.strftime("%Y-%m-%d"), "compile": args.compile,
              "model": {"hidden": args.hidden, "intermediate": args.intermediate or 4 * args.hidden,
                        "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads, "vocab": args.vocab},
              "max_new_tokens": args.max_new_tokens, "prompt_len": [low, high], "queue": args.queue,
              "results": results}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    common.write_json(args.out, report)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    common.cli(main, "bench_decode.py")
