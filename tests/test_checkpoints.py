"""train.py's checkpoints: the step-N format (optimizer/adamw.safetensors + trainer_state.json) read back rank by rank,
bit-exact; `--resume OUT` picking the newest whole step-N; --save-total-limit; a save that runs out of room;
no .lock left in a finished model directory. (2-process DDP and FSDP2 resumes in the new format: test_train.py's
test_dpo_on_two_processes_splits_the_reference_pass_and_resumes and test_fsdp2_resume_reproduces_the_uninterrupted_run.)
"""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from safetensors.torch import load_file

import common
import train
from common import InputError
from tests.test_train import ROOT, get_run, metrics, run_inprocess, sft_args, weights, ws  # noqa: F401


def sft_run_args(ws):
    """sft-1's flags without --save-every: every run here continues or reproduces that uninterrupted run."""
    return sft_args(ws) + ["--micro-batch-size", 2]


def assert_same_weights(a, b):
    """Bit for bit: a resume on the CPU replays exactly the same operations."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def crash_when_saving(monkeypatch, step_name):
    """Make the save of OUT/step_name fail at its first file, as a kill or a crash would (no errno); return the
    real save_file."""
    real = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        if f".tmp-{step_name}" in str(filename):
            raise RuntimeError("simulated crash")
        return real(tensors, filename, metadata=metadata)
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    return real


# ------------------------------------------------------------------------------------------- the format


def test_step_n_holds_safetensors_and_json_and_resumes_bit_exactly(ws, tmp_path):
    full = get_run(ws, "sft-1")
    step = Path(full, "step-3")
    assert ".lock" not in os.listdir(full)  # a finished model directory: nothing to upload by mistake
    assert all((step / f).is_file() for f in (train.TRAINER_STATE, train.OPTIMIZER_STATE, "model.safetensors"))
    assert [f.name for f in step.glob("*.safetensors")] == ["model.safetensors"]  # what vLLM would load
    assert not (step / train.LEGACY_TRAINER_STATE).exists()
    state = load_file(step / train.OPTIMIZER_STATE)
    params = {"model." + n: p for n, p in train.Qwen2.from_pretrained(full).named_parameters()}
    assert set(state) == {f"state.{n}.{k}" for n in params for k in ("step", "exp_avg", "exp_avg_sq")}
    assert all(state[f"state.{n}.exp_avg"].shape == p.shape for n, p in params.items())
    assert {state[f"state.{n}.step"].item() for n in params} == {3.0}
    out = tmp_path / "resumed"
    run_inprocess(sft_run_args(ws) + ["--out", out, "--resume", step])
    assert_same_weights(out, full)
    assert [r["loss"] for r in metrics(out)] == [r["loss"] for r in metrics(full)[3:]]


def test_the_earlier_trainer_state_pt_format_still_resumes_bit_exactly(ws, tmp_path):
    """A step-N written before this format: one pickled dict holding the optimizer state as
    get_optimizer_state_dict returns it (read with weights_only=True)."""
    old = tmp_path / "old" / "step-3"
    shutil.copytree(Path(get_run(ws, "sft-1"), "step-3"), old)
    flat, state = load_file(old / train.OPTIMIZER_STATE), {}
    for name, value in flat.items():
        fqn, key = name.removeprefix("state.").rsplit(".", 1)
        state.setdefault(fqn, {})[key] = value
    saved = json.loads((old / train.TRAINER_STATE).read_text())
    torch.save(dict(saved, optimizer={"state": state, "param_groups": []}), old / train.LEGACY_TRAINER_STATE)
    os.remove(old / train.OPTIMIZER_STATE)
    os.remove(old / train.TRAINER_STATE)
    assert train.checkpoint_problem(old) is None
    out = tmp_path / "resumed"
    run_inprocess(sft_run_args(ws) + ["--out", out, "--resume", old.parent])  # the run directory: finds step-3
    assert_same_weights(out, get_run(ws, "sft-1"))


def test_every_parameter_needs_its_state(ws, tmp_path):
    step = tmp_path / "run" / "step-3"
    shutil.copytree(Path(get_run(ws, "sft-1"), "step-3"), step)
    state = load_file(step / train.OPTIMIZER_STATE)
    del state["state.model.norm.weight.exp_avg"], state["state.model.norm.weight.exp_avg_sq"]
    del state["state.model.norm.weight.step"]
    state["state.model.extra.weight.exp_avg"] = torch.zeros(2)
    safetensors.torch.save_file(state, step / train.OPTIMIZER_STATE)
    with pytest.raises(InputError, match=r"optimizer/adamw.safetensors holds no state for model.norm.weight"):
        run_inprocess(sft_run_args(ws) + ["--out", tmp_path / "out", "--resume", step])


# ------------------------------------------------------------------------- --resume OUT: the newest whole


@pytest.fixture(scope="module")
def interrupted(ws, tmp_path_factory):
    """A run killed while saving step-5 (--save-every 1): OUT holds step-1 .. step-4 and its metrics."""
    out = tmp_path_factory.mktemp("interrupted") / "out"
    with pytest.MonkeyPatch.context() as monkeypatch:
        crash_when_saving(monkeypatch, "step-5")
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_inprocess(sft_run_args(ws) + ["--out", out, "--save-every", 1])
    assert sorted(common.numbered_dirs(out, "step-")) == [1, 2, 3, 4]
    return out


def test_resume_out_takes_the_newest_whole_checkpoint_and_skips_half_written_ones(ws, interrupted, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(interrupted, out)
    os.remove(out / "step-4" / train.OPTIMIZER_STATE)  # a step dir missing a file
    weights_file = out / "step-3" / "model.safetensors"  # one cut short (a copy that stopped)
    weights_file.write_bytes(weights_file.read_bytes()[:-100])
    shutil.copytree(out / "step-2", out / ".tmp-step-6")  # an interrupted save: never a candidate
    capsys.readouterr()
    resumed = tmp_path / "resumed"
    run_inprocess(sft_run_args(ws) + ["--out", resumed, "--resume", out])
    printed = capsys.readouterr().out
    assert f"skipping {out / 'step-4'}: no optimizer/adamw.safetensors" in printed
    assert f"skipping {out / 'step-3'}: model.safetensors is missing or cut short" in printed
    assert f"resume: {out / 'step-2'}, the newest whole checkpoint" in printed
    assert [r["step"] for r in metrics(resumed)] == [3, 4, 5, 6]
    assert_same_weights(resumed, get_run(ws, "sft-1"))
    # Into OUT itself, the damaged newer checkpoints would be overwritten: refused, nothing touched.
    before = sorted(os.listdir(out))
    with pytest.raises(InputError, match=r"already holds step-3, step-4, newer than --resume .*step-2"):
        run_inprocess(sft_run_args(ws) + ["--out", out, "--resume", out])
    assert sorted(os.listdir(out)) == before
    shutil.rmtree(out / "step-4")
    shutil.rmtree(out / "step-3")
    os.remove(out / "step-2" / train.TRAINER_STATE)
    with pytest.raises(InputError, match=r"step-2: no trainer_state.json; resume from an earlier checkpoint: .*step-1"):
        run_inprocess(sft_run_args(ws) + ["--out", tmp_path / "none", "--resume", out / "step-2"])
    os.remove(out / "step-1" / "config.json")
    with pytest.raises(InputError, match=r"--resume .*out: holds no whole checkpoint step-N"):
        run_inprocess(sft_run_args(ws) + ["--out", tmp_path / "none", "--resume", out])


def test_resume_out_continues_in_place_and_a_longer_run_is_refused_with_what_to_do(ws, interrupted, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(interrupted, out)
    longer = sft_run_args(ws)
    longer[longer.index("--max-steps") + 1] = 9
    with pytest.raises(InputError) as error:
        run_inprocess(longer + ["--out", out, "--resume", out])
    message = str(error.value)
    assert "--max-steps 6 but this run has 9" in message and "learning rate warms up and decays" in message
    assert f"--model {out} --out NEW_OUT" in message
    run_inprocess(sft_run_args(ws) + ["--out", out, "--resume", out])
    assert_same_weights(out, get_run(ws, "sft-1"))
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert ".lock" not in os.listdir(out)  # the finished model directory is the model alone, and its log
    with pytest.raises(InputError, match=rf"is the final model of a finished run.*--model {out} --out NEW_OUT"):
        run_inprocess(sft_run_args(ws) + ["--out", tmp_path / "again", "--resume", out])


# ----------------------------------------------------------------------------------- --save-total-limit


def test_save_total_limit_keeps_the_newest_and_deletes_only_after_a_newer_one_is_whole(ws, tmp_path, monkeypatch,
                                                                                          capsys):
    real_remove, seen = common.remove_old_checkpoints, []

    def remove_old_checkpoints(out_dir, keep):  # what OUT holds each time deletion is about to happen
        steps = common.numbered_dirs(out_dir, "step-")
        seen.append((sorted(steps), train.checkpoint_problem(steps[max(steps)])))
        return real_remove(out_dir, keep)
    monkeypatch.setattr(common, "remove_old_checkpoints", remove_old_checkpoints)
    out = tmp_path / "out"
    args = sft_run_args(ws) + ["--out", out, "--save-every", 1, "--save-total-limit", 2]
    real_save = crash_when_saving(monkeypatch, "step-4")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_inprocess(args)
    assert sorted(common.numbered_dirs(out, "step-")) == [2, 3]
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    capsys.readouterr()
    run_inprocess(args + ["--resume", out])  # from step-3; it is deleted only once step-4 and step-5 are whole
    assert f"removed {out / 'step-3'} (--save-total-limit 2)" in capsys.readouterr().out
    assert sorted(common.numbered_dirs(out, "step-")) == [4, 5]
    # Each deletion came after the newest checkpoint was in place and whole.
    assert seen == [([1], None), ([1, 2], None), ([1, 2, 3], None), ([2, 3, 4], None), ([3, 4, 5], None)]
    assert not [n for n in os.listdir(out) if n.startswith(".tmp")]
    assert_same_weights(out, get_run(ws, "sft-1"))


# -------------------------------------------------------------------------------------- out of room


@pytest.fixture()
def step2_run(ws, interrupted, tmp_path):
    """A copy of the interrupted run cut back to step-2, the checkpoint that must stay whole."""
    out = tmp_path / "out"
    shutil.copytree(interrupted, out)
    for n in (3, 4):
        shutil.rmtree(out / f"step-{n}")
    common.remove_leftovers(out)  # the crash's .tmp-step-5, which the resume would remove anyway
    return out


def checkpoint_sizes(step):
    """The tensor bytes of a checkpoint's weights and AdamW state, as its error messages write them."""
    return [common.format_bytes(sum(t.nbytes for t in load_file(step / name).values()))
            for name in ("model.safetensors", train.OPTIMIZER_STATE)]


