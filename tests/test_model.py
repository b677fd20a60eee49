"""model.py against transformers' Qwen2ForCausalLM: logits, checkpoints, KV cache, packing, errors."""

import json
import math
import os

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import data
from common import InputError
from scripts import tiny
from helpers import make_hf_model
from model import (CheckpointError, Qwen2, Qwen2Config, check_vocab, document_causal_mask, slot_runs,
                   to_hf_name)

transformers.logging.set_verbosity_error()


def save_hf(model, path, **kwargs):
    model.save_pretrained(path, **kwargs)
    return str(path)


def ids(batch=2, length=17, vocab=400, seed=1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("overrides", [
    dict(tie_word_embeddings=True, rope_theta=10000.0),
    dict(tie_word_embeddings=False, rope_theta=1000000.0),
    dict(tie_word_embeddings=False, rope_theta=500.0, num_key_value_heads=4),  # MHA
    dict(tie_word_embeddings=True, rope_theta=10000.0, num_attention_heads=8, num_key_value_heads=1,
         hidden_size=128, num_hidden_layers=3),  # 8 query heads share one KV head
])
def test_fp32_logits_match_transformers(tmp_path, overrides):
    hf = make_hf_model(**overrides)
    ours = Qwen2.from_pretrained(save_hf(hf, tmp_path))
    x = ids()
    with torch.no_grad():
        expected = hf(x).logits
        got = ours(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5


def test_bf16_logits_no_further_from_fp32_than_transformers(tmp_path):
    hf = make_hf_model(tie_word_embeddings=False)
    path = save_hf(hf, tmp_path)
    x = ids(length=32)
    with torch.no_grad():
        reference = hf(x).logits
        hf_bf16 = transformers.Qwen2ForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
        hf_error = (hf_bf16(x).logits.float() - reference).abs().max().item()
        ours_error = (Qwen2.from_pretrained(path, dtype=torch.bfloat16)(x).float() - reference).abs().max().item()
    assert ours_error <= hf_error * 1.0001 + 1e-6, (ours_error, hf_error)


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_through_our_save_reloads_in_transformers(tmp_path, tied):
    hf = make_hf_model(tie_word_embeddings=tied)
    src = save_hf(hf, tmp_path / "src")
    tiny.make_tokenizer(src)
    with open(os.path.join(src, "config.json")) as f:
        raw = json.load(f)
    raw["my_custom_key"] = {"kept": True}
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(raw, f)

    ours = Qwen2.from_pretrained(src)
    ours.save_pretrained(tmp_path / "dst")
    dst = str(tmp_path / "dst")
    reloaded = transformers.Qwen2ForCausalLM.from_pretrained(dst).eval()
    x = ids()
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, hf(x).logits)
        assert torch.equal(Qwen2.from_pretrained(dst)(x), ours(x))
    stored = load_file(os.path.join(dst, "model.safetensors"))
    assert ("lm_head.weight" in stored) == (not tied)  # a tied head is stored once, as the embedding
    assert set(stored) == set(load_file(os.path.join(src, "model.safetensors"))) - ({"lm_head.weight"} if tied else set())
    with open(os.path.join(dst, "config.json")) as f:
        assert json.load(f)["my_custom_key"] == {"kept": True}
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert os.path.exists(os.path.join(dst, name)), name
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(dst):  # readable by other users (vLLM servers) as the umask allows
        assert os.stat(os.path.join(dst, name)).st_mode & 0o777 == 0o666 & ~umask, name


def test_sharded_checkpoint_loads_and_our_sharded_save_reloads(tmp_path):
    hf = make_hf_model(tie_word_embeddings=False)
    src = save_hf(hf, tmp_path / "src", max_shard_size="60KB")
    assert os.path.exists(os.path.join(src, "model.safetensors.index.json"))
    assert not os.path.exists(os.path.join(src, "model.safetensors"))
    ours = Qwen2.from_pretrained(src)
    x = ids()
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() <= 1e-5
    ours.save_pretrained(tmp_path / "dst", max_shard_bytes=60_000)
    dst = str(tmp_path / "dst")
    with open(os.path.join(dst, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert len(set(index["weight_map"].values())) > 1
    with torch.no_grad():
        assert torch.equal(transformers.Qwen2ForCausalLM.from_pretrained(dst).eval()(x).logits, hf(x).logits)


def test_config_spellings_4x_and_5x(tmp_path):
    hf = make_hf_model(rope_theta=12345.0)
    path = save_hf(hf, tmp_path)
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    x = ids()
    with torch.no_grad():
        expected = hf(x).logits
    # transformers 4.x style: top-level rope_theta and torch_dtype, no rope_parameters.
    raw_4x = {k: v for k, v in raw.items() if k not in ("rope_parameters", "dtype")}
    raw_4x.update(rope_theta=12345.0, torch_dtype="float32", rope_scaling=None)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(raw_4x, f)
    assert Qwen2Config.from_json(os.path.join(path, "config.json")).rope_theta == 12345.0
    with torch.no_grad():
        assert (Qwen2.from_pretrained(path)(x) - expected).abs().max().item() <= 1e-5
    # transformers 5.x style: rope_parameters only.
    raw_5x = {k: v for k, v in raw.items() if k != "rope_theta"}
    raw_5x["rope_parameters"] = {"rope_theta": 12345.0, "rope_type": "default"}
    assert Qwen2Config.from_dict(raw_5x).rope_theta == 12345.0


@pytest.mark.parametrize("edit, key", [
    ({"model_type": "llama"}, "model_type"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn", "factor": 4.0}}, "rope_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_unsupported_config_is_refused_naming_the_key(edit, key):
    raw = {**tiny.tiny_config_dict(), **edit}
    with pytest.raises(CheckpointError, match=key):
        Qwen2Config.from_dict(raw)


def test_missing_and_misshaped_tensors_are_named(tmp_path):
    hf = make_hf_model(tie_word_embeddings=False)
    path = save_hf(hf, tmp_path)
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.k_proj.bias"] = torch.zeros(3)
    tensors["model.layers.0.extra.weight"] = torch.zeros(3)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        Qwen2.from_pretrained(path)
    message = str(err.value)
    assert "model.layers.1.mlp.up_proj.weight" in message
    assert "model.layers.0.self_attn.k_proj.bias" in message and "(3,)" in message
    assert "model.layers.0.extra.weight" in message


def test_checkpoint_without_lm_head_is_tied(tmp_path):
    hf = make_hf_model(tie_word_embeddings=True)
    path = save_hf(hf, tmp_path)
    assert "lm_head.weight" not in load_file(os.path.join(path, "model.safetensors"))
    ours = Qwen2.from_pretrained(path)
    assert ours.lm_head is None and ours.lm_head_weight is ours.embed.weight


def test_config_overrides_apply_at_load_and_unknown_keys_are_refused(tmp_path):
    path = tiny.make_checkpoint(tmp_path / "ckpt")
    model = Qwen2.from_pretrained(path, rope_theta=300000.0, max_position_embeddings=4096)
    assert (model.config.rope_theta, model.config.max_position_embeddings) == (300000.0, 4096)
    with pytest.raises(TypeError, match="rope_thetta"):
        Qwen2.from_pretrained(path, rope_thetta=300000.0)


def test_pickle_checkpoints_are_not_loaded(tmp_path):
    hf = make_hf_model()
    path = save_hf(hf, tmp_path)
    os.remove(os.path.join(path, "model.safetensors"))
    torch.save(hf.state_dict(), os.path.join(path, "pytorch_model.bin"))
    with pytest.raises(CheckpointError, match="pickle"):
        Qwen2.from_pretrained(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_weights_are_refused_naming_the_tensor(tmp_path, bad):
    """A diverged run's save must not be trained on or scored: one bad entry anywhere is enough."""
    path = save_hf(make_hf_model(), tmp_path)
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    tensors["model.layers.1.mlp.up_proj.weight"][2, 3] = bad
    save_file(tensors, file, metadata={"format": "pt"})
    for dtype in (torch.float32, torch.bfloat16):
        with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor model\.layers\.1\.mlp\.up_proj\.weight "
                                                  "holds NaN or inf"):
            Qwen2.from_pretrained(path, dtype=dtype)


def test_loaded_weights_are_the_file_tensors_not_copies(tmp_path):
    """assign=True: parameters are the tensors read from safetensors, and nothing remains on meta."""
    path = save_hf(make_hf_model(), tmp_path)
    ours = Qwen2.from_pretrained(path, dtype=torch.bfloat16)
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in ours.parameters())
    assert not any(b.is_meta for b in ours.buffers())


@pytest.mark.parametrize("step", ["default", "runs", "per_row", "one_run", "static"])
def test_kv_cache_decode_equals_full_forward_for_ragged_prompts(tmp_path, step):
    """Every decode path against transformers' full forward: the eager step as configured, rows in runs of
    neighbouring slots (a small run_cost: the long row is a run of its own, the short rows before it one run
    with a mask), every row alone, every row in one run over the longest length (the step before runs), and
    the compiled step's static shapes (FlexAttention block mask over the whole cache; run uncompiled here but
    for flex_attention)."""
    hf = make_hf_model(tie_word_embeddings=False)
    model = Qwen2.from_pretrained(save_hf(hf, tmp_path))
    decode = {"default": model.decode_step, "runs": lambda t, p: model.decode_step(t, p, run_cost=64),
              "per_row": lambda t, p: model.decode_step(t, p, run_cost=0),
              "one_run": lambda t, p: model.decode_step(t, p, run_cost=math.inf),
              "static": model.static_decode_step}[step]
    seqs = [ids(1, n, seed=n)[0] for n in (5, 9, 13, 300, 4)]  # rows of different lengths, one long
    prompt_lens = [2, 6, 1, 290, 3]
    model.setup_cache(slots=5, max_seq_len=320)  # 3 key blocks of 128: the short rows' block mask lists 1
    with torch.no_grad():
        for slot, (s, p) in enumerate(zip(seqs, prompt_lens)):
            last = model.prefill(s[:p], [slot])
            assert torch.allclose(last, model(s[None, :p])[0, -1], atol=1e-5)
        steps = max(len(s) - p for s, p in zip(seqs, prompt_lens))
        for t in range(steps):
            positions = torch.tensor([min(p + t, len(s) - 1) for s, p in zip(seqs, prompt_lens)])
            tokens = torch.stack([s[pos] for s, pos in zip(seqs, positions)])
            logits = decode(tokens, positions)
            for slot, (s, p) in enumerate(zip(seqs, prompt_lens)):
                if p + t < len(s):
                    full = hf(s[None, : p + t + 1]).logits[0, -1]
                    assert (logits[slot] - full).abs().max().item() <= 1e-5, (slot, t)


def test_slot_runs_minimise_reads_plus_calls():
    cost = lambda lengths, runs, run_cost: sum((e - b) * max(lengths[b:e]) + run_cost for b, e in runs)
    lengths = [200, 180, 12000, 150, 190, 210]
    assert slot_runs(lengths, 128) == [(0, 2), (2, 3), (3, 6)]  # the long row alone: 13,414 read, not 72,768
    assert slot_runs(lengths, math.inf) == [(0, 6)]  # one run: every row reads 12,000
    assert cost(lengths, slot_runs(lengths, 0), 0) == sum(lengths)  # free calls: each row reads its own length
    g = torch.Generator().manual_seed(0)
    for trial in range(20):  # the dynamic programme against every split of 8 slots into runs
        lengths = torch.randint(1, 3000, (8,), generator=g).tolist()
        run_cost = [0, 100, 5000][trial % 3]
        splits = [[b for b in range(1, 8) if mask >> b & 1] for mask in range(0, 256, 2)]
        brute = min(cost(lengths, list(zip([0] + cut, cut + [8])), run_cost) for cut in splits)
        runs = slot_runs(lengths, run_cost)
        assert [b for b, _ in runs] == [0] + [e for _, e in runs[:-1]] and runs[-1][1] == 8
        assert cost(lengths, runs, run_cost) == brute


def test_prefill_shares_one_prompt_across_slots(tmp_path):
    model = Qwen2.from_pretrained(save_hf(make_hf_model(), tmp_path))
    model.setup_cache(slots=4, max_seq_len=16)
    prompt = ids(1, 7)[0]
    model.prefill(prompt, [1, 3])
    cache = model.layers[0].attn.cache
    assert torch.equal(cache.k[1, :, :7], cache.k[3, :, :7]) and cache.k[1, :, :7].abs().sum() > 0
    assert cache.k[0].abs().sum() == 0 and cache.k[2].abs().sum() == 0


def test_packed_documents_equal_separate_forwards(tmp_path):
    hf = make_hf_model()
    model = Qwen2.from_pretrained(save_hf(hf, tmp_path))
    docs = [ids(1, n, seed=n)[0] for n in (4, 9, 6)]
    input_ids = torch.cat(docs)[None]
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
    document_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    with torch.no_grad():
        packed = model(input_ids, position_ids=position_ids, document_ids=document_ids)
        start = 0
        for d in docs:
            separate = hf(d[None]).logits[0]
            assert (packed[0, start:start + len(d)] - separate).abs().max().item() <= 1e-5
            start += len(d)


def test_document_causal_mask():
    mask = document_causal_mask(torch.tensor([[0, 0, 1, 1, 1]]))[0, 0]
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]])
    assert torch.equal(mask, expected.bool())


def test_hidden_output_and_gradient_checkpointing_give_same_gradients(tmp_path):
    model = Qwen2.from_pretrained(save_hf(make_hf_model(tie_word_embeddings=False), tmp_path)).train()
    x = ids()
    hidden = model(x, return_hidden=True)
    assert torch.allclose(hidden @ model.lm_head_weight.T, model(x), atol=1e-5)

    def grads(checkpointing):
        model.zero_grad()
        model.gradient_checkpointing = checkpointing
        model(x).float().logsumexp(-1).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, checkpointed = grads(False), grads(True)
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), name


def test_flex_attention_packed_forward_equals_dense(tmp_path):
    """The CUDA packed path (FlexAttention block mask) against the dense mask, forward only: FlexAttention
    has no backward on CPU, the backward is exercised on GPU by bench.py."""
    model = Qwen2.from_pretrained(save_hf(make_hf_model(), tmp_path))
    lengths = [40, 90, 30]
    input_ids = torch.cat([ids(1, n, seed=n)[0] for n in lengths])[None]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    document_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    with torch.no_grad():
        model.packed_attention = "dense"
        dense = model(input_ids, position_ids, document_ids)
        model.packed_attention = "flex"
        flex = model(input_ids, position_ids, document_ids)
    assert (flex - dense).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------------------------------------
# Damaged files, vocabulary check, saving in another dtype with the end-of-turn EOS (issues 13, 14, 16)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_safetensors_is_a_checkpoint_error_naming_the_file(tmp_path, damage):
    path = tiny.make_checkpoint(tmp_path / "ckpt")
    file = os.path.join(path, "model.safetensors")
    data = open(file, "rb").read()
    damaged = {"truncated": data[: len(data) // 2], "garbage": os.urandom(4096), "empty": b""}[damage]
    with open(file, "wb") as f:
        f.write(damaged)
    with pytest.raises(CheckpointError) as err:
        Qwen2.from_pretrained(path)
    assert isinstance(err.value, InputError)  # one line and exit 2 from every command line
    assert file in str(err.value) and "earlier" in str(err.value)


def test_missing_shard_and_damaged_index_are_checkpoint_errors(tmp_path):
    hf = make_hf_model(tie_word_embeddings=False)
    path = save_hf(hf, tmp_path, max_shard_size="60KB")
    index = os.path.join(path, "model.safetensors.index.json")
    shard = sorted(set(json.load(open(index))["weight_map"].values()))[-1]
    os.remove(os.path.join(path, shard))
    with pytest.raises(CheckpointError, match=shard):
        Qwen2.from_pretrained(path)
    with open(index, "w") as f:
        f.write('{"weight_map": {"model.embed')
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: damaged"):
        Qwen2.from_pretrained(path)


def test_check_vocab_refuses_a_tokenizer_larger_than_the_embedding(tmp_path):
    path = tiny.make_checkpoint(tmp_path, vocab_size=400)
    tokenizer = data.load_tokenizer(path)
    size = tokenizer.get_vocab_size()
    config = Qwen2Config.from_json(os.path.join(path, "config.json"))
    check_vocab(config, tokenizer)  # 400 rows hold every id
    check_vocab(Qwen2Config.from_dict(tiny.tiny_config_dict(vocab_size=size)), tokenizer)  # exactly enough
    with pytest.raises(CheckpointError, match=f"token ids up to {size - 1}.*vocab_size\\) has {size - 1}"):
        check_vocab(Qwen2Config.from_dict(tiny.tiny_config_dict(vocab_size=size - 1)), tokenizer, where=path)
    with pytest.raises(CheckpointError, match="has 100 rows"):  # a transformers tokenizer works the same
        check_vocab(Qwen2Config.from_dict(tiny.tiny_config_dict(vocab_size=100)),
                    transformers.AutoTokenizer.from_pretrained(path))


def test_bf16_save_with_end_of_turn_eos_reloads_in_transformers(tmp_path):
    """Issue 13: save_pretrained(dtype=bf16, eos_token=...) writes bf16 tensors and config dtype, and the
    end-of-turn token as the tokenizer's EOS and config.json's eos_token_id; other tokenizer keys kept."""
    src = tiny.make_checkpoint(tmp_path / "src", seed=1)
    with open(os.path.join(src, "tokenizer_config.json")) as f:
        settings = json.load(f)
    with open(os.path.join(src, "tokenizer_config.json"), "w") as f:  # a base model's EOS, as Qwen2.5's
        json.dump({**settings, "eos_token": "<|endoftext|>"}, f)
    assert transformers.AutoTokenizer.from_pretrained(src).eos_token_id == 0
    ours = Qwen2.from_pretrained(src)  # fp32 in memory
    dst = str(tmp_path / "dst")
    ours.save_pretrained(dst, dtype=torch.bfloat16, eos_token="<|im_end|>")
    end_of_turn = tiny.SPECIAL_TOKENS.index("<|im_end|>")

    stored = load_file(os.path.join(dst, "model.safetensors"))
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    assert config["dtype"] == config["torch_dtype"] == "bfloat16" and config["eos_token_id"] == end_of_turn
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(dst, dtype="auto")
    assert reloaded.dtype == torch.bfloat16
    expected = {to_hf_name(n): t.to(torch.bfloat16) for n, t in ours.state_dict().items()}
    assert all(torch.equal(stored[name], t) for name, t in expected.items())  # a plain cast, nothing else

    tokenizer = transformers.AutoTokenizer.from_pretrained(dst)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == end_of_turn
    with open(os.path.join(dst, "tokenizer_config.json")) as f:
        settings = json.load(f)
    with open(os.path.join(src, "tokenizer_config.json")) as f:
        assert settings == {**json.load(f), "eos_token": "<|im_end|>"}
    # Without dtype the model's own dtype is kept (fp32 here), as before.
    ours.save_pretrained(tmp_path / "fp32")
    assert load_file(os.path.join(tmp_path / "fp32", "model.safetensors"))["model.norm.weight"].dtype == torch.float32


def test_unknown_eos_token_is_refused_before_anything_is_written(tmp_path):
    ours = Qwen2.from_pretrained(tiny.make_checkpoint(tmp_path / "src"))
    with pytest.raises(CheckpointError, match="not a token of"):
        ours.save_pretrained(tmp_path / "dst", eos_token="<|no_such_token|>")
    assert not os.path.exists(tmp_path / "dst")


def test_make_checkpoint_is_seeded_randomised_and_loads_everywhere(tmp_path):
    a = tiny.make_checkpoint(tmp_path / "a", seed=3, dtype=torch.bfloat16, hidden_size=32,
                             intermediate_size=48, num_hidden_layers=1)
    b = tiny.make_checkpoint(tmp_path / "b", seed=3, dtype=torch.bfloat16, hidden_size=32,
                             intermediate_size=48, num_hidden_layers=1)
    c = tiny.make_checkpoint(tmp_path / "c", seed=4, dtype=torch.bfloat16, hidden_size=32,
                             intermediate_size=48, num_hidden_layers=1)
    ta, tb, tc = (load_file(os.path.join(p, "model.safetensors")) for p in (a, b, c))
    assert all(torch.equal(ta[n], tb[n]) for n in ta) and not torch.equal(ta["model.norm.weight"],
                                                                           tc["model.norm.weight"])
    assert ta["model.embed_tokens.weight"].dtype == torch.bfloat16 and ta["model.norm.weight"].shape == (32,)
    bias = ta["model.layers.0.self_attn.q_proj.bias"].float()
    norm = ta["model.layers.0.input_layernorm.weight"].float()
    assert bias.std() > 0.2 and (norm != 1).all() and norm.min() >= 0.5 and norm.max() <= 1.5
    hf = transformers.AutoModelForCausalLM.from_pretrained(a, dtype=torch.float32).eval()
    x = ids()
    with torch.no_grad():
        assert (Qwen2.from_pretrained(a)(x) - hf(x).logits).abs().max().item() <= 1e-5
    assert transformers.AutoTokenizer.from_pretrained(a).eos_token == "<|im_end|>"
