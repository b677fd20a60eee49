"""train.py: the training loop of both stages, by hand: torch.distributed, DDP (or FSDP2), bf16 autocast.

    torchrun --nproc_per_node 8 train.py --config recipes/stage1-sft-5ep.json
    torchrun --nproc_per_node 8 train.py --stage redi --model runs/stage1 --data pairs.jsonl --out runs/stage2
    python train.py ...            (one process, no process group: CPU or one GPU)

Stages: sft (Stage 1, positive traces), and for Stage 2 redi (the paper's method) or the baselines dpo, simpo
and weighted (AdvDistill's reward-weighted NLL). The formulas live in losses.py; this file decides which
examples go into which forward pass and how the sum over the global batch is normalised.

  1. Arguments      flags, or a --config JSON of the same keys (recipes/); per-stage defaults from the paper.
  2. Data           the token cache (data.py section 7: built once, memory-mapped by every rank and start);
                    which examples each rank and micro-step sees.
  3. Model          the model wrapped so the output projection runs inside DDP/FSDP's forward; AdamW.
  4. The step       micro-batches, one gradient-synchronising backward, the lr of the step.
  5. DPO reference  log-probs of the starting model, computed once and cached in the token cache directory,
                    one file per model and settings.
  6. Checkpoints    step-N (fp32 weights + AdamW state: exact resume) and the final model (inference only);
                    which step-N to resume from, what it must match, AdamW state read back rank by rank;
                    common.prepare_run_dir: what OUT may already hold.
  7. Main           setup, then the loop: clip, update, optional evaluation, logging (and --report-to),
                    checkpoints, the final model; on SIGTERM, step-N and exit 143 (README: Robustness).

The one idea to take away (section 4): every loss is Σ_i ℓ_i / N where N counts the *global* batch (all
ranks, all micro-steps): loss tokens for sft, pairs for redi/dpo/simpo, completions for weighted. Each
micro-step backpropagates its part of that sum, times world_size because DDP averages gradients over ranks.
So N ranks x k micro-steps give exactly the update of one process holding the whole batch, however
unevenly the examples are spread (a micro-batch mean would weight a token of a short micro-batch more).
"""

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

import common
import data
import losses
from common import (COUNT, FINITE, NON_NEGATIVE, POSITIVE, InputError, all_reduce_sum, checked, on_main_rank,
                    print0)
from model import DTYPES, CheckpointError, Qwen2, Qwen2Config, checkpoint_files

STAGE_FORMATS = {"sft": "sft", "redi": "pairs", "dpo": "pairs", "simpo": "pairs", "weighted": "groups"}
FORMAT_NAMES = {"sft": "SFT (messages or prompt/completion)", "pairs": "preference (prompt/chosen/rejected)",
                "groups": "group (prompt/completions/rewards)"}
# The paper (arXiv 2505.24850, appendix C.3-C.4, Table 2): Stage 1 lr 5e-5, batch 128, 5 epochs; Stage 2
# batch 32, 1 epoch, lr per method: REDI (α 0.8) 1e-6, DPO (β 0.001) 2e-7, SimPO (β 2, γ 1) 5e-7.
# AdvDistill's weighted NLL is not in the paper; it takes REDI's settings.
STAGE2 = dict(batch_size=32, epochs=1)
STAGE_DEFAULTS = {"sft": dict(lr=5e-5, batch_size=128, epochs=5), "redi": dict(STAGE2, lr=1e-6),
                  "dpo": dict(STAGE2, lr=2e-7, beta=0.001), "simpo": dict(STAGE2, lr=5e-7, beta=2.0),
                  "weighted": dict(STAGE2, lr=1e-6)}
TRAINER_STATE = "trainer_state.json"  # step-N's step, flags and fingerprints
OPTIMIZER_STATE = "optimizer/adamw.safetensors"  # step-N's AdamW state (section 6). In a folder: without an index,
# vLLM loads every *.safetensors beside config.json (model_loader/weight_utils.py, filter_duplicate_safetensors_files)
LEGACY_TRAINER_STATE = "trainer_state.pt"  # the earlier format: both in one pickled dict; still resumed from
METRICS_FILE = "metrics.jsonl"


class NonFiniteLossError(InputError):
    """The loss, gradient norm or weights became inf/NaN: the run stops before saving them. An InputError:
    the cure is the user's (a lower --lr), so the CLI says it in one line, exit 2."""


# ----------------------------------------------------------------------------------------------------------
# 1. Arguments


def per_stage(key: str) -> str:
    return "default per --stage: " + ", ".join(f"{s} {d[key]:g}" for s, d in STAGE_DEFAULTS.items() if key in d)


