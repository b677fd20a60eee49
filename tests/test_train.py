"""train.py end to end on CPU (gloo), with a tiny random checkpoint and synthetic data made here.

What each group of tests proves:
  - 2 processes (DDP) = 1 process with gradient accumulation at the same global batch, for sft (with a short
    last batch that leaves one rank without examples), redi and weighted (groups of unequal size); FSDP2 = DDP.
    The micro-batches differ between the runs, so a per-micro-batch normalisation would fail these.
  - The first logged loss of every stage equals the paper's formula computed straightforwardly from
    transformers' logits of each sequence alone (no packing, no chunking): the wiring of chosen/rejected,
    normalisers, α, β, γ and advantages.
  - SFT memorises a small set; every stage's output loads in transformers and gives finite logits.
  - Resume reproduces the uninterrupted run; DPO's reference cache is reused on resume, recomputed when stale,
    and matches transformers; a DPO run from another model writes its own table and the first run still resumes;
    two ranks build the token cache once (rank 0) and train as from an existing cache; an interrupted save leaves the previous checkpoint; a non-finite loss stops the
    run with the last good checkpoint kept; bad input fails before any compute with a message naming the flag.

Single-process runs call train.main in-process (fast); multi-process runs go through torchrun as users run it.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
import data  # noqa: E402
from common import InputError  # noqa: E402
from scripts import tiny  # noqa: E402
import train  # noqa: E402

transformers.logging.set_verbosity_error()
SEED = train.build_parser().get_default("seed")  # the runs below leave --seed at its default (the paper's 42)


# --------------------------------------------------------------------------------------------- fixtures


def problem(i):
    return f"What is {i} + {i + 3}?"


def solution(i, correct=True):
    answer = 2 * i + 3 if correct else 2 * i + 4
    return f"{i} + {i + 3} = {answer}. The answer is \\boxed{{{answer}}}."


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


class Workspace:
    """A tiny checkpoint, one data file per format, and the runs made so far (each made once per module)."""

    def __init__(self, root: Path):
        self.root = root
        self.model = str(root / "ckpt")
        torch.manual_seed(0)
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**tiny.tiny_config_dict()))
        hf.save_pretrained(self.model)
        tiny.make_tokenizer(self.model)
        system = {"role": "system", "content": "Please reason step by step."}
        # 13 rows at batch 4: the 4th batch of each epoch holds one example, so on 2 ranks rank 1 gets none.
        self.sft = write_jsonl(root / "sft.jsonl", [
            {"messages": [system, {"role": "user", "content": problem(i)},
                          {"role": "assistant", "content": solution(i)}]} for i in range(13)])
        self.pairs = write_jsonl(root / "pairs.jsonl", [
            {"prompt": [{"role": "user", "content": problem(i)}], "chosen": solution(i),
             "rejected": solution(i, False) + " Maybe."} for i in range(10)])
        sizes_and_rewards = [[1.0, 0.0, 0.0], [1.0, 0.0], [1.0, 1.0, 0.0, 0.5], [0.0, 1.0, 0.0], [1.0, 0.0],
                             [0.0, 0.0, 1.0]]
        self.groups = write_jsonl(root / "groups.jsonl", [
            {"prompt": [{"role": "user", "content": problem(i)}],
             "completions": [solution(i + k, correct=k % 2 == 0) for k in range(len(rewards))],
             "rewards": rewards} for i, rewards in enumerate(sizes_and_rewards)])
        self.outs = {}

    def out(self, name):
        return str(self.root / name)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    # One thread, as the torchrun workers get (OMP_NUM_THREADS=1): tiny matrices gain nothing from more, and
    # on a shared CPU extra threads only wait for each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Workspace(tmp_path_factory.mktemp("train"))
    torch.set_num_threads(threads)


def run_inprocess(args):
    train.main([str(a) for a in args])


def run_torchrun(args, nproc=2):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "train.py", *map(str, args)]
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def sft_args(ws):
    return ["--stage", "sft", "--model", ws.model, "--data", ws.sft, "--batch-size", 4, "--epochs", 2,
            "--max-steps", 6, "--lr", 1e-3]


def redi_args(ws):  # 10 pairs at batch 4: batches of 4, 4, 2 per epoch
    return ["--stage", "redi", "--model", ws.model, "--data", ws.pairs, "--batch-size", 4, "--epochs", 2,
            "--lr", 1e-3]


def dpo_args(ws):
    return ["--stage", "dpo", "--model", ws.model, "--data", ws.pairs, "--batch-size", 4, "--epochs", 2,
            "--lr", 1e-3]


def weighted_args(ws):  # groups of 2 to 4 completions; batch 2 prompts
    return ["--stage", "weighted", "--model", ws.model, "--data", ws.groups, "--batch-size", 2, "--epochs", 2,
            "--lr", 1e-3]


RUNS = {
    # name: (args, number of processes)
    "sft-1": (lambda ws: sft_args(ws) + ["--micro-batch-size", 2, "--save-every", 3], 1),
    "sft-ddp": (lambda ws: sft_args(ws) + ["--micro-batch-size", 1], 2),
    "sft-fsdp": (lambda ws: sft_args(ws) + ["--micro-batch-size", 1, "--fsdp", "--save-every", 3], 2),
    "redi-1": (lambda ws: redi_args(ws) + ["--micro-batch-size", 2], 1),
    "redi-ddp": (lambda ws: redi_args(ws) + ["--micro-batch-size", 1], 2),
    "weighted-1": (lambda ws: weighted_args(ws) + ["--micro-batch-size", 1, "--grad-checkpointing"], 1),
    "weighted-ddp": (lambda ws: weighted_args(ws) + ["--micro-batch-size", 1], 2),
    "dpo-1": (lambda ws: dpo_args(ws) + ["--micro-batch-size", 2, "--save-every", 3], 1),
    "simpo-1": (lambda ws: ["--stage", "simpo", "--model", ws.model, "--data", ws.pairs, "--batch-size", 4,
                            "--micro-batch-size", 2, "--lr", 1e-3], 1),
}


def get_run(ws, name):
    """Run a configuration of RUNS once per module; return its output directory."""
    if name not in ws.outs:
        make_args, nproc = RUNS[name]
        args = make_args(ws) + ["--out", ws.out(name)]
        run_inprocess(args) if nproc == 1 else run_torchrun(args, nproc)
        ws.outs[name] = ws.out(name)
    return ws.outs[name]


def weights_file(out):
    return os.path.join(out, "model.safetensors")


def weights(out):
    return load_file(weights_file(out))


def rel_diff(a, b):
    """||a - b|| / ||b|| over all tensors of two state dicts."""
    assert a.keys() == b.keys()
    num = sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a)
    den = sum((b[k].double() ** 2).sum() for k in b)
    return math.sqrt(num / den)


def metrics(out):
    with open(os.path.join(out, train.METRICS_FILE)) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------- 2 processes = 1 process (DDP, FSDP)


@pytest.mark.parametrize("one, ddp", [("sft-1", "sft-ddp"), ("redi-1", "redi-ddp"),
                                      ("weighted-1", "weighted-ddp")])
def test_two_processes_match_one_process_with_accumulation(ws, one, ddp):
    single, double, start = weights(get_run(ws, one)), weights(get_run(ws, ddp)), weights(ws.model)
    diff = rel_diff(double, single)
    assert diff <= 1e-3
    # The test has teeth: the weights moved from the start (by > 1%), and the runs agree to a tiny fraction
    # of that move.
    moved = rel_diff(start, single)
    assert moved > 0.01 and diff < 1e-3 * moved
    m1, m2 = metrics(get_run(ws, one)), metrics(get_run(ws, ddp))
    assert len(m1) == len(m2) == 6
    for a, b in zip(m1, m2):  # the logged global loss and metrics agree step by step
        for key in a:
            if key not in ("tokens_per_s", "mfu", "stage"):  # stage: the same string in both
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


def test_sft_runs_include_a_rank_without_examples(ws):
    """The sft comparison above covers the short last batch: one example for two ranks."""
    batches = data.global_batches(13, 4, seed=SEED, epoch=0)
    assert [len(b) for b in batches] == [4, 4, 4, 1]
    assert data.shard(batches[3], 1, 2) == []
    assert metrics(get_run(ws, "sft-ddp"))[3]["tokens"] < metrics(get_run(ws, "sft-ddp"))[2]["tokens"]


def test_fsdp2_matches_ddp(ws):
    fsdp, ddp = get_run(ws, "sft-fsdp"), get_run(ws, "sft-ddp")
    assert rel_diff(weights(fsdp), weights(ddp)) <= 1e-3
    # One ordinary Hugging Face checkpoint, whole, not shards per rank.
    model = transformers.Qwen2ForCausalLM.from_pretrained(fsdp)
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for v in weights(ws.model).values())


def test_fsdp2_resume_reproduces_the_uninterrupted_run(ws, tmp_path):
    """Sharded AdamW state is gathered into one optimizer/adamw.safetensors and re-sharded on resume (each rank reads
    its rows); RNG states of both ranks are kept."""
    full = get_run(ws, "sft-fsdp")
    state = json.loads(Path(full, "step-3", train.TRAINER_STATE).read_text())
    assert state["fingerprints"]["data"] == common.sha256_file(ws.sft) and state["step"] == 3
    exp_avg = load_file(os.path.join(full, "step-3", train.OPTIMIZER_STATE))["state.model.embed.weight.exp_avg"]
    assert exp_avg.shape == weights(ws.model)["model.embed_tokens.weight"].shape  # whole, not a shard
    out = tmp_path / "resumed"
    run_torchrun(RUNS["sft-fsdp"][0](ws) + ["--out", out, "--resume", os.path.join(full, "step-3")])
    assert rel_diff(weights(out), weights(full)) <= 1e-5


# ------------------------------------------------------------------ every stage: loss formula, HF loading


def hf_logps(hf, example):
    """logπ(y|x) summed over the loss tokens, and their count, from transformers' logits of the sequence
    alone: the loss tokens are those with loss_mask 1 after the first position."""
    ids = torch.tensor([example.input_ids])
    with torch.no_grad():
        logits = hf(ids).logits[0, :-1].double()
    token_logps = F.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0]
    mask = torch.tensor(example.loss_mask[1:], dtype=torch.bool)
    return token_logps[mask].sum().item(), int(mask.sum())


def expected_first_loss(ws, stage, batch_size, alpha=0.8, beta=None, gamma=1.0, hf=None):
    """The stage's loss on the first global batch, from the formulas in the papers, by hand (with transformers'
    model of the starting checkpoint, or `hf`)."""
    hf = hf or transformers.Qwen2ForCausalLM.from_pretrained(ws.model).eval()
    tokenizer = data.load_tokenizer(ws.model)
    if stage == "sft":
        items, _ = data.tokenize_sft(data.load_sft(ws.sft), tokenizer, "qwen", None)
    elif stage == "weighted":
        items, _ = data.tokenize_groups(data.load_groups(ws.groups), tokenizer, "qwen", None)
    else:
        items, _ = data.tokenize_pairs(data.load_pairs(ws.pairs), tokenizer, "qwen", None)
    batch = [items[i] for i in data.global_batches(len(items), batch_size, seed=SEED, epoch=0)[0]]
    if stage == "sft":  # −Σ logp / Σ loss tokens
        sums = [hf_logps(hf, e) for e in batch]
        return -sum(s for s, _ in sums) / sum(n for _, n in sums)
    if stage == "weighted":  # Σ −A·logπ/|y| / #completions, A z-scored in each group (std n−1, eps 1e-4)
        total, count = 0.0, 0
        for examples, rewards in batch:
            r = torch.tensor(rewards, dtype=torch.float64)
            adv = (r - r.mean()) / (r.std() + 1e-4) if len(set(rewards)) > 1 else torch.zeros_like(r)
            for e, a in zip(examples, adv.tolist()):
                s, n = hf_logps(hf, e)
                total += -a * s / n
                count += 1
        return total / count
    per_pair = []
    for chosen, rejected in batch:
        (sc, nc), (sr, nr) = hf_logps(hf, chosen), hf_logps(hf, rejected)
        if stage == "redi":
            per_pair.append(-sc / nc + alpha * sr / nr)
        elif stage == "simpo":
            margin = beta * (sc / nc - sr / nr) - gamma
            per_pair.append(math.log1p(math.exp(-margin)))  # −log σ(margin)
        else:  # dpo at step 1: policy = reference, so −log σ(0)
            per_pair.append(math.log(2.0))
    return sum(per_pair) / len(per_pair)


STAGE_RUNS = {"sft": ("sft-1", 4, {}), "redi": ("redi-1", 4, {}), "dpo": ("dpo-1", 4, {}),
              "simpo": ("simpo-1", 4, {"beta": 2.0}), "weighted": ("weighted-1", 2, {})}


@pytest.mark.parametrize("stage", sorted(STAGE_RUNS))
def test_every_stage_runs_and_loads_in_transformers(ws, stage):
    name, batch_size, kwargs = STAGE_RUNS[stage]
    out = get_run(ws, name)
    log = metrics(out)
    assert log[0]["loss"] == pytest.approx(expected_first_loss(ws, stage, batch_size, **kwargs), rel=1e-4)
    for record in log:
        assert {"step", "epoch", "loss", "learning_rate", "grad_norm", "tokens", "tokens_per_s", "mfu"} <= record.keys()
        assert record["mfu"] is None  # CPU
    if stage in ("redi", "dpo", "simpo"):
        assert {"logps/chosen", "logps/rejected", "rewards/margins", "rewards/accuracies"} <= log[0].keys()

    model = transformers.Qwen2ForCausalLM.from_pretrained(out)
    ids = torch.tensor([data.encode_prompt(data.load_tokenizer(out), "qwen", data.problem_messages("1+1?", "qwen"))])
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    assert rel_diff(weights(out), weights(ws.model)) > 1e-3  # it trained
    with open(os.path.join(out, "generation_config.json")) as f:
        generation = json.load(f)
    tokenizer = data.load_tokenizer(out)
    assert generation["eos_token_id"] == [tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")]
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == generation["eos_token_id"]
    assert not [n for n in os.listdir(out) if n.startswith(".tmp")]


def test_sft_loss_falls_on_a_memorisation_set(ws, tmp_path):
    small = write_jsonl(tmp_path / "four.jsonl", [json.loads(line) for line in Path(ws.sft).read_text().splitlines()[:4]])
    out = tmp_path / "out"
    run_inprocess(["--stage", "sft", "--model", ws.model, "--data", small, "--out", out, "--batch-size", 4,
                   "--epochs", 30, "--lr", 1e-2, "--warmup-ratio", 0])
    losses = [r["loss"] for r in metrics(out)]
    assert len(losses) == 30
    assert losses[-1] < 0.25 * losses[0], losses


def test_learning_rate_schedule(ws):
    total, warmup, peak = 10, train.warmup_steps_for(10, 0.25), 2.0
    assert warmup == 3
    lrs = [train.learning_rate(s, total, warmup, peak) for s in range(total)]
    assert lrs[:3] == pytest.approx([2 / 3, 4 / 3, 2.0])  # rises linearly to the peak at the 3rd update
    assert lrs[3:] == pytest.approx([2.0 * (10 - s) / 7 for s in range(3, 10)])  # then falls to 0 after the last
    assert train.learning_rate(0, 5, 0, 1.0) == 1.0
    # The run logs exactly these values.
    logged = [r["learning_rate"] for r in metrics(get_run(ws, "sft-1"))]
    assert logged == pytest.approx([train.learning_rate(s, 6, 1, 1e-3) for s in range(6)])


# ------------------------------------------------------------------------------------- resume and saving


def test_resume_reproduces_the_uninterrupted_run(ws, tmp_path):
    full = get_run(ws, "sft-1")
    assert sorted(os.listdir(full)).count("step-3") == 1
    out = tmp_path / "resumed"
    run_inprocess(RUNS["sft-1"][0](ws) + ["--out", out, "--resume", os.path.join(full, "step-3")])
    assert rel_diff(weights(out), weights(full)) <= 1e-5
    assert [r["step"] for r in metrics(out)] == [4, 5, 6]
    assert [r["loss"] for r in metrics(out)] == pytest.approx([r["loss"] for r in metrics(full)[3:]], rel=1e-6)
    state = json.loads(Path(full, "step-3", train.TRAINER_STATE).read_text())
    assert (state["step"], state["epoch"], state["total_steps"]) == (3, 0, 6)
    assert load_file(os.path.join(full, "step-3", train.OPTIMIZER_STATE)) and state["fingerprints"] == {
        "data": common.sha256_file(ws.sft), "model": {"model.safetensors": common.sha256_file(weights_file(ws.model))}}


def default_ref_cache(ws):
    """dpo-1's reference table: in the token cache directory beside the data, one file per fingerprint (the
    module's DPO runs of ws.model share one)."""
    (path,) = Path(ws.pairs + ".tokens").glob("ref_logps-*.safetensors")
    return str(path)


