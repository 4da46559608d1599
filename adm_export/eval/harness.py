"""The ``eval`` stage: the same prompts and seeds through the full-precision pipeline and the engine.

Both runs use the model's own diffusers sampler; only the denoiser differs (the engine plugs in
through :func:`adm_export.engines.stage.load_ort_denoiser`). This module generates the clips (split
over torchrun ranks, recording every step's latents) and runs the stage; what is measured on them
is :mod:`adm_export.eval.scoring` (FD statistics in :mod:`adm_export.eval.fd`, the gate in
:mod:`adm_export.eval.gate`), clip files are :mod:`adm_export.eval.clips`, figures
:mod:`adm_export.eval.figures`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from adm_export.artifacts import atomic_dir, read_manifest, write_json
from adm_export.config import EvalConfig, to_dict
from adm_export.eval.clips import load_reference, write_clips
from adm_export.eval.figures import write_figures
from adm_export.eval.scoring import embed_set, latent_error, score_clips

logger = logging.getLogger(__name__)

REFERENCE_SEED_OFFSET = 1_000_003  # far from any seed a user would pick for the main run
CHUNK = 8
#: Full-precision runs kept in memory for reuse by later evaluations in the same process, keyed
#: by model identity and sampling settings; ``None`` (the default) keeps nothing. Set it to a
#: dict when one process evaluates several engines of one model (a precision sweep, tests): the
#: baseline and the reference draw are then generated once. Entries hold every clip and latent
#: trajectory, so the cache is off by default.
BASELINE_CACHE: dict | None = None


def eval_prompts(num_clips: int, captions_file: str | None = None) -> list[str]:
    """The evaluation prompts: the captions of ``captions_file`` (else the built-in ones), cycled."""
    from adm_export.calibration.prompts import builtin_captions, load_captions

    captions = load_captions(captions_file) if captions_file else builtin_captions()
    return [captions[i % len(captions)] for i in range(num_clips)]


def generate_with_trajectory(adapter, prompts: Sequence[str], seeds: Sequence[int], cfg: EvalConfig,
                             label: str, timesteps: list | None = None,
                             denoiser_key: Any = "full-precision", embedding: tuple | None = None,
                             embedded: list | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """Generate clips in chunks of :data:`CHUNK` and record x_t of every step.

    Under torchrun the chunks are split over the ranks (one resumable shard per chunk,
    :mod:`adm_export.distributed`); rank 0 returns all clips, the others empty lists. A chunk is the same batch in
    any number of processes, so the clips are bit-identical to a single-process run.

    Args:
        adapter: Model adapter (its current denoiser is the one that runs).
        prompts: One prompt per clip.
        seeds: One seed per clip (initial noise).
        cfg: Steps, length and guidance.
        label: Progress-bar label.
        timesteps: If given, filled with the scheduler timestep of every step (first chunk).
        denoiser_key: Identity of the denoiser that runs (part of the shards' key: an engine's
            manifest digest, or ``"full-precision"``).
        embedding: ``(identity, embed)``: also embed each chunk's clips where they are generated
            (``embed(waves) -> (fd_rows_per_clip, logits)``, :func:`embed_set`), so the embedding
            is split over the ranks too; ``identity`` joins the shards' key.
        embedded: With ``embedding``: filled with ``(fd_rows_per_clip, logits)`` of all clips (rank 0).

    Returns:
        ``(waveforms, latents)`` with latents shaped (clips, steps, *latent_shape).
    """
    import torch

    from adm_export import distributed as dist

    chunks = [range(i, min(i + CHUNK, len(prompts))) for i in range(0, len(prompts), CHUNK)]
    store = dist.ShardStore.open("eval-clips", {
        "model": adapter.identity(), "denoiser": denoiser_key, "prompts": list(prompts), "seeds": list(seeds),
        "steps": cfg.steps, "audio_seconds": cfg.audio_seconds, "guidance_scale": cfg.guidance_scale,
        "device": cfg.device, "chunk": CHUNK, "embedding": None if embedding is None else embedding[0]})

    def run_chunk(c: int) -> dict:
        chunk = chunks[c]
        steps: list = []
        stamps: list[float] = []
        n = len(chunk)

        def record(inputs):
            # With classifier-free guidance the batch is [uncond; cond] over the same x_t.
            steps.append(inputs["sample"][:n].detach().to("cpu", torch.float32).clone())
            stamps.append(float(torch.as_tensor(inputs["timestep"]).reshape(-1)[0]))

        # Baseline and engine sample a length the exported U-Net can run, cut back to --eval-seconds.
        keep = int(cfg.audio_seconds * adapter.sampling_rate)
        with adapter.record_denoiser_calls(record):
            waves = adapter.generate([prompts[i] for i in chunk], [seeds[i] for i in chunk], cfg.steps,
                                     adapter.engine_seconds(cfg.audio_seconds), cfg.guidance_scale)
        waves = [w[:keep] for w in waves]
        unit = {"waves": [torch.from_numpy(np.ascontiguousarray(w)) for w in waves],
                "trajectory": torch.stack(steps, dim=1), "timesteps": stamps}
        if embedding is not None:
            blocks, logits = embedding[1](waves)
            unit["blocks"] = [torch.from_numpy(np.ascontiguousarray(b)) for b in blocks]
            unit["logits"] = None if logits is None else torch.from_numpy(np.ascontiguousarray(logits))
        return unit

    units = [f"chunk-{c:05d}" for c in range(len(chunks))]
    dist.run_units(store, units, run_chunk, f"eval: {label}", "batch")
    # Rank 0 scores the clips; the others need not hold them.
    results = dist.load_all(store, units) if dist.is_main() else []
    store.close()
    if not results:
        return [], np.zeros((0,), dtype=np.float32)
    if timesteps is not None and results:
        timesteps.extend(results[0]["timesteps"])
    waves = [w.numpy() for r in results for w in r["waves"]]
    if embedding is not None and embedded is not None:
        logits = [r["logits"] for r in results]
        embedded[:] = [[b.numpy() for r in results for b in r["blocks"]],
                       None if any(x is None for x in logits) else np.concatenate([x.numpy() for x in logits])]
    return waves, np.concatenate([r["trajectory"].numpy() for r in results])


def _embedder_identity(embedder, cfg: EvalConfig) -> dict:
    """What an embedding depends on besides the clips (part of the eval shards' key)."""
    ckpt = cfg.embedder_checkpoint
    stat = Path(ckpt).stat() if ckpt and Path(ckpt).exists() else None
    return {"name": embedder.name, "description": getattr(embedder, "description", None), "checkpoint": ckpt,
            "checkpoint_stat": None if stat is None else [stat.st_size, stat.st_mtime_ns]}


def _full_precision_run(adapter, prompts: Sequence[str], seeds: Sequence[int], cfg: EvalConfig, label: str,
                        timesteps: list, embedding: tuple | None = None,
                        embedded: list | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """:func:`generate_with_trajectory` with the adapter's own denoiser, through :data:`BASELINE_CACHE`."""
    import json

    if BASELINE_CACHE is None:
        return generate_with_trajectory(adapter, prompts, seeds, cfg, label, timesteps, embedding=embedding,
                                        embedded=embedded)
    key = json.dumps([adapter.identity(), list(prompts), list(seeds), cfg.steps, cfg.audio_seconds,
                      cfg.guidance_scale, cfg.device, None if embedding is None else embedding[0]],
                     sort_keys=True, default=str)
    if key not in BASELINE_CACHE:
        steps: list[float] = []
        emb: list = []
        BASELINE_CACHE[key] = (*generate_with_trajectory(adapter, prompts, seeds, cfg, label, steps,
                                                         embedding=embedding, embedded=emb), steps, emb)
    else:
        logger.info("eval: %s reused from this process's baseline cache", label)
    waves, traj, steps, emb = BASELINE_CACHE[key]
    timesteps[:] = steps
    if embedded is not None:
        embedded[:] = emb
    return waves, traj


def evaluate(cfg: EvalConfig, engine_dir: str | Path, out: str | Path | None = None, force: bool = False,
             adapter=None, model_id: str | None = None, embedder=None) -> dict | None:
    """Run the ``eval`` stage and return its results (the ``eval`` section of the report).

    Args:
        cfg: Evaluation settings.
        engine_dir: Folder written by the ``engine`` stage.
        out: If given, a folder for ``eval.json``, ``report.json``, ``report.md``, ``figures/`` and
            the clips (``baseline/``, ``quantized/``).
        force: Overwrite ``out``.
        adapter: An already loaded model adapter (its denoiser must be the full-precision one).
        model_id: ``--model`` given by the user; must match the engine's model.
        embedder: An already built embedder (default: ``cfg.embedder`` via ``get_embedder``).

    Returns:
        The eval result on rank 0 (``result["gate"]["passed"]`` is the quality gate's verdict),
        ``None`` on the other ranks. Under torchrun every rank generates its share of the clips;
        rank 0 scores and writes. The stage runner (:func:`adm_export.stages.api.evaluate`) checks
        and locks ``out``, sets the shard area and broadcasts the result to every rank.
    """
    from adm_export import distributed as dist
    from adm_export.artifacts import manifest_digest
    from adm_export.engines.memory import attention_materialized, check_attention_memory, score_bytes
    from adm_export.engines.onnxruntime import OrtOptions
    from adm_export.engines.stage import load_ort_denoiser, served_graph
    from adm_export.eval.embedders import get_embedder
    from adm_export.models import load_model, model_defaults

    start = time.perf_counter()
    # 1. Model, engine, embedder, prompts (and the reference folder, read before any generation).
    manifest = read_manifest(engine_dir, "engine", "--engine")
    # The engine is served exactly as `generate` serves it (same options, same checks, same
    # graph); each rank's engine runs on its own GPU (LOCAL_RANK; 0 in one process).
    options = OrtOptions.serving(cfg.device, device_id=dist.local_rank())
    served_graph(engine_dir, options, manifest)  # a CPU engine on --device cuda etc.: one line, before any work
    adapter = adapter or load_model(model_id or manifest["model"]["id"], cfg.device)
    if attention_materialized(manifest, cfg.device):  # a length whose attention cannot fit: one line, now
        check_attention_memory(adapter, adapter.engine_seconds(cfg.audio_seconds),
                               min(CHUNK, cfg.num_clips) * (2 if cfg.guidance_scale > 1 else 1), cfg.device,
                               "--eval-seconds", value_bytes=score_bytes(manifest, cfg.device))
    denoiser, _ = load_ort_denoiser(engine_dir, adapter, cfg.device, options=options)
    defaults = model_defaults(adapter.model_id)
    embedder = embedder or get_embedder(cfg.embedder or defaults["embedder"], checkpoint=cfg.embedder_checkpoint,
                                        device=cfg.device)
    prompts = eval_prompts(cfg.num_clips, cfg.captions_file or defaults["captions"])
    seeds = [cfg.seed + i for i in range(cfg.num_clips)]
    sr = adapter.sampling_rate
    ref_wave = load_reference(cfg.reference_dir, sr) if cfg.reference_dir else None

    # 2. Baseline, engine and reference clips, same prompts and seeds for the first two.
    #    Each chunk's clips are embedded where they are generated (split over ranks with it).
    timesteps: list[float] = []
    embedding = (_embedder_identity(embedder, cfg), lambda waves: embed_set(embedder, waves, sr))
    emb: list[list] = [[], [], []]
    base_wave, base_traj = _full_precision_run(adapter, prompts, seeds, cfg, "baseline", timesteps, embedding, emb[0])
    with adapter.using_denoiser(denoiser):
        q_wave, q_traj = generate_with_trajectory(adapter, prompts, seeds, cfg, "engine",
                                                  denoiser_key={"engine": manifest_digest(manifest)},
                                                  embedding=embedding, embedded=emb[1])
    if ref_wave is not None:
        reference = {"kind": "folder", "path": str(cfg.reference_dir), "clips": len(ref_wave)}
    else:
        ref_seeds = [s + REFERENCE_SEED_OFFSET for s in seeds]
        ref_wave, _ = _full_precision_run(adapter, prompts, ref_seeds, cfg, "reference draw", [], embedding, emb[2])
        reference = {"kind": "baseline_other_seeds", "clips": len(ref_wave), "seed_offset": REFERENCE_SEED_OFFSET}
    # Denoiser calls the engine made in this run, every rank's (chunks reused from shards made none).
    engine_calls = sum(dist.all_gather(int(denoiser.calls)))
    if not dist.is_main():
        return None

    # 3. Clip metrics and the gate; 4. the per-step latent error.
    scores = score_clips(cfg, prompts, base_wave, q_wave, ref_wave, sr, embedder, reference, embedded=emb)
    result = {
        "num_clips": cfg.num_clips,
        "steps": cfg.steps,
        "audio_seconds": cfg.audio_seconds,
        "precision": manifest.get("precision"),
        "reference": reference,
        "prompts": prompts,
        "seeds": seeds,
        **scores,
        **latent_error(base_traj, q_traj),
        "timesteps": timesteps,
        "engine_calls": engine_calls,
        "config": to_dict(cfg),
    }
    result["seconds"] = round(time.perf_counter() - start, 3)
    gate = result["gate"]
    logger.info("eval: %s(engine, baseline) %s; gate %s: %s", "FAD" if result["fd_kind"].startswith("FAD") else "FD",
                "–" if result["fd_quantized_vs_baseline"] is None else f"{result['fd_quantized_vs_baseline']:.4g}",
                "PASSED" if gate["passed"] else "FAILED", gate["message"])

    # 5. Artifacts: clips, figures, eval.json and the eval's own report.json / report.md.
    if out is not None:
        from adm_export.eval.report import make_report, write_report

        with atomic_dir(out, force=force) as tmp:
            write_clips(tmp / "baseline", base_wave, sr)
            write_clips(tmp / "quantized", q_wave, sr)
            if reference["kind"] == "baseline_other_seeds":
                write_clips(tmp / "reference", ref_wave, sr)
            result["figures"] = write_figures(tmp, result, base_wave, q_wave, sr, prompts)
            write_json(tmp / "eval.json", result)
            report = make_report(adapter.identity(), str(manifest.get("precision")), cfg.device,
                                 {"eval": result["seconds"]}, None, manifest, result, eval_dir="")
            write_report(tmp, report)
    return result
