"""DP-SGD on the discriminator: exact per-sample gradients, clipping and noise, accounting across
rounds, the noise multiplier for a target epsilon, the budget stop, model validation, and a private
site trainer that resumes from its checkpoint with the same privacy history."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from opacus.accountants import create_accountant

from medstylegan2.config import load_config
from medstylegan2.errors import PrivacyError, UserError
from medstylegan2.losses import discriminator_real_loss_per_sample
from medstylegan2.networks import Discriminator
from medstylegan2.privacy.engine import DPEngine, default_delta, make_privacy_engine
from medstylegan2.privacy.per_sample import per_sample_real_gradients
from medstylegan2.privacy.validation import validate_discriminator
from medstylegan2.runfolder import read_checkpoint
from medstylegan2.trainer import SiteTrainer

TINY = ["model.resolution=16", "model.channel_base=256", "model.channel_max=32", "model.z_dim=16", "model.w_dim=16",
        "model.mapping_layers=2", "model.cmap_dim=16", "model.mbstd_group_size=0", "train.batch_size=4",
        "train.r1_interval=2", "train.pl_interval=2", "privacy.enabled=true"]


def dp_config(*overrides: str):
    # Path-length regularization is G-only and beside the point here: off, for speed.
    return load_config(None, TINY + ["privacy.noise_multiplier=1.0", "train.pl_weight=0", *overrides])


def tiny_discriminator(**kwargs) -> Discriminator:
    kwargs = {"img_resolution": 16, "channel_base": 256, "channel_max": 32, "cmap_dim": 16,
              "mbstd_group_size": 0, **kwargs}
    return Discriminator(**kwargs)


def random_site(n: int = 24, resolution: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 1, resolution, resolution), dtype=np.uint8), rng.integers(0, 3, n)


def private_trainer(cfg, n: int = 24, planned_steps: int = 100, site: int = 0) -> SiteTrainer:
    images, labels = random_site(n)
    return SiteTrainer(cfg, images, labels, device="cpu", privacy=make_privacy_engine(cfg, n, planned_steps, site))


def opacus_epsilon(mechanism: str, sigma: float, q: float, steps: int, delta: float) -> float:
    accountant = create_accountant(mechanism=mechanism)
    accountant.history = [(sigma, q, steps)]
    return float(accountant.get_epsilon(delta=delta))


# -- per-sample gradients ------------------------------------------------------------------------


@pytest.mark.parametrize("r1_weight", [0.0, 0.8])
def test_r1_per_sample_grads_match_autograd_loop(r1_weight):
    torch.manual_seed(0)
    D = tiny_discriminator().double()
    images = torch.randn(6, 1, 16, 16, dtype=torch.float64)
    labels = torch.tensor([2, 0, 1, 1, 0, 2])
    grads, losses, order = per_sample_real_gradients(D, images, labels, r1_weight)
    worst = 0.0
    for row, i in enumerate(order.tolist()):
        D.zero_grad()
        loss = discriminator_real_loss_per_sample(D, images[i:i + 1], labels[i:i + 1], r1_weight).sum()
        loss.backward()
        assert abs(losses[row].item() - loss.item()) < 1e-10
        for name, p in D.named_parameters():
            worst = max(worst, (grads[name][row] - p.grad).abs().max().item())
    assert worst < 1e-5


@pytest.mark.parametrize("class_head", [False, True])
def test_chunked_vmap_gives_the_same_per_sample_grads_as_the_whole_batch(class_head):
    torch.manual_seed(0)
    D = tiny_discriminator(class_head=class_head).double()
    images = torch.randn(7, 1, 16, 16, dtype=torch.float64)
    labels = torch.tensor([2, 0, 1, 1, 0, 2, 1])
    class_weight = 0.7 if class_head else 0.0
    whole, whole_losses, whole_order = per_sample_real_gradients(D, images, labels, 0.8, class_weight)
    chunked, chunked_losses, chunked_order = per_sample_real_gradients(D, images, labels, 0.8, class_weight,
                                                                       chunk_size=3)
    assert torch.equal(whole_order, chunked_order)
    assert torch.allclose(whole_losses, chunked_losses, rtol=0, atol=1e-12)
    for name in whole:
        assert torch.allclose(whole[name], chunked[name], rtol=0, atol=1e-12), name


def test_the_engine_takes_per_sample_grads_in_vmap_chunks_on_a_cpu(monkeypatch):
    import medstylegan2.privacy.engine as engine_module
    seen: list[dict] = []
    original = engine_module.per_sample_real_gradients

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(engine_module, "per_sample_real_gradients", spy)
    _, trainer = _bound_engine(noise=1.0, clip=1.0)
    trainer.train_steps(2)
    assert seen and all(kwargs["chunk_size"] == 64 and kwargs["pad_to"] is None for kwargs in seen)


def test_empty_batch_gives_empty_per_sample_grads():
    D = tiny_discriminator()
    grads, losses, _ = per_sample_real_gradients(D, torch.zeros(0, 1, 16, 16), torch.zeros(0, dtype=torch.long), 0.8)
    assert len(losses) == 0
    assert all(g.shape == (0, *p.shape) for (name, p), g in zip(D.named_parameters(), grads.values()))


# -- clipping and noise --------------------------------------------------------------------------


def _bound_engine(noise: float, clip: float) -> tuple[DPEngine, SiteTrainer]:
    cfg = dp_config(f"privacy.noise_multiplier={noise}", f"privacy.max_grad_norm={clip}")
    trainer = private_trainer(cfg)
    return trainer.privacy, trainer


def test_zero_noise_and_tiny_clip_norm_clip_every_sample_to_the_norm():
    clip = 1e-3
    engine, trainer = _bound_engine(noise=0.0, clip=clip)
    real, labels = trainer.real_images[:5], trainer.real_labels[:5]
    raw, _, _ = per_sample_real_gradients(trainer.D, real, labels, r1_weight=0.1)
    names = [name for name, _ in trainer.D.named_parameters()]
    norms = torch.cat([raw[n].flatten(1) for n in names], dim=1).norm(dim=1)
    assert (norms > 100 * clip).all(), "the test needs gradients far above the clip norm"

    engine.private_real_gradient(real, labels, r1_weight=0.1)
    # Opacus: sum_i g_i * min(1, C / (|g_i| + 1e-6)) / expected batch size.
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    for name, p in trainer.D.named_parameters():
        expected = torch.einsum("i,i...->...", factors, raw[name]) / engine.expected_batch_size
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-9)
    clipped_norms = factors * norms
    torch.testing.assert_close(clipped_norms, torch.full_like(norms, clip), rtol=1e-3, atol=0)
    # One sample alone: the update's norm is exactly C / B.
    engine.private_real_gradient(real[:1], labels[:1], r1_weight=0.1)
    total = torch.cat([p.grad.flatten() for p in trainer.D.parameters()]).norm()
    assert abs(total.item() - clip / engine.expected_batch_size) < 1e-3 * clip / engine.expected_batch_size


def test_noise_variance_matches_sigma_c_over_b():
    sigma, clip = 2.0, 0.5
    engine, trainer = _bound_engine(noise=sigma, clip=clip)
    raw, _, _ = per_sample_real_gradients(trainer.D, trainer.real_images[:3], trainer.real_labels[:3], 0.0)
    draws = []
    for _ in range(60):
        engine.clip_and_noise({name: g.clone() for name, g in raw.items()})
        draws.append(torch.cat([p.grad.flatten() for p in trainer.D.parameters()]).clone())
    draws = torch.stack(draws)  # [draws, coordinates]
    std = sigma * clip / engine.expected_batch_size
    measured = draws.var(dim=0).mean().sqrt().item()
    assert abs(measured / std - 1) < 0.02, (measured, std)
    # Centred on the clipped mean (each of the 3 samples contributes at most C / B).
    mean_norm = draws.mean(dim=0).norm().item()
    assert mean_norm <= 3 * clip / engine.expected_batch_size + 4 * std * (draws.shape[1] / draws.shape[0]) ** 0.5
    assert engine.spent_steps == 60


def test_empty_poisson_batch_is_a_noise_only_step_that_still_counts():
    engine, trainer = _bound_engine(noise=1.0, clip=1.0)
    engine.sample_batch = lambda: torch.zeros(0, dtype=torch.long)
    before = [p.detach().clone() for p in trainer.D.parameters()]
    stats = trainer.train_steps(2)
    assert np.isfinite(stats["loss_d_fake"])
    assert engine.spent_steps == 2
    assert any((a - p).abs().sum() > 0 for a, p in zip(before, trainer.D.parameters()))


def test_poisson_batches_have_the_expected_size_on_average():
    engine = DPEngine(num_examples=400, batch_size=20, max_grad_norm=1.0, noise_multiplier=1.0, seed=1)
    sizes = [len(engine.sample_batch()) for _ in range(400)]
    assert engine.sample_rate == 20 / 400
    assert abs(np.mean(sizes) - 20) < 1.0 and np.std(sizes) > 2  # binomial, not fixed


# -- accounting ------------------------------------------------------------------------------------


def test_epsilon_after_rounds_of_restored_engines_equals_one_opacus_accountant():
    cfg = dp_config("train.r1_interval=100")
    rounds, local_steps, n = 3, 1, 24
    state, epsilons = None, []
    for round_num in range(1, rounds + 1):
        # As the Flower client does: a fresh engine and trainer every round, state restored.
        trainer = private_trainer(cfg, n=n, planned_steps=rounds * local_steps)
        if state is not None:
            trainer.privacy.load_bytes(state)
        trainer.train_steps(local_steps)
        state = trainer.privacy.to_bytes()
        record = trainer.privacy.round_record(round_num)
        epsilons.append(record["epsilon"])
        assert record["steps"] == round_num * local_steps
    q, delta = cfg.train.batch_size / n, default_delta(n)
    expected = opacus_epsilon("rdp", 1.0, q, rounds * local_steps, delta)
    assert abs(epsilons[-1] - expected) < 1e-6
    assert epsilons[0] < epsilons[1] < epsilons[2]


def test_prv_epsilon_composes_across_restored_engines():
    def engine() -> DPEngine:
        return DPEngine(num_examples=500, batch_size=25, max_grad_norm=1.0, noise_multiplier=1.1, accountant="prv",
                        seed=0)

    state = None
    for _ in range(3):
        e = engine()
        if state is not None:
            e.load_state_dict(state)
        hook = e.accountant.get_optimizer_hook_fn(sample_rate=e.sample_rate)
        fake_optimizer = type("Opt", (), {"noise_multiplier": e.noise_multiplier, "accumulated_iterations": 1})
        for _ in range(40):
            hook(fake_optimizer)
        state = e.state_dict()
    assert e.spent_steps == 120
    assert abs(e.epsilon() - opacus_epsilon("prv", 1.1, 0.05, 120, 1 / 5000)) < 1e-6


def test_target_epsilon_gives_a_sigma_that_just_meets_it_after_the_planned_steps():
    cfg = load_config(None, TINY + ["privacy.target_epsilon=4.0"])
    engine = make_privacy_engine(cfg, num_examples=300, planned_steps=400)
    sigma = engine.noise_multiplier
    assert sigma > 0
    eps = opacus_epsilon("rdp", sigma, 4 / 300, 400, 1 / 3000)
    assert 4.0 - 0.05 < eps <= 4.0
    assert engine.epsilon_after(400) == pytest.approx(eps, abs=1e-9)
    # Computed once: a restored engine keeps the run's sigma even if the search would now differ.
    state = engine.state_dict()
    other = make_privacy_engine(cfg, num_examples=300, planned_steps=999)
    other.load_state_dict(state)
    assert other.noise_multiplier == sigma


def test_budget_that_allows_two_rounds_declines_the_third():
    sigma, n, batch, local_steps = 0.9, 200, 10, 30
    q, delta = batch / n, default_delta(n)
    budget = (opacus_epsilon("rdp", sigma, q, 2 * local_steps, delta)
              + opacus_epsilon("rdp", sigma, q, 3 * local_steps, delta)) / 2
    state, trained = None, []
    for round_num in range(1, 6):
        engine = DPEngine(num_examples=n, batch_size=batch, max_grad_norm=1.0, noise_multiplier=sigma,
                          budget_epsilon=budget, seed=0)
        if state is not None:
            engine.load_state_dict(state)
        if engine.would_exceed_budget(local_steps):
            continue  # the site declines this round
        for _ in range(local_steps):
            engine.accountant.step(noise_multiplier=sigma, sample_rate=q)
        trained.append(round_num)
        state = engine.state_dict()
        assert engine.epsilon() <= budget
    assert trained == [1, 2]


def test_no_budget_never_declines():
    engine = DPEngine(num_examples=100, batch_size=10, max_grad_norm=1.0, noise_multiplier=0.5, seed=0)
    assert not engine.would_exceed_budget(10**6)
    assert engine.epsilon() == 0.0 and engine.spent_steps == 0


# -- validation -------------------------------------------------------------------------------------


def test_minibatch_stddev_is_rejected_naming_the_layer():
    with pytest.raises(PrivacyError, match=r"mbstd_group_size: 0") as err:
        validate_discriminator(tiny_discriminator(mbstd_group_size=4))
    assert "D.epilogue.mbstd (MinibatchStdLayer)" in str(err.value)


def test_batchnorm_is_rejected_naming_the_layer_and_the_replacement():
    D = tiny_discriminator()
    D.blocks[0].norm = nn.BatchNorm2d(8)
    with pytest.raises(PrivacyError) as err:
        validate_discriminator(D)
    message = str(err.value)
    assert "D.blocks.0.norm (BatchNorm2d)" in message and "GroupNorm" in message
    assert "D.blocks.0.norm.running_mean is a buffer" in message


def test_buffers_are_rejected_and_a_valid_discriminator_passes():
    validate_discriminator(tiny_discriminator())
    D = tiny_discriminator()
    D.epilogue.register_buffer("filter", torch.ones(4))
    with pytest.raises(PrivacyError, match=r"D\.epilogue\.filter is a buffer"):
        validate_discriminator(D)


def test_privacy_enabled_without_an_engine_refuses_to_train():
    images, labels = random_site()
    with pytest.raises(UserError, match="no privacy engine"):
        SiteTrainer(dp_config(), images, labels, device="cpu")


# -- the private site trainer ---------------------------------------------------------------------


def test_private_training_gives_finite_losses_growing_epsilon_and_shares_no_real_loss():
    cfg = dp_config()
    trainer = private_trainer(cfg)
    first = trainer.train_steps(1)  # an R1 step (r1_interval 2)
    eps1 = trainer.privacy.epsilon()
    second = trainer.train_steps(1)
    eps2 = trainer.privacy.epsilon()
    for stats in (first, second):
        for key in ("loss_g", "loss_d_fake"):
            assert np.isfinite(stats[key]), key
        assert "loss_d_real" not in stats  # computed from real images without DP: stays local
    assert 0 < eps1 < eps2
    assert trainer.privacy.spent_steps == 2
    assert trainer.cur_nimg == 2 * cfg.train.batch_size
    assert np.isfinite(trainer.privacy.last_private_stats["real_batch_size"])


def test_checkpoint_keeps_the_privacy_history_but_never_the_noise_streams(tmp_path):
    cfg = dp_config()  # OS entropy, as in a real run
    first = private_trainer(cfg)
    first.train_steps(2)
    state = read_checkpoint(first.save_checkpoint(tmp_path / "ckpt.pt"))
    assert state["privacy"]["history"] == [[1.0, cfg.train.batch_size / 24, 2]]
    assert not [key for key in state["privacy"] if "generator" in key or "noise_device" in key]

    # The same state restored twice (a restarted site, a repeated round): the history composes,
    # and each restored engine draws its own noise, so the two releases do not share it.
    repeats = []
    for _ in range(2):
        resumed = private_trainer(cfg)
        resumed.load_state_dict(state)
        assert resumed.privacy.epsilon() == first.privacy.epsilon()
        resumed.train_steps(1)
        assert resumed.privacy.spent_steps == 3
        repeats.append(resumed)
    assert repeats[0].privacy.epsilon() == repeats[1].privacy.epsilon()
    assert any((a - b).abs().max() > 0 for a, b in zip(repeats[0].D.parameters(), repeats[1].D.parameters()))


def test_a_state_with_saved_generators_loads_and_its_generators_are_ignored():
    engine = DPEngine(num_examples=50, batch_size=5, max_grad_norm=1.0, noise_multiplier=1.0, seed=3)
    legacy = {**engine.state_dict(), "history": [[1.0, 0.1, 7]],
              "sampling_generator": torch.Generator().manual_seed(0).get_state(), "noise_device": "seed",
              "noise_generator": torch.tensor([5])}
    fresh = DPEngine(num_examples=50, batch_size=5, max_grad_norm=1.0, noise_multiplier=1.0)  # OS entropy
    before = fresh.sampling_generator.get_state()
    fresh.load_state_dict(legacy)
    assert fresh.spent_steps == 7
    assert torch.equal(fresh.sampling_generator.get_state(), before)


def test_engines_without_a_seed_draw_different_batches():
    engines = [DPEngine(num_examples=1000, batch_size=100, max_grad_norm=1.0, noise_multiplier=1.0)
               for _ in range(2)]
    first, second = ([engine.sample_batch() for _ in range(3)] for engine in engines)
    assert any(len(a) != len(b) or not torch.equal(a, b) for a, b in zip(first, second))


def test_a_debugging_seed_gives_each_round_its_own_streams():
    def engine_after(steps: int) -> DPEngine:
        engine = DPEngine(num_examples=1000, batch_size=100, max_grad_norm=1.0, noise_multiplier=1.0, seed=4)
        if steps:
            engine.load_state_dict({**engine.state_dict(), "history": [[1.0, 0.1, steps]]})
        return engine

    first_round, second_round, second_again = engine_after(0), engine_after(40), engine_after(40)
    a, b, c = (torch.cat([e.sample_batch() for _ in range(3)]) for e in (first_round, second_round, second_again))
    assert not torch.equal(a, b)   # round 2 does not replay round 1's batches
    assert torch.equal(b, c)       # but a debugging run is reproducible


# -- fixed-size padded Poisson batches (GPU path) ------------------------------------------------


def test_padded_batch_size_covers_the_poisson_batch_size_with_four_sigmas():
    from medstylegan2.privacy.per_sample import padded_batch_size

    assert padded_batch_size(32, 640) == 56                  # 32 + 4 sqrt(32 * 0.95) = 54.1 -> 56
    assert padded_batch_size(16, 16) == 16                   # q = 1: the batch is always all 16 images
    assert padded_batch_size(4, 24) % 8 == 0 and padded_batch_size(4, 24) >= 4 + 4 * (4 * 5 / 6) ** 0.5


@pytest.mark.parametrize("r1_weight", [0.0, 0.8])
def test_masked_padding_gives_the_gradient_of_the_unpadded_batch(r1_weight):
    """Blank rows padded onto a Poisson batch (static shapes for GPUs) get per-sample gradients of
    exactly 0, so clipping and summing ignore them: the private gradient is the unpadded one (up to
    the float rounding of a batched convolution of another batch size, here float64)."""
    torch.manual_seed(0)
    images = torch.randn(5, 1, 16, 16, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 1, 0])
    grads = {}
    for pad_to in (None, 4, 8):  # unpadded; two chunks of 4 (5 real + 3 blank); one chunk of 8
        torch.manual_seed(0)
        D = tiny_discriminator().double()
        engine = DPEngine(num_examples=50, batch_size=5, max_grad_norm=0.5, noise_multiplier=0.0, seed=1)
        engine.bind(D, torch.optim.Adam(D.parameters()), num_examples=50, batch_size=5)
        engine.pad_to = pad_to
        per_sample, losses, order = per_sample_real_gradients(D, images, labels, r1_weight, pad_to=pad_to)
        rows = {None: 5, 4: 8, 8: 8}[pad_to]
        assert all(g.shape[0] == rows for g in per_sample.values())
        assert all(torch.equal(g[5:], torch.zeros_like(g[5:])) for g in per_sample.values())
        assert losses.shape == (5,) and order.tolist() == [0, 1, 2, 3, 4]
        engine.private_real_gradient(images, labels, r1_weight)
        grads[pad_to] = {name: p.grad.clone() for name, p in D.named_parameters()}
    for pad_to in (4, 8):
        for name, expected in grads[None].items():
            assert torch.allclose(grads[pad_to][name], expected, rtol=1e-12, atol=1e-15), (pad_to, name)


def test_an_empty_padded_batch_is_all_blank_rows():
    D = tiny_discriminator()
    grads, losses, _ = per_sample_real_gradients(D, torch.zeros(0, 1, 16, 16), torch.zeros(0, dtype=torch.long),
                                                 0.8, pad_to=8)
    assert len(losses) == 0
    assert all(g.shape[0] == 8 and not g.any() for g in grads.values())


@pytest.mark.slow
def test_compiled_padded_per_sample_function_matches_eager(monkeypatch):
    """torch.compile of the per-sample function (the GPU default) traces vmap(grad(grad)) and gives
    the eager values; on CPU with the aot_eager backend (no C++ toolchain needed)."""
    from medstylegan2.privacy import per_sample

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="aot_eager", **kw))
    monkeypatch.setattr(per_sample, "_COMPILED", {})
    torch.manual_seed(0)
    D = tiny_discriminator(class_head=True)
    images, labels = torch.randn(5, 1, 16, 16), torch.tensor([0, 2, 1, 1, 0])
    for class_weight in (0.0, 0.7):  # the class head's term is part of the compiled loss (one function each)
        eager, eager_losses, _ = per_sample_real_gradients(D, images, labels, 0.8, class_weight, pad_to=8)
        compiled, compiled_losses, _ = per_sample_real_gradients(D, images, labels, 0.8, class_weight, pad_to=8,
                                                                 compile=True)
        assert torch.allclose(compiled_losses, eager_losses, atol=1e-6)
        for name in eager:
            assert torch.allclose(compiled[name], eager[name], atol=1e-5), name
    assert len(per_sample._COMPILED) == 2 and not any(fn.failed for fn in per_sample._COMPILED.values())
