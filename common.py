"""common.py: the plumbing every method file shares, written once (nanochat keeps its common.py the same way).

    InputError, cli          one error style for every command line: "PROG: error: MESSAGE", exit 2, no traceback
    checked, POSITIVE, NON_NEGATIVE, FINITE, COUNT, HelpFormatter, config_defaults
                             argparse types that check values; help with each default once; --config JSON
                             files checked by argparse itself and applied as defaults
    atomic_write, write_text, write_json
                             write to a temporary file beside the target, then rename: never half a file
    read_jsonl               (line number, object) per line; bad lines name FILE:LINE
    read_lines, parse_jsonl_line
                             the same in two steps, for readers that parse in worker processes
    sha256_file, sha256_files
                             content fingerprints (resume checks, run settings)
    move_files_into          publish a finished directory's files into another, one file last
    format_seconds, Progress h:mm:ss; when a progress line is due and the time left
    OutputLock               one run owns an output directory at a time
    numbered_dirs, remove_leftovers, trim_jsonl_log, checkpoints_up_to, last_good, damaged_checkpoint,
    prepare_run_dir          what a resumed run finds in its output directory: OUT/step-N, .tmp-* left by an
                             interrupted write, an append-only log whose last line a kill cut short; which
                             checkpoint to go on from; a fresh run or a resume never overwrites a checkpoint
    check_run_settings       OUT/run.json: the settings a run continuing OUT must share with the one that began it
    open_shard, shard_files, read_shards, merge_shards
                             a results table every rank appends to in its own file; read back on resume, merged
    Dist, init_distributed, barrier, broadcast, all_reduce_sum, gather_to_main, on_main_rank, close_distributed,
    print0, log
                             the process group from torchrun's environment, or one process without one;
                             rank 0 does a thing (a write) and every rank learns whether it worked;
                             progress lines printed once, by rank 0 (print0), or by every rank (log)
    read_tensor_cache, write_tensor_cache, cached_tensor
                             a computed tensor kept in a safetensors file under a fingerprint of its inputs
    REPORT_TO, check_tracker, tracker_key, Tracker, open_tracker
                             experiment tracking (--report-to): metrics.jsonl rows also sent to TensorBoard or
                             Weights & Biases, from rank 0, the library imported only when asked
    PEAK_BF16_FLOPS, peak_bf16_flops
                             a GPU's peak bf16 FLOP/s, for MFU

Nothing here knows about models, data formats or losses: those live in the method files.
"""

from __future__ import annotations  # annotations name torch types without importing torch

import argparse
import gc
import hashlib
import json
import math
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Iterator


# ----------------------------------------------------------------------------------------------------------
# Errors: bad input is the user's to fix, so it gets a sentence, not a traceback.


class InputError(ValueError):
    """Bad input (a file, a flag, a key). The message names the culprit (FILE:LINE, --flag or key) and says
    what to do. A ValueError, so library callers that catch ValueError keep working."""


def cli(main: Callable[[], object], prog: str) -> None:
    """Run a command's main(); an InputError (or an OSError such as a missing or unreadable file) becomes
    one line on stderr and exit status 2. Under torchrun every rank finds the same bad input: rank 0 says it.
    Anything else is a bug and keeps its traceback."""
    try:
        result = main()
    except (InputError, OSError) as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    sys.exit(result if isinstance(result, int) else 0)


# ----------------------------------------------------------------------------------------------------------
# Command lines: argparse does the checking, of flags and of --config files alike


def checked(convert: Callable, ok: Callable, what: str) -> Callable:
    """An argparse `type` that converts, then checks: `--lr inf` fails at parse time with argparse's own
    'argument --lr: must be a finite number > 0, got 'inf''."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value
    return parse


POSITIVE = checked(float, lambda x: 0 < x < math.inf, "a finite number > 0")
NON_NEGATIVE = checked(float, lambda x: 0 <= x < math.inf, "a finite number >= 0")
FINITE = checked(float, math.isfinite, "a finite number")
COUNT = checked(int, lambda n: n >= 1, "an integer >= 1")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each default shown once, and none for flags without one (None) or switches (False)."""

    def _get_help_string(self, action):
        no_default = action.default is None or action.default is False
        return action.help if no_default else super()._get_help_string(action)


