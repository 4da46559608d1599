"""Data parallelism for the heavy loops under ``torchrun`` (torch.distributed), with resumable shards.

Three loops run data-parallel: calibration trajectories (one unit = one prompt's sampler run),
per-layer sensitivity trials (one unit = one chunk of layers of one format) and evaluation
generation (one unit = one chunk of :data:`adm_export.eval.harness.CHUNK` clips, the batch the
single-process run uses too, so results are bit-identical whatever the number of processes).

**Processes.** ``torchrun --nproc-per-node N -m adm_export <command> ...`` (or ``adm-export
<command> --nproc N``, which relaunches itself that way) starts N processes; this module reads
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` from the environment. :func:`init` creates the process
group: with CUDA present ``cpu:gloo,cuda:nccl`` (NCCL for CUDA tensors, gloo for the small control
messages, which are host objects) and pins each process to GPU ``LOCAL_RANK``; without CUDA gloo.
Without ``WORLD_SIZE`` (or with 1) everything runs in one process through the same code (world 1).

**Split.** Unit ``i`` of ``n`` goes to rank ``i % world`` (round robin: neighbouring units often
cost alike, so every rank gets a similar share). The split only decides *who* computes a unit;
each unit's result depends on the unit alone (its prompt, seeds and inputs), never on the rank.

**Shards and gathering.** Every finished unit is written as one shard file (``torch.save`` to a
temporary name, then an atomic rename) in ``<area>/<stage>-<key>/``, where ``key`` hashes
everything the result depends on (model identity and weight fingerprint, the stage's config,
prompts, seeds, the inputs' hashes): a shard of another configuration lives under another key
and is never reused. Results are gathered through these files: after a barrier, rank 0 (or every
rank, where all need the result, e.g. the sensitivity table before the budget solver) reads all
shards. Only small control values (the selected points, the finished manifest, counts) travel
through the process group. So the shard folder must be on a filesystem every rank sees: always
true for one machine (``--nproc-per-node``); several machines need a shared filesystem.

**Resume.** On a rerun of the same command, finished shards are loaded and only the missing units
computed, whatever the number of processes then. A process that dies loses only the unit it was
computing. The area of a command writing ``out`` is ``<out's parent>/.<out's name>.shards``
(outside ``out``, so ``build --force`` keeps it); it is removed when the command succeeds (keep
it with ``ADM_EXPORT_KEEP_SHARDS=1``).

**Rank 0 only** writes final artifacts, logs at INFO and shows progress bars; the other ranks
log warnings only and return the result rank 0 broadcasts.

Test hook: ``ADM_EXPORT_FAIL_AFTER_SHARDS=R:K`` makes rank ``R`` exit (code 17, no cleanup) right
after writing its ``K``-th shard, as a killed process would.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from adm_export.artifacts import atomic_file
from adm_export.errors import InvalidInputError

logger = logging.getLogger(__name__)

ENV_KEEP = "ADM_EXPORT_KEEP_SHARDS"
ENV_FAIL = "ADM_EXPORT_FAIL_AFTER_SHARDS"
ENV_TIMEOUT = "ADM_EXPORT_DIST_TIMEOUT"
#: Set by :func:`launch` for its workers: rank 0 writes its exit code there (see :func:`record_exit`).
ENV_EXIT_FILE = "ADM_EXPORT_EXIT_FILE"
FAIL_EXIT_CODE = 17
#: Collective timeout: rank 0 may work alone for a long time (export, TensorRT build) while the
#: others wait at a barrier.
DEFAULT_TIMEOUT_S = 4 * 3600
#: Environment every launch gets: NVLink multicast (NVLS) stays off; these runs move no large
#: tensors through NCCL, and multicast setup fails on shared or partitioned machines.
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

_shards_written = 0
_area: Path | None = None


# -- ranks ------------------------------------------------------------------------------------------
def _env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def _dist():
    if _env_world() <= 1:  # no torch import on the single-process path (fast CLI errors)
        return None
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world_size() -> int:
    """Number of processes (``WORLD_SIZE``; 1 outside torchrun)."""
    d = _dist()
    return d.get_world_size() if d else _env_world()


def rank() -> int:
    """This process's global rank (``RANK``; 0 outside torchrun)."""
    d = _dist()
    return d.get_rank() if d else (int(os.environ.get("RANK", "0") or 0) if _env_world() > 1 else 0)


