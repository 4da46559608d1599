"""The GPU suite's result file (tests/gpu/report.py): outcomes, seconds, properties, commit fallback, merge."""

from __future__ import annotations

import json
import types

from tests.gpu import report as gr


def _quick(monkeypatch):
    """No git, no nvidia-smi (a copy of the tree on a bare machine), no heavy imports for versions."""
    monkeypatch.setattr(gr, "_run", lambda cmd: None)
    monkeypatch.setattr(gr, "versions", lambda: {"python": "3"})
    monkeypatch.setattr(gr, "card", lambda: {"cuda_available": False})


def _report(nodeid, when, outcome="passed", duration=1.0, props=(), longrepr=None, text=""):
    return types.SimpleNamespace(nodeid=nodeid, when=when, duration=duration, user_properties=list(props),
                                 skipped=outcome == "skipped", failed=outcome == "failed", longrepr=longrepr,
                                 longreprtext=text)


def test_report_records_every_outcome_and_is_written_after_each_test(tmp_path, monkeypatch):
    _quick(monkeypatch)
    monkeypatch.setenv("ADM_COMMIT", "abc123")
    plugin = gr.GpuReport(tmp_path / "suite.json")
    plugin.pytest_runtest_logreport(_report("t::ok", "setup", duration=0.5))
    plugin.pytest_runtest_logreport(_report("t::ok", "call", duration=2.0, props=[("stage_seconds", {"export": 3})]))
    plugin.pytest_runtest_logreport(_report("t::ok", "teardown", duration=0.1))
    written = json.loads((tmp_path / "suite.json").read_text())  # already there after the first test
    assert written["tests"][0]["outcome"] == "passed" and written["exitstatus"] is None
    plugin.pytest_runtest_logreport(_report("t::bad", "call", "failed", text="x\nE   AssertionError: 3 > 2\nmore"))
    plugin.pytest_runtest_logreport(_report("t::broken", "setup", "failed", text="E   RuntimeError: no model"))
    plugin.pytest_runtest_logreport(_report("t::gpu", "setup", "skipped", longrepr=("f", 1, "Skipped: needs a GPU")))
    plugin.pytest_sessionfinish(None, 1)
    result = json.loads((tmp_path / "suite.json").read_text())
    tests = {t["test"]: t for t in result["tests"]}
    assert tests["t::ok"]["seconds"] == 2.6 and tests["t::ok"]["properties"] == {"stage_seconds": {"export": 3}}
    assert tests["t::bad"]["outcome"] == "failed" and "AssertionError: 3 > 2" in tests["t::bad"]["message"]
    assert tests["t::broken"]["outcome"] == "error"  # failed outside the test body
    assert tests["t::gpu"]["outcome"] == "skipped" and tests["t::gpu"]["message"] == "needs a GPU"
    assert result["counts"] == {"passed": 1, "failed": 1, "error": 1, "skipped": 1}
    assert result["code"] == {"commit": "abc123", "source": "ADM_COMMIT"} and result["exitstatus"] == 1
    md = (tmp_path / "suite.md").read_text()
    assert "abc123" in md and "| `t::bad` | failed |" in md and "stage_seconds" in md


def test_merge_combines_parts(tmp_path, monkeypatch):
    _quick(monkeypatch)
    for name, outcome in (("a", "passed"), ("b", "failed")):
        plugin = gr.GpuReport(tmp_path / name)
        plugin.pytest_runtest_logreport(_report(f"{name}::t", "call", outcome, text="E  boom"))
        plugin.pytest_sessionfinish(None, 0)
    assert gr.main(["merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "all")]) == 0
    merged = json.loads((tmp_path / "all.json").read_text())
    assert [t["test"] for t in merged["tests"]] == ["a::t", "b::t"]
    assert merged["counts"] == {"passed": 1, "failed": 1} and len(merged["parts"]) == 2
    assert "parts: a.json" in (tmp_path / "all.md").read_text()
