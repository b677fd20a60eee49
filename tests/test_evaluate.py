"""evaluate.py: the sampler against transformers' generate, batching / refill / seed invariances, the
sampling distribution, pass@k / maj@n / summary formulas, data errors, the CLI, resume and torchrun."""

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers

import data
import evaluate
import model as model_module
from common import InputError
from scripts import tiny
from helpers import make_hf_model
from model import Qwen2

transformers.logging.set_verbosity_error()
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models here are tiny: one thread is fastest, and on a busy machine thread pools waiting for a
    core make every small op slow. The setting is restored for the other test files."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Qwen2 (biases and norms randomised too, weights N(0, 0.1) so that greedy runs vary)
    with the tiny tokenizer, saved as a Hugging Face checkpoint. Returns (path, transformers model, ours)."""
    path = tmp_path_factory.mktemp("ckpt")
    hf = make_hf_model(seed=0)
    hf.generation_config.eos_token_id = None  # each test says which stop ids it wants
    hf.save_pretrained(path)
    tiny.make_tokenizer(path)
    return str(path), hf, Qwen2.from_pretrained(str(path))


def random_prompts(lengths, seed=1, vocab=400):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(9, vocab, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(hf, prompt, max_new_tokens, stop_ids=None):
    """transformers' greedy generate for one prompt; the new tokens (a final stop id included)."""
    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                      eos_token_id=stop_ids, pad_token_id=0)
    return out[0, len(prompt):].tolist()


# ----------------------------------------------------------------------------------------------------------
# Sampling primitives


def test_mix32_on_tensors_equals_the_formula_on_python_integers():
    def reference(x):  # lowbias32, written out with exact integers
        x ^= x >> 16
        x = (x * 0x7FEB352D) % 2**32
        x ^= x >> 15
        x = (x * 0x846CA68B) % 2**32
        return x ^ (x >> 16)

    values = [0, 1, 2**31 - 1, 2**31, 2**32 - 1] + torch.randint(0, 2**32, (2000,)).tolist()
    assert evaluate.mix32(torch.tensor(values)).tolist() == [reference(v) for v in values]
    assert [evaluate.mix32(v) for v in values[:50]] == [reference(v) for v in values[:50]]


def test_filters_top_p_and_top_k_on_a_hand_made_distribution():
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])  # sorted: token 1 (.5), 3 (.3), 0 (.15), 2 (.05)
    logits = probs.log()[None]

    def kept(top_p=1.0, top_k=0, k=4):
        _, ids, keep, covered = evaluate.kept_candidates(logits, top_p, top_k, k)
        return set(ids[keep].tolist()), bool(covered)

    assert kept() == ({0, 1, 2, 3}, True)
    assert kept(top_p=0.4) == ({1}, True)  # the top token alone reaches 0.4
    assert kept(top_p=0.7) == ({1, 3}, True)  # 0.5 < 0.7 <= 0.8
    assert kept(top_p=0.85) == ({1, 3, 0}, True)  # 0.8 < 0.85 <= 0.95
    assert kept(top_p=0.99) == ({0, 1, 2, 3}, True)
    assert kept(top_p=0.01) == ({1}, True)  # the most probable token always stays
    assert kept(top_k=2, k=2) == ({1, 3}, True)
    # top-p acts on the top-k set renormalised: [.5, .3, .15] / .95 has cumulative mass .526, .842, so 0.83
    # keeps two tokens; without renormalising it would keep three (.5 + .3 = .8 < .83).
    assert kept(top_p=0.83, top_k=3, k=3) == ({1, 3}, True)
    # Among the top 2 candidates only: top-p 0.7 ends inside them (covered), 0.85 does not.
    assert kept(top_p=0.7, k=2) == ({1, 3}, True)
    assert kept(top_p=0.85, k=2)[1] is False
    # No filter: 2 candidates cover the draw only if no other token could win the Gumbel race.
    assert kept(k=2)[1] is False
    # Tokens outside the k candidates score at most values[k-1] + NOISE_MAX; the leader at least
    # values[0] + NOISE_MIN.
    spread = evaluate.NOISE_MAX - evaluate.NOISE_MIN
    row = torch.tensor([[0.0, -1.0, -spread - 0.5, -spread - 2.0, -spread - 3.0]])
    assert [bool(evaluate.kept_candidates(row, 1.0, 0, k)[3]) for k in (2, 3)] == [False, True]


def test_noise_is_finite_and_bounded_at_the_extreme_hash_values():
    bits = torch.tensor([0, 511, 2**31, 2**32 - 512, 2**32 - 1])
    u = evaluate.uniform_from_bits(bits)
    assert torch.all((u > 0) & (u < 1))
    assert u[0].item() == 2.0**-24 and u[-1].item() == 1 - 2.0**-24  # exact in fp32
    g = evaluate.gumbel_from_uniform(u)
    assert torch.all(torch.isfinite(g))
    assert evaluate.NOISE_MIN < g.min().item() and g.max().item() < evaluate.NOISE_MAX


def reference_sample(logits, temperature, top_p, top_k, keys, steps):
    """Filters and the Gumbel race over the whole vocabulary, step by step with a full sort."""
    scaled = logits.float() / temperature
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    keep_sorted = torch.ones_like(sorted_logits, dtype=torch.bool)
    if top_k > 0:
        keep_sorted[:, top_k:] = False
    probs = sorted_logits.masked_fill(~keep_sorted, -math.inf).softmax(dim=-1)
    keep_sorted &= (probs.cumsum(dim=-1) - probs) < top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    vocab = torch.arange(scaled.shape[-1]).expand_as(scaled)
    return (scaled.masked_fill(~keep, -math.inf) + evaluate.gumbel_noise(keys, steps, vocab)).argmax(dim=-1)


@pytest.mark.parametrize("temperature, top_p, top_k",
                         [(0.7, 1.0, 0), (1.0, 0.9, 0), (0.6, 0.95, 20), (1.0, 1.0, 5)])
def test_candidate_race_equals_the_whole_vocabulary_race(temperature, top_p, top_k):
    g = torch.Generator().manual_seed(0)
    vocab, rows = 1000, 200
    peaked = torch.randn(rows, vocab, generator=g) * 12 # the top 128 tokens hold (almost) all the mass
    flat = torch.randn(rows, vocab, generator=g) * 0.5  # they do not
    keys, steps = torch.arange(2 * rows), torch.arange(2 * rows) % 7
    both = torch.cat([peaked, flat])
    expected = reference_sample(both, temperature, top_p, top_k, keys, steps)
    got_peaked = evaluate.sample_next(peaked, temperature, top_p, top_k, keys[:rows], steps[:rows])
    got_all = evaluate.sample_next(both, temperature, top_p, top_k, keys, steps)
    assert torch.equal(got_peaked, expected[:rows]) and torch.equal(got_all, expected)
    if top_k == 0:  # the peaked rows took the short path; the flat rows were redone among more tokens
        k = evaluate.CANDIDATES
        assert bool(evaluate.kept_candidates(peaked / temperature, top_p, 0, k)[3].all())
        assert not bool(evaluate.kept_candidates(flat / temperature, top_p, 0, k)[3].any())


