"""Faults a cluster job meets, and hostile inputs (issue 24, items 5 and 7-12; issue 22, torchrun's summary).

What each group proves:
  - Preemption: SIGTERM stops train.py at a step's end with step-N saved, a line saying how to continue and
    exit 143; the resumed run ends bit-identical to an uninterrupted one. One process abandons a step it
    cannot finish in time; the grace period is a hard bound (watchdog); Ctrl-C is one line, exit 130. Under
    torchrun a SIGTERM to one rank stops every rank at the same step.
  - torchrun: the last lines it prints (its ChildFailedError summary) name our one-line error.
  - A stuck rank: a collective that times out names the rank that stopped answering (exit 124); evaluate's
    wait for slower shards fails only when a rank stops making progress.
  - data.py build: a killed worker ends the build with a clear error; a rerun removes a killed build's
    temporaries, never those of a live one.
  - Data, model directories and flags that used to give a traceback or blame the wrong thing.
  - Warnings: pairs whose chosen equals rejected, groups whose rewards are all equal.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402
import train  # noqa: E402
from common import InputError  # noqa: E402
from scripts import tiny  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def write_jsonl(path, rows):
    Path(path).write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def sft_row(i):
    return {"messages": [{"role": "user", "content": f"What is {i} + {i + 3}?"},
                         {"role": "assistant", "content": f"{i} + {i + 3} = {2 * i + 3}. \\boxed{{{2 * i + 3}}}"}]}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A tiny checkpoint and a 13-row SFT file (4 steps per epoch at batch 4); one thread, as the
    subprocesses run (OMP_NUM_THREADS=1), so that in-process and subprocess runs compute the same bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("faults")
    ws = type("Workspace", (), {})()
    ws.root, ws.model = root, tiny.make_checkpoint(root / "ckpt")
    ws.sft = write_jsonl(root / "sft.jsonl", [sft_row(i) for i in range(13)])
    yield ws
    torch.set_num_threads(threads)


def train_args(ws, out, steps=12, *extra):
    return [str(a) for a in ["--stage", "sft", "--model", ws.model, "--data", ws.sft, "--batch-size", 4,
                             "--max-steps", steps, "--epochs", 10, "--lr", 1e-3, "--out", out, *extra]]


def same_weights(a, b):
    wa, wb = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def last_lines(text, n):
    return "\n".join(text.strip().splitlines()[-n:])


# --------------------------------------------------------------------------------------------- preemption


def test_sigterm_saves_a_step_that_resumes_bit_exactly(ws, tmp_path):
    out = tmp_path / "out"
    run = subprocess.Popen([sys.executable, "train.py", *train_args(ws, out, 24)], cwd=ROOT, env=ENV, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for line in run.stdout:
            if line.startswith("step 2/24"):
                run.send_signal(signal.SIGTERM)
                break
        stdout, stderr = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == common.EXIT_PREEMPTED and "Traceback" not in stderr
    steps = sorted(int(n[5:]) for n in os.listdir(out) if n.startswith("step-"))
    assert len(steps) == 1 and 2 <= steps[0] < 24
    step = out / f"step-{steps[0]}"
    assert stderr.strip().splitlines()[-1] == (f"train.py: preempted (SIGTERM) after step {steps[0]} of 24: saved "
                                               f"{step}; continue with the same command plus --resume {step}")
    train.main(train_args(ws, out, 24, "--resume", step))  # the command the message gives
    train.main(train_args(ws, tmp_path / "whole", 24))
    assert same_weights(out, tmp_path / "whole")
    logged = [json.loads(line) for line in (out / train.METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, 25))


class SignalAt:
    """Wraps train.train_step: sends this process SIGTERM during the call for step `at` (1-based) of this run."""

    def __init__(self, monkeypatch, at):
        self.calls, self.at, self.step = 0, at, train.train_step
        monkeypatch.setattr(train, "train_step", self)

    def __call__(self, run, batch_indices):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs at once, inside the step
        return self.step(run, batch_indices)


@pytest.mark.parametrize("at, extra, saved, message", [
    # The first step of a run has no duration to go by: abandoned, nothing to save.
    (1, [], [], "preempted (SIGTERM) before step 1 ended; nothing new to save: no step had ended"),
    # A step that ends well within the grace is finished and saved.
    (3, [], [3], "preempted (SIGTERM) after step 3 of 12: saved {out}/step-3; continue with the same command "
                 "plus --resume {out}/step-3"),
    # --save-every just wrote it: not written twice.
    (4, ["--save-every", 2], [2, 4], "preempted (SIGTERM) after step 4 of 12: saved {out}/step-4"),
    # The last step: the run simply finishes.
    (12, [], [], None),
])
def test_sigterm_in_every_phase_of_a_run(ws, tmp_path, monkeypatch, at, extra, saved, message):
    SignalAt(monkeypatch, at)
    handler = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "out"
    if message is None:
        train.main(train_args(ws, out, 12, *extra))
        assert (out / "config.json").exists()
    else:
        with pytest.raises(common.RunStopped) as stop:
            train.main(train_args(ws, out, 12, *extra))
        assert stop.value.exit_code == 143 and message.format(out=out) in str(stop.value)
        assert not (out / "config.json").exists()
    assert sorted(int(n[5:]) for n in os.listdir(out) if n.startswith("step-")) == saved
    assert signal.getsignal(signal.SIGTERM) == handler  # train.py's handler lives only as long as the run


def test_sigterm_in_the_first_step_of_a_resumed_run_points_back_to_its_checkpoint(ws, tmp_path, monkeypatch):
    out = tmp_path / "out"
    train.main(train_args(ws, out, 12, "--save-every", 3))
    SignalAt(monkeypatch, 1)
    with pytest.raises(common.RunStopped, match=f"before step 4 ended; nothing new to save: continue with the same "
                                                f"command \\(its --resume {out}/step-3\\)"):
        train.main(train_args(ws, tmp_path / "again", 12, "--resume", out / "step-3"))
    assert not [n for n in os.listdir(tmp_path / "again") if n.startswith("step-")]


PREEMPTION_SCRIPT = """
import os, signal, sys, time
import common
def main():
    with common.PREEMPTION.armed(float(sys.argv[1]), "prog", lambda: "the last good checkpoint is OUT/step-7"):
        os.kill(os.getpid(), signal.SIG{sig})
        time.sleep(30)  # stuck: only the watchdog ends this
