"""Qwen2 in plain PyTorch: the decoder of Qwen2 / Qwen2.5 / DeepSeek-R1-Distill-Qwen, computed exactly as
transformers' `Qwen2ForCausalLM` computes it, loading and saving Hugging Face safetensors checkpoints.

Read top to bottom:
  1. Qwen2Config      a flat dataclass whose fields are the keys of config.json.
  2. The layers       RMSNorm, rotary embeddings (rotate-half form), grouped-query attention, SwiGLU MLP.
  3. Qwen2            the model: training forward (packed documents, activation checkpointing, hidden-state
                      output for chunked losses) and inference (a static KV cache, prefill, one-token decode).
  4. Checkpoints      the explicit map of Hugging Face tensor names, from_pretrained and save_pretrained.

Conventions worth knowing:
  - A packed row holds several documents; `position_ids` restart at 0 in each, and `document_ids` confine
    attention to the document (a document-causal mask). Per-document logits equal separate forwards.
  - The KV cache has one row ("slot") per sequence being decoded. Every slot has its own position, so rows
    of different prompt lengths decode together; a finished slot is simply prefilled again with a new prompt.
    A decode step reads each row's own keys, not the longest row's: runs of neighbouring slots (eager), or a
    FlexAttention block mask (compiled).
"""

import json
import math
import os
import shutil
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from common import InputError, atomic_write, read_json_object, write_json

# ----------------------------------------------------------------------------------------------------------
# 1. Config

# The dtype names config.json and the command lines use.
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "float16": torch.float16, "fp32": torch.float32,
          "float32": torch.float32}


class CheckpointError(InputError):
    """A checkpoint or config this implementation cannot load faithfully, or a damaged file: the message names
    the file and says what to do. An InputError, so every command line reports it in one line, exit 2."""


@dataclass
class Qwen2Config:
    """The fields of a Qwen2 config.json (defaults: Qwen2.5-1.5B). Keys we do not use are kept in `extra`
    so that a save writes them back unchanged."""

    vocab_size: int = 151936
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    head_dim: int | None = None  # absent in Qwen2 configs: hidden_size // num_attention_heads
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                                  f"num_key_value_heads ({self.num_key_value_heads})")

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "Qwen2Config":
        """Read a config.json dict, in the transformers 4.x spelling (top-level `rope_theta`, `torch_dtype`)
        or the 5.x one (`rope_parameters: {rope_theta, rope_type}`, `dtype`). Refuse what we cannot honour."""

        def refuse(key, why):
            raise CheckpointError(f"{source}: {key}: {why}")

        if not isinstance(raw, dict):
            raise CheckpointError(f"{source}: a JSON {type(raw).__name__}; config.json must be a JSON object of "
                                  "the model's settings")
        if raw.get("model_type", "qwen2") != "qwen2":
            refuse("model_type", f"is {raw['model_type']!r}; this implementation computes only 'qwen2'")
        if raw.get("use_sliding_window"):
            refuse("use_sliding_window", "is true; sliding-window attention is not implemented "
                   "(every Qwen2.5 / R1-Distill checkpoint has it false)")
        if raw.get("hidden_act", "silu") != "silu":
            refuse("hidden_act", f"is {raw['hidden_act']!r}; Qwen2 uses 'silu'")
        if raw.get("attention_dropout", 0.0):
            refuse("attention_dropout", "is non-zero; attention dropout is not implemented")
        if raw.get("rope_scaling") not in (None, {}):
            refuse("rope_scaling", f"is {raw['rope_scaling']!r}; only default RoPE is implemented")
        rope_parameters = raw.get("rope_parameters") or {}
        if not isinstance(rope_parameters, dict):
            refuse("rope_parameters", f"is {rope_parameters!r:.40}; expected an object {{rope_theta, rope_type}}")
        if rope_parameters.get("rope_type", "default") != "default":
            refuse("rope_parameters.rope_type", f"is {rope_parameters['rope_type']!r}; only 'default' is implemented")
        extra_rope_keys = set(rope_parameters) - {"rope_theta", "rope_type"}
        if extra_rope_keys:
            refuse("rope_parameters", f"has {sorted(extra_rope_keys)}; only default RoPE is implemented")

        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: raw[k] for k in known if k in raw and raw[k] is not None}
        if "rope_theta" in rope_parameters:
            values["rope_theta"] = rope_parameters["rope_theta"]
        missing = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads"} - set(values)
        if missing:
            refuse(", ".join(sorted(missing)), "missing; a Qwen2 config.json must give the model's shape")
        values.setdefault("num_key_value_heads", values["num_attention_heads"])
        for key, value in values.items():
            check_config_value(key, value, refuse)
        check_config_shape(values, refuse)
        extra = {k: v for k, v in raw.items() if k not in known}
        return cls(**values, extra=extra)

    @classmethod
    def from_json(cls, path: str) -> "Qwen2Config":
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: not found; a checkpoint directory needs config.json")
        try:
            return cls.from_dict(read_json_object(path, "config.json"), source=path)
        except CheckpointError:
            raise
        except InputError as e:  # not JSON, not UTF-8, not an object: a damaged checkpoint
            raise CheckpointError(str(e)) from None

    def to_dict(self, dtype: torch.dtype | None = None) -> dict:
        """config.json contents: the unused keys as read, then our fields. rope_theta and the dtype are
        written in both spellings (4.x top-level `rope_theta`/`torch_dtype`, 5.x `rope_parameters`/`dtype`)
        so that transformers 4.x and 5.x and vLLM all read the same model."""
        out = dict(self.extra)
        for f in fields(self):
            if f.name not in ("extra", "head_dim"):
                out[f.name] = getattr(self, f.name)
        if self.head_dim != self.hidden_size // self.num_attention_heads:
            out["head_dim"] = self.head_dim
        out.setdefault("model_type", "qwen2")
        out.setdefault("architectures", ["Qwen2ForCausalLM"])
        out.setdefault("hidden_act", "silu")
        out["rope_parameters"] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if dtype is not None:
            out["torch_dtype"] = out["dtype"] = str(dtype).removeprefix("torch.")
        return out

    @property
    def stored_dtype(self) -> torch.dtype:
        """The dtype config.json says the weights are stored in (bf16 for Qwen2.5-Math); fp32 if unsaid."""
        return DTYPES.get(self.extra.get("dtype") or self.extra.get("torch_dtype"), torch.float32)


