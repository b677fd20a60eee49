"""Data: from raw teacher traces to packed training batches.

The path of a token, top to bottom of this file:

1. Templates. A chat is rendered to text by a small Python object per model family (no Jinja), equal to the
   model's own chat template: `qwen` (Qwen2.5-Math's ChatML, default system prompt included), `redi` (the
   same with the authors' evaluation generation prompt, which opens `<think>`) and `r1` (DeepSeek-R1-Distill).
   Each knows its stop tokens, so training, saving and decoding agree on where an answer ends.
2. Tokenisation. The prompt text and the response text are encoded *separately* and concatenated, and
   the end-of-turn token is appended exactly once. The loss mask is 1 on the response tokens and the
   end-of-turn token, 0 on the prompt. An example is `Example(input_ids, loss_mask)`. Rows that are too long
   by their byte count alone are dropped before they are encoded, so memory follows what is kept.
3. Reading and validation. JSONL rows in the TRL conventions: SFT `messages` or `prompt` / `completion`,
   preference `prompt` / `chosen` / `rejected` (or only `chosen` / `rejected`, whose shared turns are the
   prompt), group `prompt` / `completions` / `rewards`, evaluation problems `problem` / `answer`; every bad line
   stops with `FILE:LINE: what is wrong`.
4. Building from raw traces (the REDI recipe, as the authors' scripts select it). OpenR1-Math-Raw rows become
   `sft.jsonl` (first correct trace per problem), `pairs.jsonl` (first correct + first incorrect trace, then
   length-filtered) and `groups.jsonl` (all traces with 1.0 / 0.0 rewards), with every filter counted.
5. Packing. Variable-length examples are concatenated into one padding-free row with per-token
   `position_ids` (restarting at 0) and `document_ids`; `targets` are pre-shifted so that no token ever
   predicts across a document edge. Nothing is ever padded, so no pad token can be confused with the
   end-of-turn token (the pad = EOS bug, where masking padding also masks the learned EOS, cannot occur).
6. Order and sharding. Pure functions of (num_examples, seed, epoch, step): the whole state of the data
   pipeline is (epoch, step), so resuming is recomputing the same lists and skipping ahead.
7. Token cache. The tokenised set is written once, keyed by everything it depends on, as one flat uint32
   array of ids plus small per-sequence tables, and memory-mapped by every rank of every later run.
8. CLI: `python data.py build --raw FILE --out DIR [...]`.
"""

import argparse
import collections
import concurrent.futures
import hashlib
import json
import math
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np
import torch

import common
from common import InputError

IGNORE_INDEX = -100

# ---------------------------------------------------------------------------------------------------
# 1. Templates
# ---------------------------------------------------------------------------------------------------

# Qwen2.5-Math's default system prompt (its chat template inserts it when a chat has no system turn);
# DeepSeek recommends the same sentence at the end of the user turn for R1.
SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."

# Open-R1's math query template, which the REDI authors evaluate with (huggingface/open-r1
# src/open_r1/evaluate.py:34-38 at c2c53e5; the authors' copy: Tim-Siu/reinforcement-distillation
# rllm/scripts/data/deepscaler_dataset.py:19-23). `.format(Question=...)` there turns {{ANSWER}} into {ANSWER};
# this is the text before the problem after that formatting (the two spaces after "clearly." are theirs).
OPEN_R1_MATH_QUERY = (
    "Solve the following math problem efficiently and clearly.  The last line of your response should be of "
    "the following format: 'Therefore, the final answer is: $\\boxed{ANSWER}$. I hope it is correct' (without "
    "quotes) where ANSWER is just the final number or expression that solves the problem. Think step by step "
    "before answering.\n\n")


@dataclass(frozen=True)
class Template:
    """What every template shares. `special_tokens` are the markers the rendering writes: the tokenizer must
    know each as one added token, and message content must not contain one (it would forge a turn edge).
    prompt_text(messages) = chat_text(messages) + generation_prompt, where chat_text is what the model's
    Jinja template gives with add_generation_prompt=False."""

    name: str
    end_of_turn: str
    special_tokens: tuple
    stops: tuple  # what ends generation besides end_of_turn
    generation_prompt: str

    def chat_text(self, messages: list[dict]) -> str:
        raise NotImplementedError

    def prompt_text(self, messages: list[dict]) -> str:
        return self.chat_text(messages) + self.generation_prompt

    @property
    def stop_tokens(self) -> list[str]:
        """What ends generation: the end of turn first, then the others."""
        return list(dict.fromkeys((self.end_of_turn, *self.stops)))

    def stop_ids(self, tokenizer) -> list[int]:
        """The ids of stop_tokens, end of turn first; each checked to be one added token."""
        return [special_token_id(tokenizer, token) for token in self.stop_tokens]

    def response_body(self, content: str) -> str:
        """A prompt that already opens the reasoning with `<think>\\n` takes a response without that opening:
        one that starts with `<think>` (Open-R1 generations do) has it removed once, never doubled."""
        if self.generation_prompt.endswith("<think>\n"):
            for opening in ("<think>\n", "<think>"):
                if content.startswith(opening):
                    return content[len(opening):]
        return content


@dataclass(frozen=True)
class QwenTemplate(Template):
    """ChatML as Qwen2.5-Math's chat template writes it: every turn is `<|im_start|>{role}\\n{content}
    <|im_end|>\\n`, a chat without a system turn first gets the default one (SYSTEM_PROMPT), and the prompt
    ends with the opening of the assistant turn; the response is closed by `<|im_end|>` (the loss includes it)."""

    name: str = "qwen"
    end_of_turn: str = "<|im_end|>"
    special_tokens: tuple = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    stops: tuple = ("<|endoftext|>",)
    generation_prompt: str = "<|im_start|>assistant\n"

    def chat_text(self, messages: list[dict]) -> str:
        if not messages or messages[0]["role"] != "system":
            messages = [{"role": "system", "content": SYSTEM_PROMPT}] + list(messages)
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


@dataclass(frozen=True)
class R1Template(Template):
    """DeepSeek-R1-Distill: `<｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜><think>\\n`.
    Earlier assistant turns keep only their text after `</think>`, as DeepSeek's own template does."""

    name: str = "r1"
    end_of_turn: str = "<｜end▁of▁sentence｜>"
    special_tokens: tuple = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>",
                             "<｜Assistant｜>")
    stops: tuple = ()
    generation_prompt: str = "<｜Assistant｜><think>\n"

    def chat_text(self, messages: list[dict]) -> str:
        text = "<｜begin▁of▁sentence｜>"
        for m in messages:
            if m["role"] == "system":
                text += m["content"]
            elif m["role"] == "user":
                text += "<｜User｜>" + m["content"]
            else:
                text += "<｜Assistant｜>" + m["content"].split("</think>")[-1] + self.end_of_turn
        return text


TEMPLATES = {
    "qwen": QwenTemplate(),
    # The REDI authors' evaluation template: Qwen2.5-Math's, with the generation prompt changed to open the
    # reasoning, `<|im_start|>assistant<think>\n` with no newline after "assistant" (their README.md:142-147,
    # "force thinking", and experiments_trl/qualitative_analysis/chat_template/qwen_w_ft.jinja:53).
    "redi": QwenTemplate(name="redi", generation_prompt="<|im_start|>assistant<think>\n"),
    "r1": R1Template(),
}


def get_template(template) -> Template:
    """Accept a template object or its name."""
    if isinstance(template, str):
        if template not in TEMPLATES:
            raise InputError(f"unknown template {template!r}; choose one of {sorted(TEMPLATES)}")
        return TEMPLATES[template]
    return template


def problem_messages(problem: str, template) -> list[dict]:
    """The messages for a math problem. qwen: the instruction as the system prompt (Qwen2.5-Math's default);
    redi: the same system prompt, and the user turn is Open-R1's math query followed by the problem (the
    authors' evaluation); r1: no system prompt, the instruction at the end of the user turn (DeepSeek)."""
    name = get_template(template).name
    if name == "r1":
        return [{"role": "user", "content": problem + "\n" + SYSTEM_PROMPT}]
    user = OPEN_R1_MATH_QUERY + problem if name == "redi" else problem
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def generation_eos(tokenizer, template) -> dict:
    """Where a saved checkpoint says an answer ends, all from the template it was trained with:
        generation_config.json eos_token_id <- "eos_token_id" (every stop id, end of turn first),
        config.json eos_token_id            <- "config_eos_token_id" (the end of turn),
        tokenizer_config.json eos_token     <- "eos_token" (the end-of-turn string)."""
    template = get_template(template)
    stop_ids = template.stop_ids(tokenizer)
    return {"eos_token_id": stop_ids, "config_eos_token_id": stop_ids[0], "eos_token": template.end_of_turn}


def generation_config(model_dir, tokenizer, template) -> dict:
    """What a trained checkpoint's generation_config.json says: `model_dir`'s own, with eos_token_id = every
    stop id of the template, end of turn first, so that transformers and vLLM stop where the model was
    trained to end its answer."""
    path, config = os.path.join(model_dir, "generation_config.json"), {}
    if os.path.exists(path):
        config = common.read_json_object(path, "generation_config.json")
        check_generation_config(config, path)
    # "_from_model_config" would let transformers rebuild these settings from config.json's single EOS.
    config = {k: v for k, v in config.items() if k not in ("_from_model_config", "transformers_version")}
    config["eos_token_id"] = generation_eos(tokenizer, template)["eos_token_id"]
    pad = tokenizer.token_to_id("<|endoftext|>")
    config.setdefault("pad_token_id", config["eos_token_id"][0] if pad is None else pad)
    return config