def test_sampled_frequencies_match_the_filtered_softmax():
    logits = torch.tensor([1.0, 2.5, -0.5, 0.3, 2.0, 1.6])
    temperature, top_k, top_p = 0.7, 4, 0.9
    # Reference, step by step: softmax at T, keep the 4 most probable, renormalise, keep the smallest
    # prefix reaching 0.9, renormalise.
    p = torch.softmax(logits.double() / temperature, dim=0)
    order = sorted(range(6), key=lambda v: -p[v].item())[:top_k]
    mass = sum(p[v].item() for v in order)
    kept, cumulative = [], 0.0
    for v in order:
        if cumulative >= top_p:
            break
        kept.append(v)
        cumulative += p[v].item() / mass
    expected = torch.zeros(6, dtype=torch.float64)
    expected[kept] = p[kept] / p[kept].sum()
    assert 2 <= len(kept) < 6  # the filters really cut something here

    draws = 40000
    for keys, steps in [(torch.arange(draws), torch.zeros(draws, dtype=torch.long)),  # many samples
                        (torch.full((draws,), 7), torch.arange(draws))]:  # one sample, many steps
        tokens = evaluate.sample_next(logits.expand(draws, -1), temperature, top_p, top_k, keys, steps)
        freq = torch.bincount(tokens, minlength=6).double() / draws
        sigma = (expected * (1 - expected) / draws).sqrt()
        assert torch.all((freq - expected).abs() <= 5 * sigma + 1e-12), (freq, expected)
        assert freq[[v for v in range(6) if v not in kept]].sum() == 0


def test_noise_depends_on_key_step_and_token_only():
    keys, steps = torch.tensor([5, 9, 5, 5]), torch.tensor([0, 0, 0, 1])
    tokens = torch.arange(50).expand(4, 50)
    g = evaluate.gumbel_noise(keys, steps, tokens)
    assert torch.equal(g[0], g[2])  # same (key, step), another row
    assert not torch.equal(g[0], g[1]) and not torch.equal(g[0], g[3])
    assert torch.equal(evaluate.gumbel_noise(keys[:1], steps[:1], tokens[:1]), g[:1])  # batch-independent
    picked = torch.tensor([[7, 3, 41]])  # a token's noise does not depend on which tokens are computed
    assert torch.equal(evaluate.gumbel_noise(keys[:1], steps[:1], picked), g[:1, [7, 3, 41]])
    assert evaluate.sample_key(0, 3, 1) != evaluate.sample_key(0, 3, 2) != evaluate.sample_key(1, 3, 2)


# ----------------------------------------------------------------------------------------------------------
# The sampler


def test_greedy_equals_transformers_for_ragged_prompts(checkpoint):
    _, hf, ours = checkpoint
    prompts = random_prompts([3, 9, 17, 30])
    expected = [hf_greedy(hf, p, 20) for p in prompts]
    assert evaluate.generate(ours, prompts, 20) == expected
    assert all(len(e) == 20 for e in expected)


def test_one_long_row_among_short_ones_runs_apart_with_the_same_greedy_tokens(checkpoint, monkeypatch):
    """A long prompt in the middle of short ones: the decode step attends the long row in a run of its own
    (the short rows do not read its length), and greedy tokens equal transformers' and those of one run over
    the longest row (the step before runs, run_cost = inf), as do seeded samples."""
    _, hf, ours = checkpoint
    prompts = random_prompts([3, 9, 5, 7, 1500, 4, 12, 6], seed=9)
    runs = []
    real_runs = model_module.slot_runs
    monkeypatch.setattr(model_module, "slot_runs", lambda lengths, cost: runs.append(real_runs(lengths, cost))
                        or runs[-1])
    got = evaluate.generate(ours, prompts, 12)
    assert runs[0] == [(0, 4), (4, 5), (5, 8)]  # the long row alone
    assert got == [hf_greedy(hf, p, 12) for p in prompts]
    sampled = dict(temperature=0.8, top_p=0.9, n=2, seed=3)
    samples = evaluate.generate(ours, prompts, 12, **sampled)
    monkeypatch.setitem(model_module.RUN_COST, "cpu", math.inf)
    runs.clear()
    assert evaluate.generate(ours, prompts, 12) == got and runs[0] == [(0, 8)]
    assert evaluate.generate(ours, prompts, 12, **sampled) == samples  # seeded samples unchanged too


def test_greedy_stops_where_transformers_stops(checkpoint):
    _, hf, ours = checkpoint
    prompts = random_prompts([4, 11, 23], seed=2)
    free_run = hf_greedy(hf, prompts[0], 12)
    # The stop id: the first token, from the 3rd on, that greedy emits for the first time there.
    at = next(i for i in range(2, 12) if free_run[i] not in free_run[:i])
    stop = free_run[at]
    expected = [hf_greedy(hf, p, 12, stop_ids=[stop]) for p in prompts]
    got = evaluate.generate(ours, prompts, 12, stop_ids=[stop])
    assert got == expected
    assert got[0] == free_run[:at + 1]  # stopped exactly there, the stop token kept


@pytest.fixture(scope="module")
def ragged_stop(checkpoint):
    """Prompts and stop ids that end their greedy runs at different lengths (so slots free up at
    different steps): row r's token at position targets[r] becomes a stop id (the last row runs to the
    limit unless another row's stop id ends it first)."""
    _, _, ours = checkpoint
    prompts = random_prompts([5, 12, 7, 20, 3, 15], seed=3)
    free_runs = evaluate.generate(ours, prompts, 16)
    stops = sorted({run[t] for run, t in zip(free_runs, [1, 3, 6, 9, 13])})
    lengths = [next((i + 1 for i, t in enumerate(run) if t in stops), 16) for run in free_runs]
    assert len(set(lengths)) >= 3, lengths
    return prompts, stops


