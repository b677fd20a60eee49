"""Data: from raw teacher traces to packed training batches.

The path of a token, top to bottom of this file:

1. Templates. A chat is rendered to text by a small Python object per model family (no Jinja):
   `qwen` (ChatML, Qwen2.5-Math) and `r1` (DeepSeek-R1-Distill).
2. Tokenisation. The prompt text and the response text are encoded *separately* and concatenated, and
   the end-of-turn token is appended exactly once. The loss mask is 1 on the response tokens and the
   end-of-turn token, 0 on the prompt. An example is `Example(input_ids, loss_mask)`.
3. Reading and validation. JSONL rows in the TRL conventions (SFT `messages`, preference `prompt` /
   `chosen` / `rejected`, group `prompt` / `completions` / `rewards`); every bad line stops with
   `file:line: what is wrong`.
4. Building from raw traces (the REDI recipe). Rows like Open-R1's `OpenR1-Math-Raw` (`problem`, `answer`,
   `generations`, optional `correctness`) become `sft.jsonl` (first correct trace per problem),
   `pairs.jsonl` (first correct + first incorrect trace, for problems that have both) and `groups.jsonl`
   (all traces with 1.0 / 0.0 rewards), after length filters and 8-gram decontamination, with counts.
5. Packing. Variable-length examples are concatenated into one padding-free row with per-token
   `position_ids` (restarting at 0) and `document_ids`; `targets` are pre-shifted so that no token ever
   predicts across a document edge. Nothing is ever padded, so no pad token can be confused with the
   end-of-turn token (the pad = EOS bug, where masking padding also masks the learned EOS, cannot occur).
6. Order and sharding. Pure functions of (num_examples, seed, epoch, step): the whole state of the data
   pipeline is (epoch, step), so resuming is recomputing the same lists and skipping ahead.
7. CLI: `python data.py build --raw FILE --out DIR [...]`.
"""

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np
import torch

IGNORE_INDEX = -100

# ---------------------------------------------------------------------------------------------------
# 1. Templates
# ---------------------------------------------------------------------------------------------------

# Qwen2.5-Math's default system prompt; DeepSeek recommends the same sentence inside the user turn.
SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
R1_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class QwenTemplate:
    """ChatML: every turn is `<|im_start|>{role}\\n{content}<|im_end|>\\n`; the prompt ends with the
    opening of the assistant turn, and the response is closed by `<|im_end|>` (the loss includes it)."""

    name: str = "qwen"
    end_of_turn: str = "<|im_end|>"
    # Strings the tokenizer must know as single added tokens for the rendering to mean anything.
    special_tokens: tuple = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    # A message containing one of these would forge a turn boundary.
    forbidden_in_content: tuple = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")

    @property
    def stop_tokens(self) -> list[str]:
        """What ends generation: the end of turn, or the end-of-document token."""
        return ["<|im_end|>", "<|endoftext|>"]

    def prompt_text(self, messages: list[dict]) -> str:
        turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return turns + "<|im_start|>assistant\n"

    def response_body(self, content: str) -> str:
        return content


@dataclass(frozen=True)
class R1Template:
    """DeepSeek-R1-Distill: `<｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜><think>\\n`.
    The prompt already opens the reasoning with `<think>\\n`, so a response that starts with `<think>`
    (Open-R1 generations do) has that prefix removed once: it is never doubled. Earlier assistant turns
    keep only their text after `</think>`, as DeepSeek's own template does."""

    name: str = "r1"
    end_of_turn: str = "<｜end▁of▁sentence｜>"
    special_tokens: tuple = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>",
                             "<｜Assistant｜>", "<think>")
    forbidden_in_content: tuple = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>",
                                   "<｜Assistant｜>")

    @property
    def stop_tokens(self) -> list[str]:
        return ["<｜end▁of▁sentence｜>"]

    def prompt_text(self, messages: list[dict]) -> str:
        text = "<｜begin▁of▁sentence｜>"
        for m in messages:
            if m["role"] == "system":
                text += m["content"]
            elif m["role"] == "user":
                text += "<｜User｜>" + m["content"]
            else:  # an earlier assistant turn of a multi-turn chat
                text += "<｜Assistant｜>" + m["content"].split("</think>")[-1] + self.end_of_turn
        return text + "<｜Assistant｜><think>\n"

    def response_body(self, content: str) -> str:
        if content.startswith("<think>\n"):
            return content[len("<think>\n"):]
        if content.startswith("<think>"):
            return content[len("<think>"):]
        return content


