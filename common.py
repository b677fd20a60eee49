"""common.py: the plumbing every method file shares, written once (nanochat keeps its common.py the same way).

    InputError, cli          one error style for every command line: "PROG: error: MESSAGE", exit 2, no traceback
    atomic_write, write_text, write_json
                             write to a temporary file beside the target, then rename: never half a file
    read_jsonl               (line number, object) per line; bad lines name FILE:LINE
    sha256_file              content fingerprints (resume checks, run settings)
    format_seconds           h:mm:ss for progress lines
    OutputLock               one run owns an output directory at a time
    Dist, init_distributed, barrier
                             the process group from torchrun's environment, or one process without one

Nothing here knows about models, data formats or losses: those live in the method files.
"""

import hashlib
import json
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist

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
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory; pass a JSONL file")
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{where}: not UTF-8 (byte {e.start + 1} of the line); re-encode the file "
                                 "as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise InputError(f"{where}: JSON nested too deeply to read; flatten the row") from None
            if not isinstance(obj, dict):
                raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield line_no, obj


def sha256_file(path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def format_seconds(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


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

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")
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


def barrier(d: Dist) -> None:
    if d.world_size > 1:
        dist.barrier()