def files_of(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()
            and p.name not in (train.METRICS_FILE, ".lock")}


def test_a_save_that_does_not_fit_is_refused_before_writing(ws, step2_run, monkeypatch):
    before = files_of(step2_run)
    usage = shutil.disk_usage(step2_run)
    monkeypatch.setattr(common.shutil, "disk_usage", lambda path: usage._replace(free=500_000))
    with pytest.raises(train.CheckpointWriteError) as error:
        run_inprocess(sft_run_args(ws) + ["--out", step2_run, "--resume", step2_run, "--save-every", 1])
    message = str(error.value)
    weights_size, optimizer_size = checkpoint_sizes(step2_run / "step-2")
    assert message.startswith(f"cannot save step-3 into {step2_run}: they need 1.2 MB (model.safetensors "
                              f"{weights_size}, {train.OPTIMIZER_STATE} {optimizer_size})")
    assert f"has 500.0 KB free; nothing was written; the last good checkpoint is {step2_run / 'step-2'}" in message
    assert message.endswith(f"make room (or raise ulimit -f), then continue with --resume {step2_run}")
    assert files_of(step2_run) == before and not [n for n in os.listdir(step2_run) if n.startswith(".tmp")]


@pytest.mark.parametrize("file, error", [
    ("model.safetensors", OSError(errno.ENOSPC, "No space left on device")),
    (train.OPTIMIZER_STATE, safetensors.SafetensorError("Error while serializing: I/O error: Disk quota exceeded "
                                                        f"(os error {errno.EDQUOT})"))])