TEMPLATES = {"qwen": QwenTemplate(), "r1": R1Template()}


def get_template(template) -> QwenTemplate | R1Template:
    """Accept a template object or its name."""
    if isinstance(template, str):
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}; choose one of {sorted(TEMPLATES)}")
        return TEMPLATES[template]
    return template


def problem_messages(problem: str, template) -> list[dict]:
    """The default messages for a math problem: Qwen2.5-Math puts the instruction in the system prompt;
    DeepSeek-R1 recommends no system prompt and the instruction at the end of the user turn."""
    name = get_template(template).name
    if name == "qwen":
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": problem}]
    return [{"role": "user", "content": problem + "\n" + R1_INSTRUCTION}]


# ---------------------------------------------------------------------------------------------------
# 2. Tokenisation
# ---------------------------------------------------------------------------------------------------


class Example(NamedTuple):
    """One tokenised conversation. loss_mask[t] = 1 exactly on the response tokens and the end-of-turn."""

    input_ids: list[int]
    loss_mask: list[int]


def load_tokenizer(model_dir):
    """Read `model_dir/tokenizer.json` (the `tokenizers` library; no transformers needed)."""
    from tokenizers import Tokenizer

    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: --tokenizer / the model directory must hold the "
                                "checkpoint's tokenizer.json")
    return Tokenizer.from_file(path)


def special_token_id(tokenizer, token: str) -> int:
    """The id of a special token, checked to be what the tokenizer makes of that string in text (an added
    token matched whole); otherwise the rendered template would silently become ordinary bytes."""
    token_id = tokenizer.token_to_id(token)
    if token_id is None or tokenizer.encode(token, add_special_tokens=False).ids != [token_id]:
        raise ValueError(f"the tokenizer has no special token {token!r}; the chat template does not "
                         "match this checkpoint (use --template qwen for Qwen2.5, r1 for R1-Distill)")
    return token_id


def check_template_tokens(tokenizer, template) -> dict[str, int]:
    """Look up every special token a template writes; a clear error if the tokenizer lacks one."""
    return {token: special_token_id(tokenizer, token) for token in get_template(template).special_tokens}


def _check_content(template, text: str, what: str) -> None:
    for marker in template.forbidden_in_content:
        if marker in text:
            raise ValueError(f"{what} contains the special token {marker!r}, which would forge a turn "
                             "boundary; remove it from the data")


def encode_prompt(tokenizer, template, messages: list[dict]) -> list[int]:
    """ids of template.prompt_text(messages), the full prompt including the assistant opening. Special
    tokens written in the text are matched by the tokenizer as added tokens."""
    template = get_template(template)
    check_template_tokens(tokenizer, template)
    for m in messages:
        _check_content(template, m["content"], f"a {m['role']} message")
    return tokenizer.encode(template.prompt_text(messages), add_special_tokens=False).ids


def encode_response(tokenizer, template, content: str) -> list[int]:
    """ids(response body) + [end_of_turn]. A trailing end-of-turn already in the data is stripped first,
    so the token appears exactly once (the double `<|im_end|>` bug cannot happen); one anywhere else in
    the response is an error."""
    template = get_template(template)
    body = template.response_body(content)
    if body.endswith(template.end_of_turn):
        body = body[: -len(template.end_of_turn)]
    _check_content(template, body, "the response")
    if not body.strip():
        raise ValueError("the response is empty")
    end_id = special_token_id(tokenizer, template.end_of_turn)
    return tokenizer.encode(body, add_special_tokens=False).ids + [end_id]