# config.json's value checks: an impossible value (0 heads, a string for a size) would otherwise fail deep in
# the model's construction or its first forward, as a ZeroDivisionError or a TypeError.
_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings")


def check_config_value(key: str, value, refuse) -> None:
    """Refuse (refuse(key, why)) a config.json value of the wrong type or range."""
    integer = isinstance(value, int) and not isinstance(value, bool)
    if key in _POSITIVE_INTS and not (integer and value >= 1):
        refuse(key, f"is {json.dumps(value)[:40]}; it must be an integer >= 1")
    if key in ("rms_norm_eps", "rope_theta") and not (
            isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")):
        refuse(key, f"is {json.dumps(value)[:40]}; it must be a finite number > 0")
    if key == "tie_word_embeddings" and not isinstance(value, bool):
        refuse(key, f"is {json.dumps(value)[:40]}; it must be true or false")
    ids = value if isinstance(value, list) and key == "eos_token_id" else [value]
    if key in ("bos_token_id", "eos_token_id") and not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        refuse(key, f"is {json.dumps(value)[:40]}; it must be a token id (an integer >= 0)"
               + (" or a list of them" if key == "eos_token_id" else ""))


def check_config_shape(values: dict, refuse) -> None:
    """Query heads that split evenly over the key/value heads, and an even head size (RoPE rotates pairs)."""
    heads, kv_heads = values["num_attention_heads"], values["num_key_value_heads"]
    if heads % kv_heads:
        refuse("num_key_value_heads", f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads "
               f"({kv_heads})")
    head_dim = values.get("head_dim") or values["hidden_size"] // heads
    if head_dim < 2 or head_dim % 2:
        refuse("head_dim", f"is {head_dim} (hidden_size / num_attention_heads when absent); rotary embeddings "
               "rotate pairs of dimensions, so it must be even and >= 2")


# ----------------------------------------------------------------------------------------------------------
# 2. Layers


class RMSNorm(nn.Module):
    """y = w * cast(x / sqrt(mean(x^2) + eps)), normalising in fp32 and casting back to x's dtype *before*
    the weight multiplies (the order transformers uses; it matters in bf16)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_cos_sin(position_ids, head_dim: int, theta: float, dtype):
    """cos/sin of angle p * theta^(-2i/d) for i < d/2, duplicated to length d (rotate-half layout).
    Frequencies and angles in fp32 whatever the model dtype; cast to `dtype` last, as transformers does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=position_ids.device) / head_dim))
    angles = position_ids[..., None].float() * inv_freq  # [B, T, d/2]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x*cos + rotate_half(x)*sin with rotate_half([a, b]) = [-b, a]; x [B, H, T, d], cos/sin [B, T, d]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-b, a), dim=-1) * sin


