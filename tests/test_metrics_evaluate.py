"""The evaluator: records, figures, errors instead of fake numbers, the server hook and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medstylegan2.config import ConfigError, MetricsConfig
from medstylegan2.metrics.evaluate import CLASSIFIER_FILE, evaluate_generator, evaluate_images
from medstylegan2.metrics.features import INCEPTION_FILE
from medstylegan2.metrics.plots import plot_metrics
from medstylegan2.phantoms import generate_phantoms


@pytest.fixture(scope="module")
def sets():
    train = generate_phantoms(20, 32, seed=0)
    heldout = generate_phantoms(10, 32, seed=1)
    fake = generate_phantoms(10, 32, seed=2)
    return train, heldout, fake


def _cfg(*metrics: str, **kw) -> MetricsConfig:
    return MetricsConfig(metrics=list(metrics), classifier_steps=kw.pop("classifier_steps", 40), **kw)


def test_rounds_write_json_grid_pairs_jsonl_and_plot_and_reuse_the_domain_classifier(sets, tmp_path):
    train, heldout, fake = sets
    cfg = _cfg("fd_domain", "kid_domain", "pr_domain", "lpips", "memorization", "utility")
    first = evaluate_images(fake, heldout, train=train, cfg=cfg, round_num=1, run_dir=tmp_path)
    second = evaluate_images(fake, heldout, train=train, cfg=cfg, round_num=2, run_dir=tmp_path)
    assert first["errors"] == {} and second["errors"] == {}
    assert first["domain_classifier"]["trained_now"] and not second["domain_classifier"]["trained_now"]
    assert (tmp_path / CLASSIFIER_FILE).is_file()
    for name in ("round_001.json", "round_002.json", "grid_round_001.png", "memorization_pairs_round_002.png"):
        assert (tmp_path / "eval" / name).is_file(), name
    assert (tmp_path / "metrics.png").is_file()
    record = json.loads((tmp_path / "eval" / "round_001.json").read_text())
    for cls in ("Normal", "COVID-19", "Non-COVID"):
        figures = record["per_class"][cls]
        for key in ("fd_domain", "kid_domain", "precision_domain", "recall_domain", "lpips_diversity",
                    "lpips_to_nearest_real"):
            assert isinstance(figures[key], float), (cls, key)
    assert record["overall"]["fd_domain"] == pytest.approx(second["overall"]["fd_domain"])  # same classifier
    assert 0 <= record["overall"]["utility_accuracy_synthetic"] <= 1
    assert record["utility"]["trained_on_real"] is not None
    assert record["memorization"]["pixel"]["fraction_below"] is not None
    assert "LPIPS" in record["feature_networks"]["lpips"]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(line["round"], line["kind"]) for line in lines] == [(1, "eval"), (2, "eval")]


def test_missing_inception_weights_are_recorded_and_the_other_metrics_still_run(sets, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    train, heldout, fake = sets
    cfg = _cfg("fid", "kid", "fd_domain", weights_dir=str(tmp_path / "weights"))
    record = evaluate_images(fake, heldout, train=train, cfg=cfg, out_dir=tmp_path / "out", use_fid_helper=False)
    assert set(record["errors"]) == {"fid", "kid"}
    assert INCEPTION_FILE in record["errors"]["fid"] and str(tmp_path / "weights") in record["errors"]["fid"]
    assert "fid" not in record["overall"] and "kid" not in record["overall"]
    assert isinstance(record["overall"]["fd_domain"], float)
    on_disk = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert on_disk["errors"]["fid"] == record["errors"]["fid"]


def test_domain_metrics_without_a_classifier_or_training_set_are_errors_not_numbers(sets, tmp_path):
    _, heldout, fake = sets
    record = evaluate_images(fake, heldout, train=None, cfg=_cfg("fd_domain", "memorization"), out_dir=tmp_path)
    assert "--train" in record["errors"]["fd_domain"] and "--train" in record["errors"]["memorization"]
    assert "fd_domain" not in record["overall"]


def test_unknown_metric_names_are_rejected_with_the_allowed_list(sets, tmp_path):
    train, heldout, fake = sets
    with pytest.raises(ConfigError, match="allowed: fd_domain, kid_domain"):
        evaluate_images(fake, heldout, train=train, cfg=_cfg("fd_domain", "fidd"), out_dir=tmp_path)


def test_evaluate_generator_samples_n_per_class_from_the_generator(tiny_config, tmp_path):
    from medstylegan2.networks import build_networks

    G, _ = build_networks(tiny_config.model)
    heldout = generate_phantoms(6, tiny_config.model.resolution, seed=1)
    train = generate_phantoms(10, tiny_config.model.resolution, seed=0)
    cfg = _cfg("fd_domain", "pr_domain", n_per_class=7, classifier_steps=10)
    record = evaluate_generator(G.eval(), heldout, train, cfg, tmp_path / "eval", 3, tmp_path)
    assert record["n_generated"] == {"Normal": 7, "COVID-19": 7, "Non-COVID": 7}
    assert record["round"] == 3 and (tmp_path / "eval" / "round_003.json").is_file()
    assert isinstance(record["overall"]["fd_domain"], float)


def test_plot_metrics_draws_every_round_and_explains_missing_panels(tmp_path):
    (tmp_path / "eval").mkdir()
    for r, fd in ((1, 3.0), (2, 2.0), (5, 1.0)):
        rec = {"round": r, "class_names": ["Normal", "COVID-19", "Non-COVID"],
               "overall": {"fd_domain": fd, "kid_domain": fd / 100},
               "per_class": {c: {"fd_domain": fd + i, "lpips_diversity": 0.2} for i, c in
                             enumerate(["Normal", "COVID-19", "Non-COVID"])},
               "errors": {"fid": f"FID needs the weights file '{INCEPTION_FILE}'"}}
        (tmp_path / "eval" / f"round_{r:03d}.json").write_text(json.dumps(rec))
    path = plot_metrics(tmp_path)
    assert path == tmp_path / "metrics.png" and path.stat().st_size > 5000
    assert plot_metrics(tmp_path / "empty") is None


def test_cli_evaluates_image_folders(sets, tmp_path, capsys):
    from medstylegan2.cli import main
    from medstylegan2.images import write_image_folder

    train, heldout, fake = sets
    dirs = {name: write_image_folder(s, tmp_path / name) for name, s in
            (("train", train), ("real", heldout), ("fake", fake))}
    rc = main(["evaluate", "--fake", str(dirs["fake"]), "--real", str(dirs["real"]), "--train", str(dirs["train"]),
               "--out", str(tmp_path / "out"), "--metrics", "fd_domain,pr_domain",
               "--set", "metrics.classifier_steps=30"])
    out = capsys.readouterr().out
    assert rc == 0, out
    record = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert record["metrics_requested"] == ["fd_domain", "pr_domain"]
    assert record["n_generated"] == {"Normal": 10, "COVID-19": 10, "Non-COVID": 10}
    assert "fd_domain" in out and (tmp_path / "out" / CLASSIFIER_FILE).is_file()
    # the classifier written there is reused by the next run
    assert main(["evaluate", "--fake", str(dirs["fake"]), "--real", str(dirs["real"]), "--out",
                 str(tmp_path / "out"), "--metrics", "fd_domain"]) == 0
    assert json.loads((tmp_path / "out" / "evaluation.json").read_text())["overall"]["fd_domain"] == \
        pytest.approx(record["overall"]["fd_domain"])


def test_cli_reports_usage_errors_with_exit_status_2(tmp_path, capsys):
    from medstylegan2.cli import main

    assert main(["evaluate", "--real", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "CHECKPOINT or --fake" in capsys.readouterr().err
    assert main(["evaluate", "--fake", str(tmp_path), "--real", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--metrics", "bogus"]) == 2
    assert "allowed:" in capsys.readouterr().err


def test_records_are_strict_json(sets, tmp_path):
    train, heldout, fake = sets
    one_class = fake.subset(np.flatnonzero(fake.labels == 0))
    record = evaluate_images(one_class, heldout, train=train, cfg=_cfg("fd_domain", "kid_domain"), out_dir=tmp_path)
    text = (tmp_path / "evaluation.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert "skipped" in json.dumps(record["per_class"]["COVID-19"])


def test_cli_samples_a_checkpoint_and_reuses_the_runs_domain_classifier(tiny_config, tmp_path, capsys):
    from medstylegan2.cli import main
    from medstylegan2.images import write_image_folder
    from medstylegan2.trainer import SiteTrainer

    res = tiny_config.model.resolution
    train = generate_phantoms(8, res, seed=0)
    real_dir = write_image_folder(generate_phantoms(4, res, seed=1), tmp_path / "real")
    train_dir = write_image_folder(train, tmp_path / "train")
    run = tmp_path / "run"
    ckpt = SiteTrainer(tiny_config, train.images, train.labels, device="cpu").save_checkpoint(run / "round_001.pt")
    args = ["evaluate", str(ckpt), "--real", str(real_dir), "--n-per-class", "5", "--metrics", "fd_domain",
            "--set", "metrics.classifier_steps=5"]
    assert main(args + ["--train", str(train_dir), "--out", str(tmp_path / "a"), "--classifier",
                        str(run / CLASSIFIER_FILE)]) == 0
    first = json.loads((tmp_path / "a" / "evaluation.json").read_text())
    assert first["n_generated"] == {"Normal": 5, "COVID-19": 5, "Non-COVID": 5}
    assert first["domain_classifier"]["trained_now"]
    capsys.readouterr()
    assert main(args + ["--out", str(tmp_path / "b")]) == 0  # no --train: the run's classifier is found
    assert "using the run's domain classifier" in capsys.readouterr().out
    second = json.loads((tmp_path / "b" / "evaluation.json").read_text())
    assert not second["domain_classifier"]["trained_now"]
    assert second["overall"]["fd_domain"] == pytest.approx(first["overall"]["fd_domain"])
