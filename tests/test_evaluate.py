"""evaluate.py: the sampler against transformers' generate, batching / refill / seed invariances, the
sampling distribution, pass@k / maj@n / summary formulas, data errors, the CLI, resume and torchrun."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import data
import evaluate
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


def test_refill_hands_a_finished_slot_to_the_next_sample_at_once(checkpoint, ragged_stop):
    _, _, ours = checkpoint
    prompts, stops = ragged_stop
    one_at_a_time = evaluate.generate(ours, prompts, 16, stop_ids=stops, batch_size=1)
    requests = [evaluate.Request(p, key=i) for i, p in enumerate(prompts)]
    finished = list(evaluate.stream_samples(ours, requests, 16, stop_ids=stops, batch_size=2))
    assert sorted(f.request for f in finished) == list(range(len(prompts)))
    assert [f.tokens for f in sorted(finished, key=lambda f: f.request)] == one_at_a_time
    # Samples are yielded as they finish, and a slot is refilled in the very step its sample finished:
    # in each slot, every sample after the first was admitted at the step the previous one finished.
    assert [f.finished_step for f in finished] == sorted(f.finished_step for f in finished)
    for slot in (0, 1):
        chain = sorted((f for f in finished if f.slot == slot), key=lambda f: f.admitted_step)
        assert chain[0].admitted_step == 0
        assert all(b.admitted_step == a.finished_step for a, b in zip(chain, chain[1:]))
    assert max(f.admitted_step for f in finished) > 0  # refills happened


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
                        lambda t, p, kv_len: widths.append(len(t)) or real_step(t, p, kv_len))
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
    problems = [evaluate.Problem(0, "p0", "?", "4x", "Algebra", 2),
                evaluate.Problem(1, "p1", "?", "1/2", "Geometry", 2)]
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
    problems = evaluate.read_problems(good)
    assert [(p.id, p.answer) for p in problems] == [("0", "27"), ("7", "x")]
    assert evaluate.read_problems(write_jsonl(tmp_path / "u.jsonl", ROWS))[2].id == "t/3.json"
    for bad, message in [([{"problem": "a", "answer": "1"}, {"problem": "b"}], ":2: needs an 'answer'"),
                         ([{"answer": "1"}], ":1: needs a non-empty string 'problem'"),
                         ([{"problem": "a", "answer": "1", "id": "x"}] * 2, ":2: id 'x' already used at .*:1")]:
        with pytest.raises(ValueError, match=message):
            evaluate.read_problems(write_jsonl(tmp_path / "bad.jsonl", bad))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "mini.jsonl", ROWS)


def cli(checkpoint_path, data_path, out, *extra):
    return [checkpoint_path, "--data", data_path, "--n", "2", "--max-new-tokens", "6", "--temperature", "0.7",
            "--top-p", "0.95", "--out", str(out), *extra]


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
                yield evaluate.Finished(i, j, ids, reason, slot=0, admitted_step=0, finished_step=0)

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
    with pytest.raises(SystemExit, match="run.json.*seed: 0 there, 1 now.*pick another --out"):
        evaluate.main(cli(checkpoint[0], data_file, out, "--seed", "1"))
    (tmp_path / "samples.jsonl").write_text((out / "samples.jsonl").read_text())  # samples of unknown settings
    with pytest.raises(SystemExit, match="no run.json.*pick another --out"):
        evaluate.main(cli(checkpoint[0], data_file, tmp_path))


def test_a_prompt_longer_than_max_seq_len_names_the_problem(checkpoint, data_file, tmp_path):
    with pytest.raises(SystemExit, match="problem 't/1.json' has a .*-token prompt.*--max-seq-len 20"):
        evaluate.main(cli(checkpoint[0], data_file, tmp_path, "--max-seq-len", "20"))


def test_a_bad_data_row_names_file_and_line(checkpoint, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], {"problem": "no answer here"}])
    with pytest.raises(ValueError, match="bad.jsonl:2: needs an 'answer'"):
        evaluate.main(cli(checkpoint[0], bad, tmp_path / "out"))


def test_torchrun_two_ranks_give_the_single_process_samples(checkpoint, data_file, full_run, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = [a if a != "--n" else "--num-samples" for a in cli(checkpoint[0], data_file, out)]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                             "2", str(REPO / "evaluate.py"), *args],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_rows(out / "samples.jsonl") == full_run[2]  # merged by rank 0, in data order
    assert not list(out.glob("samples.rank*.jsonl"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pass@1"] == full_run[1]["pass@1"] and summary["pass@k"] == full_run[1]["pass@k"]