# generation_config.json keys whose values transformers and vLLM check when they load a saved model: a bad one
# copied from --model would make the trained model unloadable, found only after all training.
GENERATION_KEYS = {
    "do_sample": (lambda v: isinstance(v, bool), "true or false"),
    "temperature": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "top_p": (lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    "repetition_penalty": (lambda v: _number(v) and v > 0, "a number > 0"),
    "max_length": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "max_new_tokens": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "bos_token_id": (lambda v: _integer(v) and v >= 0, "a token id (an integer >= 0)"),
    "pad_token_id": (lambda v: _integer(v) and v >= 0, "a token id (an integer >= 0)"),
}


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return (isinstance(v, float) and math.isfinite(v)) or _integer(v)


def check_generation_config(config: dict, path) -> None:
    """The keys of GENERATION_KEYS that a generation_config.json sets (null: unset) must be valid."""
    for key, (ok, what) in GENERATION_KEYS.items():
        if config.get(key) is not None and not ok(config[key]):
            raise InputError(f"{path}: {key} is {json.dumps(config[key])[:40]}; it must be {what}: fix or remove it")


# ---------------------------------------------------------------------------------------------------
# 2. Tokenisation
# ---------------------------------------------------------------------------------------------------


class Example(NamedTuple):
    """One tokenised conversation. loss_mask[t] = 1 exactly on the response tokens and the end-of-turn."""

    input_ids: list[int]
    loss_mask: list[int]


def load_tokenizer(model_dir, check_config: bool = True):
    """Read `model_dir/tokenizer.json` (the `tokenizers` library; no transformers needed). check_config: the
    directory is a checkpoint to run, so its config.json, where there is one, must be a Qwen2 config whose
    embedding holds every token id (model.check_vocab; an IndexError deep in a forward otherwise), and the
    tokenizer files a save copies must be readable (model.check_tokenizer_files): a bad one found before step
    1, not after training. `data.py build --tokenizer` only counts tokens, so it takes any model's tokenizer."""
    from tokenizers import Tokenizer

    from model import Qwen2Config, check_tokenizer_files, check_vocab  # model.py: only for a checkpoint

    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: --tokenizer / the model directory must hold the "
                                "checkpoint's tokenizer.json")
    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception as e:  # the tokenizers library raises a bare Exception for bad JSON or a wrong layout
        raise InputError(f"{path}: not a tokenizer.json the tokenizers library can read ({str(e)[:200]}); use "
                         "the checkpoint's own tokenizer.json") from None
    if check_config and os.path.isfile(config := os.path.join(model_dir, "config.json")):
        check_vocab(Qwen2Config.from_json(config), tokenizer, where=path)
        check_tokenizer_files(model_dir)
    return tokenizer


def special_token_id(tokenizer, token: str) -> int:
    """The id of a special token, checked to be what the tokenizer makes of that string in text (an added
    token matched whole); otherwise the rendered template would silently become ordinary bytes."""
    token_id = tokenizer.token_to_id(token)
    if token_id is None or tokenizer.encode(token, add_special_tokens=False).ids != [token_id]:
        raise InputError(f"the tokenizer has no special token {token!r}; the chat template does not "
                         "match this checkpoint (use --template qwen for Qwen2.5, r1 for R1-Distill)")
    return token_id


def check_template_tokens(tokenizer, template) -> dict[str, int]:
    """Look up every special token a template writes; a clear error if the tokenizer lacks one."""
    return {token: special_token_id(tokenizer, token) for token in get_template(template).special_tokens}


def _check_content(template, text: str, what: str) -> None:
    for marker in template.special_tokens:
        if marker in text:
            raise InputError(f"{what} contains the special token {marker!r}, which would forge a turn "
                             "boundary; remove it from the data")


def checked_prompt_text(tokenizer, template, messages: list[dict]) -> str:
    """template.prompt_text(messages), the full prompt including the assistant opening, after checking that
    the tokenizer knows the template's special tokens and that no message writes one."""
    template = get_template(template)
    check_template_tokens(tokenizer, template)
    for m in messages:
        _check_content(template, m["content"], f"a {m['role']} message")
    return template.prompt_text(messages)


def checked_response_body(template, content: str) -> str:
    """The response text that is encoded before the end-of-turn token: a trailing end-of-turn already in
    the data is stripped first, so the token appears exactly once (the double `<|im_end|>` bug cannot
    happen); one anywhere else in the response is an error."""
    template = get_template(template)
    body = template.response_body(content)
    if body.endswith(template.end_of_turn):
        body = body[: -len(template.end_of_turn)]
    _check_content(template, body, "the response")
    if not body.strip():
        raise InputError("the response is empty")
    return body


def encode_prompt(tokenizer, template, messages: list[dict]) -> list[int]:
    """ids of the checked prompt text. Special tokens written in the text are matched by the tokenizer as
    added tokens."""
    return tokenizer.encode(checked_prompt_text(tokenizer, template, messages), add_special_tokens=False).ids


def encode_response(tokenizer, template, content: str) -> list[int]:
    """ids(checked response body) + [end_of_turn]."""
    body = checked_response_body(template, content)
    end_id = special_token_id(tokenizer, get_template(template).end_of_turn)
    return tokenizer.encode(body, add_special_tokens=False).ids + [end_id]


def encode_example(tokenizer, template, prompt: list[dict], response: str) -> Example:
    """Prompt and response are encoded separately and concatenated (the TRL practice): the prompt ids are
    then exactly those the model sees when it generates from that prompt, and the loss mask's edge is
    exactly the prompt/response edge, which a joint encoding could blur by merging across it. So the loss
    mask of every template is one edge: [0] * len(prompt ids) + [1] * len(response ids + end-of-turn)."""
    prompt_ids = encode_prompt(tokenizer, template, prompt)
    response_ids = encode_response(tokenizer, template, response)
    return Example(prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids))


def encode_examples(tokenizer, template, requests: list[tuple[dict, str]]) -> list[Example]:
    """encode_example for many (row, response) at once: the texts are checked row by row (an error names
    the row's file:line), then encoded in one `encode_batch`, which spreads them over every core and gives
    each text the ids `encode` gives it alone, so the examples are encode_example's."""
    texts = []
    for row, response in requests:
        texts += _with_source(row["source"], lambda: (checked_prompt_text(tokenizer, template, row["prompt"]),
                                                      checked_response_body(template, response)))
    end_id = special_token_id(tokenizer, get_template(template).end_of_turn) if requests else None
    ids = [encoding.ids for encoding in tokenizer.encode_batch(texts, add_special_tokens=False)]
    return [Example(prompt + response + [end_id], [0] * len(prompt) + [1] * (len(response) + 1))
            for prompt, response in zip(ids[0::2], ids[1::2])]


class LengthBound:
    """A lower bound on a text's token count from its UTF-8 byte count, so that a row too long to train on is
    dropped without encoding it (a 60 MB line is never tokenized):
        tokens(text) >= bytes(text) / (3 * L),   L = the longest vocabulary entry in UTF-8 bytes,
    since each token covers at most L bytes of the normalised text and Unicode normalisation shrinks a text
    by at most 3x (NFC composes at most three code points into one of no fewer bytes each)."""

    def __init__(self, tokenizer):
        self.bytes_per_token = 3 * max(len(t.encode("utf-8")) for t in tokenizer.get_vocab(with_added_tokens=True))

    def surely_over(self, texts, max_tokens: int | None) -> bool:
        """True only if the texts together certainly hold more than max_tokens tokens."""
        if max_tokens is None:
            return False
        return sum(len(t.encode("utf-8")) for t in texts) > self.bytes_per_token * max_tokens


def _with_source(source: str, fn, *args):
    """Run fn(*args); an error names the row's file:line."""
    try:
        return fn(*args)
    except InputError as e:
        raise InputError(f"{source}: {e}") from None


def _prompt_texts(row: dict) -> list[str]:
    return [m["content"] for m in row["prompt"]]


def _fits(example: Example, max_length: int | None) -> bool:
    return max_length is None or len(example.input_ids) <= max_length


def tokenize_sft(rows, tokenizer, template, max_length: int | None, bound: LengthBound | None = None):
    """SFT rows -> (examples, report). An example longer than max_length tokens (prompt + response +
    end-of-turn) is dropped and counted, never truncated: a truncated trace would teach the model to stop
    mid-reasoning, or lose the final answer. The rows are encoded in one batch (encode_examples); pass
    `bound` when calling this chunk by chunk."""
    bound = bound or LengthBound(tokenizer)
    fit = [row for row in rows if not bound.surely_over(_prompt_texts(row) + [row["response"]], max_length)]
    encoded = encode_examples(tokenizer, template, [(row, row["response"]) for row in fit])
    examples = [example for example in encoded if _fits(example, max_length)]
    report = {"rows": len(rows), "kept": len(examples), "dropped_too_long": len(rows) - len(examples),
              "max_length": max_length, "tokens": sum(len(e.input_ids) for e in examples),
              "loss_tokens": sum(sum(e.loss_mask) for e in examples)}
    return examples, report


