"""train.py: the training loop of both stages, by hand: torch.distributed, DDP (or FSDP2), bf16 autocast.

    torchrun --nproc_per_node 8 train.py --stage sft  --model DIR --data sft.jsonl   --out runs/stage1
    torchrun --nproc_per_node 8 train.py --stage redi --model runs/stage1 --data pairs.jsonl --out runs/stage2
    python train.py ...            (one process, no process group: CPU or one GPU)

Stages: sft (Stage 1, positive traces), and for Stage 2 redi (the paper's method) or the baselines dpo, simpo
and weighted (AdvDistill's reward-weighted NLL). The formulas live in losses.py; this file decides which
examples go into which forward pass and how the sum over the global batch is normalised.

Read top to bottom:
  1. Arguments      flags, or a --config JSON with the same keys; stage defaults; checks before any compute.
  2. Distributed    torchrun's environment -> process group (NCCL on CUDA, gloo on CPU), or one process.
  3. Data           tokenised examples; which examples each rank and micro-step sees; global counts.
  4. Model          the model wrapped so the output projection runs inside DDP/FSDP's forward; AdamW.
  5. LR schedule    a pure function of the step: linear warmup, then linear decay to 0.
  6. The step       micro-batches, one gradient-synchronising backward, clip, the global mean loss.
  7. DPO reference  log-probs of the starting model, computed once and cached next to the data.
  8. Checkpoints    Hugging Face directories written to a temporary name and renamed; exact resume.
  9. Main loop      logging (metrics.jsonl, a printed line with ETA), checkpoints, the final model.

The one idea to take away (section 6): every loss is Σ_i ℓ_i / N where N counts the *global* batch (all
ranks, all micro-steps): loss tokens for sft, pairs for redi/dpo/simpo, completions for weighted. Each
micro-step backpropagates its part of that sum, times world_size because DDP averages gradients over ranks.
So N ranks x k micro-steps give exactly the update of one process holding the whole batch, however
unevenly the examples are spread (a micro-batch mean would weight a token of a short micro-batch more).
"""

import argparse
import contextlib
import gc
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

import data
import losses
from model import CheckpointError, Qwen2

STAGE_FORMATS = {"sft": "sft", "redi": "pairs", "dpo": "pairs", "simpo": "pairs", "weighted": "groups"}
FORMAT_NAMES = {"sft": "SFT (messages)", "pairs": "preference (prompt/chosen/rejected)",
                "groups": "group (prompt/completions/rewards)"}
# The paper's recipe: Stage 1 SFT at lr 5e-5, global batch 128, 5 epochs; Stage 2 at lr 1e-6, batch 32, 1 epoch.
STAGE_DEFAULTS = {"sft": dict(lr=5e-5, batch_size=128, epochs=5)}
STAGE2_DEFAULTS = dict(lr=1e-6, batch_size=32, epochs=1)
BETA_DEFAULTS = {"dpo": 0.1, "simpo": 2.0}  # the DPO and SimPO papers' values (SimPO: β 2.0, γ 1.0)
# Dense bf16 tensor-core peak per GPU, from NVIDIA's datasheets (sparsity figures halved). First match wins.
PEAK_BF16_FLOPS = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
                   ("A100", 312e12)]
TRAINER_STATE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"