common.cli(main, "prog")
"""


@pytest.mark.parametrize("sig, grace, code, line", [
    ("TERM", "0.5", 143, "prog: preempted (SIGTERM): the grace period (0.5 s, --preempt-grace) ran out before the "
                         "run could stop cleanly; the last good checkpoint is OUT/step-7"),
    ("INT", "30", 130, "prog: interrupted (Ctrl-C); files are written whole or not at all"),
])
def test_the_grace_period_is_a_hard_bound_and_ctrl_c_is_one_line(sig, grace, code, line):
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", PREEMPTION_SCRIPT.format(sig=sig), grace], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == code and time.monotonic() - start < 15
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith(line)


# ------------------------------------------------------------------------------------------ under torchrun


def torchrun(args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             *map(str, args)], cwd=ROOT, env=ENV, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kwargs)


def test_torchruns_last_lines_name_the_real_error(ws, tmp_path):
    """Issue 22: torchrun's closing summary shows the root cause from our error file, not a traceback."""
    run = torchrun(["train.py", *train_args(ws, tmp_path / "out", 12, "--batch-size", 3)])
    stdout, stderr = run.communicate(timeout=120)
    message = ("train.py: error: --batch-size 3 must be a multiple of world size (2) x --micro-batch-size (1) = 2")
    assert run.returncode != 0 and message in last_lines(stderr, 3)
    assert "Root Cause" in last_lines(stderr, 12) and "Traceback" not in last_lines(stderr, 12)
    assert not (tmp_path / "out").exists()


