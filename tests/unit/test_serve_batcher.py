"""The dynamic batcher alone (no HTTP): batch formation by key, size and wait; closed-loop clients."""

from __future__ import annotations

import threading
import time

import pytest

from adm_export.serving.batcher import DynamicBatcher, QueueFullError
from tests.serving_fake import FakeRuntime, GenerationRequest


def req(seed, seconds=0.5, steps=3):
    return GenerationRequest(prompt=f"p{seed}", seconds=seconds, steps=steps, guidance_scale=2.5, seed=seed)


def test_closed_loop_clients_keep_batches_full():
    """Clients that resubmit as soon as they are answered must not settle into batches of 7 + 1."""
    rt = FakeRuntime(step_delay=0.05)  # a batch takes 0.15 s
    b = DynamicBatcher(rt, max_batch=4, max_wait_ms=20, max_queue=16)
    b.start()
    seeds = iter(range(10_000))
    lock = threading.Lock()

    def client(rounds):
        for _ in range(rounds):
            with lock:
                s = next(seeds)
            job = b.submit(req(s))
            assert job.future.result(timeout=20) is not None
            time.sleep(0.003)  # the answer's round trip (well under max_wait)

    # One client first, alone: the others arrive while its batch runs (the alternation's trigger).
    first = threading.Thread(target=client, args=(6,))
    first.start()
    time.sleep(0.1)  # past max_wait: its batch of one is running
    others = [threading.Thread(target=client, args=(6,)) for _ in range(3)]
    for t in others:
        t.start()
    for t in [first, *others]:
        t.join(60)
    b.stop()
    sizes = [len(x) for x in rt.batches]
    assert sum(sizes) == 24
    assert sizes[0] == 1 and all(s == 4 for s in sizes[1:-1]), sizes  # full as soon as the clients line up


def test_keys_never_mix_and_the_oldest_key_goes_first():
    rt = FakeRuntime(step_delay=0.01)
    b = DynamicBatcher(rt, max_batch=8, max_wait_ms=50, max_queue=16)
    jobs = [b.submit(req(1, 0.5)), b.submit(req(2, 1.0)), b.submit(req(3, 0.5)), b.submit(req(4, 1.0, steps=4))]
    b.start()
    for j in jobs:
        assert j.future.result(timeout=10) is not None
    b.stop()
    assert rt.batches == [[1, 3], [2], [4]]


def test_queue_bound_and_cancel_in_the_queue():
    rt = FakeRuntime()
    b = DynamicBatcher(rt, max_batch=1, max_wait_ms=0, max_queue=2)  # not started: nothing leaves the queue
    a, _ = b.submit(req(1)), b.submit(req(2))
    with pytest.raises(QueueFullError) as exc:
        b.submit(req(3))
    assert exc.value.retry_after >= 1
    b.cancel(a)
    assert a.future.result() is None and b.queued == 1
    b.submit(req(4))  # room again
    b.start()
    b.stop()
    assert rt.batches == [[2], [4]]