class ConfigError(ValueError):
    """Bad flags, config or input files, found before any compute. The message says what to fix."""


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became inf/NaN; the run stops before the optimizer applies it."""


# ----------------------------------------------------------------------------------------------------------
# 1. Arguments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="JSON file whose keys are these flags (hyphens or underscores); "
                                    "flags given on the command line override it")
    p.add_argument("--stage", choices=sorted(STAGE_FORMATS), help="sft: Stage 1; redi/dpo/simpo/weighted: Stage 2")
    p.add_argument("--model", help="Hugging Face checkpoint directory to start from (and DPO's reference)")
    p.add_argument("--data", help="JSONL: messages rows (sft), prompt/chosen/rejected (redi, dpo, simpo), "
                                  "prompt/completions/rewards (weighted)")
    p.add_argument("--out", help="output directory: OUT/step-N checkpoints, the final model in OUT itself")
    p.add_argument("--lr", type=float, help="peak learning rate (default: sft 5e-5, other stages 1e-6)")
    p.add_argument("--epochs", type=int, help="passes over the data (default: sft 5, other stages 1)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (shortens the schedule)")
    p.add_argument("--batch-size", type=int, help="global batch per optimizer step: sequences (sft), pairs "
                                                  "(redi/dpo/simpo), prompts (weighted) (default: sft 128, else 32)")
    p.add_argument("--micro-batch-size", type=int, default=1,
                   help="examples per forward pass on each rank, packed into one padding-free row")
    p.add_argument("--max-length", type=int, help="drop (never truncate) examples longer than this many tokens")
    p.add_argument("--template", choices=sorted(data.TEMPLATES), default="qwen",
                   help="chat template: qwen (Qwen2.5 ChatML) or r1 (DeepSeek-R1-Distill)")
    p.add_argument("--alpha", type=float, default=0.8, help="redi: weight of the negative trace")
    p.add_argument("--beta", type=float, help="dpo: β (default 0.1); simpo: β (default 2.0)")
    p.add_argument("--gamma", type=float, default=1.0, help="simpo: target reward margin γ")
    p.add_argument("--warmup-ratio", type=float, default=0.1, help="fraction of steps of linear warmup")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (not on biases, norms)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm (0: no clipping)")
    p.add_argument("--seed", type=int, default=0, help="seeds the data order (and torch)")
    p.add_argument("--save-every", type=int, default=0, help="write OUT/step-N every this many steps (0: never)")
    p.add_argument("--resume", help="checkpoint directory (OUT/step-N) to continue from exactly")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute each block in backward")
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="compute dtype (default: bf16 on CUDA, fp32 on "
                                                             "CPU); weights and AdamW state are always fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile every transformer block")
    p.add_argument("--fsdp", action="store_true", help="shard weights, gradients and AdamW state over ranks "
                                                       "(FSDP2 fully_shard) instead of replicating them (DDP)")
    p.add_argument("--peak-flops", type=float, help="peak bf16 FLOP/s of one device, for MFU "
                                                    "(default: looked up from the GPU's name)")
    p.add_argument("--ref-cache", help="dpo: file caching the reference log-probs "
                                       "(default: DATA.ref_logps.safetensors, next to the data)")
    return p


def apply_config_file(parser: argparse.ArgumentParser, path: str) -> None:
    """Make the JSON file's values the parser's defaults, so command-line flags still override them.
    Values are checked as argparse would check a flag (type, choices); an unknown key is an error."""
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"--config {path}: cannot read it as JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"--config {path}: must hold a JSON object of flag: value")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    defaults = {}
    for key, value in config.items():
        dest = key.replace("-", "_")
        if dest not in actions:
            raise ConfigError(f"--config {path}: unknown key {key!r}; valid keys are the flags: "
                              + ", ".join(sorted(actions)))
        action = actions[dest]
        flag = "--" + dest.replace("_", "-")
        if action.nargs == 0:  # store_true flags
            if not isinstance(value, bool):
                raise ConfigError(f"--config {path}: {key!r} must be true or false, got {value!r}")
        elif value is not None:
            if isinstance(value, bool) or isinstance(value, (list, dict)):
                raise ConfigError(f"--config {path}: {key!r} = {value!r} is not a valid value for {flag}")
            try:
                value = (action.type or str)(value)
            except (TypeError, ValueError):
                raise ConfigError(f"--config {path}: {key!r} = {value!r} is not a valid {flag} "
                                  f"({action.type.__name__} expected)") from None
            if action.type is int and value != config[key]:
                raise ConfigError(f"--config {path}: {key!r} = {config[key]!r} must be an integer")
            if action.choices and value not in action.choices:
                raise ConfigError(f"--config {path}: {key!r} = {value!r}; choose one of {sorted(action.choices)}")
        defaults[dest] = value
    parser.set_defaults(**defaults)


def parse_args(argv=None) -> argparse.Namespace:
    """Flags (over an optional --config file), then stage defaults, then every check that needs no I/O."""
    parser = build_parser()
    config_path = parser.parse_known_args(argv)[0].config
    if config_path:
        apply_config_file(parser, config_path)
    args = parser.parse_args(argv)

    missing = [flag for flag in ("stage", "model", "data", "out") if getattr(args, flag) is None]
    if missing:
        raise ConfigError("missing " + ", ".join("--" + m for m in missing)
                          + " (give them on the command line or in --config)")
    for key, value in STAGE_DEFAULTS.get(args.stage, STAGE2_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.beta is None:
        args.beta = BETA_DEFAULTS.get(args.stage, 0.1)
    if args.dtype is None:
        args.dtype = "bf16" if torch.cuda.is_available() else "fp32"

    def need(ok, message):
        if not ok:
            raise ConfigError(message)

    need(args.lr > 0, f"--lr must be > 0, got {args.lr}")
    need(args.epochs >= 1, f"--epochs must be >= 1, got {args.epochs}")
    need(args.max_steps is None or args.max_steps >= 1, f"--max-steps must be >= 1, got {args.max_steps}")
    need(args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}")
    need(args.micro_batch_size >= 1, f"--micro-batch-size must be >= 1, got {args.micro_batch_size}")
    need(args.max_length is None or args.max_length >= 2, f"--max-length must be >= 2, got {args.max_length}")
    need(0 <= args.warmup_ratio < 1, f"--warmup-ratio must be in [0, 1), got {args.warmup_ratio}")
    need(args.weight_decay >= 0, f"--weight-decay must be >= 0, got {args.weight_decay}")
    need(args.grad_clip >= 0, f"--grad-clip must be >= 0 (0 disables clipping), got {args.grad_clip}")
    need(args.save_every >= 0, f"--save-every must be >= 0, got {args.save_every}")
    # bf16 autocast on CPU is slow and not what a CPU run is for (tests, laptops); refuse rather than surprise.
    need(args.dtype == "fp32" or torch.cuda.is_available(),
         "--dtype bf16 needs a CUDA GPU; on CPU train with --dtype fp32")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    need(args.batch_size % (world_size * args.micro_batch_size) == 0,
         f"--batch-size {args.batch_size} must be a multiple of world size ({world_size}) x --micro-batch-size "
         f"({args.micro_batch_size}) = {world_size * args.micro_batch_size}, so that every rank runs the same "
         "full micro-batches; change --batch-size or --micro-batch-size")
    return args


# ----------------------------------------------------------------------------------------------------------
# 2. Distributed


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (and the rendezvous address; multi-node runs use its
    --nnodes/--rdzv-* flags, nothing here changes). Without them this is one process and no process group."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return Dist(0, 1, 0, torch.device("cuda" if cuda else "cpu"))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return Dist(rank, world_size, local_rank, device)


def all_reduce_sum(tensor: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(d: Dist) -> None:
    if d.world_size > 1:
        dist.barrier()


def on_main_rank(d: Dist, what: str, fn) -> None:
    """Run fn() on rank 0 only, then tell every rank whether it worked (a broadcast that doubles as a
    barrier): if rank 0 fails, all ranks raise instead of waiting for it forever."""
    error = None
    if d.is_main:
        try:
            fn()
        except Exception as e:  # re-raised below, after the other ranks have been told
            error = e
    if d.world_size > 1:
        failed = torch.tensor([float(error is not None)], device=d.device)
        dist.broadcast(failed, src=0)
        if failed.item() and not d.is_main:
            raise RuntimeError(f"rank 0 failed while {what}; its error message says why")
    if error is not None:
        raise error


def log(d: Dist, *parts) -> None:
    if d.is_main:
        print(*parts, flush=True)


# ----------------------------------------------------------------------------------------------------------
# 3. Data


@dataclass
class Dataset:
    """The tokenised training set, held whole by every rank (so global counts need no communication).
    items[i] is an Example (sft), a (chosen, rejected) pair, or a group (examples, rewards)."""

    stage: str
    items: list
    loss_tokens: list[int]  # per item: positions whose target is a loss token (what pack() counts)
    doc_lengths: list[list[int]]  # per item: token count of each sequence it packs into
    weights: list[torch.Tensor] | None = None  # weighted: per group, the advantages of its completions
    ref_logps: torch.Tensor | None = None  # dpo: [num_pairs, 2] reference logπ(chosen), logπ(rejected)

    def __len__(self):
        return len(self.items)


def item_examples(stage: str, item) -> list:
    """The sequences an item packs into, in pack order."""
    return [item] if stage == "sft" else list(item) if STAGE_FORMATS[stage] == "pairs" else item[0]


def check_data_format(args) -> None:
    """Refuse a data file whose rows are another stage's format, before tokenising anything."""
    needed = STAGE_FORMATS[args.stage]
    try:
        found = data.detect_format(args.data)
    except FileNotFoundError:
        raise ConfigError(f"--data {args.data}: no such file") from None
    except ValueError as e:
        raise ConfigError(f"--data: {e}") from None
    if found != needed:
        fits = [s for s, f in STAGE_FORMATS.items() if f == found]
        raise ConfigError(f"--data {args.data} holds {FORMAT_NAMES[found]} rows, but --stage {args.stage} needs "
                          f"{FORMAT_NAMES[needed]} rows: {data.FORMATS[needed]} (this file suits --stage "
                          + " / ".join(fits) + ")")


