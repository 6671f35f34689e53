"""Federation: aggregation, validation of site updates, partitioning, transfer, what leaves a site, resume.

Most tests drive the real strategy and ClientApp through ``server.loopback.LoopbackGrid`` (one
process, no Ray): the Flower code paths are the same as in the simulation engine, only faster.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from medstylegan2.config import load_config
from medstylegan2.fl.aggregation import (ServerOptimizer, SiteReply, aggregate_round, sample_sites, site_update,
                                         weighted_average)
from medstylegan2.fl.partition import load_split, partition_indices, partition_table
from medstylegan2.fl.seeds import site_seed
from medstylegan2.fl.site_round import LocalStateStore, run_site_round
from medstylegan2.fl.wire import (PAYLOAD_DELTA, PAYLOAD_WEIGHTS, as_received, decode_from_transfer,
                                  encode_for_transfer, flatten_weights, initial_weights, is_constant, nbytes,
                                  transferred, validate_update)
from medstylegan2.runfolder import read_checkpoint
from server.loopback import LoopbackGrid
from server.strategy import run_federation


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def smoke(*overrides: str):
    return load_config("configs/smoke.yaml", list(overrides))


def sim_nodes(n: int) -> list[dict]:
    return [{"partition-id": i, "num-partitions": n} for i in range(n)]


def metrics_lines(run_dir) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if line.get("kind") == "round"]


def global_weights(path) -> dict[str, torch.Tensor]:
    state = read_checkpoint(path)
    return flatten_weights({name: state[name] for name in ("G", "G_ema", "D")})


# ----------------------------------------------------------------------------------------------
# Aggregation through the real strategy, with sites whose replies we choose


def scripted_sites(plan: dict[int, dict]) -> ClientApp:
    """A ClientApp whose site ``i`` returns the received weights + plan[i]["offset"] with
    plan[i]["n"] examples; plan[i]["corrupt"](arrays) may damage the payload first."""
    app = ClientApp()

    @app.query()
    def roll_call(message: Message, context) -> Message:
        pid = int(context.node_config["partition-id"])
        return Message(RecordDict({"site": ConfigRecord({"site": f"site-{pid}"}),
                                   "metrics": MetricRecord({"num_examples": plan[pid]["n"]})}), reply_to=message)

    @app.train()
    def train(message: Message, context) -> Message:
        pid = int(context.node_config["partition-id"])
        arrays = {k: np.asarray(a.numpy() + np.float32(plan[pid]["offset"])) for k, a in message.content["arrays"].items()}
        if "corrupt" in plan[pid]:
            plan[pid]["corrupt"](arrays)
        content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                              "metrics": MetricRecord({"num_examples": plan[pid]["n"], "loss_g": 1.0}),
                              "site": ConfigRecord({"site": f"site-{pid}", "payload": PAYLOAD_WEIGHTS})})
        return Message(content, reply_to=message)

    return app


def test_server_weights_are_the_example_weighted_average_of_site_weights(tmp_path):
    cfg = smoke("federation.sites=3", "federation.rounds=1")
    plan = {0: {"n": 10, "offset": 0.1}, 1: {"n": 30, "offset": 0.5},
            2: {"n": 0, "offset": 1000.0}}  # no examples: must not move the average
    run_federation(LoopbackGrid(scripted_sites(plan), sim_nodes(3)), cfg, tmp_path, server_data=False)

    before, _ = initial_weights(cfg)
    after = global_weights(tmp_path / "round_001.pt")
    expected_shift = (10 * 0.1 + 30 * 0.5) / 40
    for key, value in before.items():
        if is_constant(key):
            assert torch.equal(after[key], value), key  # constants never travel and never change
        else:
            torch.testing.assert_close(after[key], value + expected_shift, rtol=1e-6, atol=1e-5, msg=key)
    sites = metrics_lines(tmp_path)[0]["sites"]
    assert sites["site-2"]["status"] == "no examples"
    assert sites["site-0"]["status"] == sites["site-1"]["status"] == "ok"


def test_nan_and_misshapen_updates_are_rejected_naming_site_and_key_and_the_round_goes_on(tmp_path, caplog):
    cfg = smoke("federation.sites=3", "federation.rounds=1")

    def add_nan(arrays):
        key = next(k for k in arrays if k.startswith("D/"))
        arrays[key].flat[0] = np.nan

    def reshape(arrays):
        arrays["G/mapping.w_avg"] = np.zeros((7,), np.float32)

    plan = {0: {"n": 20, "offset": 0.25}, 1: {"n": 20, "offset": 9.0, "corrupt": add_nan},
            2: {"n": 20, "offset": 9.0, "corrupt": reshape}}
    with caplog.at_level("WARNING"):
        run_federation(LoopbackGrid(scripted_sites(plan), sim_nodes(3)), cfg, tmp_path, server_data=False)

    before, _ = initial_weights(cfg)
    after = global_weights(tmp_path / "round_001.pt")
    for key in transferred(before):
        torch.testing.assert_close(after[key], before[key] + 0.25, rtol=1e-6, atol=1e-5, msg=key)
    sites = metrics_lines(tmp_path)[0]["sites"]
    assert sites["site-1"]["status"].startswith("rejected") and "NaN/Inf" in sites["site-1"]["status"]
    assert "'G/mapping.w_avg'" in sites["site-2"]["status"] and "shape" in sites["site-2"]["status"]
    logged = caplog.text
    assert "site-1" in logged and "NaN/Inf" in logged
    assert "site-2" in logged and "G/mapping.w_avg" in logged
    # The damaged key (the first D key) is named.
    assert next(k for k in before if k.startswith("D/")) in sites["site-1"]["status"]


def test_a_round_with_fewer_valid_updates_than_min_sites_keeps_the_weights(tmp_path):
    cfg = smoke("federation.sites=2", "federation.rounds=1", "federation.min_sites=2")

    def poison(arrays):
        for a in arrays.values():
            a[...] = np.inf

    plan = {0: {"n": 5, "offset": 0.3}, 1: {"n": 5, "offset": 0.3, "corrupt": poison}}
    run_federation(LoopbackGrid(scripted_sites(plan), sim_nodes(2)), cfg, tmp_path, server_data=False)
    before, _ = initial_weights(cfg)
    after = global_weights(tmp_path / "round_001.pt")
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_weighted_average_skips_zero_weights_and_is_none_without_any():
    a = {"w": torch.tensor([1.0, 2.0])}
    b = {"w": torch.tensor([3.0, 6.0])}
    poison = {"w": torch.tensor([float("nan"), 1e30])}
    avg = weighted_average([a, b, poison], [1, 3, 0])
    torch.testing.assert_close(avg["w"], torch.tensor([2.5, 5.0]))
    assert weighted_average([a], [0]) is None


def test_aggregate_round_is_a_plain_call_that_gives_every_site_a_status():
    weights = {"G/x": torch.zeros(2), "D/y": torch.ones(3)}
    expected = {k: tuple(v.shape) for k, v in weights.items()}

    def shifted(shift: float) -> dict:
        return {k: (v + shift).numpy() for k, v in weights.items()}

    broken = shifted(0.0)
    broken["G/x"][0] = np.nan
    replies = [SiteReply("b", {"num_examples": 3, "loss_g": 2.0}, shifted(1.0)),
               SiteReply("a", {"num_examples": 1, "loss_g": 1.0}, shifted(3.0)),
               SiteReply("c", error="ValueError: boom"),
               SiteReply("d", {"num_examples": 5, "declined": 1, "dp_epsilon": 4.0}),
               SiteReply("e", {"num_examples": 2}, broken)]
    out = aggregate_round(replies, round_num=3, global_weights=weights, sent=weights, expected_shapes=expected,
                          optimizer=ServerOptimizer("fedavg"), plain_keys=set(), min_sites=1, known_sites=5)

    torch.testing.assert_close(out.weights["G/x"], torch.full((2,), (3 * 1.0 + 1 * 3.0) / 4))
    status = {name: entry["status"] for name, entry in out.sites.items()}
    assert status == {"a": "ok", "b": "ok", "c": "error: ValueError: boom", "d": "declined",
                      "e": "rejected: key 'G/x' holds 1 NaN/Inf value(s)"}
    assert out.aggregated["loss_g"] == (3 * 2.0 + 1 * 1.0) / 4 and out.aggregated["sites"] == 2
    assert out.privacy == {"d": {"epsilon": 4.0}} and out.declined == 1 and not out.all_declined
    assert any("site e" in text and "'G/x'" in text for _, text in out.events)


def test_server_momentum_and_adam_follow_their_update_rules():
    w = {"G/x": torch.zeros(3), "G_ema/x": torch.zeros(3)}
    u = {"G/x": torch.tensor([1.0, -2.0, 0.5]), "G_ema/x": torch.tensor([1.0, 1.0, 1.0])}
    plain = {"G_ema/x"}

    m = ServerOptimizer("fedavgm", lr=0.5, momentum=0.9)
    w1 = m.step(w, u, plain)
    w2 = m.step(w1, u, plain)
    torch.testing.assert_close(w2["G/x"], 0.5 * u["G/x"] + 0.5 * (0.9 * u["G/x"] + u["G/x"]))
    torch.testing.assert_close(w2["G_ema/x"], 2 * u["G_ema/x"])  # G_ema: plain average, no momentum

    adam = ServerOptimizer("fedadam", lr=0.1, momentum=0.9, beta2=0.99, tau=1e-3)
    w1 = adam.step(w, u, plain)
    mt, vt = 0.1 * u["G/x"], 0.01 * u["G/x"] ** 2
    torch.testing.assert_close(w1["G/x"], 0.1 * mt / (vt.sqrt() + 1e-3))

    restored = ServerOptimizer("fedadam", lr=0.1, momentum=0.9, beta2=0.99, tau=1e-3)
    restored.load_state_dict(adam.state_dict())
    torch.testing.assert_close(restored.step(w1, u, plain)["G/x"], adam.step(w1, u, plain)["G/x"])


# ----------------------------------------------------------------------------------------------
# Validation, transfer, seeds


def test_validate_update_names_the_key_of_each_problem():
    expected = {"G/a": (2, 2), "D/b": (3,)}
    ok = {"G/a": np.zeros((2, 2), np.float32), "D/b": np.ones(3, np.float16)}
    assert validate_update(ok, expected) == []
    problems = validate_update({"G/a": np.full((2, 2), np.inf, np.float32), "D/c": np.zeros(3, np.float32)},
                                   expected)
    text = " | ".join(problems)
    assert "missing key 'D/b'" in text and "unexpected key 'D/c'" in text and "'G/a' holds 4 NaN/Inf" in text
    assert "dtype uint8" in validate_update({"G/a": np.zeros((2, 2), np.uint8), "D/b": ok["D/b"]},
                                                expected)[0]


def test_float16_transfer_halves_the_bytes_and_keeps_the_update_precise(tiny_config):
    weights, _ = initial_weights(tiny_config)
    sent = transferred(weights)
    fp32, fp16 = encode_for_transfer(sent, "float32"), encode_for_transfer(sent, "float16")
    assert nbytes(fp16) * 2 == nbytes(fp32)
    assert all(a.dtype == np.float16 for a in fp16.values())

    start = as_received(sent, "float16")
    rng = torch.Generator().manual_seed(0)
    new = {k: v + 1e-3 * torch.randn(v.shape, generator=rng) for k, v in start.items()}
    delta = encode_for_transfer({k: new[k] - start[k] for k in new}, "float16")
    update = site_update(decode_from_transfer(delta), PAYLOAD_DELTA, start)
    for key in new:
        torch.testing.assert_close(start[key] + update[key], new[key], rtol=0, atol=2e-6)


def test_int8_quantization_error_is_at_most_half_a_step_per_tensor():
    from medstylegan2.fl.wire import dequantize_int8, quantize_int8

    rng = torch.Generator().manual_seed(0)
    for t in (torch.randn(64, 32, 3, 3, generator=rng) * 50, torch.randn(7, generator=rng) * 1e-6,
              torch.tensor(-0.37), torch.zeros(5), torch.full((4,), 1.0)):
        q, scale = quantize_int8(t)
        assert q.dtype == torch.int8 and q.shape == t.shape and int(q.abs().max()) <= 127
        assert float(scale) == pytest.approx(float(t.abs().max()) / 127, rel=1e-6)
        error = (dequantize_int8(q, scale) - t).abs().max()
        assert error <= float(scale) / 2 * (1 + 1e-5) + 1e-12
        if not t.any():
            assert float(scale) == 0 and not q.any()


def test_int8_transfer_is_a_quarter_of_float32_and_unpacks_to_the_shapes_it_was_packed_from(tiny_config):
    weights, _ = initial_weights(tiny_config)
    sent = transferred(weights)
    shapes = {k: tuple(v.shape) for k, v in sent.items()}
    fp32, int8 = encode_for_transfer(sent, "float32"), encode_for_transfer(sent, "int8")
    record_bytes = lambda arrays: ArrayRecord({k: Array(v) for k, v in arrays.items()}).count_bytes()  # noqa: E731
    assert record_bytes(int8) <= 0.25 * record_bytes(fp32)
    received = decode_from_transfer(int8, shapes)
    assert set(received) == set(sent)
    for key, value in sent.items():
        step = float(value.abs().max()) / 127
        assert received[key].shape == value.shape and (received[key] - value).abs().max() <= step / 2 + 1e-6, key


def test_an_int8_payload_that_does_not_fit_the_model_is_refused_naming_the_key(tiny_config):
    from medstylegan2.fl.wire import INT8_SCALES_KEY, INT8_VALUES_KEY

    weights, _ = initial_weights(tiny_config)
    sent = transferred(weights)
    shapes = {k: tuple(v.shape) for k, v in sent.items()}
    payload = encode_for_transfer(sent, "int8")
    short = dict(payload, **{INT8_VALUES_KEY: payload[INT8_VALUES_KEY][:-1]})
    with pytest.raises(ValueError, match=INT8_VALUES_KEY):
        decode_from_transfer(short, shapes)
    bad_scale = dict(payload, **{INT8_SCALES_KEY: np.full_like(payload[INT8_SCALES_KEY], np.nan)})
    with pytest.raises(ValueError, match="non-finite"):
        decode_from_transfer(bad_scale, shapes)
    with pytest.raises(ValueError, match="shapes"):
        decode_from_transfer(payload)


def test_int8_error_feedback_carries_what_did_not_fit_into_the_next_round():
    """An update component far below a tensor's quantization step is lost without error feedback
    every round; with it, the residual accumulates until it is sent: over rounds the server receives
    the sum of the updates up to one step of the last round."""
    from medstylegan2.fl.wire import quantize_with_error_feedback

    shapes = {"G/w": (3,)}
    update = {"G/w": torch.tensor([1.0, 0.003, -0.002])}  # step 1/127 ~ 0.0079: the small ones round to 0
    residual, received = None, torch.zeros(3)
    for _ in range(20):
        payload, residual = quantize_with_error_feedback(update, residual)
        sent = decode_from_transfer(payload, shapes)["G/w"]
        # Exactly what did not fit is kept: sent + new residual == update + old residual.
        received += sent
    assert torch.allclose(received + residual["G/w"], 20 * update["G/w"], atol=1e-5)
    assert (residual["G/w"].abs() <= 1.0 / 127 / 2 + 1e-6).all()
    assert received[1] > 0 and received[2] < 0  # the small components got through
    no_feedback, _ = quantize_with_error_feedback(update, None)
    assert decode_from_transfer(no_feedback, shapes)["G/w"][1:].abs().max() == 0


def test_int8_site_rounds_keep_the_residual_in_local_state_and_send_a_packed_update(tiny_config, tmp_path):
    from medstylegan2.fl.site_round import (TRANSFER_RESIDUAL, LocalStateStore, local_state_from_bytes,
                                            local_state_to_bytes)
    from medstylegan2.fl.wire import INT8_VALUES_KEY

    cfg = dataclasses.replace(tiny_config, federation=dataclasses.replace(
        tiny_config.federation, transfer_dtype="int8", local_steps=2))
    weights, _ = initial_weights(cfg)
    received = encode_for_transfer(transferred(weights), "int8")
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (12, 1, 16, 16), dtype=np.uint8), rng.integers(0, 3, 12)
    first = run_site_round(cfg, images, labels, received, round_num=1, site="s")
    assert first.payload_kind == PAYLOAD_DELTA and set(first.payload) == set(received)
    assert first.payload[INT8_VALUES_KEY].dtype == np.int8
    residual = first.local_state[TRANSFER_RESIDUAL]
    assert set(residual) == set(transferred(weights)) and any(r.abs().sum() > 0 for r in residual.values())
    # The site's on-disk store (a restarted site, a resumed run), written before round 2 trains: the
    # optimizers of round 2 update the moments of first.local_state in place.
    store = LocalStateStore(tmp_path / "site")
    store.save(1, local_state_to_bytes(first.local_state))
    second = run_site_round(cfg, images, labels, received, round_num=2, site="s", local_state=first.local_state)
    assert second.local_state[TRANSFER_RESIDUAL].keys() == residual.keys()
    # The residual survives the store ...
    restored = local_state_from_bytes(store.latest_before(2)[1])
    assert all(torch.equal(restored[TRANSFER_RESIDUAL][k], residual[k]) for k in residual)
    from_disk = run_site_round(cfg, images, labels, received, round_num=2, site="s", local_state=restored)
    assert all(np.array_equal(from_disk.payload[k], second.payload[k]) for k in second.payload)
    # ... and is what the second update carries on top of its own.
    restored.pop(TRANSFER_RESIDUAL)
    forgetful = run_site_round(cfg, images, labels, received, round_num=2, site="s", local_state=restored)
    assert not all(np.array_equal(forgetful.payload[k], second.payload[k]) for k in second.payload)


def test_site_seeds_depend_on_seed_round_and_site_only():
    s = site_seed(0, 3, "site-1")
    assert s == site_seed(0, 3, "site-1")
    assert len({s, site_seed(1, 3, "site-1"), site_seed(0, 4, "site-1"), site_seed(0, 3, "site-2")}) == 4
    picked = sample_sites(["c", "a", "b", "d"], 0.5, 1, seed=0, round_num=2)
    assert picked == sample_sites(["d", "b", "a", "c"], 0.5, 1, seed=0, round_num=2) and len(picked) == 2
    assert sample_sites(["a", "b", "c"], 0.1, 2, seed=0, round_num=1).__len__() == 2


def test_a_site_without_images_returns_the_weights_unchanged(tiny_config):
    weights, _ = initial_weights(tiny_config)
    received = encode_for_transfer(transferred(weights), "float32")
    empty = np.zeros((0, 1, 16, 16), np.uint8)
    result = run_site_round(tiny_config, empty, np.zeros(0, np.int64), received, round_num=1, site="s")
    assert result.metrics["num_examples"] == 0
    assert all(np.array_equal(result.payload[k], received[k]) for k in received)


# ----------------------------------------------------------------------------------------------
# Partitioning


LABELS = np.repeat(np.arange(3), [200, 120, 80])


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "quantity"])
def test_partitions_cover_every_image_exactly_once_and_are_reproducible(partitioner):
    parts = partition_indices(LABELS, 4, partitioner, dirichlet_alpha=0.5, quantity_alpha=1.0, seed=3)
    everything = np.concatenate(parts)
    assert len(everything) == len(LABELS) and len(np.unique(everything)) == len(LABELS)
    rows = partition_table(LABELS, parts)
    assert sum(r["total"] for r in rows) == len(LABELS)
    assert [sum(r[c] for r in rows) for c in ("Normal", "COVID-19", "Non-COVID")] == [200, 120, 80]
    again = partition_indices(LABELS, 4, partitioner, dirichlet_alpha=0.5, quantity_alpha=1.0, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def _mean_top_class_share(parts) -> float:
    return float(np.mean([np.bincount(LABELS[p], minlength=3).max() / len(p) for p in parts]))


def test_dirichlet_label_skew_is_visible_and_grows_as_alpha_shrinks():
    iid = _mean_top_class_share(partition_indices(LABELS, 4, "iid", seed=0))
    mild = _mean_top_class_share(partition_indices(LABELS, 4, "dirichlet", dirichlet_alpha=5.0, seed=0))
    strong = _mean_top_class_share(partition_indices(LABELS, 4, "dirichlet", dirichlet_alpha=0.1, seed=0))
    assert iid <= 0.55 and mild <= 0.55 and strong > 0.7


def test_quantity_skew_gives_unequal_sizes_with_the_class_mix_kept():
    parts = partition_indices(LABELS, 4, "quantity", quantity_alpha=0.5, seed=1)
    sizes = sorted(len(p) for p in parts)
    assert sizes[-1] > 2 * sizes[0]
    big = max(parts, key=len)
    assert abs(np.mean(LABELS[big] == 0) - 0.5) < 0.1  # half of the data is class 0


# ----------------------------------------------------------------------------------------------
# Local state, resume


def test_local_state_store_keeps_the_state_from_before_an_unfinished_round(tmp_path):
    store = LocalStateStore(tmp_path)
    for r in (1, 2, 3):
        store.save(r, f"after {r}".encode())
    assert store.rounds() == [2, 3]
    # The server died after this site finished round 3 but before it saved round 3: it repeats it.
    assert store.latest_before(3) == (2, b"after 2")
    assert store.latest_before(4) == (3, b"after 3")
    store.save(3, b"after 3, again")  # repeating round 3 keeps the state from before it
    assert store.rounds() == [2, 3]


def test_resume_after_round_2_of_4_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    cfg = smoke("federation.rounds=4", "federation.aggregation=fedavgm", "federation.server_lr=0.8")

    from client.client_app import app

    def run(run_dir, **kw):
        grid = LoopbackGrid(app, sim_nodes(2))
        return run_federation(grid, cfg, run_dir, site_state_dir=str(run_dir / "site_state"), server_data=False,
                              **kw)

    run(tmp_path / "straight")
    run(tmp_path / "interrupted", stop_after=2)
    assert sorted(p.name for p in (tmp_path / "interrupted").glob("round_*.pt")) == ["round_001.pt", "round_002.pt"]
    run(tmp_path / "interrupted", resume=True)

    a = global_weights(tmp_path / "straight" / "round_004.pt")
    b = global_weights(tmp_path / "interrupted" / "round_004.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = metrics_lines(tmp_path / "interrupted")
    assert [line["round"] for line in lines] == [1, 2, 3, 4]
    assert all(math.isfinite(line["aggregated"]["loss_g"]) for line in lines)
    # Momentum buffers travelled through the checkpoint too.
    assert read_checkpoint(tmp_path / "interrupted" / "round_004.pt")["federation"]["optimizer"]["m"]


def test_a_fresh_run_refuses_a_folder_that_holds_checkpoints(tmp_path):
    from medstylegan2.errors import UserError

    (tmp_path / "round_001.pt").write_bytes(b"")
    with pytest.raises(UserError, match="--resume"):
        run_federation(LoopbackGrid(scripted_sites({}), []), smoke(), tmp_path, server_data=False)


# ----------------------------------------------------------------------------------------------
# What leaves a site


def _image_like(array: np.ndarray, resolution: int) -> bool:
    shape = tuple(array.shape)
    return shape[-2:] == (resolution, resolution) and (len(shape) == 2 or shape[-3] == 1)


def _holds_an_image(array: np.ndarray, images: np.ndarray) -> bool:
    """True if any aligned H*W chunk of ``array`` equals a training image in any usual scaling."""
    hw = images.shape[-1] * images.shape[-2]
    flat = np.asarray(array, np.float64).ravel()
    if flat.size < hw:
        return False
    chunks = flat[: flat.size // hw * hw].reshape(-1, hw)
    refs = images.reshape(len(images), hw).astype(np.float64)
    for scaled in (refs, refs / 255.0, refs / 127.5 - 1.0):
        for chunk in chunks:
            if np.any(np.all(np.abs(scaled - chunk) < 1e-3, axis=1)):
                return True
    return False


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_only_weights_counts_and_metrics_leave_a_site(tmp_path, dtype):
    from client.client_app import app

    cfg = smoke("federation.rounds=1", f"federation.transfer_dtype={dtype}")
    grid = LoopbackGrid(app, sim_nodes(2))
    run_federation(grid, cfg, tmp_path, site_state_dir=str(tmp_path / "site_state"), server_data=False)
    train, _ = load_split(cfg)
    resolution = cfg.model.resolution

    (line,) = metrics_lines(tmp_path)  # the server decoded and aggregated both updates
    assert line["aggregated"]["sites"] == 2 and all(e["status"] == "ok" for e in line["sites"].values())
    assert len(grid.outgoing) == 4  # roll call + one training round, two sites
    for node, reply in grid.outgoing:
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        content = reply.content
        assert set(content.keys()) <= {"arrays", "metrics", "site"}
        for record in content.array_records.values():
            for key, array in record.items():
                values = array.numpy()
                assert values.dtype in (np.float32, np.float16, np.int8), (key, values.dtype)
                assert not _image_like(values, resolution), (key, values.shape)
                assert not _holds_an_image(values, train.images), key
        for record in content.metric_records.values():
            for key, value in record.items():
                assert isinstance(value, (int, float)), (key, type(value))
        for record in content.config_records.values():
            for key, value in record.items():
                assert isinstance(value, str) and len(value) < 64, (key, value)


# ----------------------------------------------------------------------------------------------
# Differential privacy across rounds


def policy_nodes(cfg, n: int, folder) -> list[dict]:
    """Simulated sites with their own policy files (from the run config's privacy section), as the driver writes them."""
    from medstylegan2.fl.partition import simulation_partitions
    from medstylegan2.privacy.policy import write_site_policies

    _, parts = simulation_partitions(cfg, n)
    paths = write_site_policies(folder / "policies", {f"site-{i}": len(p) for i, p in enumerate(parts)},
                                ledger_root=folder / "ledgers", privacy=cfg.privacy)
    return [{**node, "privacy-policy": str(paths[f"site-{i}"])} for i, node in enumerate(sim_nodes(n))]


def test_epsilon_composes_over_rounds_and_sites_out_of_budget_decline_until_the_run_ends(tmp_path):
    from client.client_app import app

    cfg = smoke("federation.rounds=3", "model.mbstd_group_size=0", "privacy.enabled=true",
                "privacy.noise_multiplier=1.0", "privacy.budget_epsilon=8.0")
    run_federation(LoopbackGrid(app, policy_nodes(cfg, 2, tmp_path)), cfg, tmp_path / "run",
                   site_state_dir=str(tmp_path / "state"), server_data=False)
    run = tmp_path / "run"
    lines = metrics_lines(run)
    # Round 1 spends epsilon ~7 per site (delta 1e-5); a second round would pass 8: both decline, the run ends.
    assert [line["round"] for line in lines] == [1, 2]
    assert {s["status"] for s in lines[0]["sites"].values()} == {"ok"}
    assert {s["status"] for s in lines[1]["sites"].values()} == {"declined"}
    first = {name: s["dp_epsilon"] for name, s in lines[0]["sites"].items()}
    assert all(6.0 < eps < 8.0 for eps in first.values())
    report = json.loads((run / "privacy.json").read_text())
    assert set(report) == {"delta", "accountant", "sites"} and set(report["sites"]) == {"site-0", "site-1"}
    assert all(len(rows) == 1 and rows[0]["round"] == 1 for rows in report["sites"].values())  # declines: no entry
    assert report["delta"] == 1e-5
    assert read_checkpoint(run / "round_002.pt")["federation"]["stopped"] is True
    assert not (run / "round_003.pt").exists()
    # The declined round left the weights alone.
    a, b = global_weights(run / "round_001.pt"), global_weights(run / "round_002.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_proximal_term_keeps_site_weights_near_the_global_ones(tiny_config):
    from medstylegan2.phantoms import generate_phantoms

    data = generate_phantoms(4, 16, seed=0)
    weights, _ = initial_weights(tiny_config)
    received = encode_for_transfer(transferred(weights), "float32")

    def drift(mu: float) -> float:
        cfg = dataclasses.replace(tiny_config, federation=dataclasses.replace(
            tiny_config.federation, proximal_mu=mu, local_steps=4))
        out = run_site_round(cfg, data.images, data.labels, received, round_num=1, site="s")
        return float(sum(np.abs(out.payload[k] - received[k]).sum() for k in received if k.startswith("D/")))

    assert drift(1000.0) < 0.5 * drift(0.0)



def test_the_round_log_names_d_loss_on_fakes_when_sites_under_dp_send_no_real_loss():
    from server.strategy import loss_summary

    assert loss_summary({"loss_g": 1.0, "loss_d_fake": 0.25, "loss_d_real": 0.5}) == "loss_g 1.0000, loss_d 0.7500"
    under_dp = loss_summary({"loss_g": 1.0, "loss_d_fake": 0.25})
    assert "nan" not in under_dp and under_dp.startswith("loss_g 1.0000, loss_d_fake 0.2500")
