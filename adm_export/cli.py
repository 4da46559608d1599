"""The ``adm-export`` command line: option groups that build configs and call the public API.

Each command's options are grouped by the config they fill (:class:`Group`: one option per config
field, its default read from the config class, so a default lives in one place); the command builds
its configs from them, calls one function of :mod:`adm_export.stages.api` and prints the result.
Everything else (checks, the output folder, ranks, signals) is the stage runner's. User errors
(:class:`~adm_export.errors.AdmExportError`) become one line on stderr and exit code 1, SIGINT /
SIGTERM exit 130 / 143, a failed quality gate exits 2. Heavy imports happen inside the commands,
so ``--help`` is fast and works without torch.

Over 500 lines on purpose: it is the one module that imports click (DESIGN §8), so every command's
options and help texts live here.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import click

from adm_export.config import (DEFAULT_MODEL, BundleConfig, CalibrationConfig, EngineBackend, EngineConfig,
                               EvalConfig, ExportConfig, FullPrecisionExportConfig, Placement, Precision,
                               QuantizeConfig, SelectMethod)
from adm_export.devices import DEVICES
from adm_export.errors import AdmExportError
from adm_export.formats.capabilities import Target
from adm_export.serving.config import ServeConfig  # the serving package's own config (see its module)
from adm_export.stages.generate import GenerateConfig  # the stage's own config (see its module)
from adm_export.version import __version__

logger = logging.getLogger("adm_export")

EXIT_GATE_FAILED = 2
_ARGV: list[str] = []  # the arguments of this invocation (AdmGroup.main), for --nproc's relaunch


class FiniteFloat(click.ParamType):
    """A float option that refuses NaN and infinity (click's FLOAT accepts both; NaN passes every
    range check after it)."""

    name = "float"

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


FINITE = FiniteFloat()


def _choices(values) -> click.Choice:
    """``click.Choice`` of an enum's values (or of a sequence): the choices have one home."""
    return click.Choice([m.value if isinstance(m, enum.Enum) else m for m in values])


# -- option groups -----------------------------------------------------------------------------------
_FROM_CONFIG = object()


class Opt:
    """One click option and the config field it sets.

    Args:
        field: The config field (``None``: the command reads the value itself).
        decls: click's declarations (``"--num-prompts"``, an explicit Python name, ...).
        default: The option's default; left out, the config field's default.
        attrs: Further ``click.option`` arguments.
    """

    def __init__(self, field: str | None, *decls: str, default: Any = _FROM_CONFIG, **attrs):
        self.field, self.decls, self.default, self.attrs = field, decls, default, attrs
        explicit = [d for d in decls if d.isidentifier()]
        long = next(d for d in decls if d.startswith("--")).split("/")[0]
        self.name = explicit[0] if explicit else long[2:].replace("-", "_")


class Group:
    """Options that together fill one config: ``@GROUP`` adds them to a command,
    ``GROUP.config(values, **fixed)`` builds the config from the command's values.

    Args:
        cls: The config class.
        opts: Its options.
    """

    def __init__(self, cls: type, *opts: Opt):
        self.cls, self.opts = cls, opts
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for o in opts:
            if o.default is _FROM_CONFIG:
                default = fields[o.field].default if o.field else None
                o.default = default.value if isinstance(default, enum.Enum) else default

    def __call__(self, f):
        for o in reversed(self.opts):
            f = click.option(*o.decls, default=o.default, **o.attrs)(f)
        return f

    def config(self, values: dict, **fixed):
        """The config from the parsed option values (``fixed`` fields win)."""
        given = {o.field: values[o.name] for o in self.opts if o.field and o.field not in fixed}
        return self.cls(**given, **fixed)


def options(*groups):
    """Add several groups' options to a command."""

    def decorate(f):
        for g in reversed(groups):
            f = g(f)
        return f

    return decorate


def model_option(default=DEFAULT_MODEL):
    return click.option("--model", "-m", default=default, show_default=bool(default),
                        help="Embedded name (reference-audioldm: trained here; tiny-audioldm, tiny-audioldm2, "
                             "tiny-tango, tiny-make-an-audio: random weights), local diffusers folder, TANGO or "
                             "Make-An-Audio folder in its published layout (README), or hub id.")


def device_option(help: str | None = None):
    return click.option("--device", type=_choices(DEVICES), default=DEVICES[0], show_default=True, help=help)