def encode_example(tokenizer, template, prompt: list[dict], response: str) -> Example:
    """Prompt and response are encoded separately and concatenated (the TRL practice): the prompt ids are
    then exactly those the model sees when it generates from that prompt, and the loss mask's edge is
    exactly the prompt/response edge, which a joint encoding could blur by merging across it."""
    prompt_ids = encode_prompt(tokenizer, template, prompt)
    response_ids = encode_response(tokenizer, template, response)
    return Example(prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids))


def _with_source(source: str, fn, *args):
    """Run fn(*args); an error names the row's file:line."""
    try:
        return fn(*args)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def _encode_row(row: dict, tokenizer, template, response: str) -> Example:
    return _with_source(row["source"], encode_example, tokenizer, template, row["prompt"], response)


def tokenize_sft(rows, tokenizer, template, max_length: int | None):
    """SFT rows -> (examples, report). An example longer than max_length tokens (prompt + response +
    end-of-turn) is dropped and counted, never truncated: a truncated trace would teach the model to stop
    mid-reasoning, or lose the final answer."""
    examples, too_long = [], 0
    for row in rows:
        example = _encode_row(row, tokenizer, template, row["response"])
        if max_length is not None and len(example.input_ids) > max_length:
            too_long += 1
            continue
        examples.append(example)
    report = {"rows": len(rows), "kept": len(examples), "dropped_too_long": too_long,
              "max_length": max_length, "tokens": sum(len(e.input_ids) for e in examples),
              "loss_tokens": sum(sum(e.loss_mask) for e in examples)}
    return examples, report


def tokenize_pairs(rows, tokenizer, template, max_length: int | None):
    """Preference rows -> (list of (chosen_example, rejected_example), report). A pair is dropped whole
    when either side is too long: half a pair carries no preference."""
    pairs, too_long = [], 0
    for row in rows:
        chosen = _encode_row(row, tokenizer, template, row["chosen"])
        rejected = _encode_row(row, tokenizer, template, row["rejected"])
        if max_length is not None and max(len(chosen.input_ids), len(rejected.input_ids)) > max_length:
            too_long += 1
            continue
        pairs.append((chosen, rejected))
    report = {"rows": len(rows), "kept": len(pairs), "dropped_too_long": too_long,
              "max_length": max_length}
    return pairs, report


def tokenize_groups(rows, tokenizer, template, max_length: int | None, min_group_size: int = 2):
    """Group rows -> (list of (examples, rewards), report). Over-long completions are dropped (counted)
    and the group keeps the rest; a group left with fewer than min_group_size completions is dropped
    (counted), since a group-relative advantage r - mean(r) of a single completion is always 0."""
    groups, too_long, too_small = [], 0, 0
    for row in rows:
        examples, rewards = [], []
        for completion, reward in zip(row["completions"], row["rewards"]):
            example = _encode_row(row, tokenizer, template, completion)
            if max_length is not None and len(example.input_ids) > max_length:
                too_long += 1
                continue
            examples.append(example)
            rewards.append(float(reward))
        if len(examples) < min_group_size:
            too_small += 1
            continue
        groups.append((examples, rewards))
    report = {"rows": len(rows), "kept": len(groups), "dropped_completions_too_long": too_long,
              "dropped_groups_too_small": too_small, "max_length": max_length}
    return groups, report


# ---------------------------------------------------------------------------------------------------
# 3. Reading and validation
# ---------------------------------------------------------------------------------------------------

FORMATS = {
    "sft": '{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}',
    "pairs": '{"prompt": [messages] or str, "chosen": [assistant message] or str, "rejected": ...}',
    "groups": '{"prompt": [messages] or str, "completions": [str, ...], "rewards": [float, ...]}',
}


