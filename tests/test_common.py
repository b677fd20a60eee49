"""common.py: the shared plumbing that the method files' own tests reach only indirectly."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common

ROOT = Path(__file__).resolve().parents[1]
ONE_PROCESS = common.Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def test_peak_flops_lookup_by_gpu_name(monkeypatch):
    assert common.peak_bf16_flops(torch.device("cpu")) is None
    for name, expected in [("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 80GB HBM3", 989e12),
                           ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("Some Future GPU", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert common.peak_bf16_flops(torch.device("cuda", 0)) == expected, name


def test_tensor_cache_round_trip_and_every_way_it_is_not_trusted(tmp_path):
    path = str(tmp_path / "cache.safetensors")
    table = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    assert common.read_tensor_cache(path, "t", "fp-1", table.shape, ONE_PROCESS) is None  # missing
    common.write_tensor_cache(path, "t", table, "fp-1", ONE_PROCESS)
    assert torch.equal(common.read_tensor_cache(path, "t", "fp-1", table.shape, ONE_PROCESS), table)
    assert common.read_tensor_cache(path, "t", "fp-2", table.shape, ONE_PROCESS) is None  # stale inputs
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])  # truncated
    assert common.read_tensor_cache(path, "t", "fp-1", table.shape, ONE_PROCESS) is None
    Path(path).write_bytes(b"garbage" * 10)
    assert common.read_tensor_cache(path, "t", "fp-1", table.shape, ONE_PROCESS) is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_read_jsonl_names_file_and_line_for_every_kind_of_bad_line(tmp_path):
    cases = {b'{"a": 1}\n[1, 2]\n': "expected a JSON object", b'{"a": 1}\n{"a": \n': "not valid JSON",
             b'{"a": 1}\n{"a": "\xff"}\n': "not UTF-8", b'{"a": 1}\n' + b"[" * 100_000 + b"\n": "JSON nested too deeply"}
    for i, (text, message) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.jsonl"
        path.write_bytes(text)
        with pytest.raises(common.InputError, match=f"{path}:2: {message}"):
            list(common.read_jsonl(str(path)))
    with pytest.raises(common.InputError, match="is a directory"):
        list(common.read_jsonl(str(tmp_path)))


def test_output_lock_refuses_a_second_holder_and_is_released_on_exit(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]); import common\n"
        "with common.OutputLock(sys.argv[2], 'holder.py'):\n"
        "    print('locked', flush=True); time.sleep(60)"), str(ROOT), str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(common.InputError, match=rf"in use by holder\.py \(pid {holder.pid} "):
            with common.OutputLock(str(tmp_path), "second.py"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with common.OutputLock(str(tmp_path), "third.py"):  # the kernel dropped the dead holder's lock
        assert "third.py" in (tmp_path / ".lock").read_text()


def test_cli_turns_input_errors_into_one_line_and_exit_2():
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import common\n"
              "def main(): raise common.InputError('data.jsonl:3: missing field; add it')\n"
              "common.cli(main, 'prog.py')")
    proc = subprocess.run([sys.executable, "-c", script, str(ROOT)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr == "prog.py: error: data.jsonl:3: missing field; add it\n"


def test_importing_common_does_not_import_torch():
    """verify.py's command line goes through common.cli; it must not pay torch's import time."""
    proc = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import common; "
                           "print('torch' in sys.modules)", str(ROOT)], capture_output=True, text=True)
    assert proc.stdout.strip() == "False"


def test_progress_is_due_every_interval_and_once_at_the_end(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(common.time, "monotonic", lambda: clock[0])
    progress = common.Progress(total=10, done=2, every=5)  # a resumed job: 2 of 10 units done before it
    assert not progress.due(3)  # no time has passed
    clock[0] = 106.0
    assert progress.due(4) and not progress.due(5)  # 6 s passed: due, then not again before 5 s more
    assert progress.eta(4) == "0:00:18"  # 2 units in 6 s, 6 units left
    clock[0] = 107.0
    assert progress.due(10) and not progress.due(10, final=True)  # the end, once
