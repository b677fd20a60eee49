"""CUDA-only checks (issue 17): collected everywhere, skipped with a reason without a GPU. `make gpu-check`
runs them on a GPU machine and records the outcome in its report (scripts/gpu_check.py).

  bf16 token_logps on CUDA (cuBLAS, fp32 output) = the CPU emulation of the same arithmetic
  bf16 autocast training step vs the fp32 step, within the tolerances stated below
  FlexAttention backward = dense-mask backward on packed documents
  no host synchronisation in a training micro-step (torch.cuda.set_sync_debug_mode("error"))
  compiled decode (evaluate.generate(..., compile=True)) = eager decode, greedy, ragged prompts
  one-GPU NCCL DDP run: torchrun --nproc_per_node 1 train.py on a tiny checkpoint
and, on every machine, scripts/gpu_check.py's own behaviour (no-GPU exit, one failing part, junit reading).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common
import evaluate
import losses
from model import Qwen2
from scripts import tiny

REPO = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU; run `make gpu-check` on a GPU machine")

# bf16 autocast step vs fp32 step on the model below: relative loss difference and relative L2 error of all
# gradients together. The CPU emulation of the same step (bf16 autocast on CPU) measures 6e-5 and 1.8e-2;
# the bounds leave room for CUDA's different bf16 kernels (attention, GEMM accumulation order).
BF16_LOSS_RTOL = 2e-3
BF16_GRAD_REL_L2 = 6e-2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny.make_checkpoint(tmp_path_factory.mktemp("gpu_ckpt"), seed=0, hidden_size=128,
                                intermediate_size=256, num_hidden_layers=4)


def packed_batch(lengths, vocab_size, device, seed=0):
    """One packed row of documents of `lengths`: every token predicts the next within its document."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (1, sum(lengths)), generator=g)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    document_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    targets = torch.roll(input_ids, -1, dims=1)
    targets[torch.roll(position_ids, -1, dims=1) == 0] = losses.IGNORE_INDEX  # no target across documents
    batch = {k: v.to(device) for k, v in dict(input_ids=input_ids, position_ids=position_ids,
                                              document_ids=document_ids, targets=targets).items()}
    return {**batch, "num_docs": len(lengths)}