def load_dataset(args, tokenizer, d: Dist) -> Dataset:
    """Read, validate and tokenise the rows for the stage. Over-long examples are dropped and counted
    (data.py never truncates); an empty result is an error."""
    fmt = STAGE_FORMATS[args.stage]
    try:
        rows = data.load_rows(args.data, fmt)
        tokenize = {"sft": data.tokenize_sft, "pairs": data.tokenize_pairs, "groups": data.tokenize_groups}[fmt]
        items, report = tokenize(rows, tokenizer, args.template, args.max_length)
    except ValueError as e:
        raise ConfigError(f"--data: {e}") from None
    log(d, f"data: {args.data}: " + ", ".join(f"{k} {v}" for k, v in report.items()))
    if not items:
        raise ConfigError(f"--data {args.data}: no examples left after dropping those longer than --max-length "
                          f"{args.max_length}; raise --max-length")
    examples = [item_examples(args.stage, item) for item in items]
    # pack() sets a target at t when token t+1 is a loss token, so the loss tokens are loss_mask[1:].
    loss_tokens = [sum(sum(e.loss_mask[1:]) for e in ex) for ex in examples]
    doc_lengths = [[len(e.input_ids) for e in ex] for ex in examples]
    weights = None
    if args.stage == "weighted":
        # Advantages within each prompt's group, from the whole group (a group is never split across ranks or
        # micro-batches, and its advantages are constants computed once here).
        weights = [losses.group_advantages(torch.tensor(rewards), len(rewards)) for _, rewards in items]
    return Dataset(args.stage, items, loss_tokens, doc_lengths, weights)


def count_items(dataset: Dataset, indices: list[int]) -> int:
    """What a loss averages over, apart from sft's tokens: pairs, or completions (weighted), or sequences."""
    if dataset.stage == "weighted":
        return sum(len(dataset.doc_lengths[i]) for i in indices)
    return len(indices)


def loss_normalizer(dataset: Dataset, indices: list[int]) -> int:
    """N of the loss Σ_i ℓ_i / N over a global batch: loss tokens (sft), pairs (redi/dpo/simpo), completions
    (weighted). Every rank holds the whole dataset and knows the global batch's indices, so it computes N
    itself, without an all-reduce."""
    if dataset.stage == "sft":
        return sum(dataset.loss_tokens[i] for i in indices)
    return count_items(dataset, indices)


def rank_micro_batches(batch: list[int], d: Dist, micro_batch_size: int) -> list[list[int]]:
    """This rank's share of a global batch (data.shard: batch[rank::world]) in micro-batches, padded with
    empty micro-batches so that every rank runs the same number of forward/backward passes. Only a short
    last batch of an epoch needs padding. Equal counts are required by FSDP (every forward all-gathers
    weights) and make DDP's one synchronising backward land on the same micro-step on every rank."""
    per_rank = math.ceil(len(batch) / d.world_size)
    num_micro = math.ceil(per_rank / micro_batch_size)
    mine = data.micro_batches(data.shard(batch, d.rank, d.world_size), micro_batch_size)
    return mine + [[]] * (num_micro - len(mine))