def out_options(required: bool = True, default: Path | None = None, help: str | None = None):
    """``--out`` and ``--force``."""

    def decorate(f):
        f = click.option("--force", is_flag=True, help="Overwrite a non-empty output folder.")(f)
        return click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), required=required,
                            default=default, show_default=default is not None, help=help or "Output folder.")(f)

    return decorate


def stage_input(flag: str, name: str, help: str, short: str | None = None, required: bool = True):
    """An option naming an earlier stage's folder."""
    decls = [flag, name] + ([short] if short else [])
    return click.option(*decls, type=click.Path(file_okay=False, path_type=Path), required=required,
                        default=None, help=help)


CALIBRATION = Group(
    CalibrationConfig,
    Opt("captions_file", "--captions", "captions", type=click.Path(dir_okay=False),
        help="Seed captions, one per line (default: the model's: reference-audioldm's in-domain captions, else "
             "built-in AudioCaps-style captions); build's eval prompts use them too."),
    Opt("num_prompts", "--num-prompts", type=int, show_default=True, help="Prompts the sampler runs on."),
    Opt("augment", "--augment/--no-augment", show_default=True,
        help="Coverage-driven prompt augmentation of the captions."),
    Opt("steps", "--steps", type=int, show_default=True, help="Sampler (DDIM) steps."),
    Opt("points", "--points", type=int, show_default=True, help="Calibration points kept (budget K)."),
    Opt("select", "--select", type=_choices(SelectMethod), show_default=True,
        help="How calibration points are chosen (activation: activation-aware, from per-layer activation "
             "statistics of every step and prompt)."),
    Opt("audio_seconds", "--seconds", type=FINITE, show_default=True, help="Audio length of calibration runs."),
    Opt("guidance_scale", "--guidance-scale", type=FINITE, show_default=True),
    Opt("seed", "--seed", type=int, show_default=True),
)

PRECISION = Group(
    QuantizeConfig,
    Opt("precision", "--precision", type=_choices(Precision),
        show_default=True),
    Opt("size_budget", "--size-budget", type=FINITE, help="For --precision mixed: fraction of the FP32 size."),
)

QUANTIZE = Group(
    QuantizeConfig,
    Opt("policy", "--policy", type=click.Path(dir_okay=False),
        help="Policy JSON (layer patterns -> formats, quant_cfg shape); replaces the preset's rules."),
    Opt("target", "--target", type=_choices(Target), default=None,
        help="Serving target the formats are checked against (default: from --engine/--device)."),
    Opt("allow_adjust", "--allow-adjust", is_flag=True,
        help="Change formats the target cannot run (reported) instead of refusing."),
    Opt("placement", "--placement", type=_choices(Placement),
        help="Q/DQ placement [default: the one --target needs: onnxruntime (integer CPU kernels: DQ -> Conv -> Q, "
             "UINT8 activations) for onnxruntime-cpu, tensorrt otherwise; formats/capabilities.py]."),
    Opt("sensitivity_points", "--sensitivity-points", type=int, show_default=True,
        help="For --precision mixed: calibration points the sensitivity is measured on."),
    Opt("sensitivity_granularity", "--sensitivity-granularity", type=click.Choice(["layer", "block"]),
        show_default=True, help="For --precision mixed: one format per layer, or per U-Net block (~6x fewer "
                                "trials, for full-size models on a CPU)."),
    Opt("trajectory_check", "--trajectory-check", type=int, show_default=True,
        help="For --precision mixed: most sensitive items per format re-measured on a short sampler run "
             "(final-latent error); 0: off."),
    Opt("sensitivity_frames", "--sensitivity-frames", type=int, show_default=True,
        help="For --precision mixed: latent frames the sensitivity trials run on; 0: full length."),
)

