"""common.py: the plumbing every method file shares, written once (nanochat keeps its common.py the same way).

    InputError, cli          one error style for every command line: "PROG: error: MESSAGE", exit 2, no traceback
    checked, POSITIVE, NON_NEGATIVE, FINITE, COUNT, SEED64, SEED32, MINUTES, DEVICE, HelpFormatter, config_defaults
                             argparse types that check values; help with each default once; --config JSON
                             files checked by argparse itself and applied as defaults
    atomic_write, write_text, write_json
                             write to a temporary file beside the target, then rename: never half a file; out
                             of room (a full disk, a quota, ulimit -f): an OSError naming the target
    read_jsonl               (line number, object) per line; bad lines name FILE:LINE
    read_lines, parse_jsonl_line
                             the same in two steps, for readers that parse in worker processes
    read_json_object, regular_file
                             a JSON file holding one object; a file that must be read more than once
    sha256_file, sha256_files
                             content fingerprints (resume checks, run settings)
    move_files_into          publish a finished directory's files into another, one file last
    format_seconds, Progress h:mm:ss; when a progress line is due and the time left
    OutputLock               one run owns an output directory at a time
    numbered_dirs, remove_leftovers, trim_jsonl_log, checkpoints_up_to, last_good, remove_old_checkpoints,
    damaged_checkpoint, prepare_run_dir
                             what a resumed run finds in its output directory: OUT/step-N, .tmp-* left by an
                             interrupted write, an append-only log whose last line a kill cut short; which
                             checkpoint to go on from; a fresh run or a resume never overwrites a checkpoint;
                             only the newest K checkpoints kept
    OUT_OF_ROOM, room_errno, out_of_room, format_bytes, check_room
                             a save that would not fit (free space, ulimit -f) refused before writing, and a
                             write that ran out of room recognised (atomic_write: an OSError naming the file),
                             so that the error can say what to do
    check_run_settings       OUT/run.json: the settings a run continuing OUT must share with the one that began it
    open_shard, shard_files, read_shards, merge_shards
                             a results table every rank appends to in its own file; read back on resume, merged
    Dist, init_distributed, barrier, broadcast, all_reduce_sum, gather_to_main, on_main_rank, close_distributed,
    print0, log
                             the process group from torchrun's environment, or one process without one;
                             rank 0 does a thing (a write) and every rank learns whether it worked;
                             progress lines printed once, by rank 0 (print0), or by every rank (log)
    collective_failure, heartbeat, wait_for_ranks
                             a rank that stops answering: --dist-timeout bounds every wait, the message names it
    Preemption, PREEMPTION, RunStopped
                             SIGTERM: stop at a point of the program's choosing, within a grace period
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
import contextlib
import errno
import gc
import hashlib
import json
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Iterator


# ----------------------------------------------------------------------------------------------------------
# 1. Errors: bad input is the user's to fix, so it gets a sentence, not a traceback.


class InputError(ValueError):
    """Bad input (a file, a flag, a key). The message names the culprit (FILE:LINE, --flag or key) and says
    what to do. A ValueError, so library callers that catch ValueError keep working."""


class RunStopped(Exception):
    """A run that stops for a reason outside the input (preemption, a rank that stopped answering): cli()
    prints the message in one line and exits with `exit_code`. every_rank: each rank that raises it prints it
    (a rank only it knows about), else rank 0 alone (a message all ranks share). root_cause False: the stop
    follows another rank's failure, whose own message torchrun's summary must show (no error file)."""

    def __init__(self, message: str, exit_code: int, every_rank: bool = False, root_cause: bool = True):
        super().__init__(message)
        self.exit_code, self.every_rank, self.root_cause = exit_code, every_rank, root_cause


# Exit statuses, documented in README (Robustness): 2 bad input; 124 a rank stopped answering (GNU timeout's
# status); 130 Ctrl-C and 143 SIGTERM (128 + the signal's number, what a shell reports for a process killed by it).
EXIT_INPUT, EXIT_TIMEOUT, EXIT_INTERRUPTED, EXIT_PREEMPTED = 2, 124, 130, 143


def cli(main: Callable[[], object], prog: str) -> None:
    """Run a command's main(); a failure the user can act on becomes one line on stderr and an exit status,
    no traceback: an InputError (or an OSError such as a missing or unreadable file) exit 2, Ctrl-C 130, a
    RunStopped its own, a collective that timed out 124 (naming the rank that stopped answering). Under
    torchrun every rank finds the same bad input: rank 0 says it; every rank also writes the line into the
    error file torchrun reads (TORCHELASTIC_ERROR_FILE), so torchrun's closing summary shows it as the root
    cause. Anything else is a bug and keeps its traceback."""
    try:
        result = main()
    except (InputError, OSError) as e:
        _fail(prog, f"error: {e}", EXIT_INPUT)
    except KeyboardInterrupt:
        _fail(prog, "interrupted (Ctrl-C); files are written whole or not at all, so a rerun (or --resume from "
              "the last step-N) starts cleanly", EXIT_INTERRUPTED)
    except Exception as e:
        stopped = e if isinstance(e, RunStopped) else collective_failure(e)
        if stopped is None:
            raise
        _fail(prog, str(stopped), stopped.exit_code, stopped.every_rank, stopped.root_cause)
    sys.exit(result if isinstance(result, int) else 0)


def _fail(prog: str, message: str, code: int, every_rank: bool = False, root_cause: bool = True) -> None:
    line = f"{prog}: {message}"
    if every_rank or os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr, flush=True)
    if root_cause:
        write_torchelastic_error(line)
    sys.exit(code)


def write_torchelastic_error(line: str) -> None:
    """Under torchrun, the error file that torch.distributed.elastic's @record would write, holding our one
    line instead of a traceback: torchrun's closing ChildFailedError summary prints it as the root cause
    ("traceback : LINE"), the last thing a user sees (the format ErrorHandler.record_exception writes, with
    our line where it puts the traceback: torch/distributed/elastic/multiprocessing/errors/error_handler.py)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line,
                                                                  "timestamp": str(int(time.time()))}}}, f)
    except OSError:
        pass  # torchrun then shows its generic summary; our line is already on stderr


