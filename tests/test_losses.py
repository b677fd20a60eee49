"""Tests of losses.py: every objective against its formula (values and gradients), chunked token log-probs
against the full log-softmax, peak memory, masking edge cases, and gradient-accumulation exactness."""

import math
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import losses  # noqa: E402

IGNORE = -100


def reference_token_logps(hidden, weight, targets):
    """The straightforward path: full logits, full log-softmax, gather."""
    logps = torch.log_softmax(hidden @ weight.T, dim=-1)
    picked = logps.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(targets != IGNORE, picked, 0.0)


def random_case(dtype=torch.float64, shape=(2, 25), hidden_size=8, vocab=30, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, hidden_size, generator=gen, dtype=dtype)
    weight = torch.randn(vocab, hidden_size, generator=gen, dtype=dtype)
    targets = torch.randint(0, vocab, shape, generator=gen)
    targets.view(-1)[::4] = IGNORE  # some ignored positions
    upstream = torch.randn(shape, generator=gen, dtype=torch.float64)  # random dL/dlogp
    return hidden, weight, targets, upstream


def grads_of(fn, *tensors, upstream):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    (out.double() * upstream).sum().backward()
    return out.detach(), [leaf.grad for leaf in leaves]


# ------------------------------------------------------------------------------------------------------
# token_logps / sequence_logps
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk_size", [1, 7, 50, None])
def test_token_logps_equals_full_log_softmax(dtype, chunk_size):
    hidden, weight, targets, upstream = random_case(dtype)
    got, (gh, gw) = grads_of(lambda h, w: losses.token_logps(h, w, targets, chunk_size=chunk_size),
                             hidden, weight, upstream=upstream)
    want, (rh, rw) = grads_of(lambda h, w: reference_token_logps(h, w, targets), hidden, weight, upstream=upstream)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    assert got.shape == targets.shape and got.dtype == dtype
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(gh, rh, **tol)
    torch.testing.assert_close(gw, rw, **tol)
    assert (got[targets == IGNORE] == 0).all()