EVAL = Group(
    EvalConfig,
    Opt("num_clips", "--num-clips", type=int, show_default=True, help="Clips per run (baseline, engine)."),
    Opt("steps", "--eval-steps", type=int, show_default=True, help="Sampler steps per clip."),
    Opt("audio_seconds", "--eval-seconds", type=FINITE, show_default=True, help="Clip length."),
    Opt("max_fd_increase", "--max-fd-increase", type=FINITE, show_default=True,
        help="Quality gate: fail (exit 2) when the FD increase exceeds this percentage."),
    Opt("max_drift", "--max-drift", type=FINITE, show_default=True,
        help="Quality gate: fail (exit 2) when the paired drift (engine clip vs its own baseline clip, % of the "
             "set's spread) exceeds this percentage."),
    Opt("embedder", "--embedder",
        help="Embedding for FD: logmel (weight-free), reference-clap (trained with the reference model), "
             "panns-cnn14, vggish, clap [default: reference-clap for reference-audioldm, else logmel]."),
    Opt("embedder_checkpoint", "--embedder-checkpoint", type=click.Path(exists=True),
        help="Weights of the embedder (PANNs/VGGish state dict file, CLAP folder)."),
    Opt("reference_dir", "--reference", "reference", type=click.Path(file_okay=False),
        help="Folder of reference clips (default: a second baseline draw with other seeds)."),
    Opt("fd_inf", "--fd-inf/--no-fd-inf", show_default=True,
        help="Also extrapolate every FD to infinitely many clips (1/N fit, FD-inf)."),
    Opt("n_boot", "--bootstrap", "n_boot", type=int, show_default=True,
        help="Bootstrap replicates behind every interval."),
    Opt("clap_checkpoint", "--clap-checkpoint", type=click.Path(exists=True, file_okay=False),
        help="Local CLAP model folder (with tokenizer): adds the CLAP score."),
)

EXPORT = Group(
    ExportConfig,
    Opt("opset", "--opset", type=int, show_default=True),
    Opt("placement", "--placement", type=_choices(Placement),
        help="Q/DQ placement; fixed at quantize time [default: the quantized model's]."),
    Opt("parity_points", "--parity-points", type=int, show_default=True),
)

ENGINE = Group(
    EngineConfig,
    Opt("backend", "--backend", type=_choices(EngineBackend), show_default=True),
    Opt("threads", "--threads", type=int, help="ONNX Runtime threads (0: all cores)."),
    Opt("cuda_fusions", "--cuda-fusions/--no-cuda-fusions", show_default=True,
        help="--device cuda: fuse attention, GroupNorm and NHWC convolutions (ONNX Runtime's diffusion optimizer); "
             "--no-cuda-fusions serves the same FP16 graph unfused."),
    Opt("parity_tolerance", "--parity-tolerance", type=FINITE, show_default=True,
        help="--device cuda: largest relative L2 of the engine to its FP32 reference."),
)

BUNDLE = Group(
    BundleConfig,
    Opt("model", "--model", default=None, help="Model to load (default: the engine's; must be the same weights)."),
    Opt("max_seconds", "--max-seconds", type=FINITE, show_default=True,
        help="Longest clip the runtime accepts by default."),
)


GENERATE = Group(
    GenerateConfig,
    Opt("prompts", "--prompt", "-p", "prompts", multiple=True, default=(), help="Prompt (repeatable)."),
    Opt("prompts_file", "--prompts", "prompts_file", type=click.Path(dir_okay=False),
        help="File with one prompt per line."),
    Opt("audio_seconds", "--seconds", type=FINITE, show_default=True),
    Opt("steps", "--steps", type=int, show_default=True),
    Opt("guidance_scale", "--guidance-scale", type=FINITE, show_default=True),
    Opt("seed", "--seed", type=int, show_default=True),
    Opt("batch_size", "--batch-size", type=int, show_default=True, help="Prompts per pipeline call."),
    Opt("plot", "--plot", is_flag=True, help="Also write a spectrogram PNG per clip."),
    Opt("threads", "--threads", type=int, help="ONNX Runtime CPU threads (0: all cores)."),
    Opt("ort_provider", "--ort-provider", type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]),
        show_default=True, help="ONNX Runtime provider (auto: CUDA with --device cuda, else CPU)."),
    Opt("io_binding", "--io-binding/--no-io-binding",
        help="CUDA: bind GPU tensors to the engine, no host copies (default: on)."),
    Opt("cuda_graph", "--cuda-graph/--no-cuda-graph",
        help="CUDA: replay each step as a captured CUDA graph, one per input shape (default: on with a GPU "
             "provider and IO binding)."),
    Opt("prefer_nhwc", "--prefer-nhwc", is_flag=True, help="CUDA: let ONNX Runtime use NHWC convolution kernels."),
    Opt("cudnn_search", "--cudnn-search", type=click.Choice(["exhaustive", "heuristic", "default"]),
        show_default=True, help="CUDA: cuDNN convolution algorithm search (paid once per shape, at warm-up)."),
)