def test_greedy_output_does_not_depend_on_batch_size(checkpoint, ragged_stop):
    _, _, ours = checkpoint
    prompts, stops = ragged_stop
    runs = {b: evaluate.generate(ours, prompts, 16, stop_ids=stops, batch_size=b, n=2) for b in (1, 2, 5)}
    assert runs[1] == runs[2] == runs[5]
    assert all(runs[1][2 * i] == runs[1][2 * i + 1] for i in range(len(prompts)))  # greedy: samples equal


def test_refill_hands_a_finished_slot_to_the_next_sample_at_once(checkpoint, ragged_stop, monkeypatch):
    _, _, ours = checkpoint
    prompts, stops = ragged_stop
    one_at_a_time = evaluate.generate(ours, prompts, 16, stop_ids=stops, batch_size=1)
    # The schedule, observed from outside: decode steps so far, and each prefill's (step, slots).
    steps, prefills = [], []
    real_step, real_prefill = ours.decode_step, ours.prefill
    monkeypatch.setattr(ours, "decode_step", lambda *args: steps.append(1) or real_step(*args))
    monkeypatch.setattr(ours, "prefill",
                        lambda ids, slots: prefills.append((len(steps), list(slots))) or real_prefill(ids, slots))
    requests = [evaluate.Request(p, key=i) for i, p in enumerate(prompts)]
    finished = [(f, len(steps)) for f in evaluate.stream_samples(ours, requests, 16, stop_ids=stops, batch_size=2)]
    assert sorted(f.request for f, _ in finished) == list(range(len(prompts)))
    assert [f.tokens for f, _ in sorted(finished, key=lambda x: x[0].request)] == one_at_a_time
    # One sample per request: request r is the r-th prefill, into one slot, at step admitted[r].
    assert len(prefills) == len(prompts) and all(len(slots) == 1 for _, slots in prefills)
    admitted = [step for step, _ in prefills]
    slot_of = [slots[0] for _, slots in prefills]
    finished_step = {f.request: step for f, step in finished}
    # Samples are yielded as they finish, and a slot is refilled in the very step its sample finished:
    # in each slot, every sample after the first was admitted at the step the previous one finished.
    assert [step for _, step in finished] == sorted(step for _, step in finished)
    for slot in (0, 1):
        chain = sorted((r for r in range(len(prompts)) if slot_of[r] == slot), key=lambda r: admitted[r])
        assert admitted[chain[0]] == 0
        assert all(admitted[b] == finished_step[a] for a, b in zip(chain, chain[1:]))
    assert max(admitted) > 0  # refills happened


def test_each_prompt_is_prefilled_once_and_shared_by_its_samples(checkpoint, ragged_stop, monkeypatch):
    _, _, ours = checkpoint
    prompts, stops = ragged_stop
    calls = []
    real_prefill = ours.prefill
    monkeypatch.setattr(ours, "prefill",
                        lambda ids, slots: calls.append(list(slots)) or real_prefill(ids, slots))
    got = evaluate.generate(ours, prompts[:3], 16, stop_ids=stops, batch_size=2, n=3)
    assert len(calls) == 3  # 9 samples in 2 slots: problems part-admitted, yet one prefill each
    monkeypatch.undo()
    single = evaluate.generate(ours, prompts[:3], 16, stop_ids=stops, batch_size=1)
    assert got == [s for s in single for _ in range(3)]


def test_cache_shrinks_when_nothing_waits_and_results_are_unchanged(checkpoint, ragged_stop, monkeypatch):
    _, _, ours = checkpoint
    prompts, stops = ragged_stop
    expected = evaluate.generate(ours, prompts, 16, stop_ids=stops, batch_size=1)
    widths = []
    real_step = ours.decode_step
    monkeypatch.setattr(ours, "decode_step",
                        lambda t, p: widths.append(len(t)) or real_step(t, p))
    assert evaluate.generate(ours, prompts, 16, stop_ids=stops, batch_size=6) == expected
    assert widths[0] == 6 and widths[-1] < 3 and widths == sorted(widths, reverse=True)


def test_seeded_sampling_repeats_is_batch_independent_and_changes_with_the_seed(checkpoint):
    _, _, ours = checkpoint
    prompts = random_prompts([6, 13, 4], seed=4)
    kwargs = dict(temperature=0.8, top_p=0.9, top_k=50, n=3)
    runs = [evaluate.generate(ours, prompts, 12, seed=0, batch_size=b, **kwargs) for b in (1, 4, 9)]
    assert runs[0] == runs[1] == runs[2]
    assert evaluate.generate(ours, prompts, 12, seed=1, batch_size=4, **kwargs) != runs[0]
    samples = runs[0]
    assert all(len({tuple(s) for s in samples[3 * i:3 * i + 3]}) > 1 for i in range(3))  # n samples differ


def test_length_limits_and_prompts_too_long(checkpoint):
    _, _, ours = checkpoint
    prompt = random_prompts([10], seed=5)[0]
    requests = [evaluate.Request(prompt, key=0)]
    (done,) = evaluate.stream_samples(ours, requests, 10, max_seq_len=14)
    assert len(done.tokens) == 4 and done.finish_reason == "length"  # the sequence fills the 14 positions
    (done,) = evaluate.stream_samples(ours, requests, 3)
    assert len(done.tokens) == 3 and done.finish_reason == "length"
    with pytest.raises(ValueError, match="prompt 1 has 14 tokens.*max_seq_len=14"):
        list(evaluate.stream_samples(ours, requests + [evaluate.Request(prompt + prompt[:4], key=1)], 5,
                                     max_seq_len=14))
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        evaluate.generate(ours, [[]], 5)
    with pytest.raises(ValueError, match="top_p"):
        evaluate.generate(ours, [prompt], 5, temperature=1.0, top_p=0.0)


# ----------------------------------------------------------------------------------------------------------
# Scores


def test_unbiased_pass_at_k_on_hand_computed_values():
    assert evaluate.pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert evaluate.pass_at_k(16, 3, 4) == pytest.approx(1 - 715 / 1820)  # C(13,4) = 715, C(16,4) = 1820
    assert evaluate.pass_at_k(16, 3, 1) == pytest.approx(3 / 16)
    assert evaluate.pass_at_k(5, 0, 3) == 0.0
    assert evaluate.pass_at_k(5, 5, 1) == 1.0
    assert evaluate.pass_at_k(4, 3, 2) == 1.0  # C(1,2) = 0: any 2 of 4 include a correct one
    with pytest.raises(ValueError):
        evaluate.pass_at_k(4, 1, 5)
    assert evaluate.pass_at_k_sizes(16) == [1, 2, 4, 8, 16] and evaluate.pass_at_k_sizes(6) == [1, 2, 4, 6]
    assert evaluate.pass_at_k_sizes(1) == [1]


