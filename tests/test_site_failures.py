"""Sites that fail: a ClientApp that raises (a named fault point in one site's round) costs that site
the round, never the round itself and never a partial average."""

from __future__ import annotations

import pytest
import torch

from medstylegan2.config import load_config
from medstylegan2.faults import ENV_VAR
from medstylegan2.runfolder import RunFolder, read_checkpoint
from server.loopback import LoopbackGrid
from server.strategy import run_federation


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _run(tmp_path, *overrides: str):
    from client.client_app import app

    cfg = load_config("configs/smoke.yaml", ["federation.sites=3", "federation.rounds=2", *overrides])
    grid = LoopbackGrid(app, [{"partition-id": i, "num-partitions": 3} for i in range(3)])
    run_federation(grid, cfg, tmp_path, site_state_dir=str(tmp_path / "site_state"), server_data=False)
    return RunFolder(tmp_path).metrics_records()


def _weights(path):
    state = read_checkpoint(path)
    return {f"{n}/{k}": v for n in ("G", "G_ema", "D") for k, v in state[n].items()}


def test_a_site_that_raises_loses_its_round_and_trains_again_in_the_next(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(ENV_VAR, "site_train:1:raise:site=site-1")
    with caplog.at_level("WARNING"):
        lines = _run(tmp_path, "federation.min_sites=2")
    first, second = lines[0], lines[1]
    assert first["sites"]["site-1"]["status"].startswith("error:") and "injected failure" in \
        first["sites"]["site-1"]["status"]
    assert first["sites"]["site-0"]["status"] == first["sites"]["site-2"]["status"] == "ok"
    assert first["aggregated"]["sites"] == 2
    assert first["aggregated"]["num_examples"] == first["sites"]["site-0"]["num_examples"] + \
        first["sites"]["site-2"]["num_examples"]
    assert "site site-1 failed" in caplog.text
    assert {s["status"] for s in second["sites"].values()} == {"ok"}  # back in round 2


def test_with_fewer_replies_than_min_sites_the_global_model_stays_as_it_was(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(ENV_VAR, "site_train:1:raise:site=site-1")
    with caplog.at_level("WARNING"):
        lines = _run(tmp_path, "federation.min_sites=3", "federation.rounds=1")
    assert lines[0]["aggregated"]["sites"] == 2
    from medstylegan2.fl.wire import initial_weights

    before, _ = initial_weights(load_config("configs/smoke.yaml"))
    after = _weights(tmp_path / "round_001.pt")
    assert all(torch.equal(after[k], before[k]) for k in before)  # no partial average
    assert "fewer than min_sites=3" in caplog.text


def test_a_site_whose_reply_never_arrives_is_a_failed_site_of_that_round(tmp_path, caplog):
    """A site that times out, hangs or disconnects sends nothing: the round closes without it."""
    from client.client_app import app

    cfg = load_config("configs/smoke.yaml", ["federation.sites=3", "federation.rounds=1"])

    def lose_site_1s_training_reply(node_id, reply):
        is_training = reply.has_content() and "arrays" in reply.content.array_records
        return None if node_id == 1001 and is_training else reply

    grid = LoopbackGrid(app, [{"partition-id": i, "num-partitions": 3} for i in range(3)],
                        tamper=lose_site_1s_training_reply)
    with caplog.at_level("WARNING"):
        run_federation(grid, cfg, tmp_path, site_state_dir=str(tmp_path / "site_state"), server_data=False)
    line = RunFolder(tmp_path).metrics_records()[0]
    assert line["sites"]["site-1"]["status"].startswith("error: no reply within federation.round_timeout_s")
    assert line["aggregated"]["sites"] == 2 and "site site-1 failed" in caplog.text