def tokenize_pairs(rows, tokenizer, template, max_length: int | None, bound: LengthBound | None = None):
    """Preference rows -> (list of (chosen_example, rejected_example), report). A pair is dropped whole
    when either side is too long: half a pair carries no preference."""
    bound = bound or LengthBound(tokenizer)
    fit = [row for row in rows if not any(bound.surely_over(_prompt_texts(row) + [row[side]], max_length)
                                          for side in ("chosen", "rejected"))]
    encoded = encode_examples(tokenizer, template, [(row, row[side]) for row in fit for side in ("chosen", "rejected")])
    pairs = [pair for pair in zip(encoded[0::2], encoded[1::2]) if all(_fits(e, max_length) for e in pair)]
    report = {"rows": len(rows), "kept": len(pairs), "dropped_too_long": len(rows) - len(pairs),
              "max_length": max_length, **pair_warnings(pairs)}
    return pairs, report


def pair_warnings(pairs: list[tuple[Example, Example]]) -> dict:
    """Kept pairs that teach no preference: chosen and rejected are the same tokens (DPO's and SimPO's margin
    is then 0 whatever the weights, so their gradient vanishes; REDI's reduces to (1 - α) x SFT)."""
    return {"warning_chosen_equals_rejected": sum(c.input_ids == r.input_ids for c, r in pairs)}


def group_warnings(rewards: list[list[float]]) -> dict:
    """Kept groups whose rewards are all equal: every advantage r - mean(r) is 0, so they train to nothing."""
    return {"warning_groups_equal_rewards": sum(len(set(r)) == 1 for r in rewards)}


def tokenize_groups(rows, tokenizer, template, max_length: int | None, min_group_size: int = 2,
                    bound: LengthBound | None = None):
    """Group rows -> (list of (examples, rewards), report). Over-long completions are dropped (counted)
    and the group keeps the rest; a group left with fewer than min_group_size completions is dropped
    (counted), since a group-relative advantage r - mean(r) of a single completion is always 0. A row that
    has fewer than min_group_size completions to begin with is an error: no setting could make it useful."""
    bound, requests, too_long = bound or LengthBound(tokenizer), [], 0
    for row in rows:
        if len(row["completions"]) < min_group_size:
            raise InputError(f"{row['source']}: a group needs at least {min_group_size} completions of its "
                             f"prompt (the advantage r - mean(r) of a lone completion is always 0), this row "
                             f"has {len(row['completions'])}; add completions or drop the row")
        fit = [(c, r) for c, r in zip(row["completions"], row["rewards"])
               if not bound.surely_over(_prompt_texts(row) + [c], max_length)]
        too_long += len(row["completions"]) - len(fit)
        requests.append((row, fit))
    encoded = iter(encode_examples(tokenizer, template, [(row, c) for row, fit in requests for c, _ in fit]))
    groups, too_small = [], 0
    for row, fit in requests:
        kept = [(example, float(reward)) for (_, reward), example in zip(fit, encoded) if _fits(example, max_length)]
        too_long += len(fit) - len(kept)
        if len(kept) < min_group_size:
            too_small += 1
            continue
        groups.append(([e for e, _ in kept], [r for _, r in kept]))
    report = {"rows": len(rows), "kept": len(groups), "dropped_completions_too_long": too_long,
              "dropped_groups_too_small": too_small, "max_length": max_length,
              **group_warnings([rewards for _, rewards in groups])}
    return groups, report


# ---------------------------------------------------------------------------------------------------
# 3. Reading and validation
# ---------------------------------------------------------------------------------------------------

FORMATS = {
    "sft": '{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]} or TRL\'s '
           '{"prompt": [messages] or str, "completion": [assistant message] or str}',
    "pairs": '{"prompt": [messages] or str, "chosen": [assistant message] or str, "rejected": ...}, or '
             '{"chosen": [messages], "rejected": [messages]} whose shared first turns are the prompt',
    "groups": '{"prompt": [messages] or str, "completions": [str, ...], "rewards": [float, ...]}',
}

# TRL's unpaired preference rows carry one completion each, and nothing here trains on them one by one (that
# is KTO); this says how to make them into rows that a stage here takes.
UNPAIRED_CONVERSION = (
    "TRL's unpaired preference rows (prompt / completion / label) hold one completion each and no stage "
    "here trains on them; convert them: gather the completions of each prompt into one row "
    '{"prompt": ..., "completions": [...], "rewards": [1.0 if label else 0.0, ...]} for the weighted '
    '(AdvDistill) stage, or pair a true with a false completion into {"prompt", "chosen", "rejected"} '
    "(TRL: datasets' map over the rows; the reverse of trl.unpair_preference_dataset)")

FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _require(obj: dict, key: str, where: str):
    if key not in obj:
        raise InputError(f"{where}: missing field {key!r} (has {sorted(obj)})")
    return obj[key]


def _messages(value, where: str, field: str) -> list[dict]:
    """Validate a list of {"role", "content"} messages; a plain string is one user message."""
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise InputError(f"{where}: {field!r} must be a non-empty list of messages or a string")
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InputError(f"{where}: {field}[{i}] must be an object with 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant"):
            raise InputError(f"{where}: {field}[{i}] has role {m['role']!r}; "
                             "expected 'system', 'user' or 'assistant'")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise InputError(f"{where}: {field}[{i}] ({m['role']}) has empty or non-string content")
        messages.append({"role": m["role"], "content": m["content"]})
    return messages


def _check_role_order(messages: list[dict], last: str, where: str, field: str) -> None:
    """An optional system message first, then user/assistant alternating from user, ending with `last`."""
    roles = [m["role"] for m in messages]
    turns = roles[1:] if roles[0] == "system" else roles
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))]
    if not turns or turns != expected or turns[-1] != last:
        raise InputError(f"{where}: {field} has role order {roles}; expected an optional 'system' first, "
                         f"then 'user' and 'assistant' alternating, starting with 'user' and ending "
                         f"with {last!r}")


def _response(value, where: str, field: str) -> str:
    """A completion: a plain string, or a list holding one assistant message (TRL's conversational form)."""
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant":
            raise InputError(f"{where}: {field!r} must be a string or a list of exactly one assistant "
                             "message (the prompt goes in 'prompt', not in the completion)")
        value = value[0].get("content")
    if not isinstance(value, str):
        raise InputError(f"{where}: {field!r} is {type(value).__name__} {value!r:.40}; expected a string or "
                         "a message list [{\"role\": \"assistant\", \"content\": \"...\"}]")
    if not value.strip():
        raise InputError(f"{where}: {field!r} is an empty response")
    return value


def _load(path, parse_row) -> list[dict]:
    rows = [parse_row(obj, f"{path}:{line_no}") for line_no, obj in common.read_jsonl(path)]
    if not rows:
        raise InputError(f"{path}: no rows")
    return rows


def _prompt(obj: dict, where: str) -> list[dict]:
    prompt = _messages(_require(obj, "prompt", where), where, "prompt")
    _check_role_order(prompt, "user", where, "prompt")
    return prompt


def load_sft(path) -> list[dict]:
    """SFT rows -> [{"prompt": messages, "response": str, "source": "file:line"}]. In a multi-turn row
    only the final assistant message is trained; the earlier turns are the prompt. TRL's prompt-completion
    rows (standard strings or conversational lists) give the same thing."""

    def parse(obj, where):
        if "messages" not in obj and "prompt" in obj and "completion" in obj:
            return {"prompt": _prompt(obj, where), "response": _response(obj["completion"], where, "completion"),
                    "source": where}
        messages = _messages(_require(obj, "messages", where), where, "messages")
        _check_role_order(messages, "assistant", where, "messages")
        return {"prompt": messages[:-1], "response": messages[-1]["content"], "source": where}

    return _load(path, parse)


def _implicit_prompt(obj: dict, where: str) -> tuple[list[dict], object, object]:
    """TRL's implicit-prompt preference row: chosen and rejected are whole conversations and their longest
    common prefix of messages is the prompt (trl.extract_prompt); what follows must be one assistant turn."""
    if isinstance(obj["chosen"], str) or isinstance(obj["rejected"], str):
        raise InputError(f"{where}: a preference row without 'prompt' needs 'chosen' and 'rejected' as message "
                         "lists that begin with the shared prompt turns; add a 'prompt' field instead")
    chosen = _messages(obj["chosen"], where, "chosen")
    rejected = _messages(obj["rejected"], where, "rejected")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    prompt = chosen[:shared]
    if not prompt:
        raise InputError(f"{where}: 'chosen' and 'rejected' share no first turn, so there is no prompt; add "
                         "a 'prompt' field or begin both with the same user turn")
    _check_role_order(prompt, "user", where, "the shared prompt of 'chosen' and 'rejected'")
    return prompt, chosen[shared:], rejected[shared:]


