"""Calibration points from sampler trajectories.

The sampler runs (with classifier-free guidance exactly as the pipeline does) on every prompt of
the prompt set; each denoiser call it makes is a candidate calibration point (prompt, step, x_t,
t, conditioning). A selection method picks ``points`` of them; the cache stores exactly the
denoiser inputs of the selected points, so quantization replays them without the sampler.

Selection methods under the same budget K (``--select``):

* ``uniform``: evenly spaced steps (Q-Diffusion), prompts assigned round-robin.
* ``random``: K distinct (prompt, step) pairs drawn uniformly.
* ``normal``: steps drawn from a normal law centred mid-trajectory, sigma = steps / 4 (PTQ4DM),
  prompts drawn uniformly.
* ``all``: every (prompt, step); K is ignored.
* ``activation``: activation-aware selection (see ``calibration/selection``), when available.

Index-based methods decide the (prompt, step) pairs before the sampler runs, so only the chosen
denoiser inputs are ever kept in memory.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from adm_export.artifacts import atomic_dir, write_manifest
from adm_export.calibration.cache import STAGE, save_points
from adm_export.calibration.prompts import build_prompt_set
from adm_export.config import CalibrationConfig, SelectMethod, to_dict
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


def calibrate(cfg: CalibrationConfig, out: str | Path, force: bool = False, adapter=None) -> dict:
    """Run the ``calibrate`` stage: prompts -> sampler trajectories -> selected points -> cache.

    Args:
        cfg: Calibration settings.
        out: Cache folder to write (refused if non-empty unless ``force``).
        force: Overwrite ``out``.
        adapter: An already loaded model adapter (``build`` shares one between stages).

    Returns:
        The cache manifest.
    """
    import torch

    from adm_export.models import load_model

    # 1. Model and prompts.
    adapter = adapter or load_model(cfg.model, cfg.device)
    # Seeds and augmented prompts compete for the N slots (seeds_first=False): at small N that
    # covers far more (aspect, value) pairs than the seed captions alone (README, calibration).
    prompt_set = build_prompt_set(cfg.captions_file, cfg.num_prompts, cfg.seed, augment=cfg.augment,
                                  seeds_first=False)
    prompts = list(prompt_set.prompts)
    if cfg.select == SelectMethod.ACTIVATION:
        raise InvalidInputError(
            "--select activation is not available in this version; use uniform, random, normal or all"
        )
    # 2. Which (prompt, step) pairs to keep.
    wanted = select_indices(cfg.select, len(prompts), cfg.steps, cfg.points, cfg.seed)
    wanted_set = set(wanted)
    kept: dict[tuple[int, int], dict] = {}
    cfg_rows = 2 if cfg.guidance_scale > 1.0 else 1

    # 3. Run the sampler, one prompt at a time (memory stays one trajectory), recording the
    #    denoiser inputs of the wanted steps.
    for p, prompt in progress(list(enumerate(prompts)), desc="calibrate: sampling", unit="prompt"):
        step = 0

        def record(inputs, p=p):
            nonlocal step
            if (p, step) in wanted_set:
                kept[(p, step)] = {k: v.detach().to("cpu", torch.float32).clone() for k, v in inputs.items()}
            step += 1

        with adapter.record_denoiser_calls(record):
            adapter.generate([prompt], [cfg.seed + p], cfg.steps, cfg.audio_seconds, cfg.guidance_scale)
        if step != cfg.steps:
            logger.warning("sampler made %d denoiser calls for %d steps", step, cfg.steps)

    # 4. Concatenate the kept points in (prompt, step) order and write the cache.
    names = [t.name for t in adapter.denoiser_spec().inputs]
    inputs = {n: torch.cat([kept[key][n] for key in wanted]) for n in names}
    prompt_index = torch.tensor([p for p, _ in wanted])
    step_index = torch.tensor([s for _, s in wanted])
    steps_hist = np.bincount(step_index.numpy(), minlength=cfg.steps).tolist()
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
                },
            },
        )
    logger.info("calibration cache: %d points (%s) from %d prompts x %d steps -> %s",
                len(wanted), cfg.select.value, len(prompts), cfg.steps, out)
    return manifest
