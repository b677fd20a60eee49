"""Host memory of restoring AdamW state on --resume, per rank: `python -m scripts.bench_resume [--hidden 768]`.

  before  the earlier format: trainer_state.pt, one pickled dict holding the whole optimizer state, torch.load'ed
          by every rank, then handed to set_optimizer_state_dict (what train.py did until 2026-12-05);
  after   optimizer/adamw.safetensors, memory-mapped, copied one tensor at a time (train.load_optimizer_state).

Each is measured in a fresh process (one process = one DDP rank: every rank does the same) holding the model and
an empty AdamW: a thread samples /proc/self/status every millisecond; reported are the peaks above that start of
private memory (RssAnon: what the rank itself holds) and of file pages mapped (RssFile: the page cache, one copy a
node, shared by its ranks), beside the size of the state itself. On CPU the restored state lives in host memory
(its size is the floor of both); on a GPU it lives on the device, and the host needs only what is above it.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from types import SimpleNamespace

import torch

import train
from model import Qwen2, Qwen2Config


def make_model(hidden: int) -> Qwen2:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=32000, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=8,
                         num_attention_heads=hidden // 64, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_theta=10000.0, tie_word_embeddings=True)
    return Qwen2(config).init_weights()


def make_run(hidden: int, resume: str):
    model = make_model(hidden)
    module = train.losses.SequenceLogps(model)
    args = SimpleNamespace(weight_decay=1e-4, lr=1e-3, resume=resume)
    return SimpleNamespace(model=model, logps_model=module, args=args, d=SimpleNamespace(is_main=True),
                           optimizer=train.build_optimizer(module, args, SimpleNamespace(device=torch.device("cpu"))))


def write_both_formats(hidden: int, directory: str) -> tuple[int, int]:
    """One AdamW step of random gradients, saved in both formats; returns the state's bytes and the parameters."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    run = make_run(hidden, directory)
    for p in run.logps_model.parameters():
        p.grad = torch.randn_like(p)
    run.optimizer.step()
    torch.save({"optimizer": get_optimizer_state_dict(run.logps_model, run.optimizer)},
               os.path.join(directory, train.LEGACY_TRAINER_STATE))
    tensors = train.optimizer_tensors(run)
    os.makedirs(os.path.join(directory, os.path.dirname(train.OPTIMIZER_STATE)))
    save_file(tensors, os.path.join(directory, train.OPTIMIZER_STATE))
    return sum(t.nbytes for t in tensors.values()), run.model.num_params()


def memory() -> dict[str, int]:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile")}


def measure(hidden: int, directory: str, fmt: str) -> dict:
    """In this (fresh) process: the peaks of RssAnon and RssFile above the start while the state is restored."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    run = make_run(hidden, directory)
    start, peak, done = memory(), memory(), threading.Event()

    def sample():
        while not done.is_set():
            now = memory()
            for k in peak:
                peak[k] = max(peak[k], now[k])
            time.sleep(0.001)
    sampler = threading.Thread(target=sample)
    sampler.start()
    began = time.perf_counter()
    if fmt == "before":
        saved = torch.load(os.path.join(directory, train.LEGACY_TRAINER_STATE), map_location="cpu", weights_only=True)
        set_optimizer_state_dict(run.logps_model, run.optimizer, optim_state_dict=saved["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        del saved
    else:
        train.load_optimizer_state(run, {})
    seconds = time.perf_counter() - began
    done.set()
    sampler.join()
    return {"seconds": seconds, **{f"peak_{k}": peak[k] - start[k] for k in peak},
            "largest_tensor": max(p.numel() * 4 for p in run.model.parameters())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=768, help="model width (8 layers, 32,000 vocabulary)")
    parser.add_argument("--measure", nargs=2, metavar=("DIR", "FORMAT"), help=argparse.SUPPRESS)  # the child
    args = parser.parse_args()
    if args.measure:
        return print(json.dumps(measure(args.hidden, *args.measure)))
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as directory:
        state_bytes, params = write_both_formats(args.hidden, directory)
        results = {fmt: json.loads(subprocess.run(
            [sys.executable, "-m", "scripts.bench_resume", "--hidden", str(args.hidden), "--measure", directory, fmt],
            capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout)
            for fmt in ("before", "after")}
    mb = lambda n: f"{n / 1e6:,.0f} MB"  # noqa: E731
    print(f"AdamW state {mb(state_bytes)} ({params:,} parameters); {platform.machine()}, "
          f"{os.cpu_count()} CPUs, {datetime.date.today()}")
    print("format | peak private memory above start | peak file pages mapped | seconds")
    for fmt, r in results.items():
        print(f"{fmt} | {mb(r['peak_RssAnon'])} ({r['peak_RssAnon'] / state_bytes:.2f}x the state) | "
              f"{mb(r['peak_RssFile'])} | {r['seconds']:.2f}")
    print(f"largest single tensor: {mb(results['after']['largest_tensor'])}")


if __name__ == "__main__":
    main()
