"""Tests of data.py: templates token for token, the REDI split, validation errors, packing, order."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data  # noqa: E402
from scripts import tiny  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Special-token ids of tiny.make_tokenizer (its SPECIAL_TOKENS order).
ENDOFTEXT, IM_START, IM_END, BOS, EOS, USER, ASSISTANT, THINK, END_THINK = range(9)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny.make_tokenizer(str(tmp_path_factory.mktemp("tok")))


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


def run_cli(*args, **kwargs):
    return subprocess.run([sys.executable, str(REPO / "data.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, **kwargs)


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


def test_build_reports_overlaps_and_removes_them_only_on_request(tmp_path):
    # The REDI authors only report benchmark overlaps; removal is a choice (--remove-contaminated).
    bench = write_jsonl(tmp_path / "bench.jsonl", [
        {"problem": "Find the number of ordered pairs of positive integers (a, b) with a + b = 10."}])
    # Same 8 words in a different case and spacing, inside a longer text: an 8-gram overlap.
    contaminated = "Warm-up.  FIND the number of ordered   pairs of positive integers (a,b) with sum 10?"
    raw = write_jsonl(tmp_path / "raw.jsonl", raw_rows(contaminated))
    reported = data.build_from_raw(raw, tmp_path / "reported", decontaminate=[bench])
    assert (reported["contaminated"], reported["dropped_contaminated"], reported["contaminated_lines"]) == (1, 0, [4])
    assert reported["sft_rows"] == 6  # every problem with a correct trace, the overlapping one included

    out = tmp_path / "removed"
    report = data.build_from_raw(raw, out, decontaminate=[bench], remove_contaminated=True)
    expected = {"rows": 7, "contaminated": 1, "dropped_contaminated": 1, "problems_kept": 6, "generations": 12,
                "correct": 8, "incorrect": 4, "labelled_by_verifier": 0, "sft_rows": 5,
                "pairs_skipped_condition": 4, "pairs_before_length_filter": 2, "pairs_rows": 2,
                "groups_rows": 4, "groups_too_small": 2, "problems_without_correct": 1}
    assert {k: report[k] for k in expected} == expected
    assert json.loads((out / "report.json").read_text()) == report
    # SFT = the first correct trace, long or not (the authors length-filter pairs only).
    sft = data.load_sft(out / "sft.jsonl")
    long_trace = raw_rows("")[5]["generations"][0]
    assert [r["response"] for r in sft] == [RIGHT + " one", RIGHT + " two", RIGHT, long_trace, RIGHT + " seven"]
    assert sft[0]["prompt"] == data.problem_messages("Problem one: what is 2 + 2?", "qwen")
    pairs = data.load_pairs(out / "pairs.jsonl")
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [(RIGHT + " one", WRONG + " one"),
                                                             (long_trace, WRONG + " six")]
    groups = data.load_groups(out / "groups.jsonl")
    assert [g["rewards"] for g in groups] == [[0.0, 1.0, 1.0], [1.0, 1.0], [0.0, 0.0], [1.0, 0.0, 1.0]]
    assert sorted(p.name for p in out.iterdir()) == ["groups.jsonl", "pairs.jsonl", "report.json",
                                                     "sft.jsonl"]  # no .tmp left behind


def test_build_with_r1_template_tokenises_its_own_output(tok, tmp_path):
    raw = write_jsonl(tmp_path / "raw.jsonl", [
        {"problem": "What is 2 + 2?", "answer": "4", "generations": ["<think>\n2+2=4\n</think>\n" + RIGHT,
                                                                   "<think>\nhmm\n</think>\n" + WRONG],
         "correctness": [True, False]}])
    data.build_from_raw(raw, tmp_path / "out", tokenizer=tok, template="r1")
    rows = data.load_pairs(tmp_path / "out" / "pairs.jsonl")
    assert rows[0]["prompt"] == [{"role": "user", "content": "What is 2 + 2?\n" + data.SYSTEM_PROMPT}]
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
    # 6 since issue 11: SFT rows are not length-filtered (the authors' rule), so problem 5, whose prompt is
    # over --max-prompt-tokens, keeps its SFT row; only its pair would be dropped.
    assert printed["sft_rows"] == 6 and printed["dropped_contaminated"] == 0
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"problem": "p"'])
    result = run_cli("build", "--raw", bad, "--out", tmp_path / "out2")
    assert result.returncode == 2
    assert f"data.py: error: {bad}:1: not valid JSON" in result.stderr and "Traceback" not in result.stderr


def test_a_checkpoints_tokenizer_is_checked_against_its_config_but_builds_take_any(tmp_path):
    """Training and evaluation load a checkpoint's tokenizer with its config.json checked (model.check_vocab);
    `build --tokenizer` only counts tokens, so another family's model directory is fine there."""
    from model import CheckpointError

    model_dir = tmp_path / "llama"
    tiny.make_tokenizer(str(model_dir))
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 10}))
    with pytest.raises(CheckpointError, match="model_type"):
        data.load_tokenizer(model_dir)
    assert data.load_tokenizer(model_dir, check_config=False).get_vocab_size() > 10
    raw = write_jsonl(tmp_path / "raw.jsonl", raw_rows("Unrelated problem about primes and squares here."))
    assert data.main(["build", "--raw", str(raw), "--out", str(tmp_path / "out"), "--tokenizer", str(model_dir)]) == 0


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
    flat = data.pack([c0, r0, c1, r1, c1])  # group after group, in order
    assert all(torch.equal(groups[k], flat[k]) for k in ("input_ids", "position_ids", "document_ids", "targets"))


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


