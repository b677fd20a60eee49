"""Evaluate a checkpoint on math problems: sample, grade, report pass@1 (with its standard error), pass@k, maj@n.

    python evaluate.py CKPT --data ../shared/data/math500.jsonl --protocol redi --out runs/eval/math500
    torchrun --nproc_per_node 8 evaluate.py CKPT --data ... --protocol redi   # problems sharded over ranks

--protocol redi is the paper's evaluation (appendix C.5, the authors' README, rllm): their prompt with a forced
`<think>`, 16 samples at T 0.6 / top-p 0.95 / 32,768 new tokens, a response without `</think>` scored 0, and
the standard error std(ddof 0) / sqrt(n). Flags given explicitly override a protocol's settings.

Read top to bottom:
  1. Sampling        greedy, or the Gumbel-max trick with noise hashed from (seed, problem, sample, step, token):
                     the same samples whatever the batch size, slot or number of ranks.
  2. The sampler     continuous batching over the model's static KV cache: a Slot per row, admit() and step();
                     optionally a compiled decode step (torch.compile; CUDA graphs on CUDA).
  3. Scores          pass@1 and its standard error, unbiased pass@k, maj@n, the summary and its table.
  4. Files           OUT/samples.jsonl appended as samples finish (a file per rank under torchrun, merged at the
                     end), OUT/run.json (the settings a resume must match). Problems: data.read_problems.
  5. CLI             protocols, every input checked before anything is written, data parallel under torchrun.
"""

import argparse
import contextlib
import json
import math
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import torch

import common
import data
import verify
from common import InputError
from model import DTYPES, Qwen2, checkpoint_files

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
    rows = torch.arange(scaled.shape[0], device=scaled.device)
    tokens = torch.empty_like(rows)
    while True:
        values, ids, keep, covered = kept_candidates(scaled[rows], top_p, top_k, k)
        race = values.masked_fill(~keep, -math.inf) + gumbel_noise(keys[rows], steps[rows], ids)
        tokens[rows] = ids.gather(-1, race.argmax(dim=-1, keepdim=True))[:, 0]  # uncovered rows: redone below
        if bool(covered.all()):  # k = vocab covers every row
            return tokens
        rows, k = rows[~covered], min(vocab, 8 * k)


