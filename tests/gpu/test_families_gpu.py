"""Every family's small model on CUDA: a quick ``build --device cuda`` and ``generate --device cuda``.

AudioLDM, AudioLDM2, TANGO and Make-An-Audio (random-weight tiny models); the trained reference
model is built on CUDA the same way, and generated and evaluated from, in ``test_matrix_gpu.py``
(its INT8 build). Each build runs every stage on the GPU with small settings; the engine must be the CUDA engine stage's (``fusions`` in
``engines/onnxruntime/layers.json``; the counts are recorded, not required to be non-zero: the
optimizer's patterns need not all match every family's graph). About 50 s per model on an H200.
"""

from __future__ import annotations

import pytest

from tests.gpu.conftest import DEVICE, cli, fusions, read_json, wavs

MODELS = ["tiny-audioldm", "tiny-audioldm2", "tiny-tango", "tiny-make-an-audio"]
QUICK = ["--num-prompts", 2, "--steps", 3, "--points", 4, "--seconds", 1.28, "--num-clips", 4, "--eval-steps", 3,
         "--eval-seconds", 1.28, "--max-fd-increase", 1000, "--max-drift", 1000]


@pytest.mark.parametrize("model", MODELS)
def test_family_builds_and_generates_on_cuda(model, gpu_workdir, record_property):
    out = gpu_workdir / f"family-{model}"
    cli("build", "--model", model, "--device", DEVICE, "--out", out / "build", "--force", *QUICK)
    report = read_json(out / "build" / "report.json")
    assert report["device"] == DEVICE and report["parity"]["passed"] is True, report["parity"]
    record_property("stage_seconds", {k: v["seconds"] for k, v in report["stages"].items()})
    record_property("fusions", fusions(out / "build" / "engines"))
    assert report["eval"]["fd_quantized_vs_baseline"] is not None
    cli("generate", "--engine", out / "build" / "engines", "--device", DEVICE, "-p", "a dog barks", "-p",
        "rain on a tin roof", "--seconds", 1.28, "--steps", 3, "--out", out / "clips", "--force")
    wavs(out / "clips", 2, 1.28, read_json(out / "clips" / "generate.json")["sampling_rate"])
