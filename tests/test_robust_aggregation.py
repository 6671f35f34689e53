"""Hostile or broken updates: rejected by validation or by the norm check, or out-voted by a robust rule.

The robust rules are plain torch in ``medstylegan2.fl.aggregation``; here they are checked against
Flower's own FedMedian / FedTrimmedAvg on the same arrays (tests may import Flower; the core does not).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg

from medstylegan2.fl.aggregation import (ServerOptimizer, SiteReply, aggregate_round, coordinate_median,
                                         norm_outliers, trimmed_mean)
from server.loopback import LoopbackGrid, _claim_task_identity

SHAPES = {"G/a": (4, 3), "G_ema/a": (4, 3), "D/b": (5,)}


def honest_updates(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Updates that agree on a direction, each with its own noise (sites with different data)."""
    rng = torch.Generator().manual_seed(seed)
    direction = {k: torch.randn(s, generator=rng) for k, s in SHAPES.items()}
    return [{k: direction[k] + 0.2 * torch.randn(s, generator=rng) for k, s in SHAPES.items()} for _ in range(n)]


def flower_replies(updates: list[dict[str, torch.Tensor]]) -> list[Message]:
    _claim_task_identity()  # Flower's messages need a run and a sender, as inside an engine
    replies = []
    for i, update in enumerate(updates):
        content = RecordDict({"arrays": ArrayRecord({k: Array(v.numpy()) for k, v in update.items()}),
                              "metrics": MetricRecord({"num-examples": 10 + i})})
        message = Message(content=content, dst_node_id=1, message_type="train")
        replies.append(Message(content, reply_to=message))
    return replies


@pytest.mark.parametrize("n", [3, 4, 5, 8])
def test_median_is_bit_for_bit_flowers_fedmedian_on_the_same_arrays(n):
    updates = honest_updates(n, seed=n)
    ours = coordinate_median(updates)
    theirs, _ = FedMedian().aggregate_train(1, flower_replies(updates))
    for key in SHAPES:
        assert np.array_equal(ours[key].numpy(), theirs[key].numpy()), key


@pytest.mark.parametrize("n,beta", [(3, 0.2), (5, 0.2), (8, 0.25), (10, 0.1), (6, 0.0)])
def test_trimmed_mean_is_flowers_fedtrimmedavg_on_the_same_arrays(n, beta):
    updates = honest_updates(n, seed=n)
    ours = trimmed_mean(updates, beta)
    theirs, _ = FedTrimmedAvg(beta=beta).aggregate_train(1, flower_replies(updates))
    for key in SHAPES:
        # Same values kept; numpy partitions where we sort, so the summation order (last bit) may differ.
        np.testing.assert_allclose(ours[key].numpy(), theirs[key].numpy(), rtol=1e-6, atol=1e-7, err_msg=key)


def _weights() -> dict[str, torch.Tensor]:
    return {k: torch.zeros(s) for k, s in SHAPES.items()}


def _aggregate(replies: list[SiteReply], rule: str = "mean", outlier_factor: float = 10.0, trim: float = 0.2):
    weights = _weights()
    return aggregate_round(replies, round_num=1, global_weights=weights, sent=weights,
                           expected_shapes=dict(SHAPES), optimizer=ServerOptimizer("fedavg"), plain_keys=set(),
                           min_sites=1, known_sites=len(replies), rule=rule, trim_fraction=trim,
                           outlier_factor=outlier_factor)


def _replies(updates, hostile=None) -> list[SiteReply]:
    replies = [SiteReply(f"site-{i}", {"num_examples": 10}, {k: v.numpy() for k, v in u.items()})
               for i, u in enumerate(updates)]
    if hostile is not None:
        replies.append(SiteReply("mallory", {"num_examples": 10}, hostile))
    return replies


def _plant(kind: str, honest: list[dict[str, torch.Tensor]]) -> dict[str, np.ndarray]:
    typical = {k: v.numpy().copy() for k, v in honest[0].items()}
    if kind == "nan":
        typical["D/b"][2] = np.nan
    elif kind == "scaled_x100":
        typical = {k: v * 100 for k, v in typical.items()}
    elif kind == "sign_flipped":
        typical = {k: -v for k, v in typical.items()}
    elif kind == "wrong_shape":
        typical["G/a"] = np.zeros((3, 4), np.float32)
    return typical


def _within_honest_range(result, honest) -> bool:
    for key in SHAPES:
        stack = torch.stack([u[key] for u in honest])
        if not bool(torch.all((result[key] >= stack.min(0).values - 1e-6) & (result[key] <= stack.max(0).values + 1e-6))):
            return False
    return True


