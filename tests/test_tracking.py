"""Watching and comparing runs: --report-to (TensorBoard, W&B), evaluation during training (--eval-steps), and
the plot and results-table commands, on real tiny runs.

What each test proves:
  - TensorBoard's event files, read back with tensorboard's own reader, hold every number of every
    metrics.jsonl row under its TRL name (train/..., eval/...) at its step, equal to fp32 rounding (the
    precision of an event's simple_value).
  - W&B (a stand-in `wandb` module that records its calls): init once with the flags as config, one log per
    row with the same values; off by default, neither library is imported; a missing library is a one-line
    error before any work.
  - --eval-steps changes no training number (loss, gradient norm, weights), logs eval/ keys at its multiples
    only, and its pass@1 equals evaluate.py's on the saved model with the same settings; 2 processes give the
    same scores as 1.
  - The plot draws the summed and the per-token log-probs in separate panels; the table's cells are the
    summaries' pass@1 ± SEM.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
import evaluate  # noqa: E402
import train  # noqa: E402
from common import InputError  # noqa: E402
from scripts import plot_runs, results_table, tiny  # noqa: E402


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def solution(i, correct=True):
    answer = 2 * i + 3 if correct else 2 * i + 4
    return f"{i} + {i + 3} = {answer}. The answer is \\boxed{{{answer}}}."


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracking")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ns = type("Workspace", (), {})()
    ns.root = root
    ns.model = tiny.make_checkpoint(root / "ckpt")
    question = lambda i: [{"role": "user", "content": f"What is {i} + {i + 3}?"}]  # noqa: E731
    answer = lambda i: [{"role": "assistant", "content": solution(i)}]  # noqa: E731
    ns.sft = write_jsonl(root / "sft.jsonl", [{"messages": question(i) + answer(i)} for i in range(8)])
    ns.pairs = write_jsonl(root / "pairs.jsonl", [{"prompt": question(i), "chosen": solution(i),
                                                   "rejected": solution(i, False)} for i in range(8)])
    ns.problems = write_jsonl(root / "problems.jsonl", [{"problem": f"What is {i} + {i + 3}?", "answer": str(2 * i + 3)}
                                                        for i in range(5)])
    yield ns
    torch.set_num_threads(threads)


def sft_args(ws, out, *extra):
    return [str(a) for a in ["--stage", "sft", "--model", ws.model, "--data", ws.sft, "--batch-size", 4,
                             "--max-steps", 4, "--lr", 1e-3, "--out", out, *extra]]


EVAL = ["--eval-steps", 2, "--eval-samples", 3, "--eval-max-new-tokens", 12]


def metrics(out):
    return [json.loads(line) for line in Path(out, train.METRICS_FILE).read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(ws):
    """An sft run with TensorBoard and evaluation, the same run without either, and a simpo run after it."""
    outs = {name: str(ws.root / name) for name in ("tracked", "plain", "simpo")}
    train.main(sft_args(ws, outs["tracked"], "--report-to", "tensorboard", *EVAL, "--eval-data", ws.problems))
    train.main(sft_args(ws, outs["plain"]))
    train.main([str(a) for a in ["--stage", "simpo", "--model", outs["plain"], "--data", ws.pairs, "--batch-size", 4,
                                 "--max-steps", 3, "--lr", 1e-3, "--out", outs["simpo"]]])
    return outs


def test_tensorboard_events_hold_every_metric_of_every_row(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(runs["tracked"], "tensorboard"), size_guidance={"scalars": 0}).Reload()
    rows = metrics(runs["tracked"])
    expected = {(common.tracker_key(k), row["step"]): v for row in rows for k, v in row.items()
                if k != "step" and isinstance(v, (int, float))}
    found = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    assert found.keys() == expected.keys()
    for key, value in expected.items():
        assert found[key] == np.float32(value), key  # an event's simple_value is fp32
    assert ("train/loss", 1) in found and ("eval/pass@1", 2) in found and ("eval/pass@1", 4) in found
    assert ("train/logps/chosen", 3) in found


def run_python(code, tmp_path, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_off_by_default_imports_no_tracker(ws, tmp_path):
    out = tmp_path / "out"
    code = (f"import sys, train; train.main({sft_args(ws, out, '--max-steps', 1)!r}); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorboard', 'wandb', 'evaluate') "
            "or m == 'torch.utils.tensorboard'))")
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert not (out / "tensorboard").exists()


BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == {package!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}")
sys.meta_path.insert(0, Block())
import common, train
common.cli(lambda: train.main({argv!r}), 'train.py')
"""