def load_pairs(path) -> list[dict]:
    """Preference rows -> [{"prompt", "chosen": str, "rejected": str, "source"}]."""

    def parse(obj, where):
        chosen, rejected = _require(obj, "chosen", where), _require(obj, "rejected", where)
        if "prompt" in obj:
            prompt = _prompt(obj, where)
        else:
            prompt, chosen, rejected = _implicit_prompt(obj, where)
        return {"prompt": prompt, "chosen": _response(chosen, where, "chosen"),
                "rejected": _response(rejected, where, "rejected"), "source": where}

    return _load(path, parse)


def _rewards(obj: dict, n: int, where: str) -> list[float]:
    """Rewards must be finite and within float32's range, and so must their sum: the advantages are computed
    in float32 (losses.group_advantages), where 1e200 is inf and 3e38 + 3e38 too."""
    rewards = _require(obj, "rewards", where)
    if not isinstance(rewards, list) or len(rewards) != n:
        raise InputError(f"{where}: 'rewards' must be a list as long as 'completions' ({n})")
    for i, r in enumerate(rewards):
        if isinstance(r, bool) or not isinstance(r, (int, float)) or (isinstance(r, float) and not math.isfinite(r)):
            raise InputError(f"{where}: rewards[{i}] = {r!r:.40} is not a finite number")
        if abs(r) > FLOAT32_MAX:  # an int past float's range too (math.isfinite would raise OverflowError)
            r = f"{r:.3g}" if isinstance(r, float) else f"an integer of {len(str(abs(r)))} digits"
            raise InputError(f"{where}: rewards[{i}] = {r} is beyond float32's range (|r| <= {FLOAT32_MAX:.3g}), "
                             "where the loss is computed; rescale the rewards")
    if sum(abs(float(r)) for r in rewards) > FLOAT32_MAX:  # each fits, but their float32 mean would overflow
        raise InputError(f"{where}: the rewards' magnitudes sum past float32's range ({FLOAT32_MAX:.3g}), so the "
                         "group's mean, from which the advantages are computed in float32, overflows; rescale them")
    return [float(r) for r in rewards]


def load_groups(path) -> list[dict]:
    """Group rows -> [{"prompt", "completions": [str], "rewards": [float], "source"}]."""

    def parse(obj, where):
        prompt = _prompt(obj, where)
        completions = _require(obj, "completions", where)
        if not isinstance(completions, list) or not completions:
            raise InputError(f"{where}: 'completions' must be a non-empty list")
        rewards = _rewards(obj, len(completions), where)
        completions = [_response(c, where, f"completions[{i}]") for i, c in enumerate(completions)]
        return {"prompt": prompt, "completions": completions, "rewards": rewards, "source": where}

    return _load(path, parse)


LOADERS = {"sft": load_sft, "pairs": load_pairs, "groups": load_groups}


def row_format(obj: dict, where: str) -> str:
    """'sft', 'pairs' or 'groups' from a row's keys (TRL's key sets included); a clear error otherwise."""
    keys = set(obj)
    if "messages" in keys:
        return "sft"
    if {"chosen", "rejected"} <= keys:
        return "pairs"
    if {"completions", "rewards"} <= keys:
        return "groups"
    if {"prompt", "completion", "label"} <= keys:
        raise InputError(f"{where}: {UNPAIRED_CONVERSION}")
    if {"prompt", "completion"} <= keys:
        return "sft"
    raise InputError(f"{where}: unknown row format with keys {sorted(obj)}; expected one of "
                     + "; ".join(f"{k}: {v}" for k, v in FORMATS.items()))


def detect_format(path) -> str:
    """'sft', 'pairs' or 'groups', from the keys of the first row."""
    for line_no, obj in common.read_jsonl(path):
        return row_format(obj, f"{path}:{line_no}")
    raise InputError(f"{path}: no rows")


def load_rows(path, expected_format: str) -> list[dict]:
    """Load a file that must hold `expected_format` rows; say so plainly if it holds another format."""
    found = detect_format(path)
    if found != expected_format:
        raise InputError(f"{path} looks like {found} rows but {expected_format} rows are needed: "
                         f"{FORMATS[expected_format]}")
    return LOADERS[expected_format](path)


@dataclass(frozen=True)
class Problem:
    """An evaluation problem (evaluate.py), one row of MATH-500 / AIME style JSONL."""
    index: int  # row number in the data file (0-based): the problem's key in the random stream
    id: str
    problem: str
    answer: str
    subject: str | None
    level: int | str | None


def read_problems(path) -> list[Problem]:
    """Rows with `problem` and `answer` (optionally id / unique_id, subject, level). The id is the row's `id`,
    else `unique_id`, else its row index. A number as answer is taken as its text (AIME answers elsewhere are
    numbers); anything else wrong stops with file:line."""
    problems, seen = [], {}
    for line_no, row in common.read_jsonl(path):
        where, problem, answer = f"{path}:{line_no}", row.get("problem"), row.get("answer")
        if not isinstance(problem, str) or not problem.strip():
            raise InputError(f"{where}: needs a non-empty string 'problem' (has {sorted(row)})")
        if (isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or not str(answer).strip()
                or (isinstance(answer, float) and not math.isfinite(answer))):
            raise InputError(f"{where}: needs an 'answer' (the gold final answer, a string) (has {sorted(row)})")
        problem_id = str(row.get("id", row.get("unique_id", len(problems))))
        if problem_id in seen:
            raise InputError(f"{where}: id {problem_id!r} already used at {path}:{seen[problem_id]}; ids must "
                             "be unique")
        seen[problem_id] = line_no
        answer = int(answer) if isinstance(answer, float) and answer.is_integer() else answer
        problems.append(Problem(len(problems), problem_id, problem, str(answer), row.get("subject"),
                                row.get("level")))
    if not problems:
        raise InputError(f"{path}: no rows; pass a JSONL file with one problem per line")
    return problems


# ---------------------------------------------------------------------------------------------------
# 4. Building from raw traces (REDI)
# ---------------------------------------------------------------------------------------------------
#
# The authors' selection (Tim-Siu/reinforcement-distillation, experiments_trl/data_preprocess/), row by row:
#   clean_base_shuffled.py      drop rows whose problem_is_valid is not "yes" (stripped, any case) and rows of
#                               source cn_k12; skip rows without problem or generations, and rows whose
#                               correctness lists do not match the generations in length; LandMV label of
#                               trace i = llama_verification[i] and math_verify_reparsed_answer[i];
#                               SFT = the first LandMV-true trace, with no length filter.
#   clean_base_shuffled_dpo.py  pair = (first true, first false) for problems that have both.
#   study_length_distribution.py  then drop a pair if its prompt > 800 or either response > 19,000 tokens,
#                               counted as template_and_tokenize_lengths does (see pair_lengths).
# Their scripts shuffle the rows (seed 42) first; this build keeps the file's order (a trainer shuffles
# anyway), so the same rows come out, in the file's order.

LABEL_MODES = ("auto", "landmv", "verify")


def normalize_for_overlap(text: str) -> list[str]:
    """Lowercase, every run of non-alphanumerics becomes a space, split into words."""
    return re.sub(r"[^0-9a-z]+", " ", text.lower()).split()


def ngrams(words: list[str], n: int) -> set[tuple]:
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


class Decontaminator:
    """A problem is contaminated if it shares any word n-gram with a benchmark problem, or, when either
    side is shorter than n words (no n-grams), if the normalised texts are equal."""

    def __init__(self, paths, n: int = 8):
        if n < 1:
            raise InputError(f"--ngram {n}: an n-gram needs n >= 1 (the REDI default is 8)")
        self.n, self.grams, self.texts = n, set(), set()
        for path in paths:
            for line_no, obj in common.read_jsonl(path):
                problem = obj.get("problem")
                if not isinstance(problem, str):
                    raise InputError(f"{path}:{line_no}: a benchmark row needs a string 'problem' field")
                words = normalize_for_overlap(problem)
                self.grams |= ngrams(words, n)
                self.texts.add(" ".join(words))

    def __call__(self, problem: str) -> bool:
        words = normalize_for_overlap(problem)
        return " ".join(words) in self.texts or not self.grams.isdisjoint(ngrams(words, self.n))


@dataclass(frozen=True)
class BuildSettings:
    template: Template
    labels: str = "auto"
    exclude_sources: frozenset = frozenset({"cn_k12"})
    max_prompt_tokens: int = 800
    max_response_tokens: int = 19000
    tokenizer: object = None  # None: the pair length filter is skipped (and the report says so)
    bound: "LengthBound | None" = None  # the tokenizer's LengthBound, computed once
    decontaminator: Decontaminator | None = None
    remove_contaminated: bool = False


def _passes_row_filters(obj: dict, where: str, s: BuildSettings, counts) -> bool:
    """The authors' row filters, in their order, each counted; a value of the wrong type is an error.
    A row without the problem_is_valid column at all (not an OpenR1-Math-Raw row) is not filtered by it."""
    if "problem_is_valid" in obj:
        valid = obj["problem_is_valid"]
        if not (isinstance(valid, str) and valid.strip().lower() == "yes"):
            counts["filtered_invalid_problem"] += 1
            return False
    source = obj.get("source")
    if isinstance(source, str) and source in s.exclude_sources:
        counts["filtered_source"] += 1
        return False
    problem, generations = _require(obj, "problem", where), _require(obj, "generations", where)
    if not problem:
        counts["skipped_no_problem"] += 1
        return False
    if not generations:
        counts["skipped_no_generations"] += 1
        return False
    if not isinstance(problem, str):
        raise InputError(f"{where}: 'problem' must be a string, got {type(problem).__name__}")
    if not isinstance(generations, list):
        raise InputError(f"{where}: 'generations' must be a list of strings")
    for i, g in enumerate(generations):
        if not isinstance(g, str) or not g.strip():
            raise InputError(f"{where}: generations[{i}] is an empty response or not a string")
    return True