def worker_pids(parent: int) -> list[int]:
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return sorted(int(pid) for pid in children)


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(ws, tmp_path):
    out = tmp_path / "out"
    run = torchrun(["train.py", *train_args(ws, out, 24, "--micro-batch-size", 1)])
    try:
        for line in run.stdout:
            if line.startswith("step 2/24"):
                os.kill(worker_pids(run.pid)[-1], signal.SIGTERM)  # one worker only: rank 0 must follow it
                break
        stdout, stderr = run.communicate(timeout=120)
    finally:
        run.kill()
    steps = [n for n in os.listdir(out) if n.startswith("step-")]
    assert len(steps) == 1 and (out / steps[0] / train.TRAINER_STATE).exists()
    assert f"preempted (SIGTERM) after step {steps[0][5:]} of 24: saved {out / steps[0]}" in last_lines(stderr, 3)
    logged = [json.loads(line)["step"] for line in (out / train.METRICS_FILE).read_text().splitlines()]
    assert logged == list(range(1, int(steps[0][5:]) + 1))


# ----------------------------------------------------------------------------------------- a stuck rank

STUCK_SCRIPT = """
import os, sys, time
import torch
import common
rank = int(os.environ["RANK"])
d = common.init_distributed(timeout_s=2)
# 1. A rank slower than the wait's limit but making progress: the others wait for it.
if rank == 1:
    for _ in range(4):
        common.heartbeat(d)
        time.sleep(0.3)
common.wait_for_ranks(d, "progressing", 0.8)
print(f"rank {rank} passed", flush=True)
# 2. A rank that stops making progress: the waiting rank names it.
if rank == 1:
    common.heartbeat(d)
    time.sleep(1.4)
else:
    try:
        common.wait_for_ranks(d, "silent", 0.8)
    except common.RunStopped as e:
        print(f"rank 0 caught: {e} (exit {e.exit_code})", flush=True)
common.barrier(d)
# 3. A collective that times out: rank 1 never joins it.
if rank == 1:
    time.sleep(20)
    sys.exit(0)
common.cli(lambda: common.all_reduce_sum(torch.ones(1), d), "prog")
"""