SERVE = Group(
    ServeConfig,
    Opt("host", "--host", show_default=True,
        help="Interface to listen on (0.0.0.0: every interface; put auth or a proxy in front)."),
    Opt("port", "--port", type=int, show_default=True, help="TCP port (0: any free port, printed)."),
    Opt("threads", "--threads", type=int, help="ONNX Runtime CPU threads (0: ONNX Runtime's default)."),
    Opt("cuda_graph", "--cuda-graph", is_flag=True, help="CUDA: replay each U-Net step as a captured CUDA graph."),
    Opt("prefer_nhwc", "--prefer-nhwc", is_flag=True, help="CUDA: let ONNX Runtime use NHWC convolution kernels."),
    Opt("max_batch", "--max-batch", type=int,
        help="Most requests of the same length sampled in one U-Net batch [default: the bundle's limit]."),
    Opt("max_wait_ms", "--max-wait-ms", type=FINITE, show_default=True,
        help="How long a batch that is not full waits for the next request of its length (each arrival restarts "
             "it; at most max-batch times this)."),
    Opt("max_queue", "--max-queue", type=int, show_default=True,
        help="Most requests waiting for a batch; beyond it: 503 with Retry-After."),
    Opt("timeout_s", "--timeout", "timeout_s", type=FINITE, show_default=True,
        help="Per-request limit in seconds (504 after it; the work is dropped)."),
    Opt("drain_timeout_s", "--drain-timeout", "drain_timeout_s", type=FINITE, show_default=True,
        help="On SIGTERM: seconds accepted requests may take to finish before the process exits."),
    Opt("api_key_file", "--api-key-file", type=click.Path(dir_okay=False),
        help="File holding a bearer token that /v1/generate then requires (read once, never logged)."),
)



# -- errors, logging, the group ------------------------------------------------------------------------
def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose > 1 else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("adm_export")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    # Libraries' own chatter (deprecations, untested-version warnings) is not for our users.
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*not tested with current version of modelopt.*")
    for name in ("diffusers", "transformers", "modelopt", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.ERROR)


def handle_errors(func):
    """Turn user errors and interruptions into one line and their exit code (bugs keep their traceback).

    The mapping is the stage runner's (:func:`adm_export.stages.runner.exit_code`): 1 for a user
    error, 130 / 143 for SIGINT / SIGTERM.
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from adm_export.stages.runner import Interrupted

        try:
            return func(*args, **kwargs)
        except (AdmExportError, Interrupted, KeyboardInterrupt) as exc:
            from adm_export.distributed import is_main
            from adm_export.stages.runner import error_line, exit_code

            if is_main():  # under torchrun every rank hits the same error: one line, not N
                click.echo(f"error: {error_line(exc)}", err=True)
            sys.exit(exit_code(exc))

    return wrapper


class AdmGroup(click.Group):
    """Click group whose usage errors (bad option values) exit with 1, not click's 2.

    Exit code 2 is reserved for a failed quality gate, so that CI can tell "the engine got worse"
    from "the command was called wrongly".
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        _ARGV[:] = list(args) if args is not None else sys.argv[1:]  # for --nproc's relaunch
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False,
                              **extra)
        except click.exceptions.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            click.echo(f"error: {exc.format_message()}{hint}", err=True)
            sys.exit(1)
        except click.exceptions.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)
        if isinstance(rv, int) and standalone_mode:
            sys.exit(rv)
        return rv


@click.group(cls=AdmGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="adm-export")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bars (default: on when stderr is a terminal; ADM_EXPORT_NO_PROGRESS=1 turns them off).")
def cli(verbose: int, quiet: bool, progress: bool | None) -> None:
    """Quantize text-to-audio diffusion models (PTQ4ADM) and build deployable engines.

    `adm-export build` runs every stage; each stage is also its own command and reads the
    previous stage's folder.
    """
    from adm_export.progress import set_progress

    _setup_logging(verbose, quiet)
    set_progress(progress)


