"""The ``adm-export`` command line: a thin click layer over the library.

Each command parses its options, builds a frozen config and calls one library function. User
errors (:class:`~adm_export.errors.AdmExportError`) become one line on stderr and exit code 1; a
failed quality gate exits with 2. Heavy imports happen inside the commands, so ``--help`` is fast
and works without torch.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
from pathlib import Path

import click

from adm_export.version import __version__
from adm_export.config import DEFAULT_AUDIO_SECONDS, DEFAULT_MODEL, EngineBackend, Placement, Precision, SelectMethod
from adm_export.errors import AdmExportError

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


def _choices(enum_cls) -> click.Choice:
    return click.Choice([m.value for m in enum_cls])


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


# -- shared options --------------------------------------------------------------------------------
def model_option(default=DEFAULT_MODEL):
    return click.option("--model", "-m", default=default, show_default=bool(default),
                        help="Embedded name (reference-audioldm: trained here; tiny-audioldm, tiny-audioldm2, "
                             "tiny-tango, tiny-make-an-audio: random weights), local diffusers folder, TANGO or "
                             "Make-An-Audio folder in its published layout (README), or hub id.")


def calibration_options(f):
    opts = [
        click.option("--captions", type=click.Path(dir_okay=False), default=None,
                     help="Seed captions, one per line (default: the model's: reference-audioldm's in-domain "
                          "captions, else built-in AudioCaps-style captions); build's eval prompts use them too."),
        click.option("--num-prompts", type=int, default=8, show_default=True, help="Prompts the sampler runs on."),
        click.option("--augment/--no-augment", default=True, show_default=True,
                     help="Coverage-driven prompt augmentation of the captions."),
        click.option("--steps", type=int, default=10, show_default=True, help="Sampler (DDIM) steps."),
        click.option("--points", type=int, default=16, show_default=True, help="Calibration points kept (budget K)."),
        click.option("--select", type=_choices(SelectMethod), default=SelectMethod.ACTIVATION.value, show_default=True,
                     help="How calibration points are chosen (activation: activation-aware, from per-layer "
                          "activation statistics of every step and prompt)."),
        click.option("--seconds", type=FINITE, default=DEFAULT_AUDIO_SECONDS, show_default=True, help="Audio length of calibration runs."),
        click.option("--guidance-scale", type=FINITE, default=2.5, show_default=True),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def quant_options(f):
    """Policy, target and placement options shared by build and quantize."""
    opts = [
        click.option("--policy", type=click.Path(dir_okay=False), default=None,
                     help="Policy JSON (layer patterns -> formats, quant_cfg shape); replaces the preset's rules."),
        click.option("--target", type=click.Choice(["onnxruntime-cpu", "onnxruntime-cuda", "tensorrt",
                                                     "tensorrt-rtx"]), default=None,
                     help="Serving target the formats are checked against (default: from --engine/--device)."),
        click.option("--allow-adjust", is_flag=True,
                     help="Change formats the target cannot run (reported) instead of refusing."),
        click.option("--placement", type=_choices(Placement), default=Placement.TENSORRT.value, show_default=True,
                     help="Q/DQ placement: tensorrt, or onnxruntime (DQ -> Conv -> Q for integer kernels)."),
        click.option("--sensitivity-points", type=int, default=4, show_default=True,
                     help="For --precision mixed: calibration points the sensitivity is measured on."),
        click.option("--sensitivity-granularity", type=click.Choice(["layer", "block"]), default="layer",
                     show_default=True, help="For --precision mixed: one format per layer, or per U-Net block "
                     "(~6x fewer trials, for full-size models on a CPU)."),
        click.option("--trajectory-check", type=int, default=2, show_default=True,
                     help="For --precision mixed: most sensitive items per format re-measured on a short "
                     "sampler run (final-latent error); 0: off."),
        click.option("--sensitivity-frames", type=int, default=64, show_default=True,
                     help="For --precision mixed: latent frames the sensitivity trials run on; 0: full length."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _target(target, engine="onnxruntime", device="cpu") -> str:
    if target:
        return target
    if engine in ("tensorrt", "tensorrt-rtx"):
        return engine
    return f"onnxruntime-{device}"


def eval_options(f):
    opts = [
        click.option("--num-clips", type=int, default=8, show_default=True, help="Clips per run (baseline, engine)."),
        click.option("--eval-steps", type=int, default=10, show_default=True, help="Sampler steps per clip."),
        click.option("--eval-seconds", type=FINITE, default=DEFAULT_AUDIO_SECONDS, show_default=True, help="Clip length."),
        click.option("--max-fd-increase", type=FINITE, default=50.0, show_default=True,
                     help="Quality gate: fail (exit 2) when the FD increase exceeds this percentage."),
        click.option("--max-drift", type=FINITE, default=25.0, show_default=True,
                     help="Quality gate: fail (exit 2) when the paired drift (engine clip vs its own baseline "
                          "clip, % of the set's spread) exceeds this percentage."),
        click.option("--embedder", default=None,
                     help="Embedding for FD: logmel (weight-free), reference-clap (trained with the reference "
                          "model), panns-cnn14, vggish, clap [default: reference-clap for reference-audioldm, "
                          "else logmel]."),
        click.option("--embedder-checkpoint", type=click.Path(exists=True), default=None,
                     help="Weights of the embedder (PANNs/VGGish state dict file, CLAP folder)."),
        click.option("--reference", type=click.Path(file_okay=False), default=None,
                     help="Folder of reference clips (default: a second baseline draw with other seeds)."),
        click.option("--fd-inf/--no-fd-inf", default=False, show_default=True,
                     help="Also extrapolate every FD to infinitely many clips (1/N fit, FD-inf)."),
        click.option("--bootstrap", "n_boot", type=int, default=200, show_default=True,
                     help="Bootstrap replicates behind every interval."),
        click.option("--clap-checkpoint", type=click.Path(exists=True, file_okay=False), default=None,
                     help="Local CLAP model folder (with tokenizer): adds the CLAP score."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _calibration_config(model, captions, num_prompts, augment, steps, points, select, seconds, guidance_scale,
                        seed, device):
    from adm_export.config import CalibrationConfig

    return CalibrationConfig(model=model, captions_file=captions, num_prompts=num_prompts, steps=steps,
                             points=points, select=select, audio_seconds=seconds, guidance_scale=guidance_scale,
                             seed=seed, device=device, augment=augment)


def _eval_config(num_clips, eval_steps, eval_seconds, max_fd_increase, embedder, embedder_checkpoint, reference,
                 device, seed=1234, guidance_scale=2.5, fd_inf=False, n_boot=200, clap_checkpoint=None,
                 max_drift=25.0, captions=None):
    from adm_export.config import EvalConfig

    return EvalConfig(num_clips=num_clips, steps=eval_steps, audio_seconds=eval_seconds,
                      max_fd_increase=max_fd_increase, embedder=embedder, embedder_checkpoint=embedder_checkpoint,
                      reference_dir=reference, device=device, seed=seed, guidance_scale=guidance_scale,
                      fd_inf=fd_inf, n_boot=n_boot, clap_checkpoint=clap_checkpoint, max_drift=max_drift,
                      captions_file=captions)


def _summary(report: dict) -> None:
    size, parity, ev = report["size"], report["parity"], report["eval"]
    click.echo(f"model {report['model']['id']} · precision {report['precision']}")
    if size.get("unet_export_bytes"):
        click.echo(f"U-Net: {size['unet_export_bytes'] / 1e6:.2f} MB exported = {100 * size['reduction_vs_fp32']:.1f}% "
                   f"of FP32 ({size['unet_fp32_bytes'] / 1e6:.2f} MB)")
    if parity.get("onnx_vs_torch_rel_l2") is not None:
        click.echo(f"parity ONNX Runtime vs torch: {parity['onnx_vs_torch_mean_rel_l2']:.2e} mean "
                   f"(rounding floor {parity['rounding_floor_mean_rel_l2']:.2e}); quantization error "
                   f"{parity['quant_error_mean_rel_l2']:.2e}")
    for name, stage in report["stages"].items():
        click.echo(f"  {name:<12} {stage['seconds']:7.1f} s")
    gate = ev.get("gate") or {}
    if gate.get("passed") is None:
        click.echo("quality gate: not run")
    else:
        click.echo(f"quality gate: {'PASSED' if gate['passed'] else 'FAILED'}: {gate.get('message')}")


# -- build ------------------------------------------------------------------------------------------
@cli.command()
@model_option()
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), default=Path("build/adm-export"),
              show_default=True, help="Output folder.")
@click.option("--force", is_flag=True, help="Overwrite a non-empty output folder.")
@click.option("--precision", type=_choices(Precision), default=Precision.INT8.value, show_default=True)
@click.option("--size-budget", type=FINITE, default=None, help="For --precision mixed: fraction of the FP32 size.")
@click.option("--engine", "engine", type=_choices(EngineBackend), default=EngineBackend.ONNXRUNTIME.value,
              show_default=True, help="Engine to build (ONNX Runtime is always built unless 'none').")
@click.option("--eval/--no-eval", "run_eval", default=True, show_default=True, help="Evaluate against the baseline.")
@quant_options
@calibration_options
@eval_options
@handle_errors
@nproc_option
def build(model, out, force, precision, size_budget, engine, run_eval, policy, target, allow_adjust, placement,
          sensitivity_points, sensitivity_granularity, trajectory_check, sensitivity_frames, captions, num_prompts, augment, steps, points,
          select, seconds, guidance_scale, seed, device, num_clips, eval_steps, eval_seconds, max_fd_increase, max_drift,
          embedder, embedder_checkpoint, reference, fd_inf, n_boot, clap_checkpoint):
    """Run every stage: calibrate, quantize, export, engine, eval; write report.json and report.md."""
    from adm_export.config import BuildConfig, EngineConfig, ExportConfig, QuantizeConfig
    from adm_export.stages import api

    cfg = BuildConfig(
        out=out,
        calibration=_calibration_config(model, captions, num_prompts, augment, steps, points, select, seconds,
                                        guidance_scale, seed, device),
        quantize=QuantizeConfig(precision=precision, size_budget=size_budget, device=device, policy=policy,
                                target=_target(target, engine, device), allow_adjust=allow_adjust,
                                placement=placement, sensitivity_points=sensitivity_points,
                                sensitivity_granularity=sensitivity_granularity, trajectory_check=trajectory_check,
                                sensitivity_frames=sensitivity_frames),
        export=ExportConfig(placement=placement),
        engine=EngineConfig(backend=engine, device=device),
        eval=_eval_config(num_clips, eval_steps, eval_seconds, max_fd_increase, embedder, embedder_checkpoint,
                          reference, device, fd_inf=fd_inf, n_boot=n_boot, clap_checkpoint=clap_checkpoint,
                          max_drift=max_drift, captions=captions)
        if run_eval else None,
        force=force,
    )
    # Refuse a bad output folder and validate every config before any stage starts.
    report = api.build(cfg).report
    _summary(report)
    click.echo(f"report: {out / 'report.md'}")
    if report["eval"]["gate"]["passed"] is False:
        sys.exit(EXIT_GATE_FAILED)


# -- one command per stage ------------------------------------------------------------------------
@cli.command()
@model_option()
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--force", is_flag=True, help="Overwrite a non-empty output folder.")
@calibration_options
@handle_errors
@nproc_option
def calibrate(model, out, force, captions, num_prompts, augment, steps, points, select, seconds, guidance_scale, seed,
              device):
    """Run the sampler on the prompt set and write the calibration cache."""
    from adm_export.stages import api

    cfg = _calibration_config(model, captions, num_prompts, augment, steps, points, select, seconds, guidance_scale,
                              seed, device)
    result = api.calibrate(cfg, out, force=force)
    click.echo(f"calibration cache: {result.points} points ({result.method}) from {result.prompts} prompts -> {out}")


@cli.command()
@model_option(default=None)
@click.option("--calibration", "-c", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Calibration cache folder (from `adm-export calibrate`).")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--force", is_flag=True)
@click.option("--precision", type=_choices(Precision), default=Precision.INT8.value, show_default=True)
@click.option("--size-budget", type=FINITE, default=None)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@quant_options
@handle_errors
@nproc_option
def quantize(model, calibration, out, force, precision, size_budget, device, policy, target, allow_adjust, placement,
             sensitivity_points, sensitivity_granularity, trajectory_check, sensitivity_frames):
    """Quantize the denoiser with ModelOpt, calibrated on the cache."""
    from adm_export.config import QuantizeConfig
    from adm_export.stages import api

    cfg = QuantizeConfig(precision=precision, size_budget=size_budget, device=device, policy=policy,
                         target=_target(target, device=device), allow_adjust=allow_adjust, placement=placement,
                         sensitivity_points=sensitivity_points, sensitivity_granularity=sensitivity_granularity,
                         trajectory_check=trajectory_check, sensitivity_frames=sensitivity_frames)
    result = api.quantize_model(cfg, calibration, out, force=force, model=model)
    click.echo(f"quantized ({precision}): {result.quantized_layers} layers; error vs full precision "
               f"mean {result.error_mean:.2e}, max {result.error_max:.2e} -> {out}")


@cli.command("export")
@click.option("--quantized", "-q", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder from `adm-export quantize`.")
@click.option("--calibration", "-c", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Calibration cache (parity inputs).")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--force", is_flag=True)
@click.option("--opset", type=int, default=17, show_default=True)
@click.option("--placement", type=_choices(Placement), default=Placement.TENSORRT.value, show_default=True)
@click.option("--parity-points", type=int, default=4, show_default=True)
@handle_errors
def export_cmd(quantized, calibration, out, force, opset, placement, parity_points):
    """Export the quantized denoiser to ONNX (Q/DQ, INT8 weights) and check parity in ONNX Runtime."""
    from adm_export.config import ExportConfig
    from adm_export.stages import api

    result = api.export_onnx(ExportConfig(opset=opset, placement=placement, parity_points=parity_points), quantized,
                             calibration, out, force=force)
    s, p = result.manifest["sizes"], result.manifest["parity"]
    click.echo(f"unet.onnx: {s['unet_export_bytes'] / 1e6:.2f} MB ({100 * s['reduction_vs_fp32']:.1f}% of FP32); "
               f"parity {p['onnx_vs_torch_mean']:.2e} (floor {p['rounding_floor_mean']:.2e}, quantization error "
               f"{p['quant_error_mean']:.2e}) {'ok' if p['passed'] else 'FAILED'} -> {out}")


@cli.command("export-baseline")
@model_option()
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--force", is_flag=True)
@click.option("--dtype", type=click.Choice(["fp16", "fp32"]), default="fp16", show_default=True,
              help="Precision of the unquantized export (fp16: the GPU baseline).")
@click.option("--opset", type=int, default=17, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where torch traces and the parity check runs.")
@handle_errors
def export_baseline(model, out, force, dtype, opset, device):
    """Export the unquantized denoiser (FP16 or FP32) to ONNX: the baseline engine to serve and race."""
    from adm_export.config import FullPrecisionExportConfig
    from adm_export.stages import api

    cfg = FullPrecisionExportConfig(model=model, fp16=dtype == "fp16", opset=opset, device=device)
    result = api.export_baseline(cfg, out, force=force)
    p = result.manifest["parity"]
    click.echo(f"unet.onnx ({dtype}): {result.export_bytes / 1e6:.2f} MB; parity "
               f"{p['onnx_vs_torch_max']:.2e} (tolerance {p['tolerance']:.2e}) {'ok' if p['passed'] else 'FAILED'} "
               f"-> {out}")


@cli.command()
@click.option("--onnx", "onnx_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder from `adm-export export`.")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--force", is_flag=True)
@click.option("--backend", type=_choices(EngineBackend), default=EngineBackend.ONNXRUNTIME.value, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="cpu: serve the export as it is; cuda: build the fused FP16 CUDA engine (checked on the GPU).")
@click.option("--threads", type=int, default=0, help="ONNX Runtime threads (0: all cores).")
@click.option("--cuda-fusions/--no-cuda-fusions", default=True, show_default=True,
              help="--device cuda: fuse attention, GroupNorm and NHWC convolutions (ONNX Runtime's diffusion "
                   "optimizer); --no-cuda-fusions serves the same FP16 graph unfused.")
@click.option("--parity-tolerance", type=FINITE, default=1e-2, show_default=True,
              help="--device cuda: largest relative L2 of the engine to its FP32 reference.")
@handle_errors
def engine(onnx_dir, out, force, backend, device, threads, cuda_fusions, parity_tolerance):
    """Build engines: ONNX Runtime always, TensorRT / TensorRT-RTX when asked or installed."""
    from adm_export.config import EngineConfig
    from adm_export.stages import api

    cfg = EngineConfig(backend=backend, device=device, threads=threads, cuda_fusions=cuda_fusions,
                       parity_tolerance=parity_tolerance)
    result = api.build_engines(cfg, onnx_dir, out, force=force)
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
    click.echo(f"engines -> {out}")


@cli.command("eval")
@model_option(default=None)
@click.option("--engine", "engine_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder from `adm-export engine`.")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for report.json, report.md, figures/, eval.json and the clips.")
@click.option("--force", is_flag=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--seed", type=int, default=1234, show_default=True)
@click.option("--captions", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Captions the eval prompts cycle through (default: the model's, else the built-in ones).")
@eval_options
@handle_errors
@nproc_option
def eval_cmd(model, engine_dir, out, force, device, seed, captions, num_clips, eval_steps, eval_seconds,
             max_fd_increase, max_drift, embedder, embedder_checkpoint, reference, fd_inf, n_boot, clap_checkpoint):
    """Same prompts and seeds through the full-precision pipeline and the engine; FD and the quality gate."""
    from adm_export.stages import api

    cfg = _eval_config(num_clips, eval_steps, eval_seconds, max_fd_increase, embedder, embedder_checkpoint, reference,
                       device, seed, fd_inf=fd_inf, n_boot=n_boot, clap_checkpoint=clap_checkpoint,
                       max_drift=max_drift, captions=captions)
    result = api.evaluate(cfg, engine_dir, out, force=force, model=model).result
    gate = result["gate"]
    if result["fd_quantized_vs_baseline"] is not None:
        click.echo(f"FD(engine, baseline) {result['fd_quantized_vs_baseline']:.4g}; FD increase "
                   f"{result['fd_increase_pct']:.1f}% vs {result['reference']['kind']}")
    click.echo(f"quality gate: {'PASSED' if gate['passed'] else 'FAILED'}: {gate['message']}")
    if out is not None:
        click.echo(f"report: {out / 'report.md'}")
    if not gate["passed"]:
        sys.exit(EXIT_GATE_FAILED)


@cli.command()
@model_option(default=None)
@click.option("--engine", "engine_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Engines folder; without it the full-precision pipeline generates.")
@click.option("--prompt", "-p", "prompts", multiple=True, help="Prompt (repeatable).")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False), default=None,
              help="File with one prompt per line.")
@click.option("--seconds", type=FINITE, default=DEFAULT_AUDIO_SECONDS, show_default=True)
@click.option("--steps", type=int, default=10, show_default=True)
@click.option("--guidance-scale", type=FINITE, default=2.5, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--force", is_flag=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--batch-size", type=int, default=4, show_default=True, help="Prompts per pipeline call.")
@click.option("--plot", is_flag=True, help="Also write a spectrogram PNG per clip.")
@click.option("--threads", type=int, default=0, help="ONNX Runtime CPU threads (0: all cores).")
@click.option("--ort-provider", type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]), default="auto",
              show_default=True, help="ONNX Runtime provider (auto: CUDA with --device cuda, else CPU).")
@click.option("--io-binding/--no-io-binding", default=None,
              help="CUDA: bind GPU tensors to the engine, no host copies (default: on).")
@click.option("--cuda-graph/--no-cuda-graph", default=None,
              help="CUDA: replay each step as a captured CUDA graph, one per input shape (default: on with a GPU "
                   "provider and IO binding).")
@click.option("--prefer-nhwc", is_flag=True, help="CUDA: let ONNX Runtime use NHWC convolution kernels.")
@click.option("--cudnn-search", type=click.Choice(["exhaustive", "heuristic", "default"]), default="exhaustive",
              show_default=True, help="CUDA: cuDNN convolution algorithm search (paid once per shape, at warm-up).")
@handle_errors
def generate(model, engine_dir, prompts, prompts_file, seconds, steps, guidance_scale, seed, out, force, device,
             batch_size, plot, threads, ort_provider, io_binding, cuda_graph, prefer_nhwc, cudnn_search):
    """Generate WAV files with the pipeline, its denoiser served by the engine."""
    from adm_export.stages import api
    from adm_export.stages.generate import GenerateConfig

    cfg = GenerateConfig(model=model, engine_dir=str(engine_dir) if engine_dir else None, prompts=tuple(prompts),
                         prompts_file=prompts_file, audio_seconds=seconds, steps=steps,
                         guidance_scale=guidance_scale, seed=seed, device=device, batch_size=batch_size, plot=plot,
                         threads=threads, ort_provider=ort_provider, io_binding=io_binding, cuda_graph=cuda_graph,
                         prefer_nhwc=prefer_nhwc, cudnn_search=cudnn_search)
    files = api.generate(cfg, out, force=force).files
    click.echo(f"{len(files)} clip(s){' and spectrograms' if plot else ''} -> {out}")


@cli.command("serve")
@click.argument("bundle", type=click.Path(file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on (0.0.0.0: every interface; put auth or a proxy in front).")
@click.option("--port", type=int, default=8000, show_default=True, help="TCP port (0: any free port, printed).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=int, default=0, help="ONNX Runtime CPU threads (0: ONNX Runtime's default).")
@click.option("--cuda-graph", is_flag=True, help="CUDA: replay each U-Net step as a captured CUDA graph.")
@click.option("--prefer-nhwc", is_flag=True, help="CUDA: let ONNX Runtime use NHWC convolution kernels.")
@click.option("--max-batch", type=int, default=None,
              help="Most requests of the same length sampled in one U-Net batch [default: the bundle's limit].")
@click.option("--max-wait-ms", type=FINITE, default=10.0, show_default=True,
              help="How long a batch that is not full waits for the next request of its length (each "
                   "arrival restarts it; at most max-batch times this).")
@click.option("--max-queue", type=int, default=64, show_default=True,
              help="Most requests waiting for a batch; beyond it: 503 with Retry-After.")
@click.option("--timeout", "timeout_s", type=FINITE, default=300.0, show_default=True,
              help="Per-request limit in seconds (504 after it; the work is dropped).")
@click.option("--drain-timeout", "drain_timeout_s", type=FINITE, default=60.0, show_default=True,
              help="On SIGTERM: seconds accepted requests may take to finish before the process exits.")
@click.option("--api-key-file", type=click.Path(dir_okay=False), default=None,
              help="File holding a bearer token that /v1/generate then requires (read once, never logged).")
@click.option("--ray", "use_ray", is_flag=True, help="Run under Ray Serve (pip install 'adm-export[ray]'), "
              "one runtime per replica.")
@click.option("--replicas", type=int, default=1, show_default=True, help="With --ray: fixed replica count.")
@click.option("--min-replicas", type=int, default=None, help="With --ray: autoscaling lower bound.")
@click.option("--max-replicas", type=int, default=None, help="With --ray: autoscaling upper bound (turns it on).")
@click.option("--ray-address", default=None, help="With --ray: a running cluster (default: a local Ray instance).")
@handle_errors
def serve_cmd(bundle, host, port, device, threads, cuda_graph, prefer_nhwc, max_batch, max_wait_ms, max_queue,
              timeout_s, drain_timeout_s, api_key_file, use_ray, replicas, min_replicas, max_replicas, ray_address):
    """Serve a bundle over HTTP: POST /v1/generate -> WAV, GET /health, GET /metrics (SIGTERM drains)."""
    from adm_export.serving.config import RayServeConfig, ServeConfig
    from adm_export.stages import api

    level = logging.getLevelName(logging.getLogger("adm_export").level).lower()
    # An absolute path: Ray's replicas do not share this process's working directory.
    cfg = ServeConfig(bundle=str(bundle.resolve()), host=host, port=port, device=device, threads=threads, cuda_graph=cuda_graph,
                      prefer_nhwc=prefer_nhwc, max_batch=max_batch,
                      max_wait_ms=max_wait_ms, max_queue=max_queue, timeout_s=timeout_s,
                      drain_timeout_s=drain_timeout_s, api_key_file=api_key_file,
                      log_level=level if level in ("debug", "info", "warning") else "info")
    if use_ray:
        cfg = RayServeConfig(serve=cfg, num_replicas=replicas, min_replicas=min_replicas if min_replicas is not None
                             else 1, max_replicas=max_replicas)
    api.serve(cfg, ray_address=ray_address)


@cli.command("bundle")
@click.argument("build_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Bundle folder to write.")
@click.option("--force", is_flag=True, help="Overwrite a non-empty output folder.")
@click.option("--model", default=None, help="Model to load (default: the engine's; must be the same weights).")
@click.option("--max-seconds", type=FINITE, default=30.0, show_default=True,
              help="Longest clip the runtime accepts by default.")
@handle_errors
def bundle_cmd(build_dir, out, force, model, max_seconds):
    """Bundle a build for the torch-free runtime: engine, text encoder(s), VAE decoder, vocoder as ONNX."""
    from adm_export.config import BundleConfig
    from adm_export.stages import api

    result = api.bundle(BundleConfig(build_dir=str(build_dir), out=str(out), force=force, model=model,
                                 max_seconds=max_seconds))
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
    from adm_export.artifacts import check_file_out, write_json, write_text
    from adm_export.errors import InvalidInputError

    if show_build_args:
        click.echo("\n".join(ci_gate.baseline_build_args(baseline)))
        return
    if build_dir is None:
        raise InvalidInputError("missing BUILD_DIR: give the output folder of adm-export build")
    for path, flag in ((summary, "--summary"), (json_out, "--json-out"), (baseline if write_baseline else None,
                                                                          "--baseline")):
        if path is not None:
            check_file_out(path, flag)  # before the comparison is printed: one line, not a table and a traceback
    if write_baseline:
        write_json(baseline, ci_gate.make_baseline(build_dir, build_args))
        click.echo(f"baseline written: {baseline}")
        return
    tol = ci_gate.GateTolerances(fd_increase_pp=fd_tolerance, size_pct=size_tolerance,
                                 quantized_layers_pct=layer_tolerance, drift_pp=drift_tolerance)
    base = ci_gate.load_baseline(baseline)
    report, settings = ci_gate.load_build(build_dir)
    result = ci_gate.compare(report, settings, base, tol, baseline_path=baseline)
    click.echo(ci_gate.format_table(result))
    if summary is not None:
        write_text(summary, ci_gate.format_markdown(result))
    if json_out is not None:
        write_json(json_out, {**result.to_dict(), "baseline": str(baseline), "build": str(build_dir)})
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