def read_jsonl(path) -> Iterator[tuple[int, dict]]:
    """Yield (line_no, object) for each non-blank line (line numbers count from 1)."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
            yield line_no, obj


def _require(obj: dict, key: str, where: str):
    if key not in obj:
        raise ValueError(f"{where}: missing field {key!r} (has {sorted(obj)})")
    return obj[key]


def _messages(value, where: str, field: str) -> list[dict]:
    """Validate a list of {"role", "content"} messages; a plain string is one user message."""
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: {field!r} must be a non-empty list of messages or a string")
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{where}: {field}[{i}] must be an object with 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"{where}: {field}[{i}] has role {m['role']!r}; "
                             "expected 'system', 'user' or 'assistant'")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise ValueError(f"{where}: {field}[{i}] ({m['role']}) has empty or non-string content")
        messages.append({"role": m["role"], "content": m["content"]})
    return messages


def _check_role_order(messages: list[dict], last: str, where: str, field: str) -> None:
    """An optional system message first, then user/assistant alternating from user, ending with `last`."""
    roles = [m["role"] for m in messages]
    turns = roles[1:] if roles[0] == "system" else roles
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))]
    if not turns or turns != expected or turns[-1] != last:
        raise ValueError(f"{where}: {field} has role order {roles}; expected an optional 'system' first, "
                         f"then 'user' and 'assistant' alternating, starting with 'user' and ending "
                         f"with {last!r}")


def _response(value, where: str, field: str) -> str:
    """A completion: a plain string, or a list holding one assistant message (TRL's conversational form)."""
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant":
            raise ValueError(f"{where}: {field!r} must be a string or a list of exactly one assistant "
                             "message (the prompt goes in 'prompt', not in the completion)")
        value = value[0].get("content")
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: {field!r} is an empty response")
    return value


def _load(path, parse_row) -> list[dict]:
    rows = [parse_row(obj, f"{path}:{line_no}") for line_no, obj in read_jsonl(path)]
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def load_sft(path) -> list[dict]:
    """SFT rows -> [{"prompt": messages, "response": str, "source": "file:line"}]. In a multi-turn row
    only the final assistant message is trained; the earlier turns are the prompt."""

    def parse(obj, where):
        messages = _messages(_require(obj, "messages", where), where, "messages")
        _check_role_order(messages, "assistant", where, "messages")
        return {"prompt": messages[:-1], "response": messages[-1]["content"], "source": where}

    return _load(path, parse)


def _prompt(obj: dict, where: str) -> list[dict]:
    prompt = _messages(_require(obj, "prompt", where), where, "prompt")
    _check_role_order(prompt, "user", where, "prompt")
    return prompt


def load_pairs(path) -> list[dict]:
    """Preference rows -> [{"prompt", "chosen": str, "rejected": str, "source"}]."""

    def parse(obj, where):
        prompt = _prompt(obj, where)
        chosen = _response(_require(obj, "chosen", where), where, "chosen")
        rejected = _response(_require(obj, "rejected", where), where, "rejected")
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "source": where}

    return _load(path, parse)


def load_groups(path) -> list[dict]:
    """Group rows -> [{"prompt", "completions": [str], "rewards": [float], "source"}]."""

    def parse(obj, where):
        prompt = _prompt(obj, where)
        completions = _require(obj, "completions", where)
        rewards = _require(obj, "rewards", where)
        if not isinstance(completions, list) or not completions:
            raise ValueError(f"{where}: 'completions' must be a non-empty list")
        if not isinstance(rewards, list) or len(rewards) != len(completions):
            raise ValueError(f"{where}: 'rewards' must be a list as long as 'completions' "
                             f"({len(completions)})")
        for i, r in enumerate(rewards):
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
                raise ValueError(f"{where}: rewards[{i}] = {r!r} is not a finite number")
        completions = [_response(c, where, f"completions[{i}]") for i, c in enumerate(completions)]
        return {"prompt": prompt, "completions": completions, "rewards": [float(r) for r in rewards],
                "source": where}

    return _load(path, parse)