def test_dpo_reference_cache_is_reused_on_resume_and_matches_transformers(ws, tmp_path, capsys):
    full = get_run(ws, "dpo-1")
    cache = default_ref_cache(ws)
    table = load_file(cache)["ref_logps"].clone()  # not a view of the file, which is damaged below
    # The cached reference log-probs are logπ_ref(chosen), logπ_ref(rejected) of each pair, in file order.
    hf = transformers.Qwen2ForCausalLM.from_pretrained(ws.model).eval()
    pairs, _ = data.tokenize_pairs(data.load_pairs(ws.pairs), data.load_tokenizer(ws.model), "qwen", None)
    expected = torch.tensor([[hf_logps(hf, c)[0], hf_logps(hf, r)[0]] for c, r in pairs])
    assert table.shape == (10, 2)
    assert torch.allclose(table.double(), expected.double(), rtol=1e-5, atol=1e-4)

    mtime = os.stat(cache).st_mtime_ns
    capsys.readouterr()
    out = tmp_path / "resumed"
    run_inprocess(RUNS["dpo-1"][0](ws) + ["--out", out, "--resume", os.path.join(full, "step-3")])
    assert "reusing reference log-probs" in capsys.readouterr().out
    assert os.stat(cache).st_mtime_ns == mtime
    assert rel_diff(weights(out), weights(full)) <= 1e-5

    # A damaged cache is never trusted. A resume refuses it (its weights are no longer the reference); a
    # fresh run recomputes it.
    Path(cache).write_bytes(Path(cache).read_bytes()[:100])
    with pytest.raises(InputError, match="cannot be recomputed from a resumed model"):
        run_inprocess(RUNS["dpo-1"][0](ws) + ["--out", tmp_path / "r2", "--resume", os.path.join(full, "step-3")])
    run_inprocess(dpo_args(ws) + ["--out", tmp_path / "stale", "--max-steps", 1])
    assert "recomputing" in capsys.readouterr().out
    assert torch.allclose(load_file(cache)["ref_logps"], table, rtol=1e-6)