def check_sampling_args(temperature: float, top_p: float, top_k: int) -> None:
    """The one check of the sampling settings (the CLI reports it as a flag error)."""
    if not 0 <= temperature < math.inf:
        raise InputError(f"temperature (--temperature) must be finite and >= 0 (0 is greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise InputError(f"top_p (--top-p) must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise InputError(f"top_k (--top-k) must be >= 0 (0 turns it off), got {top_k}")


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
    """A finished sample: new tokens (a final stop token included), finish_reason "stop" or "length"."""
    request: int
    sample: int
    tokens: list
    finish_reason: str


@dataclass
class Slot:
    """One row of the KV cache and the sample it is drawing."""
    request: int | None = None  # the request being sampled; None: the slot is free
    sample: int = 0
    key: int = 0  # the sample's random stream (sample_key)
    position: int = 0  # the position of the last token, the next decode step's input
    limit: int = 0  # how many new tokens the sample may have
    prompt: int | None = None  # the request whose prompt fills this row's first positions (kept when done)
    tokens: list = field(default_factory=list)  # the new tokens so far

    def add(self, token: int, stop_ids: set) -> str | None:
        """Append a token; why the sample ends there ("stop" or "length"), else None."""
        self.tokens.append(token)
        self.position += 1
        return "stop" if token in stop_ids else "length" if len(self.tokens) >= self.limit else None


class ContinuousBatch:
    """The sampler's state: the requests waiting (only the head can be part-admitted), the slots, and the
    head's last prompt logits. admit() fills free slots, step() decodes every slot once, shrink() drops
    idle rows. A sample stops at a stop id (kept as its last token) or after its limit."""

    def __init__(self, model, requests, max_new_tokens, cache_len, num_slots, sampling, stop_ids, seed, compile):
        self.model, self.requests, self.sampling, self.seed = model, requests, sampling, seed
        self.max_new_tokens, self.cache_len, self.stop_ids = max_new_tokens, cache_len, set(stop_ids)
        self.device, self.compiled = model.embed.weight.device, compile
        self.waiting = deque((i, list(r.samples)) for i, r in enumerate(requests) if r.samples)
        self.slots, self.head_logits = [Slot() for _ in range(num_slots)], None
        self.decode = model.compiled_decode_step() if compile else model.decode_step
        self.new_tokens = 0  # drawn so far, for progress lines

    def record(self, logits, slots: list[Slot]) -> Iterator[Finished]:
        """Sample each busy slot's next token from its logits row; yield the samples that end there (their
        slots are then free)."""
        keys = torch.tensor([s.key for s in slots], device=self.device)
        steps = torch.tensor([len(s.tokens) for s in slots], device=self.device)
        tokens = sample_next(logits, *self.sampling, keys, steps).tolist()
        self.new_tokens += sum(slot.request is not None for slot in slots)
        for slot, token in zip(slots, tokens):
            if slot.request is not None and (reason := slot.add(token, self.stop_ids)):
                request, slot.request = slot.request, None
                yield Finished(request, slot.sample, slot.tokens, reason)

    def admit(self) -> Iterator[Finished]:
        """Hand free slots to the head request's waiting samples, head after head, until no slot is free or
        nothing waits. A prompt is prefilled once: a part-admitted head's later samples copy its keys/values
        from a slot holding them. A sample's first token comes from the prompt's last logits."""
        while self.waiting and (free := [s for s, slot in enumerate(self.slots) if slot.request is None]):
            request, pending = self.waiting[0]
            take, chosen = pending[:len(free)], free[:len(pending)]
            del pending[:len(take)]
            if not pending:
                self.waiting.popleft()
            r = self.requests[request]
            source = next((s for s, slot in enumerate(self.slots) if slot.prompt == request), None)
            if source is None:
                self.head_logits = self.model.prefill(r.prompt_ids, chosen)
            else:
                self.model.copy_prompt(source, chosen, len(r.prompt_ids))
            limit = min(self.max_new_tokens, self.cache_len - len(r.prompt_ids))
            for s, sample in zip(chosen, take):  # position: the prompt's last; add() moves it to the first token's
                self.slots[s] = Slot(request, sample, sample_key(self.seed, r.key, sample), len(r.prompt_ids) - 1,
                                     limit, prompt=request)
            yield from self.record(self.head_logits.expand(len(chosen), -1), [self.slots[s] for s in chosen])

    def step(self) -> Iterator[Finished]:
        """Decode every slot once (a free one too: it writes only its own row, past its prompt, and its output
        is ignored). Each row attends over its own length only (Qwen2.decode_step: runs of slots; compiled: a
        block mask), so one long sample does not make every row read its length."""
        if self.compiled and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed
        logits = self.decode(torch.tensor([s.tokens[-1] if s.tokens else 0 for s in self.slots], device=self.device),
                             torch.tensor([s.position for s in self.slots], device=self.device))
        yield from self.record(logits, self.slots)

    def shrink(self) -> None:
        """Once nothing waits, halve the cache while at most half its rows are busy (rows kept: a power of two,
        busy ones first), so that a long last sample does not pay for idle rows."""
        busy = [s for s, slot in enumerate(self.slots) if slot.request is not None]
        target = 1 << (len(busy) - 1).bit_length()
        if self.waiting or target > len(self.slots) // 2:
            return
        keep = busy + [s for s, slot in enumerate(self.slots) if slot.request is None][:target - len(busy)]
        self.model.keep_cache_slots(keep)
        self.slots = [self.slots[s] for s in keep]


def stream_samples(model, requests: list[Request], max_new_tokens: int, *, temperature: float = 0.0,
                   top_p: float = 1.0, top_k: int = 0, stop_ids=(), seed: int = 0, batch_size: int | None = None,
                   max_seq_len: int | None = None, compile: bool = False, on_step=None) -> Iterator[Finished]:
    """Draw every (request, sample) and yield each one as soon as it finishes. The cache has `batch_size`
    slots (default min(#samples, 64)) of max_seq_len positions; requests are admitted in order as slots free
    up (ContinuousBatch); every step decodes all slots, each at its own position. A sample has at most
    min(max_new_tokens, max_seq_len - prompt length) new tokens; every prompt must leave room for one. Host
    syncs per step: the sampled tokens' .tolist(), and at temperature > 0 the candidate check. compile: the
    decode step compiled (the same tokens). on_step(new_tokens): called after every decode step, once the
    samples it finished have been yielded and their slots refilled, with the number of new tokens drawn so
    far (progress lines between finished samples)."""
    check_sampling_args(temperature, top_p, top_k)
    if max_new_tokens < 1 or (batch_size is not None and batch_size < 1):
        raise InputError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens} and {batch_size}")
    total = sum(len(r.samples) for r in requests)
    if total == 0:
        return
    cache_len = max_seq_len or max(len(r.prompt_ids) for r in requests if r.samples) + max_new_tokens
    for i, r in enumerate(requests):
        if not r.prompt_ids:
            raise InputError(f"prompt {i} is empty; a prompt needs at least one token")
        if r.samples and len(r.prompt_ids) >= cache_len:
            raise InputError(f"prompt {i} has {len(r.prompt_ids)} tokens but the KV cache holds max_seq_len="
                             f"{cache_len} positions, leaving no room for a new token; raise max_seq_len")
    num_slots = min(batch_size or 64, total)
    batch = ContinuousBatch(model, requests, max_new_tokens, cache_len, num_slots, (temperature, top_p, top_k),
                            stop_ids, seed, compile)
    model.setup_cache(num_slots, cache_len)
    try:
        while True:
            yield from batch.admit()
            if on_step is not None:
                on_step(batch.new_tokens)
            if all(slot.request is None for slot in batch.slots):
                break
            batch.shrink()
            yield from batch.step()
    finally:
        model.free_cache()