def build_parser(exit_on_error: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py", description=__doc__.splitlines()[0],
                                formatter_class=common.HelpFormatter, exit_on_error=exit_on_error)
    add = p.add_argument
    add("--config", help="JSON file of flag: value (recipes/*.json); flags on the command line override it")
    add("--stage", choices=list(STAGE_FORMATS), help="sft: Stage 1; redi/dpo/simpo/weighted: Stage 2")
    add("--model", help="Hugging Face checkpoint directory to start from (and DPO's reference)")
    add("--data", help="JSONL: messages (sft), prompt/chosen/rejected (redi, dpo, simpo), "
                       "prompt/completions/rewards (weighted)")
    add("--out", help="output directory: OUT/step-N checkpoints, the final model in OUT itself")
    add("--lr", type=checked(float, lambda x: 0 < x <= torch.finfo(torch.float32).max, "a number > 0 that fp32 "
                             "holds"), help=f"peak learning rate ({per_stage('lr')})")
    add("--epochs", type=COUNT, help=f"passes over the data ({per_stage('epochs')})")
    add("--max-steps", type=COUNT, help="stop after this many optimizer steps (shortens the schedule)")
    add("--batch-size", type=COUNT, help="global batch per optimizer step: sequences (sft), pairs, prompts "
                                         f"(weighted) ({per_stage('batch_size')})")
    add("--micro-batch-size", type=COUNT, default=1, help="examples per forward pass per rank, in one padding-free row")
    add("--max-length", type=checked(int, lambda n: n >= 2, "an integer >= 2"),
        help="drop (never truncate) examples longer than this many tokens (default: keep all)")
    add("--template", choices=sorted(data.TEMPLATES), default="qwen", help="chat template of the data")
    add("--alpha", type=NON_NEGATIVE, default=0.8, help="redi: weight α of the negative trace (1: symmetric)")
    add("--beta", type=POSITIVE, help=f"dpo, simpo: β ({per_stage('beta')})")
    add("--gamma", type=FINITE, default=1.0, help="simpo: target reward margin γ")
    add("--warmup-ratio", type=checked(float, lambda x: 0 <= x < 1, "in [0, 1)"), default=0.1,
        help="fraction of steps of linear warmup")
    add("--weight-decay", type=NON_NEGATIVE, default=1e-4, help="AdamW weight decay (not on biases, norms)")
    add("--grad-clip", type=NON_NEGATIVE, default=1.0, help="max global gradient norm (0: no clipping)")
    add("--seed", type=common.SEED64, default=42, help="seeds the data order (and torch); the paper's 42")
    add("--save-every", type=checked(int, lambda n: n >= 0, "an integer >= 0"), default=0,
        help="write OUT/step-N every this many steps (0: never)")
    add("--resume", help="continue exactly from a checkpoint OUT/step-N, or from OUT (its newest whole step-N)")
    add("--save-total-limit", type=COUNT, help="keep the newest K step-N in OUT, deleting older ones (default: all)")
    add("--grad-checkpointing", action="store_true", help="recompute each block in backward")
    add("--dtype", choices=["bf16", "fp32"], help="compute dtype (default: bf16 on CUDA, fp32 on CPU); "
                                                  "master weights and AdamW state are always fp32")
    add("--save-dtype", choices=["auto", "bf16", "fp32"], default="auto",
        help="the final model's tensors (auto: as --model stores them); step-N checkpoints keep fp32")
    add("--rope-theta", type=POSITIVE, help="override the checkpoint's rope_theta (the paper: 300000)")
    add("--max-position-embeddings", type=COUNT, help="override the checkpoint's (the paper: 32768)")
    add("--compile", action="store_true", help="torch.compile every transformer block")
    add("--fsdp", action="store_true", help="shard weights, gradients and AdamW state over ranks (FSDP2)")
    add("--peak-flops", type=POSITIVE, help="peak bf16 FLOP/s of one device, for MFU (default: by GPU name)")
    add("--ref-cache", help="dpo: file caching the reference log-probs (default: one file per model and settings "
                            "in the token cache directory)")
    add("--token-cache", help="directory of the tokenised data, built once, mapped by every run (default: DATA.tokens)")
    add("--preempt-grace", type=NON_NEGATIVE, default=25, help="on SIGTERM, seconds to save step-N and exit 143")
    add("--dist-timeout", type=common.MINUTES, default=10, help="minutes a collective waits for a silent rank")
    add("--report-to", choices=list(common.REPORT_TO), default="none", help="also send metrics.jsonl to "
        "TensorBoard (OUT/tensorboard) or Weights & Biases, from rank 0; the package must be installed")
    add("--eval-steps", type=COUNT, help="every this many steps, evaluate on --eval-data (pass@1 etc. logged as "
                                         "eval/...; off by default); not with --fsdp")
    add("--eval-data", help="problems JSONL for --eval-steps, as evaluate.py reads (problem, answer)")
    add("--eval-samples", type=COUNT, default=4, help="samples per problem at T 0.6, top-p 0.95 (the paper's "
                                                      "intermediate evaluations: 4)")
    add("--eval-max-new-tokens", type=COUNT, default=2048, help="new tokens per evaluation sample at most")
    add("--eval-limit", type=COUNT, help="evaluate only the first K problems of --eval-data (default: all)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Flags over an optional --config file, then the stage's defaults, then the checks between flags."""
    parser = build_parser()
    config_path = parser.parse_known_args(argv)[0].config
    if config_path:
        parser.set_defaults(**common.config_defaults(build_parser, config_path))
    args = parser.parse_args(argv)
    missing = ["--" + flag for flag in ("stage", "model", "data", "out") if getattr(args, flag) is None]
    if missing:
        raise InputError(f"missing {', '.join(missing)} (give them on the command line or in --config)")
    for key, value in STAGE_DEFAULTS[args.stage].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.dtype = args.dtype or ("bf16" if torch.cuda.is_available() else "fp32")
    # bf16 autocast on CPU is slow and not what a CPU run is for (tests, laptops); refuse rather than surprise.
    if args.dtype == "bf16" and not torch.cuda.is_available():
        raise InputError("--dtype bf16 needs a CUDA GPU; on CPU train with --dtype fp32")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch_size % (world * args.micro_batch_size):
        raise InputError(f"--batch-size {args.batch_size} must be a multiple of world size ({world}) x "
                         f"--micro-batch-size ({args.micro_batch_size}) = {world * args.micro_batch_size}, so "
                         "that every rank runs the same full micro-batches; change either")
    if bool(args.eval_steps) != bool(args.eval_data):
        raise InputError("--eval-steps and --eval-data go together: give both to evaluate during training, "
                         "or neither")
    if args.eval_steps and args.fsdp:  # FSDP's per-block all-gathers would need every rank to decode in step
        raise InputError("--eval-steps does not work with --fsdp; evaluate the saved step-N checkpoints with "
                         "evaluate.py instead")
    return args


def check_inputs(args):
    """What the flags name, checked before any compute or write (cheap: the data's first row, the
    tokenizer). Returns the tokenizer."""
    common.regular_file(args.data, "--data", "train.py reads it more than once (its format, its rows, its "
                        "sha256 for --resume)")
    args.resume = args.resume and find_resume_checkpoint(args.resume)  # OUT: its newest whole step-N
    for flag, path in (("--model", args.model), ("--resume", args.resume)):
        if path and not os.path.isfile(os.path.join(path, "config.json")):
            raise InputError(f"{flag} {path}: " + ("no config.json" if os.path.isdir(path) else "not a directory")
                             + "; pass a Hugging Face checkpoint directory")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise InputError(f"--out {args.out}: is a file; pass a directory")
    found, needed = data.detect_format(args.data), STAGE_FORMATS[args.stage]
    if found != needed:
        raise InputError(f"--data {args.data} holds {FORMAT_NAMES[found]} rows, but --stage {args.stage} needs "
                         f"{FORMAT_NAMES[needed]} rows: {data.FORMATS[needed]} (this file suits --stage "
                         + " / ".join(s for s, f in STAGE_FORMATS.items() if f == found) + ")")
    tokenizer = data.load_tokenizer(args.model)  # checked to fit the model's embedding
    data.check_template_tokens(tokenizer, args.template)  # its error names --template
    # What only the saves read, checked now: the generation config; and a resumed step-N's tokenizer files,
    # so that a damaged checkpoint directory is refused before step 1 (the saves copy --model's).
    data.generation_config(args.model, tokenizer, args.template)
    if args.resume:
        data.load_tokenizer(args.resume)
    common.check_tracker(args.report_to)
    make_eval_set(args, tokenizer, 0, 1)  # the problems and their prompts, checked before any work
    return tokenizer


# ----------------------------------------------------------------------------------------------------------
# 2. Data


class PerItem:
    """dataset.loss_tokens[i], dataset.doc_lengths[i]: a per-item value read from the numpy tables as plain
    Python (ints for sums and JSON), computed when asked, never held per item."""

    def __init__(self, get):
        self.get = get

    def __getitem__(self, i: int):
        return self.get(i)


@dataclass
class Dataset:
    """The tokenised training set: the token cache mapped read-only (data.TokenCache: ids stay in the file,
    shared by the ranks through the page cache) and small per-item tables. Every rank sees the whole set,
    so global counts need no communication. An item is an sft example, a (chosen, rejected) pair or a group."""

    stage: str
    cache: data.TokenCache
    key: dict  # the token cache's key (data.token_cache_key): sha256 of --data and the tokenizer, settings
    ref_logps: torch.Tensor | None = None  # dpo: [num_pairs, 2] reference logπ(chosen), logπ(rejected)

    def __post_init__(self):
        c = self.cache
        self.sequence_lengths = np.diff(c.offsets)
        self.sequences_per_item = np.diff(c.item_offsets)
        # pack() sets a target at t when token t+1 is a loss token, so a sequence's loss tokens are
        # loss_mask[1:]: all but its first max(prompt, 1) tokens.
        seq_loss = self.sequence_lengths - np.maximum(c.prompt_lengths, 1)
        self.item_loss_tokens = np.add.reduceat(seq_loss, c.item_offsets[:-1]) if len(c) else seq_loss[:0]
        self.loss_tokens = PerItem(lambda i: int(self.item_loss_tokens[i]))
        self.doc_lengths = PerItem(lambda i: self.sequence_lengths[c.item_offsets[i]:c.item_offsets[i + 1]].tolist())

    def __len__(self):
        return len(self.cache)

    def count(self, indices: list[int]) -> int:
        """What a loss averages over, apart from sft's tokens: pairs, completions (weighted) or sequences."""
        return int(self.sequences_per_item[indices].sum()) if self.stage == "weighted" else len(indices)

    def normalizer(self, indices: list[int]) -> int:
        """N of the loss Σ_i ℓ_i / N over a global batch: loss tokens (sft), pairs or completions. Every rank
        knows the whole global batch, so it computes N itself, without an all-reduce."""
        return int(self.item_loss_tokens[indices].sum()) if self.stage == "sft" else self.count(indices)


def token_cache_root(args) -> str:
    """--token-cache, or beside the data: DATA.tokens/ (one subdirectory per key; DPO's reference tables too)."""
    return args.token_cache or args.data + ".tokens"


def load_dataset(args, tokenizer, d: common.Dist) -> Dataset:
    """The token cache of (--data, tokenizer, --template, --max-length): rank 0 finds it or builds it
    (data.ensure_token_cache: every core encodes) while the other ranks wait, then every rank maps it.
    Over-long examples are dropped and counted at build (never truncated); the counts are printed each run."""
    fmt, start, found = STAGE_FORMATS[args.stage], time.perf_counter(), [None]
    tokenizer_file = os.path.join(args.model, "tokenizer.json")  # what data.load_tokenizer read
    on_main_rank(d, f"tokenizing {args.data}", lambda: found.__setitem__(0, data.ensure_token_cache(
        token_cache_root(args), args.data, tokenizer, tokenizer_file, fmt, args.template, args.max_length)))
    if d.world_size > 1:
        torch.distributed.broadcast_object_list(found, src=0)
    path, key, built = found[0]
    cache = data.open_token_cache(path, key)
    print0(f"data: {args.data}: " + ", ".join(f"{k} {v}" for k, v in cache.report.items()) + f" (token cache "
           f"{path}: {'built' if built else 'mapped'} in {time.perf_counter() - start:.1f} s)")
    if not len(cache):
        raise InputError(f"--data {args.data}: no examples left after dropping those longer than --max-length "
                         f"{args.max_length}; raise --max-length")
    return Dataset(args.stage, cache, key)


def pack_items(dataset: Dataset, indices: list[int], device) -> dict:
    """One padding-free row holding every sequence of these items (chosen and rejected, or a group's
    completions, side by side) and what the loss needs, on the device: pinned memory and non_blocking
    copies on CUDA, so that the host never waits for the GPU here. Only these items' ids are read from the
    map; weighted: each group's advantages from its whole group's rewards (never split across ranks)."""
    fmt = STAGE_FORMATS[dataset.stage]
    items = [dataset.cache.item(fmt, i) for i in indices]
    batch = data.pack(items) if fmt == "sft" else data.pack_pairs(items) if fmt == "pairs" else data.pack_groups(items)
    batch["item_index"] = torch.tensor(indices)
    if fmt == "groups":
        batch["weights"] = torch.cat([losses.group_advantages(torch.tensor(r), len(r)) for _, r in items])
    cuda = device.type == "cuda"
    return {k: (v.pin_memory() if cuda else v).to(device, non_blocking=cuda) if torch.is_tensor(v) else v
            for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------------------
# 3. Model and optimizer


def load_model(args, d: common.Dist) -> Qwen2:
    """fp32 master weights, with --rope-theta / --max-position-embeddings set in the config (the forward reads
    them; every saved config.json carries them). FSDP loads on the CPU; fully_shard moves each shard."""
    overrides = {k: getattr(args, k) for k in ("rope_theta", "max_position_embeddings") if getattr(args, k)}
    try:
        return Qwen2.from_pretrained(args.resume or args.model, torch.float32, "cpu" if args.fsdp else d.device,
                                     **overrides)
    except CheckpointError as e:
        if not args.resume:
            raise
        raise common.damaged_checkpoint(args.resume, str(e)) from None


def save_dtype(args) -> torch.dtype:
    """--save-dtype; auto: the dtype --model's config.json declares (bf16 for Qwen2.5-Math and the paper's
    outputs; a resumed step-N stores fp32), so that a bf16 model stays bf16 for vLLM and dtype="auto"."""
    return DTYPES.get(args.save_dtype) or Qwen2Config.from_json(os.path.join(args.model, "config.json")).stored_dtype


def wrap_model(model: Qwen2, args, d: common.Dist) -> nn.Module:
    """Compile (per block: identical blocks share compiled code), then DDP or FSDP2 around the whole
    log-prob computation. The bare `model` stays what we save: never a compiled or wrapped one."""
    model.train()
    model.gradient_checkpointing = args.grad_checkpointing
    if args.compile:
        for block in model.layers:
            block.compile()  # in place: parameter names, and so checkpoints, are unchanged
    module = losses.SequenceLogps(model)
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard  # imported here: ~1 s that --help and CLI errors skip

        for block in model.layers:  # each block's weights are gathered just for its own forward and backward
            fully_shard(block)
        return fully_shard(module)  # the rest: embedding (= output projection when tied) and final norm
    if d.world_size > 1:
        return nn.parallel.DistributedDataParallel(module, device_ids=[d.local_rank] if d.device.type == "cuda"
                                                   else None)
    return module


def build_optimizer(module: nn.Module, args, d: common.Dist) -> torch.optim.AdamW:
    """AdamW(0.9, 0.999, eps 1e-8) on the fp32 weights (appendix C.3); weight decay on matrices only, not on
    biases and norm gains, as the Hugging Face Trainer does. On CUDA the fused kernel: the same update in
    one launch for all parameters instead of several per tensor."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, fused=d.device.type == "cuda")


# ----------------------------------------------------------------------------------------------------------
# 4. The training step


def warmup_steps_for(total_steps: int, warmup_ratio: float) -> int:
    return math.ceil(warmup_ratio * total_steps)


def learning_rate(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """lr of the update made at step s = 0 .. total-1 (s updates done before it):
        s < W:   peak * (s + 1) / W            linear warmup, reaching the peak at the W-th update;
        s >= W:  peak * (total - s) / (total - W)   linear decay, reaching 0 just after the last update.
    No update is wasted at lr 0 at either end. A pure function of the step, so resuming needs no state."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    return peak_lr * (total_steps - step) / (total_steps - warmup_steps)


def stage_loss(args, dataset: Dataset, batch: dict, sum_logps, lengths, normalizer: int):
    """This micro-batch's part Σ_{i in micro-batch} ℓ_i / N of the global-batch loss, and its metrics (means
    over this micro-batch's items, TRL's names), from losses.py."""
    if args.stage == "sft":  # nll/token is the logged loss itself, num_tokens the logged loss_tokens
        loss, metrics = losses.sft_loss(sum_logps, lengths, normalizer=normalizer)
        return loss, {"logps/chosen": metrics["logps/chosen"]}
    if args.stage == "weighted":
        return losses.weighted_nll_loss(sum_logps, lengths, batch["weights"], normalizer=normalizer)
    c, r = batch["chosen_index"], batch["rejected_index"]
    if args.stage == "redi":
        return losses.redi_loss(sum_logps[c], sum_logps[r], lengths[c], lengths[r], alpha=args.alpha,
                                normalizer=normalizer)
    if args.stage == "simpo":
        return losses.simpo_loss(sum_logps[c], sum_logps[r], lengths[c], lengths[r], beta=args.beta,
                                 gamma=args.gamma, normalizer=normalizer)
    ref = dataset.ref_logps[batch["item_index"]]
    return losses.dpo_loss(sum_logps[c], sum_logps[r], ref[:, 0], ref[:, 1], beta=args.beta, normalizer=normalizer)


def train_step(run, batch_indices: list[int]):
    """Forward and backward of one global batch; gradients end summed over ranks, i.e. ∇ Σ_i ℓ_i / N.

    An empty micro-batch (this rank's share of a short last batch ran out) runs the batch's first item with
    weight 0, so that it still takes part in the collectives. DDP all-reduces gradients once, in the last
    micro-step's backward (no_sync before; FSDP reduce-scatters each micro-step, never holding a whole
    gradient). Returns the global loss and metric means as one reduced tensor [1 + M] and the metric names:
    nothing here waits for the GPU (no .item()), and there is one all-reduce per step."""
    args, dataset, d = run.args, run.dataset, run.d
    normalizer = dataset.normalizer(batch_indices)
    micro = data.rank_micro_batches(batch_indices, d.rank, d.world_size, args.micro_batch_size)
    ddp = isinstance(run.logps_model, nn.parallel.DistributedDataParallel)
    stats = 0.0
    for m, indices in enumerate(micro):
        weight = 1.0 if indices else 0.0
        batch = pack_items(dataset, indices or batch_indices[:1], d.device)
        with run.logps_model.no_sync() if ddp and m < len(micro) - 1 else contextlib.nullcontext():
            with run.autocast():
                sum_logps, lengths = run.logps_model(batch)
            loss, metrics = stage_loss(args, dataset, batch, sum_logps, lengths, normalizer)
            # DDP and FSDP average gradients over ranks; × world_size turns that average back into the sum.
            (loss * (weight * d.world_size)).backward()
        count = weight * dataset.count(indices)
        stats = stats + torch.cat([loss.detach().float().view(1) * weight,
                                   torch.stack([v.float() for v in metrics.values()]) * count])
    all_reduce_sum(stats, d)
    stats[1:] /= max(dataset.count(batch_indices), 1)
    return stats, list(metrics)


# ----------------------------------------------------------------------------------------------------------
# 5. DPO reference log-probs


@torch.no_grad()
def compute_ref_logps(run) -> torch.Tensor:
    """logπ_ref(chosen), logπ_ref(rejected) of every pair under the starting weights, with the training
    forward itself (packed rows, same dtype), so that at step 0 policy and reference agree to rounding.
    Pairs are spread over ranks; each fills its rows and a sum all-reduce assembles the table."""
    print0(f"dpo: computing reference log-probs of {len(run.dataset)} pairs with {run.args.model}")
    table = torch.zeros(len(run.dataset), 2, device=run.d.device)
    for indices in data.rank_micro_batches(list(range(len(run.dataset))), run.d.rank, run.d.world_size,
                                               run.args.micro_batch_size):
        batch = pack_items(run.dataset, indices or [0], run.d.device)
        with run.autocast():
            sum_logps, _ = run.logps_model(batch)
        if indices:  # an empty micro-batch only keeps FSDP's collectives in step
            table[batch["item_index"]] = torch.stack([sum_logps[batch["chosen_index"]],
                                                      sum_logps[batch["rejected_index"]]], 1).float()
    return all_reduce_sum(table, run.d)


def reference_logps(run) -> torch.Tensor:
    """The table from its cache when the cache's fingerprint (sha256 of the model's, the data's and the
    tokenizer's files, and every setting that changes the reference's forward) matches; else computed and
    cached. A resume never recomputes (its weights are no longer the reference's): a missing, damaged or
    stale cache is an error there."""
    args = run.args
    fingerprint = json.dumps(dict(run.fingerprints, tokenizer=run.dataset.key["tokenizer_sha256"],
                                  template=args.template, max_length=args.max_length, dtype=args.dtype,
                                  rope_theta=args.rope_theta, max_position_embeddings=args.max_position_embeddings,
                                  num_pairs=len(run.dataset)), sort_keys=True)
    refuse = ("they cannot be recomputed from a resumed model (--resume); restore that file (or pass it with "
              "--ref-cache), or start the run again") if args.resume else None
    return common.cached_tensor(ref_cache_path(args, fingerprint), "ref_logps", fingerprint, (len(run.dataset), 2),
                                run.d, lambda: compute_ref_logps(run), "reference log-probs", refuse)


def ref_cache_path(args, fingerprint: str) -> str:
    """--ref-cache, or one file per fingerprint in the token cache directory: a run from another --model or
    with other settings writes its own table and never overwrites one that another run resumes from."""
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
    return args.ref_cache or os.path.join(token_cache_root(args), f"ref_logps-{digest}.safetensors")


# ----------------------------------------------------------------------------------------------------------
# 6. Checkpoints
#
# OUT/step-N = a Hugging Face directory of fp32 weights + optimizer/adamw.safetensors (AdamW's per-parameter tensors,
# flat names state.FQN.KEY, e.g. state.model.embed.weight.exp_avg) + trainer_state.json (step, flags,
# fingerprints). No pickle anywhere on the resume path, and no rank ever holds the whole AdamW state in its own
# memory on resume: each maps the file and copies its part, one tensor at a time (load_optimizer_state).


class CheckpointWriteError(InputError):
    """A save that does not fit (a full disk, a quota, the file-size limit): nothing was lost, and the cure is
    the user's (make room), so the CLI says it in one line, exit 2."""


def full_model_for_saving(run) -> Qwen2 | None:
    """On rank 0, a Qwen2 holding the full weights; None elsewhere. With DDP that is the bare model itself;
    with FSDP every rank takes part in gathering the shards, which land on rank 0's CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not run.args.fsdp:
        return run.model if run.d.is_main else None
    state = get_model_state_dict(run.logps_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not run.d.is_main:
        return None
    with torch.device("meta"):
        full = Qwen2(run.model.config)
    full.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, strict=True, assign=True)
    full.source_dir = run.model.source_dir
    return full


def optimizer_tensors(run) -> dict[str, torch.Tensor] | None:
    """AdamW's state, whole (FSDP's shards gathered: a collective), on rank 0's CPU as {state.FQN.KEY: tensor},
    FQN as get_optimizer_state_dict names a parameter (model.layers.0.attn.q.weight); None on other ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state = get_optimizer_state_dict(run.logps_model, run.optimizer, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))  # empty on ranks other than 0
    return {f"state.{fqn}.{key}": value.contiguous() for fqn, values in state["state"].items()
            for key, value in values.items()} if run.d.is_main else None