def local_rank() -> int:
    """This process's rank on its machine (``LOCAL_RANK``): the GPU it uses."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def is_main() -> bool:
    """True on rank 0 (the process that writes artifacts and logs)."""
    return rank() == 0


def init() -> bool:
    """Create the process group when started by torchrun with more than one process.

    Idempotent. With CUDA, each process is pinned to GPU ``LOCAL_RANK`` and the group is
    ``cpu:gloo,cuda:nccl``; otherwise gloo. Non-zero ranks are quietened (warnings only, no
    progress bars).

    Returns:
        True when running distributed (world size > 1).
    """
    if _env_world() <= 1:
        return False
    import datetime

    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return True
    for k, v in NCCL_ENV.items():
        os.environ.setdefault(k, v)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    timeout = datetime.timedelta(seconds=float(os.environ.get(ENV_TIMEOUT, DEFAULT_TIMEOUT_S)))
    try:
        dist.init_process_group(backend=backend, timeout=timeout)
    except (ValueError, RuntimeError) as exc:  # a torch without per-device backends: NCCL alone
        if backend == "gloo":
            raise
        logger.warning("process group %r failed (%s); using nccl", backend, exc)
        backend = "nccl"
        dist.init_process_group(backend=backend, timeout=timeout)
    _isolate_modelopt()
    atexit.register(shutdown)
    if not is_main():
        from adm_export.progress import set_progress

        logging.getLogger("adm_export").setLevel(logging.WARNING)
        set_progress(False)
    logger.info("torch.distributed: %d processes (%s)", world_size(), backend)
    return True


def shutdown() -> None:
    """Destroy the process group (idempotent; registered at exit by :func:`init`).

    Why: a process group left to the interpreter's teardown is destroyed with its gloo/store
    threads still joinable, and the C++ runtime aborts the process ("terminate called without an
    active exception", SIGABRT). Seen here after a finished two-process build: every stage had
    succeeded, yet torchrun reported rank 1 failed (exit -6). No barrier first: at a normal exit
    the ranks have passed the stage's last one, and after a crash a barrier would hang.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):  # a peer that is gone already: nothing left to close
            dist.destroy_process_group()


def _isolate_modelopt() -> None:
    """Keep ModelOpt from syncing calibration ranges across our ranks.

    Once a process group exists, ModelOpt's ``max`` calibration all-reduces every quantizer's
    amax over it (data-parallel calibration). Here each rank that quantizes calibrates on the same
    points (the sync would change nothing), and outside the sensitivity search only rank 0
    quantizes: its all-reduce would pair with the other ranks' barrier and hang or crash them.
    So ModelOpt is told that no process group exists (its own ``is_initialized`` helper).
    """
    import warnings

    try:
        import modelopt.torch.utils.distributed as mdist
    except ImportError:  # pragma: no cover - ModelOpt is a hard dependency of quantize
        return
    mdist.is_initialized = lambda: False
    warnings.filterwarnings("ignore", message="Distributed training is initialized but no parallel_state")


def barrier() -> None:
    """Wait for every rank (a no-op in one process). Goes through gloo (host tensors)."""
    if world_size() > 1 and init():
        import torch

        t = torch.zeros(1)
        _dist().all_reduce(t)


def broadcast(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable; small control data only)."""
    if world_size() <= 1 or not init():
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=src)
    return box[0]


def all_gather(obj: Any) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if world_size() <= 1 or not init():
        return [obj]
    out: list = [None] * world_size()
    _dist().all_gather_object(out, obj)
    return out


def split(n: int, rank_: int | None = None, world: int | None = None) -> list[int]:
    """The unit indices of ``range(n)`` this rank computes: ``i`` with ``i % world == rank`` (round robin)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return list(range(r, n, w))


# -- shards -----------------------------------------------------------------------------------------
def key_of(data: Any) -> str:
    """16 hex digits of SHA-256 over canonical JSON of ``data`` (sorted keys)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tensor_digest(tensors: Sequence[Any] | dict) -> str:
    """Content hash of tensors (exact bytes, dtype and shape): for a key over input data."""
    h = hashlib.blake2b(digest_size=8)
    items = tensors.items() if isinstance(tensors, dict) else enumerate(tensors)
    for name, t in items:
        if isinstance(t, dict):
            h.update(tensor_digest(t).encode())
            continue
        import torch

        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@contextlib.contextmanager
def shard_area(out: str | os.PathLike | None) -> Iterator[Path | None]:
    """Make ``<out's parent>/.<out's name>.shards`` the shard area of the commands inside the block.

    Nested calls keep the outer area (``build`` sets it once for all its stages). When the block
    succeeds, rank 0 removes the area (unless ``ADM_EXPORT_KEEP_SHARDS=1``); when it fails the
    shards stay for the rerun. ``out=None`` sets nothing (stages then use a temporary area).
    """
    global _area
    if _area is not None or out is None:
        yield _area
        return
    out = Path(out)
    _area = out.parent / f".{out.name}.shards"
    try:
        yield _area
        barrier()
        if is_main() and os.environ.get(ENV_KEEP, "") in ("", "0"):
            shutil.rmtree(_area, ignore_errors=True)
    finally:
        _area = None


@contextlib.contextmanager
def main_output(out: str | os.PathLike) -> Iterator[Path]:
    """``out`` on rank 0; on the other ranks a scratch path, removed after the block.

    For a stage every rank must run (it holds a sharded loop) but only rank 0 may write.
    """
    if is_main():
        yield Path(out)
        return
    tmp = Path(tempfile.mkdtemp(prefix=f"adm-export-rank{rank()}-"))
    try:
        yield tmp / Path(out).name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclasses.dataclass
class ShardStore:
    """One stage's shard folder: ``<area>/<stage>-<key>/<unit>.pt``.

    Attributes:
        folder: The folder (shared by every rank).
        key: Hash of everything the units' results depend on.
        temporary: The folder is a temporary area, removed by :meth:`close`.
    """

    folder: Path
    key: str
    temporary: bool = False

    @classmethod
    def open(cls, stage: str, key_data: Any) -> "ShardStore":
        """The store of ``stage`` for inputs ``key_data`` in the current :func:`shard_area`.

        Outside any area, rank 0 makes a temporary folder and tells the others its path.
        """
        key = key_of({"stage": stage, **({"data": key_data})})
        if _area is not None:
            folder, temporary = _area / f"{stage}-{key}", False
        else:
            folder = Path(broadcast(tempfile.mkdtemp(prefix=f"adm-{stage}-") if is_main() else None))
            temporary = True
        folder.mkdir(parents=True, exist_ok=True)
        return cls(folder, key, temporary)

    def path(self, unit: str) -> Path:
        return self.folder / f"{unit}.pt"

    def has(self, unit: str) -> bool:
        return self.path(unit).is_file()

    def save(self, unit: str, data: Any) -> None:
        """Write one unit's result atomically (temporary file, then rename)."""
        import torch

        with atomic_file(self.path(unit)) as tmp:
            torch.save({"key": self.key, "unit": unit, "data": data}, tmp)

    def load(self, unit: str) -> Any:
        """One unit's result (tensors, numbers, strings, lists and dicts of them)."""
        import torch

        blob = torch.load(self.path(unit), map_location="cpu", weights_only=True)
        if blob.get("key") != self.key or blob.get("unit") != unit:
            raise ValueError(f"shard {self.path(unit)} belongs to another run")
        return blob["data"]

    def close(self) -> None:
        """Remove a temporary store (rank 0, after every rank is done with it)."""
        if self.temporary:
            barrier()
            if is_main():
                shutil.rmtree(self.folder, ignore_errors=True)


def _after_shard_written() -> None:
    """The ``ADM_EXPORT_FAIL_AFTER_SHARDS`` test hook: die like a killed process."""
    global _shards_written
    _shards_written += 1
    spec = os.environ.get(ENV_FAIL, "")
    if spec:
        r, _, k = spec.partition(":")
        if int(r) == rank() and _shards_written >= int(k or 1):
            logging.getLogger(__name__).warning("rank %d: %s=%s: exiting after %d shard(s)", rank(), ENV_FAIL,
                                                spec, _shards_written)
            sys.stderr.flush()
            os._exit(FAIL_EXIT_CODE)


def run_units(store: ShardStore, units: Sequence[str], compute: Callable[[int], Any], desc: str,
              unit: str = "unit") -> dict:
    """Compute this rank's share of ``units`` (missing shards only), then wait for every rank.

    Args:
        store: Where results go.
        units: Unit names (file stems), in a fixed order every rank agrees on.
        compute: ``compute(i) -> result`` of unit ``i`` (saved with :meth:`ShardStore.save`).
        desc: Progress-bar label (rank 0's share).
        unit: Progress-bar unit.

    Returns:
        ``{"units", "computed", "reused", "world_size"}`` summed over ranks (identical on every rank).
    """
    from adm_export.progress import progress

    computed = reused = 0
    for i in progress(split(len(units)), desc=desc, unit=unit):
        if store.has(units[i]):  # complete by construction (atomic rename); its key is the folder's
            reused += 1
            continue
        store.save(units[i], compute(i))
        computed += 1
        _after_shard_written()
    counts = all_gather((computed, reused))
    stats = {"units": len(units), "computed": sum(c for c, _ in counts), "reused": sum(r for _, r in counts),
             "world_size": world_size()}
    if stats["reused"]:
        logger.info("%s: %d of %d units reused from %s", desc, stats["reused"], len(units), store.folder)
    return stats


def load_all(store: ShardStore, units: Sequence[str]) -> list:
    """Every unit's result, in ``units`` order (call after :func:`run_units`)."""
    return [store.load(u) for u in units]


# -- launching --------------------------------------------------------------------------------------
def check_nproc(nproc: int, device: str) -> None:
    """Refuse a process count that cannot run.

    Raises:
        InvalidInputError: ``nproc < 1``, or more processes than visible GPUs with ``--device cuda``.
    """
    if nproc < 1:
        raise InvalidInputError(f"invalid --nproc {nproc}: give 1 or more processes (one per GPU with --device cuda)")
    if device == "cuda":
        import torch

        from adm_export.devices import check_device

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if nproc == 1:
            check_device(device)  # no GPU at all: say so (not "--nproc 1 needs 1 GPUs")
        elif nproc > gpus:
            fix = f"use --nproc {gpus} or fewer" if gpus else "use --device cpu, or a machine with GPUs"
            raise InvalidInputError(f"--nproc {nproc} needs {nproc} GPUs but {gpus} are visible; {fix}")


def torchrun_command(nproc: int, args: Sequence[str]) -> list[str]:
    """The command that reruns ``adm-export args`` under torchrun with ``nproc`` processes on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "adm_export", *args]


def strip_nproc(args: Sequence[str]) -> list[str]:
    """``args`` without ``--nproc N`` / ``--nproc=N``."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out


def launch(nproc: int, args: Sequence[str]) -> int:
    """Run ``adm-export args`` under torchrun with ``nproc`` processes and return rank 0's exit code.

    Workers get the NVLink-multicast-off environment (:data:`NCCL_ENV`) and, unless set,
    ``OMP_NUM_THREADS`` = cores / ``nproc``. Rank 0 records its exit code in a file (a failed
    quality gate stays exit 2; torchrun itself only says "failed").
    """
    env = dict(os.environ)
    for k, v in NCCL_ENV.items():
        env.setdefault(k, v)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    fd, exit_file = tempfile.mkstemp(prefix="adm-export-exit-")
    os.close(fd)
    env[ENV_EXIT_FILE] = exit_file
    cmd = torchrun_command(nproc, args)
    logger.info("relaunching under torchrun: %s", " ".join(cmd[1:]))
    try:
        rc = subprocess.call(cmd, env=env)
        text = Path(exit_file).read_text().strip()
        # Rank 0's own code when it got to write one (0, 1 user error, 2 gate failed), unless
        # another rank crashed after it; torchrun's code (1) when rank 0 died.
        return int(text) if text and (int(text) or not rc) else (rc or 0)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(exit_file)


def record_exit(code: int) -> None:
    """Under :func:`launch`: rank 0 writes the exit code it is about to return."""
    path = os.environ.get(ENV_EXIT_FILE)
    if path and is_main():
        with contextlib.suppress(OSError):
            Path(path).write_text(str(code))