# --------------------------------------------------------------------------- the authors' selection (issue 11)

# Qwen2.5-Math-1.5B's chat template (tokenizer_config.json "chat_template"; the REDI authors' README shows the
# same with only the generation prompt changed to "<|im_start|>assistant<think>\n"). Written out here so that
# transformers' Jinja rendering is an independent reference for data.py's Python templates.
QWEN25_MATH_CHAT_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n"
    "        {{- 'Please reason step by step, and put your final answer within \\\\boxed{}.' }}\n"
    "    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are "
    "provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nPlease reason step by step, and put your final answer within "
    "\\\\boxed{}.<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n")


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    """transformers' tokenizer over the same tiny tokenizer.json, carrying Qwen2.5-Math's chat template."""
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("hf_tok")
    tiny.make_tokenizer(str(path))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    tokenizer.chat_template = QWEN25_MATH_CHAT_TEMPLATE
    return tokenizer, data.load_tokenizer(str(path))


def openr1_row(problem, generations, llama, reparsed, valid="Yes", source="olympiads", answer="4"):
    """A row with OpenR1-Math-Raw's columns and types (math_verify_answer deliberately differs from the
    reparsed column, which is the one LandMV reads)."""
    return {"problem": problem, "solution": "See the generations.", "answer": answer,
            "problem_type": "Algebra", "question_type": "math-word-problem", "source": source,
            "uuid": "00000000-0000-0000-0000-000000000000", "is_reasoning_complete": [True] * len(generations),
            "generations": generations, "finish_reasons": ["stop"] * len(generations),
            "correctness": {"llama_verification": llama, "math_verify_answer": [not r for r in reparsed],
                            "math_verify_reparsed_answer": reparsed},
            "correctness_count": sum(map(bool, reparsed)), "problem_is_valid": valid, "solution_is_valid": "Yes",
            "messages": []}


def openr1_fixture():
    long_ok = "<think>\n" + "Check the sum once more. " * 40 + "</think>\n" + RIGHT
    long_bad = "<think>\n" + "Maybe it is five after all. " * 40 + "</think>\n" + WRONG
    return [
        openr1_row("P1: what is 2 + 2?", [WRONG, RIGHT + " a", RIGHT + " b"], [True, True, True],
                   [False, True, True]),                                        # pair (1, 0), sft 1
        openr1_row("P2: what is 3 + 1?", [RIGHT, RIGHT + " c"], [True, True], [True, True], valid=" yes "),
        openr1_row("P3: invalid", [RIGHT, WRONG], [True, False], [True, False], valid="no"),
        openr1_row("P4: null validity", [RIGHT, WRONG], [True, False], [True, False], valid=None),
        openr1_row("P5: from cn_k12", [RIGHT, WRONG], [True, False], [True, False], source="cn_k12"),
        openr1_row("P6: mismatched", [RIGHT, WRONG, RIGHT], [True, False], [True, False, True]),
        openr1_row("P7: only wrong", [WRONG, WRONG + " d"], [False, True], [True, False], valid="YES"),
        openr1_row("P8: long wrong before the first right", [long_bad, RIGHT], [False, True], [False, True]),
        openr1_row("P9: long right after the first right", [RIGHT, WRONG, long_ok], [True, None, True],
                   [True, True, True]),                                          # null counts as false
        openr1_row("P10: the first right is long", [long_ok, WRONG], [True, False], [True, False]),
        openr1_row("P11: one trace", [RIGHT], [True], [True]),
        openr1_row("P12: " + "a long story " * 60 + "what is 4?", [RIGHT, WRONG], [True, False], [True, False]),
        openr1_row("", [RIGHT], [True], [True]),
        openr1_row("P14: no generations", [], [], []),
    ]


