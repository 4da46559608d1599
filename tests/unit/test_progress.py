"""Progress without a terminal: long loops log a heartbeat line instead of a bar."""

from __future__ import annotations

import logging

from adm_export import progress as prog


def test_heartbeat_logs_position_and_eta_without_a_bar(monkeypatch, caplog):
    monkeypatch.setattr(prog, "HEARTBEAT_SECONDS", 0.0)
    prog.set_progress(False)
    try:
        with caplog.at_level(logging.INFO, logger="adm_export.progress"):
            assert list(prog.progress(range(4), desc="sensitivity int8", unit="item")) == [0, 1, 2, 3]
    finally:
        prog.set_progress(None)
    lines = [r.getMessage() for r in caplog.records]
    assert "sensitivity int8: 1/4 item" in lines[1] and "left" in lines[1]
    assert lines[-1].startswith("sensitivity int8: 3/4 item")


def test_short_loops_stay_quiet(caplog):
    prog.set_progress(False)
    try:
        with caplog.at_level(logging.INFO, logger="adm_export.progress"):
            assert sum(prog.progress(iter(range(100)), desc="x")) == 4950
    finally:
        prog.set_progress(None)
    assert not caplog.records
