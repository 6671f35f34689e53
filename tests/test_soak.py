"""Soak: 20 rounds of the smoke simulation (Ray) with a site that fails at random in 30% of its rounds.

Marked slow (about 5-15 minutes on 2 busy cores). The failures are drawn from (round, site) by the
fault point's hash (``medstylegan2.faults``): the same rounds fail on every run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medstylegan2.faults import parse_faults

REPO = Path(__file__).resolve().parents[1]
FAULT = "site_train:*:raise:site=site-1:p=0.3"


@pytest.mark.slow
def test_twenty_rounds_with_a_flaky_site_finish_complete_without_the_server_growing(tmp_path):
    run_dir = tmp_path / "soak"
    result = subprocess.run([sys.executable, "-m", "simulation", "--config", "configs/smoke.yaml", "--rounds", "20",
                             "--out", str(run_dir)], cwd=REPO, capture_output=True, text=True, timeout=3600,
                            env=dict(os.environ, MEDSTYLEGAN2_FAULT=FAULT))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [line for line in lines if line["kind"] == "round"]
    assert [line["round"] for line in rounds] == list(range(1, 21))

    (spec,) = parse_faults(FAULT)
    expected_failures = [r for r in range(1, 21) if spec.matches("site_train", r, "site-1")]
    failed = [line["round"] for line in rounds if line["sites"]["site-1"]["status"].startswith("error")]
    assert failed == expected_failures and 2 <= len(failed) <= 12
    assert all(line["sites"]["site-0"]["status"] == "ok" for line in rounds)
    assert all(line["aggregated"]["sites"] == (1 if line["round"] in failed else 2) for line in rounds)

    rss = {line["round"]: line["server_rss_mb"] for line in rounds}
    growth = rss[20] / rss[5] - 1
    print(f"soak: {len(failed)} failed rounds of site-1 {failed}; server RSS round 5 {rss[5]:.0f} MB, "
          f"round 20 {rss[20]:.0f} MB ({100 * growth:+.1f}%); wall {sum(l['seconds'] for l in rounds):.0f} s in rounds")
    assert abs(growth) <= 0.10, rss