def _landmv(correctness: dict, n: int, where: str) -> list[bool] | None:
    """label_i = llama_verification[i] and math_verify_reparsed_answer[i]; None if either list is missing or
    not as long as the generations (the authors skip such rows)."""
    lists = [correctness.get(key) for key in ("llama_verification", "math_verify_reparsed_answer")]
    if not all(isinstance(v, list) and len(v) == n for v in lists):
        return None
    for key, values in zip(("llama_verification", "math_verify_reparsed_answer"), lists):
        for i, v in enumerate(values):
            if v is not None and not isinstance(v, bool):
                raise InputError(f"{where}: correctness.{key}[{i}] = {v!r}; expected true, false or null")
    return [bool(a) and bool(b) for a, b in zip(*lists)]


def _verify(generation: str, obj: dict, where: str, counts) -> bool:
    import verify  # only needed when labels are not given

    answer = _require(obj, "answer", where)
    if not isinstance(answer, str) or not answer.strip():
        raise InputError(f"{where}: 'answer' must be a non-empty string (the gold final answer) to grade with "
                         "verify.py")
    counts["labelled_by_verifier"] += 1
    return bool(verify.grade(generation, answer))


def _labels(obj: dict, generations: list[str], where: str, s: BuildSettings, counts) -> list[bool] | None:
    """One bool per generation, or None for a row whose correctness lists are mismatched (skipped, counted).
    --labels auto: LandMV from the correctness dict when there is one, else verify.py's grade. A list of
    true / false / null (this project's own labelled form) is taken as given, null graded by verify.py."""
    correctness = obj.get("correctness")
    if s.labels == "verify" or (s.labels == "auto" and correctness is None):
        return [_verify(g, obj, where, counts) for g in generations]
    if isinstance(correctness, dict):
        return _landmv(correctness, len(generations), where)
    if s.labels == "landmv" or not isinstance(correctness, list):
        raise InputError(f"{where}: 'correctness' is {type(correctness).__name__}; --labels {s.labels} needs "
                         "OpenR1-Math-Raw's dict {llama_verification: [...], math_verify_reparsed_answer: "
                         "[...]} (or use --labels verify)")
    if len(correctness) != len(generations):
        raise InputError(f"{where}: 'correctness' must be a list as long as 'generations' ({len(generations)})")
    for i, label in enumerate(correctness):
        if label is not None and not isinstance(label, bool):
            raise InputError(f"{where}: correctness[{i}] = {label!r}; expected true, false or null")
    return [label if label is not None else _verify(g, obj, where, counts)
            for g, label in zip(generations, correctness)]


def _assistant(content: str) -> list[dict]:
    return [{"role": "assistant", "content": content}]


def _select_row(obj: dict, where: str, s: BuildSettings, counts) -> tuple:
    """One raw row -> (sft row, pair row before its length filter, group row, whether the problem overlaps a
    benchmark), the rows None where this row gives none. The pair and SFT choices are made on all
    generations: length filters come after choosing."""
    if not _passes_row_filters(obj, where, s, counts):
        return None, None, None, False
    generations = obj["generations"]
    labels = _labels(obj, generations, where, s, counts)
    if labels is None:
        counts["skipped_mismatched_lengths"] += 1
        return None, None, None, False
    contaminated = s.decontaminator is not None and s.decontaminator(obj["problem"])
    if contaminated:
        counts["contaminated"] += 1
        if s.remove_contaminated:
            counts["dropped_contaminated"] += 1
            return None, None, None, True
    correct = [i for i, ok in enumerate(labels) if ok]
    incorrect = [i for i, ok in enumerate(labels) if not ok]
    counts.update(problems_kept=1, generations=len(generations), correct=len(correct), incorrect=len(incorrect))
    prompt = problem_messages(obj["problem"], s.template)
    sft = pair = group = None
    if correct:
        sft = {"messages": prompt + _assistant(generations[correct[0]]), "chosen_gen_idx": correct[0]}
    else:
        counts["problems_without_correct"] += 1
    if correct and incorrect:
        pair = {"prompt": prompt, "chosen": _assistant(generations[correct[0]]),
                "rejected": _assistant(generations[incorrect[0]]),
                "chosen_gen_idx": correct[0], "rejected_gen_idx": incorrect[0]}
    else:
        counts["pairs_skipped_condition"] += 1
    if len(generations) >= 2:
        group = {"prompt": prompt, "completions": generations, "rewards": [1.0 if ok else 0.0 for ok in labels]}
        counts["warning_groups_equal_rewards"] += len(set(labels)) == 1
    else:
        counts["groups_too_small"] += 1
    return sft, pair, group, contaminated


def pair_lengths(tokenizer, template, pairs: list[dict], max_tokens: int, bound=None) -> list[tuple]:
    """(prompt_len, chosen_len, rejected_len) per pair, counted as the authors' template_and_tokenize_lengths
    does (study_length_distribution.py): each part rendered ALONE by the chat template without a generation
    prompt, tokenized, plus one:
        prompt_len   = len(ids(chat_text(prompt))) + 1
        chosen_len   = len(ids(chat_text([assistant chosen]))) + 1     (likewise rejected)
    so with Qwen2.5-Math's template a response's count includes the default system turn its rendering gets.
    The texts are encoded in one batch; one that has more than max_tokens tokens by its bytes alone
    (LengthBound) is not encoded and gets None (= over max_tokens)."""
    template, bound = get_template(template), bound or LengthBound(tokenizer)
    texts = [template.chat_text(msgs) for p in pairs for msgs in (p["prompt"], p["chosen"], p["rejected"])]
    lengths = [None] * len(texts)
    encode = [i for i, text in enumerate(texts) if not bound.surely_over([text], max_tokens)]
    for i, encoding in zip(encode, tokenizer.encode_batch([texts[i] for i in encode], add_special_tokens=False)):
        lengths[i] = len(encoding.ids) + 1
    return [tuple(lengths[3 * k:3 * k + 3]) for k in range(len(pairs))]


def _length_filter(pairs: list[dict], s: BuildSettings, counts) -> list[dict]:
    """Drop a pair whose prompt > max_prompt_tokens or either response > max_response_tokens (the authors'
    800 / 19,000); the kept pairs carry their lengths, as the authors' saved rows do."""
    limits = (s.max_prompt_tokens, s.max_response_tokens, s.max_response_tokens)
    kept = []
    for pair, lengths in zip(pairs, pair_lengths(s.tokenizer, s.template, pairs, max(limits), s.bound)):
        if any(n is None or n > limit for n, limit in zip(lengths, limits)):
            counts["pairs_removed_by_length"] += 1
            continue
        kept.append({**pair, "prompt_len": lengths[0], "chosen_len": lengths[1], "rejected_len": lengths[2]})
    return kept


def _dumps(row: dict | None) -> str:
    return "" if row is None else json.dumps(row, ensure_ascii=False) + "\n"


def process_chunk(s: BuildSettings, path, chunk: list[tuple[int, bytes]]) -> tuple:
    """Raw lines -> (counts, contaminated line numbers, the chunk's sft / pairs / groups JSONL text). Every
    pair of the chunk is length-counted in one batch; only pairs are tokenized (the authors length-filter
    nothing else)."""
    counts, contaminated, sft, pairs, groups = collections.Counter(), [], [], [], []
    for line_no, raw in chunk:
        where = f"{path}:{line_no}"
        obj = common.parse_jsonl_line(raw, where)
        if obj is None:
            continue
        counts["rows"] += 1
        generations = obj.get("generations")
        counts["generations_read"] += len(generations) if isinstance(generations, list) else 0
        row_sft, pair, group, overlaps = _select_row(obj, where, s, counts)
        if overlaps:
            contaminated.append(line_no)
        sft.append(_dumps(row_sft))
        groups.append(_dumps(group))
        if pair is not None:
            counts["pairs_before_length_filter"] += 1
            pairs.append(pair)
    if s.tokenizer is not None and pairs:
        pairs = _length_filter(pairs, s, counts)
    counts.update(sft_rows=sum(map(bool, sft)), pairs_rows=len(pairs), groups_rows=sum(map(bool, groups)),
                  warning_chosen_equals_rejected=sum(p["chosen"] == p["rejected"] for p in pairs))
    return counts, contaminated, "".join(sft), "".join(_dumps(p) for p in pairs), "".join(groups)


_WORKER_SETTINGS = None