# ----------------------------------------------------------------------------------------------------------
# 2. Command lines: argparse does the checking, of flags and of --config files alike


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
# Seeds: train.py's feeds numpy's and torch's generators (64 bits); evaluate.py's hash keeps 32 bits, so a
# larger seed would silently repeat a smaller one's samples.
SEED64 = checked(int, lambda n: 0 <= n < 2**64, "an integer in [0, 2**64)")
SEED32 = checked(int, lambda n: 0 <= n < 2**32, "an integer in [0, 2**32)")
MINUTES = checked(float, lambda x: 0 < x <= 7 * 24 * 60, "a number of minutes in (0, 10080]")


def DEVICE(text: str) -> str:  # noqa: N802 (an argparse type, named like the others)
    """--device: cpu, cuda or cuda:N that this machine has, checked at parse time, so that a bad value is
    blamed on the flag (not on the checkpoint that would fail to load onto it, nor on a pin_memory call)."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r} needs a CUDA GPU and none is visible here "
                                         "(torch.cuda.is_available() is False); use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: there are {torch.cuda.device_count()} CUDA device(s), "
                                         "numbered from 0")
    return str(device)


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
# 3. Files


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


ATOMIC_TEMPORARY = re.compile(r"\.tmp-[a-z0-9_]{8}")  # atomic_write's temporaries: mkstemp's 8 random characters


def atomic_write(path, write: Callable[[str], None]) -> None:
    """write(tmp) fills a temporary file in the same directory, which then replaces `path` in one rename:
    a crash leaves the old file or the new one, never half of one, and never a stray temporary. A write that
    runs out of room (OUT_OF_ROOM) is an OSError with that errno naming `path`, whatever the writer raised."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are readable like any other file
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if room_errno(e) in OUT_OF_ROOM:  # one OSError naming the file (write() names none; safetensors raises
            raise OSError(room_errno(e), OUT_OF_ROOM[room_errno(e)], str(path)) from None  # its own type)
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
    """One JSONL line -> its object, or None for a blank line; `where` (FILE:LINE) starts every error: not
    UTF-8, not JSON, a number past Python's int-string limit (4,300 digits), nesting deeper than the recursion
    limit, a lone UTF-16 surrogate escape (a string that no tokenizer or UTF-8 file can hold), not an object."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{where}: not UTF-8 (byte {e.start + 1} of the line); re-encode the file "
                         "as UTF-8") from None
    if not line.strip():
        return None
    obj = _loads(line, where)
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if _SURROGATE_ESCAPE.search(line) and (field := _lone_surrogate(obj)) is not None:
        raise InputError(f"{where}: {field} holds a lone UTF-16 surrogate escape (\\ud800-\\udfff without its "
                         "pair), which is not a character: no tokenizer or UTF-8 file can hold it; fix the escape")
    return obj


def _loads(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = f"column {e.colno}" if e.lineno == 1 else f"line {e.lineno} column {e.colno}"
        raise InputError(f"{where}: not valid JSON ({e.msg} at {at})") from None
    except RecursionError:
        raise InputError(f"{where}: JSON nested too deeply to read; flatten it") from None
    except ValueError as e:  # int('1' * 5000): "Exceeds the limit (4300 digits) for integer string conversion"
        raise InputError(f"{where}: a number too long to read ({str(e).split(':')[0]}); no field takes such a "
                         "number: fix it, or write it as a string") from None


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # only then is the object walked (rarely)


def _lone_surrogate(value, path: str = "the row") -> str | None:
    """The path (key or index) of the first string or key holding a lone surrogate, else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _lone_surrogate(key, f"a key of {path}") if isinstance(key, str) else None
        found = found or _lone_surrogate(item, f"{path}[{key!r}]" if path != "the row" else repr(key))
        if found:
            return found
    return None


