"""Data-parallel loops under torch.distributed (2 gloo processes on the CPU) and resumable shards.

One single-process reference run and two 2-process runs (spawned once each, module fixtures):

1. a run whose rank 1 exits (like a killed process) right after its first calibration shard;
2. the rerun, which must reuse the finished shards and compute only the missing ones, then the
   sensitivity search and eval generation.

Everything must equal the single-process results bit for bit.
"""

from __future__ import annotations

import os
import socket

import pytest

TINY_CAL = dict(model="tiny-audioldm", num_prompts=4, steps=3, points=4, audio_seconds=1.28)
EVAL_CLIPS = 10  # two chunks of harness.CHUNK (8 + 2): one per rank
EVAL_STEPS = 2
EVAL_SEED = 1234  # the eval stage's default seed: clip i gets EVAL_SEED + i
# The same settings as `adm-export build` arguments.
BUILD_ARGS = ["--model", "tiny-audioldm", "--num-prompts", "4", "--steps", "3", "--points", "4", "--seconds", "1.28",
              "--num-clips", str(EVAL_CLIPS), "--eval-steps", str(EVAL_STEPS), "--eval-seconds", "1.28",
              "--bootstrap", "20"]


def _net_adapter():
    """A small conv + linear network with the slice of an adapter the sensitivity search uses."""
    import torch

    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(8, 16, 3, padding=1)
            self.proj = torch.nn.Linear(16, 32)
            self.mid = torch.nn.Linear(32, 32)
            self.out = torch.nn.Linear(32, 16)

        def forward(self, x):
            h = torch.nn.functional.silu(self.conv(x)).flatten(2).transpose(1, 2)
            return self.out(torch.nn.functional.gelu(self.mid(torch.nn.functional.gelu(self.proj(h)))))

    class Adapter:
        denoiser = Net().eval()
        calls = 0  # network runs (references, calibration, trials): shows the trials were split

        def export_module(self, m=None):
            Adapter.calls += 1
            return m if m is not None else self.denoiser

    return Adapter()


def _sensitivity():
    """The per-layer sensitivity table of the small network (INT8 and W4A8 candidates)."""
    import torch

    from adm_export.formats import policy as pol
    from adm_export.numerics import run_denoiser
    from adm_export.quantize import sensitivity
    from adm_export.quantize.modelopt import quantize_with_plans

    adapter = _net_adapter()
    g = torch.Generator().manual_seed(1)
    points = [{"x": torch.randn(2, 8, 4, 4, generator=g)} for _ in range(2)]
    plans = pol.resolve(pol.preset("mixed"), adapter.denoiser)
    cands = {p.name: [f for f in p.candidates if f in ("fp16", "int8", "w4a8")] for p in plans}
    refs = [run_denoiser(adapter, adapter.denoiser, p) for p in points]
    per_shard = sensitivity.ITEMS_PER_SHARD
    sensitivity.ITEMS_PER_SHARD = 1  # 4 layers: 4 shards, 2 per rank
    try:
        table = sensitivity.measure(adapter, points, points, plans, cands,
                                    lambda trial, pts: quantize_with_plans(adapter, pts, trial), refs, True)
    finally:
        sensitivity.ITEMS_PER_SHARD = per_shard
    return table, adapter.calls


def _eval_clips(adapter):
    from adm_export.config import EvalConfig
    from adm_export.eval.embedders import get_embedder
    from adm_export.eval.harness import eval_prompts, generate_with_trajectory
    from adm_export.eval.scoring import embed_set

    cfg = EvalConfig(num_clips=EVAL_CLIPS, steps=EVAL_STEPS, audio_seconds=1.28)
    embedder = get_embedder("logmel")
    steps: list = []
    embedded: list = []
    waves, traj = generate_with_trajectory(
        adapter, eval_prompts(EVAL_CLIPS), [EVAL_SEED + i for i in range(EVAL_CLIPS)], cfg, "baseline", steps,
        embedding=("logmel", lambda w: embed_set(embedder, w, adapter.sampling_rate)), embedded=embedded)
    return {"waves": waves, "trajectory": traj, "timesteps": steps, "embedded": embedded}


