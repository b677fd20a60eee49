"""The demo's pretrained base (issue 23): the miniature of the paper's Qwen2.5-Math-1.5B. A student that starts
from random weights does not make the teacher's mistakes (it makes a beginner's: miscopied digits), so the
teacher's wrong traces have nothing to teach it. Here the tiny model is first pretrained, by plain next-token
prediction on every token, on an unlabelled corpus of the task's text written by a *noisier* writer with the
teacher's habit: it forgets a carry inside a carry chain, far more often than the teacher. The base then knows
the format and the digits and has the teacher's typical mistake as a habit, as a model pretrained on the
web's flawed mathematics does; Stage 1 (train.py --stage sft) starts from it.

The corpus documents are chats rendered as plain text (the `qwen` template's ChatML, the system prompt
included), so evaluate.py can score the base itself with the same template: the paper's "base" row. The
loss covers every token (prompt, trace and the closing <|im_end|>): pretraining, not SFT.
"""

import os
import random

import torch
from tokenizers import Tokenizer

import data
from data import TEMPLATES
from losses import IGNORE_INDEX, SequenceLogps, token_logps
from model import Qwen2
from scripts import demo_task as task

# ----------------------------------------------------------------------------------------------------------
# 1. The corpus


def corpus_document(a: int, b: int, trace: str) -> str:
    """One pretraining document: the chat (system prompt, question, trace) as the qwen template writes it."""
    return TEMPLATES["qwen"].chat_text([{"role": "user", "content": task.problem_text(a, b)},
                                        {"role": "assistant", "content": trace}])


def write_corpus(problems, writer: dict, seed: int) -> tuple[list[str], dict]:
    """One document per problem, written by `writer` (the teacher's generation process with its own error
    rates). Returns the documents and the writer's profile per carry-chain length: documents, wrong ones and
    the wrong ones that are a dropped carry (measured, so a reader and tests/test_demo.py see the habit)."""
    rng = random.Random(seed)
    documents, profile = [], {}
    for a, b in problems:
        trace, mistake = task.teacher_generation(a, b, rng, writer)
        documents.append(corpus_document(a, b, trace))
        stats = profile.setdefault(str(task.longest_carry_chain(a, b)[0]),
                                   {"documents": 0, "wrong": 0, "dropped_carry": 0})
        stats["documents"] += 1
        stats["wrong"] += mistake is not None
        stats["dropped_carry"] += mistake == "dropped_carry"
    for stats in profile.values():
        stats["error_rate"] = stats["wrong"] / stats["documents"]
    return documents, dict(sorted(profile.items()))


# ----------------------------------------------------------------------------------------------------------
# 2. Pretraining: next-token prediction on every token of the corpus


def padded_batch(token_lists: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids [B, T] and next-token targets [B, T] (IGNORE_INDEX past each document's end).
    Plain causal attention suffices: padding only follows a document, so no real token attends to it."""
    width = max(len(ids) for ids in token_lists) - 1
    inputs = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    targets = torch.full((len(token_lists), width), IGNORE_INDEX, dtype=torch.long)
    for row, ids in enumerate(token_lists):
        inputs[row, :len(ids) - 1] = torch.tensor(ids[:-1])
        targets[row, :len(ids) - 1] = torch.tensor(ids[1:])
    return inputs, targets


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup to `peak`, then linear decay to 0 at `steps` (train.py's schedule)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, (steps - step) / max(1, steps - warmup))


def pretrain(init_dir, out_dir, documents: list[str], steps: int, batch_size: int, lr: float, seed: int) -> list:
    """AdamW on the mean next-token NLL of `batch_size` documents per step, epochs in a seeded order; saves the
    base (Hugging Face format, the tokenizer of init_dir) to out_dir. Returns the loss every 50 steps."""
    torch.manual_seed(seed)
    model = Qwen2.from_pretrained(init_dir).train()
    tokenizer = Tokenizer.from_file(os.path.join(init_dir, "tokenizer.json"))
    end = tokenizer.token_to_id("<|endoftext|>")  # closes every document, and pads (the padding is never a target)
    encoded = [ids + [end] for ids in (e.ids for e in tokenizer.encode_batch(documents))]
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": other, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.95))
    rng, order, losses = random.Random(seed), [], []
    for step in range(steps):
        if len(order) < batch_size:  # a new epoch in a fresh order
            order += rng.sample(range(len(encoded)), len(encoded))
        chosen, order = order[:batch_size], order[batch_size:]
        inputs, targets = padded_batch([encoded[i] for i in chosen], end)
        logps = token_logps(model(inputs, return_hidden=True), model.lm_head_weight, targets)
        loss = -logps.sum() / (targets != IGNORE_INDEX).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr, warmup=max(1, steps // 20))
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            losses.append({"step": step + 1, "loss": round(loss.item(), 4)})
    model.save_pretrained(out_dir, generation_config={"eos_token_id": [tokenizer.token_to_id("<|im_end|>")],
                                                      "pad_token_id": end})
    return losses


# ----------------------------------------------------------------------------------------------------------
# 3. The premise, in log-probabilities


@torch.no_grad()
def pair_logps_per_token(model_dir, pairs_path, max_pairs: int, pairs_per_forward: int = 8) -> dict:
    """The model's mean log-probability per token of the chosen (correct) and rejected (the teacher's wrong)
    traces of the first `max_pairs` rows of pairs.jsonl: mean over traces of logπ(y|x)/|y|, the length
    normalisation REDI uses. Close values mean the model finds the teacher's mistakes about as plausible as
    its correct work (the paper's premise); the same tokenisation and packing as train.py (data.py)."""
    model = Qwen2.from_pretrained(model_dir).eval()
    tokenizer = data.load_tokenizer(model_dir)
    pairs, _ = data.tokenize_pairs(data.load_pairs(pairs_path)[:max_pairs], tokenizer, "qwen", None)
    scorer, per_token = SequenceLogps(model), {"chosen": [], "rejected": []}
    for first in range(0, len(pairs), pairs_per_forward):
        batch = data.pack_pairs(pairs[first:first + pairs_per_forward])
        sum_logps, lengths = scorer(batch)
        values = (sum_logps / lengths.clamp(min=1)).tolist()
        per_token["chosen"] += values[0::2]
        per_token["rejected"] += values[1::2]
    return {"pairs": len(pairs), **{f"logp_per_token_{side}": sum(v) / max(len(v), 1)
                                    for side, v in per_token.items()}}