def test_dpo_on_two_processes_splits_the_reference_pass_and_resumes(ws, tmp_path):
    """Two ranks compute halves of the reference table; a 2-process resume reuses it (rank 0 reads the file
    and broadcasts it) and reproduces the uninterrupted DDP run."""
    one = get_run(ws, "dpo-1")
    other_cache = tmp_path / "ref.safetensors"
    args = dpo_args(ws) + ["--micro-batch-size", 1, "--ref-cache", other_cache]
    out = tmp_path / "dpo-ddp"
    run_torchrun(args + ["--out", out, "--save-every", 3])
    assert torch.allclose(load_file(other_cache)["ref_logps"], load_file(default_ref_cache(ws))["ref_logps"],
                          rtol=1e-5, atol=1e-5)
    assert rel_diff(weights(out), weights(one)) <= 1e-3
    mtime = os.stat(other_cache).st_mtime_ns
    resumed = tmp_path / "resumed"
    result = run_torchrun(args + ["--out", resumed, "--resume", out / "step-3"])
    assert "reusing reference log-probs" in result.stdout and os.stat(other_cache).st_mtime_ns == mtime
    assert rel_diff(weights(resumed), weights(out)) <= 1e-5


def test_a_dpo_run_from_another_model_keeps_the_first_runs_reference_cache(ws, tmp_path, capsys):
    """Run A (ws.model) and run B (another model) on the same data: B writes its own reference table beside
    A's, never over it, and A still resumes exactly from its own."""
    pairs = shutil.copy(ws.pairs, tmp_path / "pairs.jsonl")  # a token cache directory of its own
    other = tiny.make_checkpoint(str(tmp_path / "other"), seed=1)
    shutil.copy(os.path.join(ws.model, "tokenizer.json"), other)  # the same tokenizer, other weights
    args_a = dpo_args(ws) + ["--data", pairs, "--micro-batch-size", 2, "--save-every", 3]
    run_inprocess(args_a + ["--out", tmp_path / "a"])
    (cache_a,) = Path(f"{pairs}.tokens").glob("ref_logps-*.safetensors")
    before = (cache_a.read_bytes(), cache_a.stat().st_mtime_ns)
    run_inprocess(dpo_args(ws) + ["--data", pairs, "--model", other, "--out", tmp_path / "b", "--max-steps", 1])
    assert len(list(Path(f"{pairs}.tokens").glob("ref_logps-*.safetensors"))) == 2
    assert (cache_a.read_bytes(), cache_a.stat().st_mtime_ns) == before
    capsys.readouterr()
    run_inprocess(args_a + ["--out", tmp_path / "a-resumed", "--resume", tmp_path / "a" / "step-3"])
    assert f"reusing reference log-probs from {cache_a}" in capsys.readouterr().out
    assert rel_diff(weights(tmp_path / "a-resumed"), weights(tmp_path / "a")) <= 1e-5