def _worker(rank: int, world: int, port: int, root: str, full: bool, fail: str) -> None:
    """One rank of a 2-process run: calibration (and, if ``full``, sensitivity and eval)."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "ADM_EXPORT_NO_PROGRESS": "1"})
    if fail:
        os.environ["ADM_EXPORT_FAIL_AFTER_SHARDS"] = fail
    import pickle

    import torch

    torch.set_num_threads(1)
    from adm_export import calibrate
    from adm_export import distributed as dist
    from adm_export.config import CalibrationConfig
    from adm_export.models import load_model

    dist.init()
    adapter = load_model("tiny-audioldm")
    manifest = calibrate(CalibrationConfig(**TINY_CAL), os.path.join(root, "cal"), adapter=adapter).manifest
    out = {"manifest": manifest}
    if full:
        out["table"], calls = _sensitivity()
        out["network_runs_per_rank"] = dist.all_gather(calls)
        out["eval"] = _eval_clips(adapter)
    if dist.is_main():
        with open(os.path.join(root, "result.pkl"), "wb") as f:
            pickle.dump(out, f)
    dist.barrier()
    dist.shutdown()  # spawn's children leave through os._exit: init's atexit hook does not run there


def _spawn(root, full: bool, fail: str = "") -> None:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(root), full, fail), nprocs=2, join=True)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """Single-process reference (world 1: the same sharded code path)."""
    import torch

    from adm_export import calibrate
    from adm_export.config import CalibrationConfig
    from adm_export.models import load_model

    root = tmp_path_factory.mktemp("single")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        adapter = load_model("tiny-audioldm")
        manifest = calibrate(CalibrationConfig(**TINY_CAL), root / "cal", adapter=adapter).manifest
        table, calls = _sensitivity()
        result = {"manifest": manifest, "table": table, "network_runs": calls, "eval": _eval_clips(adapter)}
    finally:
        torch.set_num_threads(threads)
    from adm_export.eval.clips import write_clips

    write_clips(root / "baseline", result["eval"]["waves"], adapter.sampling_rate)
    return root, result


@pytest.fixture(scope="module")
def two_procs(tmp_path_factory):
    """A 2-process run killed after rank 1's first shard, then the rerun; returns what both left."""
    import pickle

    import torch.multiprocessing as mp

    root = tmp_path_factory.mktemp("two")
    shards = root / ".cal.shards"
    try:
        _spawn(root, full=False, fail="1:1")
        killed = None
    except mp.ProcessExitedException as exc:
        killed = exc
    except Exception as exc:  # noqa: BLE001 - spawn wraps a child's exit differently across versions
        killed = exc
    before = {p.name: p.stat().st_mtime_ns for p in shards.rglob("*.pt")}
    finished_dir = not (root / "cal").exists()
    _spawn(root, full=True)
    with open(root / "result.pkl", "rb") as f:
        result = pickle.load(f)
    return {"root": root, "killed": killed, "shards_before": before, "no_cache_after_kill": finished_dir,
            "result": result}


def test_killed_rank_leaves_only_finished_shards(two_procs):
    assert two_procs["killed"] is not None, "rank 1 was told to exit after its first shard"
    assert two_procs["no_cache_after_kill"], "a failed run must not leave a calibration cache"
    before = two_procs["shards_before"]
    # Rank 1 (prompts 1, 3) wrote prompt 1's shard, never prompt 3's.
    assert "prompt-00001.pt" in before and "prompt-00003.pt" not in before


def test_rerun_reuses_finished_shards_and_computes_the_rest(two_procs):
    shards = two_procs["result"]["manifest"]["distributed"]["shards"]["statistics"]
    before = two_procs["shards_before"]
    assert shards["world_size"] == 2 and shards["units"] == 4
    assert shards["reused"] == len(before) and shards["computed"] == 4 - len(before)
    # The shard area is removed once the stage succeeds.
    assert not (two_procs["root"] / ".cal.shards").exists()


