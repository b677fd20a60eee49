"""Training objectives of reinforcement distillation, and the log-probabilities they are built from.

Every objective is a short function of per-sequence *summed* log-probabilities logπ(y|x) = Σ_t logπ(y_t|x, y_<t)
and token counts |y|, so the formula in its docstring can be read next to the paper:

  sft_loss           SFT on positive traces: token-mean negative log-likelihood.
  redi_loss          REDI (Xu et al. 2025): −logπ(y_w|x)/|y_w| + α·logπ(y_l|x)/|y_l|.
  dpo_loss           DPO (Rafailov et al. 2023), against precomputed reference log-probs.
  simpo_loss         SimPO (Meng et al. 2024): reference-free, length-normalised, with a margin γ.
  group_advantages   GRPO-style z-scored rewards within each prompt's group of samples.
  weighted_nll_loss  AdvDistill (Padarha 2025): reward-weighted, length-normalised NLL.

Each loss returns (loss, metrics): detached 0-dim tensors (batch means), so a trainer can all-reduce them
without a host sync. A metric under one of TRL's names means what TRL logs there for that loss: logps/chosen
is the summed logπ(y_w|x) for DPO (trl/trainer/dpo_trainer.py:1350,1362,1324 at f2cd577) but the
length-averaged one for SimPO (trl/experimental/cpo/cpo_trainer.py:786-787,849,902-903), and rewards/* is each
loss's implicit reward. Quantities TRL does not log have names of their own (nll/token, redi/*, weights/*,
logps/samples).

Batch normalisation. A loss is Σ_i ℓ_i / N. N defaults to this batch's count (sequences, pairs or loss tokens),
giving the batch mean. Under gradient accumulation or DDP the trainer passes `normalizer` = the count of the
whole *global* batch (all micro-batches of the optimizer step, all ranks): the summed gradients then equal
those of one big batch exactly, however unevenly the micro-batches are filled. (Averaging per-micro-batch
means instead weights a token in a short micro-batch more than one in a long micro-batch: the
gradient-accumulation normalisation bug.)

The log-probs come from `token_logps`, which never holds the [tokens, vocabulary] logits tensor whole: at
16k tokens × 151,936 vocabulary that tensor is 10 GB in fp32, and its gradient another 10 GB. SequenceLogps
turns a model's packed row into the per-sequence sums and counts the objectives take.
"""

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