def authors_rule(rows, hf, max_prompt, max_response):
    """The authors' selection restated from their scripts (clean_base_shuffled.py, clean_base_shuffled_dpo.py,
    study_length_distribution.py's template_and_tokenize_lengths), with transformers doing the rendering."""
    counts, sft, candidates = dict.fromkeys(["invalid", "source", "no_problem", "no_generations", "mismatched",
                                             "no_pair"], 0), [], []
    for line, row in enumerate(rows, start=1):
        valid = row.get("problem_is_valid")
        if not (isinstance(valid, str) and valid.strip().lower() == "yes"):
            counts["invalid"] += 1
            continue
        if row.get("source") == "cn_k12":
            counts["source"] += 1
            continue
        if not row["problem"]:
            counts["no_problem"] += 1
            continue
        if not row["generations"]:
            counts["no_generations"] += 1
            continue
        llama, rep = row["correctness"]["llama_verification"], row["correctness"]["math_verify_reparsed_answer"]
        if len(llama) != len(row["generations"]) or len(rep) != len(row["generations"]):
            counts["mismatched"] += 1
            continue
        true = [i for i, (a, b) in enumerate(zip(llama, rep)) if bool(a) and bool(b)]
        false = [i for i, (a, b) in enumerate(zip(llama, rep)) if not (bool(a) and bool(b))]
        if true:
            sft.append((line, true[0]))
        if true and false:
            candidates.append((line, true[0], false[0]))
        else:
            counts["no_pair"] += 1

    def length(messages):
        text = hf.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
        return len(hf(text, add_special_tokens=False)["input_ids"]) + 1

    pairs = []
    for line, c, r in candidates:
        row = rows[line - 1]
        lengths = (length([{"role": "user", "content": row["problem"]}]),
                   length([{"role": "assistant", "content": row["generations"][c]}]),
                   length([{"role": "assistant", "content": row["generations"][r]}]))
        if lengths[0] <= max_prompt and max(lengths[1:]) <= max_response:
            pairs.append((line, c, r, lengths))
    return counts, sft, candidates, pairs


def test_build_selects_as_the_authors_do(hf_tok, tmp_path):
    hf, tok = hf_tok
    rows = openr1_fixture()
    raw = write_jsonl(tmp_path / "raw.jsonl", rows)
    max_prompt, max_response = 120, 200
    counts, sft_expected, candidates, pairs_expected = authors_rule(rows, hf, max_prompt, max_response)
    # The fixture exercises every branch: a pair dropped for its prompt, one for a response, and kept ones.
    assert 0 < len(pairs_expected) < len(candidates) - 1

    report = data.build_from_raw(raw, tmp_path / "out", tokenizer=tok, max_prompt_tokens=max_prompt,
                                 max_response_tokens=max_response)
    assert {k: report[k] for k in ("rows", "filtered_invalid_problem", "filtered_source", "skipped_no_problem",
                                   "skipped_no_generations", "skipped_mismatched_lengths", "sft_rows",
                                   "pairs_skipped_condition", "pairs_before_length_filter",
                                   "pairs_removed_by_length", "pairs_rows")} == {
        "rows": len(rows), "filtered_invalid_problem": counts["invalid"], "filtered_source": counts["source"],
        "skipped_no_problem": counts["no_problem"], "skipped_no_generations": counts["no_generations"],
        "skipped_mismatched_lengths": counts["mismatched"], "sft_rows": len(sft_expected),
        "pairs_skipped_condition": counts["no_pair"], "pairs_before_length_filter": len(candidates),
        "pairs_removed_by_length": len(candidates) - len(pairs_expected), "pairs_rows": len(pairs_expected)}

    sft = [json.loads(line) for line in (tmp_path / "out" / "sft.jsonl").read_text().splitlines()]
    assert [r["chosen_gen_idx"] for r in sft] == [i for _, i in sft_expected]
    assert [r["messages"][-1]["content"] for r in sft] == [rows[line - 1]["generations"][i]
                                                          for line, i in sft_expected]
    pairs = [json.loads(line) for line in (tmp_path / "out" / "pairs.jsonl").read_text().splitlines()]
    assert [(p["chosen_gen_idx"], p["rejected_gen_idx"]) for p in pairs] == [(c, r) for _, c, r, _ in pairs_expected]
    assert [(p["prompt_len"], p["chosen_len"], p["rejected_len"]) for p in pairs] == [
        n for *_, n in pairs_expected]
    assert [p["chosen"][0]["content"] for p in pairs] == [rows[line - 1]["generations"][c]
                                                          for line, c, _, _ in pairs_expected]
    # Groups: every generation of every problem that passed the filters, its LandMV label as the reward.
    groups = data.load_groups(tmp_path / "out" / "groups.jsonl")
    kept = [line for line in range(1, len(rows) + 1) if rows[line - 1]["problem"].startswith(
        ("P1:", "P2:", "P7:", "P8:", "P9:", "P10:", "P12:"))]
    assert [g["completions"] for g in groups] == [rows[line - 1]["generations"] for line in kept]
    assert groups[0]["rewards"] == [0.0, 1.0, 1.0] and groups[4]["rewards"] == [1.0, 0.0, 1.0]
    assert report["groups_too_small"] == 1  # P11's single trace


