"""Progress bars and stage timing shared by every stage.

Bars are tqdm bars on stderr, switched off with ``--no-progress`` (CLI) or the environment
variable ``ADM_EXPORT_NO_PROGRESS=1`` (CI logs), and always off when stderr is not a terminal
unless forced on. Without a bar, a loop that runs longer than ``HEARTBEAT_SECONDS`` logs a line
(``desc: i/total unit, elapsed, ETA``) every ``HEARTBEAT_SECONDS``, so long stages in CI logs
still show that they progress.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
_enabled: bool | None = None
logger = logging.getLogger(__name__)
HEARTBEAT_SECONDS = 30.0


def set_progress(enabled: bool | None) -> None:
    """Force progress bars on or off; ``None`` restores the automatic choice."""
    global _enabled
    _enabled = enabled


def progress_enabled() -> bool:
    if _enabled is not None:
        return _enabled
    if os.environ.get("ADM_EXPORT_NO_PROGRESS", "") not in ("", "0"):
        return False
    return sys.stderr.isatty()


def progress(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Wrap a loop in a tqdm bar when progress is enabled."""
    if not progress_enabled():
        yield from _heartbeat(iterable, desc, total, unit)
        return
    from tqdm.auto import tqdm

    yield from tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True)


def _heartbeat(iterable: Iterable[T], desc: str, total: int | None, unit: str) -> Iterator[T]:
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    start = last = time.perf_counter()
    for i, item in enumerate(iterable):
        now = time.perf_counter()
        if now - last >= HEARTBEAT_SECONDS:
            last = now
            elapsed = now - start
            eta = f", about {elapsed / i * (total - i):.0f} s left" if total and i else ""
            logger.info("%s: %d/%s %s, %.0f s%s", desc, i, total if total else "?", unit, elapsed, eta)
        yield item


@contextlib.contextmanager
def timed_stage(name: str, logger: logging.Logger, timings: dict | None = None,
                start_level: int = logging.INFO) -> Iterator[None]:
    """Log a stage's start (at ``start_level``) and finish with its duration; store seconds in ``timings[name]``."""
    logger.log(start_level, "%s: started", name)
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    if timings is not None:
        timings[name] = round(seconds, 3)
    logger.info("%s: finished in %.1f s", name, seconds)
