"""train.dp_clip_groups: under DP, named parts of D are clipped apart, each sample's gradient within
each group to C / sqrt(G). The whole gradient of a sample then stays within C, so the noise, the
accountant and epsilon are those of the flat clip; only the split of C between D's parts changes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medstylegan2.config import load_config
from medstylegan2.errors import ConfigError, PrivacyError
from medstylegan2.networks import Discriminator
from medstylegan2.privacy.engine import DPEngine
from medstylegan2.privacy.group_clip import clip_by_group, parameter_groups
from medstylegan2.privacy.per_sample import per_sample_real_gradients
from medstylegan2.trainer import SiteTrainer

TINY = ["model.resolution=16", "model.channel_base=256", "model.channel_max=16", "model.z_dim=16", "model.w_dim=16",
        "model.mapping_layers=2", "model.cmap_dim=16", "model.mbstd_group_size=0", "model.d_class_head=true",
        "train.batch_size=4"]
HEAD = "epilogue.class_head"


def small_d() -> Discriminator:
    torch.manual_seed(0)
    return Discriminator(img_resolution=16, channel_base=256, channel_max=16, cmap_dim=16, mbstd_group_size=0,
                         class_head=True).double()


def per_sample_norms(grads: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.sqrt(sum(grads[n].flatten(1).square().sum(dim=1) for n in names))


def test_each_prefix_is_a_group_and_the_remaining_parameters_one_more():
    names = ["blocks.0.w", "blocks.1.w", "epilogue.fc.w", "epilogue.class_head.w", "epilogue.class_head.b",
             "class_embedding.embed.w"]
    groups = parameter_groups(names, ["epilogue.class_head", "class_embedding"])
    assert groups == [["epilogue.class_head.w", "epilogue.class_head.b"], ["class_embedding.embed.w"],
                      ["blocks.0.w", "blocks.1.w", "epilogue.fc.w"]]
    # A prefix matches whole dotted names only: "blocks.1" is not "blocks.10".
    assert parameter_groups(["blocks.1.w", "blocks.10.w"], ["blocks.1"]) == [["blocks.1.w"], ["blocks.10.w"]]


def test_a_prefix_that_names_no_trained_parameter_is_a_clear_error():
    with pytest.raises(PrivacyError, match="train.dp_clip_groups: 'epilogue.class_haed' names no trained parameter"):
        parameter_groups(["blocks.0.w", "epilogue.class_head.w"], ["epilogue.class_haed"])


def test_every_group_is_clipped_to_its_share_and_the_whole_stays_within_c():
    torch.manual_seed(0)
    grads = {"a": torch.randn(6, 5) * 10, "b": torch.randn(6, 2, 3) * 0.01, "c": torch.randn(6, 4) * 3}
    groups = [["a"], ["b", "c"]]
    clipped = clip_by_group(grads, groups, max_grad_norm=1.0)
    bound = 1.0 / math.sqrt(2)
    assert torch.all(per_sample_norms(clipped, ["a"]) <= bound + 1e-6)
    assert torch.all(per_sample_norms(clipped, ["b", "c"]) <= bound + 1e-6)
    assert torch.all(per_sample_norms(clipped, ["a", "b", "c"]) <= 1.0 + 1e-6)
    # A group within its share is left as it was; one above it keeps its direction.
    small = {"a": torch.full((1, 4), 0.1), "b": torch.full((1, 4), 5.0)}
    out = clip_by_group(small, [["a"], ["b"]], max_grad_norm=1.0)
    assert torch.equal(out["a"], small["a"])
    assert torch.allclose(out["b"], small["b"] / small["b"].norm() * bound, atol=1e-6)
    # One group (or none) is the flat clip, left to Opacus.
    assert clip_by_group(grads, [["a", "b", "c"]], 1.0) is grads


def test_the_engine_releases_the_mean_of_group_clipped_gradients_with_unchanged_accounting():
    images = torch.randn(5, 1, 16, 16, dtype=torch.float64)
    labels = torch.arange(5) % 3
    released, accountants = {}, {}
    for groups in ([], [HEAD]):
        D = small_d()
        engine = DPEngine(num_examples=24, batch_size=4, max_grad_norm=0.01, noise_multiplier=0.0, seed=0)
        engine.bind(D, torch.optim.SGD(D.parameters(), lr=0.1), num_examples=24, batch_size=4, clip_groups=groups)
        per_sample, _, _ = per_sample_real_gradients(D, images, labels, 0.0, class_weight=1.0)
        engine.private_real_gradient(images, labels, 0.0, class_weight=1.0)
        released[bool(groups)] = {n: p.grad.clone() for n, p in D.named_parameters()}
        accountants[bool(groups)] = list(engine.accountant.history)
    names = [n for n, _ in small_d().named_parameters()]
    head = [n for n in names if n.startswith(HEAD + ".")]
    rest = [n for n in names if n not in head]
    bound = 0.01 / math.sqrt(2)
    factors = {n: (bound / (per_sample_norms(per_sample, g) + 1e-6)).clamp(max=1.0) for g in (head, rest) for n in g}
    grouped = {n: per_sample[n] * factors[n].view(-1, *([1] * (per_sample[n].dim() - 1))) for n in names}
    # Opacus' flat clip follows; the whole is within C, so it only takes its 1e-6 guard off.
    flat = (0.01 / (per_sample_norms(grouped, names) + 1e-6)).clamp(max=1.0)
    assert torch.all(flat > 1 - 1e-3)
    for name in names:
        expected = torch.einsum("b,b...->...", flat, grouped[name]) / 4  # / (q n), sigma 0
        assert torch.allclose(released[True][name], expected, rtol=1e-6, atol=1e-12), name
    assert accountants[True] == accountants[False]


def test_the_config_key_reaches_the_site_engine_and_a_wrong_prefix_fails_before_training():
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (24, 1, 16, 16), dtype=np.uint8), np.arange(24) % 3
    dp = ["privacy.enabled=true", "privacy.noise_multiplier=1.0", "privacy.noise_seed=0"]
    cfg = load_config(None, TINY + dp + [f"train.dp_clip_groups=[{HEAD}]"])
    engine = DPEngine(num_examples=24, batch_size=4, max_grad_norm=1.0, noise_multiplier=1.0, seed=0)
    trainer = SiteTrainer(cfg, images, labels, device="cpu", privacy=engine)
    assert [sorted(g) for g in engine.clip_groups[:1]] == [[f"{HEAD}.bias", f"{HEAD}.weight"]]
    trainer.train_steps(2)
    assert all(torch.isfinite(p).all() for p in trainer.D.parameters())

    cfg = load_config(None, TINY + dp + ["train.dp_clip_groups=[epilogue.nothing]"])
    engine = DPEngine(num_examples=24, batch_size=4, max_grad_norm=1.0, noise_multiplier=1.0, seed=0)
    with pytest.raises(PrivacyError, match="'epilogue.nothing' names no trained parameter"):
        SiteTrainer(cfg, images, labels, device="cpu", privacy=engine)
    with pytest.raises(ConfigError, match="train.dp_clip_groups"):
        load_config(None, TINY + ["train.dp_clip_groups=['']"])