LOADERS = {"sft": load_sft, "pairs": load_pairs, "groups": load_groups}


def detect_format(path) -> str:
    """'sft', 'pairs' or 'groups', from the keys of the first row."""
    for line_no, obj in read_jsonl(path):
        if "messages" in obj:
            return "sft"
        if "chosen" in obj and "rejected" in obj:
            return "pairs"
        if "completions" in obj and "rewards" in obj:
            return "groups"
        raise ValueError(f"{path}:{line_no}: unknown row format with keys {sorted(obj)}; expected one of "
                         + "; ".join(f"{k}: {v}" for k, v in FORMATS.items()))
    raise ValueError(f"{path}: no rows")


def load_rows(path, expected_format: str) -> list[dict]:
    """Load a file that must hold `expected_format` rows; say so plainly if it holds another format."""
    found = detect_format(path)
    if found != expected_format:
        raise ValueError(f"{path} looks like {found} rows but {expected_format} rows are needed: "
                         f"{FORMATS[expected_format]}")
    return LOADERS[expected_format](path)


# ---------------------------------------------------------------------------------------------------
# 4. Building from raw traces (REDI)
# ---------------------------------------------------------------------------------------------------


def normalize_for_overlap(text: str) -> list[str]:
    """Lowercase, every run of non-alphanumerics becomes a space, split into words."""
    return re.sub(r"[^0-9a-z]+", " ", text.lower()).split()


def ngrams(words: list[str], n: int) -> set[tuple]:
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


class Decontaminator:
    """A problem is contaminated if it shares any word n-gram with a benchmark problem, or, when either
    side is shorter than n words (no n-grams), if the normalised texts are equal."""

    def __init__(self, paths, n: int = 8):
        self.n, self.grams, self.texts = n, set(), set()
        for path in paths:
            for line_no, obj in read_jsonl(path):
                problem = obj.get("problem")
                if not isinstance(problem, str):
                    raise ValueError(f"{path}:{line_no}: a benchmark row needs a string 'problem' field")
                words = normalize_for_overlap(problem)
                self.grams |= ngrams(words, n)
                self.texts.add(" ".join(words))

    def __call__(self, problem: str) -> bool:
        words = normalize_for_overlap(problem)
        return " ".join(words) in self.texts or not self.grams.isdisjoint(ngrams(words, self.n))


def _parse_raw_row(obj: dict, where: str) -> tuple[str, str, list[str], list]:
    """Validate one raw row -> (problem, answer, generations, labels) where labels[i] is True / False,
    or None when the generation has no correctness label (the verifier grades it)."""
    problem, answer = _require(obj, "problem", where), _require(obj, "answer", where)
    generations = _require(obj, "generations", where)
    if not isinstance(problem, str) or not problem.strip():
        raise ValueError(f"{where}: 'problem' must be a non-empty string")
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError(f"{where}: 'answer' must be a non-empty string (the gold final answer)")
    if not isinstance(generations, list) or not generations:
        raise ValueError(f"{where}: 'generations' must be a non-empty list of strings")
    for i, g in enumerate(generations):
        if not isinstance(g, str) or not g.strip():
            raise ValueError(f"{where}: generations[{i}] is an empty response")
    labels = obj.get("correctness")
    if labels is None:
        labels = [None] * len(generations)
    if not isinstance(labels, list) or len(labels) != len(generations):
        raise ValueError(f"{where}: 'correctness' must be a list as long as 'generations' "
                         f"({len(generations)})")
    for i, label in enumerate(labels):
        if label is not None and not isinstance(label, bool):
            raise ValueError(f"{where}: correctness[{i}] = {label!r}; expected true, false or null")
    return problem, answer, generations, labels


