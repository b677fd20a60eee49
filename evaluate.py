"""Evaluate a checkpoint on math problems: sample, grade, report pass@1, pass@k and maj@n.

Completions come from a KV-cached, continuously batched sampler; they are graded with verify.grade and
scored as the REDI paper reports them: pass@1 with its standard error, unbiased pass@k and maj@n.

    python evaluate.py CKPT --data ../shared/data/math500.jsonl --n 16 --temperature 0.6 --top-p 0.95 \\
        --max-new-tokens 32768 --template qwen --out runs/eval/math500
    torchrun --nproc_per_node 8 evaluate.py CKPT --data ... --num-samples 16   # problems sharded over ranks
    (under torchrun spell --n as --num-samples: torchrun's parser takes "--n" for an abbreviation of its own)

Read top to bottom:
  1. Sampling        greedy, or temperature / top-k / top-p via the Gumbel-max trick, with noise that is a
                     hash of (seed, problem, sample, step, token): the same seed gives the same samples
                     whatever the batch size, slot assignment or number of ranks, with no host RNG per token,
                     and the race can be run among the few likely tokens only.
  2. The sampler     continuous batching over the model's static KV cache (`stream_samples`, and
                     `generate`, its list-returning wrapper).
  3. Scores          pass@1 and its standard error, unbiased pass@k, maj@n, the summary and its table.
  4. Data and files  problems (validated, file:line errors), OUT/samples.jsonl written as samples finish,
                     OUT/run.json (the settings a resume must match), merging, OUT/summary.json.
  5. CLI             data parallel under torchrun (gloo is enough: ranks only wait for each other).
"""

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterator

import torch

import data
import verify
from model import Qwen2

# ----------------------------------------------------------------------------------------------------------
# 1. Sampling

MASK32 = 0xFFFFFFFF


