"""The stage runner: what every stage does around its work, written once.

Every stage of the public API (:mod:`adm_export.stages.api`: calibrate, quantize, export, engine,
eval, build, generate, bundle) goes through :func:`run_stage` exactly once; the CLI calls that API.
In order, the runner:

1. **checks the output folder** (:func:`adm_export.artifacts.check_out`): a file, or a non-empty
   folder without ``--force``, is refused before any work;
2. **locks it** (:class:`OutputLock`): an ``fcntl`` lock on ``<parent>/.<name>.lock`` keeps a second
   process from writing the same folder; the second one is refused with one line. Taking the lock
   is also the probe that the folder can be created at all (a path under ``/proc``, a read-only
   disk): refused with one line, and any parent folder the probe made is removed again;
3. **sets up shards and ranks** (:mod:`adm_export.distributed`): the shard area
   ``<parent>/.<name>.shards`` (kept on failure, so a rerun resumes), the process group under
   torchrun, a scratch output on non-zero ranks, and rank 0's result broadcast to every rank;
4. **turns SIGINT and SIGTERM into exceptions** (:class:`Interrupted`), so that every ``with``
   block on the way out cleans up: the ``.partial`` folder of :func:`adm_export.artifacts.atomic_dir`,
   temporary shard files, the lock. Finished shards stay for the rerun;
5. **translates running out of memory** (torch, ONNX Runtime, numpy) into one line that names the
   options to lower;
6. makes the output appear **atomically**: each stage writes its folder through
   :func:`adm_export.artifacts.atomic_dir`; ``build`` (``atomic=True``) is made atomic as a whole,
   its stages writing into the build's ``.partial`` folder.

:func:`exit_code` and :func:`error_line` map what escapes to the CLI's exit codes: 0 success,
1 user error (:class:`~adm_export.errors.AdmExportError`: one line, no traceback), 2 quality gate
failed (decided by the caller from the result), 130 / 143 interrupted by SIGINT / SIGTERM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from adm_export.artifacts import atomic_dir, check_out
from adm_export.errors import AdmExportError, InvalidInputError, OutOfMemoryError, OutputLockedError

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_USER_ERROR = 1
EXIT_GATE_FAILED = 2


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived while a stage ran (a ``BaseException``, like ``KeyboardInterrupt``,
    so that ``except Exception`` blocks let it through to the cleanup on the way out)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


# -- 2. the lock ------------------------------------------------------------------------------------
def lock_path(out: str | os.PathLike) -> Path:
    """The lock file of an output folder: ``<parent>/.<name>.lock``."""
    out = Path(out)
    return out.parent / f".{out.name}.lock"


class OutputLock:
    """An exclusive, non-blocking ``fcntl`` lock on an output folder's lock file.

    The lock file is removed on release. A process that opened it before the removal and locks it
    afterwards would hold a lock on a file nobody else sees, so :meth:`acquire` checks that the path
    still names the file it locked and retries otherwise.
    """

    def __init__(self, out: str | os.PathLike, flag: str = "--out"):
        self.out = Path(out)
        self.flag = flag
        self.path = lock_path(self.out)
        self._fd: int | None = None
        self._made: list[Path] = []  # parent folders this lock created (removed again on failure)

    def acquire(self) -> None:
        """Take the lock, creating missing parent folders.

        Raises:
            OutputLockedError: Another process holds it.
            InvalidInputError: The folder cannot be created there (the message says why).
        """
        import fcntl

        try:
            self._make_parents()
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    holder = _read_pid(fd)
                    os.close(fd)
                    if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                        raise
                    raise OutputLockedError(
                        f"{self.flag} {str(self.out)!r} is being written by another adm-export process"
                        f"{f' (pid {holder})' if holder else ''}; wait for it to finish or choose another folder"
                    ) from None
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(self.path))
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)  # removed by its previous holder between our open and lock: again
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self._fd = fd
        except OSError as exc:
            self.remove_made_parents()
            raise InvalidInputError(
                f"{self.flag} {str(self.out)!r} cannot be written: {exc.strerror or exc} "
                f"({exc.filename or self.path}); choose a folder on a writable disk"
            ) from None

    def release(self) -> None:
        """Remove the lock file and drop the lock."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def remove_made_parents(self) -> None:
        """Remove the (still empty) parent folders :meth:`acquire` created."""
        for folder in reversed(self._made):
            with contextlib.suppress(OSError):
                folder.rmdir()
        self._made = []

    def _make_parents(self) -> None:
        missing = []
        folder = self.path.parent
        while not folder.exists() and folder != folder.parent:
            missing.append(folder)
            folder = folder.parent
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "a parent is a file", str(folder))
        for folder in reversed(missing):
            folder.mkdir()
            self._made.append(folder)


