"""Sensitivity search for ``--precision mixed --size-budget F``.

1. Sensitivity: for every candidate format, quantize the whole denoiser once in that format
   (calibrating every quantizer on the cache), then switch all quantizers off and turn on one
   layer's quantizers at a time: the layer's sensitivity to the format is the mean squared
   relative L2 error of the U-Net output against full precision over the measurement points.
   ``fp16`` is taken as 0 (FP16 rounding of one layer is far below INT8/FP8 noise).
2. Budget: the exported U-Net must weigh at most ``F`` x its FP32 bytes. Bytes not owned by a
   searched layer (biases, norms, embeddings' own parameters, stay FP32) are fixed; each layer's
   options cost the bytes its weight is stored in (``policy.weight_bytes``: codes plus FP32 scales).
3. Choice: minimise the total sensitivity (errors of independent layers add in power) subject to
   the byte budget: a multiple-choice knapsack solved exactly by dynamic programming over bytes
   rounded *up* to ``budget / resolution`` units (so a found choice is always within budget).
4. Prediction: ``sqrt(sum of the chosen sensitivities)`` is the predicted relative error of the
   mixed model; the quantize stage then measures the real one and reports both.

Granularity (``--sensitivity-granularity``): ``layer`` measures and chooses every conv/linear
layer on its own; ``block`` groups them by U-Net block (a ResNet block, a transformer block, a
down/up sampler, the time embedding: :func:`block_of`), measures a block with all its layers in
a format at once and gives the whole block one format. Blocks need ~6x fewer trials (the
AudioLDM-S-sized U-Net: 284 searched layers, 48 blocks), at the price of a coarser choice.

Trajectory check (``--trajectory-check K``): one U-Net call can hide errors that grow along the
sampler. For each format, the K items with the largest one-call error are re-measured by the
final-latent error of a short sampler run (the decoder's input, same prompts and seeds) with
only that item quantized; the report lists both numbers side by side.

Slightly over 500 lines on purpose: the four steps above and ModelOpt's auto_quantize comparison
share the layer grouping and the quantizer switches of this module; ``quantize/search.py`` only
composes them into the stage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
from typing import Callable, Sequence

from adm_export.errors import InvalidInputError
from adm_export.progress import progress

logger = logging.getLogger(__name__)


def solve_budget(options: Sequence[Sequence[tuple[float, float]]], budget: float,
                 resolution: int = 4000) -> tuple[list[int], float, float]:
    """Pick one option per item minimising total cost with total bytes within ``budget``.

    Args:
        options: Per item, ``(bytes, cost)`` of each option.
        budget: Byte budget for the items together.
        resolution: Number of byte units the budget is divided into (bytes round up, so the
            result is always feasible; it is optimal up to that rounding).

    Returns:
        ``(choice, bytes, cost)``: the chosen option index per item and their totals.

    Raises:
        InvalidInputError: Even the smallest option of every item exceeds ``budget``.
    """
    import numpy as np

    min_bytes = sum(min(b for b, _ in opts) for opts in options)
    if min_bytes > budget:
        raise InvalidInputError(
            f"--size-budget is infeasible: the smallest formats need {min_bytes / 1e6:.2f} MB for the searched "
            f"layers, the budget leaves {budget / 1e6:.2f} MB; raise --size-budget")
    unit = max(budget / resolution, 1e-9)
    cap = int(math.floor(budget / unit + 1e-9))
    inf = float("inf")
    dp = np.full(cap + 1, inf)
    dp[0] = 0.0
    choices = np.zeros((len(options), cap + 1), dtype=np.int16)
    for i, opts in enumerate(options):
        new = np.full(cap + 1, inf)
        pick = np.zeros(cap + 1, dtype=np.int16)
        for j, (b, c) in enumerate(opts):
            w = int(math.ceil(b / unit - 1e-9))
            if w > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[w:] = dp[: cap + 1 - w] + c
            better = cand < new
            new[better] = cand[better]
            pick[better] = j
        dp, choices[i] = new, pick
    end = int(np.argmin(dp))
    if not np.isfinite(dp[end]):  # pragma: no cover - excluded by the min_bytes check up to rounding
        raise InvalidInputError("--size-budget is infeasible after rounding; raise --size-budget slightly")
    # Backtrack: the capacity used after item i is end; step back by the chosen option's weight.
    picked = [0] * len(options)
    c = end
    for i in range(len(options) - 1, -1, -1):
        j = int(choices[i, c])
        picked[i] = j
        c -= int(math.ceil(options[i][j][0] / unit - 1e-9))
    total_b = sum(options[i][j][0] for i, j in enumerate(picked))
    total_c = sum(options[i][j][1] for i, j in enumerate(picked))
    return picked, total_b, total_c


def _quantizers(module):
    return [getattr(module, n) for n in ("weight_quantizer", "input_quantizer", "output_quantizer")
            if getattr(getattr(module, n, None), "is_enabled", False)]


def block_of(name: str) -> str:
    """The U-Net block a layer belongs to, for ``--sensitivity-granularity block``.

    diffusers names: ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` ->
    ``down_blocks.1.attentions.0``; ``mid_block.resnets.1.conv2`` -> ``mid_block.resnets.1``;
    ``time_embedding.linear_1`` -> ``time_embedding``. LDM names (Make-An-Audio):
    ``input_blocks.4.1.proj_in`` -> ``input_blocks.4.1``; ``middle_block.1.norm`` -> ``middle_block.1``.
    """
    parts = name.split(".")
    numbers = [i for i, s in enumerate(parts) if s.isdigit()]
    if parts[0] in ("down_blocks", "up_blocks", "input_blocks", "output_blocks") and len(numbers) >= 2:
        return ".".join(parts[: numbers[1] + 1])
    if parts[0] in ("mid_block", "middle_block") and numbers:
        return ".".join(parts[: numbers[0] + 1])
    return parts[0]


def group_plans(plans, granularity: str = "layer") -> dict[str, list[str]]:
    """Search items: ``{item: [layer names]}`` in network order (one layer each for ``layer``).

    Raises:
        InvalidInputError: ``granularity`` is not ``layer`` or ``block``.
    """
    if granularity not in ("layer", "block"):
        raise InvalidInputError(f"invalid --sensitivity-granularity {granularity!r}: use 'layer' or 'block'")
    groups: dict[str, list[str]] = {}
    for p in plans:
        groups.setdefault(p.name if granularity == "layer" else block_of(p.name), []).append(p.name)
    return groups


def _trial(plans, fmt: str, candidates: dict[str, list[str]], modules: dict, int4_convs: bool):
    """Every layer that can take ``fmt`` gets it; the others stay in FP16."""
    from adm_export.formats.policy import with_format

    return [with_format(p, fmt if fmt in candidates[p.name] else "fp16", modules[p.name], int4_convs) for p in plans]


@dataclasses.dataclass
class TrajectoryCheck:
    """The trajectory check of :func:`measure`: settings in, results filled in place.

    Attributes:
        final_latents: ``final_latents(model) -> list of tensors``: a short sampler run with
            ``model`` as the denoiser (``None``: full precision), same prompts and seeds each call.
        top_k: Items checked per format (the ``top_k`` largest one-call errors in that format).
        results: ``{item: {format: rel-L2 of the final latents vs full precision, RMS over runs}}``.
    """

    final_latents: Callable
    top_k: int
    results: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    _reference: list | None = None

    def run(self, fmt: str, items: list[str], model, switch: "_Switch", groups: dict[str, list[str]],
            scores: dict[str, float]) -> None:
        from adm_export.numerics import rel_l2

        if self.top_k <= 0 or not items:
            return
        if self._reference is None:
            self._reference = self.final_latents(None)
        ranked = sorted(items, key=lambda i: -scores[i])[: self.top_k]
        for item in progress(ranked, desc=f"trajectory check {fmt}", unit="item"):
            with switch.on([n for n in groups[item] if switch.format[n] == fmt]):
                got = self.final_latents(model)
            errs = [rel_l2(a, b) for a, b in zip(got, self._reference)]
            self.results.setdefault(item, {})[fmt] = math.sqrt(sum(e * e for e in errs) / len(errs))


def measure(adapter, calib_points: list[dict], eval_points: list[dict], plans, candidates: dict[str, list[str]],
            quantize_fn: Callable, references: list, int4_convs: bool = True,
            groups: dict[str, list[str]] | None = None,
            trajectory: TrajectoryCheck | None = None) -> dict[str, dict[str, float]]:
    """Per-item sensitivity: ``{item: {format: mean squared rel-L2 output error}}``.

    Args:
        adapter: The model adapter.
        calib_points: Points the quantizers are calibrated on.
        eval_points: Points the error is measured on.
        plans: The resolved (``auto``) layer plans.
        candidates: ``{layer: [formats the target can run]}``.
        quantize_fn: ``quantize_fn(plans, points) -> model`` quantizing a copy of the denoiser.
        references: Full-precision outputs on ``eval_points``.
        int4_convs: The policy's INT4-convolution switch.
        groups: Search items (:func:`group_plans`); default one item per layer. An item is
            measured in a format with all its layers that can take the format quantized at once.
        trajectory: Also run the trajectory check on each format's most sensitive items (with
            the model already calibrated for that format); results land in ``trajectory.results``.
    """
    import torch

    from adm_export import distributed as dist
    from adm_export.numerics import rel_l2, run_denoiser

    groups = groups or group_plans(plans)
    modules = dict((n, m) for n, m in adapter.denoiser.named_modules())
    formats = sorted({f for fs in candidates.values() for f in fs if f != "fp16"})
    table: dict[str, dict[str, float]] = {item: {"fp16": 0.0} for item in groups}
    items = list(groups.items())
    data_key = _data_key(adapter, eval_points, references, items)
    for fmt in formats:
        trial = _trial(plans, fmt, candidates, modules, int4_convs)
        model = quantize_fn(trial, calib_points)
        switch = _Switch(model, trial)
        measured = []

        def trials(c: int, model=model, switch=switch, fmt=fmt) -> dict[str, float]:
            errors = {}
            for item, names in items[c * ITEMS_PER_SHARD:(c + 1) * ITEMS_PER_SHARD]:
                # Layers that fell back (no INT4 block fits) or cannot take fmt stay unquantized.
                members = [n for n in names if switch.format[n] == fmt]
                if not members:
                    continue
                with switch.on(members), torch.no_grad():
                    errs = [rel_l2(run_denoiser(adapter, model, x), ref) ** 2
                            for x, ref in zip(eval_points, references)]
                errors[item] = sum(errs) / len(errs)
            return errors

        # Under torchrun the items are split over the ranks in resumable shards of ITEMS_PER_SHARD
        # (adm_export.distributed); every rank reads the whole column back, so the table (and the
        # budget solver's choice) is identical on every rank. One process: the same path.
        store = dist.ShardStore.open(f"sensitivity-{fmt}", {**data_key, "format": fmt,
                                                             "quantized": _quantized_key(model)})
        units = [f"items-{c:05d}" for c in range(math.ceil(len(items) / ITEMS_PER_SHARD))]
        dist.run_units(store, units, trials, f"sensitivity {fmt}", "shard")
        for errors in dist.load_all(store, units):
            for item, err in errors.items():
                table[item][fmt] = err
                measured.append(item)
        store.close()
        if trajectory is not None:
            trajectory.run(fmt, measured, model, switch, groups, {i: table[i][fmt] for i in measured})
        del model, switch
    return table


#: Search items per resumable shard of :func:`measure` under torchrun (small: a killed rank loses
#: little, and the ranks' shares stay balanced).
ITEMS_PER_SHARD = 4


def _data_key(adapter, eval_points: list[dict], references: list, items: list) -> dict:
    """What every trial depends on besides the trial model: weights, measurement data, items."""
    from adm_export import distributed as dist

    identity = getattr(adapter, "identity", None)
    weights = identity() if callable(identity) else dist.tensor_digest(adapter.denoiser.state_dict())
    return {"model": weights, "eval_points": dist.tensor_digest({str(i): p for i, p in enumerate(eval_points)}),
            "references": dist.tensor_digest(list(references)), "items": items}


def _quantized_key(model) -> str:
    """Hash of every quantizer's state (name, enabled, amax) of a trial model: covers the fixed
    layers' formats and the calibration, which the trial's plans alone do not."""
    import torch

    from adm_export import distributed as dist

    state = {}
    for name, module in model.named_modules():
        if type(module).__name__.endswith("Quantizer"):
            amax = getattr(module, "amax", None)
            state[f"{name}:{bool(getattr(module, 'is_enabled', False))}"] = (
                amax.detach().float() if isinstance(amax, torch.Tensor) else torch.tensor([float("nan")]))
    return dist.tensor_digest(state)


class _Switch:
    """Turns the quantizers of chosen layers on, all others off, in a model quantized for a trial."""

    def __init__(self, model, trial):
        layers = dict(model.named_modules())
        self.format = {p.name: p.format for p in trial}
        self.quantizers = {p.name: _quantizers(layers[p.name]) for p in trial}
        for qs in self.quantizers.values():
            for q in qs:
                q.disable()

    @contextlib.contextmanager
    def on(self, names):
        for n in names:
            for q in self.quantizers[n]:
                q.enable()
        try:
            yield
        finally:
            for n in names:
                for q in self.quantizers[n]:
                    q.disable()


def crop_frames(points: list[dict], spec, frames: int) -> list[dict]:
    """The first ``frames`` latent frames of each point (rounded down to the spec's frame multiple).

    The sensitivity trials run the U-Net hundreds of times; on a shorter latent each trial costs
    proportionally less while every quantizer keeps the ranges calibrated on the full points.
    ``frames <= 0`` or a point already that short: unchanged.
    """
    if frames <= 0:
        return points
    keep = max(spec.frame_multiple, frames // spec.frame_multiple * spec.frame_multiple)
    axes = {name: [i for i, d in dims.items() if d == "frames"] for name, dims in spec.dynamic_axes().items()}
    out = []
    for point in points:
        cropped = {}
        for name, value in point.items():
            for axis in axes.get(name, []):
                if value.shape[axis] > keep:
                    value = value.narrow(axis, 0, keep).contiguous()
            cropped[name] = value
        out.append(cropped)
    return out


def choose(plans, table: dict[str, dict[str, float]], candidates: dict[str, list[str]], budget_bytes: float,
           modules: dict, int4_convs: bool, resolution: int = 4000, groups: dict[str, list[str]] | None = None,
           trajectory: dict[str, dict[str, float]] | None = None):
    """Solve the budget and return ``(plans, ranking, solution)``.

    An item's option ``fmt`` puts every layer of the item that can take ``fmt`` in it (exactly
    the layers :func:`measure` quantized for that trial) and keeps the others in FP16.
    ``ranking`` lists items from most to least sensitive (by their error in the worst format
    measured), with their trajectory check where one was made; ``solution`` has the byte and
    sensitivity totals and the predicted error.
    """
    from adm_export.formats.policy import with_format

    groups = groups or group_plans(plans)
    by_name = {p.name: p for p in plans}

    def realize(name: str, fmt: str):
        p = by_name[name]
        if fmt != "fp16" and fmt in candidates[name]:
            realized = with_format(p, fmt, modules[name], int4_convs, "chosen by the sensitivity search")
            if realized.format == fmt:
                return realized
        return with_format(p, "fp16", modules[name], int4_convs, "chosen by the sensitivity search")

    items = list(groups)
    options, realized_options = [], []
    for item in items:
        opts, reals = [], []
        for fmt, cost in table[item].items():
            members = [realize(n, fmt) for n in groups[item]]
            if fmt != "fp16" and not any(m.format == fmt for m in members):
                continue
            opts.append((sum(m.weight_bytes() for m in members), cost))
            reals.append((fmt, members))
        options.append(opts)
        realized_options.append(reals)
    picked, total_b, total_c = solve_budget(options, budget_bytes, resolution)
    chosen_by_name, chosen_fmt = {}, {}
    for item, reals, j in zip(items, realized_options, picked):
        chosen_fmt[item] = reals[j][0]
        for m in reals[j][1]:
            chosen_by_name[m.name] = m
    chosen = [chosen_by_name[p.name] for p in plans]

    def worst(item):
        errs = [v for k, v in table[item].items() if k != "fp16"]
        return max(errs) if errs else 0.0

    ranking = []
    for item in sorted(items, key=lambda i: -worst(i)):
        members = [by_name[n] for n in groups[item]]
        kinds = sorted({m.kind for m in members})
        entry = {"layer": item, "kind": kinds[0] if len(kinds) == 1 else "+".join(kinds), "layers": len(members),
                 "params": sum(m.params for m in members), "sensitivity": dict(table[item]),
                 "chosen": chosen_fmt[item]}
        if trajectory and item in trajectory:
            entry["trajectory_rel_l2"] = dict(trajectory[item])
        ranking.append(entry)
    return chosen, ranking, {"searched_bytes": total_b, "searched_budget_bytes": budget_bytes,
                             "total_sensitivity": total_c, "predicted_rel_l2": math.sqrt(max(total_c, 0.0)),
                             "items": len(items)}


@contextlib.contextmanager
def _plain_diffusers_attention():
    """Leave diffusers' attention modules out of ModelOpt's module conversion while inside.

    ModelOpt 0.47's diffusers plugin wraps every diffusers ``Attention`` and routes its
    ``scaled_dot_product_attention`` through ``FP8SDPA``, an export-only autograd Function with no
    backward, so ``mtq.auto_quantize``'s gradient scores fail on any U-Net with attention
    (``NotImplementedError`` in ``loss.backward()``). Our presets never quantize the attention
    matmuls (only conv/linear layers, which stay wrapped), so for the comparison the attention
    modules are left plain; the registry is restored on exit. Uses the registry's private maps
    because its public ``unregister`` does not return what it removed.
    """
    from modelopt.torch.quantization.nn import QuantModuleRegistry

    removed = [(cls, QuantModuleRegistry._registry[cls], QuantModuleRegistry._key_registry[cls])
               for cls in list(QuantModuleRegistry._registry)
               if cls.__module__.startswith("diffusers.") and "Attention" in cls.__name__]
    for cls, _, _ in removed:
        QuantModuleRegistry.unregister(cls)
    try:
        yield
    finally:
        for cls, dm_class, key in removed:
            if cls not in QuantModuleRegistry._registry:
                QuantModuleRegistry.register({cls: key})(dm_class)


def denoising_batches(adapter, points: list[dict], references: list, seed: int = 0) -> tuple[list[dict], str]:
    """Training-style batches for a gradient-based search: ``{"inputs", "target"}`` per point.

    A loss against the full-precision model's own output has zero gradient at that model, so
    gradient scores (``mtq.auto_quantize``) would all be zero. Instead each cached point is
    re-noised like a training sample: the full-precision prediction gives an estimate of the
    clean latent ``x0 = (x_t - sqrt(1 - a) eps) / sqrt(a)`` (``a`` = the scheduler's cumulative
    alpha at the point's timestep), fresh seeded noise gives ``x_t' = sqrt(a) x0 + sqrt(1 - a) n``,
    and the target is the noise (epsilon prediction) or the velocity (v prediction).

    The batches are computed where the references live (the model's device): the points (cached
    on the CPU) and the scheduler's ``alphas_cumprod`` are moved there; the fresh noise is drawn on
    the CPU from ``seed`` (the same batches on any device) and moved too.

    Returns:
        ``(batches, loss_name)``; without a scheduler with ``alphas_cumprod`` or ``sample``/
        ``timestep`` inputs, the batches target the full-precision outputs and the name says so.
    """
    import torch

    sched = getattr(adapter.pipeline, "scheduler", None)
    alphas = getattr(sched, "alphas_cumprod", None)
    kind = (getattr(sched, "config", None) or {}).get("prediction_type", "epsilon")
    if alphas is None or kind not in ("epsilon", "v_prediction") or any(
            k not in points[0] for k in ("sample", "timestep")):
        return [{"inputs": p, "target": r} for p, r in zip(points, references)], "MSE to the full-precision output"
    g = torch.Generator().manual_seed(seed)
    batches = []
    for p, ref in zip(points, references):
        dev = ref.device
        x = p["sample"].to(dev, torch.float32)
        t = p["timestep"].reshape(-1).long().clamp(0, len(alphas) - 1).to(alphas.device)
        a = alphas[t].to(dev, torch.float32).reshape(-1, *([1] * (x.dim() - 1))).expand(
            x.shape[0], *([1] * (x.dim() - 1)))
        sa, sb = a.sqrt(), (1 - a).sqrt()
        pred = ref.float()
        eps = pred if kind == "epsilon" else sa * pred + sb * x
        x0 = (x - sb * eps) / sa
        noise = torch.randn(x.shape, generator=g).to(dev)
        target = noise if kind == "epsilon" else sa * noise - sb * x0
        inputs = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in p.items()}
        inputs["sample"] = (sa * x0 + sb * noise).to(p["sample"].dtype)
        batches.append({"inputs": inputs, "target": target})
    return batches, f"denoising loss ({kind} target) on re-noised cached points"


def auto_quantize_comparison(adapter, points: list[dict], eval_points: list[dict], references: list,
                             effective_bits: float) -> dict:
    """ModelOpt's own ``mtq.auto_quantize`` on the denoiser, side by side with our search.

    Its gradient-based per-layer scores use the denoising loss of :func:`denoising_batches` on
    the calibration points; its formats are ModelOpt's INT8, FP8 and INT4-blockwise (weight-only)
    presets under an ``effective_bits`` constraint (``size_budget x 32`` bits per weight). Note
    that its INT4 preset blocks along a weight's last axis, which for a 3x3 convolution is the
    3-wide kernel axis; it only scores weights, not our exported byte count.

    Returns:
        ``{"ran": True, "effective_bits", "loss", "recipes" (format -> layer count),
        "measured_rel_l2"}``, or ``{"ran": False, "reason"}``.
    """
    import collections
    import copy

    import torch

    from adm_export.devices import to_module
    from adm_export.numerics import import_modelopt, rel_l2, run_denoiser

    mtq, _ = import_modelopt()
    model = copy.deepcopy(adapter.denoiser).eval()
    # run_denoiser returns inference-mode tensors; autograd (the loss) needs normal ones: clone.
    refs = [run_denoiser(adapter, adapter.denoiser, p).clone() for p in points]
    batches, loss_name = denoising_batches(adapter, points, refs)

    def forward_step(m, batch):
        return adapter.export_module(m)(*to_module(batch["inputs"], m).values())

    def loss_func(output, batch):
        return torch.nn.functional.mse_loss(output.float(), batch["target"].to(output.device, torch.float32))

    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                _plain_diffusers_attention():
            model, state = mtq.auto_quantize(
                model, constraints={"effective_bits": effective_bits},
                quantization_formats=["INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG"],
                data_loader=batches, forward_step=forward_step, loss_func=loss_func,
                num_calib_steps=len(batches), num_score_steps=len(batches), verbose=False)
    except Exception as exc:  # noqa: BLE001 - a comparison must not break the build
        return {"ran": False, "reason": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}
    best = (state or {}).get("best", {})
    recipes = collections.Counter(str(v).split("(")[0] for v in (best.get("recipe") or {}).values())
    with torch.no_grad():
        errs = [rel_l2(run_denoiser(adapter, model, p), r) for p, r in zip(eval_points, references)]
    return {"ran": True, "effective_bits": effective_bits, "loss": loss_name,
            "achieved_effective_bits": (best.get("constraints") or {}).get("effective_bits"),
            "recipes": dict(recipes), "measured_rel_l2": math.sqrt(sum(e * e for e in errs) / len(errs))}