def pack_items(dataset: Dataset, indices: list[int]) -> dict:
    """One padding-free row holding every sequence of these items (chosen and rejected, or a group's
    completions, side by side in one forward)."""
    items = [dataset.items[i] for i in indices]
    fmt = STAGE_FORMATS[dataset.stage]
    return data.pack(items) if fmt == "sft" else data.pack_pairs(items) if fmt == "pairs" else data.pack_groups(items)


# ----------------------------------------------------------------------------------------------------------
# 4. Model and optimizer


class SequenceLogps(nn.Module):
    """packed row -> (logπ(y_s|x_s) summed over each sequence's loss tokens [S], loss tokens per sequence [S]).

    The output projection (tied to the embedding in small Qwen2 models) is applied here, inside the module
    that DDP or FSDP wraps: DDP's gradient hooks and FSDP's all-gather of the weights then cover it like any
    other layer. losses.token_logps computes it in chunks, never holding [tokens, vocabulary] logits."""

    def __init__(self, model: Qwen2):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, document_ids, targets, num_sequences: int):
        hidden = self.model(input_ids, position_ids=position_ids, document_ids=document_ids, return_hidden=True)
        token_logps = losses.token_logps(hidden, self.model.lm_head_weight, targets)
        return losses.sequence_logps(token_logps, targets, document_ids, num_sequences)


def load_model(path: str, flag: str, d: Dist, fsdp: bool) -> Qwen2:
    """fp32 master weights. FSDP loads on the CPU and fully_shard moves each rank's shard to its GPU."""
    device = "cpu" if fsdp else d.device
    try:
        return Qwen2.from_pretrained(path, dtype=torch.float32, device=device)
    except CheckpointError as e:
        raise ConfigError(f"{flag} {path}: {e}") from None


def wrap_model(model: Qwen2, args, d: Dist) -> nn.Module:
    """Compile (per block: the blocks are identical, so they share compiled code), then DDP or FSDP2 around
    the whole log-prob computation. The bare `model` stays what we save: never a compiled or wrapped one."""
    model.train()
    model.gradient_checkpointing = args.grad_checkpointing
    if args.compile:
        for block in model.layers:
            block.compile()  # in place: parameter names, and so checkpoints, are unchanged
    module = SequenceLogps(model)
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:  # each block's weights are gathered just for its own forward and backward
            fully_shard(block)
        fully_shard(module)  # the rest: embedding (= output projection when tied) and final norm
        return module
    if d.world_size > 1:
        return nn.parallel.DistributedDataParallel(module, device_ids=[d.local_rank] if d.device.type == "cuda"
                                                   else None)
    return module


