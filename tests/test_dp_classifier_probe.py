"""scripts/dp_classifier_probe.py: a classifier trained with Opacus' DP-SGD on one site's share of
the phantoms, scored on the real held-out images, at the epsilon asked for."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_probe():
    spec = importlib.util.spec_from_file_location("dp_classifier_probe", REPO / "scripts" / "dp_classifier_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_probe_spends_the_epsilon_asked_for_and_scores_the_held_out_images(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the phantom cache goes to the working directory
    result = load_probe().main(["--epsilon", "2", "--steps", "4", "--batch-size", "16", "--site-size", "90",
                                "--phantoms-per-class", "40", "--resolution", "16", "--width", "8"])
    assert result["steps"] == 4
    assert 0 < result["epsilon"] <= 2.0 + 1e-6
    assert result["sigma"] > 0
    assert 0.0 <= result["heldout_accuracy"] <= 1.0
    assert "held-out accuracy" in capsys.readouterr().out