def write_atomic(path, text: str) -> None:
    """Write through a temporary file and rename: a crash leaves the old file or the new one, never half."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


class _AtomicJsonlWriters:
    """One JSONL writer per name, streaming to `name.jsonl.tmp` (traces are large: nothing is held in
    memory) and renamed to `name.jsonl` only when the whole build succeeded."""

    def __init__(self, out_dir, names):
        os.makedirs(out_dir, exist_ok=True)
        self.paths = {name: os.path.join(out_dir, f"{name}.jsonl") for name in names}
        self.files = {name: open(f"{path}.tmp", "w", encoding="utf-8") for name, path in self.paths.items()}
        self.counts = dict.fromkeys(names, 0)

    def write(self, name, row: dict) -> None:
        self.files[name].write(json.dumps(row, ensure_ascii=False) + "\n")
        self.counts[name] += 1

    def __enter__(self):
        return self

    def __exit__(self, error_type, error, traceback):
        for name, f in self.files.items():
            f.close()
            if error_type is None:
                os.replace(f"{self.paths[name]}.tmp", self.paths[name])
            else:  # a failed build leaves no half-written output behind
                os.remove(f"{self.paths[name]}.tmp")
        return False


def build_from_raw(raw_path, out_dir, tokenizer=None, template="qwen", max_prompt_tokens=800,
                   max_response_tokens=19000, decontaminate=(), ngram=8) -> dict:
    """Raw traces -> out_dir/{sft,pairs,groups}.jsonl + report.json; returns the report.

    Per problem, in order: drop if it overlaps a benchmark; drop if its prompt (problem_messages rendered
    with the template) has more than max_prompt_tokens tokens. Per generation: drop if its response ids
    (as trained: body + end-of-turn) number more than max_response_tokens. The kept generations are then
    labelled (given `correctness`, else verify.grade against `answer`) and
      sft    <- the first correct one,
      pairs  <- the first correct and the first incorrect one, if both exist,
      groups <- all of them with rewards 1.0 / 0.0, if at least 2 remain.
    Without a tokenizer the length filters are skipped and the report says so."""
    template = get_template(template)
    is_contaminated = Decontaminator(decontaminate, ngram) if decontaminate else None
    report = {"problems": 0, "generations": 0, "dropped_contaminated": 0, "dropped_prompt_too_long": 0,
              "dropped_response_too_long": 0, "kept_generations": 0, "correct": 0, "incorrect": 0,
              "labelled_by_verifier": 0, "problems_without_correct": 0, "groups_too_small": 0}
    with _AtomicJsonlWriters(out_dir, ("sft", "pairs", "groups")) as out:
        for line_no, obj in read_jsonl(raw_path):
            where = f"{raw_path}:{line_no}"
            problem, answer, generations, labels = _parse_raw_row(obj, where)
            report["problems"] += 1
            report["generations"] += len(generations)
            if is_contaminated is not None and is_contaminated(problem):
                report["dropped_contaminated"] += 1
                continue
            prompt = problem_messages(problem, template)
            kept = list(zip(generations, labels))
            if tokenizer is not None:
                if len(_with_source(where, encode_prompt, tokenizer, template, prompt)) > max_prompt_tokens:
                    report["dropped_prompt_too_long"] += 1
                    continue
                kept = [(g, label) for g, label in kept if len(_with_source(
                    where, encode_response, tokenizer, template, g)) <= max_response_tokens]
                report["dropped_response_too_long"] += len(generations) - len(kept)
            traces = []
            for generation, label in kept:
                if label is None:
                    import verify  # only needed when the data carries no labels

                    label = bool(verify.grade(generation, answer))
                    report["labelled_by_verifier"] += 1
                traces.append((generation, label))
            correct = [g for g, ok in traces if ok]
            incorrect = [g for g, ok in traces if not ok]
            report["kept_generations"] += len(traces)
            report["correct"] += len(correct)
            report["incorrect"] += len(incorrect)
            if correct:
                out.write("sft", {"messages": prompt + [{"role": "assistant", "content": correct[0]}]})
            else:
                report["problems_without_correct"] += 1
            if correct and incorrect:
                out.write("pairs", {"prompt": prompt,
                                    "chosen": [{"role": "assistant", "content": correct[0]}],
                                    "rejected": [{"role": "assistant", "content": incorrect[0]}]})
            if len(traces) >= 2:
                out.write("groups", {"prompt": prompt, "completions": [g for g, _ in traces],
                                     "rewards": [1.0 if ok else 0.0 for _, ok in traces]})
            elif traces:
                report["groups_too_small"] += 1
        if report["problems"] == 0:
            raise ValueError(f"{raw_path}: no rows")
    report.update(sft_rows=out.counts["sft"], pairs_rows=out.counts["pairs"],
                  groups_rows=out.counts["groups"])
    report["settings"] = {
        "raw": str(raw_path), "template": template.name, "ngram": ngram,
        "decontaminate": [str(p) for p in decontaminate],
        "length_filter": (f"applied: prompt <= {max_prompt_tokens}, response <= {max_response_tokens} tokens"
                          if tokenizer is not None else "skipped: no tokenizer given"),
    }
    write_atomic(os.path.join(out_dir, "report.json"), json.dumps(report, indent=2) + "\n")
    return report


# ---------------------------------------------------------------------------------------------------
# 5. Packing
# ---------------------------------------------------------------------------------------------------


def _row(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long).unsqueeze(0)


def pack(examples: list[Example]) -> dict:
    """Concatenate examples into one padding-free row [1, T]:
        position_ids[t] = t - start(s),   document_ids[t] = s   for token t of example s,
        targets[t] = input_ids[t+1] if t+1 is in the same example and loss_mask[t+1] == 1 else -100.
    num_loss_tokens = #(targets != -100)."""
    if not examples:
        raise ValueError("pack() needs at least one example")
    input_ids, position_ids, document_ids, targets = [], [], [], []
    for s, (ids, mask) in enumerate(examples):
        if len(ids) != len(mask) or not ids:
            raise ValueError(f"example {s}: input_ids and loss_mask must be non-empty and equally long")
        input_ids += ids
        position_ids += range(len(ids))
        document_ids += [s] * len(ids)
        targets += [ids[t + 1] if mask[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)]
        targets.append(IGNORE_INDEX)  # the last token of a document predicts nothing
    return {"input_ids": _row(input_ids), "position_ids": _row(position_ids),
            "document_ids": _row(document_ids), "targets": _row(targets),
            "num_sequences": len(examples),
            "num_loss_tokens": sum(t != IGNORE_INDEX for t in targets)}


