"""The token cache (data.py section 7, train.py section 2): tokenise once, map everywhere.

What each test proves:
  - The ids, loss masks, positions, document ids and group weights that reach the model from the cache are
    exactly today's per-row path (data.encode_example, one `encode` per text) on hostile text, for every
    template and the three formats, with over-long examples dropped and counted as tokenize_* counts them.
  - A second start maps the same directory (numpy memmaps, no rebuild); any change of the data, the
    tokenizer, the template, the length limit or the format gives a new directory and leaves the old one.
  - A damaged directory (truncated ids, a bad header, tables that disagree, a missing file) is refused with
    its name and what to do; a builder that loses a race discards its own copy; an unwritable location
    names --token-cache; a bad row leaves no directory behind.
  - A second start holds no token in Python memory: its traced allocations stay far below the ids' size.
"""

import json
import os
import shutil
import subprocess
import sys
import tracemalloc
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import losses  # noqa: E402
import train  # noqa: E402
from common import Dist, InputError  # noqa: E402
from scripts import tiny  # noqa: E402

ONE = Dist(0, 1, 0, torch.device("cpu"))

# Text a tokenizer or a template could get wrong: another template's special tokens (matched as added
# tokens), the response's own end-of-turn at its end (stripped once), <think> openings (removed once by the
# templates whose prompt opens it), combining characters, emoji with joiners, NUL, lines of only spaces and
# tabs, \r\n and lone \r, Unicode line separators, empty-looking lines, leading and trailing blanks.
HOSTILE = [
    "e\u0301 = \u00e9? caf\u00e9 vs cafe\u0301; \U0001F469\u200d\U0001F469\u200d\U0001F467 \U0001F9EE\ufe0f",
    "line one\r\nline two\r\n\r\n \t \n\t\t\n   \nend\r",
    "  leading and trailing blanks  \n\n\n",
    "\u2028sep\u2029para\u00a0nbsp\u200bzwsp\x00nul\x7f",
    "<think>\nLet me think.</think> So \\boxed{3}.",
    "<think>no newline after think</think>\\boxed{4}",
    "math: $\\frac{1}{2}$ \\(x^2\\) \\boxed{\\sqrt{2}} 1,234.5e-3 \u221e \u2211",
]
FOREIGN = {"qwen": "<\uff5cUser\uff5c> and <\uff5cend\u2581of\u2581sentence\uff5c> are plain text here",
           "redi": "<\uff5cAssistant\uff5c><think>\n",
           "r1": "<|im_start|>user\n<|endoftext|> are plain text here<|im_end|>"}


def hostile_rows(template: str) -> dict:
    """sft, pairs and groups rows (as JSON objects) whose every text is hostile; responses of several lengths."""
    end = data.get_template(template).end_of_turn
    prompt_texts = HOSTILE + [FOREIGN[template]]
    texts = prompt_texts + ["So the answer is 2." + end, "x " * 40 + FOREIGN[template] * 3]  # responses
    system = {"role": "system", "content": texts[2]}
    prompts = [[{"role": "user", "content": t}] for t in prompt_texts + ["\u200b", "\u3000?\u3000"]]
    prompts[1] = [system] + prompts[1]
    prompts[2] = [system, {"role": "user", "content": texts[3]}, {"role": "assistant", "content": texts[4]},
                  {"role": "user", "content": texts[0]}]
    n = len(texts)
    return {
        "sft": [{"messages": p + [{"role": "assistant", "content": texts[(i + 3) % n]}]}
                for i, p in enumerate(prompts)],
        "pairs": [{"prompt": p, "chosen": texts[(i + 1) % n], "rejected": texts[(i + 5) % n]}
                  for i, p in enumerate(prompts)],
        "groups": [{"prompt": p, "completions": [texts[(i + k) % n] for k in range(2 + i % 3)],
                    "rewards": [float((i * k) % 3) / 2 for k in range(2 + i % 3)]} for i, p in enumerate(prompts)],
    }


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    tiny.make_tokenizer(str(path), texts=tiny.DEFAULT_CORPUS + HOSTILE, vocab_size=600)
    return path


def write_rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def build(tok_dir, data_path, fmt, template="qwen", max_length=None, root=None):
    tokenizer = data.load_tokenizer(str(tok_dir))
    path, key, built = data.ensure_token_cache(root or data_path + ".tokens", data_path, tokenizer,
                                               os.path.join(tok_dir, "tokenizer.json"), fmt, template, max_length)
    return data.open_token_cache(path, key), built


