"""Shared fixtures: one small end-to-end build of the embedded model, made once per test session."""

from __future__ import annotations

import json
import os
import warnings

import pytest

os.environ.setdefault("ADM_EXPORT_NO_PROGRESS", "1")
warnings.filterwarnings("ignore", message=".*not tested with current version of modelopt.*")

# Small but complete: every stage runs, on 1.28 s of audio (32 latent frames), in well under a minute.
TINY_ARGS = [
    "--model", "tiny-audioldm", "--num-prompts", "4", "--steps", "4", "--points", "8", "--seconds", "1.28",
    "--num-clips", "4", "--eval-steps", "4", "--eval-seconds", "1.28",
]


def pytest_addoption(parser):
    # Here (not in tests/gpu/conftest.py) so the option exists for every `pytest tests...` call.
    parser.addoption("--gpu-report", metavar="PATH", default=None,
                     help="Write the run's result (card, commit, versions, outcome and seconds per test) to "
                          "PATH.json and PATH.md (tests/gpu/report.py).")


def pytest_configure(config):
    path = config.getoption("--gpu-report")
    if path:
        from tests.gpu.report import GpuReport

        config.pluginmanager.register(GpuReport(path), "adm-gpu-report")


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory):
    """Run ``adm-export build`` on tiny-audioldm through the CLI; returns (out_dir, result, report)."""
    from click.testing import CliRunner

    from adm_export.cli import cli

    out = tmp_path_factory.mktemp("build") / "demo"
    result = CliRunner().invoke(cli, ["--quiet", "build", "--out", str(out), *TINY_ARGS])
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else None
    return out, result, report


@pytest.fixture(scope="session")
def tiny_adapter():
    """The embedded model, loaded once (tests must not modify it)."""
    from adm_export.models import load_model

    return load_model("tiny-audioldm")


@pytest.fixture(autouse=True)
def _default_package_logger():
    """Give every test the ``adm_export`` logger in its default state (no handler, propagating).

    An in-process CLI run (``cli._setup_logging``, also inside session fixtures such as
    :func:`tiny_build`) gives that logger its own handler and ``propagate = False``: right for a
    CLI process, but inside the test session it hid every later record from pytest's ``caplog``
    (which listens on the root logger), so tests asserting on log lines failed whenever a CLI test
    had run before them. Reset after the wider-scoped fixtures are set up and again afterwards.
    """
    import logging

    logger = logging.getLogger("adm_export")

    def reset() -> None:
        logger.handlers[:] = []
        logger.setLevel(logging.NOTSET)
        logger.propagate = True

    reset()
    yield
    reset()
