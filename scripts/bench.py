"""One command for the performance figures: `python -m scripts.bench --device cpu --quick` (minutes,
CI-sized) or `python -m scripts.bench --device cuda` (a Qwen2.5-1.5B-shaped model with random weights; no
download).

Sections (--sections, default all):
  train    one training step (packed documents, chunked log-probs, backward; bf16 autocast on CUDA):
           tokens/s, MFU, peak memory at several tokens per micro-batch, for each of --variants (activation
           checkpointing and torch.compile, on or off); unless --no-transformers, also transformers'
           forward+backward on the same model and batch, side by side.
  logprob  peak memory of losses.token_logps forward+backward against tokens and vocabulary size: it must grow
           with tokens and not with the vocabulary (beyond one chunk).
  decode   evaluate.generate tokens/s against transformers' generate at batch 1, 16 and 64, and the decode
           step's time with one 12,000-token row among 63 short ones (bench_decode.py).
  verify   verify.grade pairs/s against Math-Verify when it is installed (bench_verify.py).
Prints a table per section and writes everything to --out as JSON.
"""

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

import common
import losses
from model import Qwen2, Qwen2Config
from common import peak_bf16_flops


QWEN25_15B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                  rope_theta=1000000.0, tie_word_embeddings=True)
CPU_QUICK = dict(vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                 rope_theta=10000.0, tie_word_embeddings=True)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def packed_batch(tokens, vocab_size, doc_len, device, seed=0):
    """A packed row of `tokens` random tokens in documents of doc_len, every token a loss target."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (1, tokens), generator=g)
    position_ids = (torch.arange(tokens) % doc_len)[None]
    document_ids = (torch.arange(tokens) // doc_len)[None]
    targets = torch.roll(input_ids, -1, dims=1)
    targets[position_ids == doc_len - 1] = losses.IGNORE_INDEX  # nothing predicts across a document edge
    targets[0, -1] = losses.IGNORE_INDEX
    return {k: v.to(device) for k, v in dict(input_ids=input_ids, position_ids=position_ids,
                                             document_ids=document_ids, targets=targets).items()}


def our_step(model, batch, autocast_dtype):
    """Forward to hidden states, chunked log-probs, token-mean NLL, backward: what train.py does."""
    with torch.autocast(batch["input_ids"].device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        hidden = model(batch["input_ids"], batch["position_ids"], batch["document_ids"], return_hidden=True)
        logps = losses.token_logps(hidden, model.lm_head_weight, batch["targets"])  # compiled modules forward it
    loss = -logps.sum() / (batch["targets"] != losses.IGNORE_INDEX).sum()
    loss.backward()


def hf_step(model, batch, autocast_dtype):
    """transformers' forward + backward on the same tokens (its causal path: one document per row)."""
    with torch.autocast(batch["input_ids"].device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        out = model(input_ids=batch["input_ids"], labels=batch["input_ids"])
    out.loss.backward()


def time_steps(step, model, batch, autocast_dtype, device, warmup, iters):
    """Median seconds per step after warm-up, and peak memory (CUDA) during the timed steps."""
    for _ in range(warmup):
        step(model, batch, autocast_dtype)
        model.zero_grad(set_to_none=True)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step(model, batch, autocast_dtype)
        synchronize(device)
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return sorted(times)[len(times) // 2], peak


def bench_train(args, device):
    shape = CPU_QUICK if args.quick or device.type == "cpu" else QWEN25_15B
    token_counts = args.tokens or ([512, 2048] if device.type == "cpu" else [2048, 8192, 16384, 32768])
    doc_len = args.doc_len
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    config = Qwen2Config(**shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2(config).init_weights().train()
    peak = peak_bf16_flops(device)
    rows = []
    variants = [VARIANTS[name] for name in args.variants.split(",")]
    blocks = list(model.layers)
    for tokens in token_counts:
        batch = packed_batch(tokens, config.vocab_size, min(doc_len, tokens), device)
        for checkpointing, compiled in variants:
            model.gradient_checkpointing = checkpointing
            # Compiled as train.py --compile does it: each block (identical blocks share one compiled graph).
            model.layers = torch.nn.ModuleList([torch.compile(b) for b in blocks] if compiled else blocks)
            try:
                seconds, mem = time_steps(our_step, model, batch, autocast_dtype, device, args.warmup, args.iters)
            except torch.OutOfMemoryError:
                rows.append(dict(impl="ours", tokens=tokens, checkpointing=checkpointing, compile=compiled,
                                 error="out of memory"))
                torch.cuda.empty_cache()
                continue
            tps = tokens / seconds
            mfu = model.flops_per_token(min(doc_len, tokens)) * tps / peak if peak else None
            rows.append(dict(impl="ours", tokens=tokens, checkpointing=checkpointing, compile=compiled,
                             step_s=seconds, tokens_per_s=tps, mfu=mfu, peak_mem_gib=mem))
            print(f"  ours tokens={tokens} ckpt={checkpointing} compile={compiled}: {seconds * 1e3:.1f} ms, "
                  f"{tps:,.0f} tok/s" + (f", MFU {mfu:.1%}" if mfu else "") + (f", {mem:.1f} GiB" if mem else ""),
                  flush=True)
    model.gradient_checkpointing, model.layers = False, torch.nn.ModuleList(blocks)
    if args.transformers:
        rows += bench_train_vs_transformers(args, device, config, model, token_counts, autocast_dtype)
    return rows


def bench_train_vs_transformers(args, device, config, model, token_counts, autocast_dtype):
    """Side by side on one document per row (transformers' plain causal path), same weights, same batch."""
    try:
        import transformers
    except ImportError:
        print("  transformers not installed: no side-by-side training comparison")
        return []
    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        hf = transformers.Qwen2ForCausalLM.from_pretrained(d, attn_implementation="sdpa").to(device).train()
    rows = []
    for tokens in token_counts[:2]:
        batch = packed_batch(tokens, config.vocab_size, tokens, device)  # one document: both run causal attention
        batch["document_ids"] = None
        ours, _ = time_steps(our_step, model, batch, autocast_dtype, device, args.warmup, args.iters)
        theirs, _ = time_steps(hf_step, hf, batch, autocast_dtype, device, args.warmup, args.iters)
        rows.append(dict(impl="ours/transformers", tokens=tokens, ours_step_s=ours, transformers_step_s=theirs,
                         speedup=theirs / ours))
        print(f"  vs transformers, tokens={tokens}: ours {ours * 1e3:.1f} ms, transformers {theirs * 1e3:.1f} ms, "
              f"speed-up x{theirs / ours:.2f}", flush=True)
    return rows


LOGPROB_PROBE = r"""
import resource, sys, torch, losses
tokens, vocab, hidden, device = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
g = torch.Generator().manual_seed(0)
dtype = torch.bfloat16 if device == "cuda" else torch.float32  # what a training step feeds it there
h = torch.randn(tokens, hidden, generator=g).to(device, dtype).requires_grad_()
w = (torch.randn(vocab, hidden, generator=g) * 0.02).to(device, dtype).requires_grad_()
t = torch.randint(0, vocab, (tokens,), generator=g).to(device)
if device == "cuda":
    torch.cuda.synchronize(); base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
else:  # resident now (not the lifetime peak, which setup may already have raised)
    base = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
losses.token_logps(h, w, t).sum().backward()
if device == "cuda":
    torch.cuda.synchronize(); peak = torch.cuda.max_memory_allocated() - base
else:  # VmHWM, not ru_maxrss: Linux carries the parent's ru_maxrss across fork and exec
    peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) * 1024 - base
print(peak)
"""


def bench_logprob(args, device):
    """Peak extra memory of token_logps forward+backward, each point in a fresh process (so peaks do not
    mix), against the full logits + gradient it replaces (2 x tokens x vocab x 4 bytes)."""
    grid = ([(2048, 32000), (4096, 32000), (8192, 32000), (8192, 151936)] if args.quick
            else [(t, v) for t in (4096, 8192, 16384) for v in (32000, 151936)])
    hidden = 64 if device.type == "cpu" else 1536
    rows = []
    for tokens, vocab in grid:
        out = subprocess.run([sys.executable, "-c", LOGPROB_PROBE, str(tokens), str(vocab), str(hidden),
                              device.type], capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             check=True)
        peak = int(out.stdout.strip().splitlines()[-1])
        full = 2 * tokens * vocab * 4
        rows.append(dict(tokens=tokens, vocab=vocab, hidden=hidden, peak_mib=peak / 2**20,
                         full_logits_and_grad_mib=full / 2**20, fraction=peak / full))
        print(f"  token_logps T={tokens} V={vocab}: peak {peak / 2**20:,.0f} MiB vs full logits+grad "
              f"{full / 2**20:,.0f} MiB ({peak / full:.1%})", flush=True)
    return rows


def bench_decode_section(args, device):
    from scripts import bench_decode
    argv = ["--device", device.type, "--out", os.path.join(os.path.dirname(args.out) or ".", "decode.json")]
    if args.quick:
        argv += ["--max-new-tokens", "64", "--repeats", "2", "--long-steps", "8"]
    return bench_decode.main(argv)


def bench_verify_section(args, device):
    from scripts import bench_verify
    return bench_verify.run()


# --variants: (activation checkpointing, torch.compile)
VARIANTS = {"plain": (False, False), "ckpt": (True, False), "compile": (False, True), "ckpt+compile": (True, True)}
SECTIONS = {"train": bench_train, "logprob": bench_logprob, "decode": bench_decode_section,
            "verify": bench_verify_section}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", help="train section: comma-separated of " + ",".join(VARIANTS)
                        + " (default: all on CUDA, plain,ckpt on CPU)")
    parser.add_argument("--transformers", action=argparse.BooleanOptionalAction, default=True,
                        help="train section: also time transformers on the same model and batch")
    parser.add_argument("--quick", action="store_true", help="small shapes; a few minutes on a CPU")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated: " + ",".join(SECTIONS))
    parser.add_argument("--tokens", type=int, nargs="*", help="tokens per micro-batch for the train section")
    parser.add_argument("--doc-len", type=int, default=2048, help="document length inside a packed row")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", default="bench_results/bench.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"--sections: unknown {sorted(unknown)}; choose from {sorted(SECTIONS)}")
    args.variants = args.variants or ("plain,ckpt,compile,ckpt+compile" if device.type == "cuda" else "plain,ckpt")
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"--variants: unknown {sorted(unknown)}; choose from {sorted(VARIANTS)}")

    report = dict(date=datetime.date.today().isoformat(), device=torch.cuda.get_device_name(device)
                  if device.type == "cuda" else f"{platform.processor() or platform.machine()} CPU, "
                  f"{torch.get_num_threads()} threads", torch=torch.__version__, quick=args.quick)
    for name in args.sections.split(","):
        print(f"[{name}]", flush=True)
        report[name] = SECTIONS[name](args, device)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    common.write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    common.cli(main, "bench.py")
