"""The server's evaluation schedule: metrics.metrics every evaluate_every rounds, metrics.final_metrics at the
end, nothing (and no failure) when both lists are empty. Driven through ``server.loopback.LoopbackGrid``."""

from __future__ import annotations

import json

import pytest

from medstylegan2.config import load_config
from server.loopback import LoopbackGrid
from server.strategy import run_federation


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _run(tmp_path, *overrides: str) -> list[dict]:
    from client.client_app import app

    cfg = load_config("configs/smoke.yaml", ["federation.local_steps=1", *overrides])
    grid = LoopbackGrid(app, [{"partition-id": i, "num-partitions": 2} for i in range(2)])
    run_federation(grid, cfg, tmp_path, site_state_dir=str(tmp_path / "site_state"), server_data=True)
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_final_metrics_are_measured_after_the_last_round_only(tmp_path):
    lines = _run(tmp_path, "federation.rounds=2", "federation.evaluate_every=1", "metrics.metrics=[cas]",
                 "metrics.final_metrics=[utility]", "metrics.classifier_steps=10")
    first, last = (json.loads((tmp_path / "eval" / f"round_00{r}.json").read_text()) for r in (1, 2))
    assert first["metrics_requested"] == ["cas"] and last["metrics_requested"] == ["cas", "utility"]
    assert first["errors"] == {} and last["errors"] == {}
    assert "tstr_relative" not in first["overall"] and isinstance(last["overall"]["tstr_relative"], float)
    rounds = [line for line in lines if line["kind"] == "round"]
    assert [isinstance(line["eval"]["overall"]["cas"], float) for line in rounds] == [True, True]


def test_empty_metric_lists_write_grids_only_and_log_no_evaluation_failure(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        lines = _run(tmp_path, "federation.rounds=1")  # configs/smoke.yaml: metrics: []
    assert "evaluation failed" not in caplog.text
    assert not (tmp_path / "eval").exists()
    (line,) = lines
    assert "eval" not in line and (tmp_path / line["grid"]).is_file()