def test_two_process_calibration_cache_equals_single_process(single, two_procs):
    import torch
    from safetensors.torch import load_file

    a = load_file(str(single[0] / "cal" / "points.safetensors"))
    b = load_file(str(two_procs["root"] / "cal" / "points.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    m1, m2 = single[1]["manifest"], two_procs["result"]["manifest"]
    for key in ("selection", "statistics", "prompts", "files"):
        assert m1[key] == m2[key], key
    assert m1["selection"]["replay"]["bit_exact"] and m2["selection"]["replay"]["bit_exact"]


def test_two_process_sensitivity_table_equals_single_process(single, two_procs):
    t1, t2 = single[1]["table"], two_procs["result"]["table"]
    assert t1 == t2
    # Each rank ran only its share of the trials (plus its own references and calibration).
    assert max(two_procs["result"]["network_runs_per_rank"]) < single[1]["network_runs"]
    assert all(t1[n]["int8"] > 0 for n in t1) and sum("w4a8" in t1[n] for n in t1) >= 2


def test_two_process_eval_clips_equal_single_process(single, two_procs):
    import numpy as np

    e1, e2 = single[1]["eval"], two_procs["result"]["eval"]
    assert len(e1["waves"]) == len(e2["waves"]) == EVAL_CLIPS
    assert all(np.array_equal(a, b) for a, b in zip(e1["waves"], e2["waves"]))
    assert np.array_equal(e1["trajectory"], e2["trajectory"]) and e1["timesteps"] == e2["timesteps"]
    # Embedded where generated (each rank its chunks): the same FD rows as one process.
    (b1, _), (b2, _) = e1["embedded"], e2["embedded"]
    assert len(b1) == len(b2) == EVAL_CLIPS and all(np.array_equal(x, y) for x, y in zip(b1, b2))


def test_split_is_round_robin_and_covers_every_unit():
    from adm_export.distributed import split

    parts = [split(10, r, 3) for r in range(3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert sorted(i for p in parts for i in p) == list(range(10))


def test_stale_shards_of_another_config_are_not_reused(tmp_path):
    from adm_export import distributed as dist

    with dist.shard_area(tmp_path / "out"):
        a = dist.ShardStore.open("stage", {"steps": 3})
        a.save("u", {"v": 1})
        b = dist.ShardStore.open("stage", {"steps": 4})
        assert a.folder != b.folder and not b.has("u") and a.load("u") == {"v": 1}
        assert dist.run_units(b, ["u"], lambda i: {"v": 2}, "t")["computed"] == 1


@pytest.mark.parametrize("args, message", [
    (["--nproc", "0"], "invalid --nproc 0"),
    (["--nproc", "-2"], "invalid --nproc -2"),
    (["--nproc", "2", "--device", "cuda"], "--nproc 2 needs 2 GPUs"),
])
def test_bad_nproc_is_a_one_line_error(args, message, tmp_path):
    from click.testing import CliRunner

    from adm_export.cli import cli
    from tests.helpers import one_error_line

    r = CliRunner().invoke(cli, ["calibrate", "--out", str(tmp_path / "c"), *args])
    assert r.exit_code == 1
    assert message in r.output
    one_error_line(r)


def test_nproc_relaunch_command_drops_the_option():
    from adm_export.distributed import strip_nproc, torchrun_command

    args = strip_nproc(["-q", "build", "--nproc", "4", "--out", "x", "--nproc=2"])
    assert args == ["-q", "build", "--out", "x"]
    cmd = torchrun_command(4, args)
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "-m"]
    assert cmd[6:] == ["adm_export", *args]


@pytest.fixture(scope="module")
def cli_build(tmp_path_factory):
    """``adm-export build --nproc 2`` (torchrun relaunch, 2 gloo processes, 1 thread each)."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("cli") / "build"
    env = dict(os.environ, OMP_NUM_THREADS="1", ADM_EXPORT_NO_PROGRESS="1")
    r = subprocess.run([sys.executable, "-m", "adm_export", "--quiet", "build", "--out", str(out), "--nproc", "2",
                        *BUILD_ARGS], env=env, capture_output=True, text=True, timeout=600)
    return out, r


def test_cli_build_with_two_processes_equals_single_process(single, cli_build):
    import json

    out, r = cli_build
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("quality gate:") == 1, r.stdout  # rank 0 prints the summary, once
    report = json.loads((out / "report.json").read_text())
    assert report["eval"]["num_clips"] == EVAL_CLIPS and report["eval"]["gate"]["passed"] is not None
    # The cache and the baseline clips are the single-process ones, byte for byte.
    assert (out / "calibration" / "points.safetensors").read_bytes() == \
        (single[0] / "cal" / "points.safetensors").read_bytes()
    for i in range(EVAL_CLIPS):
        name = f"{i:04d}.wav"
        assert (out / "eval" / "baseline" / name).read_bytes() == (single[0] / "baseline" / name).read_bytes(), name
    assert not (out.parent / ".build.shards").exists()


def test_nproc_user_error_is_one_line_and_exit_1(tmp_path):
    """Under --nproc every rank refuses a non-empty --out before any work: one line, exit 1, no hang."""
    import subprocess
    import sys

    out = tmp_path / "cal"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = subprocess.run([sys.executable, "-m", "adm_export", "calibrate", "--out", str(out), "--nproc", "2"],
                       env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    errors = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "--force" in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert (out / "keep.txt").read_text() == "mine"
