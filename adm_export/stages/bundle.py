"""The ``bundle`` stage: a build's engine plus every other component as ONNX, for the torch-free runtime.

``adm-export bundle BUILD_DIR --out BUNDLE`` reads ``BUILD_DIR/engines`` (its SHA-256 hashes
checked: a changed file is refused), loads the same model (same weight fingerprint), and writes
the folder described in :mod:`adm_export.runtime.layout`:

1. the U-Net: every file of ``engines/onnxruntime/`` (external data included), with the device
   it was built for (the engine manifest's ``config.device``) and its precision;
2. the family's other components exported to ONNX (:mod:`adm_export.export.components`), each
   checked against torch on the same input;
3. tokenizers as ``tokenizer.json`` for the ``tokenizers`` package, checked to give transformers'
   token ids; the scheduler config (refused if the runtime cannot run it); the audio format;
4. ``bundle.json`` and ``manifest.json`` (hashes of every file). The folder appears only when complete.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from adm_export.artifacts import (atomic_dir, check_same_model, manifest_digest, read_manifest, write_json,
                                  write_manifest)
from adm_export.config import BundleConfig, to_dict
from adm_export.errors import ArtifactNotFoundError, InvalidInputError
from adm_export.runtime import layout
from adm_export.stages.results import BundleResult

logger = logging.getLogger(__name__)

ENGINE_STAGE = "engine"
ORT_DIR = "onnxruntime"
# Prompts the tokenizer check compares: empty, ordinary, punctuation and case, over-long.
_TOKENIZER_PROBES = ("", "a dog barks", "A Loud SIREN, rising; then: rain!", "wind " * 200)


def engines_folder(build_dir: str | Path) -> Path:
    """``BUILD_DIR/engines``, or ``BUILD_DIR`` itself when it is an engines folder."""
    build_dir = Path(build_dir)
    if (build_dir / "engines" / "manifest.json").is_file():
        return build_dir / "engines"
    if (build_dir / "manifest.json").is_file():
        return build_dir
    raise ArtifactNotFoundError(
        f"BUILD_DIR {str(build_dir)!r} has no engines/ folder; pass the --out folder of `adm-export build` "
        f"(or of `adm-export engine`)"
    )


def _save_tokenizer(tok, folder: Path) -> dict:
    """Write ``folder/tokenizer.json``; check it tokenizes as transformers does."""
    from adm_export.runtime.text import TextTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer: converted as transformers converts it
        from transformers.convert_slow_tokenizer import convert_slow_tokenizer

        backend = convert_slow_tokenizer(tok)
    backend.save(str(folder / "tokenizer.json"))
    info = {"file": f"{folder.name}/tokenizer.json", "model_max_length": int(tok.model_max_length),
            "pad_id": int(tok.pad_token_id), "class": type(tok).__name__}
    ours = TextTokenizer(folder / "tokenizer.json", info["model_max_length"], info["pad_id"])
    for text in _TOKENIZER_PROBES:
        ref = tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
        got = ours(text, pad_to=tok.model_max_length)[0][0].tolist()
        if list(ref) != got:
            raise InvalidInputError(f"bundle: {type(tok).__name__} saved as tokenizer.json tokenizes {text[:30]!r} "
                                    f"differently from transformers; this tokenizer cannot be bundled")
    return info


def _text_config(adapter, folder: Path) -> dict:
    """Tokenizer files and the family's text settings (see ``runtime.layout``)."""
    pipe = adapter.pipeline
    text: dict = {"tokenizers": {"tokenizer": _save_tokenizer(pipe.tokenizer, folder / "tokenizer")}}
    if adapter.family == "audioldm":
        # The pipeline pads "" to prompt_embeds.shape[1], the CLAP projection width.
        text["uncond_max_length"] = int(pipe.text_encoder.config.projection_dim)
    elif adapter.family == "audioldm2":
        text["tokenizers"]["tokenizer_2"] = _save_tokenizer(pipe.tokenizer_2, folder / "tokenizer_2")
        text.update(text_len=adapter.text_len, generated_len=adapter.generated_len)
    elif adapter.family == "tango":
        text["text_len"] = int(pipe.text_len)
    elif adapter.family == "make_an_audio":
        from adm_export.models.make_an_audio import TEXT_LEN

        text["text_len"] = TEXT_LEN
    return text


