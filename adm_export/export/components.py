"""ONNX export of everything but the denoiser: text encoders, VAE decoder, vocoder (per family).

One :class:`ComponentSpec` per exported graph (names, dynamic axes, parity tolerance) and the
torch module that computes it (:mod:`adm_export.export.component_modules`). Each family's list
says what its pipeline runs around the U-Net:

=============== ===========================================================================
audioldm        text_encoder (CLAP text model + projection + L2 norm), vae_decoder, vocoder
audioldm2       text_encoder (CLAP ``get_text_features``), text_encoder_2 (FLAN-T5 encoder),
                projection (``AudioLDM2ProjectionModel``), language_model (one GPT-2 step;
                the runtime runs the generation loop), vae_decoder, vocoder
tango           text_encoder (FLAN-T5 encoder), vae_decoder, vocoder
make_an_audio   text_encoder (BERT + CLAP projection, no mask), vae_decoder, vocoder
=============== ===========================================================================

Every graph is traced with the TorchScript exporter (as the denoiser) on inputs built from real
tokenized prompts, and checked against torch on those inputs and on a second batch of another
shape (so a dynamic axis that was traced as a constant fails the check).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

from adm_export.errors import InvalidInputError

logger = logging.getLogger(__name__)

# Prompts of different lengths: batch rows padded differently exercise the masks.
EXAMPLE_PROMPTS = ("a dog barks while rain falls on a tin roof", "a siren")
PARITY_REL_L2 = 1e-4


@dataclasses.dataclass(frozen=True)
class ComponentSpec:
    """One exported graph.

    Attributes:
        name: Component name; the file is ``{name}.onnx``.
        inputs: Input names in call order.
        outputs: Output names.
        dynamic_axes: ``torch.onnx.export``'s ``dynamic_axes`` (name -> {axis: dimension name}).
        parity_rel_l2: Tolerance of ONNX Runtime vs torch (relative L2, per output).
    """

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]
    parity_rel_l2: float = PARITY_REL_L2

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"


@dataclasses.dataclass
class Component:
    """A spec, the module that computes it, and the inputs it is traced and checked on."""

    spec: ComponentSpec
    module: Any
    examples: list[dict[str, Any]]


def _tokens(tokenizer, prompts, padding, max_length):
    batch = tokenizer(list(prompts), padding=padding, max_length=max_length, truncation=True, return_tensors="pt")
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}


def _text_axes(*names: str) -> dict[str, dict[int, str]]:
    return {n: {0: "batch", 1: "tokens"} for n in names}


def _vae_and_vocoder(adapter, time_last: bool, latent_shape, seed: int = 0) -> list[Component]:
    """VAE decoder and vocoder components, checked on random latents and on the decoded mels."""
    import torch

    from adm_export.export import component_modules as cm

    pipe = adapter.pipeline
    vae = cm.VaeDecoder(pipe.vae, time_last).eval()
    g = torch.Generator().manual_seed(seed)
    frames_axis = 3 if time_last else 2
    examples = []
    for batch, frames in ((2, latent_shape[frames_axis - 1]), (1, 2 * latent_shape[frames_axis - 1])):
        shape = list(latent_shape)
        shape[frames_axis - 1] = frames
        examples.append({"latents": torch.randn([batch, *shape], generator=g)})
    with torch.inference_mode():
        mels = [{"mel": vae(e["latents"])} for e in examples]
    vocoder = getattr(adapter, "vocoder", None) or pipe.vocoder
    return [
        Component(ComponentSpec("vae_decoder", ("latents",), ("mel",),
                                {"latents": {0: "batch", frames_axis: "frames"}, "mel": {0: "batch", 1: "mel_frames"}}),
                  vae, examples),
        Component(ComponentSpec("vocoder", ("mel",), ("waveform",),
                                {"mel": {0: "batch", 1: "mel_frames"}, "waveform": {0: "batch", 1: "samples"}}),
                  cm.Vocoder(vocoder).eval(), mels),
    ]


def family_components(adapter) -> list[Component]:
    """The components the family's pipeline runs around the denoiser, with example inputs.

    Raises:
        InvalidInputError: The family has no component export (a new adapter needs one here).
    """
    import torch

    from adm_export.export import component_modules as cm

    pipe = adapter.pipeline
    spec = adapter.denoiser_spec()
    sample = next(t for t in spec.inputs if t.name == "sample")
    frames = spec.frames_for_seconds(1.28)
    latent_shape = tuple(frames if d == "frames" else d for d in sample.shape[1:])
    time_last = sample.shape[-1] == "frames"
    family = adapter.family
    out: list[Component] = []
    prompts = EXAMPLE_PROMPTS
    if family == "audioldm":
        tok = pipe.tokenizer
        ex = [_tokens(tok, prompts, "max_length", tok.model_max_length), _tokens(tok, prompts[1:], "max_length", 40)]
        out.append(Component(ComponentSpec("text_encoder", ("input_ids", "attention_mask"), ("text_embeds",),
                                           {**_text_axes("input_ids", "attention_mask"), "text_embeds": {0: "batch"}}),
                             cm.ClapTextEmbeds(pipe.text_encoder).eval(), ex))
    elif family == "audioldm2":
        tok, tok2 = pipe.tokenizer, pipe.tokenizer_2
        ex1 = [_tokens(tok, prompts, "max_length", tok.model_max_length), _tokens(tok, prompts[1:], "max_length", 40)]
        ex2 = [_tokens(tok2, p, True, tok2.model_max_length) for p in (prompts, prompts[1:])]
        clap = cm.ClapTextFeatures(pipe.text_encoder).eval()
        t5 = cm.TextEncoderStates(pipe.text_encoder_2).eval()
        proj = cm.Projection(pipe.projection_model).eval()
        lm = cm.LanguageModelStep(pipe.language_model).eval()
        proj_ex, lm_ex = [], []
        with torch.inference_mode():
            for a, b in zip(ex1, ex2):
                clap_states = clap(**a)[:, None, :]
                e = {"hidden_states": clap_states, "hidden_states_1": t5(**b),
                     "attention_mask": torch.ones(clap_states.shape[:2], dtype=torch.int64),
                     "attention_mask_1": b["attention_mask"]}
                proj_ex.append(e)
                states, mask = proj(**e)
                lm_ex.append({"inputs_embeds": states, "attention_mask": mask})
        out += [
            Component(ComponentSpec("text_encoder", ("input_ids", "attention_mask"), ("text_embeds",),
                                    {**_text_axes("input_ids", "attention_mask"), "text_embeds": {0: "batch"}}),
                      clap, ex1),
            Component(ComponentSpec("text_encoder_2", ("input_ids", "attention_mask"), ("hidden_states",),
                                    _text_axes("input_ids", "attention_mask", "hidden_states")), t5, ex2),
            Component(ComponentSpec("projection", ("hidden_states", "hidden_states_1", "attention_mask",
                                                   "attention_mask_1"), ("projected", "projected_mask"),
                                    {"hidden_states": {0: "batch"}, "attention_mask": {0: "batch"},
                                     **_text_axes("hidden_states_1", "attention_mask_1", "projected",
                                                  "projected_mask")}), proj, proj_ex),
            Component(ComponentSpec("language_model", ("inputs_embeds", "attention_mask"), ("next_state",),
                                    {**_text_axes("inputs_embeds", "attention_mask"), "next_state": {0: "batch"}}),
                      lm, lm_ex),
        ]
    elif family == "tango":
        tok = pipe.tokenizer
        ex = [_tokens(tok, prompts, "max_length", pipe.text_len), _tokens(tok, prompts[1:], "max_length", 40)]
        out.append(Component(ComponentSpec("text_encoder", ("input_ids", "attention_mask"), ("hidden_states",),
                                           _text_axes("input_ids", "attention_mask", "hidden_states")),
                             cm.TextEncoderStates(pipe.text_encoder).eval(), ex))
    elif family == "make_an_audio":
        from adm_export.models.make_an_audio import TEXT_LEN

        tok = pipe.tokenizer
        ex = [{"input_ids": _tokens(tok, p, "max_length", TEXT_LEN)["input_ids"]} for p in (prompts, prompts[1:])]
        out.append(Component(ComponentSpec("text_encoder", ("input_ids",), ("hidden_states",),
                                           {"input_ids": {0: "batch"}, "hidden_states": {0: "batch"}}),
                             cm.TokenStates(pipe.text_encoder).eval(), ex))
    else:
        raise InvalidInputError(f"model family {family!r} has no component export for bundles yet")
    return out + _vae_and_vocoder(adapter, time_last, latent_shape)


def export_component(component: Component, folder: Path, opset: int = 17) -> dict:
    """Export one component to ``folder/{name}.onnx`` and check ONNX Runtime against torch.

    Returns:
        ``{"file", "bytes", "inputs", "outputs", "parity": {"rel_l2": [...], "max_abs": float,
        "tolerance": float, "passed": bool}}``.

    Raises:
        InvalidInputError: ONNX Runtime disagrees with torch beyond the spec's tolerance (the
            bundle would sample something else than the pipeline).
    """
    import numpy as np
    import onnx
    import torch

    from adm_export.export.onnx import onnx_file_bytes, parity_session, save_onnx

    spec = component.spec
    path = Path(folder) / spec.file
    first = component.examples[0]
    # Traced into a scratch folder: for a graph over 2 GB the exporter spills one file per tensor
    # beside it; save_onnx then writes the model (and one external-data file if needed) in place.
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        traced = Path(scratch) / spec.file
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            warnings.simplefilter("ignore")  # TracerWarnings from shape checks in transformers/diffusers
            torch.onnx.export(component.module, tuple(first[n] for n in spec.inputs), str(traced),
                              input_names=list(spec.inputs), output_names=list(spec.outputs),
                              dynamic_axes=spec.dynamic_axes, opset_version=opset, do_constant_folding=True,
                              dynamo=False)
        model = onnx.load(str(traced))
    model.producer_name = "adm-export"
    save_onnx(model, path)
    del model

    session = parity_session(path)
    errors, max_abs = [], 0.0
    for example in component.examples:
        with torch.inference_mode():
            ref = component.module(*(example[n] for n in spec.inputs))
        refs = ref if isinstance(ref, tuple) else (ref,)
        got = session.run(list(spec.outputs), {n: example[n].numpy() for n in spec.inputs})
        for r, g in zip(refs, got):
            r = r.detach().double().numpy()
            g = np.asarray(g, dtype=np.float64)
            if r.shape != g.shape:
                raise InvalidInputError(f"bundle: {spec.name} ONNX output shape {g.shape} != torch {r.shape}")
            errors.append(float(np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-30)))
            max_abs = max(max_abs, float(np.abs(g - r).max()) if r.size else 0.0)
    passed = max(errors) <= spec.parity_rel_l2
    if not passed:
        raise InvalidInputError(
            f"bundle: {spec.name} in ONNX Runtime differs from torch by {max(errors):.2e} (relative L2, "
            f"tolerance {spec.parity_rel_l2:.0e}); the export of this component is not faithful"
        )
    logger.info("bundle: %s exported (%.1f MB), parity %.1e", spec.name, onnx_file_bytes(path) / 1e6, max(errors))
    return {
        "file": spec.file, "bytes": onnx_file_bytes(path), "inputs": list(spec.inputs), "outputs": list(spec.outputs),
        "parity": {"rel_l2": errors, "max_abs": max_abs, "tolerance": spec.parity_rel_l2, "passed": passed},
    }