@pytest.mark.parametrize("kind", ["nan", "scaled_x100", "wrong_shape"])
def test_a_broken_or_scaled_update_is_rejected_and_the_mean_is_the_honest_sites(kind):
    honest = honest_updates(5)
    out = _aggregate(_replies(honest, _plant(kind, honest)), rule="mean")
    assert out.sites["mallory"]["status"].startswith("rejected"), out.sites["mallory"]
    expected = _aggregate(_replies(honest), rule="mean").weights
    assert all(torch.equal(out.weights[k], expected[k]) for k in SHAPES)
    assert any("mallory" in text for _, text in out.events)
    if kind == "scaled_x100":
        assert "outlier_factor" in out.sites["mallory"]["status"] and "median" in out.sites["mallory"]["status"]


@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
@pytest.mark.parametrize("kind", ["sign_flipped", "scaled_x100"])
def test_robust_rules_keep_the_global_model_where_the_honest_sites_put_it(rule, kind):
    honest = honest_updates(5)
    # Outlier check off: the rule alone has to hold.
    out = _aggregate(_replies(honest, _plant(kind, honest)), rule=rule, outlier_factor=0.0)
    assert out.sites["mallory"]["status"] == "ok"
    assert _within_honest_range(out.weights, honest)
    # The plain mean is dragged away by the same update; the robust rule stays near the honest mean.
    honest_mean = _aggregate(_replies(honest), rule="mean").weights
    dragged = _aggregate(_replies(honest, _plant(kind, honest)), rule="mean", outlier_factor=0.0).weights

    def distance(a):
        return sum(float(torch.sum((a[k] - honest_mean[k]) ** 2)) for k in SHAPES) ** 0.5

    assert distance(out.weights) < distance(dragged) / 2


def test_the_norm_check_needs_three_updates_and_ignores_a_cohort_that_did_not_move():
    assert norm_outliers({"a": 1.0, "b": 100.0}, 10.0) == {}  # two: which one is off cannot be told
    assert set(norm_outliers({"a": 1.0, "b": 1.2, "c": 100.0}, 10.0)) == {"c"}
    assert norm_outliers({"a": 0.0, "b": 0.0, "c": 3.0}, 10.0) == {}
    assert norm_outliers({"a": 1.0, "b": 1.2, "c": 100.0}, 0.0) == {}  # 0: off


def test_a_site_sending_a_hundredfold_update_through_the_real_strategy_is_rejected_and_logged(tmp_path, caplog):
    from medstylegan2.config import load_config
    from medstylegan2.fl.wire import initial_weights, transferred
    from medstylegan2.runfolder import RunFolder, read_checkpoint
    from server.strategy import run_federation
    from test_federation import global_weights, scripted_sites, sim_nodes  # tests/ is on sys.path

    cfg = load_config("configs/smoke.yaml", ["federation.sites=4", "federation.rounds=1"])
    plan = {i: {"n": 10, "offset": 0.01 * (i + 1)} for i in range(3)}
    plan[3] = {"n": 10, "offset": 3.0}  # 100 x the others' typical distance
    with caplog.at_level("WARNING"):
        run_federation(LoopbackGrid(scripted_sites(plan), sim_nodes(4)), cfg, tmp_path, server_data=False)
    status = RunFolder(tmp_path).metrics_records()[0]["sites"]["site-3"]["status"]
    assert status.startswith("rejected: update norm") and "site-3" in caplog.text
    before, _ = initial_weights(cfg)
    after = global_weights(tmp_path / "round_001.pt")
    for key in transferred(before):
        torch.testing.assert_close(after[key], before[key] + 0.02, rtol=1e-6, atol=1e-5, msg=key)
    assert read_checkpoint(tmp_path / "round_001.pt")["round"] == 1


def test_the_round_reports_throughput_only_from_sites_that_sent_timing():
    honest = honest_updates(3)
    weights = {k: torch.zeros(s) for k, s in SHAPES.items()}

    def aggregated(metrics: list[dict]) -> dict:
        replies = [SiteReply(f"site-{i}", m, {k: v.numpy() for k, v in u.items()})
                   for i, (m, u) in enumerate(zip(metrics, honest))]
        return aggregate_round(replies, round_num=1, global_weights=weights, sent=weights,
                               expected_shapes=dict(SHAPES), optimizer=ServerOptimizer("fedavg"), plain_keys=set(),
                               min_sites=1, known_sites=3, rule="mean", trim_fraction=0.0,
                               outlier_factor=0.0).aggregated

    timed = [{"num_examples": 10, "images_per_second": 5.0 + i} for i in range(3)]
    assert aggregated(timed)["images_per_second"] == pytest.approx(18.0)
    assert "images_per_second" not in aggregated([{"num_examples": 2000}] * 3)  # DP replies carry no timing