def row(problem_id, sample, correct, answer, num_tokens=5, finish_reason="stop"):
    return {"id": problem_id, "sample": sample, "correct": correct, "answer": answer, "num_tokens": num_tokens,
            "finish_reason": finish_reason}


def hand_table():
    problems = [data.Problem(0, "p0", "?", "4x", "Algebra", 2),
                data.Problem(1, "p1", "?", "1/2", "Geometry", 2)]
    rows = [row("p0", 0, True, "3", 10), row("p0", 1, False, "4", 20), row("p0", 2, False, "4", 30, "length"),
            row("p0", 3, False, None, 40),
            row("p1", 0, True, "0.5"), row("p1", 1, True, "1/2"), row("p1", 2, False, "2"),
            row("p1", 3, True, "1/2")]
    return problems, rows


def test_summary_on_a_hand_made_table():
    problems, rows = hand_table()
    s = evaluate.summarize(problems, rows[::-1], n=4, same=lambda a, b: a == b)  # row order is irrelevant
    assert s["pass@1"] == sum(r["correct"] for r in rows) / len(rows) == 0.5  # the mean of `correct`
    # Sample sets j = 0..3 score 1, 1/2, 0, 1/2: s.d. (ddof 1) = sqrt(0.5 / 3), over sqrt(4).
    assert s["pass@1_stderr"] == pytest.approx(math.sqrt(0.5 / 3) / 2)
    # p0 has c=1: pass@2 = 1 - C(3,2)/C(4,2) = 0.5; p1 has c=3: pass@2 = 1. pass@4 = 1 for both.
    assert s["pass@k"] == pytest.approx({"1": 0.5, "2": 0.75, "4": 1.0})
    # maj@4: p0's largest group is "4" (2 votes, beating the earlier "3"), wrong; p1's is "1/2", right.
    assert s["maj@4"] == 0.5
    assert s["mean_response_tokens"] == (10 + 20 + 30 + 40 + 4 * 5) / 8
    assert s["truncated"] == 1 / 8 and s["no_answer"] == 1 / 8
    assert s["by_subject"] == {"Algebra": {"problems": 1, "pass@1": 0.25},
                               "Geometry": {"problems": 1, "pass@1": 0.75}}
    assert s["by_level"] == {"2": {"problems": 2, "pass@1": 0.5}}
    rates = [s["pass@1"], s["maj@4"], s["truncated"], s["no_answer"], *s["pass@k"].values()]
    assert all(0 <= r <= 1 for r in rates)
    with pytest.raises(ValueError, match="lacks samples \\[2\\]"):
        evaluate.summarize(problems, [r for r in rows if (r["id"], r["sample"]) != ("p1", 2)], n=4)


def test_majority_vote_groups_equivalent_answers_and_breaks_ties_by_first_group():
    same_value = lambda a, b: {"0.5": 0.5, "1/2": 0.5, "\\frac{1}{2}": 0.5}.get(a, a) == \
        {"0.5": 0.5, "1/2": 0.5, "\\frac{1}{2}": 0.5}.get(b, b)
    answers, correct = ["2", "1/2", "\\frac{1}{2}", "0.5", "2"], [False, True, True, True, False]
    assert evaluate.majority_correct(answers, correct, same_value)  # {1/2, \frac12, 0.5}: 3 votes
    assert not evaluate.majority_correct(answers, correct, lambda a, b: a == b)  # "2": 2 votes
    assert not evaluate.majority_correct(["a", "b"], [False, True], lambda a, b: a == b)  # tie: first group
    assert not evaluate.majority_correct([None, None], [True, True], lambda a, b: a == b)  # no votes
    assert evaluate.answers_equal("x + 1", "x+1")


# ----------------------------------------------------------------------------------------------------------
# Data, CLI, resume, torchrun

