"""The site, not the server, decides its privacy (issue 10), through the real ClientApp and strategy.

Each site has its own policy file (node config ``privacy-policy``) and lifetime ledger. The server's
run config only asks: a request for less privacy is refused with a reason the server logs as a
failed site; a round past the lifetime budget is declined and leaves the ledger alone; epsilon
comes from Opacus' accountant over everything the ledger says the site released, so a lost local
state or a new run keeps counting; a tampered ledger stops the site; and a site killed between
training and recording the release sends nothing (the reply is built only after the fsync).
Noise comes from OS entropy everywhere here: no test sets a noise seed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from opacus.accountants import create_accountant

from medstylegan2.cli import main
from medstylegan2.config import load_config
from medstylegan2.fl.partition import simulation_partitions
from medstylegan2.fl.wire import flatten_weights, initial_weights, transferred
from medstylegan2.privacy.ledger import HEAD_FILE, LEDGER_FILE, PrivacyLedger
from medstylegan2.privacy.policy import write_site_policies
from medstylegan2.runfolder import read_checkpoint
from server.loopback import LoopbackGrid
from server.strategy import run_federation

REPO = Path(__file__).resolve().parents[1]
SIGMA, CLIP, DELTA = 1.0, 1.0, 1e-5
DP = ["federation.rounds=1", "model.mbstd_group_size=0", "privacy.enabled=true", f"privacy.noise_multiplier={SIGMA}",
      f"privacy.max_grad_norm={CLIP}"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def smoke(*overrides: str):
    return load_config(REPO / "configs" / "smoke.yaml", list(overrides))


def site_policies(tmp_path: Path, cfg, *, lifetime: float = 50.0, **changes) -> list[dict]:
    """Two simulated sites, each with its own policy file and ledger folder; their node configs."""
    policy = {"dp_required": True, "delta": DELTA, "max_grad_norm": CLIP, "min_noise_multiplier": SIGMA,
              "lifetime_epsilon": lifetime, "ledger_dir": str(tmp_path / "ledgers"), **changes}
    base = tmp_path / "hospital-policy.yaml"
    base.write_text(yaml.safe_dump(policy))
    _, parts = simulation_partitions(cfg, 2)
    paths = write_site_policies(tmp_path / "policies", {f"site-{i}": len(p) for i, p in enumerate(parts)},
                                ledger_root=tmp_path / "unused", policy_file=base)
    return [{"partition-id": i, "num-partitions": 2, "privacy-policy": str(paths[f"site-{i}"])} for i in range(2)]


def run(cfg, nodes, run_dir: Path, state_dir: Path):
    from client.client_app import app

    grid = LoopbackGrid(app, nodes)
    run_federation(grid, cfg, run_dir, site_state_dir=str(state_dir), server_data=False)
    return grid


def round_line(run_dir: Path, round_num: int = 1) -> dict:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(line for line in lines if line.get("kind") == "round" and line["round"] == round_num)


def ledger_of(tmp_path: Path, site: str) -> Path:
    return tmp_path / "ledgers" / site


def opacus_epsilon(history: list[tuple[float, float, int]]) -> float:
    accountant = create_accountant(mechanism="rdp")
    accountant.history = history
    return float(accountant.get_epsilon(delta=DELTA))


# ----------------------------------------------------------------------------------------------
# A request for less privacy is refused, and nothing trains


@pytest.mark.parametrize("overrides, words", [
    (["privacy.enabled=false"], "requires differential privacy"),
    (["privacy.noise_multiplier=0.5"], "below this site's floor"),
    (["privacy.noise_multiplier=0.0"], "gives no privacy"),
    (["privacy.noise_seed=7"], "noise seed"),
    (["privacy.delta=0.001"], "above this site's delta"),
    (["privacy.max_grad_norm=4.0"], "clips at max_grad_norm 1"),
    (["privacy.noise_multiplier=null", "privacy.target_epsilon=1000"], "above this site's epsilon per run"),
])
def test_a_request_for_less_privacy_is_refused_with_a_reason_and_no_image_is_read(tmp_path, monkeypatch,
                                                                                 overrides, words):
    import medstylegan2.fl.site_round as site_round

    def no_training(*args, **kwargs):
        raise AssertionError("a refused round must not build a trainer")

    monkeypatch.setattr(site_round, "SiteTrainer", no_training)
    cfg = smoke(*DP, *overrides)
    nodes = site_policies(tmp_path, smoke(*DP), epsilon_per_run=20.0)
    run(cfg, nodes, tmp_path / "run", tmp_path / "state")  # a refusal is a failed site, not a crash
    sites = round_line(tmp_path / "run")["sites"]
    for site in ("site-0", "site-1"):
        status = sites[site]["status"]
        assert status.startswith("error: refused by the site's privacy policy: ") and words in status, status
        assert not ledger_of(tmp_path, site).exists() or not (ledger_of(tmp_path, site) / LEDGER_FILE).exists()
    # No update was taken: the global weights are the initial ones.
    start = transferred(initial_weights(cfg)[0])
    state = read_checkpoint(tmp_path / "run" / "round_001.pt")
    after = transferred(flatten_weights({name: state[name] for name in ("G", "G_ema", "D")}))
    assert all(torch.equal(start[k], after[k]) for k in start)


def test_a_site_without_a_policy_refuses_dp_and_one_that_requires_dp_reports_its_nominal_size(tmp_path):
    cfg = smoke(*DP)
    run(cfg, [{"partition-id": i, "num-partitions": 2} for i in range(2)], tmp_path / "bare", tmp_path / "s1")
    assert all("has no privacy policy" in s["status"] for s in round_line(tmp_path / "bare")["sites"].values())

    nodes = site_policies(tmp_path, cfg, nominal_size=500)
    run(cfg, nodes, tmp_path / "run", tmp_path / "s2")
    state = read_checkpoint(tmp_path / "run" / "round_001.pt")
    assert state["federation"]["sites"] == {"site-0": 500, "site-1": 500}  # roll call: the public size
    for entry in round_line(tmp_path / "run")["sites"].values():
        assert entry["status"] == "ok" and entry["num_examples"] == 500
        # Under DP nothing in the reply depends on n, on timing or on a noiseless real-data loss.
        assert not {"seconds", "images_per_second", "real_images_seen", "loss_d_real", "loss_r1"} & set(entry)


# ----------------------------------------------------------------------------------------------
# The lifetime ledger: budget, restarts, tampering


def test_a_round_past_the_lifetime_budget_is_declined_and_leaves_the_ledger_as_it_was(tmp_path):
    cfg = smoke(*DP, "federation.rounds=3")
    nodes = site_policies(tmp_path, cfg, lifetime=8.0)  # one round ~7, two ~10
    run(cfg, nodes, tmp_path / "run", tmp_path / "state")
    assert {s["status"] for s in round_line(tmp_path / "run", 2)["sites"].values()} == {"declined"}
    for site in ("site-0", "site-1"):
        ledger = PrivacyLedger(ledger_of(tmp_path, site), None)
        assert [e["round"] for e in ledger.entries()] == [1]
        assert json.loads((ledger_of(tmp_path, site) / HEAD_FILE).read_text())["count"] == 1
    # A new run on the same data sets: still past the budget, still nothing recorded.
    before = {s: (ledger_of(tmp_path, s) / LEDGER_FILE).read_bytes() for s in ("site-0", "site-1")}
    run(smoke(*DP), nodes, tmp_path / "again", tmp_path / "state-2")
    assert {s["status"] for s in round_line(tmp_path / "again")["sites"].values()} == {"declined"}
    assert before == {s: (ledger_of(tmp_path, s) / LEDGER_FILE).read_bytes() for s in ("site-0", "site-1")}


def test_epsilon_continues_from_the_ledger_after_local_state_is_deleted_and_a_new_run_starts(tmp_path):
    cfg = smoke(*DP)
    nodes = site_policies(tmp_path, cfg)
    run(cfg, nodes, tmp_path / "first", tmp_path / "state")
    first = round_line(tmp_path / "first")["sites"]
    shutil.rmtree(tmp_path / "state")   # the sites lose every local state, and
    shutil.rmtree(tmp_path / "first")   # the server starts a new run with a new run token
    run(cfg, nodes, tmp_path / "second", tmp_path / "state")
    second = round_line(tmp_path / "second")["sites"]
    for site in ("site-0", "site-1"):
        q = first[site]["dp_sample_rate"]
        assert first[site]["dp_epsilon"] == pytest.approx(opacus_epsilon([(SIGMA, q, 3)]), abs=1e-6)
        # This run's epsilon is one round's; the lifetime epsilon composes both runs' releases.
        assert second[site]["dp_epsilon"] == pytest.approx(first[site]["dp_epsilon"], abs=1e-9)
        assert second[site]["dp_lifetime_epsilon"] == pytest.approx(opacus_epsilon([(SIGMA, q, 3)] * 2), abs=1e-6)
        assert second[site]["dp_steps"] == 3 and second[site]["dp_delta"] == DELTA
        entries = PrivacyLedger(ledger_of(tmp_path, site), None).entries()
        assert len(entries) == 2 and entries[0]["run"] != entries[1]["run"]
    # privacy-report --ledger reads the same lifetime figure.
    assert main(["privacy-report", "--ledger", str(ledger_of(tmp_path, "site-0"))]) == 0
    report = json.loads((tmp_path / "second" / "privacy.json").read_text())
    row = report["sites"]["site-0"][0]
    assert row["lifetime_epsilon"] == pytest.approx(second["site-0"]["dp_lifetime_epsilon"], rel=1e-9)
    assert row["epsilon"] == pytest.approx(second["site-0"]["dp_epsilon"], rel=1e-9)


def test_a_tampered_ledger_stops_the_site_with_an_error_naming_it(tmp_path, capsys):
    cfg = smoke(*DP)
    nodes = site_policies(tmp_path, cfg)
    run(cfg, nodes, tmp_path / "first", tmp_path / "state")
    path = ledger_of(tmp_path, "site-0") / LEDGER_FILE
    entry = json.loads(path.read_text())
    entry["noise_multiplier"] = 50.0  # "we spent far less than we did"
    path.write_text(json.dumps(entry) + "\n")
    tampered = path.read_bytes()
    run(cfg, nodes, tmp_path / "second", tmp_path / "state-2")
    sites = round_line(tmp_path / "second")["sites"]
    status = sites["site-0"]["status"]
    assert status.startswith("error: LedgerError") and "hash chain is broken" in status
    assert str(path) in sites["site-0"]["status"]
    assert sites["site-1"]["status"] == "ok"
    assert path.read_bytes() == tampered  # nothing appended to a ledger that does not verify
    assert main(["privacy-report", "--ledger", str(path.parent)]) == 2
    assert "hash chain is broken" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Killed between training and the ledger record: nothing leaves unrecorded

SITE_SCRIPT = """
import json, sys
import numpy as np
from medstylegan2.config import load_config
from medstylegan2.fl.site_round import run_site_round
from medstylegan2.fl.wire import encode_for_transfer, initial_weights, transferred
from medstylegan2.phantoms import generate_phantoms
from medstylegan2.privacy.request import request_from_run_config
from medstylegan2.privacy.site import SitePrivacy

