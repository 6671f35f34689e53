"""The privacy report: the privacy.json contract, merging per-round records, the plot, the
``privacy-report`` command, and configs/dp.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from medstylegan2.cli import main
from medstylegan2.config import load_config, read_config_mapping
from medstylegan2.errors import UserError
from medstylegan2.privacy.engine import DPEngine
from medstylegan2.privacy_report import (RECORD_KEYS, build_report, records_from_metrics, update_privacy_report,
                                         write_privacy_report)

REPO = Path(__file__).resolve().parents[1]


def record(round_num: int, epsilon: float, steps: int, delta: float = 1e-3) -> dict:
    return {"round": round_num, "epsilon": epsilon, "delta": delta, "sample_rate": 0.1, "steps": steps,
            "noise_multiplier": 1.2, "max_grad_norm": 1.0}


def assert_contract(report: dict) -> None:
    assert set(report) == {"delta", "accountant", "sites"}
    assert report["accountant"] in ("rdp", "prv")
    assert isinstance(report["delta"], float)
    for site, rows in report["sites"].items():
        assert isinstance(site, str)
        assert [r["round"] for r in rows] == sorted({r["round"] for r in rows})
        for row in rows:
            assert tuple(row)[:len(RECORD_KEYS)] == RECORD_KEYS and set(row) - set(RECORD_KEYS) <= {"lifetime_epsilon"}
            assert isinstance(row["round"], int) and isinstance(row["steps"], int)
            assert all(isinstance(row[k], float) for k in RECORD_KEYS if k not in ("round", "steps"))


def test_privacy_json_follows_the_contract_and_the_plot_is_written(tmp_path, capsys):
    records = {"0": [record(1, 1.0, 50), record(2, 1.6, 100)], "1": [record(1, 1.1, 50, delta=2e-3)]}
    report = write_privacy_report(tmp_path, records, None, "rdp", budget=3.0)
    on_disk = json.loads((tmp_path / "privacy.json").read_text())
    assert on_disk == report
    assert_contract(on_disk)
    assert on_disk["delta"] == 2e-3  # per-site default policy: the weakest site's delta
    assert on_disk["sites"]["0"] == records["0"]
    png = (tmp_path / "privacy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    table = capsys.readouterr().out
    assert "| 0 | 2 | 2 | 1.6 |" in table and "budget left" in table


def test_repeated_rounds_replace_and_rounds_without_new_steps_are_dropped():
    rows = [record(1, 1.0, 50), record(2, 1.5, 100), record(2, 1.6, 100), record(3, 1.6, 100)]
    report = build_report({"a": rows}, 1e-4, "prv")
    assert [r["round"] for r in report["sites"]["a"]] == [1, 2]  # round 3 declined: no entry
    assert report["sites"]["a"][1]["epsilon"] == 1.6
    assert report["delta"] == 1e-4
    with pytest.raises(ValueError, match="lacks epsilon"):
        build_report({"a": [{"round": 1}]}, None, "rdp")


def test_update_merges_engine_records_round_by_round(tmp_path):
    engine = DPEngine(num_examples=200, batch_size=10, max_grad_norm=1.0, noise_multiplier=1.0, seed=0)
    for round_num in (1, 2, 3):
        for _ in range(20):
            engine.accountant.step(noise_multiplier=1.0, sample_rate=engine.sample_rate)
        for site in ("hospital-a", "hospital-b"):
            update_privacy_report(tmp_path, site, engine.round_record(round_num), delta=None, accountant="rdp",
                                  budget=10.0)
    report = json.loads((tmp_path / "privacy.json").read_text())
    assert_contract(report)
    rows = report["sites"]["hospital-a"]
    assert [r["steps"] for r in rows] == [20, 40, 60]
    assert rows[-1]["epsilon"] == pytest.approx(engine.epsilon())
    assert report["delta"] == pytest.approx(1 / 2000)


def test_cli_prints_the_table_and_rerenders(tmp_path, capsys):
    write_privacy_report(tmp_path, {"0": [record(1, 0.8, 50), record(2, 1.2, 100)], "1": [record(1, 0.9, 50)]},
                         1e-3, "rdp", echo=False)
    (tmp_path / "privacy.png").unlink()
    assert main(["privacy-report", str(tmp_path), "--budget", "2"]) == 0
    out = capsys.readouterr().out
    assert "| site | round | rounds trained | epsilon |" in out
    assert "| 0 | 2 | 2 | 1.2 |" in out and "| 1 | 1 | 1 | 0.9 |" in out
    assert "budget left (of 2)" in out
    assert (tmp_path / "privacy.png").is_file()


@pytest.mark.parametrize("prefix", ["dp_", "dp-"])  # dp-: runs written before keys were snake_case
def test_cli_rebuilds_the_report_from_metrics_jsonl(tmp_path, capsys, prefix):
    def site(eps: float, steps: int, status: str = "ok") -> dict:
        figures = {"epsilon": eps, "delta": 1e-3, "sample_rate": 0.1, "steps": steps, "noise_multiplier": 1.2,
                   "max_grad_norm": 1.0}
        return {"status": status, **{prefix + k: v for k, v in figures.items()}}

    lines = [json.dumps({"round": 1, "sites": {"0": site(1.0, 50), "1": site(1.1, 50)}}),
             json.dumps({"round": 2, "sites": {"0": site(1.5, 100), "1": site(1.1, 50, "declined")}})]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert records_from_metrics(lines)["1"] == [{"round": 1, "epsilon": 1.1, "delta": 1e-3, "sample_rate": 0.1,
                                                 "steps": 50, "noise_multiplier": 1.2, "max_grad_norm": 1.0}]
    assert main(["privacy-report", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "privacy.json").read_text())
    assert_contract(report)
    assert [r["round"] for r in report["sites"]["0"]] == [1, 2]
    assert "| 0 | 2 | 2 | 1.5 |" in capsys.readouterr().out


def test_cli_reports_a_missing_run_folder_without_a_traceback(tmp_path, capsys):
    assert main(["privacy-report", str(tmp_path / "nope")]) == 2
    assert "run folder not found" in capsys.readouterr().err
    assert main(["privacy-report", str(tmp_path)]) == 2
    assert "neither privacy.json nor metrics.jsonl" in capsys.readouterr().err


def test_dp_config_is_a_private_three_site_phantom_run_at_64_px_that_its_sites_policy_accepts(monkeypatch,
                                                                                               tmp_path):
    from medstylegan2.privacy.policy import load_policy, write_site_policies
    from medstylegan2.privacy.request import check_request, request_from_run_config

    monkeypatch.chdir(REPO)  # relative paths in configs are from the working folder
    cfg = load_config(REPO / "configs" / "dp.yaml")
    assert cfg.privacy.enabled and cfg.model.mbstd_group_size == 0
    assert cfg.model.resolution == 64 and cfg.federation.sites == 3 and cfg.data.source == "phantoms"
    assert cfg.privacy.target_epsilon is not None and cfg.privacy.budget_epsilon is not None
    assert cfg.privacy.noise_seed is None  # real runs draw their noise from OS entropy
    assert cfg.privacy.delta is not None and cfg.privacy.delta <= 1e-5
    # A study-sized site: 2,000 training images each (docs/recipe.md).
    per_site = 3 * cfg.data.phantoms_per_class * (1 - cfg.data.heldout_fraction) / cfg.federation.sites
    assert per_site == pytest.approx(2000)
    # The policy file each simulated site takes as its own (with its own ledger folder).
    paths = write_site_policies(tmp_path, {"site-0": int(per_site)}, ledger_root=tmp_path / "ledgers",
                                policy_file=cfg.privacy.policy)
    policy = load_policy(paths["site-0"])
    assert policy.dp_required and policy.delta <= 1e-5 and policy.nominal_size == 2000
    assert policy.min_site_size <= per_site and policy.ledger_dir == str(tmp_path / "ledgers" / "site-0")
    # What the run asks for, the policy allows.
    decision = check_request(policy, request_from_run_config(cfg))
    assert decision.ok, decision.reason
    assert decision.settings.sample_rate == cfg.train.batch_size / 2000
    raw = read_config_mapping(REPO / "configs" / "dp.yaml")  # with its base: merged in
    default = REPO / "configs" / "default.yaml"
    base = read_config_mapping(default)
    assert set(base["federation"]) == set(raw["federation"])
    assert {k: v for k, v in raw.items() if k not in ("name", "privacy", "model", "train", "data")} == \
        {k: v for k, v in base.items() if k not in ("name", "model", "train", "data")}
    # ... and says so: the file itself states only what differs.
    own = yaml.safe_load((REPO / "configs" / "dp.yaml").read_text())
    assert own["base"] == "default.yaml" and set(own) <= {"base", "name", "privacy", "model", "train", "data"}


def test_cli_normalizes_a_privacy_json_that_lacks_the_top_level_keys(tmp_path):
    rows = [{**record(1, 1.0, 50), "steps": 50.0}, {**record(2, 1.4, 100), "steps": 100.0},
            {**record(3, 1.4, 100), "steps": 100.0}]  # round 3: declined, no new steps
    (tmp_path / "privacy.json").write_text(json.dumps({"sites": {"site-0": rows}, "epsilon": {"site-0": 1.4}}))
    assert main(["privacy-report", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "privacy.json").read_text())
    assert_contract(report)
    assert [r["round"] for r in report["sites"]["site-0"]] == [1, 2]
    assert report["accountant"] == "rdp" and report["delta"] == 1e-3


# -- issue 10: infinite epsilon, steps going backwards, the lifetime ledger ---------------------------


def test_infinite_epsilon_survives_privacy_json_and_a_rebuild_from_metrics_jsonl(tmp_path, capsys):
    write_privacy_report(tmp_path, {"0": [record(1, float("inf"), 50)]}, 1e-5, "rdp", echo=False)
    text = (tmp_path / "privacy.json").read_text()
    assert "Infinity" not in text and "null" not in text and "1e999" in text
    assert json.loads(text)["sites"]["0"][0]["epsilon"] == float("inf")
    # The server's metrics.jsonl writes inf as null; a rebuilt report keeps the row, as infinity.
    line = json.dumps({"round": 1, "sites": {"0": {"status": "ok", "dp-epsilon": None, "dp-delta": 1e-5,
                                                   "dp-sample_rate": 0.1, "dp-steps": 50,
                                                   "dp-noise_multiplier": 0.0, "dp-max_grad_norm": 1.0}}})
    rebuilt = tmp_path / "rebuilt"
    rebuilt.mkdir()
    (rebuilt / "metrics.jsonl").write_text(line + "\n")
    assert main(["privacy-report", str(rebuilt)]) == 0
    assert json.loads((rebuilt / "privacy.json").read_text())["sites"]["0"][0]["epsilon"] == float("inf")
    assert "| 0 | 1 | 1 | inf |" in capsys.readouterr().out


def test_steps_that_go_backwards_fail_loudly_instead_of_being_dropped(tmp_path, capsys):
    rows = [record(1, 1.0, 50), record(2, 1.5, 100), record(3, 1.0, 50)]  # round 3: a reset accountant
    with pytest.raises(UserError, match=r"site a: cumulative DP steps went backwards from 100 \(round 2\) to 50"):
        build_report({"a": rows}, 1e-5, "rdp")
    (tmp_path / "privacy.json").write_text(json.dumps({"delta": 1e-5, "accountant": "rdp", "sites": {"a": rows}}))
    assert main(["privacy-report", str(tmp_path)]) == 2
    assert "went backwards" in capsys.readouterr().err


def test_the_ledger_table_shows_per_run_and_lifetime_epsilon_and_a_rewind_fails(tmp_path, capsys):
    from opacus.accountants import create_accountant

    from medstylegan2.privacy.ledger import LEDGER_FILE, PrivacyLedger, Release

    ledger = PrivacyLedger(tmp_path / "ledger", "f" * 64)
    for run, round_num in (("run-a", 1), ("run-a", 2), ("run-b", 1)):
        ledger.record_release(Release(run=run, round=round_num, noise_multiplier=1.0, sample_rate=0.02, steps=50,
                                      accountant="rdp", unit="image", max_grad_norm=0.25, delta=1e-5))
    accountant = create_accountant(mechanism="rdp")
    accountant.history = [(1.0, 0.02, 50)] * 3
    lifetime = accountant.get_epsilon(delta=1e-5)
    assert main(["privacy-report", "--ledger", str(tmp_path / "ledger")]) == 0
    out = capsys.readouterr().out
    assert "| run-a | 2 (0) | 1,2 | 100 (0) |" in out and "| run-b | 1 (0) | 1 | 50 (0) |" in out
    assert f"| **lifetime** | 3 (0) | | 150 (0) | {lifetime:.4g} |" in out
    path = tmp_path / "ledger" / LEDGER_FILE
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:2]))  # an older copy
    assert main(["privacy-report", "--ledger", str(tmp_path / "ledger")]) == 2
    assert "steps went backwards" in capsys.readouterr().err
    assert main(["privacy-report"]) == 2
    assert "give a RUN_DIR, a --ledger DIR, or both" in capsys.readouterr().err