def config_defaults(make_parser: Callable[..., argparse.ArgumentParser], path: str) -> dict:
    """A --config JSON file's values as {dest: value}, for parser.set_defaults (flags given on the command
    line still win). Each key becomes its flag on a command line of its own, parsed by a parser made with
    exit_on_error=False: argparse checks types and choices exactly as for flags. Keys are the flags' names
    (hyphens or underscores); a key starting with '#' is a comment; null leaves the default."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"--config {path}: cannot read it as JSON ({e})") from None
    if not isinstance(config, dict):
        raise InputError(f"--config {path}: must hold a JSON object of flag: value")
    parser = make_parser(exit_on_error=False)
    defaults, argv = vars(parser.parse_args([])), []
    config = {k.replace("-", "_"): v for k, v in config.items() if not k.startswith("#") and v is not None}
    for dest, value in config.items():
        if dest not in defaults or dest == "config":
            raise InputError(f"--config {path}: unknown key {dest!r}; valid keys are the flags: "
                             + ", ".join(sorted(set(defaults) - {"config"})))
        flag, switch = "--" + dest.replace("_", "-"), defaults[dest] is False
        if isinstance(value, (list, dict)) or isinstance(value, bool) != switch:
            raise InputError(f"--config {path}: {dest!r} = {json.dumps(value)} is not a valid value for {flag}"
                             + (" (true or false)" if switch else ""))
        argv += ([flag] if value else []) if switch else [f"{flag}={value}"]
    try:
        parsed = parser.parse_args(argv)
    except argparse.ArgumentError as e:
        raise InputError(f"--config {path}: {e}") from None
    return {dest: getattr(parsed, dest) for dest in config}


# ----------------------------------------------------------------------------------------------------------
# Files


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, write: Callable[[str], None]) -> None:
    """write(tmp) fills a temporary file in the same directory, which then replaces `path` in one rename:
    a crash leaves the old file or the new one, never half of one, and never a stray temporary."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are readable like any other file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_jsonl(path) -> Iterator[tuple[int, dict]]:
    """Yield (line_no, object) for each non-blank line, line numbers from 1. Every failure names FILE:LINE:
    invalid JSON, a non-object, invalid UTF-8, or nesting too deep for Python's recursion limit."""
    for line_no, raw in read_lines(path):
        obj = parse_jsonl_line(raw, f"{path}:{line_no}")
        if obj is not None:
            yield line_no, obj


def read_lines(path) -> Iterator[tuple[int, bytes]]:
    """Yield (line_no, raw bytes) for every line, numbered from 1: for readers that parse elsewhere (data.py
    build hands raw lines to worker processes) with parse_jsonl_line."""
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory; pass a JSONL file")
    with open(path, "rb") as f:
        yield from enumerate(f, start=1)