class KVCache(nn.Module):
    """Static, preallocated keys and values: [slots, kv_heads, max_seq_len, head_dim], indexed by position.
    Every write goes through update() (one write path, as gpt-fast's `kv_cache.update(input_pos, k, v)`):
    a prefill writes one prompt into several slots, a decode step one token into every slot."""

    def __init__(self, slots, kv_heads, max_seq_len, head_dim, dtype, device):
        super().__init__()
        shape = (slots, kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots, positions, k, v):
        """cache[slots[i], :, positions[i, t]] = k[i, :, t] (likewise v). slots [S], positions [S, T],
        k/v [S or 1, kv_heads, T, d]: a batch of 1 is shared by every slot (a problem's prompt is prefilled
        once for its n samples). One index_put per tensor: static shapes, so it compiles and graph-captures."""
        index = (slots[:, None], slice(None), positions)  # advanced indices first: the value is [S, T, H, d]
        self.k[index] = k.transpose(1, 2).to(self.k.dtype)
        self.v[index] = v.transpose(1, 2).to(self.v.dtype)

    def keep_slots(self, index):
        """Shrink to the slots `index` (in that order): a finished batch's tail stops paying for idle rows."""
        self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)

    def read(self, group: "DecodeGroup"):
        """The keys and values a decode group attends over, its rows' first kv_len positions: a view."""
        return self.k[group.rows, :, :group.kv_len], self.v[group.rows, :, :group.kv_len]