def mix32(x):
    """The `lowbias32` integer hash (C. Wellons), a bijection of 32-bit integers:
        x ^= x >> 16;  x *= 0x7feb352d;  x ^= x >> 15;  x *= 0x846ca68b;  x ^= x >> 16   (mod 2^32).
    Works on Python ints and on int64 tensors holding values in [0, 2^32). A product may pass 2^63 in
    int64; it wraps, and the low 32 bits we keep are exact either way (a test checks against Python ints)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def sample_key(seed: int, problem_key: int, sample: int) -> int:
    """The 32-bit key of one sample's random stream: a hash chain of (seed, problem key, sample index),
    each taken mod 2^32. It names the sample, not the slot or batch it happens to run in."""
    key = 0x9E3779B9
    for value in (seed, problem_key, sample):
        key = mix32(key ^ (value & MASK32))
    return key


def uniform_from_bits(bits):
    """u = (bits // 2^9 + 1/2) / 2^23 in (0, 1): 23 random bits, so u and 1 - u are exact in fp32 and u
    is never 0 or 1 (with 24 bits the largest value would round to 1.0 and make the noise infinite)."""
    return ((bits >> 9).to(torch.float32) + 0.5) * 2.0**-23


def gumbel_from_uniform(u):
    return -torch.log(-torch.log(u))


# The noise's range, from its extreme uniforms (about -2.81 and 16.64), widened a little for rounding.
NOISE_MIN = gumbel_from_uniform(torch.tensor(2.0**-24)).item() - 1e-3
NOISE_MAX = gumbel_from_uniform(torch.tensor(1 - 2.0**-24)).item() + 1e-3


def gumbel_noise(keys, steps, token_ids):
    """Gumbel(0, 1) noise for the tokens `token_ids` [B, K] of rows whose sample has key keys[b] and is
    choosing its steps[b]-th new token: h = mix32(mix32(key ^ step) ^ v), g = -log(-log u(h)). A pure
    function of (key, step, v): the same whichever tokens, rows or slots are computed alongside. The 23
    bits bound g to [NOISE_MIN, NOISE_MAX] (a Gumbel tail of probability 6e-8 per entry is cut)."""
    row = mix32(keys ^ steps)
    return gumbel_from_uniform(uniform_from_bits(mix32(row[:, None] ^ token_ids)))


CANDIDATES = 128  # tokens considered first; a row whose draw could fall outside them is redone over all


def kept_candidates(scaled, top_p: float, top_k: int, k: int):
    """The k most probable tokens of each row (scaled = logits / T, sorted descending: values and ids
    [B, k]), which of them the filters keep, and whether that is all a draw can pick ([B] bool).

    Filters, on p = softmax(scaled): top-k keeps the top_k most probable; top-p then keeps, of those
    (renormalised), the smallest prefix whose mass reaches top_p: token r stays if the mass before it is
    < top_p, so the most probable token always stays (the order of transformers and vLLM). The k tokens
    cover the draw if top-k is on (k = top_k), if the top-p prefix ends inside them, or, with no filter,
    if no other token can win the Gumbel race: its score is at most values[k-1] + NOISE_MAX, the
    leader's at least values[0] + NOISE_MIN."""
    vocab = scaled.shape[-1]
    values, ids = scaled.topk(k, dim=-1)
    keep = torch.ones_like(values, dtype=torch.bool)
    covered = torch.ones_like(values[:, 0], dtype=torch.bool)
    if top_p < 1.0:
        log_norm = (values if top_k > 0 else scaled).logsumexp(dim=-1, keepdim=True)
        probs = (values - log_norm).exp()
        cumulative = probs.cumsum(dim=-1)
        keep = cumulative - probs < top_p
        if k < vocab and top_k <= 0:
            covered = cumulative[:, -1] >= top_p
    elif k < vocab and top_k <= 0:
        covered = values[:, -1] + NOISE_MAX < values[:, 0] + NOISE_MIN
    return values, ids, keep, covered


def sample_next(logits, temperature: float, top_p: float, top_k: int, keys, steps):
    """Next token per row [B]. Temperature 0: argmax (greedy). Otherwise the Gumbel-max trick:
    argmax_v (logits_v / T + g_v) over the kept tokens is a draw from softmax(logits / T) restricted to
    them and renormalised. `keys` [B] and `steps` [B] (int64 tensors) select each row's noise.

    The race is run among each row's top CANDIDATES tokens (top_k with top-k on); rows where they do not
    provably contain the winner are redone among 8x as many, up to the whole vocabulary. Every token's
    noise is its own, so this is the same draw as one race over the whole vocabulary."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits.float() / temperature
    vocab = scaled.shape[-1]
    k = min(vocab, top_k if top_k > 0 else CANDIDATES)
    tokens, rows = None, torch.arange(scaled.shape[0], device=scaled.device)
    while True:
        values, ids, keep, covered = kept_candidates(scaled[rows], top_p, top_k, k)
        race = values.masked_fill(~keep, -math.inf) + gumbel_noise(keys[rows], steps[rows], ids)
        chosen = ids.gather(-1, race.argmax(dim=-1, keepdim=True))[:, 0]
        all_covered = bool(covered.all())
        if tokens is None and all_covered:
            return chosen
        tokens = chosen if tokens is None else tokens.index_put_((rows[covered],), chosen[covered])
        if all_covered:
            return tokens
        rows, k = rows[~covered], min(vocab, 8 * k)


def check_sampling_args(temperature: float, top_p: float, top_k: int) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 turns it off), got {top_k}")


# ----------------------------------------------------------------------------------------------------------
# 2. The sampler: continuous batching over a static KV cache


@dataclass(frozen=True)
class Request:
    """One prompt and the sample indices to draw from it. `key` names the problem in the random stream
    (evaluate uses the problem's row in the data file, so sharding and --limit change no sample)."""

    prompt_ids: list
    key: int
    samples: tuple = (0,)


@dataclass(frozen=True)
class Finished:
    """A finished sample: its request and sample index, its new tokens (a final stop token included),
    why it stopped ("stop" or "length"), and, for inspection, the cache slot it was admitted to and the
    decode steps at which it was admitted and finished."""

    request: int
    sample: int
    tokens: list
    finish_reason: str
    slot: int
    admitted_step: int
    finished_step: int


def stream_samples(model, requests: list[Request], max_new_tokens: int, *, temperature: float = 0.0,
                   top_p: float = 1.0, top_k: int = 0, stop_ids=(), seed: int = 0,
                   batch_size: int | None = None, max_seq_len: int | None = None) -> Iterator[Finished]:
    """Draw every (request, sample) and yield each one as soon as it finishes.

    Scheduling. The cache has `batch_size` slots (default min(#samples, 64)). Requests are admitted in
    order. Whenever slots are free, the request at the head of the queue is prefilled once and its
    prompt's keys/values are written into as many free slots as it has samples waiting (model.prefill
    does the copy). If samples are left over, a copy of the prompt's keys/values and last logits is kept
    (only the head request can be part-admitted, so one copy at most) and written into slots as they
    free up: every prompt is prefilled exactly once. Every step decodes all slots, each
    at its own position, attending over kv_len = 1 + the largest active position (tracked on the host).
    A sample stops at a stop id (kept as its last token) or after min(max_new_tokens, max_seq_len -
    prompt length) tokens; its slot is refilled before the next step. Once nothing waits and at most half
    the slots are busy, the cache is shrunk to the busy slots, so a long last sample does not pay for
    idle rows. A free slot is still decoded (its output is ignored); it writes only its own cache row,
    which the next prefill overwrites before anything reads it.

    The cache holds max_seq_len positions (default: longest prompt + max_new_tokens); a prompt that
    leaves no room for one new token is an error. Host syncs per step: the sampled tokens' .tolist(), and
    when sampling at temperature > 0 the candidate check in sample_next."""
    check_sampling_args(temperature, top_p, top_k)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    total = sum(len(r.samples) for r in requests)
    if total == 0:
        return
    for i, r in enumerate(requests):
        if len(r.prompt_ids) == 0:
            raise ValueError(f"prompt {i} is empty; a prompt needs at least one token")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    longest = max(len(r.prompt_ids) for r in requests if r.samples)
    cache_len = max_seq_len or longest + max_new_tokens
    for i, r in enumerate(requests):
        if r.samples and len(r.prompt_ids) >= cache_len:
            raise ValueError(f"prompt {i} has {len(r.prompt_ids)} tokens but the KV cache holds "
                             f"max_seq_len={cache_len} positions, leaving no room for a new token; "
                             "raise max_seq_len (--max-seq-len) or drop the problem")
    num_slots = min(batch_size or 64, total)
    device = model.embed.weight.device
    stop_set = set(stop_ids)

    waiting = deque((i, list(r.samples)) for i, r in enumerate(requests) if r.samples)
    owner = [None] * num_slots  # (request, sample) per slot, None when free
    tokens = [0] * num_slots  # the last token of each slot: the next decode step's input
    positions = [0] * num_slots  # its position in the sequence
    generated = [[] for _ in range(num_slots)]
    limits = [0] * num_slots
    keys = [0] * num_slots
    admitted = [0] * num_slots  # (step, slot) of each sample's admission, for Finished
    step = 0
    saved = None  # (request, last logits, prompt keys/values) of a part-admitted head request

    def finish_if_done(slot: int, token: int):
        """Record `token` for the slot; return the Finished sample if it stops here, else None."""
        generated[slot].append(token)
        tokens[slot] = token
        positions[slot] += 1
        reason = "stop" if token in stop_set else "length" if len(generated[slot]) >= limits[slot] else None
        if reason is None:
            return None
        request, sample = owner[slot]
        owner[slot] = None
        return Finished(request, sample, generated[slot], reason, admitted[slot][1], admitted[slot][0], step)

    model.setup_cache(num_slots, cache_len)
    try:
        while True:
            free = [s for s in range(num_slots) if owner[s] is None]
            while free and waiting:
                request, pending = waiting[0]
                take, chosen = pending[:len(free)], free[:len(pending)]
                del pending[:len(take)], free[:len(take)]
                if not pending:
                    waiting.popleft()
                prompt = requests[request].prompt_ids
                if saved is not None and saved[0] == request:
                    logits = saved[1]
                    model.load_prompt_cache(saved[2], chosen)
                else:
                    logits = model.prefill(prompt, chosen)
                    if pending:
                        saved = (request, logits, model.save_prompt_cache(chosen[0], len(prompt)))
                if not pending:
                    saved = None
                for slot, sample in zip(chosen, take):
                    owner[slot], generated[slot], admitted[slot] = (request, sample), [], (step, slot)
                    positions[slot] = len(prompt) - 1  # finish_if_done advances it to the new token's
                    limits[slot] = min(max_new_tokens, cache_len - len(prompt))
                    keys[slot] = sample_key(seed, requests[request].key, sample)
                first = sample_next(logits.expand(len(chosen), -1), temperature, top_p, top_k,
                                    torch.tensor([keys[s] for s in chosen], device=device),
                                    torch.zeros(len(chosen), dtype=torch.long, device=device)).tolist()
                for slot, token in zip(chosen, first):
                    done = finish_if_done(slot, token)
                    if done is not None:
                        free.append(slot)
                        yield done
            active = [s for s in range(num_slots) if owner[s] is not None]
            if not active:
                break
            if not waiting and len(active) <= num_slots // 2:
                model.keep_cache_slots(active)
                for state in (owner, tokens, positions, generated, limits, keys, admitted):
                    state[:] = [state[s] for s in active]
                num_slots = len(active)
                active = list(range(num_slots))
            kv_len = max(positions[s] for s in active) + 1
            logits = model.decode_step(torch.tensor(tokens, device=device),
                                       torch.tensor(positions, device=device), kv_len)
            steps = torch.tensor([len(g) for g in generated], device=device)
            next_tokens = sample_next(logits, temperature, top_p, top_k,
                                      torch.tensor(keys, device=device), steps).tolist()
            step += 1
            for slot in active:
                done = finish_if_done(slot, next_tokens[slot])
                if done is not None:
                    yield done
    finally:
        model.free_cache()


def generate(model, prompts, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, stop_ids=(), seed: int = 0, batch_size: int | None = None, n: int = 1,
             max_seq_len: int | None = None) -> list[list[int]]:
    """The new tokens of n samples per prompt (prompts as token-id lists), prompt-major: sample j of
    prompt i is at i * n + j. A final stop token is included, as transformers' generate includes it."""
    requests = [Request(list(p), key=i, samples=tuple(range(n))) for i, p in enumerate(prompts)]
    out = [None] * (len(prompts) * n)
    for done in stream_samples(model, requests, max_new_tokens, temperature=temperature, top_p=top_p,
                               top_k=top_k, stop_ids=stop_ids, seed=seed, batch_size=batch_size,
                               max_seq_len=max_seq_len):
        out[done.request * n + done.sample] = done.tokens
    return out


# ----------------------------------------------------------------------------------------------------------
# 3. Scores


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with c correct among n samples (Chen et al. 2021):
    1 - C(n - c, k) / C(n, k), the chance that k samples drawn without replacement include a correct one."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_correct(answers: list, correct: list[bool], same) -> bool:
    """maj@n of one problem: group the extracted answers (None = no answer, never a vote) so that each
    answer joins the first group whose first answer it equals under `same`; the largest group wins (ties:
    the group formed first); the problem counts as solved if that group's first sample is correct."""
    groups = []  # [first answer, first sample's correctness, size]
    for answer, ok in zip(answers, correct):
        if answer is None:
            continue
        for group in groups:
            if same(answer, group[0]):
                group[2] += 1
                break
        else:
            groups.append([answer, ok, 1])
    if not groups:
        return False
    return max(groups, key=lambda g: g[2])[1]  # max keeps the first of equal sizes


def answers_equal(a: str, b: str) -> bool:
    """Equal answers for the majority vote: the same text ignoring whitespace, or equivalent by the
    grader's verify.is_equiv (symmetric: either direction suffices)."""
    if "".join(a.split()) == "".join(b.split()):
        return True
    return bool(verify.is_equiv(a, b) or verify.is_equiv(b, a))


def pass_at_k_sizes(n: int) -> list[int]:
    """k = 1, 2, 4, ... up to n, and n itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def summarize(problems: list["Problem"], rows: list[dict], n: int, same=answers_equal) -> dict:
    """Scores over problems x n samples (every sample must be present). Rates are fractions in [0, 1].
      pass@1         mean of `correct` over all samples; its standard error is over the n sample sets
                     (set j = sample j of every problem): s.d.(acc_0..acc_{n-1}, ddof=1) / sqrt(n).
      pass@k         unbiased pass@k averaged over problems, k = 1, 2, 4, ... < n, and n.
      maj@n          majority vote over extracted answers (majority_correct), averaged over problems.
      mean_response_tokens, truncated (share with finish_reason "length"), no_answer (share without an
      extracted answer); by_subject / by_level (MATH-500): problems and pass@1 per group."""
    by_id = {}
    for row in rows:
        by_id.setdefault(row["id"], {})[row["sample"]] = row
    table = []  # per problem: its n rows in sample order
    for p in problems:
        samples = by_id.get(p.id, {})
        missing = [j for j in range(n) if j not in samples]
        if missing:
            raise ValueError(f"problem {p.id!r} lacks samples {missing}; the run is incomplete")
        table.append([samples[j] for j in range(n)])
    if not table:
        raise ValueError("no problems to summarise")
    correct = [[bool(r["correct"]) for r in samples] for samples in table]
    all_rows = [r for samples in table for r in samples]
    set_accuracy = [sum(c[j] for c in correct) / len(correct) for j in range(n)]
    pass1 = sum(map(sum, correct)) / len(all_rows)
    stderr = (math.sqrt(sum((a - pass1) ** 2 for a in set_accuracy) / (n - 1) / n) if n > 1 else None)
    summary = {
        "problems": len(table), "n": n, "samples": len(all_rows),
        "pass@1": pass1, "pass@1_stderr": stderr,
        "pass@k": {str(k): sum(pass_at_k(n, sum(c), k) for c in correct) / len(correct)
                   for k in pass_at_k_sizes(n)},
        f"maj@{n}": sum(majority_correct([r["answer"] for r in samples], c, same)
                        for samples, c in zip(table, correct)) / len(table),
        "mean_response_tokens": sum(r["num_tokens"] for r in all_rows) / len(all_rows),
        "truncated": sum(r["finish_reason"] == "length" for r in all_rows) / len(all_rows),
        "no_answer": sum(r["answer"] is None for r in all_rows) / len(all_rows),
    }
    for field in ("subject", "level"):
        groups = {}
        for p, c in zip(problems, correct):
            if getattr(p, field) is not None:
                groups.setdefault(str(getattr(p, field)), []).append(c)
        if groups:
            summary[f"by_{field}"] = {name: {"problems": len(cs), "pass@1": sum(map(sum, cs)) / (len(cs) * n)}
                                      for name, cs in sorted(groups.items())}
    return summary


def format_table(summary: dict, title: str) -> str:
    """The summary as a small text table, rates in percent."""
    n = summary["n"]
    pct = lambda x: f"{100 * x:6.2f} %"
    stderr = summary["pass@1_stderr"]
    pass1 = f"  pass@1      {pct(summary['pass@1'])}"
    lines = [f"{title}: {summary['problems']} problems x {n} samples",
             pass1 + (f"  +- {100 * stderr:.2f} (standard error)" if stderr is not None else "")]
    lines += [f"  pass@{k:<7}{pct(v)}" for k, v in summary["pass@k"].items() if k != "1"]
    lines += [f"  maj@{n:<8}{pct(summary[f'maj@{n}'])}",
              f"  mean length {summary['mean_response_tokens']:8.1f} tokens",
              f"  truncated   {pct(summary['truncated'])}",
              f"  no answer   {pct(summary['no_answer'])}"]
    for field in ("subject", "level"):
        if f"by_{field}" in summary:
            lines.append(f"  by {field}:")
            lines += [f"    {name:<28}{g['problems']:>5}  {pct(g['pass@1'])}"
                      for name, g in summary[f"by_{field}"].items()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# 4. Data and files


@dataclass(frozen=True)
class Problem:
    index: int  # row number in the data file (0-based): the problem's key in the random stream
    id: str
    problem: str
    answer: str
    subject: str | None
    level: int | str | None


def read_problems(path) -> list[Problem]:
    """Rows with `problem` and `answer` (and optionally id / unique_id, subject, level). The id is the
    row's `id`, else `unique_id`, else its row index. A number as answer is accepted as its text (AIME
    answers elsewhere are numbers); anything else wrong stops with file:line."""
    problems, seen = [], {}
    for line_no, row in data.read_jsonl(path):
        where = f"{path}:{line_no}"
        problem, answer = row.get("problem"), row.get("answer")
        if not isinstance(problem, str) or not problem.strip():
            raise ValueError(f"{where}: needs a non-empty string 'problem' (has {sorted(row)})")
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or not str(answer).strip():
            raise ValueError(f"{where}: needs an 'answer' (the gold final answer, a string) "
                             f"(has {sorted(row)})")
        if isinstance(answer, float) and answer.is_integer():
            answer = int(answer)
        index = len(problems)
        problem_id = str(row.get("id", row.get("unique_id", index)))
        if problem_id in seen:
            raise ValueError(f"{where}: id {problem_id!r} already used at {path}:{seen[problem_id]}; "
                             "ids must be unique")
        seen[problem_id] = line_no
        problems.append(Problem(index, problem_id, problem, str(answer), row.get("subject"), row.get("level")))
    if not problems:
        raise ValueError(f"{path}: no rows")
    return problems


def read_samples(path) -> tuple[list[dict], int]:
    """The rows of a samples file and the number of incomplete lines at its end (a run killed while
    writing leaves at most one, without its newline). A bad line anywhere else is an error: file:line."""
    if not os.path.exists(path):
        return [], 0
    rows, partial = [], 0
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.endswith("\n"):  # only the last line can lack its newline
                partial = 1
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg}); fix or delete the "
                                 "line") from None
            if not isinstance(row, dict) or "id" not in row or "sample" not in row:
                raise ValueError(f"{path}:{line_no}: not a sample row (needs 'id' and 'sample')")
            rows.append(row)
    return rows, partial


def drop_partial_line(path) -> None:
    """Cut an unfinished last line off a samples file before appending to it (else the next row would be
    glued onto the fragment)."""
    with open(path, "rb+") as f:
        content = f.read()
        f.truncate(content.rfind(b"\n") + 1)


def file_sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def run_fingerprint(args, dtype: torch.dtype) -> dict:
    """Every setting that changes the samples. Not batch size, device or world size: they change results
    only through floating-point rounding. Not --limit: a longer run may extend a shorter one. The
    checkpoint is identified by its path and its weight files' sizes and modification times."""
    weights = sorted(f for f in os.listdir(args.checkpoint) if f.endswith(".safetensors") or f == "config.json")
    stats = {f: [os.path.getsize(os.path.join(args.checkpoint, f)),
                 os.path.getmtime(os.path.join(args.checkpoint, f))] for f in weights}
    return {"checkpoint": os.path.abspath(args.checkpoint), "checkpoint_files": stats,
            "data": os.path.abspath(args.data), "data_sha256": file_sha256(args.data),
            "template": args.template, "n": args.n, "temperature": args.temperature, "top_p": args.top_p,
            "top_k": args.top_k, "max_new_tokens": args.max_new_tokens, "max_seq_len": args.max_seq_len,
            "seed": args.seed, "dtype": str(dtype).removeprefix("torch.")}


def check_run_file(out_dir, fingerprint: dict) -> bool:
    """Compare with OUT/run.json; True if it exists and matches, False if absent, an error if it differs
    (the samples there were drawn with other settings and must not be mixed with these)."""
    path = os.path.join(out_dir, "run.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        stored = json.load(f)
    current = json.loads(json.dumps(fingerprint))  # the same JSON round trip as the stored copy
    differ = [f"{k}: {stored.get(k)!r} there, {current.get(k)!r} now"
              for k in sorted(set(stored) | set(current)) if stored.get(k) != current.get(k)]
    if differ:
        raise SystemExit(f"{path}: this output directory holds samples of a run with other settings "
                         f"({'; '.join(differ)}); pick another --out, or delete {out_dir} to start over")
    return True


def sample_files(out_dir) -> list[str]:
    """OUT/samples.jsonl and any per-rank files of a data-parallel run, in a fixed order."""
    names = sorted(f for f in os.listdir(out_dir) if f.startswith("samples.rank") and f.endswith(".jsonl"))
    return [os.path.join(out_dir, "samples.jsonl")] + [os.path.join(out_dir, f) for f in names]


def load_done(out_dir) -> tuple[list[dict], int]:
    """All sample rows already written (deduplicated on (id, sample), first kept) and the number of
    unfinished lines found."""
    rows, partial, seen = [], 0, set()
    for path in sample_files(out_dir):
        file_rows, file_partial = read_samples(path)
        partial += file_partial
        for row in file_rows:
            if (row["id"], row["sample"]) not in seen:
                seen.add((row["id"], row["sample"]))
                rows.append(row)
    return rows, partial


def merge_samples(out_dir, problems: list[Problem]) -> list[dict]:
    """Rewrite OUT/samples.jsonl with every row, ordered by (data row, sample), and remove the per-rank
    files it absorbed. Returns the rows."""
    rows, _ = load_done(out_dir)
    order = {p.id: p.index for p in problems}
    rows.sort(key=lambda r: (order.get(r["id"], len(order)), str(r["id"]), r["sample"]))
    path = os.path.join(out_dir, "samples.jsonl")
    data.write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    for other in sample_files(out_dir)[1:]:
        os.remove(other)
    return rows


def sample_row(problem: Problem, sample: int, prompt_text: str, tokens: list[int], finish_reason: str,
               tokenizer) -> dict:
    """One line of samples.jsonl. The completion is the decoded new tokens without the final stop token
    (special tokens such as </think> kept); num_tokens counts every new token, the stop token included."""
    body = tokens[:-1] if finish_reason == "stop" else tokens
    completion = tokenizer.decode(body, skip_special_tokens=False)
    return {"id": problem.id, "sample": sample, "prompt": prompt_text, "completion": completion,
            "answer": verify.extract_answer(completion), "gold": problem.answer,
            "correct": bool(verify.grade(completion, problem.answer)), "num_tokens": len(tokens),
            "finish_reason": finish_reason}


class Progress:
    """A line every `every` seconds: samples done, new tokens per second, estimated time left."""

    def __init__(self, total: int, prefix: str = "", every: float = 10.0):
        self.total, self.prefix, self.every = total, prefix, every
        self.done = self.tokens = 0
        self.start = self.last = time.time()

    def update(self, num_tokens: int) -> None:
        self.done += 1
        self.tokens += num_tokens
        now = time.time()
        if now - self.last >= self.every or self.done == self.total:
            self.last = now
            elapsed = max(now - self.start, 1e-9)
            eta = (self.total - self.done) * elapsed / self.done
            print(f"{self.prefix}samples {self.done}/{self.total} | {self.tokens / elapsed:.1f} tok/s | "
                  f"ETA {int(eta) // 3600}:{int(eta) % 3600 // 60:02d}:{int(eta) % 60:02d}",
                  file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# 5. CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="checkpoint directory (config.json, safetensors, tokenizer.json)")
    p.add_argument("--data", required=True, help="JSONL with problem and answer (optional id, subject, level)")
    # --num-samples: torchrun's own parser rejects "--n" as an ambiguous abbreviation of its options.
    p.add_argument("--n", "--num-samples", dest="n", type=int, default=16, help="samples per problem")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--max-new-tokens", type=int, default=32768)
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="KV cache length: prompt + new tokens (default: longest prompt + max-new-tokens)")
    p.add_argument("--template", default="qwen", choices=["qwen", "r1"])
    p.add_argument("--batch-size", type=int, default=None, help="KV cache slots (default min(#samples, 64))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="only the first K problems")
    p.add_argument("--out", default=None, help="output directory (default runs/eval/<data name>)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", default=None, help="default: cuda if available (cuda:LOCAL_RANK), else cpu")
    args = p.parse_args(argv)
    for flag in ("n", "max_new_tokens"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be >= 1")
    try:
        check_sampling_args(args.temperature, args.top_p, args.top_k)
    except ValueError as e:
        p.error(str(e))
    if args.out is None:
        args.out = os.path.join("runs", "eval", os.path.splitext(os.path.basename(args.data))[0])
    return args


def init_distributed() -> tuple[int, int]:
    """(rank, world size) under torchrun, (0, 1) otherwise. gloo suffices (ranks only wait at barriers);
    the timeout is long because ranks finish their shards at different times."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    return dist.get_rank(), world


def barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def main(argv=None) -> dict | None:
    """Evaluate; returns the summary on rank 0 (None on other ranks)."""
    args = parse_args(argv)
    rank, world = init_distributed()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"  # one GPU per rank under torchrun
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(
        args.dtype, torch.bfloat16 if device.startswith("cuda") else torch.float32)
    prefix = f"[rank {rank}] " if world > 1 else ""

    all_problems = read_problems(args.data)
    problems = all_problems[:args.limit]
    tokenizer = data.load_tokenizer(args.checkpoint)
    template = data.TEMPLATES[args.template]
    stop_ids = []
    for token in template.stop_tokens:
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise SystemExit(f"{args.checkpoint}/tokenizer.json has no token {token!r}, a stop token of "
                             f"--template {args.template}; is this the right template for the checkpoint?")
        stop_ids.append(token_id)

    # Settings and resume: every rank checks run.json and reads what is done before any rank writes.
    os.makedirs(args.out, exist_ok=True)
    fingerprint = run_fingerprint(args, dtype)
    had_run_file = check_run_file(args.out, fingerprint)
    done_rows, partial = load_done(args.out)
    if done_rows and not had_run_file:
        raise SystemExit(f"{args.out} holds samples but no run.json, so their settings are unknown; pick "
                         "another --out, or delete the directory to start over")
    barrier(world)
    if rank == 0 and not had_run_file:
        data.write_atomic(os.path.join(args.out, "run.json"), json.dumps(fingerprint, indent=2) + "\n")
    done = {(r["id"], r["sample"]) for r in done_rows}
    mine = [p for p in problems if p.index % world == rank]
    messages = {p.index: data.problem_messages(p.problem, template) for p in mine}
    todo = [(p, tuple(j for j in range(args.n) if (p.id, j) not in done)) for p in mine]
    todo = [(p, samples) for p, samples in todo if samples]
    num_todo = sum(len(s) for _, s in todo)
    print(f"{prefix}{len(mine)} problems x {args.n} samples: {len(mine) * args.n - num_todo} already in "
          f"{args.out}, {num_todo} to generate" + (f"; dropped {partial} unfinished line(s) of an interrupted "
                                                  "run (those samples are redone)" if partial else ""),
          file=sys.stderr, flush=True)

    own_file = os.path.join(args.out, "samples.jsonl" if world == 1 else f"samples.rank{rank}.jsonl")
    if os.path.exists(own_file):
        drop_partial_line(own_file)
    if todo:
        model = Qwen2.from_pretrained(args.checkpoint, dtype=dtype, device=device)
        requests = [Request(data.encode_prompt(tokenizer, template, messages[p.index]), key=p.index,
                            samples=samples) for p, samples in todo]
        for (p, _), r in zip(todo, requests):
            if args.max_seq_len is not None and len(r.prompt_ids) >= args.max_seq_len:
                raise SystemExit(f"{args.data}: problem {p.id!r} has a {len(r.prompt_ids)}-token prompt, "
                                 f"which leaves no room in --max-seq-len {args.max_seq_len}; raise it or drop "
                                 "the problem")
        progress = Progress(num_todo, prefix)
        with open(own_file, "a", encoding="utf-8") as f:
            for finished in stream_samples(model, requests, args.max_new_tokens, temperature=args.temperature,
                                           top_p=args.top_p, top_k=args.top_k, stop_ids=stop_ids,
                                           seed=args.seed, batch_size=args.batch_size,
                                           max_seq_len=args.max_seq_len):
                problem = todo[finished.request][0]
                row = sample_row(problem, finished.sample, template.prompt_text(messages[problem.index]),
                                 finished.tokens, finished.finish_reason, tokenizer)
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
                progress.update(len(finished.tokens))
        del model

    barrier(world)
    summary = None
    if rank == 0:
        rows = merge_samples(args.out, all_problems)
        summary = summarize(problems, rows, args.n)
        summary["settings"] = fingerprint
        data.write_atomic(os.path.join(args.out, "summary.json"), json.dumps(summary, indent=2) + "\n")
        print(format_table(summary, os.path.basename(args.data)))
        print(f"wrote {os.path.join(args.out, 'samples.jsonl')} and {os.path.join(args.out, 'summary.json')}")
    if world > 1:
        torch.distributed.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
