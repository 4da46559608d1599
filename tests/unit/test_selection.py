"""Activation statistics, activation-aware selection, and the calibrate stage with every method."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch

from adm_export.calibration.cache import load_cache
from adm_export.calibration.selection import ErrorModel, errors_for_amax, layer_errors, select_activation, summarize
from adm_export.calibration.stats import ActivationStats, HistogramGrid, StatsRecorder, memory_bytes
from adm_export.config import SelectMethod

TINY = ["--model", "tiny-audioldm", "--num-prompts", "3", "--steps", "3", "--points", "3", "--seconds", "0.64", "--seed", "5"]


@contextlib.contextmanager
def one_thread():
    """One torch thread: on a shared 2-core CPU torch's default two threads oversubscribe and made
    the calibrate runs below 20x slower (measured); results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# -- statistics ------------------------------------------------------------------------------------
class _Two(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.b(self.a(x))


def _record(model, inputs, steps=1):
    rec = StatsRecorder(model, num_prompts=1, steps=steps, layers=["a", "b"])
    with rec, torch.no_grad():
        for s, x in enumerate(inputs):
            rec.at(0, s)
            model(x)
    return rec.result()


def test_recorder_reduces_each_input_to_absmax_energy_and_log2_histogram():
    model = _Two()
    x = torch.tensor([[0.0, 1.0, -3.0, 0.25]])
    st = _record(model, [x])
    grid = st.grid
    assert st.absmax[0, 0, 0] == 3.0
    assert st.sumsq[0, 0, 0] == pytest.approx(1 + 9 + 0.0625)
    h = st.hist[0, 0, 0]
    assert h.sum() == 4  # every element counted once, zero included (first bin)
    edges = grid.edges()
    for value in (1.0, 3.0, 0.25):  # each value sits in the bin whose edges bracket it
        b = int(np.searchsorted(edges, value, side="right")) - 1
        assert h[b] >= 1 and edges[b] <= value < edges[b + 1]
    assert h[0] == 1  # the zero
    # The quantile read from the histogram is the upper edge of the bin holding it (capped by absmax).
    q = st.quantiles([0.5, 0.9999])[0]
    assert 0.25 <= q[0] <= 1.0 * 2 ** 0.25 and q[1] == 3.0


def test_statistics_memory_is_fixed_per_layer_whatever_the_input_size():
    model = _Two()
    small = _record(model, [torch.randn(1, 4)] * 3, steps=3)
    large = _record(model, [torch.randn(4096, 4)] * 3, steps=3)
    assert small.nbytes == large.nbytes
    # bins + 2 float32 numbers per (prompt, step, layer), plus one flag per (prompt, step)
    assert memory_bytes(1, 3, 2) == 1 * 3 * 2 * (HistogramGrid().bins + 2) * 4 == small.nbytes - 3
    assert large.hist[0, :, 0].sum(axis=-1).tolist() == [4096 * 4] * 3


def test_recorder_memory_on_the_unet_does_not_depend_on_latent_length(tiny_adapter):
    spec = tiny_adapter.denoiser_spec()
    sizes = []
    for frames in (8, 16):
        rec = StatsRecorder(tiny_adapter.denoiser, 1, 1)
        with one_thread(), rec, torch.inference_mode():
            rec.at(0, 0)
            tiny_adapter.export_module()(*spec.dummy_inputs(2, frames).values())
        st = rec.result()
        assert (st.absmax[0, 0] > 0).all()  # every quantized layer was seen
        sizes.append(st.nbytes)
    assert sizes[0] == sizes[1] == memory_bytes(1, 1, len(st.layers)) + 1
    assert not any(n.endswith(("conv_in", "conv_out", "conv_shortcut")) or "time_emb" in n for n in st.layers)


# -- error model and selection on synthetic statistics --------------------------------------------
def _synthetic(prompts=6, steps=20, layers=8, seed=0) -> ActivationStats:
    """Each layer's range peaks (x10) at one step; values fill their range up to the point's absmax."""
    rng = np.random.default_rng(seed)
    grid = HistogramGrid()
    peak = rng.integers(0, steps, size=layers)
    absmax = np.ones((prompts, steps, layers), np.float32) * rng.uniform(0.8, 1.0, (prompts, steps, layers))
    absmax[:, peak, np.arange(layers)] *= 10
    absmax = absmax.astype(np.float32)
    hist = np.zeros((prompts, steps, layers, grid.bins), np.float32)
    edges = grid.edges()
    for idx in np.ndindex(prompts, steps, layers):
        # Log-uniform mass over the two octaves below absmax: most of the energy near the top.
        top = int(np.searchsorted(edges, absmax[idx], side="right")) - 1
        hist[idx][top - 2 * grid.bins_per_octave:top + 1] = 100
    sumsq = (hist * grid.centers() ** 2).sum(-1).astype(np.float32)
    return ActivationStats([f"l{i}" for i in range(layers)], grid, absmax, sumsq, hist,
                           np.ones((prompts, steps), bool))


def test_error_model_prefix_sums_equal_the_direct_formula():
    st = _synthetic()
    v = st.grid.centers()
    rng = np.random.default_rng(1)
    amax = st.absmax.max(axis=(0, 1)) * rng.uniform(0.05, 1.3, size=(3, len(st.layers)))
    got = ErrorModel(st).per_group(amax)
    for s in (0, 7):
        h = st.hist[:, s].sum(axis=0).astype(np.float64)
        for n in range(3):
            for l in range(len(st.layers)):
                a = amax[n, l]
                over = v > a
                err = (h[l] * np.where(over, (v - a) ** 2, np.minimum(v ** 2, (a / 127) ** 2 / 12))).sum()
                assert got[s, n, l] == pytest.approx(err / (h[l] * v ** 2).sum(), rel=1e-9)
    # No range at all clips everything: relative error 1.
    assert np.allclose(errors_for_amax(st, np.zeros(len(st.layers))), 1.0)


def test_activation_selection_covers_more_of_each_range_than_uniform():
    from adm_export.calibration.latents import select_indices

    st = _synthetic()
    p, s, _ = st.shape
    k = 8
    uni = select_indices(SelectMethod.UNIFORM, p, s, k, seed=0)
    act = select_activation(st, k)
    gmax = st.absmax.max(axis=(0, 1))
    reach = lambda pts: (st.absmax[tuple(np.array(pts).T)].max(axis=0) / gmax).mean()  # noqa: E731
    assert len(act.points) == k and len(set(act.points)) == k
    assert reach(act.points) > reach(uni) + 0.2
    # Clipping-only objective (COVERCAL-style coverage): every peak is reached. The default keeps
    # some peaks out on purpose: covering a 10x range at one step of 20 costs the other 19 steps
    # 10x coarser rounding.
    assert reach(select_activation(st, k, rounding=False).points) > 0.99
    assert layer_errors(st, act.points).mean() < layer_errors(st, uni).mean()
    assert act.objective <= layer_errors(st, uni).mean()
    # Every selected point is a recorded (prompt, step).
    assert all(0 <= a < p and 0 <= b < s for a, b in act.points)


def test_activation_selection_is_deterministic_and_capped_by_what_was_recorded():
    st = _synthetic(prompts=2, steps=3)
    a, b = select_activation(st, 4), select_activation(st, 4)
    assert a == b
    everything = select_activation(st, 100)
    assert len(everything.points) == 6  # 2 prompts x 3 steps
    st.recorded[1] = False  # prompt 1 never ran: it cannot be selected
    assert all(p == 0 for p, _ in select_activation(st, 5).points)


def test_summary_reports_error_coverage_and_quantiles():
    st = _synthetic()
    pts = select_activation(st, 4).points
    summ = summarize(st, pts, quantiles=(0.5, 0.99))
    assert summ["layers"] == len(st.layers) and len(summ["per_step_range"]) == st.shape[1]
    assert summ["memory_bound"]["bytes"] == memory_bytes(*st.shape)
    assert set(summ["per_layer"][0]["quantiles"]) == {"0.5", "0.99"}
    assert 0 < summ["range_coverage"]["mean"] <= 1
    json.dumps(summ)  # manifest-ready


# -- the calibrate stage: every method through the CLI, replay bit-exact ---------------------------
@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    from click.testing import CliRunner

    from adm_export.cli import cli

    root = tmp_path_factory.mktemp("cal")
    out = {}
    with one_thread():
        for method in [m.value for m in SelectMethod] + ["activation-again"]:
            folder = root / method
            select = method.replace("-again", "")
            r = CliRunner().invoke(cli, ["--quiet", "calibrate", "--out", str(folder), "--select", select, *TINY])
            assert r.exit_code == 0, r.output
            out[method] = folder
    return out


def test_every_method_writes_a_cache_with_statistics(caches):
    for method in SelectMethod:
        cache = load_cache(caches[method.value])
        man = cache.manifest
        assert man["selection"]["method"] == method.value
        expected = 9 if method == SelectMethod.ALL else 3  # 3 prompts x 3 steps; K = 3
        assert len(cache) == man["selection"]["points"] == expected
        stats = man["statistics"]
        assert stats["recorded_points"] == 9 and stats["layers"] > 100
        assert len(stats["per_layer"]) == stats["layers"] and stats["memory_bytes"] > 0
        assert man["prompts"]["coverage"]["summary"]


def test_activation_cache_holds_recorded_denoiser_inputs_bit_exactly(caches):
    """Two-pass replay: each kept point equals that (prompt, step) of the one-pass `all` run."""
    act = load_cache(caches["activation"])
    full = load_cache(caches["all"])
    sel = act.manifest["selection"]
    assert sel["replay"]["bit_exact"] and sel["replay"]["mismatches"] == 0
    assert sel["replay"]["denoiser_calls"] <= 9
    index = {(int(p), int(s)): i for i, (p, s) in enumerate(zip(full.prompt_index, full.step_index))}
    from adm_export.models import load_model

    scheduler = load_model("tiny-audioldm").pipeline.scheduler
    scheduler.set_timesteps(3)
    for i in range(len(act)):
        key = (int(act.prompt_index[i]), int(act.step_index[i]))
        mine, ref = act.point(i), full.point(index[key])
        for name in mine:
            assert torch.equal(mine[name], ref[name]), (key, name)
        assert float(mine["timestep"][0]) == float(scheduler.timesteps[key[1]])


def test_activation_calibration_is_deterministic(caches):
    a = load_cache(caches["activation"])
    b = load_cache(caches["activation-again"])
    assert a.manifest["files"] == b.manifest["files"]  # same bytes (sha256 of points.safetensors)
    assert a.manifest["selection"]["activation"] == b.manifest["selection"]["activation"]


def test_activation_estimated_error_not_worse_than_the_baselines(caches):
    """On its own statistics the greedy beats (or ties) every index-based choice of the same K."""
    est = {m: load_cache(caches[m]).manifest["selection"]["estimated_input_error"]
           for m in ("activation", "uniform", "random", "normal")}
    assert all(est["activation"] <= est[m] * (1 + 1e-3) for m in ("uniform", "random", "normal"))