class Attention(nn.Module):
    """Grouped-query attention: q/k/v projections with bias, o without; each group of
    num_attention_heads / num_key_value_heads query heads shares one key/value head."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                        config.head_dim)
        self.q = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=True)
        self.k = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=True)
        self.v = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=True)
        self.o = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x, cos, sin, mask=None, cache_slots=None, cache_positions=None, kv_groups=None):
        """Three uses. Training / full forward: attend over x itself (causal, or `mask`). Prefill
        (`cache_slots`, `cache_positions` [S, T]): the same, and also store k/v in those cache slots. Decode
        (`kv_groups` too, one new token per slot): store k/v at each slot's position, then let each group of
        rows attend over the cache up to its own length (DecodeGroup)."""
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache_slots is not None:
            self.cache.update(cache_slots, cache_positions, k, v)
        if kv_groups is None:
            y = self.attend(q, k, v, mask)
        else:  # the groups are runs of slots in order: their outputs, concatenated, are the rows'
            y = torch.cat([self.attend(q[g.rows], *self.cache.read(g), g.mask) for g in kv_groups])
        return self.o(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def attend(self, q, k, v, mask):
        """softmax(q k^T / sqrt(d) + mask) v: SDPA with a boolean `mask` (causal if None and T > 1), or
        FlexAttention when `mask` is a BlockMask."""
        gqa = self.n_heads != self.n_kv_heads
        if mask is not None and not isinstance(mask, torch.Tensor):  # a FlexAttention BlockMask
            return flex_attention(q, k, v, mask, gqa)
        return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
                                              is_causal=mask is None and q.shape[2] > 1, enable_gqa=gqa)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.gate = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask=None, **cache_args):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, **cache_args)
        return x + self.mlp(self.mlp_norm(x))


def document_block_mask(document_ids):
    """The same document-causal rule as a FlexAttention BlockMask: only the (query block, key block) tiles
    that hold allowed pairs are computed, so packed attention costs sum(len_i^2) rather than T^2 and no
    dense [T, T] mask is ever built. The CUDA path for packed training rows."""
    from torch.nn.attention.flex_attention import create_block_mask

    def document_causal(b, h, q, kv):
        return (kv <= q) & (document_ids[b, q] == document_ids[b, kv])

    B, T = document_ids.shape
    return create_block_mask(document_causal, B, None, T, T, device=document_ids.device)


@dataclass
class DecodeGroup:
    """Neighbouring rows of a decode step that attend together: `rows` (a slice of slots) over the cache's
    first `kv_len` positions, `mask` hiding each row's positions past its own (a boolean [rows, 1, 1, kv_len],
    a FlexAttention BlockMask, or None when every row sees all kv_len)."""
    rows: slice
    kv_len: int
    mask: object


# One more attention call, priced in key positions read (one row, one layer). On the 2-core CPU VM an SDPA call
# alone costs ~55 us and a position ~0.5 us, but a run's slices, mask and concatenation cost more, the more so
# under load: split into 45 runs (at a price of 128), an all-short batch of 64 took 1.4x one run's time
# (2026-12-05), so a run must save thousands of positions. On a GPU a call's launches (~15 us) buy tens of
# thousands of positions (1 KiB each at the 1.5B shape in bf16, ~3 TB/s): an estimate, not measured.
RUN_COST = {"cpu": 4096, "cuda": 32768}


def slot_runs(lengths: list[int], run_cost: float) -> list[tuple[int, int]]:
    """Split the slots 0..n-1 into runs of neighbours [start, end), each to attend over its longest row's
    length through a view of the cache (nothing copied), minimising what the step reads plus `run_cost` per
    run:  best[j] = min_i best[i] + (j - i) * max(lengths[i:j]) + run_cost  (dynamic programming, O(n^2)).
    One long row among short ones becomes a run of its own, so the others no longer read its length; rows
    of similar lengths stay one run. run_cost = inf: one run, every row over the longest (the step before
    runs existed)."""
    n = len(lengths)
    if run_cost == math.inf:
        return [(0, n)]
    best, cut = [0.0] + [math.inf] * n, [0] * (n + 1)
    for end in range(1, n + 1):
        longest = 0
        for start in range(end - 1, -1, -1):
            longest = max(longest, lengths[start])
            if (end - start) * longest + run_cost >= best[end]:
                break  # an earlier start only makes this run dearer; best[start] >= 0 cannot win it back
            cost = best[start] + (end - start) * longest + run_cost
            if cost < best[end]:
                best[end], cut[end] = cost, start
    runs, end = [], n
    while end:
        runs.append((cut[end], end))
        end = cut[end]
    return runs[::-1]


def decode_block_mask(positions, kv_len: int, block: int = 128):
    """A FlexAttention BlockMask for one query per row, row b at positions[b], over kv_len cache positions:
    row b sees positions 0..positions[b]. Built from block counts (static shapes and no mask evaluation
    over the cache, so it lives inside a compiled CUDA-graph step): row b lists its first
    positions[b] // block + 1 key blocks and the kernel skips the rest, so a step reads Σ_b (p_b + 1) keys
    rounded up to blocks, not B * kv_len; the mask_mod trims each row's last block. (gpt-fast decodes
    through a block mask too, with one position for the whole batch: generate.py, model_forward.)"""
    from torch.nn.attention.flex_attention import BlockMask

    B, num_blocks = positions.shape[0], -(-kv_len // block)
    kv_num_blocks = (positions // block + 1).to(torch.int32).view(B, 1, 1)
    kv_indices = torch.arange(num_blocks, dtype=torch.int32, device=positions.device).repeat(B, 1, 1, 1)

    def up_to_own_position(b, h, q, kv):
        return kv <= positions[b]

    return BlockMask.from_kv_blocks(kv_num_blocks, kv_indices, BLOCK_SIZE=block, mask_mod=up_to_own_position,
                                    seq_lengths=(1, kv_len), compute_q_blocks=False)


_compiled_flex_attention = None


def flex_attention(q, k, v, block_mask, enable_gqa):
    """FlexAttention, compiled once (uncompiled it materialises the scores and is only a reference)."""
    global _compiled_flex_attention
    from torch.nn.attention import flex_attention as flex

    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex.flex_attention, dynamic=False)
    return _compiled_flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


def document_causal_mask(document_ids):
    """mask[b, 0, i, j] = (j <= i) and doc[b, i] == doc[b, j]: token i sees the earlier tokens of its own
    document only. A dense [B, 1, T, T] boolean (the simple path, used on CPU and in tests)."""
    T = document_ids.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()
    same_document = document_ids[:, :, None] == document_ids[:, None, :]
    return (causal & same_document).unsqueeze(1)


# ----------------------------------------------------------------------------------------------------------
# 3. The model


class Qwen2(nn.Module):
    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # A tied model has no lm_head module at all: the embedding matrix is the output projection.
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size,
                                                                         bias=False)
        self.gradient_checkpointing = False
        # Packed rows: "flex" (FlexAttention block mask, default on CUDA) or "dense" (a [T, T] boolean mask
        # through SDPA; CPU, where FlexAttention has no backward, and the reference in tests).
        self.packed_attention = "auto"
        self.source_dir: str | None = None  # where from_pretrained read it; save_pretrained copies tokenizer files
        self.rope_table = None  # (cos, sin) of every KV-cache position, made by setup_cache

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The [vocab, hidden] output projection (the embedding matrix when tied)."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None):
        """Random initialisation as transformers does it: N(0, std) matrices, zero biases, unit norms."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        return self

    def training_flops(self, doc_lengths) -> float:
        """Training FLOPs of a batch of documents of n_i tokens: Σ_i n_i · flops_per_token(n_i), with N
        counted once (num_params walks every parameter)."""
        per_token = self.flops_per_token(0)
        per_context_token = self.flops_per_token(1) - per_token
        return sum(n * (per_token + per_context_token * n) for n in doc_lengths)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, context_len: int) -> float:
        """Training FLOPs per token, forward + backward: 6N for the matrix multiplies (N without the
        embedding, which is a lookup) plus 12 * layers * heads * head_dim * context for attention scores and
        values (the PaLM / nanoGPT estimate, not halved for causality)."""
        c = self.config
        n = self.num_params() - self.embed.weight.numel() * (self.lm_head is not None)
        return 6 * n + 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * context_len

    # --- training / full forward ---

    def forward(self, input_ids, position_ids=None, document_ids=None, return_hidden=False):
        """input_ids [B, T] -> logits [B, T, vocab], or with return_hidden the final normed hidden states
        [B, T, hidden] (losses then compute log-probs chunk by chunk instead of holding T x vocab logits).
        Packed rows pass position_ids (restarting per document) and document_ids (for the mask)."""
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        mask = None if document_ids is None else self.packed_mask(document_ids)
        x = self.embed(input_ids)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        for block in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # Keep only each block's input; recompute its activations during backward.
                x = checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask)
        x = self.norm(x)
        return x if return_hidden else F.linear(x, self.lm_head_weight)

    def packed_mask(self, document_ids):
        impl = self.packed_attention
        if impl == "auto":
            impl = "flex" if document_ids.is_cuda else "dense"
        return document_block_mask(document_ids) if impl == "flex" else document_causal_mask(document_ids)

    # --- inference with a static KV cache ---

    def setup_cache(self, slots: int, max_seq_len: int, dtype=None, device=None):
        """Allocate a KV cache of `slots` rows x `max_seq_len` positions in every layer (replacing any)."""
        p = self.embed.weight
        c = self.config
        dtype, device = dtype or p.dtype, device or p.device
        for block in self.layers:
            block.attn.cache = KVCache(slots, c.num_key_value_heads, max_seq_len, c.head_dim, dtype, device)
        # cos/sin of every cache position, computed once; decode steps index it (same values, same ops
        # as rope_cos_sin, so cached and full forwards agree bit for bit).
        self.rope_table = rope_cos_sin(torch.arange(max_seq_len, device=device), c.head_dim, c.rope_theta, dtype)

    def free_cache(self):
        for block in self.layers:
            block.attn.cache = None
        self.rope_table = None

    def copy_prompt(self, source_slot: int, slots, length: int):
        """Copy positions 0..length-1 of `source_slot` into every slot of `slots` in every layer: the state a
        prefill of that prompt leaves, without recomputing it (the sampler admits a problem's n samples as
        slots free up, yet prefills its prompt once)."""
        device = self.embed.weight.device
        slots = torch.as_tensor(slots, device=device).view(-1)
        positions = torch.arange(length, device=device).expand(len(slots), length)
        for block in self.layers:
            cache = block.attn.cache
            # clone: the source may be among the destinations; a write must not read what it overwrites
            k, v = (t[source_slot:source_slot + 1, :, :length].clone() for t in (cache.k, cache.v))
            cache.update(slots, positions, k, v)

    def keep_cache_slots(self, keep):
        """Shrink every layer's cache to the slots `keep`, in that order; slot i is then keep[i]."""
        index = torch.as_tensor(keep, device=self.embed.weight.device).view(-1)
        for block in self.layers:
            block.attn.cache.keep_slots(index)

    @torch.no_grad()
    def prefill(self, prompt_ids, slots):
        """Run one prompt (1-D token ids, positions 0..T-1) causally, store its keys/values in every slot of
        `slots`, and return the logits of its last token [vocab] (shared by those slots' first samples)."""
        prompt_ids = torch.as_tensor(prompt_ids, device=self.embed.weight.device).view(1, -1)
        slots = torch.as_tensor(slots, device=prompt_ids.device).view(-1)
        T = prompt_ids.shape[1]
        if T > self.layers[0].attn.cache.k.shape[2]:
            raise ValueError(f"prompt of {T} tokens does not fit the KV cache")
        x = self.embed(prompt_ids)
        cos, sin = self.rope_table[0][None, :T], self.rope_table[1][None, :T]  # positions 0..T-1
        positions = torch.arange(T, device=x.device).expand(len(slots), T)
        for block in self.layers:
            x = block(x, cos, sin, cache_slots=slots, cache_positions=positions)
        return F.linear(self.norm(x[:, -1]), self.lm_head_weight)[0]

    @torch.no_grad()
    def decode_step(self, tokens, positions, run_cost: float | None = None):
        """One new token per cache slot: tokens [slots] at positions [slots] (each slot's own position).
        Returns logits [slots, vocab]. Row i attends over its own positions 0..positions[i]; the rows attend
        in runs of neighbouring slots (slot_runs), each over a view of the cache up to its longest row, so
        one long row among short ones no longer makes every row read its length. run_cost: RUN_COST of the
        device unless given (inf: one run). Shapes follow the runs, so this is the eager step;
        static_decode_step is the compiled one."""
        lengths = [p + 1 for p in positions.tolist()]
        run_cost = RUN_COST.get(tokens.device.type, RUN_COST["cuda"]) if run_cost is None else run_cost
        groups = []
        for start, end in slot_runs(lengths, run_cost):
            kv_len, mask = max(lengths[start:end]), None  # rows of one length see every position up to kv_len
            if min(lengths[start:end]) < kv_len:
                mask = (torch.arange(kv_len, device=tokens.device) <= positions[start:end, None])[:, None, None, :]
            groups.append(DecodeGroup(slice(start, end), kv_len, mask))
        return self.decode_over(tokens, positions, groups)

    @torch.no_grad()
    def static_decode_step(self, tokens, positions):
        """decode_step with shapes that depend on the slot count alone, for torch.compile and CUDA graphs: one
        group of every row over the whole cache, whose FlexAttention block mask (decode_block_mask) skips
        the key blocks past each row's position, so each row still reads only its own length."""
        kv_len = self.layers[0].attn.cache.k.shape[2]
        return self.decode_over(tokens, positions, [DecodeGroup(slice(None), kv_len,
                                                                decode_block_mask(positions, kv_len))])

    def decode_over(self, tokens, positions, groups: list[DecodeGroup]):
        """The decode forward: write each slot's new k/v at its position, attend each group over the cache."""
        x = self.embed(tokens[:, None])
        cos, sin = self.rope_table[0][positions, None], self.rope_table[1][positions, None]  # [slots, 1, d]
        slots = torch.arange(len(tokens), device=tokens.device)
        for block in self.layers:
            x = block(x, cos, sin, cache_slots=slots, cache_positions=positions[:, None], kv_groups=groups)
        return F.linear(self.norm(x[:, 0]), self.lm_head_weight)

    def compiled_decode_step(self):
        """static_decode_step through torch.compile, made once per model. dynamic=False: one graph per slot
        count, kept to powers of two by the sampler (the cache shrinks by halves), so a run compiles a
        handful of graphs (the recompile limit is raised anyway: past it dynamo would silently run eager).
        On CUDA, mode="reduce-overhead" replays each graph as a CUDA graph: one launch per token instead of
        hundreds."""
        if getattr(self, "_compiled_decode_step", None) is None:
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            mode = "reduce-overhead" if self.embed.weight.is_cuda else None
            self._compiled_decode_step = torch.compile(self.static_decode_step, mode=mode, dynamic=False,
                                                       fullgraph=True)
        return self._compiled_decode_step

    # --- checkpoints (section 4) ---

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu", **config_overrides) -> "Qwen2":
        """config_overrides: config.json fields to replace for this model (and in every config.json it saves)."""
        return load_pretrained(cls, path, dtype, device, config_overrides)

    def save_pretrained(self, path, generation_config: dict | None = None, dtype: torch.dtype | None = None,
                        eos_token: str | None = None, max_shard_bytes: int = 5 * 2**30):
        save_pretrained(self, path, generation_config, dtype, eos_token, max_shard_bytes)