def save_checkpoint(run, step: int, final: bool) -> None:
    """step-N: fp32 weights, optimizer/adamw.safetensors and trainer_state.json, written to OUT/.tmp-step-N and
    renamed when whole (a directory rename is atomic, and fails rather than overwrite); only then are the
    step-N beyond the newest --save-total-limit deleted. final: only what inference needs, in --save-dtype,
    written to OUT/.tmp-final, then renamed file by file into OUT with config.json last, so OUT holds a loadable
    model only once it is whole. Non-finite weights are never saved; a save that would not fit is refused
    before writing, one that runs out of room while writing is removed (write_checkpoint)."""
    args, d, name = run.args, run.d, "final" if final else f"step-{step}"
    local = [p.to_local() if hasattr(p, "to_local") else p for p in run.logps_model.parameters()]  # FSDP shards
    if all_reduce_sum(torch.stack([(~p.detach().isfinite()).any() for p in local]).sum().float(), d).item():
        raise NonFiniteLossError(f"step {step}: the weights are no longer finite; {name} not saved, "
                                 f"{common.last_good(args.out, step)}; try a lower --lr")
    full = full_model_for_saving(run)  # a collective under FSDP, as is optimizer_tensors
    optimizer = None if final else optimizer_tensors(run)
    on_main_rank(d, f"saving {name}", lambda: write_checkpoint(run, full, optimizer, step, name))
    print0(f"saved {args.out if final else os.path.join(args.out, name)}")