@pytest.mark.parametrize("package", ["tensorboard", "wandb"])
def test_a_missing_tracker_is_one_line_before_any_work(ws, tmp_path, package):
    out = tmp_path / "out"
    result = run_python(BLOCK.format(package=package, argv=sft_args(ws, out, "--report-to", package)), tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"train.py: error: --report-to {package}: the {package} package")
    assert f"pip install {package}" in lines[0]
    assert not out.exists()


FAKE_WANDB = """
import json, os
CALLS = os.environ["FAKE_WANDB_LOG"]
def _record(kind, **kwargs):
    with open(CALLS, "a") as f:
        f.write(json.dumps({"call": kind, **kwargs}) + "\\n")
class Run:
    def log(self, values, step=None):
        _record("log", values=values, step=step)
    def finish(self):
        _record("finish")
def init(**kwargs):
    _record("init", **kwargs)
    return Run()
"""


def test_wandb_gets_every_row_once_with_the_flags_as_config(ws, tmp_path):
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "wandb.py").write_text(FAKE_WANDB)
    out, log = tmp_path / "run", tmp_path / "calls.jsonl"
    code = f"import train; train.main({sft_args(ws, out, '--report-to', 'wandb')!r})"
    result = run_python(code, tmp_path, {"PYTHONPATH": str(tmp_path / "fake"), "FAKE_WANDB_LOG": str(log),
                                         "WANDB_PROJECT": "toy"})
    assert result.returncode == 0, result.stderr[-3000:]
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c["call"] for c in calls] == ["init"] + ["log"] * 4 + ["finish"]
    assert calls[0]["project"] == "toy" and calls[0]["name"] == "run" and calls[0]["config"]["seed"] == 42
    for call, row in zip(calls[1:5], metrics(out)):
        assert call["step"] == row["step"]
        assert call["values"] == {common.tracker_key(k): v for k, v in row.items()
                                  if k != "step" and isinstance(v, (int, float))}


def test_evaluation_during_training_changes_no_training_number(runs):
    tracked, plain = metrics(runs["tracked"]), metrics(runs["plain"])
    for a, b in zip(tracked, plain):
        for key in ("loss", "grad_norm", "learning_rate", "logps/chosen", "tokens"):
            assert a[key] == b[key], key
    assert [r["step"] for r in tracked if "eval/pass@1" in r] == [2, 4]
    final = lambda out: load_file(os.path.join(out, "model.safetensors"))  # noqa: E731
    assert all(torch.equal(final(runs["tracked"])[k], v) for k, v in final(runs["plain"]).items())


def test_evaluation_during_training_equals_evaluate_py_on_the_saved_model(ws, runs, tmp_path):
    """The step-4 evaluation saw the weights the final model holds (fp32 both): evaluate.py with the same
    settings draws the same samples, so every score agrees exactly."""
    summary = evaluate.main([runs["tracked"], "--data", ws.problems, "--num-samples", "3", "--temperature", "0.6",
                             "--top-p", "0.95", "--max-new-tokens", "12", "--seed", "42", "--out",
                             str(tmp_path / "eval")])
    row = metrics(runs["tracked"])[3]
    assert row["eval/pass@1"] == summary["pass@1"] and row["eval/maj@3"] == summary["maj@3"]
    assert row["eval/pass@1_stderr"] == summary["pass@1_stderr"]
    assert row["eval/mean_response_tokens"] == summary["mean_response_tokens"] > 0
    assert row["eval/truncated"] == summary["truncated"] and row["eval/no_answer"] == summary["no_answer"]


def test_two_processes_evaluate_as_one(ws, runs, tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
               *sft_args(ws, out, *EVAL, "--eval-data", ws.problems)]
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    for a, b in zip(metrics(out), metrics(runs["tracked"])):
        assert [k for k in a if k.startswith("eval/")] == [k for k in b if k.startswith("eval/")]
        for key in (k for k in a if k.startswith("eval/")):
            assert a[key] == pytest.approx(b[key], abs=1e-12), key


@pytest.mark.parametrize("extra, message", [
    (["--eval-steps", "2"], "--eval-steps and --eval-data go together"),
    (["--eval-steps", "2", "--eval-data", "missing.jsonl"], "--eval-data missing.jsonl: no such file"),
    (["--eval-steps", "2", "--eval-data", "X", "--fsdp"], "--eval-steps does not work with --fsdp"),
])
def test_evaluation_flags_are_checked_before_any_work(ws, tmp_path, extra, message):
    with pytest.raises(InputError, match=message.replace("-", r"\-")):
        train.main(sft_args(ws, tmp_path / "out", *extra))
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ plot and results table