def build_optimizer(module: nn.Module, args) -> torch.optim.AdamW:
    """AdamW(0.9, 0.999, eps 1e-8) on the fp32 weights. Weight decay on matrices only, not on biases and norm
    gains (1-D tensors), as the Hugging Face Trainer does."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8)


# ----------------------------------------------------------------------------------------------------------
# 5. Learning-rate schedule


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


# ----------------------------------------------------------------------------------------------------------
# 6. The training step


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def forward_logps(logps_model: nn.Module, batch: dict):
    return logps_model(batch["input_ids"], batch["position_ids"], batch["document_ids"], batch["targets"],
                       batch["num_sequences"])


def stage_loss(args, dataset: Dataset, indices: list[int], batch: dict, sum_logps, lengths, normalizer: int):
    """This micro-batch's part Σ_{i in micro-batch} ℓ_i / N of the global-batch loss (N = normalizer), and
    its metrics (means over this micro-batch's items), from losses.py."""
    stage = args.stage
    if stage == "sft":
        loss, metrics = losses.sft_loss(sum_logps, lengths, normalizer=normalizer)
        # nll/token is the loss itself and num_tokens the logged loss_tokens: both are logged exactly.
        return loss, {"logps/chosen": metrics["logps/chosen"]}
    if stage == "weighted":
        weights = torch.cat([dataset.weights[i] for i in indices]).to(sum_logps.device)
        return losses.weighted_nll_loss(sum_logps, lengths, weights, normalizer=normalizer)
    chosen, rejected = batch["chosen_index"], batch["rejected_index"]
    if stage == "redi":
        return losses.redi_loss(sum_logps[chosen], sum_logps[rejected], lengths[chosen], lengths[rejected],
                                alpha=args.alpha, normalizer=normalizer)
    if stage == "simpo":
        return losses.simpo_loss(sum_logps[chosen], sum_logps[rejected], lengths[chosen], lengths[rejected],
                                 beta=args.beta, gamma=args.gamma, normalizer=normalizer)
    ref = dataset.ref_logps[indices].to(sum_logps.device)
    return losses.dpo_loss(sum_logps[chosen], sum_logps[rejected], ref[:, 0], ref[:, 1], beta=args.beta,
                           normalizer=normalizer)


def sync_context(logps_model: nn.Module, last_micro_step: bool):
    """DDP all-reduces gradients in a backward outside no_sync(); we want that once, on the last micro-step.
    (FSDP reduce-scatters every micro-step instead, so that it never holds a whole unsharded gradient.)"""
    if isinstance(logps_model, nn.parallel.DistributedDataParallel) and not last_micro_step:
        return logps_model.no_sync()
    return contextlib.nullcontext()


def train_step(args, dataset: Dataset, batch_indices: list[int], logps_model: nn.Module, d: Dist, autocast):
    """Forward and backward of one global batch; gradients end summed over ranks, i.e. ∇ Σ_i ℓ_i / N.

    Each rank runs its micro-batches; an empty one (this rank's share of a short last batch ran out) runs
    the batch's first item with weight 0, so that it still takes part in the collective calls. Returns the
    global loss and the global-batch means of the stage's metrics, as one reduced tensor [1 + M] and the
    metric names: one all-reduce per step, and no host synchronisation here."""
    normalizer = loss_normalizer(dataset, batch_indices)
    micro = rank_micro_batches(batch_indices, d, args.micro_batch_size)
    stats, names = None, None
    for m, indices in enumerate(micro):
        weight = 1.0 if indices else 0.0
        indices = indices or batch_indices[:1]
        batch = to_device(pack_items(dataset, indices), d.device)
        with sync_context(logps_model, last_micro_step=m == len(micro) - 1):
            with autocast():
                sum_logps, lengths = forward_logps(logps_model, batch)
            loss, metrics = stage_loss(args, dataset, indices, batch, sum_logps, lengths, normalizer)
            # DDP and FSDP average gradients over ranks; × world_size turns that average back into the sum.
            (loss * (weight * d.world_size)).backward()
        names = names or list(metrics)
        count = weight * count_items(dataset, indices)
        part = torch.cat([loss.detach().float().view(1) * weight,
                          torch.stack([metrics[k].float() for k in names]) * count])
        stats = part if stats is None else stats + part
    all_reduce_sum(stats, d)
    stats[1:] /= max(count_items(dataset, batch_indices), 1)
    return stats, names


def grad_norm_and_clip(logps_model: nn.Module, max_norm: float) -> torch.Tensor:
    """Global L2 norm of the gradient (after its all-reduce), clipping to max_norm when > 0. With FSDP the
    norm of the sharded gradients is reduced over ranks by clip_grad_norm_ itself (a DTensor)."""
    norm = torch.nn.utils.clip_grad_norm_(logps_model.parameters(), max_norm if max_norm > 0 else float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


# ----------------------------------------------------------------------------------------------------------
# 7. DPO reference log-probs


def ref_cache_path(args) -> str:
    return args.ref_cache or args.data + ".ref_logps.safetensors"


def file_fingerprint(path: str) -> dict:
    stat = os.stat(path)
    return {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def ref_fingerprint(args, num_pairs: int) -> dict:
    """Everything the reference log-probs depend on. Files by size and modification time (hashing many GB
    of weights at every start would be slow); a change of any of these makes a cached file stale."""
    from model import checkpoint_files

    return {"model": [file_fingerprint(f) for f in checkpoint_files(args.model)],
            "data": file_fingerprint(args.data), "template": args.template, "max_length": args.max_length,
            "dtype": args.dtype, "num_pairs": num_pairs}


@torch.no_grad()
def compute_ref_logps(dataset: Dataset, logps_model: nn.Module, args, d: Dist, autocast) -> torch.Tensor:
    """logπ_ref(chosen), logπ_ref(rejected) of every pair under the starting weights, with the training
    forward itself (packed rows, same dtype), so that at step 0 policy and reference agree to rounding.
    Pairs are spread over ranks; each fills its rows and a sum all-reduce assembles the table."""
    table = torch.zeros(len(dataset), 2, device=d.device)
    all_pairs = list(range(len(dataset)))
    for indices in rank_micro_batches(all_pairs, d, args.micro_batch_size):
        batch = to_device(pack_items(dataset, indices or [0]), d.device)
        with autocast():
            sum_logps, _ = forward_logps(logps_model, batch)
        if indices:  # an empty micro-batch only keeps FSDP's collectives in step
            rows = torch.tensor(indices, device=d.device)
            table[rows] = torch.stack([sum_logps[batch["chosen_index"]], sum_logps[batch["rejected_index"]]], 1).float()
    return all_reduce_sum(table, d).cpu()


def read_ref_cache(path: str, fingerprint: str) -> torch.Tensor | None:
    """The cached table if the file exists and was computed for exactly this fingerprint, else None."""
    from safetensors import safe_open

    if not os.path.exists(path):
        return None
    with safe_open(path, framework="pt") as f:
        if (f.metadata() or {}).get("fingerprint") == fingerprint:
            return f.get_tensor("ref_logps")
    return None


def load_or_compute_ref_logps(dataset: Dataset, logps_model: nn.Module, args, d: Dist, autocast) -> torch.Tensor:
    """Reuse the cache when its fingerprint matches; otherwise compute the table and write it atomically.
    Rank 0 reads the file and broadcasts the table (ranks on other nodes need not see its filesystem).
    A resume never recomputes: its weights are no longer the reference's, so a missing or stale cache is
    an error there."""
    from safetensors.torch import save_file

    path = ref_cache_path(args)
    fingerprint = json.dumps(ref_fingerprint(args, len(dataset)), sort_keys=True)
    cached = read_ref_cache(path, fingerprint) if d.is_main else None
    found = torch.tensor([float(cached is not None)], device=d.device)
    if d.world_size > 1:
        dist.broadcast(found, src=0)
    if found.item():
        log(d, f"dpo: reusing reference log-probs from {path}")
        table = cached.to(d.device) if d.is_main else torch.empty(len(dataset), 2, device=d.device)
        if d.world_size > 1:
            dist.broadcast(table, src=0)
        return table.cpu()
    if args.resume:
        raise ConfigError(f"--resume: the DPO reference log-probs {path} are missing or were computed for another "
                          "model, data or settings, and cannot be recomputed from a resumed model; restore that "
                          "file (or pass it with --ref-cache), or start the run again")
    if os.path.exists(path):
        log(d, f"dpo: {path} was computed for another model, data or settings; recomputing it")
    log(d, f"dpo: computing reference log-probs of {len(dataset)} pairs with {args.model}")
    table = compute_ref_logps(dataset, logps_model, args, d, autocast)

    def write():
        tmp = path + ".tmp"
        save_file({"ref_logps": table.contiguous()}, tmp, metadata={"fingerprint": fingerprint})
        os.replace(tmp, path)

    on_main_rank(d, f"writing {path}", write)
    return table


# ----------------------------------------------------------------------------------------------------------
# 8. Checkpoints


def generation_config(args, tokenizer, model: Qwen2) -> dict:
    """The source checkpoint's generation_config.json with EOS = the template's end-of-turn token (then its
    other stop tokens), so vLLM and transformers stop where the trained model ends its answer."""
    config = {}
    source = os.path.join(args.model, "generation_config.json")
    if os.path.exists(source):
        with open(source) as f:
            config = json.load(f)
        # "_from_model_config" would let transformers rebuild these settings from config.json's single EOS.
        config.pop("_from_model_config", None)
        config.pop("transformers_version", None)
    template = data.get_template(args.template)
    stop_ids = []
    for token in (template.end_of_turn, *template.stop_tokens):
        token_id = data.special_token_id(tokenizer, token)
        if token_id not in stop_ids:
            stop_ids.append(token_id)
    config["eos_token_id"] = stop_ids
    if model.config.bos_token_id is not None:
        config.setdefault("bos_token_id", model.config.bos_token_id)
    if "pad_token_id" not in config:
        pad = tokenizer.token_to_id("<|endoftext|>")
        config["pad_token_id"] = pad if pad is not None else stop_ids[0]
    return config


def rng_states(d: Dist) -> list[dict]:
    """The CPU (and CUDA) generator state of every rank, gathered to all ranks. Nothing in this loop draws
    random numbers today (no dropout; the data order is a pure function of seed and epoch), but restoring
    them keeps resume exact for anyone who adds something that does."""
    mine = {"cpu": torch.get_rng_state()}
    if d.device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(d.device)
    if d.world_size == 1:
        return [mine]
    states = [None] * d.world_size
    dist.all_gather_object(states, mine)  # our own ranks' tensors, not a file: no unpickling of untrusted data
    return states


def full_model_for_saving(model: Qwen2, logps_model: nn.Module, args, d: Dist) -> Qwen2 | None:
    """On rank 0, a Qwen2 holding the full weights; None elsewhere. With DDP that is the bare model itself;
    with FSDP every rank takes part in gathering the shards, which land on rank 0's CPU."""
    if not args.fsdp:
        return model if d.is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(logps_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not d.is_main:
        return None
    with torch.device("meta"):
        full = Qwen2(model.config)
    full.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, strict=True, assign=True)
    full.source_dir = model.source_dir
    return full


def optimizer_state(logps_model: nn.Module, optimizer) -> dict:
    """AdamW state keyed by parameter name, whole on rank 0 ({} elsewhere); the same format for one
    process, DDP and FSDP, so a run may resume on another number of GPUs or switch between them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(logps_model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(directory: str, model: Qwen2, logps_model: nn.Module, optimizer, state: dict,
                    gen_config: dict, args, d: Dist, final: bool = False) -> None:
    """Write a Hugging Face checkpoint plus trainer_state.pt, atomically.

    step-N: everything goes to OUT/.tmp-step-N, which is renamed to OUT/step-N when complete (a directory
    rename is atomic), so a crash mid-save leaves the previous checkpoints and no half of a new one.
    final: written to OUT/.tmp-final, then each file is renamed into OUT, config.json last: OUT holds a
    loadable model only once every other file is in place. Only rank 0 writes."""
    name = os.path.basename(directory.rstrip("/"))
    full = full_model_for_saving(model, logps_model, args, d)  # collective under FSDP
    state = dict(state, optimizer=optimizer_state(logps_model, optimizer), rng=rng_states(d))  # collectives
    out = args.out
    tmp = os.path.join(out, ".tmp-final" if final else f".tmp-{name}")

    def write():
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        full.save_pretrained(tmp, generation_config=gen_config)
        torch.save(state, os.path.join(tmp, TRAINER_STATE))
        if not final:
            os.rename(tmp, directory)  # fails rather than overwrite an existing checkpoint
            return
        names = sorted(os.listdir(tmp), key=lambda n: n == "config.json")
        for file_name in names:
            os.replace(os.path.join(tmp, file_name), os.path.join(out, file_name))
        os.rmdir(tmp)

    on_main_rank(d, f"saving {directory}", write)
    log(d, f"saved {directory}")


def read_trainer_state(checkpoint: str) -> dict:
    """trainer_state.pt with weights_only=True: tensors and plain containers only, never arbitrary pickles."""
    return torch.load(os.path.join(checkpoint, TRAINER_STATE), map_location="cpu", weights_only=True)


# Flags that must not change on resume: they fix the data order, the schedule, or the objective.
RESUME_MUST_MATCH = ("stage", "batch_size", "epochs", "max_steps", "seed", "lr", "warmup_ratio", "weight_decay",
                     "grad_clip", "template", "max_length", "alpha", "beta", "gamma")


def check_resume(args, saved: dict, num_items: int) -> None:
    for key in RESUME_MUST_MATCH:
        if saved["args"].get(key) != getattr(args, key):
            raise ConfigError(f"--resume {args.resume}: it was trained with --{key.replace('_', '-')} "
                              f"{saved['args'].get(key)} but this run has {getattr(args, key)}; continuing "
                              "exactly needs the same value")
    if saved["num_items"] != num_items:
        raise ConfigError(f"--resume {args.resume}: it was trained on {saved['num_items']} examples but --data "
                          f"{args.data} now gives {num_items}; pass the same data")


def step_dirs(out: str) -> dict[int, str]:
    """{N: OUT/step-N} of the checkpoints in OUT."""
    found = {}
    if os.path.isdir(out):
        for name in os.listdir(out):
            if name.startswith("step-") and name[5:].isdigit():
                found[int(name[5:])] = os.path.join(out, name)
    return found


def prepare_out_dir(args, resume_step: int, d: Dist) -> None:
    """Never overwrite a checkpoint. A fresh run needs an OUT without checkpoints; a resume into OUT needs
    OUT to hold nothing newer than the checkpoint it resumes from. Leftovers of an interrupted save
    (OUT/.tmp-*) are deleted; metrics.jsonl keeps only the steps up to where this run starts."""
    out = os.path.abspath(args.out)
    steps = step_dirs(out)
    has_final = os.path.exists(os.path.join(out, "config.json"))
    resume = os.path.abspath(args.resume) if args.resume else None
    if resume == out:
        raise ConfigError(f"--resume {args.resume} is the final model of a finished run; nothing to continue "
                          "(resume from one of its step-N checkpoints, or start a new --out)")
    resuming_in_out = resume is not None and os.path.dirname(resume) == out
    if (steps or has_final) and not resuming_in_out:
        found = [os.path.basename(p) for _, p in sorted(steps.items())] + (["a final model"] if has_final else [])
        raise ConfigError(f"--out {args.out} already holds {', '.join(found)}; choose a new --out, or continue "
                          f"that run with --resume {os.path.join(args.out, 'step-N')}")
    newer = [os.path.basename(p) for n, p in sorted(steps.items()) if n > resume_step]
    if resuming_in_out and (newer or has_final):
        raise ConfigError(f"--out {args.out} already holds {', '.join(newer + (['a final model'] if has_final else []))}"
                          f", newer than --resume {args.resume}; resuming would overwrite them: resume from the "
                          "latest checkpoint or choose a new --out")

    def prepare():
        os.makedirs(out, exist_ok=True)
        for name in os.listdir(out):
            if name.startswith(".tmp-"):
                print(f"removing {os.path.join(args.out, name)}, left by an interrupted save", flush=True)
                shutil.rmtree(os.path.join(out, name))
        metrics = os.path.join(out, METRICS_FILE)
        if os.path.exists(metrics):
            kept, broken = [], 0
            with open(metrics) as f:
                for line in f:
                    try:
                        if json.loads(line)["step"] <= resume_step:
                            kept.append(line)
                    except (json.JSONDecodeError, KeyError, TypeError):
                        broken += 1  # e.g. the last line of a run killed mid-write
            if broken:
                print(f"{METRICS_FILE}: dropping {broken} unreadable line(s)", flush=True)
            with open(metrics + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(metrics + ".tmp", metrics)

    on_main_rank(d, f"preparing {args.out}", prepare)


# ----------------------------------------------------------------------------------------------------------
# 9. Main loop


def peak_flops(args, d: Dist) -> float | None:
    """Peak bf16 FLOP/s of one device for MFU: --peak-flops, else looked up by GPU name; None on CPU."""
    if args.peak_flops:
        return args.peak_flops
    if d.device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(d.device)
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops
    log(d, f"MFU not reported: unknown peak FLOP/s of {name!r}; pass --peak-flops")
    return None


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def preflight(args) -> None:
    """Checks of the input files that read little: fail fast, before tokenising or loading any weights."""
    for flag, path in (("--model", args.model), ("--resume", args.resume)):
        if path is None:
            continue
        if not os.path.isdir(path):
            raise ConfigError(f"{flag} {path}: not a directory; pass a Hugging Face checkpoint directory")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(f"{flag} {path}: no config.json; pass a Hugging Face checkpoint directory")
    if args.resume and not os.path.isfile(os.path.join(args.resume, TRAINER_STATE)):
        raise ConfigError(f"--resume {args.resume}: no {TRAINER_STATE}; pass a checkpoint directory written by "
                          "train.py (OUT/step-N)")
    if not os.path.isfile(os.path.join(args.model, "tokenizer.json")):
        raise ConfigError(f"--model {args.model}: no tokenizer.json; the checkpoint directory must hold its "
                          "tokenizer")
    check_data_format(args)


def train(args, d: Dist) -> None:
    preflight(args)
    torch.manual_seed(args.seed)
    tokenizer = data.load_tokenizer(args.model)
    try:
        data.check_template_tokens(tokenizer, args.template)
    except ValueError as e:
        raise ConfigError(f"--template {args.template} with --model {args.model}: {e}") from None
    dataset = load_dataset(args, tokenizer, d)
    saved = read_trainer_state(args.resume) if args.resume else None
    if saved:
        check_resume(args, saved, len(dataset))
    start_step = saved["step"] if saved else 0
    prepare_out_dir(args, start_step, d)

    model = load_model(args.resume or args.model, "--resume" if args.resume else "--model", d, args.fsdp)
    gen_config = generation_config(args, tokenizer, model)
    logps_model = wrap_model(model, args, d)
    optimizer = build_optimizer(logps_model, args)
    use_bf16 = args.dtype == "bf16"

    def autocast():
        # bf16 matmuls on CUDA, fp32 weights and AdamW state; losses.token_logps computes its logits in fp32.
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    steps_per_epoch = math.ceil(len(dataset) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    warmup_steps = warmup_steps_for(total_steps, args.warmup_ratio)
    flops_device = peak_flops(args, d)
    log(d, f"train: stage {args.stage}, {d.world_size} process(es) on {d.device.type}"
           f"{' with FSDP2' if args.fsdp else ''}, {args.dtype}, {model.num_params():,} parameters, "
           f"{len(dataset)} items, {total_steps} steps ({steps_per_epoch}/epoch), warmup {warmup_steps}, "
           f"lr {args.lr}, global batch {args.batch_size}, micro-batch {args.micro_batch_size}")

    if args.stage == "dpo":
        # Before any update and before the optimizer state is restored: the weights are --model's unless
        # resuming, and a resume finds the cache written by the first run.
        dataset.ref_logps = load_or_compute_ref_logps(dataset, logps_model, args, d, autocast)

    if saved:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(logps_model, optimizer, optim_state_dict=saved["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        if len(saved["rng"]) == d.world_size:
            torch.set_rng_state(saved["rng"][d.rank]["cpu"])
            if "cuda" in saved["rng"][d.rank] and d.device.type == "cuda":
                torch.cuda.set_rng_state(saved["rng"][d.rank]["cuda"], d.device)
        else:
            log(d, f"resume: RNG states of {len(saved['rng'])} ranks not restored on {d.world_size}")
        log(d, f"resume: continuing from step {start_step} of {total_steps} ({args.resume})")

    def state_at(step: int) -> dict:
        return {"step": step, "epoch": step // steps_per_epoch, "total_steps": total_steps,
                "warmup_steps": warmup_steps, "num_items": len(dataset), "world_size": d.world_size,
                "args": vars(args)}

    run_start, last_time = time.perf_counter(), time.perf_counter()
    for step, epoch, batch_indices in data.iterate_batches(len(dataset), args.batch_size, args.seed, args.epochs,
                                                           start_step):
        if step >= total_steps:
            break
        lr = learning_rate(step, total_steps, warmup_steps, args.lr)
        stats, names = train_step(args, dataset, batch_indices, logps_model, d, autocast)
        grad_norm = grad_norm_and_clip(logps_model, args.grad_clip)
        # The step's one host synchronisation: the numbers we log, and the finiteness check that must come
        # before the optimizer step (a non-finite update would destroy the weights).
        values = torch.cat([stats, grad_norm.detach().float().view(1).to(stats.device)]).tolist()
        loss, metric_values, norm = values[0], values[1:-1], values[-1]
        if not (math.isfinite(loss) and math.isfinite(norm)):
            last = max([n for n in step_dirs(args.out) if n <= step], default=None)
            raise NonFiniteLossError(
                f"step {step + 1}: the loss is {loss} and the gradient norm {norm}; stopping before the update. "
                + (f"The last good checkpoint is {os.path.join(args.out, f'step-{last}')}"
                   if last else "No checkpoint was saved yet") + "; try a lower --lr")
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        now = time.perf_counter()
        seconds, last_time = now - last_time, now
        done = step + 1
        docs = [n for i in batch_indices for n in dataset.doc_lengths[i]]
        tokens = sum(docs)
        mfu = None
        if flops_device:
            flops = sum(n * model.flops_per_token(n) for n in docs)
            mfu = flops / seconds / (flops_device * d.world_size)
        record = {"step": done, "epoch": done / steps_per_epoch, "loss": loss, "lr": lr, "grad_norm": norm,
                  "tokens": tokens, "loss_tokens": sum(dataset.loss_tokens[i] for i in batch_indices),
                  "tokens_per_s": tokens / seconds, "mfu": mfu, **dict(zip(names, metric_values))}
        if d.is_main:
            with open(os.path.join(args.out, METRICS_FILE), "a") as f:
                f.write(json.dumps(record) + "\n")
            eta = (now - run_start) / (done - start_step) * (total_steps - done)
            print(f"step {done}/{total_steps} | epoch {epoch + 1} | loss {loss:.4f} | lr {lr:.2e} | "
                  f"grad {norm:.3f} | {tokens / seconds:,.0f} tok/s"
                  + (f" | mfu {mfu:.1%}" if mfu is not None else "") + f" | eta {format_seconds(eta)}", flush=True)
        if args.save_every and done % args.save_every == 0 and done < total_steps:
            save_checkpoint(os.path.join(args.out, f"step-{done}"), model, logps_model, optimizer, state_at(done),
                            gen_config, args, d)

    save_checkpoint(args.out, model, logps_model, optimizer, state_at(total_steps), gen_config, args, d,
                    final=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    d = setup_distributed()
    try:
        train(args, d)
        # Let every rank finish its last collective before any of them tears the process group down (gloo
        # can abort a process whose peer disappears mid-operation).
        barrier(d)
    finally:
        if dist.is_initialized():
            # FSDP's modules and hooks form reference cycles that would keep the process group alive until
            # interpreter shutdown, where destroying gloo's threads can abort; free them while all is alive.
            gc.collect()
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, NonFiniteLossError) as e:
        if os.environ.get("RANK", "0") == "0":  # every rank found the same problem; say it once
            print(f"train.py: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2 if isinstance(e, ConfigError) else 1)