def write_checkpoint(run, full: Qwen2, optimizer: dict | None, step: int, name: str) -> None:
    """Rank 0's part of save_checkpoint: check the room, write OUT/.tmp-NAME, publish it. Out of room (a full
    disk, a quota, ulimit -f): OUT/.tmp-NAME is removed and a CheckpointWriteError names the file, the room
    needed and the checkpoint to go on from; every earlier checkpoint is untouched."""
    args, tmp, final = run.args, os.path.join(run.args.out, f".tmp-{name}"), optimizer is None
    weights = sum(p.numel() for p in full.parameters()) * (run.save_dtype if final else torch.float32).itemsize
    shards = math.ceil(weights / (5 * 2**30))  # save_pretrained's files of at most 5 GiB (sizes approximate)
    sizes = {"model.safetensors" if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors":
             weights // shards for i in range(shards)}
    sizes.update({} if final else {OPTIMIZER_STATE: sum(t.nbytes for t in optimizer.values())})
    fix = (f"{common.last_good(args.out, step)}; make room (or raise ulimit -f), then "
           + (f"continue with --resume {args.out}" if common.checkpoints_up_to(args.out, step) else "run again"))
    if why := common.check_room(args.out, sizes):
        raise CheckpointWriteError(f"cannot save {name} into {args.out}: {why}; nothing was written; {fix}")
    writing = "model.safetensors" if shards == 1 else "model-*.safetensors"
    try:  # no OUT/.tmp-* is left from an earlier run: prepare_run_dir removed them
        full.save_pretrained(tmp, generation_config=run.gen_config, dtype=run.save_dtype if final else None,
                             eos_token=data.get_template(args.template).end_of_turn)
        if final:
            return common.move_files_into(tmp, args.out, last="config.json")
        from safetensors.torch import save_file
        writing = OPTIMIZER_STATE
        os.makedirs(os.path.dirname(os.path.join(tmp, OPTIMIZER_STATE)))
        save_file(optimizer, os.path.join(tmp, OPTIMIZER_STATE))
        writing = TRAINER_STATE
        common.write_json(os.path.join(tmp, TRAINER_STATE), dict(
            step=step, epoch=step // run.steps_per_epoch, total_steps=run.total_steps, args=vars(args),
            fingerprints=run.fingerprints))
        os.rename(tmp, os.path.join(args.out, name))
    except Exception as e:
        if (why := common.out_of_room(e)) is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(
            f"saving {name} failed writing {os.path.join(tmp, writing)}: {why} ({e}); the checkpoint needs "
            f"{common.format_bytes(sum(sizes.values()))}, {common.format_bytes(shutil.disk_usage(args.out).free)} "
            f"are free in {args.out}; {tmp} was removed, nothing was lost: {fix}") from None
    for path in common.remove_old_checkpoints(args.out, args.save_total_limit) if args.save_total_limit else []:
        print(f"removed {path} (--save-total-limit {args.save_total_limit})", flush=True)


# Flags that must not change on resume: they fix the data order, the schedule, the objective or the model.
RESUME_MUST_MATCH = ("stage", "batch_size", "epochs", "max_steps", "seed", "lr", "warmup_ratio", "weight_decay",
                     "grad_clip", "template", "max_length", "alpha", "beta", "gamma", "rope_theta",
                     "max_position_embeddings")


def checkpoint_problem(path) -> str | None:
    """What keeps PATH from being a whole step-N checkpoint (a file missing, cut short or not JSON), or None.
    Cheap: safetensors checks on opening that its header covers the file exactly, and reads nothing else."""
    from safetensors import safe_open

    legacy = not os.path.isfile(os.path.join(path, TRAINER_STATE)) and os.path.isfile(
        os.path.join(path, LEGACY_TRAINER_STATE))
    needed = ["config.json", TRAINER_STATE, OPTIMIZER_STATE] if not legacy else ["config.json", LEGACY_TRAINER_STATE]
    if missing := [f for f in needed if not os.path.isfile(os.path.join(path, f))]:
        return "no " + ", ".join(missing)
    try:
        files = checkpoint_files(path) + ([] if legacy else [os.path.join(path, OPTIMIZER_STATE)])
        if not legacy:
            with open(os.path.join(path, TRAINER_STATE), encoding="utf-8") as f:
                json.load(f)
    except (CheckpointError, ValueError) as e:
        return str(e)
    for file in files:
        try:
            with safe_open(file, framework="pt"):
                pass
        except Exception as e:  # missing, truncated, garbage: safetensors' own error types
            return f"{os.path.basename(file)} is missing or cut short ({str(e)[:100]})"
    return None


def find_resume_checkpoint(path) -> str:
    """--resume PATH: a checkpoint OUT/step-N itself, or a run directory OUT, whose newest *whole* step-N is
    taken (each newer one skipped says why; a .tmp-step-N, an interrupted save, is never a candidate). A finished
    run's OUT has nothing to continue: the error says how to train on from its final model."""
    if not os.path.isdir(path) or any(os.path.isfile(os.path.join(path, f))
                                      for f in (TRAINER_STATE, LEGACY_TRAINER_STATE)):
        return path  # a checkpoint; or not a directory, which check_inputs reports
    if os.path.isfile(os.path.join(path, METRICS_FILE)) and os.path.isfile(os.path.join(path, "config.json")):
        raise InputError(f"--resume {path}: is the final model of a finished run; nothing to continue. To train "
                         f"it further, start a new stage from it: --model {path} --out NEW_OUT (a warmup and decay "
                         "of its own, fresh AdamW state)")
    steps = sorted(common.numbered_dirs(path, "step-").items(), reverse=True)
    for _, step_dir in steps:
        if (problem := checkpoint_problem(step_dir)) is None:
            print0(f"resume: {step_dir}, the newest whole checkpoint in {path}")
            return step_dir
        print0(f"resume: skipping {step_dir}: {problem} (to resume into {path} itself, move it away first)")
    if os.path.basename(os.path.normpath(path)).removeprefix("step-").isdigit():  # a step-N without its state
        raise common.damaged_checkpoint(path, f"no {TRAINER_STATE}")
    raise InputError(f"--resume {path}: " + ("holds no whole checkpoint step-N" if steps else f"no {TRAINER_STATE}")
                     + "; pass a checkpoint written by train.py, OUT/step-N, or the run directory OUT holding "
                     "them, or start a new --out")


def read_trainer_state(path) -> dict:
    """PATH/trainer_state.json (plain JSON), after opening PATH/optimizer/adamw.safetensors to check it is whole (its
    header only). A checkpoint of the earlier format holds trainer_state.pt instead, one dict with the whole
    optimizer state: read with weights_only=True (tensors and plain containers, never arbitrary pickles), its
    state flattened to this format's names ("optimizer": {state.FQN.KEY: tensor})."""
    from safetensors import safe_open

    file = os.path.join(path, TRAINER_STATE)
    legacy = not os.path.exists(file) and os.path.exists(os.path.join(path, LEGACY_TRAINER_STATE))
    try:
        if legacy:
            file = os.path.join(path, LEGACY_TRAINER_STATE)
            saved = torch.load(file, map_location="cpu", weights_only=True)
            saved["optimizer"] = {f"state.{fqn}.{key}": value for fqn, values in saved["optimizer"]["state"].items()
                                  for key, value in values.items()}
            return saved
        with open(file, encoding="utf-8") as f:
            saved = json.load(f)
        file = os.path.join(path, OPTIMIZER_STATE)
        with safe_open(file, framework="pt"):
            return saved
    except Exception as e:  # missing, truncated, garbage, a foreign pickle: each its own exception type
        what = f"{file} is " + (f"damaged ({type(e).__name__}: {str(e)[:200]})" if os.path.exists(file) else "missing")
        raise common.damaged_checkpoint(path, what) from None


def read_resume_state(args, fingerprints: dict) -> dict:
    """--resume's trainer state, checked to be the run this one continues: the same RESUME_MUST_MATCH flags,
    and --data and --model with the same contents."""
    saved = read_trainer_state(args.resume)
    for key in RESUME_MUST_MATCH:
        if saved["args"].get(key) != getattr(args, key):
            schedule = key in ("epochs", "max_steps")
            raise InputError(
                f"--resume {args.resume}: it was trained with --{key.replace('_', '-')} {saved['args'].get(key)} "
                f"but this run has {getattr(args, key)}; continuing exactly needs the same value" + (
                    ". Another length is not a continuation: the learning rate warms up and decays linearly over "
                    "the run's total steps, so another total would change the rate of every step already taken. "
                    "Finish this run with its own settings, then train further as a new stage from its final "
                    f"model: --model {os.path.dirname(os.path.normpath(args.resume))} --out NEW_OUT (a warmup and "
                    "decay of its own, fresh AdamW state)" if schedule else ""))
    for key in ("data", "model"):
        if saved.get("fingerprints", {}).get(key) != fingerprints[key]:
            raise InputError(f"--resume {args.resume}: --{key} {getattr(args, key)} is not what that run "
                             "started from (its sha256 differs); pass the same one, or start a new run")
    return saved


def load_optimizer_state(run, saved: dict) -> None:
    """AdamW's state from the checkpoint into run.optimizer, one tensor at a time, each rank its own part:
    under DDP the whole tensor, under FSDP only its shard's rows (safetensors' get_slice reads just those).
    The file is memory-mapped, so the ranks of a node share its pages in the page cache, and no rank holds a
    second copy of the whole state (torch.load of one pickled dict gave every rank one: 8 bytes a parameter).
    Values are copied bit for bit: the continuation is exact."""
    from safetensors import safe_open

    if "optimizer" in saved:  # the earlier format, already read whole
        tensors = saved["optimizer"]
        return fill_optimizer_state(run, list(tensors), lambda name, rows: tensors[name][rows])
    with safe_open(os.path.join(run.args.resume, OPTIMIZER_STATE), framework="pt") as f:
        fill_optimizer_state(run, list(f.keys()), lambda name, rows: f.get_slice(name)[rows])


def shard_rows(p) -> slice:
    """The rows of parameter p that this rank holds: all, or under FSDP2 (a DTensor sharded on dim 0 over a
    1-D mesh, split as torch.chunk splits: ceil(n / world) rows per rank, the last ranks fewer or none) its own."""
    if not hasattr(p, "to_local"):
        return slice(None)
    n, world, rank = p.shape[0], p.device_mesh.size(), p.device_mesh.get_local_rank()
    per_rank = -(-n // world)
    rows = slice(min(rank * per_rank, n), min((rank + 1) * per_rank, n))
    if len(p.placements) != 1 or not p.placements[0].is_shard(0) or p.to_local().shape[0] != rows.stop - rows.start:
        raise RuntimeError(f"unexpected sharding {p.placements}: local {tuple(p.to_local().shape)} of {tuple(p.shape)}")
    return rows


def fill_optimizer_state(run, names: list[str], read) -> None:
    """run.optimizer.state[p] for every parameter, from read(state.FQN.KEY, rows): the step counter as AdamW
    keeps it (on the CPU, or on the parameter's device for the fused kernel), every other tensor shaped like
    p's local part. Every parameter must have its state and every saved state its parameter."""
    saved = {}
    for name in names:  # state.FQN.KEY: the FQN holds dots, the key (step, exp_avg, exp_avg_sq) none
        fqn, key = name.removeprefix("state.").rsplit(".", 1)
        saved.setdefault(fqn, []).append(key)
    fqns = {p: "model." + n for n, p in run.model.named_parameters()}  # as get_optimizer_state_dict names them

    def mismatch(what: str) -> InputError:
        return common.damaged_checkpoint(run.args.resume, f"{OPTIMIZER_STATE} {what}")
    for group in run.optimizer.param_groups:
        for p in group["params"]:
            keys = saved.pop(fqns[p], None)
            if not keys:
                raise mismatch(f"holds no state for {fqns[p]}")
            state = {}
            for key in keys:
                name = f"state.{fqns[p]}.{key}"
                if key == "step":
                    state[key] = read(name, ...).to(p.device if group["fused"] or group["capturable"] else "cpu")
                    continue
                state[key] = torch.zeros_like(p)  # a DTensor like p under FSDP
                local = state[key].to_local() if hasattr(p, "to_local") else state[key]
                value = read(name, shard_rows(p))
                if value.shape != local.shape:
                    raise mismatch(f"{name} has shape {tuple(value.shape)}, this model's {tuple(local.shape)}")
                local.copy_(value)
            run.optimizer.state[p] = state
    if saved:
        raise mismatch(f"holds state for parameters this model does not have: {', '.join(sorted(saved)[:5])}")


# ----------------------------------------------------------------------------------------------------------
# 7. Main: setup, then the loop


@dataclass
class Run:
    """Everything the loop needs, made once by setup()."""
    args: argparse.Namespace
    d: common.Dist
    dataset: Dataset
    model: Qwen2  # the bare model: what is saved
    logps_model: nn.Module  # the wrapped one (DDP/FSDP around SequenceLogps): what is trained
    optimizer: torch.optim.Optimizer
    fingerprints: dict  # sha256 of --data and of --model's weight files
    gen_config: dict  # every checkpoint's generation_config.json
    save_dtype: torch.dtype  # the final model's
    start_step: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    peak_flops: float | None

    def autocast(self):
        """bf16 matmuls (fp32 accumulation) on CUDA with --dtype bf16; weights and AdamW state stay fp32."""
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.args.dtype == "bf16" else contextlib.nullcontext()


def setup(args, d: common.Dist, tokenizer) -> Run:
    """Data, fingerprints and resume checks, OUT, model, optimizer, DPO reference: all before step 1."""
    torch.manual_seed(args.seed)
    if d.device.type == "cuda":  # any fp32 matmul left outside bf16 autocast runs on tensor cores (TF32)
        torch.set_float32_matmul_precision("high")
    dataset = load_dataset(args, tokenizer, d)
    fingerprints = {"data": dataset.key["data_sha256"],  # hashed once, by the token cache's key
                    "model": common.sha256_files(checkpoint_files(args.model))}
    saved = read_resume_state(args, fingerprints) if args.resume else None
    start_step = saved["step"] if saved else 0
    on_main_rank(d, f"preparing {args.out}",
                 lambda: common.prepare_run_dir(args.out, args.resume, start_step, METRICS_FILE))
    model = load_model(args, d)
    model.source_dir = args.model  # the tokenizer files each save copies: not --resume's, which may be deleted
    logps_model = wrap_model(model, args, d)
    steps_per_epoch = math.ceil(len(dataset) / args.batch_size)
    total_steps = min(steps_per_epoch * args.epochs, args.max_steps or math.inf)
    run = Run(args, d, dataset, model, logps_model, build_optimizer(logps_model, args, d), fingerprints,
              data.generation_config(args.model, tokenizer, args.template), save_dtype(args), start_step,
              steps_per_epoch, total_steps, warmup_steps_for(total_steps, args.warmup_ratio),
              args.peak_flops or common.peak_bf16_flops(d.device))
    print0(f"train: stage {args.stage}, {d.world_size} process(es) on {d.device.type}"
           f"{' with FSDP2' if args.fsdp else ''}, {args.dtype}, {model.num_params():,} parameters, "
           f"{len(dataset)} items, {total_steps} steps ({steps_per_epoch}/epoch), warmup {run.warmup_steps}, "
           f"lr {args.lr}, global batch {args.batch_size}, micro-batch {args.micro_batch_size}")
    if run.peak_flops is None and d.device.type == "cuda":
        print0(f"MFU not reported: unknown peak FLOP/s of {torch.cuda.get_device_name(d.device)!r}; pass --peak-flops")
    if args.stage == "dpo":  # before the optimizer state is restored; a resume finds the first run's cache
        dataset.ref_logps = reference_logps(run)
    if saved:
        load_optimizer_state(run, saved)
        print0(f"resume: continuing from step {start_step} of {total_steps} ({args.resume})")
    return run


@dataclass
class EvalSet:
    """--eval-data as the sampler's requests, made once before step 1 (evaluate.py's prompts and grading)."""
    problems: list  # every problem evaluated, all ranks' (the scores are over these)
    requests: list  # this rank's share: problem i goes to rank i mod world size
    sources: list  # per request: (problem, prompt text), what evaluate.sample_row needs
    tokenizer: object
    stop_ids: list


def make_eval_set(args, tokenizer, rank: int, world_size: int) -> EvalSet | None:
    """The first --eval-limit problems of --eval-data, each --eval-samples times, under the training template;
    None without --eval-steps. Every prompt is encoded and checked here (a bad row names FILE:LINE)."""
    if not args.eval_steps:
        return None
    import evaluate  # verify.py and sympy: imported only when asked

    if not os.path.isfile(args.eval_data):
        raise InputError(f"--eval-data {args.eval_data}: no such file; pass a problems JSONL (problem, answer)")
    problems = data.read_problems(args.eval_data)[:args.eval_limit]
    template = data.TEMPLATES[args.template]
    settings = argparse.Namespace(num_samples=args.eval_samples, data=args.eval_data, max_seq_len=None)
    requests, sources = evaluate.make_requests(settings, problems[rank::world_size], set(), tokenizer, template)
    return EvalSet(problems, requests, sources, tokenizer, template.stop_ids(tokenizer))


def evaluate_during_training(run, eval_set: EvalSet | None, step: int) -> dict:
    """At every --eval-steps-th step, the eval/ scores of the weights after that step on rank 0 ({} elsewhere
    and at other steps). Every rank samples its share of the problems (evaluate.stream_samples, seeded by
    --seed: the same samples whatever the number of ranks) and grades them (evaluate.sample_row); rank 0
    gathers the rows and scores them (evaluate.summarize). The ranks work in parallel and meet once, at the
    gather, so none stalls for a whole evaluation: the fastest waits for the slowest share (keep that within
    the process group's timeout: few problems, short generations). Sampling reads the fp32 master weights (no
    autocast) and no torch random state: training goes on exactly as without it."""
    if eval_set is None or step % run.args.eval_steps:
        return {}
    import evaluate

    args, n = run.args, run.args.eval_samples
    rows = [evaluate.sample_row(*eval_set.sources[done.request], done, eval_set.tokenizer, False)
            for done in evaluate.stream_samples(run.model, eval_set.requests, args.eval_max_new_tokens,
                                               temperature=0.6, top_p=0.95, stop_ids=eval_set.stop_ids,
                                               seed=args.seed)]
    keep = ("id", "sample", "answer", "correct", "num_tokens", "finish_reason")  # not the texts: a small gather
    gathered = common.gather_to_main([{k: r[k] for k in keep} for r in rows], run.d)
    if gathered is None:
        return {}
    summary = evaluate.summarize(eval_set.problems, [r for part in gathered for r in part], n)
    return {f"eval/{k}": summary[k] for k in ("pass@1", "pass@1_stderr", f"maj@{n}", "mean_response_tokens",
                                              "truncated", "no_answer")}


def log_step(run, step: int, batch_indices: list[int], values: list[float], names: list[str], lr: float,
             seconds: float, eta: str, evaluation: dict | None = None, tracker: common.Tracker | None = None) -> None:
    """One metrics.jsonl row (TRL's names, the stage, and evaluate_during_training's eval/ scores when there
    are any), also sent to the --report-to tracker, and one printed line. MFU counts the step's training FLOPs as
        6·N·T + 12·L·H·d·Σ_i n_i²      (T tokens in documents of n_i tokens; L layers, H heads of size d)
    6N per token for the matmuls forward and backward, plus attention scores and values over each document's
    context: PaLM's estimate (appendix B), as nanoGPT's estimate_mfu, not halved for causality."""
    docs = [n for i in batch_indices for n in run.dataset.doc_lengths[i]]
    tokens, loss, norm = sum(docs), values[0], values[-1]
    flops = run.model.training_flops(docs)  # Σ_i n_i · flops_per_token(n_i), flops_per_token(n) = 6N + 12·L·H·d·n
    mfu = flops / seconds / (run.peak_flops * run.d.world_size) if run.peak_flops else None
    record = {"step": step, "epoch": step / run.steps_per_epoch, "loss": loss, "learning_rate": lr, "grad_norm": norm,
              "tokens": tokens, "loss_tokens": sum(run.dataset.loss_tokens[i] for i in batch_indices),
              "tokens_per_s": tokens / seconds, "mfu": mfu, **dict(zip(names, values[1:-1])),
              "stage": run.args.stage, **(evaluation or {})}
    if run.d.is_main:
        with open(os.path.join(run.args.out, METRICS_FILE), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if tracker is not None:
            tracker.log(record)
        print(f"step {step}/{run.total_steps} | epoch {record['epoch']:.2f} | loss {loss:.4f} | lr {lr:.2e} | "
              f"grad {norm:.3f} | {tokens / seconds:,.0f} tok/s" + (f" | mfu {mfu:.1%}" if mfu is not None else "")
              + (f" | eval pass@1 {evaluation['eval/pass@1']:.1%}" if evaluation else "") + f" | eta {eta}",
              flush=True)


def train(run, tokenizer) -> None:
    """One global batch per step. The step's one host synchronisation reads the loss and the gradient norm,
    which must be finite before the optimizer applies them; the weights are checked before every save.
    SIGTERM (common.Preemption) stops the run at the end of a step, every rank at the same one, with step-N
    saved; one process (without FSDP, whose hooks hold state mid-step) abandons a step that would not end
    within half of --preempt-grace instead."""
    args, preemption = run.args, common.PREEMPTION
    tracker = common.open_tracker(args.report_to, args.out, vars(args), run.start_step, run.d)
    eval_set = make_eval_set(args, tokenizer, run.d.rank, run.d.world_size)
    progress, last, seconds = common.Progress(run.total_steps, done=run.start_step), time.perf_counter(), None
    for step, _, batch_indices in data.iterate_batches(len(run.dataset), args.batch_size, args.seed,
                                                       args.epochs, run.start_step, stop_step=run.total_steps):
        lr = learning_rate(step, run.total_steps, run.warmup_steps, args.lr)
        try:  # nothing is updated inside: abandoning drops only this step's gradients
            with preemption.may_abandon(seconds, enabled=run.d.world_size == 1 and not args.fsdp):
                stats, names = train_step(run, batch_indices)
                # Clip once, the global L2 norm of the summed gradient (under FSDP a DTensor, reduced over ranks).
                norm = torch.nn.utils.clip_grad_norm_(run.logps_model.parameters(), args.grad_clip or math.inf)
                norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
                values = torch.cat([stats, norm.detach().float().view(1).to(stats.device)]).tolist()
        except common.Abandoned:
            run.optimizer.zero_grad(set_to_none=True)
            stop_preempted(run, step, tracker)
        if not (math.isfinite(values[0]) and math.isfinite(values[-1])):
            raise NonFiniteLossError(f"step {step + 1}: the loss is {values[0]} and the gradient norm "
                                     f"{values[-1]}; stopping before the update; {common.last_good(args.out, step)}; "
                                     "try a lower --lr")
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        now = time.perf_counter()
        seconds = now - last
        evaluation = evaluate_during_training(run, eval_set, step + 1)
        log_step(run, step + 1, batch_indices, values, names, lr, seconds, progress.eta(step + 1), evaluation,
                 tracker)
        last = time.perf_counter()  # the next step's time and tokens/s leave the evaluation out
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < run.total_steps:
            save_checkpoint(run, step + 1, final=False)
        if preemption.requested_everywhere(run.d) and step + 1 < run.total_steps:  # the last step: just finish
            stop_preempted(run, step + 1, tracker)
    save_checkpoint(run, run.total_steps, final=True)
    tracker.close()


def stop_preempted(run, done: int, tracker) -> None:
    """After SIGTERM: save step-`done` (unless --save-every just did, or no step ended since the start), then
    stop with exit status 143 and a line saying how to continue. The tracker is flushed first."""
    args, path = run.args, os.path.join(run.args.out, f"step-{done}")
    tracker.close()
    if done == run.start_step:
        raise common.RunStopped(f"preempted (SIGTERM) before step {done + 1} ended; nothing new to save: " + (
            f"continue with the same command (its --resume {args.resume})" if args.resume else
            "no step had ended: run the same command again"), common.EXIT_PREEMPTED)
    if not (args.save_every and done % args.save_every == 0):
        save_checkpoint(run, done, final=False)
    raise common.RunStopped(f"preempted (SIGTERM) after step {done} of {run.total_steps}: saved {path}; continue "
                            f"with the same command plus --resume {path}", common.EXIT_PREEMPTED)


def main(argv=None) -> None:
    args = parse_args(argv)
    tokenizer = check_inputs(args)
    d = common.init_distributed(timeout_s=args.dist_timeout * 60)
    try:
        with contextlib.ExitStack() as stack:  # rank 0 holds OUT's lock for the whole run
            stack.enter_context(common.PREEMPTION.armed(args.preempt_grace, "train.py",
                                                        lambda: common.last_good(args.out, math.inf)))
            on_main_rank(d, f"locking {args.out}", lambda: stack.enter_context(common.OutputLock(args.out, "train.py")))
            train(setup(args, d, tokenizer), tokenizer)  # the tokenizer check_inputs loaded, not a second one
            common.barrier(d)  # every rank finishes its last collective before any tears the group down
    finally:
        common.close_distributed()


if __name__ == "__main__":
    common.cli(main, "train.py")