def test_token_logps_gradcheck():
    hidden, weight, targets, _ = random_case(torch.float64, shape=(13,), hidden_size=4, vocab=9)
    fn = lambda h, w: losses.token_logps(h, w, targets, chunk_size=5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden.requires_grad_(), weight.requires_grad_()))


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])
def test_token_logps_under_autocast_computes_fp32_and_returns_input_dtypes(weight_dtype):
    hidden, weight, targets, upstream = random_case(torch.float32, hidden_size=16, vocab=64)
    hidden, weight = hidden.bfloat16(), weight.to(weight_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, (gh, gw) = grads_of(lambda h, w: losses.token_logps(h, w, targets, chunk_size=7),
                                 hidden, weight, upstream=upstream)
    # Reference: the bf16-valued inputs (an fp32 weight is rounded to bf16 as autocast rounds every matmul
    # operand, issue 17), computed in fp32 without autocast.
    want, (rh, rw) = grads_of(lambda h, w: reference_token_logps(h.float(), w.bfloat16().float(), targets),
                              hidden, weight, upstream=upstream)
    assert got.dtype == torch.float32 and gh.dtype == torch.bfloat16 and gw.dtype == weight_dtype
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # fp32-accurate, not bf16-accurate
    torch.testing.assert_close(gh.float(), rh.float(), rtol=1e-2, atol=1e-2)
    # ∂L/∂W = Σ_t dz_t h_t^T with dz rounded to bf16 (a bf16 GEMM operand) and the result cast to the weight's
    # dtype: each term is off by at most 2^-8 of its size (bf16's unit roundoff), the sum by 2^-8 of
    # Σ_t |dz_t||h_t|, plus the final cast (2^-8 of the result).
    h, w = hidden.float(), weight.bfloat16().float()
    valid = (targets != IGNORE)[..., None]
    onehot = torch.nn.functional.one_hot(targets.clamp(min=0), w.shape[0]).float()
    dz = torch.where(valid, upstream.float()[..., None] * (onehot - torch.softmax(h @ w.T, -1)), 0.0)
    bound = 2**-8 * (dz.abs().flatten(0, 1).T @ h.abs().flatten(0, 1)) + 2**-8 * rw.float().abs() + 1e-6
    assert ((gw.float() - rw.float()).abs() <= bound).all()


def test_token_logps_fp32_path_is_plain_fp32_arithmetic_bit_for_bit():
    """fp32 inputs (no autocast) take the exact fp32 path: equal to the bit to the same formulas written out
    in fp32 here (one chunk: z = h W^T, lse = max + log Σ exp(z − max), dz = g·(onehot − softmax))."""
    hidden, weight, targets, upstream = random_case(torch.float32, shape=(37,), hidden_size=16, vocab=50)
    upstream = upstream.float()
    got, (gh, gw) = grads_of(lambda h, w: losses.token_logps(h, w, targets, chunk_size=64), hidden, weight,
                             upstream=upstream.double())
    valid = targets != IGNORE
    safe = torch.where(valid, targets, 0)
    logits = hidden @ weight.T
    row_max = logits.amax(dim=1, keepdim=True)
    shifted_exp = (logits - row_max).exp()
    exp_sum = shifted_exp.sum(dim=1)
    lse = exp_sum.log() + row_max.squeeze(1)
    want = torch.where(valid, logits.gather(1, safe[:, None]).squeeze(1) - lse, 0.0)
    g = torch.where(valid, upstream, 0.0)
    dz = (shifted_exp / exp_sum[:, None]) * -g[:, None]
    dz.scatter_add_(1, safe[:, None], g[:, None])
    assert torch.equal(got, want)
    assert torch.equal(gh, dz @ weight)
    assert torch.equal(gw, torch.zeros_like(weight).addmm_(dz.T, hidden))
    assert not losses.uses_bf16_matmuls(hidden, weight)


def test_bf16_matmuls_are_chosen_for_bf16_inputs_and_bf16_autocast_only():
    h32, w32 = torch.zeros(2, 4), torch.zeros(3, 4)
    h16, w16 = h32.bfloat16(), w32.bfloat16()
    assert losses.uses_bf16_matmuls(h16, w16)
    assert not losses.uses_bf16_matmuls(h32, w32)
    assert not losses.uses_bf16_matmuls(h16, w32)  # mixed, no autocast: promoted to the exact fp32 path
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert losses.uses_bf16_matmuls(h32, w32) and losses.uses_bf16_matmuls(h16, w32)
        assert not losses.uses_bf16_matmuls(h32.double(), w32.double())  # fp64 is never rounded
    with torch.autocast("cpu", dtype=torch.float16):
        assert not losses.uses_bf16_matmuls(h32, w32)


@pytest.fixture(scope="module")
def bf16_head(tmp_path_factory):
    """Final hidden states of a tiny bf16 Qwen2 (ours, loaded from a transformers checkpoint), its output
    projection, next-token targets, and transformers' own bf16 lm_head module over the same weights."""
    import transformers
    from helpers import make_hf_model
    from model import Qwen2

    transformers.logging.set_verbosity_error()
    path = str(tmp_path_factory.mktemp("bf16_head"))
    make_hf_model(seed=0, tie_word_embeddings=False).save_pretrained(path)
    hf = transformers.Qwen2ForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ours = Qwen2.from_pretrained(path, dtype=torch.bfloat16)
    x = torch.randint(0, 400, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = ours(x, return_hidden=True)
    targets = torch.roll(x, -1, dims=1)
    targets[:, -1] = IGNORE
    return hidden, ours.lm_head_weight.detach(), targets, hf.lm_head


@pytest.mark.parametrize("mode", ["bf16 tensors", "bf16 autocast over fp32 weights"])
def test_bf16_token_logps_and_grads_no_worse_than_transformers_bf16_logits(bf16_head, mode):
    """Issue 17: with bf16 operands, log-probs and both gradients against fp64 arithmetic on the same operand
    values are no further off than transformers' bf16 logits (its lm_head, then log_softmax in fp32 as its
    loss does) on the same weights; the log-probs by an order of magnitude less (fp32 logits)."""
    hidden, weight, targets, hf_lm_head = bf16_head
    upstream = torch.randn(targets.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    autocast = mode.startswith("bf16 autocast")
    if autocast:
        hidden, weight = hidden.float(), weight.float()  # fp32 master weights; autocast rounds operands

    def picked(logits):
        logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        return torch.where(targets != IGNORE, logps, 0.0)

    def transformers_logps(h, w):
        return picked(torch.func.functional_call(hf_lm_head, {"weight": w}, (h,)))

    exact = grads_of(lambda h, w: picked(h @ w.T), hidden.bfloat16().double(), weight.bfloat16().double(),
                     upstream=upstream)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ours = grads_of(lambda h, w: losses.token_logps(h, w, targets, chunk_size=40), hidden, weight,
                        upstream=upstream)
        theirs = grads_of(transformers_logps, hidden, weight, upstream=upstream)

    def errors(result):
        (logps, (grad_hidden, grad_weight)) = result
        return [(a.double() - b).abs().max().item() for a, b in
                zip((logps, grad_hidden, grad_weight), (exact[0], *exact[1]))]

    ours_err, theirs_err = errors(ours), errors(theirs)
    print(f"{mode}: max |error| vs fp64 (logps, d hidden, d weight): ours {ours_err}, transformers {theirs_err}")
    assert ours[0].dtype == torch.float32 and ours[1][1].dtype == weight.dtype
    for name, mine, reference in zip(("logps", "grad hidden", "grad weight"), ours_err, theirs_err):
        assert mine <= reference, (name, mine, reference)
    assert ours_err[0] <= theirs_err[0] / 10  # fp32 logits: accumulation error only
    assert ours_err[0] < 1e-5


def test_token_logps_all_ignored_gives_zeros_and_zero_grads():
    hidden, weight, _, upstream = random_case(torch.float32)
    targets = torch.full(hidden.shape[:-1], IGNORE)
    got, (gh, gw) = grads_of(lambda h, w: losses.token_logps(h, w, targets, chunk_size=7),
                             hidden, weight, upstream=upstream)
    assert (got == 0).all() and (gh == 0).all() and (gw == 0).all()


def test_token_logps_rejects_bad_input():
    hidden, weight, targets, _ = random_case(torch.float32, vocab=30)
    too_large, negative = targets.clone(), targets.clone()
    too_large[0, 1], negative[1, 2] = 30, -1
    for bad in (too_large, negative):
        with pytest.raises(ValueError, match="outside \\[0, 30\\)"):
            losses.token_logps(hidden, weight, bad)
    with pytest.raises(ValueError, match="must be targets"):
        losses.token_logps(hidden, weight, targets[:, :-1])
    with pytest.raises(ValueError, match="must be \\[vocab, 8\\]"):
        losses.token_logps(hidden, weight[:, :-1], targets)
    with pytest.raises(ValueError, match="chunk_size must be"):
        losses.token_logps(hidden, weight, targets, chunk_size=0)


def test_default_chunk_size_is_vocab_aware():
    assert losses.default_chunk_size(151_936) == 441  # 256 MiB of fp32 logits per chunk
    assert losses.default_chunk_size(151_936) * 151_936 * 4 <= losses.CHUNK_BYTES
    assert losses.default_chunk_size(10**12) == 1


MEMORY_PROBE = textwrap.dedent("""
    import resource, sys, torch
    sys.path.insert(0, sys.argv[1])
    import losses
    T, V, H = 8192, 151936, 64
    def rss_bytes():
        return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, H, generator=gen).requires_grad_()
    weight = (0.02 * torch.randn(V, H, generator=gen)).requires_grad_()
    targets = torch.randint(0, V, (T,), generator=gen)
    losses.token_logps(hidden[:4], weight, targets[:4]).sum().backward()  # warm up allocator and threads
    hidden.grad = weight.grad = None
    before = rss_bytes()
    logps = losses.token_logps(hidden, weight, targets)
    logps.sum().backward()
    # VmHWM: this process's peak resident memory since exec (ru_maxrss would also count the parent's, pytest's,
    # high-water mark at fork: Linux carries it across exec).
    peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) * 1024
    # Spot-check values on a few rows against the full log-softmax of just those rows.
    rows = torch.tensor([0, 1234, T - 1])
    with torch.no_grad():
        want = torch.log_softmax(hidden[rows] @ weight.T, -1).gather(1, targets[rows, None]).squeeze(1)
    err = (logps.detach()[rows] - want).abs().max().item()
    print(before, peak, err, float(weight.grad.abs().sum()))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_token_logps_peak_memory_at_8k_tokens_and_qwen2_vocab():
    """Forward + backward at T = 8192, V = 151,936 in a fresh process; the peak resident-memory growth must
    stay under a quarter of what the full path needs for fp32 logits plus their gradient (T·V·4·2 ≈ 9.3 GiB,
    computed, never allocated). ru_maxrss also counts anything before the call, so this errs on the high side."""
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(REPO)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr
    before, peak, err, grad_sum = map(float, out.stdout.split())
    full_logits_and_grad = 8192 * 151_936 * 4 * 2
    growth = peak - before
    print(f"peak growth {growth / 2**20:.0f} MiB vs full logits+grad {full_logits_and_grad / 2**30:.2f} GiB")
    assert err < 1e-4 and grad_sum > 0
    assert growth < full_logits_and_grad / 4


def test_sequence_logps_sums_per_document_and_counts_loss_tokens():
    token_lp = torch.tensor([[-1.0, -2.0, 0.0, -4.0, -8.0, 0.0, -16.0, 0.0]])
    targets = torch.tensor([[5, 6, IGNORE, 7, 8, IGNORE, 9, IGNORE]])
    # Document 2 has no loss tokens (fully masked); the last position is padding with an arbitrary id.
    document_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 3, 99]])
    sums, lengths = losses.sequence_logps(token_lp, targets, document_ids, num_sequences=4)
    torch.testing.assert_close(sums, torch.tensor([-3.0, -12.0, 0.0, -16.0]))
    assert lengths.tolist() == [2, 2, 0, 1]
    with pytest.raises(ValueError, match="document id outside \\[0, 3\\)"):
        losses.sequence_logps(token_lp, targets, document_ids, num_sequences=3)


# ------------------------------------------------------------------------------------------------------
# Objectives against their formulas
# ------------------------------------------------------------------------------------------------------


def pair_batch(seed=0, pairs=6):
    gen = torch.Generator().manual_seed(seed)
    chosen_len = torch.randint(1, 40, (pairs,), generator=gen)
    rejected_len = torch.randint(1, 40, (pairs,), generator=gen)
    chosen = -torch.rand(pairs, generator=gen, dtype=torch.float64) * chosen_len
    rejected = -torch.rand(pairs, generator=gen, dtype=torch.float64) * rejected_len
    ref_chosen = chosen - torch.randn(pairs, generator=gen, dtype=torch.float64)
    ref_rejected = rejected - torch.randn(pairs, generator=gen, dtype=torch.float64)
    return chosen, rejected, chosen_len, rejected_len, ref_chosen, ref_rejected


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_sft_loss_is_token_mean_nll_with_global_normalizer():
    chosen, _, chosen_len, *_ = pair_batch()
    (c,) = leaves(chosen)
    loss, metrics = losses.sft_loss(c, chosen_len)
    loss.backward()
    total = float(chosen_len.sum())
    assert math.isclose(loss.item(), -sum(chosen.tolist()) / total, rel_tol=1e-12)
    torch.testing.assert_close(c.grad, torch.full_like(chosen, -1.0 / total))  # every token weighs 1/N
    (c,) = leaves(chosen)
    loss, _ = losses.sft_loss(c, chosen_len, normalizer=1000)
    loss.backward()
    assert math.isclose(loss.item(), -sum(chosen.tolist()) / 1000, rel_tol=1e-12)
    torch.testing.assert_close(c.grad, torch.full_like(chosen, -1.0 / 1000))
    assert math.isclose(metrics["nll/token"].item(), -sum(chosen.tolist()) / total, rel_tol=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.8, 1.0])
def test_redi_loss_formula_gradient_and_coefficients(alpha):
    chosen, rejected, chosen_len, rejected_len, *_ = pair_batch()
    c, r = leaves(chosen, rejected)
    loss, metrics = losses.redi_loss(c, r, chosen_len, rejected_len, alpha=alpha)
    loss.backward()
    P = len(chosen)
    terms = [-cw / lw + alpha * cl / ll for cw, cl, lw, ll in
             zip(chosen.tolist(), rejected.tolist(), chosen_len.tolist(), rejected_len.tolist())]
    assert math.isclose(loss.item(), sum(terms) / P, rel_tol=1e-12)
    # The gradient of REDI w.r.t. the summed log-probs is constant: −1/|y_w| and +α/|y_l| (per pair, / P).
    torch.testing.assert_close(c.grad, -1.0 / (P * chosen_len.double()))
    torch.testing.assert_close(r.grad, alpha / (P * rejected_len.double()))
    assert math.isclose(metrics["redi/coef_chosen"].item(), (-1.0 / chosen_len.double()).mean().item(), rel_tol=1e-6)
    assert math.isclose(metrics["redi/coef_rejected"].item(), (alpha / rejected_len.double()).mean().item(),
                        rel_tol=1e-6, abs_tol=1e-12)
    chosen_avg, rejected_avg = chosen / chosen_len, rejected / rejected_len
    assert math.isclose(metrics["rewards/margins"].item(), (chosen_avg - rejected_avg).mean().item(), rel_tol=1e-6)
    assert metrics["rewards/accuracies"].item() == pytest.approx((chosen_avg > rejected_avg).double().mean().item())
    assert metrics["logps/chosen"].item() == pytest.approx(chosen.mean().item())
    assert metrics["logps/rejected"].item() == pytest.approx(rejected.mean().item())


def test_dpo_loss_formula_and_gradient():
    chosen, rejected, _, _, ref_chosen, ref_rejected = pair_batch()
    beta, P = 0.3, len(chosen)
    c, r, rc, rr = leaves(chosen, rejected, ref_chosen, ref_rejected)
    loss, metrics = losses.dpo_loss(c, r, rc, rr, beta=beta)
    loss.backward()
    z = [beta * ((a - b) - (d - e)) for a, b, d, e in
         zip(chosen.tolist(), ref_chosen.tolist(), rejected.tolist(), ref_rejected.tolist())]
    assert math.isclose(loss.item(), sum(-math.log(sigmoid(x)) for x in z) / P, rel_tol=1e-12)
    # d/dz −log σ(z) = −σ(−z); dz/dlogπ_w = β, dz/dlogπ_l = −β.
    want = torch.tensor([-beta * sigmoid(-x) / P for x in z], dtype=torch.float64)
    torch.testing.assert_close(c.grad, want)
    torch.testing.assert_close(r.grad, -want)
    assert rc.grad is None and rr.grad is None  # reference log-probs are constants
    chosen_rewards, rejected_rewards = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
    assert metrics["rewards/chosen"].item() == pytest.approx(chosen_rewards.mean().item())
    assert metrics["rewards/margins"].item() == pytest.approx((chosen_rewards - rejected_rewards).mean().item())
    assert metrics["rewards/accuracies"].item() == pytest.approx(
        (chosen_rewards > rejected_rewards).double().mean().item())


def test_simpo_loss_formula_and_gradient():
    chosen, rejected, chosen_len, rejected_len, *_ = pair_batch()
    beta, gamma, P = 2.0, 1.0, len(chosen)
    c, r = leaves(chosen, rejected)
    loss, metrics = losses.simpo_loss(c, r, chosen_len, rejected_len, beta=beta, gamma=gamma)
    loss.backward()
    z = [beta * (a / la - b / lb) - gamma for a, b, la, lb in
         zip(chosen.tolist(), rejected.tolist(), chosen_len.tolist(), rejected_len.tolist())]
    assert math.isclose(loss.item(), sum(-math.log(sigmoid(x)) for x in z) / P, rel_tol=1e-12)
    s = torch.tensor([sigmoid(-x) for x in z], dtype=torch.float64)
    torch.testing.assert_close(c.grad, -beta * s / (P * chosen_len.double()))
    torch.testing.assert_close(r.grad, beta * s / (P * rejected_len.double()))
    margins = beta * (chosen / chosen_len - rejected / rejected_len)
    assert metrics["rewards/margins"].item() == pytest.approx(margins.mean().item())


def trl_batch_logps(logits, labels, average_log_prob):
    """TRL's CPOTrainer.get_batch_logps, restated (trl/experimental/cpo/cpo_trainer.py:751-789 at f2cd577):
    shift by one, mask label -100, per-token log-softmax, then the masked sum or (SimPO, IPO) the masked
    mean per row."""
    labels, logits = labels[:, 1:].clone(), logits[:, :-1, :]
    mask = labels != IGNORE
    labels[~mask] = 0
    per_token = torch.log_softmax(logits, dim=-1).gather(-1, labels[..., None])[..., 0]
    summed = (per_token * mask).sum(-1)
    return summed / mask.sum(-1) if average_log_prob else summed


def test_simpo_metrics_equal_trl_definitions_on_the_same_batch():
    """Issue 13: SimPO's logps/* are TRL's (length-averaged, cpo_trainer.py:849,902-903), rewards/* are β times
    them (:745-746), and the loss is TRL's simpo loss (:714-720, label_smoothing 0), all on one padded batch
    of 3 pairs run through our token_logps -> sequence_logps -> simpo_loss."""
    gen = torch.Generator().manual_seed(3)
    pairs, T, H, V, beta, gamma = 3, 12, 8, 40, 2.5, 0.7
    hidden = torch.randn(2 * pairs, T, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, V, (2 * pairs, T), generator=gen)
    for row, (prompt, length) in enumerate([(3, 12), (2, 9), (4, 11), (5, 7), (1, 12), (3, 6)]):
        labels[row, :prompt] = IGNORE  # prompt tokens
        labels[row, length:] = IGNORE  # right padding
    trl_logps = trl_batch_logps(hidden @ weight.T, labels, average_log_prob=True)
    trl_chosen, trl_rejected = trl_logps[:pairs], trl_logps[pairs:]
    trl_loss = -torch.nn.functional.logsigmoid(beta * ((trl_chosen - trl_rejected) - gamma / beta)).mean()

    targets = labels[:, 1:]
    token = losses.token_logps(hidden[:, :-1], weight, targets)
    rows = torch.arange(2 * pairs)[:, None].expand_as(targets)
    sums, lengths = losses.sequence_logps(token, targets, rows, 2 * pairs)
    loss, metrics = losses.simpo_loss(sums[:pairs], sums[pairs:], lengths[:pairs], lengths[pairs:],
                                      beta=beta, gamma=gamma)
    expected = {"logps/chosen": trl_chosen.mean(), "logps/rejected": trl_rejected.mean(),
                "rewards/chosen": beta * trl_chosen.mean(), "rewards/rejected": beta * trl_rejected.mean(),
                "rewards/margins": beta * (trl_chosen - trl_rejected).mean(),
                "rewards/accuracies": (trl_chosen > trl_rejected).double().mean()}
    assert set(expected) <= set(metrics)
    for name, value in expected.items():
        assert metrics[name].item() == pytest.approx(value.item(), rel=1e-6, abs=1e-9), name
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-12)
    # DPO's logps/* are TRL's summed log-probs (dpo_trainer.py:1350,1324): not the SimPO meaning.
    trl_sums = trl_batch_logps(hidden @ weight.T, labels, average_log_prob=False)
    _, dpo_metrics = losses.dpo_loss(sums[:pairs], sums[pairs:], sums[:pairs] - 1, sums[pairs:] + 1)
    assert dpo_metrics["logps/chosen"].item() == pytest.approx(trl_sums[:pairs].mean().item(), rel=1e-6)
    assert not math.isclose(dpo_metrics["logps/chosen"].item(), metrics["logps/chosen"].item(), rel_tol=1e-3)


def test_weighted_nll_loss_formula_and_gradient():
    chosen, _, chosen_len, *_ = pair_batch()
    weights = torch.tensor([1.5, -0.5, 0.0, 2.0, -1.0, 0.25], dtype=torch.float64)
    P = len(chosen)
    c, w = leaves(chosen, weights)
    loss, metrics = losses.weighted_nll_loss(c, chosen_len, w)
    loss.backward()
    want = sum(-wi * ci / li for wi, ci, li in zip(weights.tolist(), chosen.tolist(), chosen_len.tolist())) / P
    assert math.isclose(loss.item(), want, rel_tol=1e-12)
    torch.testing.assert_close(c.grad, -weights / (P * chosen_len.double()))
    assert w.grad is None  # weights are constants
    assert metrics["weights/mean"].item() == pytest.approx(weights.mean().item())
    assert metrics["weights/positive_fraction"].item() == pytest.approx(3 / 6)


def test_group_advantages_z_scores_with_sample_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.5, 2.0, 0.0])
    adv = losses.group_advantages(rewards, group_size=4)
    want = []
    for group in rewards.view(3, 4).tolist():
        if len(set(group)) == 1:
            want += [0.0] * 4  # no signal in an all-equal group
        else:
            mean, std = statistics.mean(group), statistics.stdev(group)  # stdev: sample std, n − 1
            want += [(x - mean) / (std + 1e-4) for x in group]
    torch.testing.assert_close(adv, torch.tensor(want))
    assert (adv[4:8] == 0).all()
    clipped = losses.group_advantages(rewards, group_size=4, clip_negative=True)
    torch.testing.assert_close(clipped, torch.tensor(want).clamp(min=0))
    # All-equal groups are exactly 0 even where the fp32 mean rounds (mean of eight 0.7s != 0.7, and the
    # rounding error / eps would otherwise give advantages of ~6e-4).
    assert (losses.group_advantages(torch.full((8,), 0.7), group_size=8) == 0).all()
    assert (losses.group_advantages(torch.tensor([1.0, 0.0]), group_size=1) == 0).all()
    with pytest.raises(ValueError, match="group_size=4"):
        losses.group_advantages(rewards[:10], group_size=4)


def test_losses_reject_mismatched_shapes():
    chosen, rejected, chosen_len, rejected_len, *_ = pair_batch()
    with pytest.raises(ValueError, match="losses.redi_loss"):
        losses.redi_loss(chosen, rejected[:-1], chosen_len, rejected_len)
    with pytest.raises(ValueError, match="losses.sft_loss"):
        losses.sft_loss(chosen[:, None], chosen_len[:, None])


# ------------------------------------------------------------------------------------------------------
# Properties shared by all objectives
# ------------------------------------------------------------------------------------------------------


def all_objectives(chosen, rejected, chosen_len, rejected_len, ref_chosen, ref_rejected, weights):
    return {
        "sft": losses.sft_loss(chosen, chosen_len),
        "redi": losses.redi_loss(chosen, rejected, chosen_len, rejected_len),
        "redi_symmetric": losses.redi_loss(chosen, rejected, chosen_len, rejected_len, alpha=1.0),
        "dpo": losses.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1),
        "simpo": losses.simpo_loss(chosen, rejected, chosen_len, rejected_len),
        "weighted": losses.weighted_nll_loss(torch.cat([chosen, rejected]), torch.cat([chosen_len, rejected_len]),
                                             weights),
    }


def test_every_objective_gives_a_different_value_on_the_same_batch():
    chosen, rejected, chosen_len, rejected_len, ref_chosen, ref_rejected = pair_batch()
    weights = losses.group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0] * 2), group_size=2)
    values = {name: loss.item() for name, (loss, _) in
              all_objectives(chosen, rejected, chosen_len, rejected_len, ref_chosen, ref_rejected, weights).items()}
    names = list(values)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not math.isclose(values[a], values[b], rel_tol=1e-6), (a, b, values)


def test_inputs_are_not_mutated_and_metrics_are_detached_scalars():
    chosen, rejected, chosen_len, rejected_len, ref_chosen, ref_rejected = pair_batch()
    weights = torch.tensor([1.0, -1.0, 0.5, 0.0, 2.0, -0.5] * 2, dtype=torch.float64)
    inputs = [chosen, rejected, chosen_len, rejected_len, ref_chosen, ref_rejected, weights]
    snapshot = [t.clone() for t in inputs]
    grads = leaves(chosen, rejected)
    results = all_objectives(grads[0], grads[1], *inputs[2:])
    for loss, metrics in results.values():
        loss.backward(retain_graph=True)
        for name, value in metrics.items():
            assert value.dim() == 0 and not value.requires_grad, name
    for before, t in zip(snapshot, inputs[:2] + inputs[2:]):
        assert torch.equal(before, t)
    for before, t in zip(snapshot[:2], grads):
        assert torch.equal(before, t.detach())

    hidden, weight, targets, _ = random_case(torch.float32)
    kept = [hidden.clone(), weight.clone(), targets.clone()]
    h, w = leaves(hidden, weight)
    losses.token_logps(h, w, targets, chunk_size=7).sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(kept, [h.detach(), w.detach(), targets]))
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    losses.group_advantages(rewards, 2, clip_negative=True)
    assert torch.equal(rewards, torch.tensor([1.0, 0.0, 0.5, 0.5]))


def test_all_masked_row_gives_no_nan():
    """A sequence without any loss token (e.g. truncated to its prompt) flows through every stage finitely."""
    hidden, weight, _, _ = random_case(torch.float32, shape=(1, 12))
    targets = torch.tensor([[3, 4, IGNORE, IGNORE, IGNORE, IGNORE, 5, IGNORE, 6, 7, 8, IGNORE]])
    document_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3]])  # documents 1 fully masked
    h, w = leaves(hidden, weight)
    sums, lengths = losses.sequence_logps(losses.token_logps(h, w, targets, chunk_size=5), targets, document_ids, 4)
    assert lengths.tolist() == [2, 0, 1, 3] and sums[1].item() == 0
    chosen, rejected = sums[[0, 1]], sums[[2, 3]]
    chosen_len, rejected_len = lengths[[0, 1]], lengths[[2, 3]]
    results = all_objectives(chosen, rejected, chosen_len, rejected_len, chosen.detach() - 1, rejected.detach(),
                             torch.tensor([1.0, -1.0, 0.5, 2.0]))
    total = sum(loss for loss, _ in results.values())
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    for _, metrics in results.values():
        assert all(torch.isfinite(v) for v in metrics.values())
    # A batch where every token is masked: loss 0, not 0/0.
    loss, _ = losses.sft_loss(torch.zeros(2), torch.zeros(2, dtype=torch.long))
    assert loss.item() == 0.0


# ------------------------------------------------------------------------------------------------------
# Gradient accumulation: 1 micro-batch vs 4 at the same global batch give the same gradient
# ------------------------------------------------------------------------------------------------------


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=50, hidden=16):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.mix = torch.nn.Linear(hidden, hidden)
        self.lm_head_weight = torch.nn.Parameter(torch.randn(vocab, hidden) * 0.3)

    def forward(self, input_ids):
        return torch.tanh(self.mix(self.embed(input_ids)))


def make_sequences(count, seed=0, vocab=50):
    """(token ids, prompt length) pairs of uneven lengths."""
    gen = torch.Generator().manual_seed(seed)
    sequences = []
    for _ in range(count):
        length = int(torch.randint(4, 30, (1,), generator=gen))
        prompt = int(torch.randint(1, length - 1, (1,), generator=gen))
        sequences.append((torch.randint(0, vocab, (length,), generator=gen), prompt))
    return sequences


def pack(sequences):
    """A packed row as in the data contract: targets pre-shifted, -100 on prompt tokens and document ends."""
    input_ids, targets, document_ids = [], [], []
    for index, (ids, prompt_len) in enumerate(sequences):
        shifted = torch.cat([ids[1:], torch.tensor([IGNORE])])
        shifted[: prompt_len - 1] = IGNORE  # predicting a prompt token is not a loss
        input_ids.append(ids)
        targets.append(shifted)
        document_ids.append(torch.full_like(ids, index))
    return torch.cat(input_ids)[None], torch.cat(targets)[None], torch.cat(document_ids)[None]


def sequence_sums(model, sequences):
    input_ids, targets, document_ids = pack(sequences)
    tok = losses.token_logps(model(input_ids), model.lm_head_weight, targets, chunk_size=16)
    return losses.sequence_logps(tok, targets, document_ids, len(sequences))


def accumulated_grads(model, micro_batches, loss_fn):
    model.zero_grad()
    for micro in micro_batches:
        loss_fn(micro).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same_grads(a, b):
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-10, atol=1e-12, msg=name)


def test_grad_accumulation_sft_with_global_normalizer_matches_one_big_batch():
    torch.manual_seed(0)
    model = TinyLM().double()
    sequences = make_sequences(9)
    micro_batches = [sequences[:1], sequences[1:5], sequences[5:7], sequences[7:]]  # uneven on purpose
    global_tokens = int(sum(sequence_sums(model, [s])[1].item() for s in sequences))

    def sft(micro, normalizer=global_tokens):
        return losses.sft_loss(*sequence_sums(model, micro), normalizer=normalizer)[0]

    one_batch = accumulated_grads(model, [sequences], lambda m: sft(m, normalizer=None))
    four_micro = accumulated_grads(model, micro_batches, sft)
    assert_same_grads(one_batch, four_micro)
    # Negative control: averaging per-micro-batch token means (the peers' bug) gives a different gradient.
    naive = accumulated_grads(model, micro_batches, lambda m: sft(m, normalizer=None) / len(micro_batches))
    assert not torch.allclose(naive["mix.weight"], one_batch["mix.weight"], rtol=1e-3)


def test_grad_accumulation_redi_matches_one_big_batch():
    torch.manual_seed(1)
    model = TinyLM().double()
    sequences = make_sequences(16, seed=1)  # 8 pairs: (chosen, rejected) = sequences 2i, 2i+1

    def redi(micro, **kwargs):
        sums, lengths = sequence_sums(model, micro)
        return losses.redi_loss(sums[0::2], sums[1::2], lengths[0::2], lengths[1::2], alpha=0.8, **kwargs)[0]

    one_batch = accumulated_grads(model, [sequences], redi)
    # Four equal micro-batches of 2 pairs: the per-pair mean divided by the number of micro-batches.
    equal = [sequences[i:i + 4] for i in range(0, 16, 4)]
    assert_same_grads(one_batch, accumulated_grads(model, equal, lambda m: redi(m) / 4))
    # Uneven micro-batches (3, 1, 2, 2 pairs): pass the global pair count as the normalizer.
    uneven = [sequences[:6], sequences[6:8], sequences[8:12], sequences[12:]]
    assert_same_grads(one_batch, accumulated_grads(model, uneven, lambda m: redi(m, normalizer=8)))