# token_logps processes tokens in chunks whose fp32 logits take about this many bytes (one [chunk, V] buffer
# is live at a time, see _ChunkedTokenLogps). 256 MiB is 441 tokens at Qwen2's 151,936 vocabulary: large
# enough that each chunk's matmul is efficient, small enough that memory does not grow with tokens × vocab.
CHUNK_BYTES = 256 * 2**20


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk = CHUNK_BYTES / (4 bytes × V), at least 1."""
    return max(1, CHUNK_BYTES // (4 * vocab_size))


# --------------------------------------------------------------------------------------------------------
# Token and sequence log-probabilities
# --------------------------------------------------------------------------------------------------------


def _require(ok, message: str) -> None:
    """ValueError(message) unless the 0-dim bool tensor `ok` holds. On CUDA, reading `ok` on the host would
    stall the stream every micro-step, so there it is a device-side assert: the run still stops, with this
    message in the CUDA error, without a synchronisation per step."""
    if ok.is_cuda:
        torch._assert_async(ok, message)
    elif not ok:
        raise ValueError(message)


def _operand(x, low_precision: bool, compute_dtype):
    """A matmul operand. fp32/fp64 path: x in compute_dtype, as always. bf16 path: x rounded to bf16; on a
    GPU with bf16 tensor cores (compute capability 8+) kept in bf16 for them, elsewhere held in fp32 (bf16 ->
    fp32 is exact, so an fp32 matmul of these values is what a bf16 GEMM with fp32 accumulation computes, up
    to summation order: the CPU path is the CUDA path's arithmetic, testable without a GPU)."""
    if not low_precision:
        return x.to(compute_dtype)
    x = x.to(torch.bfloat16)
    native = x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 8
    return x if native else x.float()


def _mm(a, b):
    """a @ b with an fp32 (or fp64) result. bf16 operands (CUDA only, see _operand): cuBLAS bf16 GEMM with
    fp32 accumulation writing fp32 (`out_dtype`, torch >= 2.8), never bf16 logits."""
    if a.dtype == torch.bfloat16:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a @ b


def _addmm_(acc, a, b):
    """acc += a @ b in place, acc fp32 (or fp64); bf16 operands as in _mm."""
    if a.dtype == torch.bfloat16:
        return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    return acc.addmm_(a, b)


class _ChunkedTokenLogps(torch.autograd.Function):
    """logp_t = z_t[y_t] − logsumexp(z_t), with logits z_t = W h_t, computed chunk by chunk.

    Forward keeps only logsumexp(z_t) per token, plus the softmax of the last chunk (its buffer, which
    backward consumes first, in place: peak memory stays one chunk, and a batch that fits in one chunk is
    never recomputed). Backward recomputes every other chunk's logits and uses
        ∂logp_t/∂z_t = onehot(y_t) − softmax(z_t),
    so with upstream gradient g_t and dz_t = g_t (onehot(y_t) − softmax(z_t)):
        ∂L/∂h_t = W^T dz_t,    ∂L/∂W = Σ_t dz_t h_t^T.
    Logits, softmax and logsumexp are fp32 (fp64 for fp64 inputs) whatever the input dtype: bf16 *logits*
    are off by up to |z|·2^-8 (bf16 keeps 8 significant bits: 0.06 nats at |z| = 16). With low_precision the three matmuls take bf16
    operands (h, W, and dz in backward) with fp32 accumulation, see token_logps. Gradients are returned in
    the inputs' dtypes. Ignored targets give 0 and no gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, ignore_index, low_precision):
        compute_dtype = torch.promote_types(hidden.dtype, torch.float32)
        # Our own dtype choice must win over an enclosing torch.autocast (which would write bf16 logits).
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            weight_c = _operand(weight, low_precision, compute_dtype)
            valid = targets != ignore_index
            safe_targets = torch.where(valid, targets, 0)
            logps = torch.zeros(targets.shape, dtype=compute_dtype, device=hidden.device)
            logsumexp = torch.zeros_like(logps)
            starts = range(0, targets.numel(), chunk_size)
            for start in starts:
                rows = slice(start, start + chunk_size)
                logits = _mm(_operand(hidden[rows], low_precision, compute_dtype), weight_c.T)  # [chunk, V]
                target_logits = logits.gather(1, safe_targets[rows, None]).squeeze(1)
                # logsumexp in place (torch.logsumexp would allocate two more [chunk, V] temporaries).
                row_max = logits.amax(dim=1, keepdim=True)
                exp_sum = logits.sub_(row_max).exp_().sum(dim=1)
                lse = exp_sum.log() + row_max.squeeze(1)
                logsumexp[rows] = lse
                logps[rows] = torch.where(valid[rows], target_logits - lse, 0.0)
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        # The last chunk's buffer now holds exp(z − max); divided by its row sums it is the softmax backward needs.
        ctx.last_softmax = logits.div_(exp_sum[:, None]) if needs_grad and len(starts) else None
        ctx.save_for_backward(hidden, weight, safe_targets, valid, logsumexp)
        ctx.chunk_size, ctx.low_precision = chunk_size, low_precision
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, safe_targets, valid, logsumexp = ctx.saved_tensors
        compute_dtype, low = logsumexp.dtype, ctx.low_precision
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            weight_c = _operand(weight, low, compute_dtype)
            grad_per_token = torch.where(valid, grad_logps.to(compute_dtype), 0.0)
            grad_hidden = torch.zeros(hidden.shape, dtype=compute_dtype, device=hidden.device)
            grad_weight = torch.zeros(weight.shape, dtype=compute_dtype, device=weight.device)
            # Last chunk first: its softmax was kept by forward, so it is freed before any other is recomputed.
            for start in reversed(range(0, safe_targets.numel(), ctx.chunk_size)):
                rows = slice(start, start + ctx.chunk_size)
                hidden_c = _operand(hidden[rows], low, compute_dtype)
                g = grad_per_token[rows]
                if ctx.last_softmax is not None:
                    softmax, ctx.last_softmax = ctx.last_softmax, None
                else:  # softmax = exp(z − logsumexp), recomputed in the logits buffer itself
                    softmax = _mm(hidden_c, weight_c.T).sub_(logsumexp[rows, None]).exp_()
                # dz = g·(onehot − softmax), in place.
                grad_logits = softmax.mul_(-g[:, None])
                grad_logits.scatter_add_(1, safe_targets[rows, None], g[:, None])
                grad_logits = _operand(grad_logits, low, compute_dtype)
                grad_hidden[rows] = _mm(grad_logits, weight_c)
                _addmm_(grad_weight, grad_logits.T, hidden_c)
        return grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype), None, None, None, None


def uses_bf16_matmuls(hidden, weight) -> bool:
    """token_logps' choice: bf16 matmul operands when both inputs are bf16, or under bf16 autocast (as every
    other matmul of the step then is); otherwise (fp32, fp64, mixed without autocast) the exact fp32 path."""
    device_type = hidden.device.type
    if torch.float64 in (hidden.dtype, weight.dtype):
        return False
    if hidden.dtype == weight.dtype == torch.bfloat16:
        return True
    return torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.bfloat16


def token_logps(hidden, weight, targets, chunk_size=None, ignore_index=IGNORE_INDEX):
    """logπ(y_t | context) = log_softmax(hidden_t @ weight^T)[y_t] for every position t, without ever holding
    the full [tokens, vocabulary] logits (or their gradient): tokens are processed `chunk_size` at a time
    (default: default_chunk_size(V), about 256 MiB of fp32 logits per chunk). Gradients are exact.

    hidden [..., H] (final normed hidden states), weight [V, H] (the output projection), targets [...] ids.
    Returns fp32 log-probs shaped like targets (fp64 for fp64 inputs), 0 where targets == ignore_index.

    Precision. fp32 (fp64) inputs: every matmul in fp32 (fp64), bit for bit the path of earlier versions.
    bf16 inputs, or bf16 autocast (uses_bf16_matmuls): the matmuls z = W h, dz W and dz^T h take bf16
    operands with fp32 accumulation (CUDA: cuBLAS with fp32 output; CPU: the bf16-rounded values in fp32);
    logits, softmax and logsumexp stay fp32. Liger's fused linear cross-entropy makes the same GEMMs but
    rounds its logits to bf16 (src/liger_kernel/ops/fused_linear_cross_entropy.py:114 at ead96b6; dW by addmm
    with out_dtype=fp32, :236-256). Error of the logits: against exact arithmetic on the same bf16 operands,
    fp32 accumulation only (≲ H·2^-24·Σ_i|h_i W_i|, typically far less); against fp32 operands, the operands'
    rounding, |δz| ≲ 2^-7·Σ_i|h_i W_i| (2^-8 per operand), which every bf16 layer of the model incurs too.
    Avoided: rounding the logits themselves to bf16 (|δz| up to 2^-8·|z|), which transformers' bf16 logits
    carry. Gradients: dz rounded to bf16 (2^-8 relative per entry), then the cast to the inputs' dtype.
    Measured (tests/test_losses.py, tiny bf16 Qwen2, against fp64 on the same operands): log-probs 1e-6 here
    vs 5e-3 for transformers' bf16 logits; gradients no larger than transformers' (equal with bf16 weights,
    smaller under autocast over fp32 weights, where ours are accumulated and returned in fp32).
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"losses.token_logps: hidden {tuple(hidden.shape)} must be targets {tuple(targets.shape)} "
                         "plus a hidden dimension")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"losses.token_logps: weight {tuple(weight.shape)} must be [vocab, {hidden.shape[-1]}]")
    vocab_size = weight.shape[0]
    valid = targets != ignore_index
    out_of_range = valid & ((targets < 0) | (targets >= vocab_size))
    _require(~out_of_range.any(), f"losses.token_logps: target ids outside [0, {vocab_size}) that are not "
             f"ignore_index={ignore_index}; check the tokenizer matches the model's vocabulary")
    chunk_size = default_chunk_size(vocab_size) if chunk_size is None else chunk_size
    if chunk_size < 1:
        raise ValueError(f"losses.token_logps: chunk_size must be ≥ 1 (or None for the default), got {chunk_size}")
    flat = _ChunkedTokenLogps.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                                    chunk_size, ignore_index, uses_bf16_matmuls(hidden, weight))
    return flat.view(targets.shape)