def sft_step(model, batch, autocast: bool):
    """One micro-step as train.py runs it: hidden states, chunked log-probs, per-sequence sums, token-mean NLL,
    backward. Returns the loss (a tensor: no host read here)."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        hidden = model(batch["input_ids"], batch["position_ids"], batch["document_ids"], return_hidden=True)
        token = losses.token_logps(hidden, model.lm_head_weight, batch["targets"])
    sums, lengths = losses.sequence_logps(token, batch["targets"], batch["document_ids"], batch["num_docs"])
    loss, _ = losses.sft_loss(sums, lengths)
    loss.backward()
    return loss.detach()


def grads_after(model, batch, autocast: bool):
    model.zero_grad(set_to_none=True)
    loss = sft_step(model, batch, autocast)
    return loss.item(), torch.cat([p.grad.float().flatten() for p in model.parameters()])


@needs_cuda
def test_cuda_bf16_token_logps_equals_cpu_emulation():
    """The CUDA bf16 path (torch.mm / addmm with out_dtype=float32) computes what the CPU path emulates:
    log-probs to fp32 accumulation order, gradients to that plus dz's bf16 rounding."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(300, 64, generator=g).bfloat16()
    weight = (torch.randn(5000, 64, generator=g) * 0.3).bfloat16()
    targets = torch.randint(0, 5000, (300,), generator=g)
    upstream = torch.randn(300, generator=g)
    results = []
    for device in ("cpu", "cuda"):
        h, w = (t.to(device, copy=True).requires_grad_() for t in (hidden, weight))  # fresh leaves
        logps = losses.token_logps(h, w, targets.to(device), chunk_size=128)
        (logps * upstream.to(device)).sum().backward()
        results.append([t.detach().float().cpu() for t in (logps, h.grad, w.grad)])
    (cpu_logps, cpu_gh, cpu_gw), (cuda_logps, cuda_gh, cuda_gw) = results
    assert cuda_logps.dtype == torch.float32
    torch.testing.assert_close(cuda_logps, cpu_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cuda_gh, cpu_gh, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(cuda_gw, cpu_gw, rtol=2e-2, atol=2e-3)


@needs_cuda
def test_bf16_training_step_close_to_fp32_step(checkpoint, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # the fp32 reference: no TF32
    model = Qwen2.from_pretrained(checkpoint, device="cuda").train()
    batch = packed_batch([100, 60, 96], model.config.vocab_size, "cuda")
    loss32, grads32 = grads_after(model, batch, autocast=False)
    loss16, grads16 = grads_after(model, batch, autocast=True)
    rel_loss = abs(loss16 - loss32) / abs(loss32)
    rel_grad = ((grads16 - grads32).norm() / grads32.norm()).item()
    print(f"bf16 vs fp32 step: loss rel {rel_loss:.2e}, gradient rel L2 {rel_grad:.2e}")
    assert rel_loss <= BF16_LOSS_RTOL and rel_grad <= BF16_GRAD_REL_L2


@needs_cuda
def test_flex_attention_backward_equals_dense_backward(checkpoint, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model = Qwen2.from_pretrained(checkpoint, device="cuda").train()
    batch = packed_batch([130, 40, 200, 86], model.config.vocab_size, "cuda", seed=1)
    results = {}
    for impl in ("dense", "flex"):
        model.packed_attention = impl
        results[impl] = grads_after(model, batch, autocast=False)
    (dense_loss, dense), (flex_loss, flex) = results["dense"], results["flex"]
    rel = ((flex - dense).norm() / dense.norm()).item()
    print(f"flex vs dense: loss {flex_loss} vs {dense_loss}, gradient rel L2 {rel:.2e}")
    # fp32 both ways: only summation order differs (a wrong mask would differ by O(1), not 1e-3).
    assert abs(flex_loss - dense_loss) <= 1e-4 * abs(dense_loss) and rel <= 1e-3


@needs_cuda
def test_no_host_sync_in_a_training_micro_step(checkpoint):
    """The step train.py runs per micro-batch (packed FlexAttention forward, chunked log-probs, sums, loss,
    backward) issues no synchronising CUDA call once warm: the GPU never waits for Python between
    micro-steps. set_sync_debug_mode("error") raises at the first synchronising call, naming it."""
    model = Qwen2.from_pretrained(checkpoint, device="cuda").train()
    batch = packed_batch([100, 60, 96], model.config.vocab_size, "cuda")
    for autocast in (False, True):
        sft_step(model, batch, autocast)  # warm-up: compilation and allocator growth may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for autocast in (False, True):
            sft_step(model, batch, autocast)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
def test_compiled_decode_equals_eager_decode(checkpoint):
    model = Qwen2.from_pretrained(checkpoint, device="cuda")
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(9, model.config.vocab_size, (n,), generator=g).tolist() for n in (3, 17, 8, 30, 1)]
    eager = evaluate.generate(model, prompts, 24, batch_size=3)
    compiled = evaluate.generate(model, prompts, 24, batch_size=3, compile=True)
    assert compiled == eager and all(len(run) == 24 for run in eager)


@needs_cuda
def test_one_gpu_nccl_ddp_run(checkpoint, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + {i + 3}?"},
                          {"role": "assistant", "content": f"{i} + {i + 3} = {2 * i + 3}. \\boxed{{{2 * i + 3}}}"}]}
            for i in range(8)]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               str(REPO / "train.py"), "--stage", "sft", "--model", checkpoint, "--data", str(data),
               "--out", str(out), "--batch-size", "4", "--max-steps", "2", "--dtype", "bf16"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "NCCL_DEBUG": "INFO"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "NCCL" in result.stdout + result.stderr  # the process group really was NCCL
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2 and all(r["loss"] == r["loss"] for r in records)  # finite, not NaN
    trained = Qwen2.from_pretrained(str(out))
    assert all(torch.isfinite(p).all() for p in trained.parameters())


# ----------------------------------------------------------------------------------------------------------
# scripts/gpu_check.py on any machine (these run on CPU too)


def test_gpu_check_without_cuda_says_so_and_exits_0(tmp_path):
    out = tmp_path / "gpu_check"
    result = subprocess.run([sys.executable, "-m", "scripts.gpu_check", "--out", str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr
    assert "no CUDA device" in result.stdout and "make gpu-check" in result.stdout
    assert not out.exists()  # nothing measured, nothing written


def test_gpu_check_records_a_failing_part_and_still_runs_the_rest(tmp_path, monkeypatch):
    from scripts import gpu_check

    def broken(out):
        raise RuntimeError("CUDA error: an illegal memory access")

    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check.torch.cuda, "get_device_name", lambda *a: "Test GPU")
    monkeypatch.setattr(gpu_check.torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(gpu_check, "PARTS", {"first": broken, "second": lambda out: {"ok": True, "figure": 42}})
    assert gpu_check.main(["--out", str(tmp_path), "--parts", "first,second"]) == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["device"] == "Test GPU" and report["parts"]["second"] == {"ok": True, "figure": 42}
    assert report["parts"]["first"] == {"ok": False, "error": "RuntimeError: CUDA error: an illegal memory access"}
    with pytest.raises(common.InputError, match="--parts: unknown"):
        gpu_check.main(["--out", str(tmp_path), "--parts", "tests,nonsense"])


def test_gpu_check_tests_part_reads_each_outcome_from_junit(tmp_path, monkeypatch):
    """The tests part runs this file in a subprocess and reads every test's outcome; without a GPU they are
    skipped with the reason, so the part is not ok."""
    from scripts import gpu_check

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    result = gpu_check.part_tests(str(tmp_path))
    gpu_only = {name: o for name, o in result["tests"].items() if not name.startswith("test_gpu_check")}
    assert len(gpu_only) == 6 and all(o["result"] == "skipped" and "needs a CUDA GPU" in o["message"]
                                      for o in gpu_only.values()), result
    assert result["ok"] is False