def _read_pid(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        return os.pread(fd, 32, 0).decode().strip()
    return ""


@contextlib.contextmanager
def locked_out(out: Path | None, flag: str = "--out") -> Iterator[None]:
    """Hold the lock of ``out`` for the block (rank 0 takes it; every rank gets its verdict)."""
    from adm_export import distributed as dist

    if out is None:
        yield
        return
    lock = OutputLock(out, flag)
    error = None
    if dist.is_main():
        try:
            lock.acquire()
        except AdmExportError as exc:
            error = exc
    error = dist.broadcast(error)  # every rank fails the same way (no rank waits at a barrier alone)
    if error is not None:
        raise error
    ok = False
    try:
        yield
        ok = True
    finally:
        lock.release()
        if not ok:
            lock.remove_made_parents()


# -- 4. signals -------------------------------------------------------------------------------------
@contextlib.contextmanager
def signals_as_exceptions(signums: Sequence[int] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Raise :class:`Interrupted` in the main thread on the first SIGINT / SIGTERM of the block.

    Further signals while the first one unwinds (cleanup of partial folders) are ignored, so that
    cleanup is not cut short; the previous handlers come back when the block ends. Outside the main
    thread (signals can only be handled there) the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum, frame):
        if fired:
            return
        fired.append(signum)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# -- 5. out of memory -------------------------------------------------------------------------------
_OOM_MARKERS = ("out of memory", "failed to allocate memory", "can't allocate memory", "cannot allocate memory",
                "bad_alloc", "bad allocation", "outofmemory")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` reports an allocation failure (torch CPU/CUDA, ONNX Runtime, numpy)."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return isinstance(exc, Exception) and any(m in text for m in _OOM_MARKERS)


@contextlib.contextmanager
def memory_errors(stage: str, lower: Sequence[str]) -> Iterator[None]:
    """Turn an allocation failure inside the block into one line naming what to lower."""
    try:
        yield
    except AdmExportError:
        raise
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        hint = f"lower {' or '.join(lower)}" if lower else "use a machine with more memory"
        raise OutOfMemoryError(f"{stage}: out of memory ({first[:160]}); {hint}") from None


# -- the runner -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StageRun:
    """How :func:`run_stage` runs one stage.

    Attributes:
        name: Stage name, for logs and messages.
        out: Output folder; ``None`` when the stage writes none (``eval`` without ``--out``).
        force: Replace a non-empty ``out``.
        flag: The option naming ``out``, for messages.
        all_ranks: Under torchrun every rank runs the work (it holds sharded loops) and rank 0's result
            is broadcast; otherwise rank 0 alone runs it and the others wait for its result.
        atomic: The runner writes ``out`` as one atomic folder: the work gets a ``.partial`` folder
            (rank 0's, on every rank) that is renamed to ``out`` when the work succeeds. Without it
            the work writes ``out`` itself (each stage through ``artifacts.atomic_dir``).
        lower: Options to lower when memory runs out (e.g. ``("--seconds", "--batch-size")``).
    """

    name: str
    out: Path | None
    force: bool = False
    flag: str = "--out"
    all_ranks: bool = True
    atomic: bool = False
    lower: tuple[str, ...] = ()


def run_stage(run: StageRun, work: Callable[[Path | None], Any]) -> Any:
    """Run ``work(out)`` once with everything in the module docstring; return rank 0's result.

    Args:
        run: How to run it.
        work: The stage's work. It gets the folder to write (``run.out``; with ``atomic``, the build's
            ``.partial`` folder; on non-zero ranks a scratch path) and returns the stage's result on
            rank 0 (anything picklable; other ranks may return ``None``).

    Returns:
        Rank 0's result, on every rank.

    Raises:
        AdmExportError: A user error (one line), including a locked or uncreatable output and
            running out of memory.
        Interrupted: SIGINT or SIGTERM arrived; partial output was removed.
    """
    from adm_export import distributed as dist
    from adm_export.progress import timed_stage

    out = Path(run.out) if run.out is not None else None
    dist.init()  # under torchrun (no-op otherwise): the API behaves as the CLI does
    with signals_as_exceptions(), memory_errors(run.name, run.lower):
        if out is not None:
            check_out(out, run.force, run.flag)  # every rank: one clean error, no rank left waiting
        # The start at debug level: a user error found inside the stage (a --model folder that does
        # not load) stays the one line on the console; the finish line says how long it took.
        started = timed_stage(run.name, logger, start_level=logging.DEBUG)
        with locked_out(out, run.flag), dist.shard_area(out), started:
            if run.atomic and out is not None:
                result = _run_atomic(run, out, work)
            elif run.all_ranks:
                with dist.main_output(out) if out is not None else contextlib.nullcontext() as rank_out:
                    result = work(rank_out)
            else:
                result = work(out) if dist.is_main() else None
            return dist.broadcast(result)


def _run_atomic(run: StageRun, out: Path, work: Callable[[Path | None], Any]) -> Any:
    """``work`` writes into rank 0's ``.partial`` folder, renamed to ``out`` once every rank is done."""
    from adm_export import distributed as dist

    with atomic_dir(out, force=run.force) if dist.is_main() else contextlib.nullcontext() as tmp:
        folder = Path(dist.broadcast(str(tmp) if dist.is_main() else None))
        if not run.all_ranks:
            result = work(folder) if dist.is_main() else None
        else:
            result = work(folder)
        dist.barrier()  # nobody reads the partial folder any more when rank 0 renames it
    return result


# -- exit codes -------------------------------------------------------------------------------------
def exit_code(exc: BaseException) -> int:
    """The process exit code for an exception that ended a command."""
    if isinstance(exc, AdmExportError):
        return exc.exit_code
    if isinstance(exc, Interrupted):
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return 128 + signal.SIGINT
    return EXIT_USER_ERROR


def error_line(exc: BaseException) -> str:
    """The one line a command prints for a user error or an interruption."""
    if isinstance(exc, (Interrupted, KeyboardInterrupt)):
        name = exc.args[0] if isinstance(exc, Interrupted) else "SIGINT"
        return (f"interrupted by {name}: partial output removed; finished shards are kept, so the same "
                f"command resumes")
    return " ".join(str(exc).split()) or type(exc).__name__


def elapsed(start: float) -> float:
    """Seconds since ``start`` (``time.perf_counter``), rounded for results."""
    return round(time.perf_counter() - start, 3)
