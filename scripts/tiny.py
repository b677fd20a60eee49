"""Tiny stand-ins for a real checkpoint: a byte-level BPE tokenizer with the chat special tokens of
Qwen2.5 (ChatML) and DeepSeek-R1-Distill, small Qwen2 configs, and make_checkpoint, which saves both as a
random Hugging Face checkpoint. Tests, `make demo` and the benchmarks use them because nothing can be
downloaded from the Hugging Face hub here; the files they write have the same layout as a hub checkpoint,
so every loading path is the real one."""

import json
import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# Order fixes the ids (0, 1, 2, ...), so tests can rely on them.
SPECIAL_TOKENS = [
    "<|endoftext|>",  # Qwen's pad / document end
    "<|im_start|>",
    "<|im_end|>",  # ChatML end of turn
    "<｜begin▁of▁sentence｜>",  # DeepSeek-R1-Distill BOS
    "<｜end▁of▁sentence｜>",  # DeepSeek-R1-Distill EOS / end of turn
    "<｜User｜>",
    "<｜Assistant｜>",
    "<think>",
    "</think>",
]

DEFAULT_CORPUS = [
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "What is 12 + 35? First add the ones: 2 + 5 = 7. Then the tens: 1 + 3 = 4. So the answer is \\boxed{47}.",
    "Compute 7 * 8 - 6. We have 7 * 8 = 56, and 56 - 6 = 50. The final answer is \\boxed{50}.",
    "Let x = 3. Then 2x + 1 = 7 and x^2 = 9, so \\frac{9}{3} = 3. Therefore \\boxed{3}.",
    "system user assistant The sum of 0 1 2 3 4 5 6 7 8 9 is 45. Carry the 1.",
]


def make_tokenizer(out_dir, texts=None, vocab_size=400):
    """Train a byte-level BPE tokenizer on `texts` and write `out_dir/tokenizer.json` plus a
    `tokenizer_config.json` that transformers' AutoTokenizer can read. Returns the Tokenizer."""
    os.makedirs(out_dir, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    # Digits one by one, as Qwen2's tokenizer does: arithmetic is then learnable by a tiny model.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts or DEFAULT_CORPUS) * 4, trainer)
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
                   "pad_token": "<|endoftext|>", "model_max_length": 32768}, f, indent=2)
    return tokenizer


def tiny_config_dict(vocab_size=400, **overrides):
    """A config.json-style dict of a small Qwen2 (GQA: 4 query heads share 2 key/value heads)."""
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
    }
    config.update(overrides)
    return config


def randomise_(model, generator: torch.Generator | None = None):
    """Overwrite every parameter in place, in named_parameters() order: biases N(0, 0.5), norm weights
    U(0.5, 1.5), matrices N(0, 0.1), drawn from `generator` (None: torch's global generator). Works on ours
    and on transformers' Qwen2 (both name norms "...norm..."). A zero bias or a unit norm would hide a
    missing or misplaced term in a parity test, and with transformers' default N(0, 0.02) a random tied model
    only repeats its last token, so greedy runs would not vary."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5, generator=generator)
            elif "norm" in name:
                p.uniform_(0.5, 1.5, generator=generator)
            else:
                p.normal_(0, 0.1, generator=generator)
    return model


def make_checkpoint(path, seed=0, dtype=torch.float32, texts=None, **config_overrides) -> str:
    """A tiny random Qwen2 and its tokenizer saved as a Hugging Face checkpoint in `path` (created): the
    tokenizer trained on `texts` (default DEFAULT_CORPUS) with at most vocab_size tokens, the model
    tiny_config_dict(**config_overrides) with randomise_'s weights (seeded), saved in `dtype`. Returns the
    path. Loads unchanged in model.Qwen2.from_pretrained and transformers' from_pretrained / AutoTokenizer."""
    from model import Qwen2, Qwen2Config

    path = str(path)
    config = Qwen2Config.from_dict(tiny_config_dict(**config_overrides))
    make_tokenizer(path, texts=texts, vocab_size=config.vocab_size)
    with torch.device("meta"):
        model = Qwen2(config)  # no random init to throw away
    model = randomise_(model.to_empty(device="cpu"), torch.Generator().manual_seed(seed))
    model.source_dir = path  # its tokenizer files are already there
    model.save_pretrained(path, dtype=dtype)
    return path