def nproc_option(f):
    """``--nproc N``: rerun the command under torchrun with N processes (data-parallel loops).

    Under torchrun itself (``WORLD_SIZE`` set) the option is ignored and the process group is
    created instead (:func:`adm_export.distributed.init`).
    """

    @functools.wraps(f)
    def wrapper(*args, nproc=1, **kwargs):
        from adm_export import distributed

        if os.environ.get("WORLD_SIZE"):
            distributed.init()
            if not distributed.is_main():  # rank 0 prints the command's summary
                import contextlib
                import io

                with contextlib.redirect_stdout(io.StringIO()):
                    return f(*args, **kwargs)
        else:
            distributed.check_nproc(nproc, kwargs.get("device") or "cpu")
            if nproc > 1:
                sys.exit(distributed.launch(nproc, distributed.strip_nproc(_ARGV)))
        return f(*args, **kwargs)

    return click.option("--nproc", type=int, default=1, show_default=True,
                        help="Processes (one per GPU with --device cuda): calibration, sensitivity search and "
                             "eval run data-parallel under torchrun; rerunning resumes from finished shards.")(wrapper)


def _api():
    from adm_export.stages import api

    return api


# -- build ------------------------------------------------------------------------------------------
@cli.command()
@model_option()
@out_options(required=False, default=Path("build/adm-export"))
@options(PRECISION)
@click.option("--engine", "engine", type=_choices(EngineBackend), default=EngineBackend.ONNXRUNTIME.value,
              show_default=True, help="Engine to build (ONNX Runtime is always built unless 'none').")
@click.option("--eval/--no-eval", "run_eval", default=True, show_default=True, help="Evaluate against the baseline.")
@options(QUANTIZE, CALIBRATION)
@device_option()
@options(EVAL)
@handle_errors
@nproc_option
def build(model, out, force, engine, run_eval, device, **values):
    """Run every stage: calibrate, quantize, export, engine, eval; write report.json and report.md."""
    from adm_export.config import BuildConfig
    from adm_export.formats.capabilities import default_target

    cfg = BuildConfig(
        out=out, force=force,
        calibration=CALIBRATION.config(values, model=model, device=device),
        quantize=QUANTIZE.config(values, **_precision(values), device=device,
                                 target=values["target"] or default_target(engine, device)),
        export=ExportConfig(placement=values["placement"], device=device),
        engine=EngineConfig(backend=engine, device=device),
        eval=EVAL.config(values, device=device, captions_file=values["captions"]) if run_eval else None,
    )
    report = _api().build(cfg).report
    _summary(report)
    click.echo(f"report: {out / 'report.md'}")
    if report["eval"]["gate"]["passed"] is False:
        sys.exit(EXIT_GATE_FAILED)


def _precision(values: dict) -> dict:
    return {o.field: values[o.name] for o in PRECISION.opts}


def _summary(report: dict) -> None:
    size, parity, ev = report["size"], report["parity"], report["eval"]
    click.echo(f"model {report['model']['id']} · precision {report['precision']}")
    if size.get("unet_export_bytes"):
        click.echo(f"U-Net: {size['unet_export_bytes'] / 1e6:.2f} MB exported = {100 * size['reduction_vs_fp32']:.1f}% "
                   f"of FP32 ({size['unet_fp32_bytes'] / 1e6:.2f} MB)")
    if parity.get("onnx_vs_torch_rel_l2") is not None:
        click.echo(f"parity ONNX Runtime vs torch: {parity['onnx_vs_torch_mean_rel_l2']:.2e} mean "
                   f"(rounding floor {parity['rounding_floor_mean_rel_l2']:.2e}); quantization error "
                   f"{parity['quant_error_mean_rel_l2']:.2e}"
                   + (f"; stage by stage {parity['teacher_forced_rel_l2']:.2e}"
                      if parity.get("teacher_forced_rel_l2") is not None else ""))
    for name, stage in report["stages"].items():
        click.echo(f"  {name:<12} {stage['seconds']:7.1f} s")
    engine = report.get("engine") or {}
    if engine.get("speedup_vs_fp32") is not None:
        placement = ((report.get("quantization") or {}).get("placement") or {}).get("value")
        click.echo(f"CPU engine: {engine['speedup_vs_fp32']:.2f}x FP32 ({engine['latency_ms']:.1f} vs "
                   f"{engine['fp32_latency_ms']:.1f} ms per denoiser call, same CPU"
                   f"{f'; placement {placement}' if placement else ''})")
    gate = ev.get("gate") or {}
    if gate.get("passed") is None:
        click.echo("quality gate: not run")
    else:
        click.echo(f"quality gate: {'PASSED' if gate['passed'] else 'FAILED'}: {gate.get('message')}")