ROWS = [
    {"problem": "What is 12 + 35?", "answer": "47", "subject": "Prealgebra", "level": 1,
     "unique_id": "t/1.json"},
    {"problem": "Compute 7 * 8 - 6.", "answer": "50", "subject": "Prealgebra", "level": 2,
     "unique_id": "t/2.json"},
    {"problem": "Let x = 3. What is x^2?", "answer": "9", "subject": "Algebra", "level": 1,
     "unique_id": "t/3.json"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def read_rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_problems_are_validated_with_file_and_line(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl",
                       [{"problem": "a", "answer": 27}, {"problem": "b", "answer": "x", "id": 7}])
    problems = data.read_problems(good)
    assert [(p.id, p.answer) for p in problems] == [("0", "27"), ("7", "x")]
    assert data.read_problems(write_jsonl(tmp_path / "u.jsonl", ROWS))[2].id == "t/3.json"
    for bad, message in [([{"problem": "a", "answer": "1"}, {"problem": "b"}], ":2: needs an 'answer'"),
                         ([{"answer": "1"}], ":1: needs a non-empty string 'problem'"),
                         ([{"problem": "a", "answer": "1", "id": "x"}] * 2, ":2: id 'x' already used at .*:1")]:
        with pytest.raises(ValueError, match=message):
            data.read_problems(write_jsonl(tmp_path / "bad.jsonl", bad))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "mini.jsonl", ROWS)


def cli(checkpoint_path, data_path, out, *extra):
    return [checkpoint_path, "--data", data_path, "--num-samples", "2", "--max-new-tokens", "6", "--temperature",
            "0.7", "--top-p", "0.95", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def full_run(checkpoint, data_file, tmp_path_factory):
    """One complete CLI run on the three-row file: (out dir, summary, rows)."""
    out = tmp_path_factory.mktemp("full")
    summary = evaluate.main(cli(checkpoint[0], data_file, out))
    return out, summary, read_rows(out / "samples.jsonl")


def test_cli_end_to_end(checkpoint, full_run, capsys):
    out, summary, rows = full_run
    assert [(r["id"], r["sample"]) for r in rows] == [(p["unique_id"], j) for p in ROWS for j in range(2)]
    tokenizer = data.load_tokenizer(checkpoint[0])
    template = data.TEMPLATES["qwen"]
    import verify

    for r, problem in zip(rows, [p for p in ROWS for _ in range(2)]):
        assert set(r) >= {"id", "sample", "prompt", "completion", "answer", "correct", "num_tokens",
                          "finish_reason"}
        assert r["prompt"] == template.prompt_text(data.problem_messages(problem["problem"], template))
        assert r["correct"] == verify.grade(r["completion"], problem["answer"])
        assert r["answer"] == verify.extract_answer(r["completion"])
        assert r["finish_reason"] in ("stop", "length") and 1 <= r["num_tokens"] <= 6
        assert "<|im_end|>" not in r["completion"]
        if r["finish_reason"] == "length":
            assert r["num_tokens"] == 6
    assert json.loads((out / "summary.json").read_text())["pass@1"] == summary["pass@1"]
    assert summary["pass@1"] == sum(r["correct"] for r in rows) / len(rows)
    assert summary["problems"] == 3 and summary["n"] == 2 and set(summary["pass@k"]) == {"1", "2"}
    assert all(0 <= summary[k] <= 1 for k in ("pass@1", "maj@2", "truncated", "no_answer"))
    assert set(summary["by_subject"]) == {"Prealgebra", "Algebra"} and set(summary["by_level"]) == {"1", "2"}
    assert summary["settings"]["seed"] == 0
    assert json.loads((out / "run.json").read_text()) == summary["settings"]


def test_progress_lines_come_between_decode_steps_before_any_sample_finishes(checkpoint, data_file, tmp_path,
                                                                              monkeypatch, capsys):
    """With the interval at 0 a line follows every decode step: the first ones come while no sample has
    finished (samples 0/3, with tokens/s and the worst-case ETA), the last one when all have."""
    monkeypatch.setattr(evaluate, "PROGRESS_EVERY", 0.0)
    err, finished_at = [], []  # stderr so far; how many progress lines it held when each sample finished
    progress_lines = lambda: [line for line in "".join(err).splitlines() if line.startswith("samples ")]
    real_row = evaluate.sample_row  # called once per finished sample
    monkeypatch.setattr(evaluate, "sample_row", lambda *args: err.append(capsys.readouterr().err)
                        or finished_at.append(len(progress_lines())) or real_row(*args))
    evaluate.main([checkpoint[0], "--data", data_file, "--num-samples", "1", "--max-new-tokens", "6",
                   "--temperature", "0", "--out", str(tmp_path / "out")])
    err.append(capsys.readouterr().err)
    lines = progress_lines()
    assert finished_at[0] >= 1  # a progress line was printed before the first sample finished
    assert re.fullmatch(r"samples 0/3 \| \d+ new tokens, [\d.]+ tok/s \| worst-case ETA \d+:\d\d:\d\d", lines[0])
    assert re.fullmatch(r"samples 3/3 \| \d+ new tokens, [\d.]+ tok/s \| ETA 0:00:00", lines[-1])
    rows = read_rows(tmp_path / "out" / "samples.jsonl")
    assert int(lines[-1].split()[3]) == sum(r["num_tokens"] for r in rows)  # every drawn token counted


def test_cli_grades_and_scores_what_the_sampler_returns(checkpoint, data_file, tmp_path, monkeypatch):
    """The sampler replaced by scripted completions (a random model is never right): completions are the
    decoded tokens minus the stop token, graded by verify, and the summary follows the correct column."""
    tokenizer = data.load_tokenizer(checkpoint[0])
    stop = tokenizer.token_to_id("<|im_end|>")
    scripted = {(0, 0): ("So the answer is \\boxed{47}.", "stop"), (0, 1): ("\\boxed{46}", "stop"),
                (1, 0): ("The final answer is \\boxed{50}", "stop"),
                (1, 1): ("We have 7 * 8 = 56, and", "length"),
                (2, 0): ("\\boxed{9}", "stop"), (2, 1): ("x = 3 so \\boxed{3}", "stop")}

    def fake_sampler(model, requests, max_new_tokens, **kwargs):
        for i, r in enumerate(requests):
            for j in r.samples:
                text, reason = scripted[(r.key, j)]
                ids = tokenizer.encode(text, add_special_tokens=False).ids
                ids += [stop] if reason == "stop" else []
                yield evaluate.Finished(i, j, ids, reason)

    monkeypatch.setattr(evaluate, "stream_samples", fake_sampler)
    summary = evaluate.main(cli(checkpoint[0], data_file, tmp_path / "out"))
    rows = read_rows(tmp_path / "out" / "samples.jsonl")
    assert [r["completion"] for r in rows] == [scripted[k][0] for k in sorted(scripted)]
    assert [r["answer"] for r in rows] == ["47", "46", "50", None, "9", "3"]
    assert [r["correct"] for r in rows] == [True, False, True, False, True, False]
    assert [r["finish_reason"] for r in rows] == [scripted[k][1] for k in sorted(scripted)]
    assert rows[0]["num_tokens"] == len(tokenizer.encode(scripted[(0, 0)][0]).ids) + 1  # the stop token counts
    assert summary["pass@1"] == 0.5  # the mean of the correct column
    assert summary["pass@1_stderr"] == pytest.approx(0.5)  # sample sets score 1 and 0: s.d. 0.707 / sqrt(2)
    assert summary["pass@k"] == {"1": 0.5, "2": 1.0}  # every problem has c = 1 of n = 2
    assert summary["maj@2"] == 1.0  # ties go to the first answer; a missing answer casts no vote
    assert summary["truncated"] == pytest.approx(1 / 6) and summary["no_answer"] == pytest.approx(1 / 6)
    assert summary["by_subject"] == {"Algebra": {"problems": 1, "pass@1": 0.5},
                                     "Prealgebra": {"problems": 2, "pass@1": 0.5}}


def test_cli_greedy_samples_do_not_depend_on_batch_size(checkpoint, data_file, tmp_path):
    runs = []
    for batch_size in ("1", "4"):
        out = tmp_path / batch_size
        evaluate.main(cli(checkpoint[0], data_file, out, "--temperature", "0", "--batch-size", batch_size))
        runs.append(read_rows(out / "samples.jsonl"))
    assert runs[0] == runs[1]
    assert all(runs[0][2 * i]["completion"] == runs[0][2 * i + 1]["completion"] for i in range(3))


def spy_on_requests(monkeypatch):
    """Record the (problem key, samples) of every request handed to the sampler."""
    seen = []
    real = evaluate.stream_samples

    def spy(model, requests, *args, **kwargs):
        seen.extend((r.key, r.samples) for r in requests)
        return real(model, requests, *args, **kwargs)

    monkeypatch.setattr(evaluate, "stream_samples", spy)
    return seen


def test_an_interrupted_run_resumes_without_redoing_finished_samples(checkpoint, data_file, full_run, tmp_path,
                                                                    monkeypatch, capsys):
    _, _, full_rows = full_run
    out = tmp_path / "out"
    evaluate.main(cli(checkpoint[0], data_file, out, "--limit", "2"))  # a first run that covered 2 problems
    assert read_rows(out / "samples.jsonl") == full_rows[:4]
    seen = spy_on_requests(monkeypatch)
    evaluate.main(cli(checkpoint[0], data_file, out))
    assert seen == [(2, (0, 1))]  # only the third problem's two samples are drawn
    assert read_rows(out / "samples.jsonl") == full_rows  # same samples as one uninterrupted run

    # A run killed mid-write: three complete lines and the start of a fourth.
    text = (out / "samples.jsonl").read_text().splitlines(keepends=True)
    (out / "samples.jsonl").write_text("".join(text[:3]) + text[3][:25])
    seen.clear()
    capsys.readouterr()
    summary = evaluate.main(cli(checkpoint[0], data_file, out))
    assert seen == [(1, (1,)), (2, (0, 1))]
    err = capsys.readouterr().err
    assert "3 problems x 2 samples: 3 already in" in err and "3 to generate" in err
    assert "dropped 1 unfinished line" in err
    assert "samples 3/3 |" in err and "tok/s | ETA 0:00:00" in err  # the progress line
    assert read_rows(out / "samples.jsonl") == full_rows
    assert summary["pass@1"] == full_run[1]["pass@1"]

    seen.clear()
    evaluate.main(cli(checkpoint[0], data_file, out))  # complete: nothing to draw, the summary again
    assert seen == []


def test_resume_with_other_settings_is_refused(checkpoint, data_file, full_run, tmp_path):
    out = full_run[0]
    with pytest.raises(InputError, match="run.json.*seed: 0 there, 1 now.*pick another --out"):
        evaluate.main(cli(checkpoint[0], data_file, out, "--seed", "1"))
    (tmp_path / "samples.jsonl").write_text((out / "samples.jsonl").read_text())  # samples of unknown settings
    with pytest.raises(InputError, match="no run.json.*pick another --out"):
        evaluate.main(cli(checkpoint[0], data_file, tmp_path))


def test_a_prompt_longer_than_max_seq_len_names_the_problem(checkpoint, data_file, tmp_path):
    with pytest.raises(InputError, match="problem 't/1.json' has a .*-token prompt.*--max-seq-len 20"):
        evaluate.main(cli(checkpoint[0], data_file, tmp_path, "--max-seq-len", "20"))


def test_a_bad_data_row_names_file_and_line(checkpoint, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], {"problem": "no answer here"}])
    with pytest.raises(ValueError, match="bad.jsonl:2: needs an 'answer'"):
        evaluate.main(cli(checkpoint[0], bad, tmp_path / "out"))