def generate(model, prompts, max_new_tokens: int, n: int = 1, **kwargs) -> list[list[int]]:
    """The new tokens of n samples per prompt (token-id lists), prompt-major: sample j of prompt i is at
    i * n + j; a final stop token included, as in transformers' generate. kwargs: as stream_samples."""
    requests = [Request(list(p), key=i, samples=tuple(range(n))) for i, p in enumerate(prompts)]
    out = [None] * (len(prompts) * n)
    for done in stream_samples(model, requests, max_new_tokens, **kwargs):
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
        group = next((g for g in groups if same(answer, g[0])), None)
        if group is None:
            groups.append([answer, ok, 1])
        else:
            group[2] += 1
    return bool(groups) and max(groups, key=lambda g: g[2])[1]  # max keeps the first of equal sizes


def answers_equal(a: str, b: str) -> bool:
    """Equal answers for the majority vote: the same text ignoring whitespace, or equivalent by the
    grader's verify.is_equiv (symmetric: either direction suffices)."""
    return "".join(a.split()) == "".join(b.split()) or bool(verify.is_equiv(a, b) or verify.is_equiv(b, a))


def pass_at_k_sizes(n: int) -> list[int]:
    """k = 1, 2, 4, ... up to n, and n itself."""
    return [1 << i for i in range(max(n - 1, 0).bit_length())] + [n]