def read_json_object(path, what: str) -> dict:
    """A JSON file that must hold one object (config.json, generation_config.json, ...): any failure is an
    InputError naming the file and `what` it is for."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 (byte {e.start + 1}); {what} must be a UTF-8 JSON file") from None
    obj = _loads(text, path)
    if not isinstance(obj, dict):
        raise InputError(f"{path}: a JSON {type(obj).__name__}, but {what} must be a JSON object")
    return obj


def regular_file(path, flag: str, why: str) -> None:
    """`path` must be a regular file: a named pipe or a <(...) process substitution (a pipe too) can be read
    only once, and `why` says why this program needs more than that."""
    if not os.path.exists(path):
        raise InputError(f"{flag} {path}: no such file")
    if os.path.isdir(path):
        raise InputError(f"{flag} {path}: is a directory; pass a JSONL file")
    if not os.path.isfile(path):
        raise InputError(f"{flag} {path}: not a regular file (a named pipe, or a <(...) process substitution?); "
                         f"{why}: write it to a file first (e.g. zcat X.jsonl.gz > X.jsonl)")


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


def duration(seconds: float) -> str:
    """A timeout in words: '90 s', '10 min'."""
    return f"{seconds:g} s" if seconds < 60 else f"{seconds / 60:g} min"


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
# 4. One run per output directory


class OutputLock:
    """An exclusive advisory lock on OUT/.lock (flock), held for the life of the run. A second run on the
    same OUT is refused at once with the holder's pid, host and start time. The kernel drops the lock when
    its process dies, however it dies, so a lock file left by a killed run is stale and simply re-taken.
    The file is removed when the run ends, so that a finished OUT (train.py's final model, to be uploaded
    as it is) holds no .lock. (flock is per host: on a network filesystem shared by several hosts it may not
    exclude a run on another host; one output directory per run is still the rule there.)"""

    def __init__(self, out_dir, prog: str):
        self.path = os.path.join(out_dir, ".lock")
        self.prog = prog
        self.file = None

    def __enter__(self):
        import fcntl

        out_dir = os.path.dirname(self.path)
        while True:
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
            # The previous holder removes the file as it ends (__exit__): if that happened between our open
            # and our flock, we locked a file no later run will find; open the path again.
            if _same_file(f, self.path):
                break
            f.close()
        f.seek(0)
        f.truncate()
        f.write(f"{self.prog} (pid {os.getpid()} on {socket.gethostname()}, started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        f.flush()
        self.file = f
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)  # still locked: a run waiting to lock this file re-opens the path
            self.file.close()  # closing releases the flock
            self.file = None
        return False


def _same_file(f, path) -> bool:
    """Whether the open file f is still the file at path (not removed or replaced since it was opened)."""
    try:
        return os.path.samestat(os.fstat(f.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


# ----------------------------------------------------------------------------------------------------------
# 5. Run directories: what an interrupted run leaves behind, for the run that continues it


def numbered_dirs(parent, prefix: str) -> dict[int, str]:
    """{N: PARENT/PREFIX-N} for every entry of PARENT named PREFIX followed by digits (OUT/step-N)."""
    names = os.listdir(parent) if os.path.isdir(parent) else []
    return {int(n[len(prefix):]): os.path.join(parent, n) for n in names
            if n.startswith(prefix) and n[len(prefix):].isdigit()}


def remove_leftovers(out_dir, names: re.Pattern | None = None) -> list[str]:
    """Delete the .tmp-* files and directories an interrupted atomic write left in out_dir (atomic_write's
    prefix; a never-whole save), or only those whose whole name matches `names`; return their paths. Only
    for a directory this run owns (OutputLock): no live run is writing them."""
    found = [os.path.join(out_dir, n) for n in sorted(os.listdir(out_dir))
             if n.startswith(".tmp-") and (names is None or names.fullmatch(n))]
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


def remove_old_checkpoints(out_dir, keep: int) -> list[str]:
    """Delete all but the newest `keep` checkpoints OUT/step-N (--save-total-limit); return their paths. Called
    only after the newest was renamed into place whole, so the one a run resumed from is never deleted before a
    newer one exists. Each is first renamed to OUT/.tmp-removed-step-N (one atomic step), then deleted: a kill
    in between leaves a leftover that remove_leftovers clears, never half a step-N that looks like a checkpoint."""
    old = sorted(numbered_dirs(out_dir, "step-").items())[:-keep]
    for _, path in old:
        doomed = os.path.join(out_dir, ".tmp-removed-" + os.path.basename(path))
        os.rename(path, doomed)
        shutil.rmtree(doomed)
    return [path for _, path in old]


# The errors of a write that ran out of room: the disk, the user's quota, or the file-size limit (ulimit -f,
# with SIGXFSZ ignored, as batch schedulers set it). Keyed by errno, as OSError and the Rust writer of
# safetensors (whose SafetensorError says "os error N") report them.
OUT_OF_ROOM = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
               errno.EFBIG: "a file exceeds the file-size limit (ulimit -f)"}


def room_errno(error: BaseException) -> int | None:
    """The errno of a failed write: OSError's, or the one safetensors' SafetensorError quotes ("os error N")."""
    if isinstance(error, OSError):
        return error.errno
    found = re.search(r"os error (\d+)", str(error)) if isinstance(error, Exception) else None
    return int(found.group(1)) if found else None


def out_of_room(error: BaseException) -> str | None:
    """Why a failed write ran out of room (OUT_OF_ROOM), or None when it failed for another reason."""
    return OUT_OF_ROOM.get(room_errno(error))


def format_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000


def check_room(directory, sizes: dict[str, int]) -> str | None:
    """Why files of these sizes {name: bytes} cannot be written into `directory`, before writing any: more
    than the free space a user may fill (statvfs f_bavail), or a file over this process's file-size limit;
    None when they fit. Needing the new files' room in full is the price of never deleting the previous
    checkpoint first. (A quota or another writer can still fill the disk meanwhile: out_of_room says so.)"""
    import resource

    total, free = sum(sizes.values()), shutil.disk_usage(directory).free
    if total > free:
        return (f"they need {format_bytes(total)} (" + ", ".join(f"{n} {format_bytes(b)}" for n, b in sizes.items())
                + f") but {directory} has {format_bytes(free)} free")
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    over = [f"{n} needs {format_bytes(b)}" for n, b in sizes.items() if limit != resource.RLIM_INFINITY and b > limit]
    if over:
        return f"{', '.join(over)}, over this process's file-size limit of {format_bytes(limit)} (ulimit -f)"
    return None


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
# 6. Preemption: SIGTERM is a request to stop soon, not a crash


class Abandoned(Exception):
    """Raised by the SIGTERM handler inside Preemption.may_abandon(): the work in progress is dropped."""


class Preemption:
    """SIGTERM, what Slurm and Kubernetes send before they kill a job (after a grace period: Slurm's KillWait,
    Kubernetes' terminationGracePeriodSeconds, 30 s by default; torchrun passes it on to its workers and kills
    them 30 s later). While armed, the signal only records itself: the program stops at a point of its
    choosing (train.py: the end of a step, after a checkpoint), every rank at the same one
    (requested_everywhere, one all-reduce of a flag). Two bounds keep the stop within `grace_s` of the signal:
    inside may_abandon(expected_s) (one process only), work that would not end within half the grace is
    abandoned at once (Abandoned is raised from the handler); and if the process is still running when the
    grace ends, a watchdog thread prints `expiry_message()` and exits with status 143."""

    def __init__(self):
        self.signalled: str | None = None
        self.watchdog = None
        self.grace_s, self.prog, self.expiry_message = math.inf, "", None
        self.window: tuple[float, float | None] | None = None  # may_abandon's (start, expected seconds)

    @contextlib.contextmanager
    def armed(self, grace_s: float, prog: str, expiry_message: Callable[[], str]):
        import signal

        self.grace_s, self.prog, self.expiry_message = grace_s, prog, expiry_message
        self.signalled, self.watchdog = None, None
        previous = signal.signal(signal.SIGTERM, self._handle)
        try:
            yield self
        finally:  # the program has stopped (or ended) by itself: no watchdog is needed any more
            signal.signal(signal.SIGTERM, previous)
            if self.watchdog is not None:
                self.watchdog.cancel()

    def _handle(self, signum, frame) -> None:
        import threading

        if self.signalled is not None:  # a second SIGTERM changes nothing: the stop is under way
            return
        self.signalled, now = "SIGTERM", time.monotonic()
        self.watchdog = threading.Timer(self.grace_s, self._expire)
        self.watchdog.daemon = True  # a run that stops in time exits at once, without waiting for it
        self.watchdog.start()
        if self.window is not None:
            start, expected = self.window
            if expected is None or start + expected - now > self.grace_s / 2:
                raise Abandoned()

    def _expire(self) -> None:
        line = (f"{self.prog}: preempted (SIGTERM): the grace period ({self.grace_s:g} s, --preempt-grace) ran "
                f"out before the run could stop cleanly; {self.expiry_message()}")
        print(line, file=sys.stderr, flush=True)
        write_torchelastic_error(line)
        os._exit(EXIT_PREEMPTED)

    @contextlib.contextmanager
    def may_abandon(self, expected_s: float | None, enabled: bool = True):
        """A signal inside this block raises Abandoned unless the block is expected (expected_s: its duration
        last time; None: unknown) to end within half the grace period. enabled False: never (several ranks,
        which must all stop at the same step)."""
        if self.signalled is not None and enabled:
            raise Abandoned()
        self.window = (time.monotonic(), expected_s) if enabled else None
        try:
            yield
        finally:
            self.window = None

    def requested_everywhere(self, d: Dist) -> bool:
        """Whether any rank has been signalled: the same answer on every rank (one all-reduce of a flag)."""
        import torch

        if d.world_size == 1:
            return self.signalled is not None
        return all_reduce_sum(torch.tensor([float(self.signalled is not None)], device=d.device), d).item() > 0


PREEMPTION = Preemption()


# ----------------------------------------------------------------------------------------------------------
# 7. Distributed


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_DIST: Dist | None = None  # this process's group, for collective_failure's message
_DIST_TIMEOUT_S: float | None = None


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> Dist:
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (and the rendezvous address; multi-node runs use its
    --nnodes/--rdzv-* flags, nothing here changes). Without them this is one process and no process group.
    backend: NCCL on CUDA and gloo on CPU unless given (evaluation only waits at barriers: gloo suffices).
    timeout_s: how long any collective waits for every rank (the --dist-timeout flags) before it fails;
    collective_failure then names the rank that stopped answering."""
    import torch
    import torch.distributed as dist

    global _DIST, _DIST_TIMEOUT_S
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
    _DIST, _DIST_TIMEOUT_S = Dist(rank, world_size, local_rank, device), timeout_s
    return _DIST