def sequence_logps(token_logps, targets, document_ids, num_sequences, ignore_index=IGNORE_INDEX):
    """Per-sequence sums over a packed row: logπ(y_s|x_s) = Σ_{t: doc(t)=s} logp_t and
    |y_s| = #{t: doc(t)=s, target_t ≠ ignore_index}. Returns (sum_logps [S], lengths [S] long)."""
    if not (token_logps.shape == targets.shape == document_ids.shape):
        raise ValueError(f"losses.sequence_logps: token_logps {tuple(token_logps.shape)}, targets "
                         f"{tuple(targets.shape)} and document_ids {tuple(document_ids.shape)} must have one shape")
    valid = (targets != ignore_index).reshape(-1)
    # Positions without a loss token contribute nothing, so their document id does not matter (padding may
    # carry any id); only loss tokens must point at one of the S sequences.
    documents = torch.where(valid, document_ids.reshape(-1), 0)
    bad = (documents < 0) | (documents >= num_sequences)
    _require(~bad.any(), f"losses.sequence_logps: loss tokens with a document id outside [0, {num_sequences}); "
             "num_sequences must match the packed batch's document_ids")
    values = torch.where(valid, token_logps.reshape(-1), 0.0)
    sum_logps = values.new_zeros(num_sequences).index_add(0, documents, values)
    lengths = torch.zeros(num_sequences, dtype=torch.long, device=documents.device).index_add(
        0, documents, valid.long())
    return sum_logps, lengths