def summarize(problems: list[data.Problem], rows: list[dict], n: int, same=answers_equal, ddof: int = 1) -> dict:
    """Scores over problems x n samples (every sample must be present). Rates are fractions in [0, 1].
      pass@1         mean of `correct`; its standard error is over the n sample sets (set j = sample j of
                     every problem): s.d.(acc_0..acc_{n-1}) / sqrt(n), the s.d. with `ddof` (1: the sample
                     s.d.; 0: numpy's default, as the paper computes it: Tim-Siu/reinforcement-distillation
                     rllm/verl/verl/trainer/main_generation.py:207-208, np.std(np.mean(scores, axis=0))).
      pass@k         unbiased pass@k averaged over problems, k = 1, 2, 4, ... < n, and n.
      maj@n          majority vote over extracted answers (majority_correct), averaged over problems.
      mean_response_tokens, truncated (share with finish_reason "length"), no_answer (share without an
      extracted answer); by_subject / by_level (MATH-500): problems and pass@1 per group."""
    by_key = {(r["id"], r["sample"]): r for r in rows}
    table = []  # per problem: its n rows in sample order
    for p in problems:
        if missing := [j for j in range(n) if (p.id, j) not in by_key]:
            raise InputError(f"problem {p.id!r} lacks samples {missing}; the run is incomplete")
        table.append([by_key[p.id, j] for j in range(n)])
    correct = [[bool(r["correct"]) for r in samples] for samples in table]
    all_rows = [r for samples in table for r in samples]
    set_accuracy = [sum(c[j] for c in correct) / len(correct) for j in range(n)]
    pass1 = sum(map(sum, correct)) / len(all_rows)
    stderr = math.sqrt(sum((a - pass1) ** 2 for a in set_accuracy) / (n - ddof) / n) if n > ddof else None
    share = lambda test: sum(map(test, all_rows)) / len(all_rows)
    summary = {"problems": len(table), "n": n, "samples": len(all_rows), "pass@1": pass1,
               "pass@1_stderr": stderr, "pass@1_stderr_ddof": ddof,
               "pass@k": {str(k): sum(pass_at_k(n, sum(c), k) for c in correct) / len(correct)
                          for k in pass_at_k_sizes(n)},
               f"maj@{n}": sum(majority_correct([r["answer"] for r in samples], c, same)
                               for samples, c in zip(table, correct)) / len(table),
               "mean_response_tokens": share(lambda r: r["num_tokens"]),
               "truncated": share(lambda r: r["finish_reason"] == "length"),
               "no_answer": share(lambda r: r["answer"] is None)}
    for key in ("subject", "level"):
        groups = {}
        for p, c in zip(problems, correct):
            if getattr(p, key) is not None:
                groups.setdefault(str(getattr(p, key)), []).append(c)
        if groups:
            summary[f"by_{key}"] = {name: {"problems": len(cs), "pass@1": sum(map(sum, cs)) / (len(cs) * n)}
                                    for name, cs in sorted(groups.items())}
    return summary