def _worker_init(settings: BuildSettings, parent: int) -> None:
    import signal

    global _WORKER_SETTINGS
    _WORKER_SETTINGS = settings
    _die_with(parent)
    # Ctrl-C reaches the whole process group: the build process alone answers it (one line, common.cli) and
    # shuts the pool down; a worker would print a traceback of its own. The worker was forked with SIGINT
    # blocked (_submit): it ignores it before unblocking, so a Ctrl-C during its start-up is dropped too.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    # One worker = one core: the tokenizer's own thread pool would make --workers N oversubscribe the CPUs.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _die_with(parent: int) -> None:
    """Linux: the kernel kills this worker when the build process dies, however it dies (SIGKILL too), so a
    killed build leaves no idle worker holding memory (prctl PR_SET_PDEATHSIG; elsewhere nothing is done)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the build died before prctl took effect
        os._exit(1)


def _worker_chunk(path, chunk):
    return process_chunk(_WORKER_SETTINGS, path, chunk)


def _submit(pool, path, chunk):
    """pool.submit with SIGINT blocked: the pool forks its workers inside submit, and a Ctrl-C landing between
    a fork and the worker's _worker_init would stop that worker half-started (a traceback, or a pool waiting on
    it for ever). A Ctrl-C that comes meanwhile reaches this process when SIGINT is unblocked."""
    import signal

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        return pool.submit(_worker_chunk, path, chunk)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _chunks(path, max_rows: int = 32, max_bytes: int = 8 << 20) -> Iterator[tuple[int, list]]:
    """(bytes read so far, up to max_rows raw lines of at most ~max_bytes): the unit a worker processes."""
    chunk, size, done = [], 0, 0
    for line_no, raw in common.read_lines(path):
        chunk.append((line_no, raw))
        size += len(raw)
        if len(chunk) >= max_rows or size >= max_bytes:
            done += size
            yield done, chunk
            chunk, size = [], 0
    if chunk:
        yield done + size, chunk


def _ordered_results(s: BuildSettings, path, workers: int) -> Iterator[tuple[int, tuple]]:
    """(bytes read, process_chunk result) in file order. With workers > 1 the chunks go to a process pool
    with at most 2 per worker in flight, so memory stays flat whatever the file's size; the results are
    taken back in submission order, so the output is the same bytes whatever the number of workers. A worker
    that dies (the out-of-memory killer's SIGKILL) breaks the pool: concurrent.futures then fails every
    pending result at once (BrokenProcessPool) instead of waiting forever, and the build stops saying so."""
    if workers == 1:
        for done, chunk in _chunks(path):
            yield done, process_chunk(s, path, chunk)
        return
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    pool = ProcessPoolExecutor(workers, multiprocessing.get_context("fork"), _worker_init, (s, os.getpid()))
    try:
        pending = collections.deque()
        for done, chunk in _chunks(path):
            pending.append((done, _submit(pool, path, chunk)))
            if len(pending) >= 2 * workers:
                done, result = pending.popleft()
                yield done, result.result()
        while pending:
            done, result = pending.popleft()
            yield done, result.result()
    except BrokenProcessPool:
        raise common.RunStopped(f"error: a worker process died while building from {path} (killed: by the "
                                "out-of-memory killer, or a signal); no output was written; run again with fewer "
                                "--workers or more memory", 1) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _write_together(paths: list, fill) -> None:
    """fill(open files) writes every path at once; each file is written by common.atomic_write (temporary,
    then renamed), so a failed build leaves none of them half-written and no temporary behind."""
    def nest(remaining, tmps):
        if not remaining:
            files = [open(tmp, "w", encoding="utf-8") for tmp in tmps]
            try:
                fill(files)
            finally:
                for f in files:
                    f.close()
            return
        common.atomic_write(remaining[0], lambda tmp: nest(remaining[1:], tmps + [tmp]))
    nest(list(paths), [])


# The report's counts, in the authors' order, with what their scripts print for each (clean_base_shuffled.py,
# clean_base_shuffled_dpo.py, study_length_distribution.py); the rest are this build's own.
REPORT_COUNTS = {
    "rows": "Total items processed",
    "filtered_invalid_problem": "Items filtered out (Invalid Problem)",
    "filtered_source": "Items filtered out (Source 'cn_k12')",
    "skipped_no_problem": "Items skipped (No Problem Text)",
    "skipped_no_generations": "Items skipped (No Generations)",
    "skipped_mismatched_lengths": "Items skipped (Mismatched Correctness Lengths)",
    "sft_rows": "Final count for LandMV SFT dataset",
    "pairs_skipped_condition": "Items skipped (Did not meet DPO condition: >=1 True AND >=1 False LandMV)",
    "pairs_before_length_filter": "Final count for LandMV DPO dataset / Original examples",
    "pairs_removed_by_length": "Removed examples",
    "pairs_rows": "Filtered examples",
    "contaminated": "problems sharing an n-gram with --decontaminate (reported)",
    "dropped_contaminated": "of those, removed (--remove-contaminated)",
    "problems_kept": "problems that gave rows",
    "generations": "their generations",
    "correct": "labelled correct",
    "incorrect": "labelled incorrect",
    "problems_without_correct": "kept problems with no correct trace (no SFT row)",
    "labelled_by_verifier": "labels computed by verify.py",
    "groups_rows": "groups written (every generation of a kept problem)",
    "groups_too_small": "kept problems with one generation (no group)",
    "generations_read": "generations in all rows read",
    "warning_chosen_equals_rejected": "written pairs whose chosen text equals the rejected (no preference to learn)",
    "warning_groups_equal_rewards": "written groups whose rewards are all equal (advantages 0: they train to nothing)",
}


def _progress_line(counts, done: int, size: int | None, raw_path, progress: common.Progress) -> str:
    """Rows and generations so far and their rate; the share of the file read and the time left when its size
    is known (not for a pipe)."""
    share, eta = (f"{100 * done / size:.1f}% of ", f", ETA {progress.eta(done)}") if size else ("", "")
    return (f"{counts['rows']:,} rows ({share}{raw_path}), {counts['generations_read']:,} generations, "
            f"{counts['generations_read'] / progress.elapsed():,.0f} generations/s, elapsed "
            f"{common.format_seconds(progress.elapsed())}{eta}")


def build_from_raw(raw_path, out_dir, tokenizer=None, template="qwen", max_prompt_tokens=800,
                   max_response_tokens=19000, decontaminate=(), ngram=8, labels="auto",
                   exclude_sources=("cn_k12",), remove_contaminated=False, workers=1, log=None) -> dict:
    """Raw traces -> out_dir/{sft,pairs,groups}.jsonl + report.json; returns the report. The rows are
    selected as the authors' scripts select them (see the top of this section); groups hold every
    generation of a kept problem with its label as reward (AdvDistill). Decontamination reports overlaps
    (their line numbers) and removes them only with remove_contaminated. Without a tokenizer the pair
    length filter is skipped and the report says so. log(str) receives progress lines."""
    if labels not in LABEL_MODES:
        raise InputError(f"--labels {labels!r}: choose one of {', '.join(LABEL_MODES)}")
    s = BuildSettings(get_template(template), labels, frozenset(exclude_sources), max_prompt_tokens,
                      max_response_tokens, tokenizer, LengthBound(tokenizer) if tokenizer is not None else None,
                      Decontaminator(decontaminate, ngram) if decontaminate else None, remove_contaminated)
    os.makedirs(out_dir, exist_ok=True)
    # raw_path is read once, so a pipe (zcat ... |, <(...)) works too; its size is then unknown: no % or ETA.
    size = os.path.getsize(raw_path) if os.path.isfile(raw_path) else None
    counts, contaminated, progress = collections.Counter(), [], common.Progress(max(size or math.inf, 1))
    log = log or (lambda line: None)

    def report_progress(done: int, final: bool = False) -> None:  # done: bytes of raw_path read
        if progress.due(done, final):
            log(_progress_line(counts, done, size, raw_path, progress))

    def fill(files):
        done = 0
        for done, (chunk_counts, chunk_contaminated, *texts) in _ordered_results(s, raw_path, workers):
            counts.update(chunk_counts)
            contaminated.extend(chunk_contaminated)
            for f, text in zip(files, texts):
                f.write(text)
            report_progress(done)
        if counts["rows"] == 0:
            raise InputError(f"{raw_path}: no rows")
        report_progress(done, final=True)

    _write_together([os.path.join(out_dir, f"{name}.jsonl") for name in ("sft", "pairs", "groups")], fill)
    report = {key: counts[key] for key in REPORT_COUNTS}
    report["contaminated_lines"] = contaminated
    report["settings"] = {
        "raw": str(raw_path), "template": s.template.name, "labels": labels,
        "exclude_sources": sorted(s.exclude_sources), "ngram": ngram,
        "decontaminate": [str(p) for p in decontaminate], "remove_contaminated": remove_contaminated,
        "length_filter": (f"pairs: prompt <= {max_prompt_tokens}, responses <= {max_response_tokens} tokens "
                          "(the authors' accounting)" if tokenizer is not None
                          else "skipped: no tokenizer given"),
    }
    common.write_json(os.path.join(out_dir, "report.json"), report)
    for key in (k for k in REPORT_COUNTS if k.startswith("warning_") and report[k]):
        log(f"warning: {report[key]:,} {REPORT_COUNTS[key]}")
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
    """Pack every completion of every group into one row, group after group (the rewards stay with the
    dataset: the weighted loss takes per-completion advantages computed once from whole groups)."""
    return pack([example for examples, _ in groups for example in examples])


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


def rank_micro_batches(batch_indices: list[int], rank: int, world_size: int, micro_batch_size: int) -> list[list[int]]:
    """This rank's share of a global batch (shard) in micro-batches, padded with empty ones so that every
    rank runs as many forward/backward passes (FSDP all-gathers in each forward; DDP's one synchronising
    backward must be the same micro-step everywhere)."""
    num_micro = math.ceil(math.ceil(len(batch_indices) / world_size) / micro_batch_size)
    mine = micro_batches(shard(batch_indices, rank, world_size), micro_batch_size)
    return mine + [[]] * (num_micro - len(mine))


def iterate_batches(num_examples: int, global_batch_size: int, seed: int, num_epochs: int,
                    start_step: int = 0, stop_step: float = math.inf) -> Iterator[tuple[int, int, list[int]]]:
    """Yield (step, epoch, batch_indices) for steps start_step, start_step+1, ... over num_epochs epochs, and
    before stop_step. Steps count across epochs; resuming from step k recomputes the same batches and skips
    the first k."""
    steps_per_epoch = math.ceil(num_examples / global_batch_size)
    batches, batches_epoch = None, None
    for step in range(start_step, min(steps_per_epoch * num_epochs, stop_step)):
        epoch, index = divmod(step, steps_per_epoch)
        if epoch != batches_epoch:
            batches, batches_epoch = global_batches(num_examples, global_batch_size, seed, epoch), epoch
        yield step, epoch, batches[index]


# ---------------------------------------------------------------------------------------------------
# 7. Token cache: tokenise once, map everywhere
# ---------------------------------------------------------------------------------------------------
# A training set is tokenised once, into a directory keyed by everything its ids depend on, and every
# rank of this and every later run (a resume, another stage's run on the same file) maps it read-only.
# The layout is nanoGPT's train.bin (prepare.py) and open-instruct's token files: one flat array of ids
# plus small tables, so a rank holds no token in its own memory; the page cache shares the mapped file
# between the ranks of a node.
#
#   KEY/tokens.bin          uint32 [T]     every kept sequence's ids, one after another
#   KEY/offsets.npy         int64  [S+1]   sequence s is tokens[offsets[s]:offsets[s+1]]
#   KEY/prompt_lengths.npy  int64  [S]     loss_mask(s) = [0] * prompt_length + [1] * (the rest): one edge,
#                                          for every template (encode_example), checked at build
#   KEY/item_offsets.npy    int64  [I+1]   item i (an sft example, a pair, a group) is sequences
#                                          item_offsets[i] .. item_offsets[i+1]-1 (chosen before rejected)
#   KEY/rewards.npy         float64 [S]    groups only: each completion's reward
#   KEY/meta.json                          the key, the counts of the arrays, tokenize_*'s report
#
# A directory appears whole or not at all (built in a temporary one, then renamed; a second builder that
# loses the race discards its own), and one whose arrays disagree with meta.json is refused, never used.

TOKEN_CACHE_VERSION = 1  # raise when the layout or the meaning of the arrays changes
TOKENIZE = {"sft": tokenize_sft, "pairs": tokenize_pairs, "groups": tokenize_groups}
CHUNK_CHARS = 1 << 21  # rows are encoded ~2M characters (~0.5M tokens) at a time: bounded memory, enough texts
                       # per batch to keep every core busy


def token_cache_key(data_path, tokenizer_file, fmt: str, template, max_length: int | None) -> dict:
    """Everything the cached ids depend on: the data's and the tokenizer's bytes, the format, template and
    length limit, the code that renders and tokenises (this file; the tokenizers library's version), and
    the layout's version. Any difference gives another directory, so a stale cache is never read."""
    import tokenizers

    with open(__file__, "rb") as f:
        code = hashlib.sha256(f.read()).hexdigest()
    return {"version": TOKEN_CACHE_VERSION, "format": fmt, "template": get_template(template).name,
            "max_length": max_length, "data_sha256": common.sha256_file(data_path, chunk=1 << 16),
            "tokenizer_sha256": common.sha256_file(tokenizer_file, chunk=1 << 16), "data_py_sha256": code,
            "tokenizers": tokenizers.__version__}


def token_cache_dir(root, key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return os.path.join(root, f"{key['format']}-{digest[:16]}")


def _row_chars(row: dict) -> int:
    texts = [m["content"] for m in row["prompt"]] + row.get("completions", [])
    return sum(map(len, texts)) + sum(len(row[k]) for k in ("response", "chosen", "rejected") if k in row)


def _row_chunks(rows: list[dict], max_chars: int) -> Iterator[list[dict]]:
    chunk, size = [], 0
    for row in rows:
        chunk.append(row)
        size += _row_chars(row)
        if size >= max_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _item_sequences(fmt: str, item) -> tuple[list[Example], list[float]]:
    """An item of tokenize_*'s output as (its sequences, their rewards: 0 outside groups)."""
    if fmt == "groups":
        return item
    examples = [item] if fmt == "sft" else list(item)
    return examples, [0.0] * len(examples)


def _merge_reports(reports: list[dict]) -> dict:
    merged = {}
    for report in reports:
        for k, v in report.items():
            merged[k] = v if k == "max_length" else merged.get(k, 0) + v
    return merged


def _tokenized_chunks(rows: list[dict], fmt: str, tokenizer, template, max_length) -> Iterator[tuple]:
    """tokenize_*'s (items, report) chunk by chunk, in order. The next chunk is tokenised in a thread while
    the caller stores this one: encode_batch releases the GIL, so the cores encode while Python converts
    ids, and at most two chunks are held at once."""
    bound, pending = LengthBound(tokenizer), None
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        for chunk in _row_chunks(rows, CHUNK_CHARS):
            submitted = pool.submit(TOKENIZE[fmt], chunk, tokenizer, template, max_length, bound=bound)
            if pending is not None:
                yield pending.result()
            pending = submitted
        if pending is not None:
            yield pending.result()


def _write_token_arrays(out_dir, rows: list[dict], fmt: str, tokenizer, template, max_length) -> dict:
    """tokenize_* over the rows chunk by chunk (each chunk one parallel encode_batch), the ids appended to
    tokens.bin as they come: what is held at once is two chunks' encodings. Returns meta.json's counts."""
    lengths, prompt_lengths, item_sizes, rewards, reports = [], [], [], [], []
    with open(os.path.join(out_dir, "tokens.bin"), "wb") as f:
        for items, report in _tokenized_chunks(rows, fmt, tokenizer, template, max_length):
            reports.append(report)
            for item in items:
                examples, item_rewards = _item_sequences(fmt, item)
                item_sizes.append(len(examples))
                rewards += item_rewards
                for ids, mask in examples:
                    prompt = mask.index(1)  # encode_example's one edge: zeros up to it, ones after it
                    if mask.count(1) != len(mask) - prompt:
                        raise ValueError(f"template {template!r}: a loss mask that is not one prompt/response edge")
                    f.write(np.asarray(ids, dtype=np.uint32).tobytes())
                    lengths.append(len(ids))
                    prompt_lengths.append(prompt)
    arrays = {"offsets": np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]),
              "prompt_lengths": np.asarray(prompt_lengths, dtype=np.int64),
              "item_offsets": np.concatenate([[0], np.cumsum(item_sizes, dtype=np.int64)])}
    if fmt == "groups":
        arrays["rewards"] = np.asarray(rewards, dtype=np.float64)
    for name, array in arrays.items():
        np.save(os.path.join(out_dir, name + ".npy"), array)
    return {"tokens": int(arrays["offsets"][-1]), "sequences": len(lengths), "items": len(item_sizes),
            "report": _merge_reports(reports)}


def _builder_prefix(pid: int) -> str:
    import socket

    return f".tmp-{socket.gethostname()}-{pid}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    return True


def remove_dead_builders_temporaries(root) -> None:
    """A build killed outright (SIGKILL, the out-of-memory killer) leaves its temporary directory: those of
    builders on this host whose process is gone are removed. A live builder's (another job racing this one)
    and other hosts' (a shared filesystem) are left alone."""
    host_prefix = _builder_prefix(0)[:-1]  # ".tmp-HOST-"
    for name in os.listdir(root):
        pid = name[len(host_prefix):].split("-", 1)[0]
        if name.startswith(host_prefix) and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            print(f"removed {os.path.join(root, name)}, left by an interrupted token-cache build", file=sys.stderr)


def build_token_cache(path, data_path, fmt: str, tokenizer, template, max_length: int | None, key: dict) -> None:
    """Read and tokenise --data into the directory `path`, atomically: everything is written into a
    temporary directory beside it, renamed to `path` when whole. If another builder got there first, its
    directory (the same key, so the same arrays) stays and ours is discarded."""
    rows = LOADERS[fmt](data_path)  # a bad row stops here with its file:line
    remove_dead_builders_temporaries(os.path.dirname(path))
    tmp = tempfile.mkdtemp(prefix=f"{_builder_prefix(os.getpid())}-", dir=os.path.dirname(path))
    try:
        meta = _write_token_arrays(tmp, rows, fmt, tokenizer, template, max_length)
        common.write_json(os.path.join(tmp, "meta.json"), {"key": key, **meta})
        os.chmod(tmp, 0o777 & ~common._umask())  # mkdtemp makes 0700; the cache is shared like the data
        try:
            os.rename(tmp, path)
        except OSError:
            if not os.path.isfile(os.path.join(path, "meta.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_token_cache(root, data_path, tokenizer, tokenizer_file, fmt: str, template,
                       max_length: int | None) -> tuple[str, dict, bool]:
    """(the cache directory for these inputs, its key, whether it was built now): built under `root`
    unless it is already there. An unwritable root is an error that names --token-cache."""
    key = token_cache_key(data_path, tokenizer_file, fmt, template, max_length)
    path = token_cache_dir(root, key)
    if os.path.isdir(path):
        return path, key, False
    try:
        os.makedirs(root, exist_ok=True)
        if not os.access(root, os.W_OK):
            raise PermissionError(f"{root} is not writable")
    except OSError as e:
        raise InputError(f"cannot write the token cache for {data_path} in {root} ({e}); pass --token-cache "
                         "DIR, a writable directory (every later run on the same data maps it from there)") from None
    build_token_cache(path, data_path, fmt, tokenizer, template, max_length, key)
    return path, key, True


@dataclass
class TokenCache:
    """A token cache directory, mapped read-only (numpy memmaps: nothing is read until it is used)."""

    path: str
    report: dict  # tokenize_*'s counts: rows, kept, dropped...
    tokens: np.ndarray
    offsets: np.ndarray
    prompt_lengths: np.ndarray
    item_offsets: np.ndarray
    rewards: np.ndarray | None

    def __len__(self) -> int:
        return len(self.item_offsets) - 1

    def example(self, s: int) -> Example:
        """Sequence s as encode_example made it: its ids sliced from the map, the one-edge loss mask."""
        ids = self.tokens[self.offsets[s]:self.offsets[s + 1]].tolist()
        prompt = int(self.prompt_lengths[s])
        return Example(ids, [0] * prompt + [1] * (len(ids) - prompt))

    def item(self, fmt: str, i: int):
        """Item i in tokenize_*'s shape: an Example (sft), a (chosen, rejected) pair, or (examples, rewards)."""
        first, end = int(self.item_offsets[i]), int(self.item_offsets[i + 1])
        examples = [self.example(s) for s in range(first, end)]
        if fmt == "groups":
            return examples, self.rewards[first:end].tolist()
        return examples[0] if fmt == "sft" else tuple(examples)


def _check_token_arrays(meta: dict, c: TokenCache) -> str | None:
    """What is wrong with a cache's arrays (None: nothing), in O(sequences): sizes against meta.json and
    each other, offsets rising from 0 to the token count, every prompt and response non-empty."""
    num_tokens, num_seqs, num_items = meta["tokens"], meta["sequences"], meta["items"]
    tables = [("offsets", c.offsets, num_seqs + 1), ("prompt_lengths", c.prompt_lengths, num_seqs),
              ("item_offsets", c.item_offsets, num_items + 1)] + (
        [("rewards", c.rewards, num_seqs)] if meta["key"]["format"] == "groups" else [])
    for name, array, size in tables:
        if array.shape != (size,) or array.dtype != (np.float64 if name == "rewards" else np.int64):
            return f"{name}.npy holds {array.dtype} {array.shape}, meta.json says {size} entries"
    if c.tokens.shape != (num_tokens,):
        return f"tokens.bin holds {c.tokens.size} ids, meta.json says {num_tokens}"
    lengths = np.diff(c.offsets)
    if c.offsets[0] != 0 or c.offsets[-1] != num_tokens or (lengths <= 0).any():
        return "offsets.npy does not cut tokens.bin into non-empty sequences"
    if ((c.prompt_lengths < 1) | (c.prompt_lengths >= lengths)).any():
        return "prompt_lengths.npy does not fit the sequences"
    if c.item_offsets[0] != 0 or c.item_offsets[-1] != num_seqs or (np.diff(c.item_offsets) <= 0).any():
        return "item_offsets.npy does not cut the sequences into items"
    if c.rewards is not None and not np.isfinite(c.rewards).all():
        return "rewards.npy holds a non-finite reward"
    return None


def open_token_cache(path, key: dict) -> TokenCache:
    """Map a cache directory; one that is damaged (a missing or truncated file, a bad header, sizes that
    disagree) or that names other inputs is refused with the directory's name and what to do."""
    def damaged(what):
        return InputError(f"token cache {path} is damaged ({what}); delete that directory and start again: "
                          "it is rebuilt from the data")
    if not os.path.isdir(path):
        raise InputError(f"token cache {path}: not found on this machine; a job on several nodes needs it on a "
                         "filesystem every node sees (--token-cache DIR)")
    try:
        with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
        tables = {name: np.load(os.path.join(path, name + ".npy"), mmap_mode="r", allow_pickle=False)
                  for name in ("offsets", "prompt_lengths", "item_offsets") + (
                      ("rewards",) if key["format"] == "groups" else ())}
        tokens_file = os.path.join(path, "tokens.bin")
        num_ids = os.path.getsize(tokens_file) // 4 if os.path.getsize(tokens_file) % 4 == 0 else -1
        tokens = np.memmap(tokens_file, np.uint32, "r") if num_ids > 0 else np.zeros(max(num_ids, 0), np.uint32)
        cache = TokenCache(path, meta["report"], tokens, tables["offsets"], tables["prompt_lengths"],
                           tables["item_offsets"], tables.get("rewards"))
        if num_ids < 0:
            raise ValueError("tokens.bin is not a whole number of uint32 ids")
        if meta.get("key") != key:
            raise ValueError("meta.json names other inputs than this directory's key")
        problem = _check_token_arrays(meta, cache)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise damaged(f"{type(e).__name__}: {e}") from None
    if problem:
        raise damaged(problem)
    return cache


# ---------------------------------------------------------------------------------------------------
# 8. CLI
# ---------------------------------------------------------------------------------------------------


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="data.py", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    b = commands.add_parser("build", formatter_class=common.HelpFormatter,
                            help="raw teacher traces (OpenR1-Math-Raw rows) -> sft / pairs / groups JSONL",
                            description="Select SFT rows, preference pairs and groups from raw traces as the "
                                        "REDI authors' scripts do.")
    b.add_argument("--raw", required=True, help="JSONL with problem, generations, correctness {...}, source, "
                                                "problem_is_valid (and answer, for --labels verify)")
    b.add_argument("--out", required=True, help="output directory (one build at a time; never overwritten "
                                                "without --overwrite)")
    b.add_argument("--tokenizer", help="model directory holding tokenizer.json; enables the pair length filter")
    b.add_argument("--template", default="qwen", choices=sorted(TEMPLATES), help="chat template of the rows")
    b.add_argument("--labels", default="auto", choices=LABEL_MODES,
                   help="landmv: llama_verification AND math_verify_reparsed_answer; verify: verify.py's "
                        "grade against 'answer'; auto: landmv where 'correctness' is present, else verify")
    b.add_argument("--exclude-sources", nargs="*", default=["cn_k12"], metavar="SOURCE",
                   help="drop rows whose 'source' is one of these (none: pass the flag alone)")
    b.add_argument("--max-prompt-tokens", type=_at_least_one, default=800,
                   help="drop a pair whose prompt has more tokens (the authors' count)")
    b.add_argument("--max-response-tokens", type=_at_least_one, default=19000,
                   help="drop a pair whose chosen or rejected response has more tokens (the authors' count)")
    b.add_argument("--decontaminate", nargs="*", default=[], metavar="BENCHMARK_JSONL",
                   help="report problems sharing a word n-gram with these files' 'problem' fields")
    b.add_argument("--ngram", type=_at_least_one, default=8, help="n of the overlap n-grams")
    b.add_argument("--remove-contaminated", action="store_true",
                   help="remove the overlapping problems instead of only reporting them")
    b.add_argument("--workers", type=_at_least_one, default=len(os.sched_getaffinity(0)),
                   help="worker processes for parsing, labelling and tokenizing (the default is every core "
                        "this process may use)")
    b.add_argument("--overwrite", action="store_true", help="replace a finished build in --out")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    with common.OutputLock(args.out, "data.py build"):
        if os.path.exists(os.path.join(args.out, "report.json")) and not args.overwrite:
            raise InputError(f"--out {args.out} holds a finished build (report.json); choose another --out or "
                             "pass --overwrite to replace it")
        # Holding the lock, no live build owns these: temporaries (common.atomic_write's) of a killed one.
        for path in common.remove_leftovers(args.out, common.ATOMIC_TEMPORARY):
            print(f"data.py build: removed {path}, left by an interrupted build", file=sys.stderr, flush=True)
        tokenizer = load_tokenizer(args.tokenizer, check_config=False) if args.tokenizer else None
        report = build_from_raw(args.raw, args.out, tokenizer=tokenizer, template=args.template,
                                max_prompt_tokens=args.max_prompt_tokens,
                                max_response_tokens=args.max_response_tokens,
                                decontaminate=args.decontaminate, ngram=args.ngram, labels=args.labels,
                                exclude_sources=args.exclude_sources,
                                remove_contaminated=args.remove_contaminated, workers=args.workers,
                                log=lambda line: print(f"data.py build: {line}", file=sys.stderr, flush=True))
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    common.cli(main, "data.py")