def test_torchrun_two_ranks_give_the_single_process_samples(checkpoint, data_file, full_run, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = cli(checkpoint[0], data_file, out)  # --num-samples: torchrun's parser refuses "--n"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                             "2", str(REPO / "evaluate.py"), *args],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_rows(out / "samples.jsonl") == full_run[2]  # merged by rank 0, in data order
    assert not list(out.glob("samples.rank*.jsonl"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pass@1"] == full_run[1]["pass@1"] and summary["pass@k"] == full_run[1]["pass@k"]


# ----------------------------------------------------------------------------------------------------------
# --protocol redi: the paper's prompt, sampling settings, strict grading and standard error

# The REDI authors' evaluation prompt, written out here from their README (the "force thinking" chat
# template: Qwen2.5-Math's system prompt, generation prompt `<|im_start|>assistant<think>\n`) and Open-R1's
# math query template (rllm/scripts/data/deepscaler_dataset.py in their repository), independently of data.py.
AUTHORS_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
AUTHORS_QUERY = ("Solve the following math problem efficiently and clearly.  The last line of your response should "
                 "be of the following format: 'Therefore, the final answer is: $\\boxed{ANSWER}$. I hope it is "
                 "correct' (without quotes) where ANSWER is just the final number or expression that solves the "
                 "problem. Think step by step before answering.\n\n{Question}")
AUTHORS_JINJA = ("{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
                 "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant<think>\\n' }}{%- endif %}")


def scripted_sampler(tokenizer, completion_of, calls):
    """A stand-in for stream_samples: records (requests, kwargs) and returns completion_of(key, sample)."""
    stop = tokenizer.token_to_id("<|im_end|>")

    def sampler(model, requests, max_new_tokens, **kwargs):
        calls.append((requests, dict(kwargs, max_new_tokens=max_new_tokens)))
        for i, r in enumerate(requests):
            for j in r.samples:
                ids = tokenizer.encode(completion_of(r.key, j), add_special_tokens=False).ids
                yield evaluate.Finished(i, j, ids + [stop], "stop")
    return sampler


def strict_or_not(key, sample):
    """Even samples close their reasoning, and sample j of problem i is then right unless (i + j) % 3 == 0;
    odd samples never close it and are right: strict grading scores sample sets 2/3 (even j) and 0 (odd j)."""
    gold = ROWS[key]["answer"]
    answer = gold if sample % 2 or (key + sample) % 3 else "1000"
    return f"So it is {answer}.</think> \\boxed{{{answer}}}" if sample % 2 == 0 else f"\\boxed{{{answer}}}"


def test_redi_protocol_feeds_the_authors_template_and_settings(checkpoint, data_file, tmp_path, monkeypatch):
    transformers_tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=f"{checkpoint[0]}/tokenizer.json")
    tokenizer = data.load_tokenizer(checkpoint[0])
    calls = []
    monkeypatch.setattr(evaluate, "stream_samples", scripted_sampler(tokenizer, strict_or_not, calls))
    summary = evaluate.main([checkpoint[0], "--data", data_file, "--protocol", "redi", "--out", str(tmp_path)])
    (requests, kwargs), = calls
    assert kwargs["temperature"] == 0.6 and kwargs["top_p"] == 0.95 and kwargs["max_new_tokens"] == 32768
    assert [r.samples for r in requests] == [tuple(range(16))] * 3
    rows = read_rows(tmp_path / "samples.jsonl")
    for r, problem in zip(requests, ROWS):
        messages = [{"role": "system", "content": AUTHORS_SYSTEM},
                    {"role": "user", "content": AUTHORS_QUERY.replace("{Question}", problem["problem"])}]
        text = transformers_tokenizer.apply_chat_template(messages, chat_template=AUTHORS_JINJA, tokenize=False,
                                                          add_generation_prompt=True)
        assert text.endswith("<|im_end|>\n<|im_start|>assistant<think>\n")
        assert r.prompt_ids == transformers_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert {row["prompt"] for row in rows if row["id"] == problem["unique_id"]} == {text}
    assert summary["settings"]["protocol"] == "redi" and summary["settings"]["template"] == "redi"

    # Explicit flags override the protocol's settings; the template and grading stay the protocol's.
    calls.clear()
    evaluate.main([checkpoint[0], "--data", data_file, "--protocol", "redi", "--num-samples", "2",
                   "--temperature", "0", "--max-new-tokens", "7", "--out", str(tmp_path / "override")])
    (requests, kwargs), = calls
    assert kwargs["temperature"] == 0 and kwargs["max_new_tokens"] == 7 and requests[0].samples == (0, 1)
    assert read_rows(tmp_path / "override" / "samples.jsonl")[0]["prompt"].endswith("assistant<think>\n")


def test_strict_grading_and_the_papers_standard_error(checkpoint, data_file, tmp_path, monkeypatch):
    import verify

    tokenizer = data.load_tokenizer(checkpoint[0])
    monkeypatch.setattr(evaluate, "stream_samples", scripted_sampler(tokenizer, strict_or_not, []))
    runs = {protocol: evaluate.main([checkpoint[0], "--data", data_file, "--protocol", protocol, "--out",
                                     str(tmp_path / protocol)]) for protocol in ("redi", "default")}
    for protocol, strict in (("redi", True), ("default", False)):
        for r in read_rows(tmp_path / protocol / "samples.jsonl"):
            closed = "</think>" in r["completion"]
            assert r["correct"] == (verify.grade(r["completion"], r["gold"]) and (closed or not strict))
            if not closed:  # the same text: scored 0 when strict, graded as always otherwise
                assert r["correct"] is (False if strict else verify.grade(r["completion"], r["gold"]))
    # Sample sets (sample j of the 3 problems): strict, 2/3 for even j and 0 for odd j; lenient, 2/3 and 1.
    # redi: mean 1/3, every deviation 1/3: std (ddof 0) = 1/3, over sqrt(16) = 1/12.
    assert runs["redi"]["pass@1"] == pytest.approx(1 / 3)
    assert runs["redi"]["pass@1_stderr"] == pytest.approx(1 / 12) and runs["redi"]["pass@1_stderr_ddof"] == 0
    # default: mean 5/6, every deviation 1/6: std (ddof 1) = sqrt(16 / 36 / 15), over sqrt(16).
    assert runs["default"]["pass@1"] == pytest.approx(5 / 6)
    assert runs["default"]["pass@1_stderr"] == pytest.approx(math.sqrt(16 / 36 / 15) / 4)


def test_papers_standard_error_equals_rllms_numpy_formula():
    import numpy as np

    problems, rows = hand_table()
    s = evaluate.summarize(problems, rows, n=4, same=lambda a, b: a == b, ddof=0)
    # Sample sets score 1, 1/2, 0, 1/2: mean 1/2, squared deviations 1/4, 0, 1/4, 0; std = sqrt(1/8), / sqrt(4).
    assert s["pass@1_stderr"] == pytest.approx(math.sqrt(1 / 8) / 2)
    scores = np.array([[1, 0, 0, 0], [1, 1, 0, 1]])  # problems x samples, as rllm holds them
    assert s["pass@1_stderr"] == pytest.approx(np.std(np.mean(scores, axis=0)) / np.sqrt(4))


# ----------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, the culprit named, nothing in --out touched


def run_cli(argv, capsys):
    """evaluate.py as its __main__ runs it; (exit code, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        evaluate.common.cli(lambda: evaluate.main(argv), "evaluate.py")
    return exit_info.value.code, capsys.readouterr().err


def snapshot(directory):
    return {p.name: p.read_bytes() for p in Path(directory).iterdir() if p.name != ".lock"}


@pytest.fixture
def previous_run(full_run, tmp_path):
    """A copy of a finished run's output directory (run.json, samples.jsonl, summary.json)."""
    out = tmp_path / "previous"
    out.mkdir()
    for name, content in snapshot(full_run[0]).items():
        (out / name).write_bytes(content)
    return out


def broken_checkpoint(source, target, config_changes=None, poison=None):
    """A copy of the checkpoint with config.json changes or one tensor set to NaN."""
    from safetensors.torch import load_file, save_file

    target.mkdir()
    for name in os.listdir(source):
        (target / name).write_bytes((Path(source) / name).read_bytes())
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, **(config_changes or {})}))
    if poison:
        tensors = load_file(target / "model.safetensors")
        tensors[poison][0, 0] = float("nan")
        save_file(tensors, target / "model.safetensors")
    return str(target)


