"""Will a clip length fit? The engine's attention memory against what the device has free.

An exported U-Net holds each self-attention's full score matrix (``ModelAdapter.attention_bytes``:
quadratic in the audio length), unless its attention is fused into kernels that do not
(:func:`attention_materialized`: the CUDA engine). :func:`check_attention_memory` refuses a length whose largest score
matrix alone exceeds the memory free on the device, with one line naming the longest length that
would fit, before a single step runs (ONNX Runtime would otherwise try the allocation and fail
deep inside a run: ``generate --seconds 600`` asked for 115 GB).
"""

from __future__ import annotations

import os
from pathlib import Path

from adm_export.errors import OutOfMemoryError


def available_bytes(device: str = "cpu") -> int | None:
    """Memory free for this process on ``device``: ``MemAvailable`` (capped by a cgroup limit) or
    the GPU's free memory; ``None`` if unknown."""
    if str(device).startswith("cuda"):
        try:
            import torch

            return int(torch.cuda.mem_get_info()[0]) if torch.cuda.is_available() else None
        except Exception:  # noqa: BLE001 - no driver, no context: unknown, not an error
            return None
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except OSError:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    try:  # a container's limit (cgroup v2) is tighter than the machine's memory
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max" and free is not None:
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass
    return free


def longest_fitting_seconds(adapter, rows: int, free: int, upper: float, value_bytes: int = 4) -> float:
    """The longest length (0.01 s steps, below ``upper``) whose attention fits in ``free`` bytes."""
    lo, hi = 0.0, float(upper)
    for _ in range(40):
        mid = (lo + hi) / 2
        if (adapter.attention_bytes(rows, mid, value_bytes) or 0) <= free:
            lo = mid
        else:
            hi = mid
    return int(lo * 100) / 100


def score_bytes(engine_manifest: dict, device: str) -> int:
    """Bytes per attention score of an engine: 2 where it computes in FP16 (the CUDA engine, an FP16
    export), else 4."""
    fp16 = str(device).startswith("cuda") or engine_manifest.get("precision") == "fp16"
    return 2 if fp16 else 4


def attention_materialized(engine_manifest: dict, device: str) -> bool:
    """Whether an engine holds full attention score matrices when it runs on ``device``.

    The export as it is (CPU engines: MatMul -> Softmax -> MatMul) does. The fused CUDA engine's
    ``MultiHeadAttention`` runs ONNX Runtime's flash / memory-efficient kernels on the GPU, whose
    memory grows linearly with the length: no score matrix to refuse a length for.
    """
    ort = ((engine_manifest.get("report") or {}).get("engines") or {}).get("onnxruntime") or {}
    fused = int((ort.get("fusions") or {}).get("MultiHeadAttention", 0) or 0)
    return not (str(device).startswith("cuda") and fused > 0)


def check_attention_memory(adapter, seconds: float, rows: int, device: str, seconds_flag: str,
                           batch_flag: str | None = None, value_bytes: int = 4) -> None:
    """Refuse a clip length the engine's attention cannot hold on ``device``.

    Args:
        adapter: The model (its U-Net config gives the attention sizes).
        seconds: Audio length the engine will run.
        rows: Batch rows of one denoiser call (clips per call x 2 with guidance).
        device: Where the engine runs.
        seconds_flag: The option that set ``seconds`` (for the message).
        batch_flag: The option that sets the clips per call, if any.
        value_bytes: Bytes per score (:func:`score_bytes`).

    Raises:
        OutOfMemoryError: The largest attention score matrix alone exceeds the free memory.
    """
    need = adapter.attention_bytes(rows, seconds, value_bytes)
    free = available_bytes(device)
    if not need or free is None or need <= free:
        return
    fits = longest_fitting_seconds(adapter, rows, free, seconds, value_bytes)
    more = f" or {batch_flag}" if batch_flag else ""
    raise OutOfMemoryError(
        f"{seconds_flag} {seconds:g} needs {need / 1e9:.1f} GB for one attention map of the U-Net "
        f"({rows} rows) but {free / 1e9:.1f} GB are free on {device}: lower {seconds_flag} (at most {fits:g} s "
        f"here){more}"
    )