# -- one command per stage ------------------------------------------------------------------------
@cli.command()
@model_option()
@out_options()
@options(CALIBRATION)
@device_option()
@handle_errors
@nproc_option
def calibrate(model, out, force, device, **values):
    """Run the sampler on the prompt set and write the calibration cache."""
    result = _api().calibrate(CALIBRATION.config(values, model=model, device=device), out, force=force)
    click.echo(f"calibration cache: {result.points} points ({result.method}) from {result.prompts} prompts -> {out}")


@cli.command()
@model_option(default=None)
@stage_input("--calibration", "calibration", "Calibration cache folder (from `adm-export calibrate`).", "-c")
@out_options()
@options(PRECISION)
@device_option()
@options(QUANTIZE)
@handle_errors
@nproc_option
def quantize(model, calibration, out, force, device, **values):
    """Quantize the denoiser with ModelOpt, calibrated on the cache."""
    from adm_export.formats.capabilities import default_target

    cfg = QUANTIZE.config(values, **_precision(values), device=device,
                          target=values["target"] or default_target("onnxruntime", device))
    result = _api().quantize_model(cfg, calibration, out, force=force, model=model)
    click.echo(f"quantized ({cfg.precision.value}): {result.quantized_layers} layers; error vs full precision "
               f"mean {result.error_mean:.2e}, max {result.error_max:.2e} -> {out}")


@cli.command("export")
@stage_input("--quantized", "quantized", "Folder from `adm-export quantize`.", "-q")
@stage_input("--calibration", "calibration", "Calibration cache (parity inputs).", "-c")
@out_options()
@options(EXPORT)
@device_option(help="Where torch traces the quantized model and runs its side of the parity check.")
@handle_errors
def export_cmd(quantized, calibration, out, force, device, **values):
    """Export the quantized denoiser to ONNX (Q/DQ, INT8 weights) and check parity in ONNX Runtime."""
    result = _api().export_onnx(EXPORT.config(values, device=device), quantized, calibration, out, force=force)
    s, p = result.manifest["sizes"], result.manifest["parity"]
    click.echo(f"unet.onnx: {s['unet_export_bytes'] / 1e6:.2f} MB ({100 * s['reduction_vs_fp32']:.1f}% of FP32); "
               f"parity {p['onnx_vs_torch_mean']:.2e} (floor {p['rounding_floor_mean']:.2e}, quantization error "
               f"{p['quant_error_mean']:.2e}"
               + (f"; stage by stage {p['teacher_forced']['forced_max']:.2e}" if p.get("teacher_forced") else "")
               + f") {'ok' if p['passed'] else 'FAILED'} -> {out}")


@cli.command("export-baseline")
@model_option()
@out_options()
@click.option("--dtype", type=click.Choice(["fp16", "fp32"]), default="fp16", show_default=True,
              help="Precision of the unquantized export (fp16: the GPU baseline).")
@click.option("--opset", type=int, default=FullPrecisionExportConfig.opset, show_default=True)
@device_option(help="Where torch traces and the parity check runs.")
@handle_errors
def export_baseline(model, out, force, dtype, opset, device):
    """Export the unquantized denoiser (FP16 or FP32) to ONNX: the baseline engine to serve and race."""
    cfg = FullPrecisionExportConfig(model=model, fp16=dtype == "fp16", opset=opset, device=device)
    result = _api().export_baseline(cfg, out, force=force)
    p = result.manifest["parity"]
    click.echo(f"unet.onnx ({dtype}): {result.export_bytes / 1e6:.2f} MB; parity "
               f"{p['onnx_vs_torch_max']:.2e} (tolerance {p['tolerance']:.2e}) {'ok' if p['passed'] else 'FAILED'} "
               f"-> {out}")