def test_build_labels_choice(tmp_path):
    rows = [openr1_row("What is 2 + 2?", [WRONG, RIGHT], [True, True], [True, False])]  # LandMV says (T, F)
    raw = write_jsonl(tmp_path / "raw.jsonl", rows)
    landmv = data.build_from_raw(raw, tmp_path / "landmv", labels="landmv")
    verified = data.build_from_raw(raw, tmp_path / "verify", labels="verify")  # verify.py: (F, T)
    pair = lambda d: json.loads((tmp_path / d / "pairs.jsonl").read_text())  # noqa: E731
    assert (pair("landmv")["chosen_gen_idx"], pair("verify")["chosen_gen_idx"]) == (0, 1)
    assert (landmv["labelled_by_verifier"], verified["labelled_by_verifier"]) == (0, 2)
    unlabelled = write_jsonl(tmp_path / "plain.jsonl", [{"problem": "p", "answer": "4", "generations": [RIGHT]}])
    with pytest.raises(data.InputError, match=f"{unlabelled}:1: 'correctness' is NoneType; --labels landmv"):
        data.build_from_raw(unlabelled, tmp_path / "x", labels="landmv")
    bad = write_jsonl(tmp_path / "bad.jsonl", [openr1_row("p", [RIGHT], ["yes"], [True])])
    with pytest.raises(data.InputError, match=r"bad.jsonl:1: correctness.llama_verification\[0\] = 'yes'"):
        data.build_from_raw(bad, tmp_path / "y")


# --------------------------------------------------------------------------- templates against the real chat template


def test_qwen_renders_as_the_qwen25_math_chat_template(hf_tok):
    hf, tok = hf_tok
    chats = [[{"role": "user", "content": "What is 1+1?"}],  # the template inserts its default system turn
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],  # unchanged
             [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
              {"role": "user", "content": "And 3+3?"}]]
    for chat in chats:
        reference = hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        assert data.TEMPLATES["qwen"].prompt_text(chat) == reference
        assert data.encode_prompt(tok, "qwen", chat) == hf(reference, add_special_tokens=False)["input_ids"]
    assert data.TEMPLATES["qwen"].prompt_text(chats[0]).startswith(
        "<|im_start|>system\n" + data.SYSTEM_PROMPT + "<|im_end|>\n<|im_start|>user\n")