def _is_collective_timeout(e: BaseException) -> bool:
    """gloo raises a RuntimeError 'Timed out waiting ...ms for recv/send'; c10d's own waits (barrier, the
    store) raise DistError subclasses saying 'timed out' / 'Timeout'. (NCCL's watchdog aborts the process
    itself after the timeout, with its own message naming the collective: nothing reaches Python there.)"""
    text = str(e).lower()
    return isinstance(e, RuntimeError) and _DIST is not None and ("timed out" in text or "timeout" in text)


def _ranks_that_timed_out(d: Dist, wait_s: float) -> list[int] | None:
    """Post this rank's timeout to the rendezvous store, then give the others wait_s to post theirs: a
    rank that stopped answering never does, so the ranks missing from the list are the stuck ones. None if
    the store (served by rank 0's process) cannot be reached either."""
    import datetime

    import torch.distributed as dist

    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(datetime.timedelta(seconds=max(wait_s, 1)))
        store.set(f"timed_out/{d.rank}", "1")
        deadline = time.monotonic() + wait_s
        while True:
            found = [r for r in range(d.world_size) if store.check([f"timed_out/{r}"])]
            if len(found) == d.world_size or time.monotonic() > deadline:
                return found
            time.sleep(0.2)
    except Exception:  # the store is gone or frozen too: nothing more to learn
        return None