def todays_items(tok_dir, data_path, fmt, template, max_length):
    """The items as before the cache: one data.encode_example per (row, response), each text encoded alone,
    and the same dropping rules, written out here without tokenize_*."""
    tokenizer, items = data.load_tokenizer(str(tok_dir)), []
    for row in data.LOADERS[fmt](data_path):
        def encode(response):
            example = data.encode_example(tokenizer, template, row["prompt"], response)
            return example if max_length is None or len(example.input_ids) <= max_length else None
        if fmt == "sft" and (example := encode(row["response"])):
            items.append(example)
        elif fmt == "pairs" and all(pair := (encode(row["chosen"]), encode(row["rejected"]))):
            items.append(pair)
        elif fmt == "groups":
            kept = [(e, r) for c, r in zip(row["completions"], row["rewards"]) if (e := encode(c))]
            if len(kept) >= 2:
                items.append(([e for e, _ in kept], [r for _, r in kept]))
    return items


STAGES = {"sft": "sft", "pairs": "redi", "groups": "weighted"}


@pytest.mark.parametrize("template", ["qwen", "redi", "r1"])
@pytest.mark.parametrize("fmt", ["sft", "pairs", "groups"])
@pytest.mark.parametrize("limit", [None, "median"])
def test_packed_batches_from_the_cache_are_todays(tok_dir, tmp_path, fmt, template, limit):
    data_path = write_rows(tmp_path / f"{fmt}.jsonl", hostile_rows(template)[fmt])
    max_length = None
    if limit:  # a limit that drops some sequences (and, for groups, some groups whole)
        lengths = sorted(len(e.input_ids) for item in todays_items(tok_dir, data_path, fmt, template, None)
                         for e in data._item_sequences(fmt, item)[0])
        max_length = lengths[len(lengths) // 2]
    expected = todays_items(tok_dir, data_path, fmt, template, max_length)
    cache, built = build(tok_dir, data_path, fmt, template, max_length)
    assert built and isinstance(cache.tokens, np.memmap) and cache.tokens.dtype == np.uint32
    assert len(cache) == len(expected) > 0
    assert [cache.item(fmt, i) for i in range(len(cache))] == expected
    # tokenize_* (one encode_batch per call) counts what the cache reports, and drops something when limited.
    tokenized, report = data.TOKENIZE[fmt](data.LOADERS[fmt](data_path), data.load_tokenizer(str(tok_dir)),
                                           template, max_length)
    assert tokenized == expected and cache.report == report
    assert (report["kept"] < report["rows"] or report.get("dropped_completions_too_long")) if limit else True

    # Batches as train.py packs them (several micro-batch shapes) equal data.pack* of today's items.
    dataset = train.Dataset(STAGES[fmt], cache, {})
    pack = {"sft": data.pack, "pairs": data.pack_pairs, "groups": data.pack_groups}[fmt]
    for indices in ([0], list(range(len(expected))), list(range(len(expected)))[::-2]):
        got = train.pack_items(dataset, indices, torch.device("cpu"))
        want = pack([expected[i] for i in indices])
        for key in ("input_ids", "position_ids", "document_ids", "targets", "chosen_index", "rejected_index"):
            if key in want:
                assert torch.equal(got[key], want[key]), key
        assert got["num_loss_tokens"] == want["num_loss_tokens"]
        assert got["num_sequences"] == want["num_sequences"] == sum(len(dataset.doc_lengths[i]) for i in indices)
        if fmt == "sft":
            assert dataset.normalizer(indices) == want["num_loss_tokens"]
        if fmt == "groups":
            weights = torch.cat([losses.group_advantages(torch.tensor(expected[i][1]), len(expected[i][1]))
                                 for i in indices])
            assert torch.equal(got["weights"], weights)


def test_a_second_start_maps_and_any_changed_input_builds_a_new_directory(tok_dir, tmp_path):
    rows = hostile_rows("qwen")["sft"]
    data_path = write_rows(tmp_path / "sft.jsonl", rows)
    first, built = build(tok_dir, data_path, "sft")
    assert built
    files = {p.name: p.stat().st_mtime_ns for p in Path(first.path).iterdir()}
    again, built = build(tok_dir, data_path, "sft")
    assert not built and again.path == first.path and isinstance(again.offsets, np.memmap)
    assert {p.name: p.stat().st_mtime_ns for p in Path(first.path).iterdir()} == files
    other_tok = tmp_path / "other_tok"
    tiny.make_tokenizer(str(other_tok), vocab_size=500)
    changed = [build(tok_dir, data_path, "sft", max_length=200)[0], build(tok_dir, data_path, "sft", "redi")[0],
               build(other_tok, data_path, "sft")[0],
               build(tok_dir, data_path, "sft", root=str(tmp_path / "elsewhere"))[0]]
    write_rows(tmp_path / "sft.jsonl", rows[1:])  # the same path, other content
    changed.append(build(tok_dir, data_path, "sft")[0])
    assert len(changed[-1]) == len(rows) - 1
    paths = [first.path] + [c.path for c in changed]
    assert len({os.path.basename(p) for p in paths[:4] + paths[5:]}) == 5  # one key per input set
    assert os.path.basename(paths[4]) == os.path.basename(first.path) and paths[4] != first.path
    assert {p.name: p.stat().st_mtime_ns for p in Path(first.path).iterdir()} == files  # never touched
    assert not [p for p in Path(data_path + ".tokens").iterdir() if p.name.startswith(".tmp")]


def damage(path: Path, how: str):
    if how == "truncated ids":
        (path / "tokens.bin").write_bytes((path / "tokens.bin").read_bytes()[:-8])
    elif how == "odd byte count":
        (path / "tokens.bin").write_bytes((path / "tokens.bin").read_bytes()[:-1])
    elif how == "bad header":
        (path / "offsets.npy").write_bytes(b"garbage" + (path / "offsets.npy").read_bytes()[7:])
    elif how == "truncated table":
        (path / "prompt_lengths.npy").write_bytes((path / "prompt_lengths.npy").read_bytes()[:-16])
    elif how == "tables disagree":
        np.save(path / "offsets.npy", np.load(path / "offsets.npy")[:-1])
    elif how == "prompt past its sequence":
        lengths = np.load(path / "prompt_lengths.npy")
        np.save(path / "prompt_lengths.npy", lengths + 10_000)
    elif how == "missing meta":
        (path / "meta.json").unlink()
    elif how == "meta of other inputs":
        meta = json.loads((path / "meta.json").read_text())
        meta["key"]["max_length"] = 7
        (path / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("how", ["truncated ids", "odd byte count", "bad header", "truncated table",
                                 "tables disagree", "prompt past its sequence", "missing meta",
                                 "meta of other inputs"])
def test_a_damaged_cache_is_refused_by_name(tok_dir, tmp_path, how):
    data_path = write_rows(tmp_path / "pairs.jsonl", hostile_rows("qwen")["pairs"])
    cache, _ = build(tok_dir, data_path, "pairs")
    damage(Path(cache.path), how)
    with pytest.raises(InputError, match=f"token cache {cache.path} is damaged .*delete that directory"):
        build(tok_dir, data_path, "pairs")


def test_train_refuses_a_damaged_cache_with_exit_2(tok_dir, tmp_path):
    model = tiny.make_checkpoint(str(tmp_path / "ckpt"))
    data_path = write_rows(tmp_path / "sft.jsonl", hostile_rows("qwen")["sft"])
    args = ["--stage", "sft", "--model", model, "--data", data_path, "--batch-size", 2, "--max-steps", 1]
    train.main([str(a) for a in args + ["--out", tmp_path / "a"]])
    (key_dir,) = Path(data_path + ".tokens").iterdir()
    damage(key_dir, "truncated ids")
    result = subprocess.run([sys.executable, "train.py", *map(str, args), "--out", tmp_path / "b"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"token cache {key_dir} is damaged (tokens.bin holds" in result.stderr


def test_a_builder_that_loses_the_race_keeps_the_winners_directory(tok_dir, tmp_path):
    data_path = write_rows(tmp_path / "sft.jsonl", hostile_rows("qwen")["sft"])
    cache, _ = build(tok_dir, data_path, "sft")
    before = {p.name: p.read_bytes() for p in Path(cache.path).iterdir()}
    key = json.loads((Path(cache.path) / "meta.json").read_text())["key"]
    # A second builder that started before the first had renamed its directory into place finishes now.
    data.build_token_cache(cache.path, data_path, "sft", data.load_tokenizer(str(tok_dir)), "qwen", None, key)
    assert {p.name: p.read_bytes() for p in Path(cache.path).iterdir()} == before
    assert sorted(p.name for p in Path(data_path + ".tokens").iterdir()) == [os.path.basename(cache.path)]


def test_concurrent_builders_leave_one_whole_directory(tok_dir, tmp_path):
    data_path = write_rows(tmp_path / "groups.jsonl", hostile_rows("qwen")["groups"] * 20)
    script = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import data\n"
              f"t = data.load_tokenizer({str(tok_dir)!r})\n"
              f"print(data.ensure_token_cache({data_path + '.tokens'!r}, {data_path!r}, t, "
              f"{str(tok_dir / 'tokenizer.json')!r}, 'groups', 'qwen', None)[0])")
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    paths = {p.communicate()[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs) and len(paths) == 1
    assert sorted(os.listdir(data_path + ".tokens")) == [os.path.basename(paths.pop())]
    cache, built = build(tok_dir, data_path, "groups")
    assert not built and [cache.item("groups", i) for i in range(len(cache))] == todays_items(
        tok_dir, data_path, "groups", "qwen", None)


def test_an_unwritable_location_names_the_flag_and_a_bad_row_leaves_nothing(tok_dir, tmp_path):
    data_path = write_rows(tmp_path / "sft.jsonl", hostile_rows("qwen")["sft"])
    (tmp_path / "a_file").write_text("")
    with pytest.raises(InputError, match="cannot write the token cache .* pass --token-cache DIR"):
        build(tok_dir, data_path, "sft", root=str(tmp_path / "a_file" / "cache"))
    bad = hostile_rows("qwen")["sft"]
    bad[3]["messages"][-1]["content"] = "forged <|im_start|>user\nturn"
    bad_path = write_rows(tmp_path / "bad.jsonl", bad)
    with pytest.raises(InputError, match=r"bad.jsonl:4: the response contains the special token '<\|im_start\|>'"):
        build(tok_dir, bad_path, "sft")
    assert os.listdir(bad_path + ".tokens") == []


def second_start_peak(tok_dir, tmp_path, num_rows: int) -> tuple[int, train.Dataset]:
    """Peak of Python's traced allocations (numpy's included) while train.load_dataset maps a built cache."""
    rows = [{"messages": [{"role": "user", "content": f"Problem {i}: " + "add the carries " * 10},
                          {"role": "assistant", "content": "12 + 35 = 47, carry the 1. " * (150 + i % 50)}]}
            for i in range(num_rows)]
    data_path = write_rows(tmp_path / f"sft-{num_rows}.jsonl", rows)
    args = Namespace(stage="sft", model=str(tok_dir), data=data_path, template="qwen", max_length=None,
                     token_cache=None)
    tokenizer = data.load_tokenizer(str(tok_dir))
    train.load_dataset(args, tokenizer, ONE)  # builds
    tracemalloc.start()
    dataset = train.load_dataset(args, tokenizer, ONE)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, dataset


def test_a_second_start_holds_no_token_in_memory(tok_dir, tmp_path):
    """Twice the rows (and tokens) add to a second start's peak memory only the per-item table (a few
    numbers per item), not the ids: 4 bytes per token as an array, ~36 as the Python lists they were.
    (Hashing the data file for the key reads 64 kB blocks, the same for both files.)"""
    small, _ = second_start_peak(tok_dir, tmp_path, 40)
    large, dataset = second_start_peak(tok_dir, tmp_path, 80)
    extra_tokens = len(dataset.cache.tokens) // 2
    assert isinstance(dataset.cache.tokens, np.memmap) and extra_tokens > 100_000
    assert large - small < 40 * 64 + 16_384, (small, large, extra_tokens)  # vs 4 * extra_tokens = 400+ kB
    assert dataset.normalizer(list(range(len(dataset)))) == dataset.cache.report["loss_tokens"]


def test_a_loss_mask_that_is_not_one_edge_stops_the_build(tok_dir, tmp_path, monkeypatch):
    """The cache stores one prompt length per sequence; a template whose mask had two edges would be stored
    wrongly, so the build checks every mask and stops (every template today gives one edge: the tests above)."""
    data_path = write_rows(tmp_path / "sft.jsonl", hostile_rows("qwen")["sft"])
    two_edges = data.Example([5, 6, 7, 8], [0, 1, 0, 1])
    monkeypatch.setitem(data.TOKENIZE, "sft", lambda rows, *args, **kwargs: ([two_edges], {"rows": len(rows)}))
    with pytest.raises(ValueError, match="not one prompt/response edge"):
        build(tok_dir, data_path, "sft")
    assert os.listdir(data_path + ".tokens") == []


def test_a_killed_builders_temporary_is_removed_by_the_next_build_but_never_a_live_ones(tok_dir, tmp_path, capsys):
    """A build killed outright leaves its temporary directory beside the cache: the next build on this host
    removes those of builders that are gone, and leaves a live one's (a racing job) and other hosts'."""
    data_path = write_rows(tmp_path / "sft.jsonl", hostile_rows("qwen")["sft"])
    root = Path(data_path + ".tokens")
    root.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, live = int(gone.stdout), os.getpid()
    leftovers = {name: root / f"{data._builder_prefix(pid)}-{name}" for name, pid in (("dead", dead), ("live", live))}
    other_host = root / f".tmp-some-other-host-{dead}-x"
    for d in [*leftovers.values(), other_host]:
        (d / "tokens.bin").parent.mkdir()
        (d / "tokens.bin").write_bytes(b"\0" * 64)
    _, built = build(tok_dir, data_path, "sft")
    assert built
    assert not leftovers["dead"].exists() and leftovers["live"].exists() and other_host.exists()
    assert f"removed {leftovers['dead']}, left by an interrupted token-cache build" in capsys.readouterr().err