def parse_jsonl_line(raw: bytes, where: str) -> dict | None:
    """One JSONL line -> its object, or None for a blank line; `where` (FILE:LINE) starts every error."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{where}: not UTF-8 (byte {e.start + 1} of the line); re-encode the file "
                         "as UTF-8") from None
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise InputError(f"{where}: JSON nested too deeply to read; flatten the row") from None
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def sha256_file(path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_files(paths) -> dict[str, str]:
    """{file name: sha256} of several files (a checkpoint's weight shards): what a resume must find unchanged."""
    return {os.path.basename(path): sha256_file(path) for path in paths}


def move_files_into(src_dir, dst_dir, last: str) -> None:
    """Rename every file of src_dir into dst_dir (same filesystem), the one named `last` last, then remove
    src_dir: a reader that waits for `last` (a checkpoint's config.json) finds the others already whole."""
    for name in sorted(os.listdir(src_dir), key=lambda n: n == last):
        os.replace(os.path.join(src_dir, name), os.path.join(dst_dir, name))
    os.rmdir(src_dir)


def format_seconds(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """The clock of a job of `total` units (bytes, samples, steps), `done` of them before it started: due()
    says when a progress line is worth printing (every `every` seconds, and once at the end: when done reaches
    total, or final); eta(done) is the time left at the rate so far, as h:mm:ss."""

    def __init__(self, total: float, done: float = 0, every: float = 10.0):
        self.total, self.first, self.every, self.ended = total, done, every, False
        self.start = self.last = time.monotonic()

    def elapsed(self) -> float:
        return max(time.monotonic() - self.start, 1e-9)

    def due(self, done: float, final: bool = False) -> bool:
        now, end = time.monotonic(), final or done >= self.total
        if self.ended or (now - self.last < self.every and not end):
            return False
        self.last, self.ended = now, end
        return True

    def eta(self, done: float) -> str:
        return format_seconds(self.elapsed() * (self.total - done) / max(done - self.first, 1e-9))


# ----------------------------------------------------------------------------------------------------------
# One run per output directory


class OutputLock:
    """An exclusive advisory lock on OUT/.lock (flock), held for the life of the run. A second run on the
    same OUT is refused at once with the holder's pid, host and start time. The kernel drops the lock when
    its process dies, however it dies, so a lock file left by a killed run is stale and simply re-taken.
    (flock is per host: on a network filesystem shared by several hosts it may not exclude a run on another
    host; one output directory per run is still the rule there.)"""

    def __init__(self, out_dir, prog: str):
        self.path = os.path.join(out_dir, ".lock")
        self.prog = prog
        self.file = None

    def __enter__(self):
        import fcntl

        out_dir = os.path.dirname(self.path)
        try:
            os.makedirs(out_dir, exist_ok=True)
            f = open(self.path, "a+", encoding="utf-8")
        except OSError as e:  # a file in the way, a read-only or missing parent: say which directory
            raise InputError(f"{out_dir}: cannot write there ({e.strerror}); choose a writable output "
                             "directory") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise InputError(f"{os.path.dirname(self.path)} is in use by {holder}; wait for that run to end "
                             "or choose another output directory") from None
        f.seek(0)
        f.truncate()
        f.write(f"{self.prog} (pid {os.getpid()} on {socket.gethostname()}, started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        f.flush()
        self.file = f
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()  # closing releases the flock; the file stays, harmless once unlocked
            self.file = None
        return False


# ----------------------------------------------------------------------------------------------------------
# Run directories: what an interrupted run leaves behind, for the run that continues it


def numbered_dirs(parent, prefix: str) -> dict[int, str]:
    """{N: PARENT/PREFIX-N} for every entry of PARENT named PREFIX followed by digits (OUT/step-N)."""
    names = os.listdir(parent) if os.path.isdir(parent) else []
    return {int(n[len(prefix):]): os.path.join(parent, n) for n in names
            if n.startswith(prefix) and n[len(prefix):].isdigit()}


def remove_leftovers(out_dir) -> list[str]:
    """Delete the .tmp-* files and directories an interrupted atomic write left in out_dir (atomic_write's
    prefix; a never-whole save); return their paths. Only for a directory this run owns (OutputLock)."""
    found = [os.path.join(out_dir, n) for n in sorted(os.listdir(out_dir)) if n.startswith(".tmp-")]
    for path in found:
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    return found


def trim_jsonl_log(path, keep: Callable[[dict], bool]) -> bool:
    """Rewrite an append-only JSONL log, atomically, with the rows keep(row) accepts, less an unfinished last
    line (a run killed while appending leaves one without its newline). Returns whether there was one. A
    damaged line elsewhere is an InputError naming FILE:LINE. No file: nothing to do."""
    if not os.path.exists(path):
        return False
    with open(path, "rb") as f:
        lines = f.readlines()
    partial = bool(lines) and not lines[-1].endswith(b"\n")
    rows = [parse_jsonl_line(line, f"{path}:{i}") for i, line in enumerate(lines[:len(lines) - partial], start=1)]
    write_text(path, "".join(json.dumps(row) + "\n" for row in rows if row is not None and keep(row)))
    return partial


def checkpoints_up_to(out_dir, step: float) -> list[str]:
    """The checkpoints OUT/step-N with N <= step, newest first: where to go on from after a failure."""
    return [p for n, p in sorted(numbered_dirs(out_dir, "step-").items(), reverse=True) if n <= step]


def last_good(out_dir, step: int) -> str:
    """For an error that stops a run at `step`: the checkpoint to go on from, in words."""
    found = checkpoints_up_to(out_dir, step)
    return f"the last good checkpoint is {found[0]}" if found else "no checkpoint was saved yet"


def damaged_checkpoint(resume, what: str) -> InputError:
    """A damaged --resume checkpoint: say what is damaged, and which earlier checkpoints beside it to use."""
    parent, here = os.path.split(os.path.normpath(resume))
    before = int(here[5:]) - 1 if here.startswith("step-") and here[5:].isdigit() else math.inf
    earlier = checkpoints_up_to(parent, before)
    return InputError(f"--resume {resume}: {what}; " + (f"resume from an earlier checkpoint: {', '.join(earlier)}"
                                                        if earlier else "no earlier checkpoint: start the run again"))


def prepare_run_dir(out, resume, resume_step: int, log_name: str) -> None:
    """A run directory OUT holds checkpoints OUT/step-N, the final model in OUT itself (its config.json) and
    OUT/log_name, an append-only JSONL log of rows with a "step". Never overwrite a checkpoint: a fresh run
    (resume None) needs an OUT without checkpoints, a resume into OUT one with nothing newer than its
    checkpoint. Leftovers of an interrupted save (OUT/.tmp-*) are deleted; the log keeps the steps up to
    resume_step. Rank 0 only, holding OUT's OutputLock."""
    abs_out = os.path.abspath(out)
    in_out = resume is not None and os.path.dirname(os.path.abspath(resume)) == abs_out
    steps = sorted(numbered_dirs(abs_out, "step-").items())
    found = [os.path.basename(p) for n, p in steps if not in_out or n > resume_step]
    found += ["a final model"] if os.path.exists(os.path.join(abs_out, "config.json")) else []
    if found:
        raise InputError(f"--out {out} already holds {', '.join(found)}" + (
            f", newer than --resume {resume}; resuming would overwrite them: resume from the latest "
            "checkpoint or choose a new --out" if in_out else f"; choose a new --out, or continue that run "
            f"with --resume {os.path.join(out, 'step-N')}"))
    for path in remove_leftovers(out):
        print(f"removed {path}, left by an interrupted save", flush=True)
    log = os.path.join(out, log_name)
    if trim_jsonl_log(log, lambda row: row.get("step", math.inf) <= resume_step):
        print(f"{log}: dropped its last line, cut short by an interrupted run", flush=True)


def check_run_settings(out_dir, settings: dict, has_results: bool, fix: str) -> bool:
    """OUT/run.json holds the settings a run that continues OUT must share with the run that started it
    (evaluate.py: everything that changes a sample or its grade). True if it holds `settings`; False if it is
    absent and OUT holds no results yet (the caller then writes it). Otherwise OUT's results came from other or
    unknown settings and must not be mixed with new ones: an InputError naming each differing key
    (`KEY: STORED there, CURRENT now`) and ending with `fix`."""
    path = os.path.join(out_dir, "run.json")
    if not os.path.exists(path):
        if has_results:
            raise InputError(f"{out_dir} holds results but no run.json, so their settings are unknown; {fix}")
        return False
    try:
        with open(path, encoding="utf-8") as f:
            stored = json.load(f)
        if not isinstance(stored, dict):
            raise ValueError(f"a JSON {type(stored).__name__}, not an object")
    except ValueError as e:  # bad JSON or UTF-8 (both ValueErrors), or not an object
        raise InputError(f"{path}: damaged ({e}); the settings of its results are unknown: {fix}") from None
    current = json.loads(json.dumps(settings))  # the same JSON round trip as the stored copy (tuples -> lists)
    differ = [f"{k}: {stored.get(k)!r} there, {current.get(k)!r} now"
              for k in sorted(set(stored) | set(current)) if stored.get(k) != current.get(k)]
    if differ:
        raise InputError(f"{path}: this output directory holds results of a run with other settings "
                         f"({'; '.join(differ)}); {fix}")
    return True


# A table of results that every rank of a data-parallel run appends to, row by row, as the rows are made:
# OUT/NAME.jsonl in one process, OUT/NAME.rankR.jsonl per rank under torchrun, merged into OUT/NAME.jsonl at
# the end. A run killed mid-way leaves whole rows (and at most one unfinished last line per file): the run that
# continues it reads them all back and makes only the missing rows.


def open_shard(out_dir, name: str, d: Dist):
    """This rank's file of table NAME, opened for appending, first cut after its last newline: an unfinished
    last line left by a killed run would otherwise be glued onto the next row."""
    path = os.path.join(out_dir, f"{name}.jsonl" if d.world_size == 1 else f"{name}.rank{d.rank}.jsonl")
    if os.path.exists(path):
        with open(path, "rb+") as f:
            f.truncate(f.read().rfind(b"\n") + 1)
    return open(path, "a", encoding="utf-8")


def shard_files(out_dir, name: str) -> list[str]:
    """OUT/NAME.jsonl, then the per-rank files, in a fixed order."""
    ranks = sorted(f for f in os.listdir(out_dir) if f.startswith(f"{name}.rank") and f.endswith(".jsonl"))
    return [os.path.join(out_dir, f) for f in [f"{name}.jsonl"] + ranks]


def read_shards(out_dir, name: str, key: tuple[str, ...], fix: str) -> tuple[list[dict], int]:
    """Every row of table NAME written so far, once per value of its `key` fields (a merge killed before it
    removed the per-rank files leaves copies: the first is kept), and how many files end in an unfinished line
    (only a last line can lack its newline; its row is made again). A bad line elsewhere is an InputError
    naming FILE:LINE and ending with `fix`."""
    rows, partial = {}, 0
    for path in filter(os.path.exists, shard_files(out_dir, name)):
        for line_no, raw in read_lines(path):
            if not raw.endswith(b"\n"):
                partial += 1
                break
            try:
                row = parse_jsonl_line(raw, f"{path}:{line_no}")
            except InputError as e:
                raise InputError(f"{e}; {fix}") from None
            if row is None:  # a blank line
                continue
            if not all(k in row for k in key):
                raise InputError(f"{path}:{line_no}: not a row of {name} (needs {', '.join(map(repr, key))}); {fix}")
            rows.setdefault(tuple(row[k] for k in key), row)
    return list(rows.values()), partial


def merge_shards(out_dir, name: str, rows: list[dict]) -> None:
    """Rewrite OUT/NAME.jsonl with `rows` (atomically), then remove the per-rank files it absorbed."""
    write_text(os.path.join(out_dir, f"{name}.jsonl"), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    for path in shard_files(out_dir, name)[1:]:
        os.remove(path)


# ----------------------------------------------------------------------------------------------------------
# Distributed


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> Dist:
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (and the rendezvous address; multi-node runs use its
    --nnodes/--rdzv-* flags, nothing here changes). Without them this is one process and no process group.
    backend: NCCL on CUDA and gloo on CPU unless given (evaluation only waits at barriers: gloo suffices)."""
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return Dist(0, 1, 0, torch.device("cuda" if cuda else "cpu"))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    backend = backend or ("nccl" if cuda else "gloo")
    kwargs = {}
    if timeout_s is not None:
        import datetime
        kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
    if cuda:
        torch.cuda.set_device(device)
        if backend == "nccl":
            kwargs["device_id"] = device
    dist.init_process_group(backend, **kwargs)
    return Dist(rank, world_size, local_rank, device)


def print0(*parts) -> None:
    """print() on rank 0 only (torchrun's RANK, as cli() decides who reports an error; nanochat's print0),
    flushed, so that lines of a long run appear as they happen."""
    if os.environ.get("RANK", "0") == "0":
        print(*parts, flush=True)


def log(d: Dist, message: str) -> None:
    """A progress line on stderr from every rank, each prefixed with its rank under torchrun."""
    print(f"[rank {d.rank}] {message}" if d.world_size > 1 else message, file=sys.stderr, flush=True)


def barrier(d: Dist) -> None:
    import torch.distributed as dist

    if d.world_size > 1:
        dist.barrier()


def broadcast(tensor: torch.Tensor, d: Dist) -> torch.Tensor:
    """Every rank's `tensor` becomes rank 0's, in place (same shape and dtype everywhere); returns it."""
    import torch.distributed as dist

    if d.world_size > 1:
        dist.broadcast(tensor, src=0)
    return tensor


def all_reduce_sum(tensor: torch.Tensor, d: Dist) -> torch.Tensor:
    import torch.distributed as dist

    if d.world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_to_main(obj, d: Dist) -> list | None:
    """Every rank's picklable `obj` (small: a few rows), as a list in rank order on rank 0; None elsewhere."""
    import torch.distributed as dist

    if d.world_size == 1:
        return [obj]
    gathered = [None] * d.world_size if d.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def on_main_rank(d: Dist, what: str, fn: Callable[[], object]) -> None:
    """Run fn() on rank 0 only, then tell every rank whether it worked (a broadcast that doubles as a
    barrier): if rank 0 fails (a write, a lock), every rank raises instead of waiting for it forever."""
    import torch
    import torch.distributed as dist

    error = None
    if d.is_main:
        try:
            fn()
        except Exception as e:  # re-raised below, after the other ranks have been told
            error = e
    if d.world_size > 1:
        failed = torch.tensor([float(error is not None)], device=d.device)
        dist.broadcast(failed, src=0)
        if failed.item() and not d.is_main:  # an InputError: cli() lets rank 0 alone say what went wrong
            raise InputError(f"rank 0 failed while {what}; its error message says why")
    if error is not None:
        raise error


def close_distributed() -> None:
    """Destroy the process group, if there is one. A garbage collection first: FSDP's modules and hooks form
    reference cycles that would keep the group alive until interpreter shutdown, where destroying gloo's
    threads can abort; freeing them now, while every rank is alive, ends the run cleanly."""
    import torch.distributed as dist

    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def read_tensor_cache(path, name: str, fingerprint: str, shape, d: Dist):
    """Tensor `name` of the safetensors file `path` on every rank (rank 0 reads, then broadcasts), if the
    file's metadata holds this fingerprint of the inputs it was computed from; else None on every rank: the
    file is missing, damaged (truncated, garbage: safetensors raises its own error types) or stale."""
    import torch
    from safetensors import safe_open

    cached = None
    if d.is_main:
        try:
            with safe_open(path, framework="pt") as f:
                if (f.metadata() or {}).get("fingerprint") == fingerprint:
                    cached = f.get_tensor(name)
        except Exception:  # any failure to read means: compute it again, never trust it
            cached = None
    if not broadcast(torch.tensor([float(cached is not None)], device=d.device), d).item():
        return None
    return broadcast(cached.to(d.device) if d.is_main else torch.empty(shape, device=d.device), d)


def write_tensor_cache(path, name: str, tensor, fingerprint: str, d: Dist) -> None:
    """Rank 0 writes `tensor` as `name` to the safetensors file `path`, atomically, with the fingerprint that
    read_tensor_cache checks; every rank learns whether the write worked."""
    from safetensors.torch import save_file

    on_main_rank(d, f"writing {path}", lambda: atomic_write(path, lambda tmp: save_file(
        {name: tensor.cpu().contiguous()}, tmp, metadata={"fingerprint": fingerprint})))


def cached_tensor(path, name: str, fingerprint: str, shape, d: Dist, compute: Callable, what: str,
                  refuse: str | None = None):
    """The tensor cached at `path` if it was computed from the same inputs (read_tensor_cache), else
    compute() (on every rank), written there for the next run. refuse: the inputs can no longer be computed
    from (a resumed run), so a missing, damaged or stale cache is an InputError ending with `refuse`."""
    cached = read_tensor_cache(path, name, fingerprint, shape, d)
    if cached is not None:
        print0(f"reusing {what} from {path}")
        return cached
    if refuse:
        raise InputError(f"{path}: the cached {what} are missing, damaged or were computed from other inputs; "
                         + refuse)
    if os.path.exists(path):
        print0(f"{path} is damaged or was computed from other inputs; recomputing it")
    tensor = compute()
    write_tensor_cache(path, name, tensor, fingerprint, d)
    return tensor


# ----------------------------------------------------------------------------------------------------------
# Experiment tracking: each metrics.jsonl row also sent to TensorBoard or Weights & Biases (--report-to)
#
# TRL's flag and values (transformers.TrainingArguments.report_to), as nanoGPT's wandb_log and torchtitan's
# enable_tensorboard: off by default, the library imported only when asked, rank 0 only. metrics.jsonl stays
# the record; a tracker is a view of it.

REPORT_TO = {"none": None, "tensorboard": "tensorboard", "wandb": "wandb"}  # value -> the package it needs


def check_tracker(report_to: str) -> None:
    """--report-to's package importable, checked before any work; else one line saying how to get it."""
    package = REPORT_TO[report_to]
    if package is None:
        return
    try:
        __import__(package)
    except ImportError as e:
        raise InputError(f"--report-to {report_to}: the {package} package is not installed ({e}); install it "
                         f"(.venv/bin/pip install {package}) or pass --report-to none") from None


def tracker_key(key: str) -> str:
    """A metrics.jsonl key as TRL runs show it in TensorBoard and W&B: transformers' rewrite_logs
    (integrations/integration_utils.py) puts training values under train/ (train/loss, train/logps/chosen);
    our eval/ keys keep their name, as its eval_ keys become eval/."""
    return key if key.startswith("eval/") else "train/" + key


class Tracker:
    """Sends metrics.jsonl rows to TensorBoard (event files in OUT/tensorboard: `tensorboard --logdir runs`)
    or W&B (project $WANDB_PROJECT, default reinforcement-distillation; run name: OUT's name; the flags as its
    config); made by open_tracker. Without a writer (other ranks, --report-to none) it does nothing. log(row):
    every number of the row except its step, under tracker_key, at that step; flushed at once, so a killed run
    loses nothing that metrics.jsonl has."""

    def __init__(self):
        self.writer = self.wandb = None

    def open(self, report_to: str, out_dir, config: dict, start_step: int) -> None:
        """Events an interrupted run wrote after the step this run starts from are hidden (SummaryWriter's
        purge_step), as prepare_run_dir trims metrics.jsonl."""
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=start_step + 1)
        elif report_to == "wandb":
            import wandb

            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "reinforcement-distillation"),
                                    name=os.path.basename(os.path.abspath(out_dir)), dir=out_dir, config=config)

    def log(self, row: dict) -> None:
        values = {tracker_key(k): v for k, v in row.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, row["step"])
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def open_tracker(report_to: str, out_dir, config: dict, start_step: int, d: Dist) -> Tracker:
    """The --report-to tracker, opened on rank 0 (a Tracker that does nothing elsewhere); if opening fails
    there (wandb not logged in, OUT not writable), every rank stops instead of waiting for rank 0."""
    tracker = Tracker()
    if report_to != "none":
        on_main_rank(d, f"starting --report-to {report_to}", lambda: tracker.open(report_to, out_dir, config,
                                                                                   start_step))
    return tracker


# ----------------------------------------------------------------------------------------------------------
# Hardware

# Dense bf16 tensor-core peak per GPU, from NVIDIA's datasheets (sparsity figures halved). First match wins.
PEAK_BF16_FLOPS = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
                   ("A100", 312e12)]


def peak_bf16_flops(device) -> float | None:
    """Peak dense bf16 FLOP/s of one device, looked up by GPU name (for MFU); None on CPU or an unknown GPU."""
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)