def collective_failure(e: BaseException) -> RunStopped | None:
    """What cli() says about an exception raised by a collective, or None if it is not one: a collective
    that timed out names the ranks that stopped answering (printed by the lowest rank that saw the timeout,
    exit 124); a failure after SIGTERM (torchrun stopping the job, a preemption) is the stop, exit 143."""
    if PREEMPTION.signalled is not None and _DIST is not None and isinstance(e, RuntimeError):
        return RunStopped(f"stopped by {PREEMPTION.signalled} (rank {os.environ.get('RANK', '0')}): {str(e)[:200]}",
                          EXIT_PREEMPTED, root_cause=False)
    if not _is_collective_timeout(e):
        return None
    d, timeout = _DIST, _DIST_TIMEOUT_S
    waited = duration(timeout) if timeout else "the default timeout"
    found = _ranks_that_timed_out(d, min(30.0, max(1.0, (timeout or 600) / 20)))
    if found is None:
        return RunStopped(f"rank {d.rank}: a collective waited {waited} (--dist-timeout) and the rendezvous store on "
                          f"rank 0 does not answer either: rank 0 (or its host) stopped answering; "
                          f"{str(e)[:200]}", EXIT_TIMEOUT, every_rank=True)
    stuck = [r for r in range(d.world_size) if r not in found]
    who = (f"rank{'s' if len(stuck) > 1 else ''} {', '.join(map(str, stuck))} stopped answering" if stuck
           else "every rank timed out waiting for another")
    return RunStopped(f"{who}: a collective waited {waited} (--dist-timeout) for {'it' if len(stuck) == 1 else 'them'}"
                      f"; look at that rank's host (a frozen GPU, a hung filesystem), or raise --dist-timeout if it "
                      f"is only slow ({str(e)[:160]})", EXIT_TIMEOUT, every_rank=d.rank == min(found, default=d.rank))