# ----------------------------------------------------------------------------------------------------------
# 4. Checkpoints: Hugging Face tensor names, loading and saving

# Our parameter name -> transformers' name. "{}" is the layer index.
HF_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "layers.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "layers.{}.attn.q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "layers.{}.attn.q.bias": "model.layers.{}.self_attn.q_proj.bias",
    "layers.{}.attn.k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "layers.{}.attn.k.bias": "model.layers.{}.self_attn.k_proj.bias",
    "layers.{}.attn.v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "layers.{}.attn.v.bias": "model.layers.{}.self_attn.v_proj.bias",
    "layers.{}.attn.o.weight": "model.layers.{}.self_attn.o_proj.weight",
    "layers.{}.mlp_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "layers.{}.mlp.gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "layers.{}.mlp.up.weight": "model.layers.{}.mlp.up_proj.weight",
    "layers.{}.mlp.down.weight": "model.layers.{}.mlp.down_proj.weight",
}
FROM_HF = {hf: ours for ours, hf in HF_NAMES.items()}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")


def _split_layer(name: str):
    """'model.layers.3.mlp.up_proj.weight' -> ('model.layers.{}.mlp.up_proj.weight', '3')."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i] + ["{}"] + parts[i + 1:]), part
    return name, None


def to_hf_name(name: str) -> str:
    template, layer = _split_layer(name)
    return HF_NAMES[template].format(layer)


def from_hf_name(name: str) -> str | None:
    template, layer = _split_layer(name)
    return FROM_HF[template].format(layer) if template in FROM_HF else None


def checkpoint_files(path) -> list[str]:
    """The safetensors files of a checkpoint: model.safetensors, or the shards named by
    model.safetensors.index.json."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # bad JSON / UTF-8, no weight_map
            raise CheckpointError(f"{index}: damaged ({type(e).__name__}: {e}); {DAMAGED_HINT}") from None
        return [os.path.join(path, name) for name in names]
    if os.path.exists(single):
        return [single]
    found = sorted(n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth")))
    hint = f" (found {found}: pickle files are not loaded; convert them to safetensors)" if found else ""
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")


DAMAGED_HINT = ("copy or download the checkpoint again, or use an earlier one (for a training run, an earlier "
                "OUT/step-N)")


def read_safetensors(file, state: dict, dtype, device) -> list[str]:
    """Read every tensor of one safetensors file into state[our name], in `dtype` on `device`; return the
    file's tensor names that are not Qwen2's. A truncated or garbage file (safetensors checks the header
    against the file size), or a tensor holding NaN or inf (a diverged run's save: nothing should train on it
    or score it), is a CheckpointError naming the file."""
    from safetensors import SafetensorError, safe_open

    unexpected = []
    try:
        with safe_open(file, framework="pt", device=str(device)) as f:
            for hf_name in f.keys():
                name = from_hf_name(hf_name)
                if name is None:
                    unexpected.append(hf_name)
                    continue
                state[name] = f.get_tensor(hf_name).to(dtype)
                # One pass without a bool copy (40x faster than isfinite().all() on CPU): NaN makes both NaN.
                if not all(bool(v.isfinite()) for v in torch.aminmax(state[name])):
                    raise CheckpointError(f"{file}: tensor {hf_name} holds NaN or inf values; the checkpoint is "
                                          "broken (a diverged run?): use an earlier one")
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing (named by the checkpoint's index); {DAMAGED_HINT}") from None
    except SafetensorError as e:
        raise CheckpointError(f"{file}: damaged or not a safetensors file ({e}); {DAMAGED_HINT}") from None
    return unexpected


def load_pretrained(cls, path, dtype, device, config_overrides=None) -> Qwen2:
    """Build the model on the meta device (no memory), read every tensor straight from safetensors onto
    `device` in `dtype`, check names and shapes strictly, then load with assign=True so the read tensors
    become the parameters: the weights exist once, never twice."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory; pass a Hugging Face checkpoint directory")
    config = Qwen2Config.from_json(os.path.join(path, "config.json"))
    for key, value in (config_overrides or {}).items():
        if key not in {f.name for f in fields(config)} - {"extra"}:
            raise TypeError(f"from_pretrained: {key!r} is not a Qwen2Config field")
        setattr(config, key, value)
    files = checkpoint_files(path)

    state, unexpected = {}, []
    for file in files:
        unexpected += read_safetensors(file, state, dtype, device)
    if "lm_head.weight" not in state:
        config.tie_word_embeddings = True  # no lm_head.weight in the files: the output projection is tied
    elif config.tie_word_embeddings:
        state.pop("lm_head.weight")  # tied: transformers ignores a stored copy, and so do we

    with torch.device("meta"):
        model = cls(config)
    expected = {name: p.shape for name, p in model.state_dict().items()}
    missing = sorted(to_hf_name(n) for n in expected.keys() - state.keys())
    unexpected += sorted(to_hf_name(n) for n in state.keys() - expected.keys())
    misshaped = [f"{to_hf_name(n)}: file {tuple(state[n].shape)}, model {tuple(s)}"
                 for n, s in expected.items() if n in state and state[n].shape != s]
    if missing or unexpected or misshaped:
        problems = [f"missing tensors: {missing}" if missing else "",
                    f"unexpected tensors: {unexpected}" if unexpected else "",
                    f"shape mismatches: {misshaped}" if misshaped else ""]
        raise CheckpointError(f"{path}: checkpoint does not match its config.json: "
                              + "; ".join(p for p in problems if p))
    model.load_state_dict(state, strict=True, assign=True)
    model.source_dir = os.path.abspath(path)
    return model.eval()


def check_vocab(config: Qwen2Config, tokenizer, where: str = "the tokenizer") -> None:
    """Refuse a tokenizer whose ids reach past the model's embedding (config.vocab_size rows): such an id
    would index past the table (an IndexError deep in a forward, or garbage on CUDA). A smaller tokenizer is
    normal (Qwen2.5 pads its 151,665 tokens to 151,936 rows). `tokenizer`: a tokenizers.Tokenizer or a
    transformers tokenizer (both have get_vocab(), added tokens included)."""
    size = max(tokenizer.get_vocab().values(), default=-1) + 1
    if size > config.vocab_size:
        raise CheckpointError(f"{where} has {size} tokens but config.json's vocab_size is {config.vocab_size}: "
                              f"token ids up to {size - 1}, while the embedding (config.json vocab_size) has "
                              f"{config.vocab_size} rows; use the tokenizer that belongs to this checkpoint")


def _shards(tensors: dict, max_shard_bytes: int) -> list[dict]:
    """Split {name: tensor} in order into shards of at most max_shard_bytes (a larger tensor alone)."""
    shards, current, current_bytes = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and current_bytes + nbytes > max_shard_bytes:
            shards.append(current)
            current, current_bytes = {}, 0
        current[name] = t
        current_bytes += nbytes
    shards.append(current)
    return shards


def _eos_token_id(tokenizer_dir, eos_token: str) -> int:
    from tokenizers import Tokenizer

    file = os.path.join(tokenizer_dir or "", "tokenizer.json")
    if not tokenizer_dir or not os.path.isfile(file):
        raise CheckpointError(f"eos_token={eos_token!r}: no tokenizer.json beside the model ({file}) to look "
                              "it up in; load the model from a checkpoint directory that has one")
    token_id = Tokenizer.from_file(file).token_to_id(eos_token)
    if token_id is None:
        raise CheckpointError(f"eos_token={eos_token!r}: not a token of {file}")
    return token_id


JSON_SETTINGS = ("tokenizer_config.json", "special_tokens_map.json")  # the tokenizer files a save rewrites


def check_tokenizer_files(source_dir) -> None:
    """The tokenizer settings a save reads and rewrites (JSON_SETTINGS; generation_config.json: data.py) must
    be JSON objects: checked when a run starts, not when it saves after all training."""
    for name in JSON_SETTINGS:
        if os.path.exists(os.path.join(source_dir, name)):
            read_json_object(os.path.join(source_dir, name), name)


def _copy_tokenizer_files(source_dir, path, eos_token: str | None) -> None:
    """Copy the source checkpoint's tokenizer files; with eos_token, set it as `eos_token` in
    tokenizer_config.json and special_tokens_map.json (their other keys kept), which AutoTokenizer reads."""
    for name in TOKENIZER_FILES:
        src = os.path.join(source_dir, name)
        if not os.path.exists(src):
            continue
        if eos_token is not None and name in JSON_SETTINGS:
            settings = read_json_object(src, name)
            write_json(os.path.join(path, name), {**settings, "eos_token": eos_token})
        elif os.path.abspath(src) != os.path.abspath(os.path.join(path, name)):
            atomic_write(os.path.join(path, name), lambda tmp, src=src: shutil.copyfile(src, tmp))


def save_pretrained(model: Qwen2, path, generation_config=None, dtype=None, eos_token=None,
                    max_shard_bytes=5 * 2**30):
    """Write a checkpoint transformers and vLLM load unchanged: config.json, transformers' tensor names in
    safetensors (a tied lm_head stored once, as the embedding), sharded with an index above max_shard_bytes,
    and the source checkpoint's tokenizer files.
      generation_config  if given, replaces the copied generation_config.json.
      dtype              the saved tensors' dtype (None: the model's); config.json's dtype/torch_dtype match.
      eos_token          the end-of-turn token the model was trained to emit: written as tokenizer_config.json's
                         eos_token and its id as config.json's eos_token_id, so tools that stop on the
                         tokenizer's or the config's EOS stop where the model ends a turn.
    Every file is written atomically; the index (or model.safetensors) comes last."""
    from safetensors.torch import save_file

    eos_token_id = None if eos_token is None else _eos_token_id(model.source_dir, eos_token)
    os.makedirs(path, exist_ok=True)
    tensors = {to_hf_name(n): t.detach().to(dtype or t.dtype).contiguous() for n, t in model.state_dict().items()}
    shards = _shards(tensors, max_shard_bytes)
    if model.source_dir:
        _copy_tokenizer_files(model.source_dir, path, eos_token)
    if generation_config is not None:
        write_json(os.path.join(path, "generation_config.json"), generation_config)
    config = model.config.to_dict(next(iter(tensors.values())).dtype)
    if eos_token_id is not None:
        config["eos_token_id"] = eos_token_id
    write_json(os.path.join(path, "config.json"), config)

    metadata = {"format": "pt"}
    if len(shards) == 1:
        atomic_write(os.path.join(path, "model.safetensors"), lambda tmp: save_file(tensors, tmp, metadata=metadata))
        stale = [os.path.join(path, "model.safetensors.index.json")]
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            shard_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            atomic_write(os.path.join(path, shard_name), lambda tmp, s=shard: save_file(s, tmp, metadata=metadata))
            weight_map.update({name: shard_name for name in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        write_json(os.path.join(path, "model.safetensors.index.json"),
                   {"metadata": {"total_size": total}, "weight_map": weight_map})
        stale = [os.path.join(path, "model.safetensors")]
    for f in stale:  # a previous save in the other layout would shadow this one
        if os.path.exists(f):
            os.remove(f)