policy, round_num, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cfg = load_config("configs/smoke.yaml", json.loads(sys.argv[4]))
data = generate_phantoms(5, cfg.model.resolution, seed=3)
received = encode_for_transfer(transferred(initial_weights(cfg)[0]), "float32")
site = SitePrivacy.of_node({"privacy-policy": policy}, "hospital")
with site.round(request_from_run_config(cfg), data.images, data.labels, run="run-1", round_num=round_num) as privacy:
    result = run_site_round(cfg, data.images, data.labels, received, round_num=round_num, site="hospital",
                            privacy=privacy)
# The reply leaves the site (here: is written) only after run_site_round returned.
with open(out, "w") as fh:
    json.dump(result.metrics, fh)
"""


def test_a_site_killed_between_training_and_the_ledger_record_released_nothing_unrecorded(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({"dp_required": True, "delta": DELTA, "max_grad_norm": CLIP,
                                      "min_noise_multiplier": SIGMA, "lifetime_epsilon": 100.0, "nominal_size": 15,
                                      "ledger_dir": str(tmp_path / "ledger")}))
    overrides = json.dumps([o for o in DP if not o.startswith("federation.rounds")] + ["federation.local_steps=2"])
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def site_round(round_num: int, fault: str = "") -> tuple[int, Path]:
        reply = tmp_path / f"reply-{round_num}-{fault or 'none'}.json"
        result = subprocess.run([sys.executable, "-c", SITE_SCRIPT, str(policy), str(round_num), str(reply), overrides],
                                cwd=REPO, env={**env, "MEDSTYLEGAN2_FAULT": fault}, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode in (0, -signal.SIGKILL), result.stderr[-3000:]
        return result.returncode, reply

    def recorded() -> int:
        ledger = tmp_path / "ledger"
        return len(PrivacyLedger(ledger, None).entries()) if (ledger / LEDGER_FILE).exists() else 0

    code, reply = site_round(1, "site_trained:1:kill")      # trained, killed before the record
    assert code == -signal.SIGKILL and not reply.exists() and recorded() == 0
    code, reply = site_round(1)                              # restarted: the round again, recorded, replied
    assert code == 0 and reply.exists() and recorded() == 1
    code, reply = site_round(2, "site_recorded:2:kill")     # recorded, killed before the reply
    assert code == -signal.SIGKILL and not reply.exists() and recorded() == 2  # counted, though never sent: safe
    code, reply = site_round(3)
    metrics = json.loads(reply.read_text())
    assert recorded() == 3 and metrics["dp_steps"] == 6  # every release, the unsent one too
    assert metrics["dp_epsilon"] == pytest.approx(opacus_epsilon([(SIGMA, 8 / 15, 2)] * 3), abs=1e-6)
    assert metrics["dp_lifetime_epsilon"] == metrics["dp_epsilon"]  # one run token here