def test_plot_keeps_summed_and_per_token_log_probs_apart(runs, tmp_path):
    out = tmp_path / "plots" / "runs.png"
    drawn = plot_runs.plot([runs["tracked"], runs["simpo"]], str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert drawn == ["loss", "learning rate", "gradient norm", "log π(y|x), summed over the response",
                     "log π(y|x) / |y|, mean per token", "evaluation during training"]
    runs_read = [("sft", "sft", metrics(runs["tracked"])), ("simpo", "simpo", metrics(runs["simpo"]))]
    summed = plot_runs.panel_lines(plot_runs.PANELS[3], runs_read)
    per_token = plot_runs.panel_lines(plot_runs.PANELS[4], runs_read)
    assert {line[0] for line in summed} == {0} and {line[0] for line in per_token} == {1}
    assert [line[-1] for line in per_token] == ["simpo (simpo) chosen", "simpo (simpo) rejected"]


def test_plot_refuses_a_directory_without_metrics(tmp_path):
    with pytest.raises(InputError, match="no metrics.jsonl"):
        plot_runs.plot([str(tmp_path)], str(tmp_path / "x.png"))


def test_results_table_holds_each_summarys_pass_at_1_and_sem(ws, runs, tmp_path):
    benchmarks = {"math500": ws.problems, "aime24": write_jsonl(tmp_path / "aime24.jsonl", [
        {"problem": "What is 2 + 2?", "answer": "4"}, {"problem": "What is 3 + 3?", "answer": "6"}])}
    dirs, summaries = [], {}
    for model in ("tracked", "simpo"):
        for name, path in benchmarks.items():
            data_file = tmp_path / f"{name}.jsonl"
            if not data_file.exists():
                data_file.write_text(Path(path).read_text())
            out = tmp_path / "eval" / model / name
            summaries[model, name] = evaluate.main([runs[model], "--data", str(data_file), "--num-samples", "2",
                                                    "--max-new-tokens", "8", "--out", str(out)])
            dirs.append(str(out))
    result = subprocess.run([sys.executable, "-m", "scripts.results_table", *dirs, "--out", str(tmp_path / "t.md")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "| model | MATH-500 | AIME24 | Avg. |" and (tmp_path / "t.md").read_text() == result.stdout
    for line, model in zip(lines[2:4], ("tracked", "simpo")):
        cells = [c.strip() for c in line.strip("|").split("|")]
        s = [summaries[model, b] for b in ("math500", "aime24")]
        assert cells[0] == model
        assert cells[1:3] == [f"{100 * x['pass@1']:.1f} ± {100 * x['pass@1_stderr']:.1f}" for x in s]
        mean = (s[0]["pass@1"] + s[1]["pass@1"]) / 2
        assert cells[3].split(" ± ")[0] == f"{100 * mean:.1f}"
    with pytest.raises(InputError, match="two evaluations of"):
        results_table.build_table([results_table.read_summary(d) for d in dirs[:1] * 2])


def test_a_resumed_run_hides_what_the_interrupted_one_logged_after_its_checkpoint(tmp_path):
    """Steps 1-4 logged, the run killed after its step-2 checkpoint, resumed from step 2: TensorBoard shows
    the resumed run's steps 3 and 4, as metrics.jsonl (prepare_run_dir trims it to step 2)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    one = common.Dist(0, 1, 0, torch.device("cpu"))
    first = common.open_tracker("tensorboard", tmp_path, {}, 0, one)
    for step in range(1, 5):
        first.log({"step": step, "loss": float(step)})
    first.close()
    resumed = common.open_tracker("tensorboard", tmp_path, {}, 2, one)
    for step in (3, 4):
        resumed.log({"step": step, "loss": 10.0 * step})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    # What TensorBoard's readers act on: the resumed file opens with a SessionLog START at step 3 (purge_step).
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.compat.proto.event_pb2 import SessionLog

    files = sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*"))  # TIME.HOST.PID.COUNTER: in order
    starts = [[e.step for e in EventFileLoader(str(f)).Load() if e.session_log.status == SessionLog.START]
              for f in files]
    assert starts == [[1], [3]]