def test_bad_inputs_exit_2_naming_the_culprit_and_leave_out_intact(checkpoint, data_file, previous_run, tmp_path,
                                                                   capsys):
    ckpt = checkpoint[0]
    bad = lambda name, rows: write_jsonl(tmp_path / name, rows)
    cases = [
        ([ckpt, "--data", bad("dup.jsonl", [ROWS[0], ROWS[0]])], "dup.jsonl:2: id 't/1.json' already used"),
        ([ckpt, "--data", bad("noanswer.jsonl", [ROWS[0], {"problem": "x"}])], "noanswer.jsonl:2: needs an 'answer'"),
        ([ckpt, "--data", bad("empty.jsonl", [])], "empty.jsonl: no rows"),
        ([ckpt, "--data", str(tmp_path)], "is a directory"),
        ([str(tmp_path / "nope"), "--data", data_file], "nope: no such checkpoint directory"),
        ([broken_checkpoint(ckpt, tmp_path / "small", {"vocab_size": 300}), "--data", data_file],
         "tokenizer.json has 386 tokens but config.json's vocab_size is 300"),
        ([ckpt, "--data", data_file, "--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got '0'"),
        ([ckpt, "--data", data_file, "--num-samples", "-1"], "argument --num-samples: must be an integer >= 1"),
        ([ckpt, "--data", data_file, "--max-new-tokens", "0"], "argument --max-new-tokens: must be an integer >= 1"),
        ([ckpt, "--data", data_file, "--limit", "0"], "argument --limit: must be an integer >= 1"),
        ([ckpt, "--data", data_file, "--max-seq-len", "x"], "argument --max-seq-len: must be an integer >= 1, got 'x'"),
        ([ckpt, "--data", data_file, "--top-p", "0"], "top_p \\(--top-p\\) must be in \\(0, 1\\]"),
        ([ckpt, "--data", data_file, "--temperature", "inf"], "temperature \\(--temperature\\) must be finite"),
        ([ckpt, "--data", data_file, "--n", "2"], "unrecognized arguments: --n 2"),  # one flag name
    ]
    before = snapshot(previous_run)
    for argv, message in cases:
        code, err = run_cli(argv + ["--out", str(previous_run), "--max-new-tokens", "4"], capsys)
        assert code == 2 and "Traceback" not in err, (argv, err)
        assert re.search("evaluate.py: error: .*" + message, err), (argv, err)
        assert snapshot(previous_run) == before, argv
    # Weights are read after OUT is checked, yet before anything is written there: a NaN weight, a truncated
    # safetensors file.
    nan = broken_checkpoint(ckpt, tmp_path / "nan", poison="model.layers.1.mlp.up_proj.weight")
    cut = broken_checkpoint(ckpt, tmp_path / "cut")
    (Path(cut) / "model.safetensors").write_bytes((Path(cut) / "model.safetensors").read_bytes()[:5000])
    for path, message in [(nan, "tensor model.layers.1.mlp.up_proj.weight holds NaN or inf"),
                          (cut, "cut/model.safetensors: damaged")]:
        code, err = run_cli([path, "--data", data_file, "--out", str(tmp_path / "fresh")], capsys)
        assert code == 2 and "Traceback" not in err and "evaluate.py: error: " in err and message in err, err
        assert snapshot(tmp_path / "fresh") == {}


def test_damaged_run_files_are_named_with_what_to_do(checkpoint, data_file, previous_run, capsys):
    argv = [checkpoint[0], "--data", data_file, "--num-samples", "2", "--max-new-tokens", "6", "--temperature",
            "0.7", "--top-p", "0.95", "--out", str(previous_run)]
    lines = (previous_run / "samples.jsonl").read_text().splitlines(keepends=True)
    for name, damage, message in [
            ("run.json", '{"seed": 0,', "run.json: damaged .*pick another --out, or delete"),
            ("samples.jsonl", "".join(lines[:1] + ["{oops\n"] + lines[2:]),
             "samples.jsonl:2: not valid JSON.*delete that line .*or pick another --out"),
            ("samples.jsonl", "".join(lines[:2] + ['["a list"]\n'] + lines[3:]),
             "samples.jsonl:3: expected a JSON object.*delete that line")]:
        original = (previous_run / name).read_text()
        (previous_run / name).write_text(damage)
        before = snapshot(previous_run)
        code, err = run_cli(argv, capsys)
        assert code == 2 and "Traceback" not in err and re.search(message, err), err
        assert snapshot(previous_run) == before
        (previous_run / name).write_text(original)
    assert evaluate.main(argv)["pass@1"] is not None  # repaired: the run is whole again


def test_main_reports_errors_as_one_line_in_a_subprocess(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "evaluate.py"), str(tmp_path / "missing"), "--data",
                             str(tmp_path / "none.jsonl")], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("evaluate.py: error: ") and "none.jsonl" in result.stderr