@cli.command()
@stage_input("--onnx", "onnx_dir", "Folder from `adm-export export`.")
@out_options()
@device_option(help="cpu: serve the export as it is; cuda: build the fused FP16 CUDA engine (checked on the GPU).")
@options(ENGINE)
@handle_errors
def engine(onnx_dir, out, force, device, **values):
    """Build engines: ONNX Runtime always, TensorRT / TensorRT-RTX when asked or installed."""
    result = _api().build_engines(ENGINE.config(values, device=device), onnx_dir, out, force=force)
    for name, e in result.engines.items():
        if not e.get("built", True):
            click.echo(f"{name}: not built ({e.get('reason')})")
        elif e.get("summary"):
            parity = e.get("parity") or {}
            what = "served graph" if parity.get("served_graph_checked") else "CPU-runnable fusions only: no GPU here"
            click.echo(f"{name} ({e.get('graph')}): {e['summary']}; parity {parity.get('max', float('nan')):.2e} "
                       f"on {parity.get('device')} ({what})")
        else:
            click.echo(f"{name}: layer precisions {json.dumps(e.get('layer_precisions'))}")
        vs = e.get("vs_fp32")
        if vs:
            click.echo(f"{name}: {vs['speedup_vs_fp32']:.2f}x FP32 on this CPU ({vs['engine']['median_ms']:.1f} vs "
                       f"{vs['fp32_reference']['median_ms']:.1f} ms per denoiser call)")
    click.echo(f"engines -> {out}")