class SequenceLogps(torch.nn.Module):
    """A model, seen as: packed row (data.pack) -> (sum_logps [S], lengths [S]) of its S sequences, what
    every objective below takes. The output projection runs here, inside the module a trainer wraps in DDP or
    FSDP, so that their gradient hooks and all-gathers cover it; token_logps computes it chunk by chunk."""

    def __init__(self, model):
        super().__init__()
        self.model = model  # a model.Qwen2: forward(..., return_hidden=True) and lm_head_weight

    def forward(self, batch: dict):
        hidden = self.model(batch["input_ids"], position_ids=batch["position_ids"],
                            document_ids=batch["document_ids"], return_hidden=True)
        logps = token_logps(hidden, self.model.lm_head_weight, batch["targets"])
        return sequence_logps(logps, batch["targets"], batch["document_ids"], batch["num_sequences"])


# --------------------------------------------------------------------------------------------------------
# Objectives
# --------------------------------------------------------------------------------------------------------


def _check_batch(loss_name, **tensors):
    """All inputs of a loss are 1-D and of one length (one entry per sequence or pair)."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 1:
        raise ValueError(f"losses.{loss_name}: inputs must be 1-D tensors of one length, got {shapes}")


def _per_token(sum_logps, lengths):
    """logπ(y|x)/|y| with |y| clamped to ≥ 1, so a fully masked sequence gives 0, not NaN."""
    return sum_logps / lengths.clamp(min=1).to(sum_logps.dtype)


def _normalise(per_item_loss, normalizer):
    """Σ_i ℓ_i / N, with N = `normalizer` (the global batch's count) or this batch's size, clamped to ≥ 1."""
    if normalizer is None:
        normalizer = per_item_loss.numel()
    normalizer = torch.as_tensor(normalizer, dtype=per_item_loss.dtype, device=per_item_loss.device)
    return per_item_loss.sum() / normalizer.clamp(min=1)


def _mean(values):
    """Detached mean for a metric (0 for an empty batch rather than NaN)."""
    values = values.detach().float()
    return values.sum() / max(values.numel(), 1)


def _preference_metrics(chosen_logps, rejected_logps, chosen_rewards, rejected_rewards):
    return {
        "logps/chosen": _mean(chosen_logps),
        "logps/rejected": _mean(rejected_logps),
        "rewards/chosen": _mean(chosen_rewards),
        "rewards/rejected": _mean(rejected_rewards),
        "rewards/margins": _mean(chosen_rewards - rejected_rewards),
        "rewards/accuracies": _mean(chosen_rewards > rejected_rewards),
    }


def sft_loss(sum_logps, lengths, normalizer=None):
    """SFT: L = −Σ_s logπ(y_s|x_s) / N, the negative log-likelihood per response token.

    N defaults to Σ_s |y_s| (this batch's loss tokens, clamped to ≥ 1). The trainer passes N = the loss-token
    count of the global batch (all micro-batches and ranks of the step), so every token has weight 1/N and
    gradient accumulation and DDP give exactly the update of one big batch.
    """
    _check_batch("sft_loss", sum_logps=sum_logps, lengths=lengths)
    loss = _normalise(-sum_logps, lengths.sum() if normalizer is None else normalizer)
    # (No "num_tokens": TRL's is the running count of all tokens seen, which the trainer logs itself.)
    metrics = {"logps/chosen": _mean(sum_logps),
               "nll/token": -sum_logps.detach().float().sum() / lengths.sum().clamp(min=1)}
    return loss, metrics


def redi_loss(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, alpha=0.8, *, normalizer=None):
    """REDI: L = mean over pairs of  −logπ(y_w|x)/|y_w| + α·logπ(y_l|x)/|y_l|.

    α = 0.8 is the paper's default; α = 1 the symmetric variant; α = 0 plain SFT on the positives (each
    sequence's token-mean). The gradient w.r.t. the summed log-probs is constant: −1/|y_w| for the positive,
    +α/|y_l| for the negative (reported as redi/coef_chosen and redi/coef_rejected, batch means).
    Implicit reward for the metrics: the length-normalised log-prob logπ(y|x)/|y|.
    """
    _check_batch("redi_loss", chosen_logps=chosen_logps, rejected_logps=rejected_logps,
                 chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    chosen_avg = _per_token(chosen_logps, chosen_lengths)
    rejected_avg = _per_token(rejected_logps, rejected_lengths)
    loss = _normalise(-chosen_avg + alpha * rejected_avg, normalizer)
    metrics = _preference_metrics(chosen_logps, rejected_logps, chosen_avg, rejected_avg)
    metrics["redi/coef_chosen"] = _mean(-1.0 / chosen_lengths.clamp(min=1))
    metrics["redi/coef_rejected"] = _mean(alpha / rejected_lengths.clamp(min=1))
    return loss, metrics


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1, *, normalizer=None):
    """DPO: L = mean over pairs of  −log σ(β[(logπ_w − logπ_ref,w) − (logπ_l − logπ_ref,l)]).

    The reference log-probs are computed once, in a pass over the data before training, so no second model
    is held in memory; they are constants here (detached). Implicit reward: β(logπ − logπ_ref).
    """
    _check_batch("dpo_loss", chosen_logps=chosen_logps, rejected_logps=rejected_logps,
                 ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps.detach())
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps.detach())
    loss = _normalise(-F.logsigmoid(chosen_rewards - rejected_rewards), normalizer)
    return loss, _preference_metrics(chosen_logps, rejected_logps, chosen_rewards, rejected_rewards)


def simpo_loss(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, beta=2.0, gamma=1.0, *,
               normalizer=None):
    """SimPO: L = mean over pairs of  −log σ(β(logπ_w/|y_w| − logπ_l/|y_l|) − γ).

    Reference-free; γ is the target reward margin. Implicit reward (as in the paper and TRL): β·logπ(y|x)/|y|.
    logps/chosen and logps/rejected are the length-averaged logπ(y|x)/|y|, as TRL's CPOTrainer logs them for
    loss_type="simpo" (trl/experimental/cpo/cpo_trainer.py:786-787,849,902-903 at f2cd577).
    """
    _check_batch("simpo_loss", chosen_logps=chosen_logps, rejected_logps=rejected_logps,
                 chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    chosen_avg = _per_token(chosen_logps, chosen_lengths)
    rejected_avg = _per_token(rejected_logps, rejected_lengths)
    chosen_rewards, rejected_rewards = beta * chosen_avg, beta * rejected_avg
    loss = _normalise(-F.logsigmoid(chosen_rewards - rejected_rewards - gamma), normalizer)
    return loss, _preference_metrics(chosen_avg, rejected_avg, chosen_rewards, rejected_rewards)


def group_advantages(rewards, group_size, eps=1e-4, clip_negative=False):
    """A_i = (r_i − mean_g) / (std_g + eps) within each prompt's group g of `group_size` samples.

    rewards [N] are laid out group after group (N a multiple of group_size). std is the sample standard
    deviation (n − 1), as torch.std and TRL's GRPO compute it. A group whose rewards are all equal carries no
    signal and gets advantage exactly 0 (so does group_size 1, where std is undefined). clip_negative=True
    sets negative advantages to 0 (learn only from better-than-average samples). Returns fp32 [N], no grad.
    """
    if rewards.dim() != 1:
        raise ValueError(f"losses.group_advantages: rewards must be 1-D [N], got {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"losses.group_advantages: {rewards.numel()} rewards do not split into groups of "
                         f"group_size={group_size}; pass every sample of every prompt, group after group")
    groups = rewards.detach().float().view(-1, group_size)
    if group_size == 1:
        return torch.zeros_like(groups).view(-1)
    advantages = (groups - groups.mean(dim=1, keepdim=True)) / (groups.std(dim=1, keepdim=True) + eps)
    # Exactly 0, not rounding noise divided by eps, when a group's rewards are all equal.
    all_equal = (groups == groups[:, :1]).all(dim=1, keepdim=True)
    advantages = advantages.masked_fill(all_equal, 0.0)
    if clip_negative:
        advantages = advantages.clamp(min=0.0)
    return advantages.view(-1)


def weighted_nll_loss(logps, lengths, weights, *, normalizer=None):
    """AdvDistill's reward-weighted NLL: L = mean over sequences of  −w·logπ(y|x)/|y|.

    The weights (e.g. group_advantages of the teacher's rewards) are constants: detached, no gradient.
    Metrics: logps/samples, the mean summed logπ(y|x) of the samples (every sample, whatever its weight: not
    TRL's logps/chosen), and the weights' mean and positive fraction.
    """
    _check_batch("weighted_nll_loss", logps=logps, lengths=lengths, weights=weights)
    weights = weights.detach().to(logps.dtype)
    loss = _normalise(-weights * _per_token(logps, lengths), normalizer)
    metrics = {"logps/samples": _mean(logps), "weights/mean": _mean(weights),
               "weights/positive_fraction": _mean(weights > 0)}
    return loss, metrics