def pack_pairs(pairs: list[tuple[Example, Example]]) -> dict:
    """Pack [chosen_0, rejected_0, chosen_1, rejected_1, ...] into one row, so both sides of every pair go
    through the model in the same forward; chosen_index / rejected_index are their document ids."""
    batch = pack([example for pair in pairs for example in pair])
    batch["chosen_index"] = torch.arange(0, 2 * len(pairs), 2)
    batch["rejected_index"] = torch.arange(1, 2 * len(pairs), 2)
    return batch


def pack_groups(groups: list[tuple[list[Example], list[float]]]) -> dict:
    """Pack every completion of every group into one row; rewards [S] follow document order and
    group_sizes [G] says how many consecutive documents form each group."""
    batch = pack([example for examples, _ in groups for example in examples])
    batch["rewards"] = torch.tensor([r for _, rewards in groups for r in rewards], dtype=torch.float32)
    batch["group_sizes"] = torch.tensor([len(examples) for examples, _ in groups], dtype=torch.long)
    return batch


def pack_by_budget(indices: list[int], lengths, max_tokens: int) -> list[list[int]]:
    """Greedy, in the given order: start a new bin when the next example would push the bin past
    max_tokens. Every bin's total length is <= max_tokens; an example longer than max_tokens is an
    error (length filtering should have dropped it, and it must not be truncated here)."""
    bins, current, used = [], [], 0
    for i in indices:
        if lengths[i] > max_tokens:
            raise ValueError(f"example {i} has {lengths[i]} tokens > the budget of {max_tokens}; drop "
                             "over-long examples with max_length first")
        if current and used + lengths[i] > max_tokens:
            bins.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    if current:
        bins.append(current)
    return bins