def test_redi_evaluation_prompt_token_for_token(hf_tok):
    hf, tok = hf_tok
    problem = "Find $x$ if $2x + 3 = 11$."
    expected = ("<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}."
                "<|im_end|>\n<|im_start|>user\nSolve the following math problem efficiently and clearly.  The last "
                "line of your response should be of the following format: 'Therefore, the final answer is: "
                "$\\boxed{ANSWER}$. I hope it is correct' (without quotes) where ANSWER is just the final number "
                "or expression that solves the problem. Think step by step before answering.\n\n"
                "Find $x$ if $2x + 3 = 11$.<|im_end|>\n<|im_start|>assistant<think>\n")
    template = data.TEMPLATES["redi"]
    messages = data.problem_messages(problem, "redi")
    assert template.prompt_text(messages) == expected
    ids = data.encode_prompt(tok, "redi", messages)
    assert ids == hf(expected, add_special_tokens=False)["input_ids"]
    assert ids[-len(enc(tok, "assistant<think>\n")) - 1:] == [IM_START] + enc(tok, "assistant<think>\n")
    # The authors' "force thinking" template (their README) is Qwen2.5-Math's with this generation prompt.
    hf.chat_template = QWEN25_MATH_CHAT_TEMPLATE.replace("'<|im_start|>assistant\\n'",
                                                         "'<|im_start|>assistant<think>\\n'")
    try:
        assert hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == expected
    finally:
        hf.chat_template = QWEN25_MATH_CHAT_TEMPLATE
    assert template.stop_tokens == ["<|im_end|>", "<|endoftext|>"]
    # A completion after the forced "<think>\n" does not repeat it; one that does has it removed once.
    assert data.encode_response(tok, "redi", "<think>\nx = 4\n</think> \\boxed{4}") == \
        data.encode_response(tok, "redi", "x = 4\n</think> \\boxed{4}")


def test_stop_ids_and_generation_eos(tok):
    assert data.TEMPLATES["qwen"].stop_ids(tok) == [IM_END, ENDOFTEXT]
    assert data.TEMPLATES["r1"].stop_ids(tok) == [EOS]
    assert data.generation_eos(tok, "qwen") == {"eos_token_id": [IM_END, ENDOFTEXT], "config_eos_token_id": IM_END,
                                                 "eos_token": "<|im_end|>"}
    assert data.generation_eos(tok, "r1")["config_eos_token_id"] == EOS


# --------------------------------------------------------------------------- TRL formats (issue 13)


def trl_rendering(hf, prompt, completion):
    """What TRL's apply_chat_template (trl/data_utils.py) makes of a conversational prompt and completion: the
    prompt with the generation prompt, and the completion as the rest of the rendered whole conversation."""
    prompt_text = hf.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    whole = hf.apply_chat_template(prompt + completion, tokenize=False)
    assert whole.startswith(prompt_text)
    return (hf(prompt_text, add_special_tokens=False)["input_ids"],
            hf(whole[len(prompt_text):], add_special_tokens=False)["input_ids"])


def same_as_trl(example, hf, prompt, completion):
    """Our ids = TRL's prompt ids + TRL's completion ids up to and including the end of turn: the "\\n" that
    the template writes after <|im_end|> is never trained (generation stops at <|im_end|>)."""
    prompt_ids, completion_ids = trl_rendering(hf, prompt, completion)
    assert completion_ids[-2:] == [IM_END, hf.convert_tokens_to_ids("Ċ")]
    assert example.input_ids == prompt_ids + completion_ids[:-1]
    assert example.loss_mask == [0] * len(prompt_ids) + [1] * (len(completion_ids) - 1)


def test_trl_formats_load_to_trl_token_ids(hf_tok, tmp_path):
    hf, tok = hf_tok
    user = [{"role": "user", "content": "What is 12 + 35?"}]
    right, wrong = [{"role": "assistant", "content": "So \\boxed{47}."}], [{"role": "assistant", "content": "48"}]
    system = [{"role": "system", "content": "Be brief."}]
    sft = write_jsonl(tmp_path / "sft.jsonl", [
        {"prompt": user, "completion": right},                 # conversational prompt-completion
        {"prompt": system + user, "completion": right},        # its own system turn, kept
        {"prompt": "What is 12 + 35?", "completion": "So \\boxed{47}."},  # standard: a user turn + the reply
        {"messages": user + right}])
    assert data.detect_format(sft) == "sft"
    examples, _ = data.tokenize_sft(data.load_sft(sft), tok, "qwen", None)
    same_as_trl(examples[0], hf, user, right)
    same_as_trl(examples[1], hf, system + user, right)
    assert examples[2] == examples[0] == examples[3]

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": user, "chosen": right, "rejected": wrong},  # explicit prompt
        {"chosen": user + right, "rejected": user + wrong}])  # implicit: the shared turns are the prompt
    assert data.detect_format(pairs) == "pairs"
    rows = data.load_pairs(pairs)
    assert rows[1]["prompt"] == user and (rows[1]["chosen"], rows[1]["rejected"]) == ("So \\boxed{47}.", "48")
    tokenized, _ = data.tokenize_pairs(rows, tok, "qwen", None)
    for chosen, rejected in tokenized:
        same_as_trl(chosen, hf, user, right)
        same_as_trl(rejected, hf, user, wrong)