def format_table(summary: dict, title: str) -> str:
    """The summary as a small text table, rates in percent."""
    n, stderr = summary["n"], summary["pass@1_stderr"]
    pct = lambda x: f"{100 * x:6.2f} %"
    lines = [f"{title}: {summary['problems']} problems x {n} samples",
             f"  pass@1      {pct(summary['pass@1'])}"
             + (f"  +- {100 * stderr:.2f} (standard error)" if stderr is not None else "")]
    lines += [f"  pass@{k:<7}{pct(v)}" for k, v in summary["pass@k"].items() if k != "1"]
    lines += [f"  maj@{n:<8}{pct(summary[f'maj@{n}'])}", f"  mean length {summary['mean_response_tokens']:8.1f} "
              f"tokens", f"  truncated   {pct(summary['truncated'])}", f"  no answer   {pct(summary['no_answer'])}"]
    for key in ("subject", "level"):
        if f"by_{key}" in summary:
            lines.append(f"  by {key}:")
            lines += [f"    {name:<28}{g['problems']:>5}  {pct(g['pass@1'])}"
                      for name, g in summary[f"by_{key}"].items()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# 4. Files


def load_done(out_dir) -> tuple[list[dict], int]:
    """The sample rows in OUT so far, one per (id, sample), and how many files end in an unfinished line (a run
    killed while writing leaves one: its sample is redone). See common.read_shards."""
    return common.read_shards(out_dir, "samples", ("id", "sample"), "a damaged samples file: delete that line "
                              "(its sample is then redone) or pick another --out")


def merge_samples(out_dir, problems: list[data.Problem]) -> list[dict]:
    """Rewrite OUT/samples.jsonl with every row, ordered by (data row, sample), then remove the per-rank files
    it absorbed. Returns the rows."""
    rows, _ = load_done(out_dir)
    order = {p.id: p.index for p in problems}
    rows.sort(key=lambda r: (order.get(r["id"], len(order)), str(r["id"]), r["sample"]))
    common.merge_shards(out_dir, "samples", rows)
    return rows


def run_fingerprint(args, dtype: torch.dtype) -> dict:
    """Every setting that changes the samples or their grades. Not batch size, device, world size or
    --compile: they change results only through floating-point rounding. Not --limit: a longer run may
    extend a shorter one. The checkpoint is identified by its path and its files' sizes and times."""
    files = checkpoint_files(args.checkpoint) + [os.path.join(args.checkpoint, "config.json")]
    keys = ("protocol", "template", "strict_think", "num_samples", "temperature", "top_p", "top_k",
            "max_new_tokens", "max_seq_len", "seed")
    return {"checkpoint": os.path.abspath(args.checkpoint),
            "checkpoint_files": {os.path.basename(f): [os.path.getsize(f), os.path.getmtime(f)] for f in files},
            "data": os.path.abspath(args.data), "data_sha256": common.sha256_file(args.data),
            **{k: getattr(args, k) for k in keys}, "dtype": str(dtype).removeprefix("torch.")}


def sample_row(problem: data.Problem, prompt_text: str, done: Finished, tokenizer, strict_think: bool) -> dict:
    """One line of samples.jsonl. The completion is the decoded new tokens without the final stop token
    (special tokens such as </think> kept): the generated text only, so under a template that ends the prompt
    with `<think>\\n` it starts after it. strict_think: no `</think>`, no answer (rllm's rule). num_tokens
    counts every new token, the stop token included."""
    tokens = done.tokens[:-1] if done.finish_reason == "stop" else done.tokens
    completion = tokenizer.decode(tokens, skip_special_tokens=False)
    return {"id": problem.id, "sample": done.sample, "prompt": prompt_text, "completion": completion,
            "answer": verify.extract_answer(completion, require_think_close=strict_think), "gold": problem.answer,
            "correct": verify.grade(completion, problem.answer, require_think_close=strict_think),
            "num_tokens": len(done.tokens), "finish_reason": done.finish_reason}


# ----------------------------------------------------------------------------------------------------------
# 5. CLI

# Settings bundles (see the module docstring); a flag given on the command line overrides its protocol's value.
# default: Qwen2.5-Math's chat template, lenient grading, the sample s.d. (ddof 1) in the standard error; redi:
# as the paper (module docstring), rllm's std(ddof 0) (rllm/verl/verl/trainer/main_generation.py:207-208).
SAMPLING = {"num_samples": 16, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 32768}  # the paper's
PROTOCOLS = {"default": {"template": "qwen", "strict_think": False, "stderr_ddof": 1, **SAMPLING},
             "redi": {"template": "redi", "strict_think": True, "stderr_ddof": 0, **SAMPLING}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.splitlines()[0], allow_abbrev=False)
    add = p.add_argument
    add("checkpoint", help="checkpoint directory (config.json, *.safetensors, tokenizer.json)")
    add("--data", required=True, help="JSONL, a problem per line: 'problem', 'answer' (optional 'id' or "
        "'unique_id', 'subject', 'level')")
    add("--protocol", choices=sorted(PROTOCOLS), default="default", help="settings bundle: 'redi' is the paper's "
        "evaluation (prompt, forced <think>, strict grading, ddof-0 standard error) (default: default)")
    add("--template", choices=sorted(data.TEMPLATES), help="chat template (default: qwen; redi under --protocol redi)")
    # One name: torchrun's parser rejects "--n" anywhere on its command line (ambiguous with its own options).
    add("--num-samples", type=common.COUNT, help="samples per problem (default: 16)")
    add("--temperature", type=float, help="0 = greedy (default: 0.6)")
    add("--top-p", type=float, help="nucleus filter, in (0, 1] (default: 0.95)")
    add("--top-k", type=int, default=0, help="keep the k most probable tokens, 0 = off (default: 0)")
    add("--max-new-tokens", type=common.COUNT, help="new tokens per sample at most (default: 32768)")
    add("--max-seq-len", type=common.COUNT, help="KV cache positions (default: longest prompt + --max-new-tokens)")
    add("--batch-size", type=common.COUNT, help="KV cache slots (default: min(#samples, 64))")
    add("--seed", type=common.SEED32, default=0, help="sampling seed (default: 0)")
    add("--limit", type=common.COUNT, help="only the first K problems (default: all)")
    add("--out", help="output directory, one run at a time (default: runs/eval/<data file name>)")
    add("--dtype", choices=["bf16", "fp32"], help="(default: bf16 on CUDA, fp32 on CPU)")
    add("--device", type=common.DEVICE, help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK if CUDA is available, "
        "else cpu)")
    add("--dist-timeout", type=common.MINUTES, default=30, help="under torchrun, minutes a rank may go without "
        "finishing a sample (or a collective wait) before the run stops and names it (default: 30)")
    add("--compile", action=argparse.BooleanOptionalAction, help="decode through torch.compile (CUDA graphs on "
        "CUDA), the same greedy tokens (default: on with CUDA, off on CPU)")
    return p


def parse_args(argv=None):
    """The flags, the protocol's settings where none was given, the sampling settings checked."""
    args = build_parser().parse_args(argv)
    for key, value in PROTOCOLS[args.protocol].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    check_sampling_args(args.temperature, args.top_p, args.top_k)
    args.out = args.out or os.path.join("runs", "eval", os.path.splitext(os.path.basename(args.data))[0])
    return args


def load_tokenizer(checkpoint):
    """The checkpoint's tokenizer, checked against its config (data.load_tokenizer)."""
    if not os.path.isdir(checkpoint):
        raise InputError(f"{checkpoint}: no such checkpoint directory; pass one holding config.json, "
                         "*.safetensors and tokenizer.json")
    return data.load_tokenizer(checkpoint)


def make_requests(args, mine: list[data.Problem], done: set, tokenizer, template) -> tuple[list[Request], list]:
    """The sampler's requests for the samples of `mine` not `done` yet, and per request its (problem, prompt
    text). The prompts are checked (template tokens, forged turn markers, room in --max-seq-len) before any
    weight is loaded."""
    requests, sources = [], []
    for p in mine:
        samples = tuple(j for j in range(args.num_samples) if (p.id, j) not in done)
        if not samples:
            continue
        messages = data.problem_messages(p.problem, template)
        try:
            ids = data.encode_prompt(tokenizer, template, messages)
        except ValueError as e:
            raise InputError(f"{args.data}: problem {p.id!r}: {e}") from None
        if args.max_seq_len is not None and len(ids) >= args.max_seq_len:  # stream_samples' check, for the CLI
            raise InputError(f"{args.data}: problem {p.id!r} has a {len(ids)}-token prompt, which leaves no room "
                             f"in --max-seq-len {args.max_seq_len}; raise it or drop the problem")
        requests.append(Request(ids, p.index, samples))
        sources.append((p, template.prompt_text(messages)))
    return requests, sources


PROGRESS_EVERY = 10.0  # seconds between progress lines while sampling


def draw_samples(args, d, model, requests, sources, tokenizer, stop_ids) -> None:
    """Sample this rank's requests, appending each finished sample to its own samples file at once. Every
    PROGRESS_EVERY seconds, between decode steps too (at 32k tokens the first sample can take minutes), and at
    the end, a line: samples done, new tokens drawn per second, and the time left, from the samples' rate once
    one has finished, before that the worst case (every sample drawing --max-new-tokens at that rate)."""
    if not requests:
        return
    compile_decode = model.embed.weight.is_cuda if args.compile is None else args.compile
    total, count = sum(len(r.samples) for r in requests), 0
    progress = common.Progress(total, every=PROGRESS_EVERY)

    def report(tokens: int) -> None:  # stream_samples' on_step
        if progress.due(count):
            common.heartbeat(d)  # ranks that have finished wait as long as this one makes progress (32k-token
            # samples can take longer than --dist-timeout each: a beat per progress line, not per sample)
            rate = tokens / progress.elapsed()
            eta = (f"ETA {progress.eta(count)}" if count else "worst-case ETA "
                   + common.format_seconds((total * args.max_new_tokens - tokens) / max(rate, 1e-9)))
            common.log(d, f"samples {count}/{total} | {tokens} new tokens, {rate:.1f} tok/s | {eta}")

    with common.open_shard(args.out, "samples", d) as f:  # samples.jsonl, or samples.rankR.jsonl under torchrun
        for done in stream_samples(model, requests, args.max_new_tokens, temperature=args.temperature,
                                   top_p=args.top_p, top_k=args.top_k, stop_ids=stop_ids, seed=args.seed,
                                   batch_size=args.batch_size, max_seq_len=args.max_seq_len, compile=compile_decode,
                                   on_step=report):
            row = sample_row(*sources[done.request], done, tokenizer, args.strict_think)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            common.heartbeat(d)  # the ranks that have finished wait as long as this one makes progress
            count += 1


def main(argv=None) -> dict | None:
    """Evaluate; returns the summary on rank 0 (None on other ranks)."""
    args = parse_args(argv)
    common.regular_file(args.data, "--data", "evaluate.py reads it twice (the problems, and its sha256 that a "
                        "resumed evaluation must match)")
    all_problems = data.read_problems(args.data)
    problems = all_problems[:args.limit]
    tokenizer = load_tokenizer(args.checkpoint)
    template = data.TEMPLATES[args.template]
    stop_ids = template.stop_ids(tokenizer)
    # Shards end at different times: the wait after sampling is wait_for_ranks' (progress, not a deadline).
    d = common.init_distributed(backend="gloo", timeout_s=args.dist_timeout * 60)
    device = f"cuda:{d.local_rank}" if args.device == "cuda" else args.device or str(d.device)  # a GPU per rank
    dtype = DTYPES.get(args.dtype, torch.bfloat16 if device.startswith("cuda") else torch.float32)
    summary = None
    # One run owns --out: rank 0 holds the lock for the whole run; the other ranks start once it has it.
    with common.OutputLock(args.out, "evaluate.py") if d.is_main else contextlib.nullcontext():
        common.barrier(d)
        # Every rank checks run.json and reads what is done, before any rank writes.
        fingerprint, (done_rows, partial) = run_fingerprint(args, dtype), load_done(args.out)
        had_run_file = common.check_run_settings(args.out, fingerprint, bool(done_rows),
                                                 f"pick another --out, or delete {args.out} to start over")
        mine = problems[d.rank::d.world_size]  # problem i goes to rank i mod world size
        requests, sources = make_requests(args, mine, {(r["id"], r["sample"]) for r in done_rows}, tokenizer,
                                          template)
        num_todo = sum(len(r.samples) for r in requests)
        common.log(d, f"{len(mine)} problems x {args.num_samples} samples: {len(mine) * args.num_samples - num_todo}"
                   f" already in {args.out}, {num_todo} to generate" + (f"; dropped {partial} unfinished line(s) "
                   "of an interrupted run (those samples are redone)" if partial else ""))
        model = Qwen2.from_pretrained(args.checkpoint, dtype, device) if requests else None  # NaN/inf refused
        common.barrier(d)  # every rank has read OUT and checked its inputs before anything is written
        if d.is_main and not had_run_file:
            common.write_json(os.path.join(args.out, "run.json"), fingerprint)
        draw_samples(args, d, model, requests, sources, tokenizer, stop_ids)
        common.wait_for_ranks(d, "sampled", args.dist_timeout * 60)
        if d.is_main:
            rows = merge_samples(args.out, all_problems)
            summary = summarize(problems, rows, args.num_samples, ddof=args.stderr_ddof)
            summary["settings"] = fingerprint
            common.write_json(os.path.join(args.out, "summary.json"), summary)
            print(format_table(summary, os.path.basename(args.data)))
            print(f"wrote {os.path.join(args.out, 'samples.jsonl')} and {os.path.join(args.out, 'summary.json')}")
    common.close_distributed()
    return summary


if __name__ == "__main__":
    common.cli(main, "evaluate.py")