def test_two_ranks_build_the_token_cache_once_and_train_as_from_todays_tokens(ws, tmp_path):
    """On a fresh copy of the data, rank 0 builds the token cache while rank 1 waits, both map it, and the run
    is the DDP run whose cache existed already (sft-ddp); the cache is built once, in --token-cache."""
    data_copy = shutil.copy(ws.sft, tmp_path / "sft.jsonl")
    out = tmp_path / "ddp"
    result = run_torchrun(RUNS["sft-ddp"][0](ws) + ["--data", data_copy, "--token-cache", tmp_path / "tokens",
                                                    "--out", out])
    assert result.stdout.count("(token cache ") == 1 and "built in" in result.stdout
    assert len(os.listdir(tmp_path / "tokens")) == 1 and not os.path.exists(f"{data_copy}.tokens")
    assert rel_diff(weights(out), weights(get_run(ws, "sft-ddp"))) <= 1e-6


def test_interrupted_save_leaves_the_previous_checkpoint(ws, tmp_path, monkeypatch):
    """The weights file of the second checkpoint fails half-written (a full disk, a kill); step-2 stays loadable,
    no step-4 appears, and resuming from step-2 finishes with the uninterrupted run's weights."""
    import safetensors.torch

    real_save_file, calls = safetensors.torch.save_file, []

    def crash_on_second_save(tensors, filename, metadata=None):  # the weights: the first file of step-4
        calls.append(filename)
        if ".tmp-step-4" in str(filename) and len([c for c in calls if ".tmp-step-4" in str(c)]) == 1:
            with open(filename, "wb") as f:
                f.write(b"\0" * 1000)  # half a file
            raise OSError("simulated crash while writing weights")
        return real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", crash_on_second_save)
    out = tmp_path / "out"
    args = sft_args(ws) + ["--micro-batch-size", 2, "--out", out, "--save-every", 2]
    with pytest.raises(OSError, match="simulated crash"):
        run_inprocess(args)
    assert os.path.isdir(out / "step-2") and not os.path.exists(out / "step-4")
    assert not os.path.exists(out / "config.json")  # no final model either
    transformers.Qwen2ForCausalLM.from_pretrained(out / "step-2")
    monkeypatch.undo()

    # A fresh start into this OUT is refused (it would overwrite step-2); resuming from step-2 is allowed.
    with pytest.raises(InputError, match="already holds step-2"):
        run_inprocess(args)
    run_inprocess(args + ["--resume", out / "step-2"])
    assert rel_diff(weights(out), weights(get_run(ws, "sft-1"))) <= 1e-5
    assert not [n for n in os.listdir(out) if n.startswith(".tmp")]
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5, 6]