def test_a_stuck_rank_is_named(tmp_path):
    env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 1000), "WORLD_SIZE": "2"}
    ranks = [subprocess.Popen([sys.executable, "-c", STUCK_SCRIPT], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(2)]
    try:
        stdout, stderr = ranks[0].communicate(timeout=90)
    finally:
        for p in ranks:
            p.kill()
    assert "rank 0 passed" in stdout
    assert ("rank 0 caught: rank 1 stopped answering: no progress from it for 0.8 s (--dist-timeout) while "
            "rank 0 waited for it at 'silent'") in stdout and "(exit 124)" in stdout
    assert ranks[0].returncode == common.EXIT_TIMEOUT and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith(
        "prog: rank 1 stopped answering: a collective waited 2 s (--dist-timeout) for it")


def test_the_dist_timeout_flags_reach_the_process_group(ws, tmp_path, monkeypatch):
    seen = []

    def init_distributed(backend=None, timeout_s=None):
        seen.append(timeout_s)
        raise InputError("stop here")

    monkeypatch.setattr(common, "init_distributed", init_distributed)
    for run in (lambda: train.main(train_args(ws, tmp_path / "t", 12, "--dist-timeout", 2.5)),
                lambda: evaluate.main([ws.model, "--data", problems_file(tmp_path), "--out", str(tmp_path / "e")]),
                lambda: train.main(train_args(ws, tmp_path / "t", 12))):
        with pytest.raises(InputError, match="stop here"):
            run()
    assert seen == [150, 30 * 60, 10 * 60]


def problems_file(tmp_path):
    return write_jsonl(tmp_path / "problems.jsonl", [{"problem": "What is 1 + 1?", "answer": "2"}])


# ---------------------------------------------------------------------------------- data.py build --workers


def raw_file(path, n=40, **overrides):
    return write_jsonl(path, [{"problem": f"What is {i} + 1?", "answer": str(i + 1),
                               "generations": [f"It is {i + 1}.", f"It is {i + 2}."],
                               "correctness": [True, False], **overrides} for i in range(n)])


@pytest.mark.parametrize("workers, doomed_line", [(2, 1), (3, 70)])
def test_a_killed_worker_ends_the_build_with_a_clear_error(tmp_path, monkeypatch, workers, doomed_line):
    raw, out = raw_file(tmp_path / "raw.jsonl", 100), tmp_path / "out"
    process_chunk = data.process_chunk

    def oom_killed(s, path, chunk):  # runs in the forked worker, as the OOM killer would find it
        if any(line_no == doomed_line for line_no, _ in chunk):
            os.kill(os.getpid(), signal.SIGKILL)
        return process_chunk(s, path, chunk)

    monkeypatch.setattr(data, "process_chunk", oom_killed)
    start = time.monotonic()
    with pytest.raises(common.RunStopped, match=f"error: a worker process died while building from {raw} .*"
                                                "run again with fewer --workers or more memory"):
        data.build_from_raw(raw, out, workers=workers)
    assert time.monotonic() - start < 30
    assert os.listdir(out) == []  # no output, and no temporary


def test_a_rerun_removes_a_killed_builds_temporaries_but_never_a_live_ones(tmp_path, capsys):
    raw, out = raw_file(tmp_path / "raw.jsonl", 5), tmp_path / "out"
    out.mkdir()
    leftovers = [out / ".tmp-k1ll3d00", out / ".tmp-ab_cd123"]  # common.atomic_write's names
    for path in leftovers + [out / ".tmp-not-a-build-temporary"]:
        path.write_text("half a file")
    (out / "notes.txt").write_text("mine")
    with common.OutputLock(out, "another build"):  # a live build owns OUT: nothing of it is touched
        with pytest.raises(InputError, match="is in use by another build"):
            data.main(["build", "--raw", raw, "--out", str(out), "--workers", "1"])
    assert all(path.exists() for path in leftovers)
    assert data.main(["build", "--raw", raw, "--out", str(out), "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert all(f"removed {path}, left by an interrupted build" in err for path in leftovers)
    assert sorted(os.listdir(out)) == [".tmp-not-a-build-temporary", "groups.jsonl", "notes.txt",  # .lock: removed
                                       "pairs.jsonl", "report.json", "sft.jsonl"]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False


def start_build(raw, out, stop: signal.Signals) -> tuple[int, str, list[int]]:
    """A `data.py build --workers 2` sent `stop` once its workers run (to its whole process group, as a
    terminal's Ctrl-C is); returns its exit status, its stderr and its workers' pids."""
    build = subprocess.Popen([sys.executable, "data.py", "build", "--raw", raw, "--out", out, "--workers", "2"],
                             cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(workers := worker_pids(build.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # the pool starts with the first chunk, after the temporaries are created
        os.killpg(build.pid, stop)
        stderr = build.communicate(timeout=60)[1]
    finally:
        build.kill()
    return build.returncode, stderr, workers


def test_ctrl_c_on_a_build_with_workers_is_one_line_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    code, stderr, _ = start_build(raw_file(tmp_path / "raw.jsonl", 5000), out, signal.SIGINT)
    assert code == common.EXIT_INTERRUPTED  # the workers ignore it: no traceback of theirs
    assert stderr.strip().splitlines() == [
        "data.py: interrupted (Ctrl-C); files are written whole or not at all, so a rerun (or --resume from the "
        "last step-N) starts cleanly"]
    assert sorted(os.listdir(out)) == []  # no temporaries, and the lock file goes with the run


def test_a_build_killed_mid_way_leaves_no_worker_and_its_rerun_cleans_up(tmp_path, capsys):
    raw, out = raw_file(tmp_path / "raw.jsonl", 5000), tmp_path / "out"
    _, _, workers = start_build(raw, out, signal.SIGKILL)  # the OOM killer's way: no cleanup runs
    deadline = time.monotonic() + 20
    while any(map(alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(workers) == 2 and not any(map(alive, workers))  # the workers died with the build
    leftovers = sorted(n for n in os.listdir(out) if n.startswith(".tmp-"))
    assert len(leftovers) == 3 and not (out / "report.json").exists()
    assert data.main(["build", "--raw", raw, "--out", str(out), "--workers", "1"]) == 0
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]
    err = capsys.readouterr().err
    assert all(f"removed {out / n}, left by an interrupted build" in err for n in leftovers)


def test_build_reads_raw_traces_from_a_pipe_once(tmp_path):
    fifo, text = tmp_path / "raw.fifo", Path(raw_file(tmp_path / "raw.jsonl", 6)).read_text()
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text(text))
    writer.start()
    report = data.build_from_raw(fifo, tmp_path / "out", workers=1)
    writer.join()
    assert report["rows"] == 6 and report["pairs_rows"] == 6


# ------------------------------------------------------------------------------------------- data inputs


PROMPT = [{"role": "user", "content": "What is 1 + 1?"}]


@pytest.mark.parametrize("loader, row, message", [
    (data.load_sft, '{"messages": [], "n": ' + "7" * 5000 + "}", "a number too long to read (Exceeds the limit"),
    (data.load_pairs, '{"prompt": "p", "chosen": "a", "rejected": "b", "id": -' + "1" * 4400 + "}",
     "a number too long to read"),
    (data.load_groups, {"prompt": PROMPT, "completions": ["a", "b"], "rewards": [1e39, 0]},
     "rewards[0] = 1e+39 is beyond float32's range"),
    (data.load_groups, {"prompt": PROMPT, "completions": ["a", "b"], "rewards": [0, -4e38]},
     "rewards[1] = -4e+38 is beyond float32's range"),
    (data.load_groups, '{"prompt": "p", "completions": ["a", "b"], "rewards": [1, ' + "9" * 400 + "]}",
     "rewards[1] = an integer of 400 digits is beyond float32's range"),
    (data.load_groups, {"prompt": PROMPT, "completions": ["a", "b", "c"], "rewards": [3e38, 3e38, 0]},
     "the rewards' magnitudes sum past float32's range"),
    (data.load_groups, '{"prompt": "p", "completions": ["a", "b"], "rewards": [1, 1e999]}',
     "rewards[1] = inf is not a finite number"),
    (data.load_sft, r'{"messages": [{"role": "user", "content": "x\ud800"}, {"role": "assistant", "content": "y"}]}',
     "'messages'[0]['content'] holds a lone UTF-16 surrogate escape"),
    (data.load_pairs, r'{"prompt": "p", "chosen": "a", "rejected": "b\udfff c"}',
     "'rejected' holds a lone UTF-16 surrogate escape"),
    (data.load_groups, r'{"prompt": "p", "completions": ["a", "b"], "rewards": [1, 0], "\ud83dx": 1}',
     "a key of the row holds a lone UTF-16 surrogate escape"),
])
def test_bad_numbers_and_strings_name_file_and_line(tmp_path, loader, row, message):
    path = write_jsonl(tmp_path / "rows.jsonl", [sft_row(0) if loader is data.load_sft else
                                                  {"prompt": "p", "chosen": "a", "rejected": "b"}
                                                  if loader is data.load_pairs else
                                                  {"prompt": "p", "completions": ["a", "b"], "rewards": [1, 0]}, row])
    with pytest.raises(InputError) as error:
        loader(path)
    assert str(error.value).startswith(f"{path}:2: ") and message in str(error.value)


@pytest.mark.parametrize("answer", ["1e999", "-1e999", "NaN"])
def test_a_problem_whose_answer_is_not_a_finite_number_is_refused(tmp_path, answer):
    path = write_jsonl(tmp_path / "problems.jsonl", ['{"problem": "p", "answer": 1}',
                                                      '{"problem": "q", "answer": ' + answer + "}"])
    with pytest.raises(InputError, match=f"{path}:2: needs an 'answer'"):
        data.read_problems(path)


def test_rewards_up_to_the_limits_give_finite_advantages(tmp_path):
    import losses

    edge = [[1.7e38, -1.7e38], [1.1e38, 1.1e38, 0.0], [3.4e38, 0.0], [-3.4e38, 0.0]]
    path = write_jsonl(tmp_path / "groups.jsonl", [{"prompt": "p", "completions": ["a"] * len(r), "rewards": r}
                                                   for r in edge])
    for row in data.load_groups(path):
        advantages = losses.group_advantages(torch.tensor(row["rewards"]), len(row["rewards"]))
        assert torch.isfinite(advantages).all() and advantages.abs().max() > 0.5


def test_an_escaped_surrogate_pair_and_an_escaped_backslash_are_text(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [
        r'{"prompt": "p \ud83d\ude00", "chosen": "a \\ud800", "rejected": "b"}'])
    row = data.load_pairs(path)[0]
    assert row["prompt"][0]["content"] == "p \U0001F600" and row["chosen"] == "a \\ud800"


def test_a_raw_trace_with_a_lone_surrogate_names_its_line(tmp_path):
    raw = write_jsonl(tmp_path / "raw.jsonl", [
        {"problem": "p", "generations": ["a", "b"], "correctness": [True, False]},
        r'{"problem": "q", "generations": ["a\ud800", "b"], "correctness": [true, false]}'])
    with pytest.raises(InputError, match=f"{raw}:2: 'generations'\\[0\\] holds a lone UTF-16 surrogate"):
        data.build_from_raw(raw, tmp_path / "out", workers=1)


@pytest.mark.parametrize("program", ["train", "evaluate"])
def test_a_pipe_as_data_is_refused_with_the_reason(ws, tmp_path, program):
    fifo = tmp_path / "data.fifo"
    os.mkfifo(fifo)
    run = (lambda: train.main(train_args(ws, tmp_path / "out", 12)[:5] + [str(fifo)]
                              + train_args(ws, tmp_path / "out", 12)[6:])) if program == "train" else \
        (lambda: evaluate.main([ws.model, "--data", str(fifo), "--out", str(tmp_path / "out"), *CHEAP_EVAL]))
    with pytest.raises(InputError, match=f"--data {fifo}: not a regular file .*reads it (more than once|twice)"):
        run()  # refused before opening it: an open() of a FIFO without a writer would wait forever
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------------------------- model directories


def broken(ws, tmp_path, name, content):
    model = tmp_path / "model"
    shutil.copytree(ws.model, model)
    text = content if isinstance(content, str) else json.dumps(content)
    if name == "config.json" and isinstance(content, dict):
        text = json.dumps({**json.loads((model / name).read_text()), **content})
    (model / name).write_text(text)
    return model


MODEL_CASES = [
    ("config.json", "[1, 2]", "a JSON list, but config.json must be a JSON object"),
    ("config.json", "{not json", "config.json: not valid JSON"),
    ("config.json", {"hidden_size": "64"}, 'hidden_size: is "64"; it must be an integer >= 1'),
    ("config.json", {"num_attention_heads": 0}, "num_attention_heads: is 0; it must be an integer >= 1"),
    ("config.json", {"num_key_value_heads": 3}, "must be a multiple of num_key_value_heads (3)"),
    ("config.json", {"rope_parameters": {"rope_theta": -1, "rope_type": "default"}},
     "rope_theta: is -1; it must be a finite number > 0"),
    ("config.json", {"rms_norm_eps": "1e-6"}, 'rms_norm_eps: is "1e-6"; it must be a finite number > 0'),
    ("config.json", {"hidden_size": 60, "num_attention_heads": 4}, "head_dim: is 15"),
    ("config.json", {"vocab_size": 1e3}, "vocab_size: is 1000.0; it must be an integer >= 1"),
    ("tokenizer.json", "{not json", "tokenizer.json: not a tokenizer.json the tokenizers library can read"),
    ("tokenizer.json", {"model": {"type": "Nothing"}}, "tokenizer.json: not a tokenizer.json"),
    ("tokenizer.json", "[]", "tokenizer.json: not a tokenizer.json"),
    ("tokenizer_config.json", "{not json", "tokenizer_config.json: not valid JSON"),
    ("tokenizer_config.json", '"eos"', "a JSON str, but tokenizer_config.json must be a JSON object"),
    ("special_tokens_map.json", "[]", "special_tokens_map.json must be a JSON object"),
]
TRAIN_ONLY = [  # what only a training run's save reads
    ("generation_config.json", "{not json", "generation_config.json: not valid JSON"),
    ("generation_config.json", "[]", "a JSON list, but generation_config.json must be a JSON object"),
    ("generation_config.json", {"top_p": 2}, "top_p is 2; it must be a number in (0, 1]"),
    ("generation_config.json", {"do_sample": "yes"}, 'do_sample is "yes"; it must be true or false'),
]


@pytest.mark.parametrize("name, content, message", MODEL_CASES + TRAIN_ONLY)
def test_a_bad_model_directory_is_refused_before_step_1(ws, tmp_path, name, content, message):
    model, out = broken(ws, tmp_path, name, content), tmp_path / "out"
    args = train_args(ws, out, 12)
    args[args.index("--model") + 1] = str(model)
    with pytest.raises(InputError) as error:
        train.main(args)
    assert str(model / name) in str(error.value) and message in str(error.value)
    assert not out.exists()


CHEAP_EVAL = ["--num-samples", "1", "--max-new-tokens", "1"]  # should a refusal fail, the test stays short


@pytest.mark.parametrize("name, content, message", MODEL_CASES)
def test_evaluate_refuses_a_bad_model_directory_before_sampling(ws, tmp_path, name, content, message):
    model, out = broken(ws, tmp_path, name, content), tmp_path / "out"
    with pytest.raises(InputError) as error:
        evaluate.main([str(model), "--data", problems_file(tmp_path), "--out", str(out), *CHEAP_EVAL])
    assert str(model / name) in str(error.value) and message in str(error.value)
    assert not out.exists()


@pytest.mark.parametrize("name, content, message", [
    ("tokenizer_config.json", "[]", "step-2/tokenizer_config.json: a JSON list"),
    ("tokenizer.json", "{", "step-2/tokenizer.json: not a tokenizer.json"),
    ("config.json", '{"model_type": "qwen2"}', "step-2/config.json: hidden_size, intermediate_size"),
])
def test_a_resumed_checkpoints_files_are_checked_too(ws, tmp_path, name, content, message):
    """A resumed step-N's tokenizer files are checked before step 1: a damaged checkpoint is refused early."""
    out = tmp_path / "out"
    train.main(train_args(ws, out, 4, "--save-every", 2))
    (out / "step-2" / name).write_text(content)
    with pytest.raises(InputError, match=message):
        train.main(train_args(ws, tmp_path / "again", 4, "--resume", out / "step-2"))
    assert not (tmp_path / "again").exists()


# -------------------------------------------------------------------------------------------------- flags


@pytest.mark.parametrize("program, flags, message", [
    ("train", ["--seed", "-1"], "argument --seed: must be an integer in [0, 2**64), got '-1'"),
    ("train", ["--seed", str(2**64)], "argument --seed: must be an integer in [0, 2**64)"),
    ("train", ["--seed", "1.5"], "argument --seed: must be an integer in [0, 2**64), got '1.5'"),
    ("train", ["--preempt-grace", "-1"], "argument --preempt-grace: must be a finite number >= 0"),
    ("train", ["--dist-timeout", "0"], "argument --dist-timeout: must be a number of minutes in (0, 10080]"),
    ("train", ["--dist-timeout", "nan"], "argument --dist-timeout: must be a number of minutes"),
    ("evaluate", ["--seed", "-3"], "argument --seed: must be an integer in [0, 2**32), got '-3'"),
    ("evaluate", ["--seed", str(2**32)], "argument --seed: must be an integer in [0, 2**32)"),
    ("evaluate", ["--device", "bogus"], "argument --device: must be cpu, cuda or cuda:N, got 'bogus'"),
    ("evaluate", ["--device", "mps"], "argument --device: must be cpu, cuda or cuda:N, got 'mps'"),
    ("evaluate", ["--device", "meta"], "argument --device: must be cpu, cuda or cuda:N, got 'meta'"),
    ("evaluate", ["--device", "cuda:-1"], "argument --device: must be cpu, cuda or cuda:N, got 'cuda:-1'"),
    ("evaluate", ["--device", "cuda:99"], "argument --device: 'cuda:99'"),
    ("evaluate", ["--dist-timeout", "-5"], "argument --dist-timeout: must be a number of minutes"),
])
def test_flags_out_of_range_are_blamed_on_the_flag(ws, tmp_path, capsys, program, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        if program == "train":
            train.parse_args(train_args(ws, tmp_path / "out", 12) + flags)
        else:
            evaluate.parse_args([ws.model, "--data", "p.jsonl"] + flags)
    assert exit_info.value.code == 2 and f"{program}.py: error: {message}" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without a GPU")
def test_device_cuda_without_a_gpu_says_so(capsys):
    with pytest.raises(SystemExit):
        evaluate.parse_args(["ckpt", "--data", "p.jsonl", "--device", "cuda"])
    assert ("argument --device: 'cuda' needs a CUDA GPU and none is visible here (torch.cuda.is_available() is "
            "False); use --device cpu") in capsys.readouterr().err


def test_the_extreme_seeds_are_accepted(ws, tmp_path):
    assert train.parse_args(train_args(ws, tmp_path / "o", 12) + ["--seed", str(2**64 - 1)]).seed == 2**64 - 1
    assert evaluate.parse_args([ws.model, "--data", "p.jsonl", "--seed", str(2**32 - 1), "--device", "cpu:0"]).seed \
        == 2**32 - 1


# ------------------------------------------------------------------------------------------------ warnings


def test_pairs_and_groups_that_train_to_nothing_are_counted(ws):
    tokenizer = data.load_tokenizer(ws.model)
    pairs = [{"prompt": PROMPT, "chosen": c, "rejected": r, "source": f"f:{i}"}
             for i, (c, r) in enumerate([("same", "same"), ("a", "b"), ("x y", "x y"), ("x y", "x  y")])]
    _, report = data.tokenize_pairs(pairs, tokenizer, "qwen", None)
    assert report["warning_chosen_equals_rejected"] == 2
    groups = [{"prompt": PROMPT, "completions": ["a", "b", "c"], "rewards": r, "source": f"f:{i}"}
              for i, r in enumerate([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 1.0], [0.5, 0.5, 0.25]])]
    _, report = data.tokenize_groups(groups, tokenizer, "qwen", None)
    assert report["warning_groups_equal_rewards"] == 2


def test_build_reports_duplicate_pairs_and_equal_reward_groups(tmp_path):
    raw = write_jsonl(tmp_path / "raw.jsonl", [
        {"problem": "p1", "generations": ["same", "same"], "correctness": [True, False]},  # chosen == rejected
        {"problem": "p2", "generations": ["a", "b"], "correctness": [True, False]},
        {"problem": "p3", "generations": ["a", "b", "c"], "correctness": [True, True, True]},  # all equal
        {"problem": "p4", "generations": ["a", "b"], "correctness": [False, False]},  # all equal
    ])
    lines = []
    report = data.build_from_raw(raw, tmp_path / "out", workers=1, log=lines.append)
    assert report["warning_chosen_equals_rejected"] == 1 and report["warning_groups_equal_rewards"] == 2
    assert json.loads((tmp_path / "out" / "report.json").read_text())["warning_groups_equal_rewards"] == 2
    assert "warning: 1 written pairs whose chosen text equals the rejected (no preference to learn)" in lines
    assert "warning: 2 written groups whose rewards are all equal (advantages 0: they train to nothing)" in lines
