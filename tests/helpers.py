"""Shared test helpers: the transformers reference model every parity test compares against."""

import torch
import transformers

from scripts import tiny


def make_hf_model(seed=0, **overrides):
    """A tiny random transformers Qwen2 (tiny.tiny_config_dict(**overrides)), its weights drawn as
    tiny.randomise_ draws them (biases and norm weights randomised too, matrices N(0, 0.1)) from torch's
    global generator seeded with `seed`. tiny.make_checkpoint saves the same kind of model without transformers."""
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(**tiny.tiny_config_dict(**overrides))
    return tiny.randomise_(transformers.Qwen2ForCausalLM(config).eval())
