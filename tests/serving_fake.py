"""A stand-in for the bundle runtime in the HTTP tests: same API, deterministic clips, timed steps.

Clips depend only on (prompt, seconds, seed), so batching equivalence, ordering and cancellation
can be asserted exactly; ``step_delay`` makes a request take ``steps * step_delay`` seconds, so the
queue, timeout, cancel and drain tests are fast and deterministic. ``python -m tests.serving_fake``
serves it through :func:`adm_export.serving.server.serve` (the SIGTERM test runs that process).
"""

from __future__ import annotations

import argparse
import threading
import time
import zlib

import numpy as np

from adm_export.errors import InvalidInputError
from adm_export.runtime import GenerationRequest


class FakeRuntime:
    """The bundle runtime's API over a toy sampler.

    Args:
        sampling_rate: Clip rate in Hz.
        step_delay: Seconds per sampler step (whole batch).
        warmup_delay: Seconds :meth:`warmup` takes.
        max_batch: The bundle's largest batch.
    """

    def __init__(self, sampling_rate: int = 8000, step_delay: float = 0.0, warmup_delay: float = 0.0,
                 max_batch: int = 8):
        self.sampling_rate = sampling_rate
        self.model_id = "fake-audioldm"
        self.step_delay = step_delay
        self.warmup_delay = warmup_delay
        self.limits = {"min_seconds": 0.25, "max_seconds": 4.0, "max_steps": 100, "max_prompt_chars": 200,
                       "max_batch": max_batch}
        self.batches: list[list[int]] = []  # seeds of each batch, in order
        self.cancelled_seeds: list[int] = []  # requests dropped through cancelled(i)
        self.steps_run: list[int] = []  # steps each batch ran before it ended
        self.warmed = False
        self._lock = threading.Lock()

    def validate(self, req) -> None:
        lim = self.limits
        if not req.prompt.strip():
            raise InvalidInputError("empty prompt: give some text, e.g. 'a dog barks'")
        if len(req.prompt) > lim["max_prompt_chars"]:
            raise InvalidInputError(f"prompt of {len(req.prompt)} characters: at most {lim['max_prompt_chars']}")
        if not lim["min_seconds"] <= req.seconds <= lim["max_seconds"]:
            raise InvalidInputError(f"seconds {req.seconds!r} outside [{lim['min_seconds']}, {lim['max_seconds']}]")
        if not 1 <= req.steps <= lim["max_steps"]:
            raise InvalidInputError(f"steps {req.steps!r} outside [1, {lim['max_steps']}]")
        if req.guidance_scale < 0:
            raise InvalidInputError(f"guidance {req.guidance_scale!r}: must be >= 0")

    def batch_key(self, req):
        return (int(round(req.seconds * self.sampling_rate)), req.steps)

    def clip(self, req) -> np.ndarray:
        """The clip of ``req`` alone: seeded noise plus a tone chosen by the prompt."""
        n = int(round(req.seconds * self.sampling_rate))
        rng = np.random.default_rng(req.seed)
        freq = 200 + zlib.crc32(req.prompt.encode()) % 800
        t = np.arange(n) / self.sampling_rate
        return (0.5 * np.sin(2 * np.pi * freq * t) + 0.1 * rng.standard_normal(n)).astype(np.float32)

    def generate(self, reqs, cancelled=None):
        with self._lock:
            self.batches.append([r.seed for r in reqs])
        live = list(range(len(reqs)))
        steps = 0
        for _ in range(reqs[0].steps):
            if cancelled is not None:
                for i in [i for i in live if cancelled(i)]:
                    live.remove(i)
                    self.cancelled_seeds.append(reqs[i].seed)
            if not live:
                break
            time.sleep(self.step_delay)
            steps += 1
        self.steps_run.append(steps)
        return [self.clip(r) if i in live else None for i, r in enumerate(reqs)]

    def warmup(self) -> None:
        time.sleep(self.warmup_delay)
        self.warmed = True


def main() -> None:
    """Serve a :class:`FakeRuntime` (for tests that need a real process: SIGTERM, exit code)."""
    from adm_export.serving.config import ServeConfig
    from adm_export.serving.server import serve

    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--step-delay", type=float, default=0.0)
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--max-queue", type=int, default=16)
    p.add_argument("--drain-timeout", type=float, default=30.0)
    args = p.parse_args()
    cfg = ServeConfig(bundle="fake", port=args.port, max_batch=args.max_batch, max_queue=args.max_queue,
                      drain_timeout_s=args.drain_timeout, log_level="warning")
    serve(cfg, runtime=FakeRuntime(step_delay=args.step_delay))


if __name__ == "__main__":
    main()


def ray_factory(cfg) -> FakeRuntime:
    """``ServeConfig -> runtime`` for the Ray Serve test (pickled by reference, imported by each replica)."""
    return FakeRuntime(step_delay=0.01)