def test_what_an_interrupted_run_leaves_in_out_is_found_and_cleared(tmp_path, monkeypatch, capsys):
    """The common.py plumbing prepare_out_dir uses: OUT/step-N found by number, .tmp-* leftovers removed, and
    metrics.jsonl cut back to the resumed step, less the line a kill cut short (a damaged line elsewhere is an
    error naming FILE:LINE, never skipped)."""
    out = tmp_path / "out"
    for name in ("step-2", "step-10", "step-x", "step-", ".tmp-step-4"):
        (out / name).mkdir(parents=True)
    (out / ".tmp-abc").write_text("half a file")
    assert common.numbered_dirs(out, "step-") == {2: str(out / "step-2"), 10: str(out / "step-10")}
    assert common.remove_leftovers(out) == [str(out / ".tmp-abc"), str(out / ".tmp-step-4")]
    assert sorted(os.listdir(out)) == ["step-", "step-10", "step-2", "step-x"]
    log = out / train.METRICS_FILE
    log.write_text('{"step": 1}\n\n{"step": 2, "loss": 0.5}\n{"step": 3}\n{"step": 4, "lo')
    assert common.trim_jsonl_log(log, lambda row: row["step"] <= 2) is True
    assert [json.loads(line) for line in log.read_text().splitlines()] == [{"step": 1}, {"step": 2, "loss": 0.5}]
    assert common.trim_jsonl_log(log, lambda row: True) is False and len(log.read_text().splitlines()) == 2
    assert common.trim_jsonl_log(tmp_path / "absent.jsonl", lambda row: True) is False
    log.write_text('{"step": 1}\n{"step": \n{"step": 3}\n')
    with pytest.raises(InputError, match=f"{log}:2: not valid JSON"):
        common.trim_jsonl_log(log, lambda row: True)
    capsys.readouterr()
    monkeypatch.setenv("RANK", "1")
    common.print0("only rank 0 says this")
    monkeypatch.setenv("RANK", "0")
    common.print0("rank 0 says this")
    assert capsys.readouterr().out == "rank 0 says this\n"


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(ws, tmp_path):
    out = tmp_path / "out"
    # lr 1e30 makes step 1's update blow the weights up; step 2's loss is NaN.
    with pytest.raises(train.NonFiniteLossError, match=r"step 2: the loss is nan.*step-1"):
        run_inprocess(sft_args(ws) + ["--lr", 1e30, "--out", out, "--save-every", 1])
    assert sorted(n for n in os.listdir(out) if n not in (train.METRICS_FILE, ".lock")) == ["step-1"]
    model = transformers.Qwen2ForCausalLM.from_pretrained(out / "step-1")
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("change, env, message", [
    ({"--micro-batch-size": 3}, {}, r"--batch-size 4 must be a multiple of .*--micro-batch-size"),
    ({"--micro-batch-size": 2}, {"WORLD_SIZE": "4"}, r"world size \(4\) x --micro-batch-size \(2\) = 8"),
    ({"--data": "PAIRS"}, {}, r"holds preference \(prompt/chosen/rejected\) rows, but --stage sft needs SFT"),
    ({"--data": "MISSING_DATA"}, {}, r"--data .*missing.jsonl: no such file"),
    ({"--model": "MISSING_MODEL"}, {}, r"--model .*missing-model: not a directory"),
    ({"--model": "NO_CONFIG"}, {}, r"--model .*empty: no config.json"),
    ({"--dtype": "bf16"}, {}, r"--dtype bf16 needs a CUDA GPU"),
    ({"--resume": "NO_STATE"}, {}, r"--resume .*ckpt: no trainer_state.json"),
])
def test_bad_input_fails_before_any_compute(ws, tmp_path, monkeypatch, change, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    (tmp_path / "empty").mkdir()
    paths = {"PAIRS": ws.pairs, "MISSING_DATA": str(tmp_path / "missing.jsonl"),
             "MISSING_MODEL": str(tmp_path / "missing-model"), "NO_CONFIG": str(tmp_path / "empty"),
             "NO_STATE": ws.model}
    args = dict(zip(sft_args(ws)[::2], sft_args(ws)[1::2]))
    args.update({k: paths.get(v, v) for k, v in change.items()})
    out = tmp_path / "out"
    with pytest.raises(InputError, match=message):
        run_inprocess([x for kv in args.items() for x in kv] + ["--out", out])
    assert not out.exists()  # failed before writing anything


def test_cli_error_message_and_exit_code(ws, tmp_path):
    result = subprocess.run([sys.executable, "train.py", "--stage", "redi", "--model", ws.model, "--data", ws.sft,
                             "--out", tmp_path / "out"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("train.py: error: --data ") and "suits --stage sft" in result.stderr
    assert "Traceback" not in result.stderr


def test_checkpoints_are_never_overwritten_and_resume_settings_must_match(ws, tmp_path):
    full = get_run(ws, "sft-1")
    args = RUNS["sft-1"][0](ws)
    before = sorted(os.listdir(full)), os.stat(os.path.join(full, "model.safetensors")).st_mtime_ns
    with pytest.raises(InputError, match=r"--out .* already holds step-3, a final model; choose a new"):
        run_inprocess(args + ["--out", full])
    with pytest.raises(InputError, match="is the final model of a finished run"):
        run_inprocess(args + ["--out", full, "--resume", full])
    with pytest.raises(InputError, match="a final model, newer than --resume"):
        run_inprocess(args + ["--out", full, "--resume", os.path.join(full, "step-3")])
    assert (sorted(os.listdir(full)), os.stat(os.path.join(full, "model.safetensors")).st_mtime_ns) == before
    changed = list(args)
    changed[changed.index("--batch-size") + 1] = 8
    with pytest.raises(InputError, match="--batch-size 4 but this run has 8"):
        run_inprocess(changed + ["--out", tmp_path / "o", "--resume", os.path.join(full, "step-3")])


def test_max_length_drops_and_counts_and_r1_template(ws, tmp_path, capsys):
    tokenizer = data.load_tokenizer(ws.model)
    lengths = sorted(len(e.input_ids) for e in data.tokenize_sft(data.load_sft(ws.sft), tokenizer, "r1", None)[0])
    max_length = lengths[len(lengths) // 2]
    dropped = sum(n > max_length for n in lengths)
    assert 0 < dropped < len(lengths)
    out = tmp_path / "out"
    run_inprocess(["--stage", "sft", "--model", ws.model, "--data", ws.sft, "--out", out, "--template", "r1",
                   "--max-length", max_length, "--batch-size", 4, "--epochs", 1, "--lr", 1e-3])
    assert f"kept {len(lengths) - dropped}, dropped_too_long {dropped}" in capsys.readouterr().out
    assert len(metrics(out)) == math.ceil((len(lengths) - dropped) / 4)
    with open(out / "generation_config.json") as f:
        assert json.load(f)["eos_token_id"] == [tokenizer.token_to_id("<｜end▁of▁sentence｜>")]


def test_config_file_keys_defaults_and_overrides(ws, tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"stage": "simpo", "model": ws.model, "data": ws.pairs, "out": "x",
                                  "micro-batch-size": 2, "grad_checkpointing": True, "lr": "2e-6"}))
    args = train.parse_args(["--config", str(config), "--micro-batch-size", "4"])
    assert (args.stage, args.micro_batch_size, args.grad_checkpointing, args.lr) == ("simpo", 4, True, 2e-6)
    assert (args.beta, args.gamma, args.batch_size, args.epochs, args.alpha) == (2.0, 1.0, 32, 1, 0.8)
    assert (args.warmup_ratio, args.weight_decay, args.dtype) == (0.1, 1e-4, "fp32")
    sft = train.parse_args(["--stage", "sft", "--model", "m", "--data", "d", "--out", "o"])
    assert (sft.lr, sft.batch_size, sft.epochs) == (5e-5, 128, 5)
    assert train.parse_args(["--stage", "dpo", "--model", "m", "--data", "d", "--out", "o"]).beta == 0.001
    assert train.parse_args(["--stage", "redi", "--model", "m", "--data", "d", "--out", "o"]).lr == 1e-6

    config.write_text(json.dumps({"stage": "sft", "learning_rate": 1e-5}))
    with pytest.raises(InputError, match="unknown key 'learning_rate'"):
        train.parse_args(["--config", str(config)])
    config.write_text(json.dumps({"stage": "ppo"}))
    with pytest.raises(InputError, match=r"--config .*c.json: argument --stage: invalid choice: 'ppo'"):
        train.parse_args(["--config", str(config)])
    config.write_text(json.dumps({"epochs": 1.5}))
    with pytest.raises(InputError, match="must be an integer"):
        train.parse_args(["--config", str(config)])
    with pytest.raises(InputError, match="missing --stage, --model, --data, --out"):
        train.parse_args([])


# ------------------------------------------------------------------- recipes and the paper's hyperparameters

RECIPES = ROOT / "recipes"
STAGE1 = dict(stage="sft", lr=5e-5, batch_size=128, warmup_ratio=0.1, weight_decay=1e-4, max_length=32768,
              rope_theta=300000.0, max_position_embeddings=32768)  # appendix C.3; the authors' README
STAGE2 = dict(batch_size=32, epochs=1, warmup_ratio=0.1, weight_decay=1e-4, max_length=19800)  # appendix C.4
# Each paper run: its hyperparameters (Table 2 / appendix C.4) and its starting checkpoint.
PAPER_RUNS = {
    "stage1-sft-3ep": (dict(STAGE1, epochs=3), "Qwen2.5-Math-1.5B"),
    "stage1-sft-5ep": (dict(STAGE1, epochs=5), "Qwen2.5-Math-1.5B"),
    "stage2-redi": (dict(STAGE2, stage="redi", alpha=0.8, lr=1e-6), "stage1-sft-5ep"),
    "stage2-redi-ablation": (dict(STAGE2, stage="redi", alpha=0.8, lr=1e-6), "stage1-sft-3ep"),
    "stage2-redi-symmetric": (dict(STAGE2, stage="redi", alpha=1.0, lr=2e-7), "stage1-sft-3ep"),
    "stage2-dpo": (dict(STAGE2, stage="dpo", beta=0.001, lr=2e-7), "stage1-sft-3ep"),
    "stage2-simpo": (dict(STAGE2, stage="simpo", beta=2.0, gamma=1.0, lr=5e-7), "stage1-sft-3ep"),
    "stage2-weighted": (dict(STAGE2, stage="weighted", lr=1e-6), "stage1-sft-3ep"),
}


def test_every_recipe_is_a_paper_run():
    assert sorted(p.stem for p in RECIPES.glob("*.json")) == sorted(PAPER_RUNS)


@pytest.mark.parametrize("name", sorted(PAPER_RUNS))
def test_recipe_names_its_paper_row_and_runs_two_steps(ws, tmp_path, name):
    path = RECIPES / f"{name}.json"
    written = json.loads(path.read_text())
    expected, start = PAPER_RUNS[name]
    # Every hyperparameter of the row is written in the file itself, not left to a default.
    assert {k: written.get(k) for k in expected} == expected
    assert written["model"].endswith(start)
    args = train.parse_args(["--config", str(path)])
    assert {k: getattr(args, k) for k in expected} == expected

    data_file = {"sft": ws.sft, "weighted": ws.groups}.get(expected["stage"], ws.pairs)
    out = tmp_path / "out"
    # Paths and the run's length from the command line, over the file's values.
    run_inprocess(["--config", path, "--model", ws.model, "--data", data_file, "--out", out, "--batch-size", 4,
                   "--max-steps", 2, "--ref-cache", tmp_path / "ref.safetensors"])
    log = metrics(out)
    assert [r["step"] for r in log] == [1, 2] and all(math.isfinite(r["loss"]) for r in log)
    assert log[0]["learning_rate"] == pytest.approx(expected["lr"])  # warmup: ceil(0.1 x 2 steps) = 1 step
    config = json.loads((out / "config.json").read_text())
    if expected["stage"] == "sft":
        assert (config["rope_theta"], config["max_position_embeddings"]) == (300000.0, 32768)


def test_rope_overrides_are_trained_with_saved_and_match_transformers(ws, tmp_path):
    # Weights N(0, 0.1): large enough that attention, and so RoPE, moves the loss visibly.
    source = tiny.make_checkpoint(tmp_path / "source")
    assert data.load_tokenizer(source).to_str() == data.load_tokenizer(ws.model).to_str()  # ws's data fits it
    out = tmp_path / "out"
    run_inprocess(sft_args(ws) + ["--model", source, "--out", out, "--max-steps", 2, "--rope-theta", 300000,
                                  "--max-position-embeddings", 32768])
    hf_config = transformers.AutoConfig.from_pretrained(out)
    assert hf_config.rope_parameters["rope_theta"] == 300000.0 and hf_config.max_position_embeddings == 32768
    # The first loss is the one of the starting weights under the overridden RoPE, not the shipped one.
    base = transformers.Qwen2ForCausalLM.from_pretrained(source).eval()
    overridden = transformers.Qwen2ForCausalLM.from_pretrained(source, config=transformers.AutoConfig.from_pretrained(
        source, rope_parameters={"rope_theta": 300000.0, "rope_type": "default"}, max_position_embeddings=32768))
    first = metrics(out)[0]["loss"]
    assert first == pytest.approx(expected_first_loss(ws, "sft", 4, hf=overridden.eval()), rel=1e-5)
    assert first != pytest.approx(expected_first_loss(ws, "sft", 4, hf=base), rel=1e-3)
    # The trained checkpoint gives transformers' logits under those values.
    from model import Qwen2

    ids = torch.tensor([list(range(3, 60))])
    with torch.no_grad():
        ours = Qwen2.from_pretrained(str(out))(ids)
        theirs = transformers.Qwen2ForCausalLM.from_pretrained(out).eval()(ids).logits
    assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()


# ---------------------------------------------- saved checkpoints: dtype, no optimizer state in the final, EOS


@pytest.fixture(scope="module")
def bf16_run(ws, tmp_path_factory):
    """A bf16 source checkpoint whose tokenizer and config end documents with <|endoftext|>, as a base model
    does; trained 4 SFT steps with step-2 saved, and resumed from step-2 into another OUT."""
    root = tmp_path_factory.mktemp("bf16")
    source = tiny.make_checkpoint(root / "source", dtype=torch.bfloat16)
    tokenizer_config = json.loads((root / "source" / "tokenizer_config.json").read_text())
    (root / "source" / "tokenizer_config.json").write_text(json.dumps(dict(tokenizer_config,
                                                                          eos_token="<|endoftext|>")))
    config = json.loads((root / "source" / "config.json").read_text())
    end_of_text = data.load_tokenizer(source).token_to_id("<|endoftext|>")
    (root / "source" / "config.json").write_text(json.dumps(dict(config, eos_token_id=end_of_text)))
    args = ["--stage", "sft", "--model", source, "--data", ws.sft, "--batch-size", 4, "--max-steps", 4,
            "--lr", 1e-3]
    run_inprocess(args + ["--out", root / "out", "--save-every", 2])
    run_inprocess(args + ["--out", root / "resumed", "--resume", root / "out" / "step-2"])
    return root


def test_final_model_keeps_the_source_dtype_and_no_optimizer_state(bf16_run):
    out, step = bf16_run / "out", bf16_run / "out" / "step-2"
    assert {t.dtype for t in weights(out).values()} == {torch.bfloat16}
    assert {t.dtype for t in weights(step).values()} == {torch.float32}  # fp32 master weights to resume from
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    assert json.loads((step / "config.json").read_text())["dtype"] == "float32"
    assert transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto").dtype == torch.bfloat16
    # The final directory holds what inference needs and the run's log, no AdamW state; step-N resumes.
    assert not list(out.glob("*.pt")) and (step / train.TRAINER_STATE).exists()
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            train.METRICS_FILE} <= set(os.listdir(out))
    resumed = bf16_run / "resumed"
    assert {t.dtype for t in weights(resumed).values()} == {torch.bfloat16}  # --model's dtype, not step-2's fp32
    assert rel_diff(weights(resumed), weights(out)) <= 1e-5
    assert [r["step"] for r in metrics(resumed)] == [3, 4]


def test_save_dtype_flag_overrides_the_source_dtype(ws, tmp_path, bf16_run):
    out = tmp_path / "out"
    run_inprocess(["--stage", "sft", "--model", bf16_run / "source", "--data", ws.sft, "--out", out,
                   "--batch-size", 4, "--max-steps", 1, "--save-dtype", "fp32"])
    assert {t.dtype for t in weights(out).values()} == {torch.float32}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


class ForceTokenAt(transformers.LogitsProcessor):
    """Makes generation emit `token` as its n-th new token (whatever the random model prefers)."""

    def __init__(self, prompt_length, n, token):
        self.position, self.token = prompt_length + n - 1, token

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.position:
            scores[:] = -math.inf
            scores[:, self.token] = 0.0
        return scores


@pytest.mark.parametrize("checkpoint", ["out", "out/step-2"])
def test_every_saved_checkpoint_ends_a_turn_at_the_templates_end_of_turn(bf16_run, checkpoint):
    path = bf16_run / checkpoint
    im_end = data.load_tokenizer(path).token_to_id("<|im_end|>")
    assert transformers.AutoTokenizer.from_pretrained(path).eos_token_id == im_end
    generation = transformers.GenerationConfig.from_pretrained(path)
    assert generation.eos_token_id[0] == im_end
    assert json.loads((path / "config.json").read_text())["eos_token_id"] == im_end
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    prompt = torch.tensor([data.encode_prompt(data.load_tokenizer(path), "qwen",
                                              data.problem_messages("What is 2 + 3?", "qwen"))])
    out = model.generate(prompt, max_new_tokens=20, do_sample=False,
                         logits_processor=[ForceTokenAt(prompt.shape[1], 3, im_end)])
    assert out.shape[1] == prompt.shape[1] + 3 and out[0, -1] == im_end  # stopped right at <|im_end|>


# ------------------------------------------------------------------------ hostile input, shared outputs


def run_cli(args, **kwargs):
    return subprocess.run([sys.executable, "train.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, **kwargs)


@pytest.mark.parametrize("flags, message", [
    (["--lr", "inf"], "argument --lr: must be a number > 0 that fp32 holds, got 'inf'"),
    (["--lr", "nan"], "argument --lr: must be a number > 0 that fp32 holds, got 'nan'"),
    (["--lr", "1e39"], "argument --lr: must be a number > 0 that fp32 holds, got '1e39'"),
    (["--stage", "dpo", "--beta", "0"], "argument --beta: must be a finite number > 0, got '0'"),
    (["--stage", "simpo", "--beta", "-1"], "argument --beta: must be a finite number > 0, got '-1'"),
    (["--alpha", "nan"], "argument --alpha: must be a finite number >= 0, got 'nan'"),
    (["--gamma", "inf"], "argument --gamma: must be a finite number, got 'inf'"),
    (["--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got '0'"),
    (["--micro-batch-size", "-2"], "argument --micro-batch-size: must be an integer >= 1, got '-2'"),
    (["--epochs", "1.5"], "argument --epochs: must be an integer >= 1, got '1.5'"),
    (["--warmup-ratio", "1"], "argument --warmup-ratio: must be in [0, 1), got '1'"),
    (["--rope-theta", "-5"], "argument --rope-theta: must be a finite number > 0, got '-5'"),
])
def test_flags_are_checked_at_parse_time(ws, tmp_path, capsys, flags, message):
    args = dict(zip(sft_args(ws)[::2], sft_args(ws)[1::2]))
    args.update(zip(flags[::2], flags[1::2]))
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args([str(x) for kv in args.items() for x in kv] + ["--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and f"train.py: error: {message}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_help_shows_each_default_once_and_explains_every_flag():
    parser = train.build_parser()
    assert all(action.help for action in parser._actions)
    text = " ".join(parser.format_help().split())
    assert "(default: None)" not in text and "(default: False)" not in text
    assert text.count("(default: 0.0001)") == 1 and "sft 5e-05, redi 1e-06, dpo 2e-07, simpo 5e-07" in text


@pytest.mark.parametrize("case", ["data-is-a-directory", "out-is-a-file", "out-under-a-file", "lr-inf"])
def test_bad_paths_and_values_exit_2_before_any_compute(ws, tmp_path, case):
    args = dict(zip(sft_args(ws)[::2], sft_args(ws)[1::2]))
    args["--out"] = tmp_path / "out"
    blocker = tmp_path / "file"
    blocker.write_text("keep me\n")
    culprit = {"data-is-a-directory": ("--data", tmp_path, "is a directory"),
               "out-is-a-file": ("--out", blocker, "is a file"),
               "out-under-a-file": ("--out", blocker / "out", "cannot write there"),
               "lr-inf": ("--lr", "inf", "must be a number > 0")}[case]
    args[culprit[0]] = culprit[1]
    result = run_cli([x for kv in args.items() for x in kv])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    # One line (argparse puts its usage above its own), naming the culprit.
    assert result.stderr.splitlines()[-1].startswith("train.py: error: ") and culprit[2] in result.stderr
    assert str(culprit[1]) in result.stderr or culprit[0] in result.stderr
    assert blocker.read_text() == "keep me\n" and not (tmp_path / "out").exists()


def test_non_finite_weights_after_the_last_update_are_never_saved(ws, tmp_path, monkeypatch):
    """The last update leaves a NaN weight (its loss and gradient were finite): no final model is saved."""
    build_optimizer = train.build_optimizer

    def poisoned(module, args, d):
        optimizer = build_optimizer(module, args, d)
        update = optimizer.step

        def update_then_poison():
            update()
            with torch.no_grad():
                next(module.parameters())[0, 0] = math.nan
        optimizer.step = update_then_poison
        return optimizer

    monkeypatch.setattr(train, "build_optimizer", poisoned)
    out = tmp_path / "out"
    with pytest.raises(train.NonFiniteLossError, match="step 1: the weights are no longer finite; final not saved"):
        run_inprocess(sft_args(ws) + ["--max-steps", 1, "--out", out])
    assert not (out / "config.json").exists() and not list(out.glob("*.safetensors"))
    assert not [n for n in os.listdir(out) if n.startswith(".tmp")]


def test_resume_verifies_the_data_and_the_model_by_content(ws, tmp_path):
    full = get_run(ws, "sft-1")
    step = os.path.join(full, "step-3")
    rows = Path(ws.sft).read_text().splitlines()
    changed = write_jsonl(tmp_path / "changed.jsonl", [json.loads(r) for r in rows[1:] + rows[:1]])  # same rows
    args = RUNS["sft-1"][0](ws)
    with_data = args[:args.index("--data") + 1] + [changed] + args[args.index("--data") + 2:]
    with pytest.raises(InputError, match=r"--data .*changed.jsonl is not what that run started from"):
        run_inprocess(with_data + ["--out", tmp_path / "a", "--resume", step])
    other_model = tiny.make_checkpoint(tmp_path / "other", seed=1)
    with_model = args[:args.index("--model") + 1] + [other_model] + args[args.index("--model") + 2:]
    with pytest.raises(InputError, match=r"--model .*other is not what that run started from"):
        run_inprocess(with_model + ["--out", tmp_path / "b", "--resume", step])
    assert not (tmp_path / "a" / "config.json").exists() and not (tmp_path / "b" / "config.json").exists()


@pytest.mark.parametrize("damaged", [train.TRAINER_STATE, train.OPTIMIZER_STATE, "model.safetensors"])
def test_a_damaged_checkpoint_names_the_file_and_an_earlier_checkpoint(ws, tmp_path, damaged):
    out = tmp_path / "out"
    args = sft_args(ws) + ["--micro-batch-size", 2, "--save-every", 2]
    run_inprocess(args + ["--out", out])
    path = out / "step-4" / damaged
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])  # a copy cut short
    before = sorted(os.listdir(out))
    with pytest.raises(InputError) as error:
        run_inprocess(args + ["--out", tmp_path / "resumed", "--resume", out / "step-4"])
    assert damaged in str(error.value) and f"resume from an earlier checkpoint: {out / 'step-2'}" in str(error.value)
    assert sorted(os.listdir(out)) == before and not (tmp_path / "resumed" / "config.json").exists()


def test_a_second_run_on_the_same_out_is_refused_and_the_first_completes(ws, tmp_path):
    out = tmp_path / "out"
    args = ["--stage", "sft", "--model", ws.model, "--data", ws.sft, "--batch-size", 4, "--epochs", 100,
            "--lr", 1e-3, "--out", out]
    first = subprocess.Popen([sys.executable, "train.py", *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for line in first.stdout:  # the first run holds the lock once it trains
            if line.startswith("step 1/"):
                break
        second = run_cli(args)
        first_out, first_err = first.communicate(timeout=600)
    finally:
        first.kill()
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert f"{out} is in use by train.py (pid {first.pid}" in second.stderr
    assert first.returncode == 0, first_err[-3000:]
    assert [r["step"] for r in metrics(out)] == list(range(1, 401))  # one run's rows, each once
    transformers.Qwen2ForCausalLM.from_pretrained(out)
    assert not [n for n in os.listdir(out) if n.startswith(".tmp")]


def test_mfu_counts_attention_flops(ws, tmp_path):
    """--peak-flops on CPU turns MFU on: FLOPs = 6·N·T + 12·L·H·d·Σ n², computed here from the checkpoint."""
    out = tmp_path / "out"
    run_inprocess(sft_args(ws) + ["--out", out, "--max-steps", 1, "--peak-flops", 1e12])
    record = metrics(out)[0]
    config = json.loads(Path(ws.model, "config.json").read_text())
    n_params = sum(t.numel() for t in weights(ws.model).values())  # tied: the embedding is the output matmul
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    head_dim = config["hidden_size"] // heads
    items, _ = data.tokenize_sft(data.load_sft(ws.sft), data.load_tokenizer(ws.model), "qwen", None)
    docs = [len(items[i].input_ids) for i in data.global_batches(len(items), 4, seed=SEED, epoch=0)[0]]
    assert record["tokens"] == sum(docs)
    flops = 6 * n_params * sum(docs) + 12 * layers * heads * head_dim * sum(n * n for n in docs)
    seconds = record["tokens"] / record["tokens_per_s"]
    assert record["mfu"] == pytest.approx(flops / seconds / 1e12, rel=1e-9)


def test_a_tokenizer_larger_than_the_model_is_refused_before_any_compute(ws, tmp_path):
    """model.check_vocab, the check evaluate.py makes too: an id past the embedding would be an IndexError
    (or garbage on CUDA) deep inside the first forward."""
    small = tmp_path / "small"
    shutil.copytree(ws.model, small)
    config = json.loads((small / "config.json").read_text())
    config["vocab_size"] = 300
    (small / "config.json").write_text(json.dumps(config))
    args = dict(zip(sft_args(ws)[::2], sft_args(ws)[1::2]))
    args.update({"--model": small, "--out": tmp_path / "out"})
    result = run_cli([str(x) for kv in args.items() for x in kv])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "tokenizer.json has" in result.stderr and "vocab_size is 300" in result.stderr
    assert not (tmp_path / "out").exists()