def test_running_out_of_room_while_writing_removes_the_half_checkpoint(ws, step2_run, monkeypatch, file, error):
    real = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):  # half the file, then the error
        if ".tmp-step-3" in str(filename) and (file in str(filename) or "model" in file):
            Path(filename).write_bytes(b"\0" * 1000)
            raise error
        return real(tensors, filename, metadata=metadata)
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    before = files_of(step2_run)
    with pytest.raises(train.CheckpointWriteError) as caught:
        run_inprocess(sft_run_args(ws) + ["--out", step2_run, "--resume", step2_run, "--save-every", 1])
    message = str(caught.value)
    why = "the disk is full" if "model" in file else "the disk quota is exceeded"
    assert message.startswith(f"saving step-3 failed writing {step2_run / '.tmp-step-3' / file}: {why}")
    assert "the checkpoint needs 1.2 MB" in message and f"{step2_run / '.tmp-step-3'} was removed" in message
    assert f"nothing was lost: the last good checkpoint is {step2_run / 'step-2'}" in message
    assert files_of(step2_run) == before and not [n for n in os.listdir(step2_run) if n.startswith(".tmp")]


LIMITED = """import resource, signal, sys
sys.path.insert(0, sys.argv[1])
import common, train
if sys.argv[2] == "mid-write":  # past the check before writing: the write itself meets the limit
    common.check_room = lambda directory, sizes: None
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # as batch systems run jobs: the write fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (600_000, 600_000))
common.cli(lambda: train.main(sys.argv[3:]), "train.py")
"""