def test_unsupported_trl_formats_name_the_conversion(tmp_path):
    unpaired = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "q", "completion": "a", "label": True}])
    with pytest.raises(data.InputError, match=f"{unpaired}:1: TRL's unpaired preference rows .* convert them: "
                                              ".*\"rewards\""):
        data.detect_format(unpaired)
    implicit_strings = write_jsonl(tmp_path / "p.jsonl", [{"chosen": "q a", "rejected": "q b"}])
    with pytest.raises(data.InputError, match=f"{implicit_strings}:1: a preference row without 'prompt' needs"):
        data.load_pairs(implicit_strings)
    no_shared = write_jsonl(tmp_path / "n.jsonl", [{"chosen": [{"role": "user", "content": "q"},
                                                               {"role": "assistant", "content": "a"}],
                                                    "rejected": [{"role": "user", "content": "other"},
                                                                 {"role": "assistant", "content": "b"}]}])
    with pytest.raises(data.InputError, match="share no first turn"):
        data.load_pairs(no_shared)


# --------------------------------------------------------------------------- hostile input (issue 16)

BIG_ROW_CHILD = """
import json, resource, sys
sys.path.insert(0, sys.argv[1])
import data
tok = data.load_tokenizer(sys.argv[2])
examples, report = data.tokenize_sft(data.load_sft(sys.argv[3]), tok, "qwen", 256)
built = data.build_from_raw(sys.argv[4], sys.argv[5], tokenizer=tok)
print(json.dumps({"peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "sft": report,
                  "build": built}))
"""


def test_a_60_mb_line_is_dropped_by_its_length_with_bounded_memory(tmp_path):
    model_dir = tmp_path / "model"
    tiny.make_tokenizer(str(model_dir))
    huge = "Let me check the sum once more. " * (60_000_000 // 32)  # 60 MB of ordinary text
    sft = write_jsonl(tmp_path / "sft.jsonl", [GOOD_SFT, {"messages": [{"role": "user", "content": "q"},
                                                                      {"role": "assistant", "content": huge}]}])
    raw = write_jsonl(tmp_path / "raw.jsonl", [{"problem": "What is 2 + 2?", "answer": "4",
                                                "generations": [huge, WRONG], "correctness": [True, False]}])
    assert sft.stat().st_size > 60_000_000
    result = subprocess.run([sys.executable, "-c", BIG_ROW_CHILD, str(REPO), str(model_dir), str(sft), str(raw),
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout)
    assert (measured["sft"]["kept"], measured["sft"]["dropped_too_long"]) == (1, 1)
    assert (measured["build"]["pairs_before_length_filter"], measured["build"]["pairs_removed_by_length"]) == (1, 1)
    print(f"peak RSS {measured['peak_rss_kb'] / 1024:.0f} MiB")
    assert measured["peak_rss_kb"] < 1024 * 1024, measured["peak_rss_kb"]  # under 1 GiB (~15x the line, not 370x)


def test_length_bound_never_drops_what_fits(tok):
    bound = data.LengthBound(tok)
    for text in ["a", "So \\boxed{47}." * 50, "数学" * 100, "\u0065\u0301" * 200, " " * 999]:
        n = len(tok.encode(text, add_special_tokens=False).ids)
        assert not bound.surely_over([text], n)  # a text that fits exactly is never judged over
    assert bound.surely_over(["x" * (10 * bound.bytes_per_token + 1)], 10)
    assert not bound.surely_over(["x" * (10 * bound.bytes_per_token)], 10) and not bound.surely_over(["x"], None)


@pytest.mark.parametrize("loader, bad_line, message", [
    (data.load_pairs, {"prompt": "q", "chosen": 5, "rejected": "b"},
     r"'chosen' is int 5; expected a string or a message list"),
    (data.load_groups, {"prompt": "q", "completions": ["a", "b"], "rewards": [1e200, 0.0]},
     r"rewards\[0\] = 1e\+200 is beyond float32's range"),
    (data.load_sft, b"\xff\xfe not utf-8", "not UTF-8"),
    (data.load_sft, "[" * 100_000 + "]" * 100_000, "nested too deeply"),
])
def test_hostile_rows_name_file_and_line(tmp_path, loader, bad_line, message):
    path = tmp_path / "rows.jsonl"
    good = json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "completions": ["a", "b"],
                       "rewards": [1, 0], "messages": GOOD_SFT["messages"]}).encode()
    bad = bad_line if isinstance(bad_line, bytes) else (
        bad_line if isinstance(bad_line, str) else json.dumps(bad_line)).encode()
    path.write_bytes(good + b"\n" + bad + b"\n")
    with pytest.raises(data.InputError, match=f"{path}:2: .*{message}"):
        loader(path)