# ---------------------------------------------------------------------------------------------------
# 6. Order and sharding
# ---------------------------------------------------------------------------------------------------


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """A permutation of range(num_examples), a pure function of (seed, epoch). The generator is seeded
    with the pair (seed, epoch), so (seed=1, epoch=0) and (seed=0, epoch=1) do not coincide."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples).tolist()


def global_batches(num_examples: int, global_batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's order cut into batches of global_batch_size; the last may be short (kept, so no
    example is ever dropped silently)."""
    order = epoch_order(num_examples, seed, epoch)
    return [order[i:i + global_batch_size] for i in range(0, num_examples, global_batch_size)]


def shard(batch_indices: list[int], rank: int, world_size: int) -> list[int]:
    """This rank's part of a global batch: batch_indices[rank::world_size]. The parts are disjoint and
    cover the batch; with a short last batch a rank may get an empty list."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    return batch_indices[rank::world_size]


def micro_batches(indices: list[int], micro_batch_size: int) -> list[list[int]]:
    """Consecutive chunks of at most micro_batch_size indices (for gradient accumulation)."""
    return [indices[i:i + micro_batch_size] for i in range(0, len(indices), micro_batch_size)]


def iterate_batches(num_examples: int, global_batch_size: int, seed: int, num_epochs: int,
                    start_step: int = 0) -> Iterator[tuple[int, int, list[int]]]:
    """Yield (step, epoch, batch_indices) for steps start_step, start_step+1, ... over num_epochs epochs.
    Steps count across epochs; resuming from step k recomputes the same batches and skips the first k."""
    steps_per_epoch = math.ceil(num_examples / global_batch_size)
    batches, batches_epoch = None, None
    for step in range(start_step, steps_per_epoch * num_epochs):
        epoch, index = divmod(step, steps_per_epoch)
        if epoch != batches_epoch:
            batches, batches_epoch = global_batches(num_examples, global_batch_size, seed, epoch), epoch
        yield step, epoch, batches[index]


# ---------------------------------------------------------------------------------------------------
# 7. CLI
# ---------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="raw teacher traces -> sft / pairs / groups JSONL")
    build.add_argument("--raw", required=True, help="JSONL with problem, answer, generations[, correctness]")
    build.add_argument("--out", required=True, help="output directory")
    build.add_argument("--tokenizer", help="model directory holding tokenizer.json (enables length filters)")
    build.add_argument("--template", default="qwen", choices=sorted(TEMPLATES))
    build.add_argument("--max-prompt-tokens", type=int, default=800)
    build.add_argument("--max-response-tokens", type=int, default=19000)
    build.add_argument("--decontaminate", nargs="*", default=[], metavar="BENCHMARK_JSONL",
                       help="drop problems sharing a word n-gram with these files' 'problem' fields")
    build.add_argument("--ngram", type=int, default=8)
    args = parser.parse_args(argv)
    try:
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
        report = build_from_raw(args.raw, args.out, tokenizer=tokenizer, template=args.template,
                                max_prompt_tokens=args.max_prompt_tokens,
                                max_response_tokens=args.max_response_tokens,
                                decontaminate=args.decontaminate, ngram=args.ngram)
    except (OSError, ValueError) as e:  # bad input: the message says where and what, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