@pytest.mark.parametrize("when", ["before", "mid-write"])
def test_the_file_size_limit_gives_one_line_exit_2_and_loses_nothing(ws, step2_run, when):
    before = files_of(step2_run)
    args = sft_run_args(ws) + ["--out", step2_run, "--resume", step2_run, "--save-every", 1]
    result = subprocess.run([sys.executable, "-c", LIMITED, str(ROOT), when, *map(str, args)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: error: ")
    if when == "before":
        size = checkpoint_sizes(step2_run / "step-2")[1]
        assert f"{train.OPTIMIZER_STATE} needs {size}, over this process's file-size limit of 600.0 KB" in lines[0]
    else:
        assert f"failed writing {step2_run / '.tmp-step-3' / train.OPTIMIZER_STATE}: a file exceeds the file-size " \
               "limit (ulimit -f)" in lines[0]
    assert f"the last good checkpoint is {step2_run / 'step-2'}" in lines[0]
    assert files_of(step2_run) == before and not [n for n in os.listdir(step2_run) if n.startswith(".tmp")]


# ------------------------------------------------------------------------------------------------ .lock


def test_the_lock_file_is_removed_at_exit_and_a_stale_handle_is_not_a_lock(tmp_path):
    with common.OutputLock(tmp_path, "first.py"):
        stale = open(tmp_path / ".lock")  # opened while held; the holder removes the file as it ends
        with pytest.raises(InputError, match="in use by first.py"):
            with common.OutputLock(tmp_path, "second.py"):
                pass
    assert not (tmp_path / ".lock").exists()
    assert not common._same_file(stale, tmp_path / ".lock")  # a lock on it would exclude no one: OutputLock re-opens
    with common.OutputLock(tmp_path, "third.py"):
        assert "third.py" in (tmp_path / ".lock").read_text()
    stale.close()


def test_shard_rows_are_the_rows_fsdp2_gives_each_rank():
    """FSDP2 splits dim 0 as torch.chunk does (ceil(n / world) rows a rank, the last ranks fewer or none): the
    rows each rank reads of a saved tensor, for even and uneven sizes (test_train.py's FSDP2 resume checks the
    real thing end to end, bit-exact)."""
    from types import SimpleNamespace

    from torch.distributed.tensor import Replicate, Shard

    for n in range(0, 10):
        for world in range(1, 5):
            chunks = torch.arange(n * 3).view(n, 3).chunk(world) if n else ()
            for rank in range(world):
                local = chunks[rank] if rank < len(chunks) else torch.empty(0, 3)
                mesh = SimpleNamespace(size=lambda w=world: w, get_local_rank=lambda r=rank: r)
                p = SimpleNamespace(shape=(n, 3), device_mesh=mesh, placements=(Shard(0),), to_local=lambda t=local: t)
                rows = train.shard_rows(p)
                assert torch.equal(torch.arange(n * 3).view(n, 3)[rows], local.long())
    p.placements = (Replicate(),)
    with pytest.raises(RuntimeError, match="unexpected sharding"):
        train.shard_rows(p)


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),  # file.write() names no file
                                   safetensors.SafetensorError("I/O error: File too large (os error 27)")])
def test_atomic_write_out_of_room_is_an_oserror_naming_the_file(tmp_path, error):
    """Every atomic write (a DPO reference cache, a config, a results table): one line through common.cli."""
    def write(tmp):
        Path(tmp).write_bytes(b"\0" * 100)
        raise error
    with pytest.raises(OSError) as caught:
        common.atomic_write(tmp_path / "cache.safetensors", write)
    assert caught.value.errno == common.room_errno(error) and caught.value.filename == str(tmp_path / "cache.safetensors")
    assert common.out_of_room(caught.value) in str(caught.value) and os.listdir(tmp_path) == []
    def fail(tmp):
        raise ValueError("not about room")
    with pytest.raises(ValueError, match="not about room"):  # anything else passes through unchanged
        common.atomic_write(tmp_path / "x", fail)