def heartbeat(d: Dist) -> None:
    """Tell the other ranks this one is making progress (a counter in the rendezvous store), for
    wait_for_ranks. Costs one round trip to the store; nothing on one process."""
    import torch.distributed as dist

    if d.world_size > 1:
        dist.distributed_c10d._get_default_store().add(f"heartbeat/{d.rank}", 1)


def wait_for_ranks(d: Dist, name: str, silent_s: float) -> None:
    """A barrier for ranks that arrive far apart (evaluate.py's shards end at different times): it waits as
    long as every rank not yet arrived keeps beating (heartbeat), and once one has been silent for silent_s
    it fails, naming that rank (exit 124; said once, by the lowest rank that arrived). `name`: once per run."""
    import torch.distributed as dist

    if d.world_size == 1:
        return
    store = dist.distributed_c10d._get_default_store()
    store.set(f"{name}/arrived/{d.rank}", "1")
    seen = {}  # rank -> (its last heartbeat count, when this rank saw it change)
    while pending := [r for r in range(d.world_size) if not store.check([f"{name}/arrived/{r}"])]:
        now = time.monotonic()
        for r in pending:
            beats = store.add(f"heartbeat/{r}", 0)
            if seen.get(r, (None,))[0] != beats:
                seen[r] = (beats, now)
            elif now - seen[r][1] > silent_s:
                arrived = [q for q in range(d.world_size) if q not in pending]
                raise RunStopped(f"rank {r} stopped answering: no progress from it for {duration(silent_s)} "
                                 f"(--dist-timeout) while rank {d.rank} waited for it at '{name}'; look at that "
                                 "rank's host (a frozen GPU, a hung filesystem), or raise --dist-timeout if it is "
                                 "only slow", EXIT_TIMEOUT, every_rank=d.rank == min(arrived))
        time.sleep(min(1.0, silent_s / 10))


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
# 8. Experiment tracking: each metrics.jsonl row also sent to TensorBoard or Weights & Biases (--report-to)
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
# 9. Hardware

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