def test_a_one_completion_group_says_why(tok, tmp_path):
    path = write_jsonl(tmp_path / "groups.jsonl", [{"prompt": "q", "completions": ["a"], "rewards": [1.0]}])
    with pytest.raises(data.InputError, match=f"{path}:1: a group needs at least 2 completions .* this row has 1"):
        data.tokenize_groups(data.load_groups(path), tok, "qwen", None)


def test_cli_rejects_bad_flags_before_any_work(tmp_path, capsys):
    raw = write_jsonl(tmp_path / "raw.jsonl", raw_rows("x"))
    for flag, value in (("--ngram", "0"), ("--workers", "-3"), ("--max-response-tokens", "0")):
        with pytest.raises(SystemExit) as exit_:
            data.main(["build", "--raw", str(raw), "--out", str(tmp_path / "out"), flag, value])
        assert exit_.value.code == 2
        assert f"argument {flag}: {value} is not a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(data.InputError, match="--ngram 0"):
        data.Decontaminator([], n=0)
    with pytest.raises(SystemExit):
        data.main(["build", "--help"])
    shown = capsys.readouterr().out
    assert shown.count("(default: ['cn_k12'])") == 1 and shown.count("(default: 19000)") == 1
    assert "(default: None)" not in shown and "(default: False)" not in shown


def test_cli_owns_its_output_directory(tmp_path, capsys):
    import common

    raw = write_jsonl(tmp_path / "raw.jsonl", raw_rows("x"))
    out = tmp_path / "out"
    build = ["build", "--raw", str(raw), "--out", str(out)]
    with common.OutputLock(str(out), "another build"):
        with pytest.raises(data.InputError, match="is in use by another build \\(pid"):
            data.main(build)
    assert data.main(build) == 0
    first = (out / "sft.jsonl").read_bytes()
    write_jsonl(raw, raw_rows("x")[:2])
    with pytest.raises(data.InputError, match="holds a finished build \\(report.json\\)"):
        data.main(build)
    assert (out / "sft.jsonl").read_bytes() == first  # untouched
    assert data.main(build + ["--overwrite"]) == 0
    assert len((out / "sft.jsonl").read_text().splitlines()) == 2


# --------------------------------------------------------------------------- build at scale (issue 13)


def test_build_output_is_the_same_bytes_with_1_and_2_workers(hf_tok, tmp_path):
    _, tok = hf_tok
    rows = []
    for k in range(12):  # 168 rows: several 32-row chunks, so the two workers interleave
        for row in openr1_fixture():
            rows.append({**row, "problem": row["problem"] and f"{row['problem']} (copy {k})"})
    raw = write_jsonl(tmp_path / "raw.jsonl", rows)
    lines = []
    reports = [data.build_from_raw(raw, tmp_path / f"w{w}", tokenizer=tok, max_prompt_tokens=120,
                                   max_response_tokens=200, workers=w, log=lines.append) for w in (1, 2)]
    assert reports[0] == reports[1] and reports[0]["pairs_rows"] == 24 and reports[0]["sft_rows"] == 84
    for name in ("sft.jsonl", "pairs.jsonl", "groups.jsonl", "report.json"):
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()
    final = [line for line in lines if "168 rows (100.0% of" in line]  # each build's last progress line
    assert len(final) == 2 and all("generations/s" in line and "ETA 0:00:00" in line for line in final)


def test_a_bad_row_stops_a_parallel_build_with_its_line_and_leaves_nothing(tmp_path):
    rows = [json.dumps(r) for r in raw_rows("x")] * 20
    rows[100] = json.dumps({"problem": "p", "answer": "1", "generations": ["g", 5]})
    raw = write_jsonl(tmp_path / "raw.jsonl", rows)
    with pytest.raises(data.InputError, match=f"{raw}:101: generations\\[1\\] is an empty response or not a string"):
        data.build_from_raw(raw, tmp_path / "out", workers=2)
    assert list((tmp_path / "out").iterdir()) == []