@cli.command("eval")
@model_option(default=None)
@stage_input("--engine", "engine_dir", "Folder from `adm-export engine`.")
@out_options(required=False, help="Folder for report.json, report.md, figures/, eval.json and the clips.")
@device_option()
@click.option("--seed", type=int, default=EvalConfig.seed, show_default=True)
@click.option("--captions", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Captions the eval prompts cycle through (default: the model's, else the built-in ones).")
@options(EVAL)
@handle_errors
@nproc_option
def eval_cmd(model, engine_dir, out, force, device, seed, captions, **values):
    """Same prompts and seeds through the full-precision pipeline and the engine; FD and the quality gate."""
    cfg = EVAL.config(values, device=device, seed=seed, captions_file=captions)
    result = _api().evaluate(cfg, engine_dir, out, force=force, model=model)
    if result.fd_quantized_vs_baseline is not None:
        click.echo(f"FD(engine, baseline) {result.fd_quantized_vs_baseline:.4g}; FD increase "
                   f"{result.fd_increase_pct:.1f}% vs {result.result['reference']['kind']}")
    click.echo(f"quality gate: {'PASSED' if result.gate_passed else 'FAILED'}: {result.gate_message}")
    if out is not None:
        click.echo(f"report: {out / 'report.md'}")
    if not result.gate_passed:
        sys.exit(EXIT_GATE_FAILED)


@cli.command()
@model_option(default=None)
@stage_input("--engine", "engine_dir", "Engines folder; without it the full-precision pipeline generates.",
             required=False)
@out_options()
@device_option()
@options(GENERATE)
@handle_errors
def generate(model, engine_dir, out, force, device, **values):
    """Generate WAV files with the pipeline, its denoiser served by the engine."""
    cfg = GENERATE.config(values, model=model, engine_dir=str(engine_dir) if engine_dir else None, device=device,
                          prompts=tuple(values["prompts"]))
    files = _api().generate(cfg, out, force=force).files
    click.echo(f"{len(files)} clip(s){' and spectrograms' if cfg.plot else ''} -> {out}")


@cli.command("serve")
@click.argument("bundle", type=click.Path(file_okay=False, path_type=Path))
@device_option()
@options(SERVE)
@click.option("--ray", "use_ray", is_flag=True, help="Run under Ray Serve (pip install 'adm-export[ray]'), "
              "one runtime per replica.")
@click.option("--replicas", type=int, default=1, show_default=True, help="With --ray: fixed replica count.")
@click.option("--min-replicas", type=int, default=None, help="With --ray: autoscaling lower bound.")
@click.option("--max-replicas", type=int, default=None, help="With --ray: autoscaling upper bound (turns it on).")
@click.option("--ray-address", default=None, help="With --ray: a running cluster (default: a local Ray instance).")
@handle_errors
def serve_cmd(bundle, device, use_ray, replicas, min_replicas, max_replicas, ray_address, **values):
    """Serve a bundle over HTTP: POST /v1/generate -> WAV, GET /health, GET /metrics (SIGTERM drains)."""
    from adm_export.serving.config import RayServeConfig

    level = logging.getLevelName(logging.getLogger("adm_export").level).lower()
    # An absolute path: Ray's replicas do not share this process's working directory.
    cfg = SERVE.config(values, bundle=str(bundle.resolve()), device=device,
                       log_level=level if level in ("debug", "info", "warning") else "info")
    if use_ray:
        cfg = RayServeConfig(serve=cfg, num_replicas=replicas, min_replicas=min_replicas if min_replicas is not None
                             else 1, max_replicas=max_replicas)
    _api().serve(cfg, ray_address=ray_address)


@cli.command("bundle")
@click.argument("build_dir", type=click.Path(file_okay=False, path_type=Path))
@out_options(help="Bundle folder to write.")
@options(BUNDLE)
@handle_errors
def bundle_cmd(build_dir, out, force, **values):
    """Bundle a build for the torch-free runtime: engine, text encoder(s), VAE decoder, vocoder as ONNX."""
    result = _api().bundle(BUNDLE.config(values, build_dir=str(build_dir), out=str(out), force=force))
    worst = max(max(p["rel_l2"]) for p in result.parity.values())
    click.echo(f"{len(result.files)} files, {sum(result.files.values()) / 1e6:.1f} MB; components vs torch: "
               f"max rel. L2 {worst:.1e} ({', '.join(result.parity)}) -> {out}")


@cli.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@handle_errors
def inspect(folder):
    """Show what an artifact folder (or a build's report) holds."""
    from adm_export.inspect import describe

    click.echo(describe(folder))


@cli.command()
@click.argument("build_dir", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--baseline", "-b", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Committed baseline report (from --write-baseline or ci-gate.sh --update-baseline).")
@click.option("--fd-tolerance", type=FINITE, default=10.0, show_default=True,
              help="Allowed rise of the FD increase over the baseline's, in percentage points.")
@click.option("--size-tolerance", type=FINITE, default=1.0, show_default=True,
              help="Allowed growth of the exported U-Net, in percent.")
@click.option("--layer-tolerance", type=FINITE, default=5.0, show_default=True,
              help="Allowed drop of quantized compute layers, in percent.")
@click.option("--drift-tolerance", type=FINITE, default=5.0, show_default=True,
              help="Allowed rise of the paired drift over the baseline's, in percentage points.")
@click.option("--summary", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the diff table as Markdown to this file.")
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the comparison as JSON to this file.")
@click.option("--write-baseline", is_flag=True, help="Write BUILD_DIR's report to --baseline instead of comparing.")
@click.option("--build-arg", "build_args", multiple=True,
              help="With --write-baseline: a build argument to record (repeat; e.g. --build-arg=--num-clips).")
@click.option("--show-build-args", is_flag=True, help="Print the baseline's recorded build arguments, one per line.")
@handle_errors
def compare(build_dir, baseline, fd_tolerance, size_tolerance, layer_tolerance, drift_tolerance, summary, json_out,
            write_baseline, build_args, show_build_args):
    """CI quality gate: compare a build folder with a baseline report (exit 0 ok, 2 regression, 1 error)."""
    from adm_export import ci_gate
    from adm_export.errors import InvalidInputError

    if show_build_args:
        click.echo("\n".join(ci_gate.baseline_build_args(baseline)))
        return
    if build_dir is None:
        raise InvalidInputError("missing BUILD_DIR: give the output folder of adm-export build")
    if write_baseline:
        ci_gate.write_baseline(build_dir, baseline, build_args)
        click.echo(f"baseline written: {baseline}")
        return
    tol = ci_gate.GateTolerances(fd_increase_pp=fd_tolerance, size_pct=size_tolerance,
                                 quantized_layers_pct=layer_tolerance, drift_pp=drift_tolerance)
    result = ci_gate.run_gate(build_dir, baseline, tol, summary=summary, json_out=json_out)
    click.echo(ci_gate.format_table(result))
    if not result.passed:
        sys.exit(EXIT_GATE_FAILED)


def main() -> None:
    """Console-script entry point."""
    from adm_export import distributed

    try:
        cli(prog_name="adm-export")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if os.environ.get(distributed.ENV_EXIT_FILE) and code in (1, EXIT_GATE_FAILED):
            # A worker of `--nproc`: rank 0 hands its code to the launcher; exiting 0 spares the
            # user torchrun's failure dump for an expected outcome (user error, failed gate).
            distributed.record_exit(code)
            sys.exit(0)
        distributed.record_exit(code)
        raise


if __name__ == "__main__":
    main()