def _audio_config(adapter, cfg: BundleConfig) -> dict:
    pipe = adapter.pipeline
    spec = adapter.denoiser_spec()
    sample = next(t for t in spec.inputs if t.name == "sample")
    if adapter.family == "make_an_audio":
        hop, mel_bins = int(pipe.config.hop_length), int(pipe.config.mel_bins)
    else:
        hop, mel_bins = int(adapter.vocoder_hop()), int(pipe.vocoder.config.model_in_dim)
    return {
        "sampling_rate": int(adapter.sampling_rate),
        "hop_length": hop,
        "mel_bins": mel_bins,
        "vae_scale_factor": int(pipe.vae_scale_factor),
        "vae_scaling_factor": float(pipe.vae.config.scaling_factor),
        "latent_shape": [None if d == "frames" else int(d) for d in sample.shape[1:]],
        "frames_axis": list(sample.shape).index("frames"),
        "latent_frames_per_second": float(spec.latent_frames_per_second),
        "frame_multiple": int(spec.frame_multiple),
        "max_seconds": float(cfg.max_seconds),
    }


def _scheduler_config(adapter, folder: Path) -> dict:
    from adm_export.runtime.scheduler import Scheduler

    scheduler = adapter.pipeline.scheduler
    name = type(scheduler).__name__
    Scheduler(name, dict(scheduler.config))  # refuses what the runtime cannot run, before anything is written
    (folder / "scheduler").mkdir()
    write_json(folder / layout.SCHEDULER_FILE, {"_class_name": name, **{k: v for k, v in scheduler.config.items()
                                                                          if not k.startswith("_")}})
    return {"class_name": name, "config": layout.SCHEDULER_FILE}


def bundle(cfg: BundleConfig, adapter=None) -> BundleResult:
    """Write a deployable bundle from a build's engines (see the module docstring).

    Args:
        cfg: What to bundle and where.
        adapter: The model, already loaded (else loaded from the engine's model id).

    Returns:
        The folder, manifest, file sizes and component parity.

    Raises:
        ArtifactNotFoundError: No engines folder, or it has no ONNX Runtime engine.
        ManifestMismatchError: A file of the engines folder changed, or another model was given.
        OutputExistsError: ``out`` is not empty and ``force`` is off.
        InvalidInputError: A component, tokenizer or scheduler the runtime cannot reproduce.
    """
    from adm_export.export.components import export_component, family_components
    from adm_export.models import load_model

    start = time.perf_counter()
    # 1. The engine: hashes checked, the same model loaded.
    engines = engines_folder(cfg.build_dir)
    engine_manifest = read_manifest(engines, ENGINE_STAGE, "BUILD_DIR", verify_hashes=True)
    ort_dir = engines / ORT_DIR
    if not (ort_dir / "unet.onnx").is_file():
        raise ArtifactNotFoundError(f"BUILD_DIR {str(cfg.build_dir)!r} has no ONNX Runtime engine "
                                    f"({ORT_DIR}/unet.onnx); rebuild it with --engine onnxruntime")
    model_id = cfg.model or engine_manifest["model"]["id"]
    adapter = adapter or load_model(model_id)
    check_same_model(engine_manifest, adapter.identity(), "BUILD_DIR")
    spec = adapter.denoiser_spec()
    built_for = engine_manifest.get("config", {}).get("device", "cpu")

    with atomic_dir(cfg.out, force=cfg.force) as tmp:
        # 2. The U-Net engine: every file (external data, layer report) as the engine stage wrote it.
        shutil.copytree(ort_dir, tmp / layout.UNET_DIR)
        scheduler = _scheduler_config(adapter, tmp)
        # 3. The other components, each checked against torch.
        parity, components = {}, {}
        for component in family_components(adapter):
            report = export_component(component, tmp, cfg.opset)
            components[component.spec.name] = report["file"]
            parity[component.spec.name] = report["parity"]
        # 4. Tokenizers, audio format, runtime config, manifest.
        config = {
            "format": layout.FORMAT,
            "family": adapter.family,
            "model_id": adapter.model_id,
            "audio": _audio_config(adapter, cfg),
            "scheduler": scheduler,
            "unet": {"file": layout.UNET_FILE, "inputs": {t.name: list(t.shape) for t in spec.inputs},
                     "built_for": built_for, "precision": engine_manifest.get("precision")},
            "components": components,
            "text": _text_config(adapter, tmp),
        }
        write_json(tmp / layout.CONFIG_FILE, config)
        manifest = write_manifest(
            tmp, layout.STAGE, adapter.identity(), to_dict(cfg),
            inputs={"engine": manifest_digest(engine_manifest)},
            extra={"engine": {"built_for": built_for, "precision": engine_manifest.get("precision"),
                              "source": str(engines)},
                   "parity": parity, "audio": config["audio"], "scheduler": scheduler["class_name"]},
        )
        files = {name: info["bytes"] for name, info in manifest["files"].items()}
    seconds = time.perf_counter() - start
    logger.info("bundle: %s (%s) -> %s: %d files, %.1f MB, %.1f s", adapter.model_id, adapter.family, cfg.out,
                len(files), sum(files.values()) / 1e6, seconds)
    return BundleResult(out=Path(cfg.out), seconds=seconds, manifest=manifest, files=files, parity=parity)

