"""Tests of data.py: templates token for token, the REDI split, validation errors, packing, order."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data  # noqa: E402
from scripts import tiny  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Special-token ids of tiny.make_tokenizer (its SPECIAL_TOKENS order).
ENDOFTEXT, IM_START, IM_END, BOS, EOS, USER, ASSISTANT, THINK, END_THINK = range(9)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny.make_tokenizer(str(tmp_path_factory.mktemp("tok")))


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- templates, token for token


def test_qwen_template_text_and_ids(tok):
    assert tok.token_to_id("<|im_start|>") == IM_START  # the hand-assembled ids below rely on these
    prompt = data.problem_messages("What is 1+1?", "qwen")
    expected_text = ("<|im_start|>system\nPlease reason step by step, and put your final answer within "
                     "\\boxed{}.<|im_end|>\n<|im_start|>user\nWhat is 1+1?<|im_end|>\n"
                     "<|im_start|>assistant\n")
    assert data.TEMPLATES["qwen"].prompt_text(prompt) == expected_text
    expected_prompt_ids = (
        [IM_START] + enc(tok, "system\nPlease reason step by step, and put your final answer within "
                              "\\boxed{}.") + [IM_END] + enc(tok, "\n")
        + [IM_START] + enc(tok, "user\nWhat is 1+1?") + [IM_END] + enc(tok, "\n")
        + [IM_START] + enc(tok, "assistant\n"))
    assert data.encode_prompt(tok, "qwen", prompt) == expected_prompt_ids
    example = data.encode_example(tok, "qwen", prompt, "1 + 1 = 2. The answer is \\boxed{2}.")
    expected_response_ids = enc(tok, "1 + 1 = 2. The answer is \\boxed{2}.") + [IM_END]
    assert example.input_ids == expected_prompt_ids + expected_response_ids
    assert example.loss_mask == [0] * len(expected_prompt_ids) + [1] * len(expected_response_ids)
    assert data.TEMPLATES["qwen"].stop_tokens == ["<|im_end|>", "<|endoftext|>"]


def test_r1_template_text_and_ids(tok):
    prompt = data.problem_messages("What is 1+1?", "r1")
    instruction = "Please reason step by step, and put your final answer within \\boxed{}."
    expected_text = ("<｜begin▁of▁sentence｜><｜User｜>What is 1+1?\n" + instruction
                     + "<｜Assistant｜><think>\n")
    assert data.TEMPLATES["r1"].prompt_text(prompt) == expected_text
    expected_prompt_ids = ([BOS, USER] + enc(tok, "What is 1+1?\n" + instruction)
                           + [ASSISTANT, THINK] + enc(tok, "\n"))
    assert data.encode_prompt(tok, "r1", prompt) == expected_prompt_ids
    # Open-R1 generations open with "<think>\n": removed once, so the prompt's <think> is not doubled.
    response = "<think>\nOkay, 1+1=2.\n</think>\n\nThe answer is \\boxed{2}."
    example = data.encode_example(tok, "r1", prompt, response)
    expected_response_ids = (enc(tok, "Okay, 1+1=2.\n") + [END_THINK]
                             + enc(tok, "\n\nThe answer is \\boxed{2}.") + [EOS])
    assert example.input_ids == expected_prompt_ids + expected_response_ids
    assert example.loss_mask == [0] * len(expected_prompt_ids) + [1] * len(expected_response_ids)
    assert example.input_ids.count(THINK) == 1
    assert (data.encode_response(tok, "r1", "<think>Okay.") == data.encode_response(tok, "r1", "Okay.")
            == enc(tok, "Okay.") + [EOS])
    assert data.TEMPLATES["r1"].stop_tokens == ["<｜end▁of▁sentence｜>"]


def test_r1_system_and_multi_turn(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "<think>\nadd\n</think>\n4"},
                {"role": "user", "content": "3+3?"}]
    assert data.TEMPLATES["r1"].prompt_text(messages) == (
        "<｜begin▁of▁sentence｜>Be brief.<｜User｜>2+2?<｜Assistant｜>\n4<｜end▁of▁sentence｜>"
        "<｜User｜>3+3?<｜Assistant｜><think>\n")
    assert data.TEMPLATES["qwen"].prompt_text(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nadd\n</think>\n4<|im_end|>\n<|im_start|>user\n3+3?<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_end_of_turn_appended_exactly_once(tok):
    for name, end_id in (("qwen", IM_END), ("r1", EOS)):
        template = data.TEMPLATES[name]
        plain = data.encode_response(tok, name, "So \\boxed{3}.")
        already_closed = data.encode_response(tok, name, "So \\boxed{3}." + template.end_of_turn)
        assert plain == already_closed == enc(tok, "So \\boxed{3}.") + [end_id]
        assert plain.count(end_id) == 1
        # An end-of-turn anywhere but at the end, or a doubled one, is corrupt data: rejected.
        for bad in ("So" + template.end_of_turn + " \\boxed{3}.", "So." + template.end_of_turn * 2):
            with pytest.raises(ValueError, match="special token"):
                data.encode_response(tok, name, bad)
        with pytest.raises(ValueError, match="empty"):
            data.encode_response(tok, name, template.end_of_turn)


def test_loss_mask_is_response_plus_end_of_turn(tok, tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"messages": [
        {"role": "user", "content": "Compute 7 * 8."},
        {"role": "assistant", "content": "7 * 8 = 56"},
        {"role": "user", "content": "And minus 6?"},
        {"role": "assistant", "content": "56 - 6 = 50, so \\boxed{50}."}]}])
    rows = data.load_sft(path)
    (example,), report = data.tokenize_sft(rows, tok, "qwen", max_length=None)
    trained = [i for i, m in zip(example.input_ids, example.loss_mask) if m]
    # Only the final assistant turn is trained; the earlier assistant turn is prompt.
    assert trained == enc(tok, "56 - 6 = 50, so \\boxed{50}.") + [IM_END]
    first = example.loss_mask.index(1)
    assert example.loss_mask == [0] * first + [1] * (len(example.loss_mask) - first)
    assert example.input_ids[:first] == data.encode_prompt(tok, "qwen", rows[0]["prompt"])
    assert report["loss_tokens"] == len(trained)
    batch = data.pack([example])
    targets = batch["targets"][0].tolist()
    assert [t for t in targets if t != -100] == trained
    assert batch["num_loss_tokens"] == len(trained)


def test_template_without_its_special_tokens_is_a_clear_error(tmp_path):
    from tokenizers import Tokenizer, models

    qwen_only = Tokenizer(models.WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]"))
    qwen_only.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    assert data.encode_prompt(qwen_only, "qwen", [{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="no special token '<｜begin▁of▁sentence｜>'"):
        data.encode_prompt(qwen_only, "r1", [{"role": "user", "content": "hi"}])
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        data.load_tokenizer(str(tmp_path))
    tiny.make_tokenizer(str(tmp_path))
    assert data.load_tokenizer(str(tmp_path)).token_to_id("<|im_end|>") == IM_END


# --------------------------------------------------------------------------- over-long examples


def test_over_long_examples_are_dropped_and_counted(tok):
    prompt = [{"role": "user", "content": "What is 12 + 35?"}]
    short, long = "So \\boxed{47}.", "First add the ones: 2 + 5 = 7. Then the tens. So \\boxed{47}."
    n_short = len(data.encode_example(tok, "qwen", prompt, short).input_ids)
    n_long = len(data.encode_example(tok, "qwen", prompt, long).input_ids)
    assert n_short < n_long
    rows = [{"prompt": prompt, "response": short, "source": "x:1"},
            {"prompt": prompt, "response": long, "source": "x:2"}]
    kept, report = data.tokenize_sft(rows, tok, "qwen", max_length=n_short)  # exactly at the limit: kept
    assert [len(e.input_ids) for e in kept] == [n_short]
    assert (report["kept"], report["dropped_too_long"]) == (1, 1)
    kept, report = data.tokenize_sft(rows, tok, "qwen", max_length=n_long)
    assert (report["kept"], report["dropped_too_long"]) == (2, 0)

    pair_rows = [{"prompt": prompt, "chosen": short, "rejected": long, "source": "x:1"},
                 {"prompt": prompt, "chosen": short, "rejected": short, "source": "x:2"}]
    pairs, report = data.tokenize_pairs(pair_rows, tok, "qwen", max_length=n_short)
    assert len(pairs) == 1 and report["dropped_too_long"] == 1  # the pair goes whole

    group_rows = [{"prompt": prompt, "completions": [short, long, short], "rewards": [1.0, 0.0, 0.0],
                   "source": "x:1"},
                  {"prompt": prompt, "completions": [long, short], "rewards": [1.0, 0.0], "source": "x:2"}]
    groups, report = data.tokenize_groups(group_rows, tok, "qwen", max_length=n_short)
    assert len(groups) == 1 and groups[0][1] == [1.0, 0.0]  # the long completion's reward goes with it
    assert report["dropped_completions_too_long"] == 2 and report["dropped_groups_too_small"] == 1


# --------------------------------------------------------------------------- bad input names file:line

GOOD_SFT = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


@pytest.mark.parametrize("bad_line, message", [
    ('{"messages": [', "not valid JSON"),
    ('[1, 2]', "expected a JSON object"),
    ({"prompt": "q"}, "missing field 'messages'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
     r"messages\[1\] \(assistant\) has empty"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"},
                   {"role": "assistant", "content": "a"}]}, "role order"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "role order"),
    ({"messages": [{"role": "user", "content": "q"}]}, "role order"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                   {"role": "system", "content": "s"}]}, "role order"),
    ({"messages": [{"role": "tool", "content": "q"}]}, "role 'tool'"),
])
def test_bad_sft_rows_name_file_and_line(tmp_path, bad_line, message):
    path = write_jsonl(tmp_path / "sft.jsonl", [GOOD_SFT, "", bad_line])  # line 2 is blank
    with pytest.raises(ValueError, match=f"{path}:3: .*{message}"):
        data.load_sft(path)


@pytest.mark.parametrize("loader, bad_line, message", [
    (data.load_pairs, {"prompt": "q", "chosen": "a"}, "missing field 'rejected'"),
    (data.load_pairs, {"prompt": "q", "chosen": "a", "rejected": ""}, "'rejected' is an empty response"),
    (data.load_pairs, {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                       "chosen": "a", "rejected": "b"}, "role order"),
    (data.load_pairs, {"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
     "exactly one assistant message"),
    (data.load_groups, {"prompt": "q", "completions": ["a", "b"], "rewards": [1.0]}, "as long as"),
    (data.load_groups, {"prompt": "q", "completions": ["a", ""], "rewards": [1.0, 0.0]},
     r"'completions\[1\]' is an empty response"),
    (data.load_groups, {"prompt": "q", "completions": ["a"], "rewards": ["high"]}, "not a finite number"),
])
def test_bad_pair_and_group_rows_name_file_and_line(tmp_path, loader, bad_line, message):
    good = {"prompt": "q", "chosen": "a", "rejected": "b", "completions": ["a"], "rewards": [1]}
    path = write_jsonl(tmp_path / "rows.jsonl", [good, bad_line])
    with pytest.raises(ValueError, match=f"{path}:2: .*{message}"):
        loader(path)


def test_bad_response_content_is_reported_at_tokenisation_with_file_line(tok, tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [GOOD_SFT, {"messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a<|im_end|>b"}]}])
    with pytest.raises(ValueError, match=f"{path}:2: the response contains the special token"):
        data.tokenize_sft(data.load_sft(path), tok, "qwen", max_length=None)


def test_plain_strings_and_format_detection(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    assert data.load_pairs(pairs) == [{"prompt": [{"role": "user", "content": "q"}], "chosen": "a",
                                       "rejected": "b", "source": f"{pairs}:1"}]
    groups = write_jsonl(tmp_path / "groups.jsonl", [{"prompt": "q", "completions": ["a", "b"],
                                                      "rewards": [1, 0]}])
    sft = write_jsonl(tmp_path / "sft.jsonl", [GOOD_SFT])
    assert [data.detect_format(p) for p in (sft, pairs, groups)] == ["sft", "pairs", "groups"]
    assert data.load_rows(groups, "groups")[0]["rewards"] == [1.0, 0.0]
    with pytest.raises(ValueError, match="looks like pairs rows but sft rows are needed"):
        data.load_rows(pairs, "sft")
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"text": "x"}])
    with pytest.raises(ValueError, match=f"{odd}:1: unknown row format"):
        data.detect_format(odd)


# --------------------------------------------------------------------------- the REDI split from raw traces

RIGHT, WRONG = "So the answer is \\boxed{4}.", "So the answer is \\boxed{5}."


def raw_rows(contaminated_problem):
    long_trace = "Let me check. " * 60 + RIGHT
    return [
        # 1: wrong, right, right -> sft = first right; pair = (first right, first wrong); group of 3
        {"problem": "Problem one: what is 2 + 2?", "answer": "4",
         "generations": [WRONG + " one", RIGHT + " one", RIGHT + " one again"],
         "correctness": [False, True, True]},
        # 2: all right -> sft, no pair, group of 2
        {"problem": "Problem two: what is 3 + 1?", "answer": "4",
         "generations": [RIGHT + " two", RIGHT + " two again"], "correctness": [True, True]},
        # 3: all wrong -> no sft, no pair, group of 2
        {"problem": "Problem three: what is 1 + 3?", "answer": "4",
         "generations": [WRONG + " three", WRONG + " three again"], "correctness": [False, False]},
        # 4: overlaps the benchmark -> dropped before anything else
        {"problem": contaminated_problem, "answer": "4", "generations": [RIGHT],
         "correctness": [True]},
        # 5: prompt too long -> dropped
        {"problem": "Problem five: " + "a long story " * 100 + "what is 4?", "answer": "4",
         "generations": [RIGHT], "correctness": [True]},
        # 6: the first right trace is too long -> removed before choosing; sft = the short right one
        {"problem": "Problem six: what is 0 + 4?", "answer": "4",
         "generations": [long_trace, WRONG + " six", RIGHT + " six"], "correctness": [True, False, True]},
        # 7: a single trace -> sft, but no group (too small)
        {"problem": "Problem seven: what is 5 - 1?", "answer": "4", "generations": [RIGHT + " seven"],
         "correctness": [True]},
    ]


def test_build_reproduces_the_redi_split(tok, tmp_path):
    bench = write_jsonl(tmp_path / "bench.jsonl", [
        {"problem": "Find the number of ordered pairs of positive integers (a, b) with a + b = 10."}])
    # Same 8 words in a different case and spacing, inside a longer text: an 8-gram overlap.
    contaminated = "Warm-up.  FIND the number of ordered   pairs of positive integers (a,b) with sum 10?"
    raw = write_jsonl(tmp_path / "raw.jsonl", raw_rows(contaminated))
    out = tmp_path / "out"
    report = data.build_from_raw(raw, out, tokenizer=tok, template="qwen", max_prompt_tokens=100,
                                 max_response_tokens=40, decontaminate=[bench])
    expected = {"problems": 7, "generations": 13, "dropped_contaminated": 1, "dropped_prompt_too_long": 1,
                "dropped_response_too_long": 1, "kept_generations": 10, "correct": 6, "incorrect": 4,
                "labelled_by_verifier": 0, "problems_without_correct": 1, "groups_too_small": 1,
                "sft_rows": 4, "pairs_rows": 2, "groups_rows": 4}
    assert {k: report[k] for k in expected} == expected
    assert json.loads((out / "report.json").read_text()) == report

    sft = data.load_sft(out / "sft.jsonl")
    assert [r["response"] for r in sft] == [RIGHT + " one", RIGHT + " two", RIGHT + " six", RIGHT + " seven"]
    assert sft[0]["prompt"] == data.problem_messages("Problem one: what is 2 + 2?", "qwen")
    pairs = data.load_pairs(out / "pairs.jsonl")
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [(RIGHT + " one", WRONG + " one"),
                                                             (RIGHT + " six", WRONG + " six")]
    groups = data.load_groups(out / "groups.jsonl")
    assert [g["rewards"] for g in groups] == [[0.0, 1.0, 1.0], [1.0, 1.0], [0.0, 0.0], [0.0, 1.0]]
    assert groups[3]["completions"] == [WRONG + " six", RIGHT + " six"]
    assert sorted(p.name for p in out.iterdir()) == ["groups.jsonl", "pairs.jsonl", "report.json",
                                                     "sft.jsonl"]  # no .tmp left behind

    # Without a tokenizer the length filters are skipped, and the report says so.
    report = data.build_from_raw(raw, tmp_path / "nolen", decontaminate=[bench])
    assert report["settings"]["length_filter"].startswith("skipped")
    assert (report["sft_rows"], report["pairs_rows"], report["dropped_response_too_long"]) == (5, 2, 0)


def test_build_with_r1_template_tokenises_its_own_output(tok, tmp_path):
    raw = write_jsonl(tmp_path / "raw.jsonl", [
        {"problem": "What is 2 + 2?", "answer": "4", "generations": ["<think>\n2+2=4\n</think>\n" + RIGHT,
                                                                   "<think>\nhmm\n</think>\n" + WRONG],
         "correctness": [True, False]}])
    data.build_from_raw(raw, tmp_path / "out", tokenizer=tok, template="r1")
    rows = data.load_pairs(tmp_path / "out" / "pairs.jsonl")
    assert rows[0]["prompt"] == [{"role": "user", "content": "What is 2 + 2?\n" + data.R1_INSTRUCTION}]
    ((chosen, rejected),), _ = data.tokenize_pairs(rows, tok, "r1", max_length=None)
    assert chosen.input_ids.count(THINK) == 1 and chosen.input_ids[-1] == EOS


def test_decontamination_against_math500():
    math500 = SHARED_DATA / "math500.jsonl"
    if not math500.exists():
        pytest.skip(f"{math500} not found (the shared benchmark data lives beside the checkout)")
    first = json.loads(math500.read_text().splitlines()[0])["problem"]
    is_contaminated = data.Decontaminator([math500], n=8)
    assert is_contaminated(first.upper().replace(" ", "  "))
    assert is_contaminated("Intro text. " + " ".join(first.split()[:8]))  # one shared 8-gram is enough
    words = data.normalize_for_overlap(first)
    assert not is_contaminated(" ".join(words[:7]))  # under 8 words: compared as a whole text
    assert not is_contaminated(" ".join(words[:7]) + " banana")  # 7 shared words are not an 8-gram
    assert not is_contaminated("What is the sum of the first seven prime numbers plus four?")


def test_decontamination_of_short_problems(tmp_path):
    bench = write_jsonl(tmp_path / "b.jsonl", [{"problem": "Compute $2+3$."}])
    is_contaminated = data.Decontaminator([bench], n=8)
    assert is_contaminated("compute 2 + 3")
    assert not is_contaminated("Compute 2 + 4.")


def test_bad_raw_rows_name_file_and_line(tmp_path):
    good = {"problem": "p", "answer": "1", "generations": ["g"], "correctness": [True]}
    cases = [({"problem": "p", "answer": "1"}, "missing field 'generations'"),
             ({"problem": "p", "answer": "1", "generations": ["g", ""]}, r"generations\[1\] is an empty"),
             ({"problem": "p", "answer": "1", "generations": ["g"], "correctness": [True, False]},
              "'correctness' must be a list as long as 'generations'"),
             ({"problem": "p", "answer": "1", "generations": ["g"], "correctness": ["yes"]},
              r"correctness\[0\] = 'yes'")]
    for bad, message in cases:
        raw = write_jsonl(tmp_path / "raw.jsonl", [good, bad])
        with pytest.raises(ValueError, match=f"{raw}:2: {message}"):
            data.build_from_raw(raw, tmp_path / "out")
        assert list((tmp_path / "out").iterdir()) == []  # a failed build leaves nothing half-written


def test_unlabelled_generations_are_graded_by_verify(tmp_path):
    verify = pytest.importorskip("verify")
    assert verify.grade(RIGHT, "4") and not verify.grade(WRONG, "4")
    raw = write_jsonl(tmp_path / "raw.jsonl", [
        {"problem": "What is 2 + 2?", "answer": "4", "generations": [WRONG, RIGHT]},
        # A null label is graded; a given label is trusted, even where the verifier would disagree.
        {"problem": "What is 1 + 3?", "answer": "4", "generations": [RIGHT, WRONG],
         "correctness": [None, True]}])
    report = data.build_from_raw(raw, tmp_path / "out")
    assert (report["labelled_by_verifier"], report["correct"], report["incorrect"]) == (3, 3, 1)
    groups = data.load_groups(tmp_path / "out" / "groups.jsonl")
    assert [g["rewards"] for g in groups] == [[0.0, 1.0], [1.0, 1.0]]
    pairs = data.load_pairs(tmp_path / "out" / "pairs.jsonl")
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [(RIGHT, WRONG)]


def test_cli_build(tok, tmp_path, capsys):
    model_dir = tmp_path / "model"
    tiny.make_tokenizer(str(model_dir))
    raw = write_jsonl(tmp_path / "raw.jsonl", raw_rows("Unrelated problem about primes and squares here."))
    assert data.main(["build", "--raw", str(raw), "--out", str(tmp_path / "out"), "--tokenizer",
                      str(model_dir), "--max-prompt-tokens", "100", "--max-response-tokens", "40"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "out" / "report.json").read_text())
    assert printed["sft_rows"] == 5 and printed["dropped_contaminated"] == 0
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"problem": "p"'])
    assert data.main(["build", "--raw", str(bad), "--out", str(tmp_path / "out2")]) == 2
    assert f"{bad}:1: not valid JSON" in capsys.readouterr().err


# --------------------------------------------------------------------------- packing


def test_pack_targets_positions_documents():
    a = data.Example([10, 11, 12, 13], [0, 0, 1, 1])
    b = data.Example([20, 21, 22], [0, 1, 1])
    batch = data.pack([a, b])
    assert batch["input_ids"].tolist() == [[10, 11, 12, 13, 20, 21, 22]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    assert batch["document_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1]]
    assert batch["targets"].tolist() == [[-100, 12, 13, -100, 21, 22, -100]]
    assert (batch["num_sequences"], batch["num_loss_tokens"]) == (2, 4)
    assert all(batch[k].dtype == torch.long and batch[k].shape == (1, 7)
               for k in ("input_ids", "position_ids", "document_ids", "targets"))


def test_pack_matches_a_reference_on_random_examples():
    g = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(6):
        n = int(torch.randint(1, 12, (1,), generator=g))
        prompt = int(torch.randint(0, n + 1, (1,), generator=g))
        examples.append(data.Example(torch.randint(0, 50, (n,), generator=g).tolist(),
                                     [0] * prompt + [1] * (n - prompt)))
    batch = data.pack(examples)
    ids, docs, targets = (batch[k][0].tolist() for k in ("input_ids", "document_ids", "targets"))
    flat_mask = [m for e in examples for m in e.loss_mask]
    for t in range(len(ids)):
        same_doc_next = t + 1 < len(ids) and docs[t + 1] == docs[t]
        expected = ids[t + 1] if same_doc_next and flat_mask[t + 1] else -100
        assert targets[t] == expected
    assert batch["num_loss_tokens"] == sum(sum(e.loss_mask[1:]) for e in examples)


def test_pack_pairs_and_groups():
    c0, r0 = data.Example([1, 2], [0, 1]), data.Example([1, 3, 4], [0, 1, 1])
    c1, r1 = data.Example([5, 6], [0, 1]), data.Example([5, 7], [0, 1])
    batch = data.pack_pairs([(c0, r0), (c1, r1)])
    assert batch["input_ids"].tolist() == [[1, 2, 1, 3, 4, 5, 6, 5, 7]]
    assert batch["document_ids"].tolist() == [[0, 0, 1, 1, 1, 2, 2, 3, 3]]
    assert batch["chosen_index"].tolist() == [0, 2] and batch["rejected_index"].tolist() == [1, 3]
    groups = data.pack_groups([([c0, r0, c1], [1.0, 0.0, 1.0]), ([r1, c1], [0.5, 0.25])])
    assert groups["num_sequences"] == 5
    assert groups["rewards"].tolist() == [1.0, 0.0, 1.0, 0.5, 0.25] and groups["rewards"].dtype == torch.float32
    assert groups["group_sizes"].tolist() == [3, 2]


def test_pack_by_budget():
    lengths = [5, 3, 4, 8, 2, 1]
    assert data.pack_by_budget([0, 1, 2, 3, 4, 5], lengths, 8) == [[0, 1], [2], [3], [4, 5]]
    assert data.pack_by_budget([5, 4, 2, 0], lengths, 8) == [[5, 4, 2], [0]]
    with pytest.raises(ValueError, match="example 3 has 8 tokens"):
        data.pack_by_budget([0, 3], lengths, 7)


# --------------------------------------------------------------------------- order and sharding


def test_sharding_covers_every_index_once():
    n, batch_size, world = 103, 10, 4
    seen = []
    for batch in data.global_batches(n, batch_size, seed=3, epoch=0):
        parts = [data.shard(batch, rank, world) for rank in range(world)]
        assert sorted(i for part in parts for i in part) == sorted(batch)  # cover, no overlap
        seen += [i for part in parts for i in part]
    assert sorted(seen) == list(range(n))
    assert [len(data.shard(data.global_batches(n, batch_size, 3, 0)[-1], r, world)) for r in range(world)] \
        == [1, 1, 1, 0]  # the short last batch is kept; a rank may get nothing
    with pytest.raises(ValueError):
        data.shard([1, 2], rank=4, world_size=4)
    assert data.micro_batches([7, 8, 9, 10, 11], 2) == [[7, 8], [9, 10], [11]]


def test_order_is_deterministic_and_resumable():
    assert data.global_batches(50, 8, seed=1, epoch=0) == data.global_batches(50, 8, seed=1, epoch=0)
    assert data.epoch_order(50, 1, 0) != data.epoch_order(50, 2, 0)
    assert data.epoch_order(50, 1, 0) != data.epoch_order(50, 1, 1)
    assert data.epoch_order(50, 1, 0) != data.epoch_order(50, 0, 1)
    assert sorted(data.epoch_order(50, 1, 0)) == list(range(50))
    full = list(data.iterate_batches(50, 8, seed=1, num_epochs=3))
    assert len(full) == 3 * 7 and [step for step, _, _ in full] == list(range(21))
    assert [b for _, e, b in full if e == 1] == data.global_batches(50, 8, seed=1, epoch=1)
    for k in (0, 5, 7, 13, 20, 21):  # including a resume exactly at an epoch edge, and at the end
        assert list(data.iterate_batches(50, 8, seed=1, num_epochs=3, start_step=k)) == full[k:]
