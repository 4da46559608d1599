"""Calibration points from sampler trajectories.

The sampler runs (with classifier-free guidance exactly as the pipeline does) on every prompt of
the prompt set; each denoiser call it makes is a candidate calibration point (prompt, step, x_t,
t, conditioning). A selection method picks ``points`` of them; the cache stores exactly the
denoiser inputs of the selected points, so quantization replays them without the sampler.

Selection methods under the same budget K (``--select``):

* ``activation`` (default): activation-aware selection (:mod:`adm_export.calibration.selection`)
  on per-layer activation statistics recorded during the runs (:mod:`adm_export.calibration.stats`).
* ``uniform``: evenly spaced steps (Q-Diffusion), prompts assigned round-robin.
* ``random``: K distinct (prompt, step) pairs drawn uniformly.
* ``normal``: steps drawn from a normal law centred mid-trajectory, sigma = steps / 4 (PTQ4DM),
  prompts drawn uniformly.
* ``all``: every (prompt, step); K is ignored.

Every method records the statistics (the manifest reports, for any method, the estimated input
error and range coverage of its selection). Index-based methods decide the (prompt, step) pairs
before the sampler runs, so one pass keeps only the chosen inputs. ``activation`` only knows its
choice once every statistic is in, so it runs **two passes**: pass 1 records statistics and a
64-bit hash of every denoiser input; pass 2 re-runs the sampler for the chosen prompts only, with
the same seeds, stops each run after its last chosen step, keeps the chosen inputs and checks
their hashes against pass 1 (the sampler is deterministic: same prompt and seed, same
trajectory; a mismatch, possible with non-deterministic GPU kernels, is logged and counted in
the manifest). Memory is the statistics (see :mod:`adm_export.calibration.stats`) plus the K
kept points, independent of how many points were recorded; the price is at most one more
sampler run per chosen prompt, cut after its last chosen step.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from adm_export.artifacts import atomic_dir, write_manifest
from adm_export.calibration.cache import STAGE, save_points
from adm_export.calibration.prompts import build_prompt_set
from adm_export.calibration.selection import select_activation, summarize
from adm_export.calibration.stats import ActivationStats, StatsRecorder
from adm_export.config import CalibrationConfig, SelectMethod, to_dict
from adm_export.devices import exact_float32
from adm_export.errors import InvalidInputError
from adm_export.progress import progress

logger = logging.getLogger(__name__)


def select_indices(method: SelectMethod, num_prompts: int, steps: int, points: int,
                   seed: int) -> list[tuple[int, int]]:
    """Choose (prompt, step) pairs for an index-based selection method.

    Args:
        method: ``uniform``, ``random``, ``normal`` or ``all``.
        num_prompts: Prompts in the run.
        steps: Sampler steps per prompt.
        points: Budget K (ignored by ``all``).
        seed: Seed of the random choices.

    Returns:
        Sorted, distinct (prompt, step) pairs; ``min(points, num_prompts * steps)`` of them.
    """
    rng = np.random.default_rng(seed)
    total = num_prompts * steps
    k = min(points, total)
    if method == SelectMethod.ALL:
        return [(p, s) for p in range(num_prompts) for s in range(steps)]
    if method == SelectMethod.RANDOM:
        flat = rng.choice(total, size=k, replace=False)
        return sorted((int(i) // steps, int(i) % steps) for i in flat)
    if method == SelectMethod.UNIFORM:
        order = rng.permutation(num_prompts)
        step_of = np.linspace(0, steps - 1, k) if k > 1 else np.array([steps // 2])
        chosen: set[tuple[int, int]] = set()
        for i, s in enumerate(np.rint(step_of).astype(int)):
            p = int(order[i % num_prompts])
            # With K > steps several points share a step; move to the next prompt on collision.
            while (p, int(s)) in chosen:
                p = (p + 1) % num_prompts
            chosen.add((p, int(s)))
        return sorted(chosen)
    if method == SelectMethod.NORMAL:
        chosen = set()
        while len(chosen) < k:
            s = int(np.clip(np.rint(rng.normal((steps - 1) / 2, steps / 4)), 0, steps - 1))
            chosen.add((int(rng.integers(num_prompts)), s))
        return sorted(chosen)
    raise InvalidInputError(f"--select {method.value!r} is not an index-based method")


class _StopSampler(Exception):
    """Raised from the denoiser hook to end a replay run after its last wanted step."""


def input_hash(inputs: dict[str, Any]) -> str:
    """64-bit BLAKE2 hash of a denoiser call's inputs (exact bytes, in spec order)."""
    h = hashlib.blake2b(digest_size=8)
    for name, value in inputs.items():
        h.update(name.encode())
        h.update(value.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()


def run_prompt(adapter, prompts: Sequence[str], cfg: CalibrationConfig, p: int,
               on_call: Callable[[int, int, dict], None], last: int | None = None) -> int:
    """Run the sampler on prompt ``p`` (seed ``cfg.seed + p``) and report every denoiser call.

    Args:
        adapter: Model adapter.
        prompts: The prompt set.
        cfg: Calibration settings (steps, audio length, guidance scale, seed).
        p: The prompt's index.
        on_call: ``on_call(prompt, step, named_inputs)`` before each denoiser call; the inputs
            are the live tensors (clone what you keep).
        last: End the run right after reporting this step (its denoiser call is skipped, and so
            is the rest of the sampler).

    Returns:
        The number of denoiser calls reported.
    """
    step = 0

    def record(inputs):
        nonlocal step
        if step < cfg.steps:
            on_call(p, step, inputs)
        step += 1
        if last is not None and step > last:
            raise _StopSampler

    with adapter.record_denoiser_calls(record):
        try:
            adapter.generate([prompts[p]], [cfg.seed + p], cfg.steps, cfg.audio_seconds, cfg.guidance_scale)
        except _StopSampler:
            pass
        else:
            if step != cfg.steps:
                logger.warning("sampler made %d denoiser calls for %d steps (prompt %d)", step, cfg.steps, p)
    return min(step, cfg.steps)


def run_trajectories(adapter, prompts: Sequence[str], cfg: CalibrationConfig,
                     on_call: Callable[[int, int, dict], None], prompt_ids: Sequence[int] | None = None,
                     stop_after: dict[int, int] | None = None, desc: str = "calibrate: sampling") -> int:
    """Run the sampler on prompts and report every denoiser call.

    Prompt ``p`` is sampled with seed ``cfg.seed + p`` (so a re-run of ``p`` alone reproduces its
    trajectory), one prompt at a time (memory stays one trajectory); see :func:`run_prompt`.

    Args:
        adapter: Model adapter.
        prompts: The prompt set.
        cfg: Calibration settings (steps, audio length, guidance scale, seed).
        on_call: ``on_call(prompt, step, named_inputs)`` before each denoiser call; the inputs
            are the live tensors (clone what you keep).
        prompt_ids: Which prompts to run (default: all).
        stop_after: ``{prompt: step}``: end that prompt's run right after reporting this step
            (its denoiser call is skipped, and so is the rest of the sampler).

    Returns:
        The number of denoiser calls made.
    """
    ids = list(range(len(prompts))) if prompt_ids is None else list(prompt_ids)
    calls = 0
    for p in progress(ids, desc=desc, unit="prompt"):
        calls += run_prompt(adapter, prompts, cfg, p, on_call, None if stop_after is None else stop_after.get(p))
    return calls


def _keep(kept: dict, wanted: set, hashes: dict | None = None) -> Callable[[int, int, dict], None]:
    """An ``on_call`` that copies the inputs of wanted (prompt, step) pairs to the host."""
    import torch

    def on_call(p, s, inputs):
        if (p, s) in wanted:
            kept[(p, s)] = {k: v.detach().to("cpu", torch.float32).clone() for k, v in inputs.items()}
            if hashes is not None:
                hashes[(p, s)] = input_hash(inputs)

    return on_call


def _stats_rows(recorder: StatsRecorder, p: int) -> dict:
    """Prompt ``p``'s statistics rows (exact copies), for its shard."""
    import torch

    recorder.flush()
    st = recorder.result()
    return {"absmax": torch.from_numpy(st.absmax[p].copy()), "sumsq": torch.from_numpy(st.sumsq[p].copy()),
            "hist": torch.from_numpy(st.hist[p].copy()), "recorded": torch.from_numpy(st.recorded[p].copy())}


def _merge_stats(layers: list[str], grid, num_prompts: int, steps: int, rows: Sequence[dict]) -> ActivationStats:
    """The statistics of every prompt from per-prompt shards: rows are placed, never summed, so the
    merged arrays equal what one process records (bit for bit)."""
    n = len(layers)
    st = ActivationStats(layers=list(layers), grid=grid,
                         absmax=np.zeros((num_prompts, steps, n), dtype=np.float32),
                         sumsq=np.zeros((num_prompts, steps, n), dtype=np.float32),
                         hist=np.zeros((num_prompts, steps, n, grid.bins), dtype=np.float32),
                         recorded=np.zeros((num_prompts, steps), dtype=bool))
    for p, row in enumerate(rows):
        st.absmax[p], st.sumsq[p], st.hist[p] = row["absmax"].numpy(), row["sumsq"].numpy(), row["hist"].numpy()
        st.recorded[p] = row["recorded"].numpy()
    return st


def _kept_of(units: Sequence[dict]) -> tuple[dict, dict]:
    """Kept inputs and input hashes ``{(prompt, step): ...}`` from shards."""
    kept, hashes = {}, {}
    for u in units:
        p = int(u["prompt"])
        kept.update({(p, int(s)): v for s, v in u.get("kept", {}).items()})
        hashes.update({(p, int(s)): v for s, v in u.get("hashes", {}).items()})
    return kept, hashes


@exact_float32()  # the cache holds the FP32 model's own trajectories, on any device
def calibrate(cfg: CalibrationConfig, out: str | Path, force: bool = False, adapter=None) -> dict | None:
    """Run the ``calibrate`` stage: prompts -> sampler trajectories -> selected points -> cache.

    Under torchrun the prompts' sampler runs are split over the ranks (one prompt per resumable
    shard, :mod:`adm_export.distributed`); rank 0 merges the statistics, selects and writes the
    cache. The cache is bit-identical for any number of processes. The stage runner
    (:func:`adm_export.stages.api.calibrate`) checks and locks ``out``, sets the shard area and
    broadcasts the manifest to every rank.

    Args:
        cfg: Calibration settings.
        out: Cache folder to write (refused if non-empty unless ``force``).
        force: Overwrite ``out``.
        adapter: An already loaded model adapter (``build`` shares one between stages).

    Returns:
        The cache manifest on rank 0, ``None`` on the other ranks.
    """
    import torch

    from adm_export import distributed as dist
    from adm_export.models import load_model, model_defaults

    main = dist.is_main()
    # 1. Model and prompts (the prompt set is deterministic: every rank builds the same one).
    adapter = adapter or load_model(cfg.model, cfg.device)
    # Seeds and augmented prompts compete for the N slots (seeds_first=False): at small N that
    # covers far more (aspect, value) pairs than the seed captions alone (README, calibration).
    captions = cfg.captions_file or model_defaults(cfg.model)["captions"]
    prompt_set = build_prompt_set(captions, cfg.num_prompts, cfg.seed, augment=cfg.augment,
                                  seeds_first=False)
    prompts = list(prompt_set.prompts)
    pairs = len(prompts) * cfg.steps
    if main and cfg.select != SelectMethod.ALL and cfg.points > pairs:
        logger.warning("--points %d is more than the %d (prompt, step) pairs of %d prompt(s) x %d steps: keeping %d; "
                       "raise --num-prompts or --steps for more", cfg.points, pairs, len(prompts), cfg.steps, pairs)
    cfg_rows = 2 if cfg.guidance_scale > 1.0 else 1
    recorder = StatsRecorder(adapter.denoiser, len(prompts), cfg.steps)
    names = [t.name for t in adapter.denoiser_spec().inputs]
    # Everything a prompt's shard depends on: a shard of another model, config or prompt set has
    # another key and is never reused.
    key = {"model": adapter.identity(), "config": to_dict(cfg), "prompts": prompts, "layers": recorder.layers,
           "grid": recorder.grid.to_dict(), "inputs": names}
    units = [f"prompt-{p:05d}" for p in range(len(prompts))]
    extra_selection: dict[str, Any] = {}
    shards: dict[str, dict] = {}
    stats = kept = None

    def with_stats(inner):
        def on_call(p, s, inputs):
            recorder.at(p, s)
            inner(p, s, inputs)
        return on_call

    def by_step(d: dict) -> dict:
        return {str(s): v for (_, s), v in d.items()}

    if cfg.select != SelectMethod.ACTIVATION:
        # 2. Index-based: the (prompt, step) pairs are known up front; one pass records the
        #    statistics and keeps the wanted inputs (one shard per prompt).
        wanted = select_indices(cfg.select, len(prompts), cfg.steps, cfg.points, cfg.seed)
        wanted_set = set(wanted)
        store = dist.ShardStore.open("calibration-trajectories", key)

        def sample(p: int) -> dict:
            kept_p: dict = {}
            run_prompt(adapter, prompts, cfg, p, with_stats(_keep(kept_p, wanted_set)))
            return {"prompt": p, **_stats_rows(recorder, p), "kept": by_step(kept_p)}

        with recorder:
            shards["trajectories"] = dist.run_units(store, units, sample, "calibrate: sampling", "prompt")
        if main:
            rows = dist.load_all(store, units)
            stats = _merge_stats(recorder.layers, recorder.grid, len(prompts), cfg.steps, rows)
            kept, _ = _kept_of(rows)
        store.close()
    else:
        # 2a. Pass 1: statistics and input hashes of every denoiser call (one shard per prompt).
        store = dist.ShardStore.open("calibration-statistics", key)

        def record(p: int) -> dict:
            hashes_p: dict[str, str] = {}

            def remember(_, s, inputs):
                hashes_p[str(s)] = input_hash(inputs)

            run_prompt(adapter, prompts, cfg, p, with_stats(remember))
            return {"prompt": p, **_stats_rows(recorder, p), "hashes": hashes_p}

        with recorder:
            shards["statistics"] = dist.run_units(store, units, record, "calibrate: statistics", "prompt")
        result = hashes = None
        if main:
            rows = dist.load_all(store, units)
            stats = _merge_stats(recorder.layers, recorder.grid, len(prompts), cfg.steps, rows)
            _, hashes = _kept_of(rows)
            # 2b. Selection on the statistics (rank 0; every rank gets the chosen points).
            result = select_activation(stats, cfg.points)
        store.close()
        wanted = [tuple(w) for w in dist.broadcast(result.points if main else None)]
        wanted_set = set(wanted)
        # 2c. Pass 2: replay the chosen prompts up to their last chosen step; keep those inputs.
        last: dict[int, int] = {}
        for p, s in wanted:
            last[p] = max(last.get(p, -1), s)
        replay_ids = sorted(last)
        rstore = dist.ShardStore.open("calibration-replay", {**key, "wanted": wanted})

        def replay(i: int) -> dict:
            p = replay_ids[i]
            kept_p: dict = {}
            hashes_p: dict = {}
            calls_p = run_prompt(adapter, prompts, cfg, p, _keep(kept_p, wanted_set, hashes_p), last[p])
            return {"prompt": p, "kept": by_step(kept_p), "hashes": by_step(hashes_p), "calls": calls_p}

        runits = [f"prompt-{p:05d}" for p in replay_ids]
        shards["replay"] = dist.run_units(rstore, runits, replay, "calibrate: replay", "prompt")
        if main:
            rrows = dist.load_all(rstore, runits)
            kept, replay_hashes = _kept_of(rrows)
            calls = sum(int(r["calls"]) for r in rrows)
            mismatches = sum(replay_hashes[k] != hashes[k] for k in wanted)
            if mismatches:
                logger.warning("replayed trajectories differ from pass 1 at %d of %d points (non-deterministic "
                               "kernels?); the kept inputs are the replayed ones", mismatches, len(wanted))
            extra_selection = {"activation": result.to_dict(),
                               "replay": {"prompts": len(last), "denoiser_calls": calls,
                                          "bit_exact": mismatches == 0, "mismatches": mismatches}}
        rstore.close()
    if not main:
        return None

    # 3. Concatenate the kept points in (prompt, step) order and write the cache (rank 0).
    inputs = {n: torch.cat([kept[k][n] for k in wanted]) for n in names}
    prompt_index = torch.tensor([p for p, _ in wanted])
    step_index = torch.tensor([s for _, s in wanted])
    steps_hist = np.bincount(step_index.numpy(), minlength=cfg.steps).tolist()
    summary = summarize(stats, wanted, quantiles=cfg.stats_quantiles)
    with atomic_dir(out, force=force) as tmp:
        save_points(tmp, inputs, prompt_index, step_index)
        manifest = write_manifest(
            tmp, STAGE, adapter.identity(), to_dict(cfg),
            extra={
                "spec": adapter.denoiser_spec().to_dict(),
                "prompts": {"source": prompt_set.source, "prompts": prompts, "coverage": prompt_set.coverage},
                "selection": {
                    "method": cfg.select.value,
                    "points": len(wanted),
                    "budget": cfg.points,
                    "rows_per_point": cfg_rows,
                    "steps_histogram": steps_hist,
                    "prompts_used": len(set(prompt_index.tolist())),
                    "estimated_input_error": summary["estimated_input_error"]["selected"],
                    "range_coverage": summary["range_coverage"]["mean"],
                    **extra_selection,
                },
                "statistics": summary,
                "distributed": {"world_size": dist.world_size(), "shards": shards},
            },
        )
    logger.info("calibration cache: %d points (%s) from %d prompts x %d steps -> %s; estimated input error "
                "%.3g (all points %.3g)", len(wanted), cfg.select.value, len(prompts), cfg.steps, out,
                summary["estimated_input_error"]["selected"], summary["estimated_input_error"]["all_points"])
    return manifest