GATED_RUN = """
import os, sys, time
sys.path.insert(0, {repo!r})
import common, evaluate
real = evaluate.stream_samples
def gated(*args, **kwargs):  # holds the run (and its lock) mid-way until the test says go
    open({ready!r}, "w").close()
    while not os.path.exists({go!r}):
        time.sleep(0.05)
    yield from real(*args, **kwargs)
evaluate.stream_samples = gated
sys.argv = ["evaluate.py", *{argv!r}]
common.cli(evaluate.main, "evaluate.py")
"""


def test_a_second_run_on_the_same_out_is_refused_and_the_first_completes(checkpoint, data_file, full_run,
                                                                          tmp_path):
    out, ready, go = tmp_path / "out", tmp_path / "ready", tmp_path / "go"
    argv = cli(checkpoint[0], data_file, out)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-c", GATED_RUN.format(repo=str(REPO), ready=str(ready),
                                                                     go=str(go), argv=argv)],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(1200):
            if ready.exists() or first.poll() is not None:
                break
            time.sleep(0.1)
        assert ready.exists(), first.communicate()[1][-3000:]
        second = subprocess.run([sys.executable, str(REPO / "evaluate.py"), *argv], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert re.search(f"{re.escape(str(out))} is in use by evaluate.py \\(pid {first.pid} ", second.stderr)
        go.touch()
        _, err = first.communicate(timeout=300)
        assert first.returncode == 0, err[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    assert read_rows(out / "samples.jsonl") == full_run[2]  # the first run's output, whole
    assert json.loads((out / "summary.json").read_text())["pass@1"] == full_run[1]["pass@1"]


# ----------------------------------------------------------------------------------------------------------
# Command line: help, one flag name


def test_help_documents_every_flag_with_its_default_once():
    parser = evaluate.build_parser()
    for action in parser._actions:
        if action.dest != "help":
            assert action.help, action.option_strings
        if action.option_strings and action.dest != "help" and not action.required:
            assert action.help.count("(default:") == 1, (action.option_strings, action.help)
    text = parser.format_help()
    assert "(default: None)" not in text and "--num-samples" in text and "--n " not in text


# ----------------------------------------------------------------------------------------------------------
# Compiled decode


def test_compiled_decode_gives_the_eager_greedy_tokens_for_ragged_prompts(tmp_path):
    """torch.compile (inductor, on CPU here) of the decode step (static shapes: a FlexAttention block mask over
    the whole cache). One slot count throughout, so this compiles a single graph (tens of seconds on a small
    CPU)."""
    hf = make_hf_model(seed=3)
    hf.save_pretrained(tmp_path)
    model = Qwen2.from_pretrained(str(tmp_path))
    prompts = random_prompts([2, 5, 9], seed=6)
    eager = evaluate.generate(model, prompts, 6, batch_size=3)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = evaluate.generate(model, prompts, 6, batch_size=3, compile=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # it really compiled
    assert compiled == eager and all(len(t) == 6 for t in eager)
    assert eager == [hf_greedy(hf, p, 6) for p in prompts]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: compiled decode with CUDA graphs")
def test_compiled_decode_with_cuda_graphs_gives_the_eager_greedy_tokens(checkpoint, ragged_stop):
    """On CUDA (fp32: cuBLAS without TF32, as eager), with ragged stops: a graph per slot count, slot refills
    and the cache shrinking at the tail."""
    model = Qwen2.from_pretrained(checkpoint[0], device="cuda")
    prompts, stops = ragged_stop
    for batch_size in (2, 6):
        eager = evaluate.generate(model, prompts, 16, stop_ids=stops, batch_size=batch_size, n=2)
        compiled = evaluate.generate(model, prompts, 16, stop_ids=stops, batch_size=batch_size, n=2, compile=True)
        assert compiled == eager
    sampled = dict(temperature=0.8, top_p=0.9, n=3, batch_size=4)
    assert evaluate.generate(model, prompts, 16, compile=True, **sampled) == evaluate.generate(model, prompts, 16,
                                                                                              **sampled)
