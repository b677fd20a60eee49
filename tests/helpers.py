"""Shared test helpers: the transformers reference model every parity test compares against."""

import torch
import transformers

from scripts import tiny


def make_hf_model(seed=0, **overrides):
    """A tiny random transformers Qwen2 whose biases and norm weights are randomised too (a zero bias or a
    unit norm would hide a missing or misplaced term), weights N(0, 0.1) so greedy runs vary."""
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(**tiny.tiny_config_dict(**overrides))
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.1)
    return model
