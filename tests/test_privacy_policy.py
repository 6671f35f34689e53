"""The site's privacy policy: loading and validation (file and run config through one path), and the
check of what a server asks for: DP off, sigma 0 or below the floor, a noise seed, a larger epsilon,
another delta/clip/accountant/unit are declined with a reason; the lifetime budget is checked
against the ledger."""

from __future__ import annotations

import math

import pytest
import yaml
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from medstylegan2.config import load_config
from medstylegan2.privacy.ledger import PrivacyLedger, Release
from medstylegan2.privacy.policy import (DEFAULT_DELTA, PolicyError, check_site_size, load_policy,
                                         policy_from_mapping, policy_from_run_config)
from medstylegan2.privacy.request import RoundRequest, check_budget, check_request, request_from_run_config

STRICT = {"dp_required": True, "delta": 1e-5, "max_grad_norm": 0.25, "min_noise_multiplier": 0.8,
          "epsilon_per_run": 8.0, "lifetime_epsilon": 10.0, "min_site_size": 1000, "unit": "image",
          "accountant": "rdp", "nominal_size": 4000, "ledger_dir": "ledger"}


def write_policy(tmp_path, **changes):
    raw = {**STRICT, **changes}
    raw = {k: v for k, v in raw.items() if v is not None}
    path = tmp_path / "privacy.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def strict_policy(tmp_path, **changes):
    return load_policy(write_policy(tmp_path, **changes))


def request(**changes) -> RoundRequest:
    base = dict(dp=True, local_steps=40, batch_size=16, noise_multiplier=1.0, max_grad_norm=0.25)
    return RoundRequest(**{**base, **changes})


def opacus_epsilon(sigma: float, q: float, steps: int, delta: float, mechanism: str = "rdp") -> float:
    accountant = create_accountant(mechanism=mechanism)
    accountant.history = [(sigma, q, steps)]
    return float(accountant.get_epsilon(delta=delta))


# -- loading ---------------------------------------------------------------------------------------


def test_a_policy_file_loads_with_paths_relative_to_it(tmp_path):
    policy = strict_policy(tmp_path)
    assert policy.dp_required and policy.delta == 1e-5 and policy.nominal_size == 4000
    assert policy.ledger_dir == str(tmp_path / "ledger")
    assert policy.source == str(tmp_path / "privacy.yaml")


@pytest.mark.parametrize("changes, key, words", [
    ({"delta": 1e-4}, "delta", "above the largest allowed delta"),
    ({"min_noise_multiplier": 0}, "min_noise_multiplier", "must be > 0"),
    ({"lifetime_epsilon": None}, "lifetime_epsilon", "is required when dp_required"),
    ({"ledger_dir": None}, "ledger_dir", "is required when dp_required"),
    ({"nominal_size": None}, "nominal_size", "is required when dp_required"),
    ({"min_noise_multiplier": None, "epsilon_per_run": None}, "min_noise_multiplier or epsilon_per_run", "required"),
    ({"unit": "study"}, "unit", "use one of: image, patient"),
    ({"epsilon_per_run": 12.0}, "epsilon_per_run", "larger than lifetime_epsilon"),
    ({"nominal_size": 2.5}, "nominal_size", "whole number"),
    ({"dp_required": "yes"}, "dp_required", "true or false"),
    ({"lifetime_epsilon": float("inf")}, "lifetime_epsilon", "finite number"),
])
def test_a_bad_policy_file_is_rejected_naming_the_file_and_the_key(tmp_path, changes, key, words):
    path = write_policy(tmp_path, **changes)
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    assert str(path) in str(err.value) and f"'{key}'" in str(err.value) and words in str(err.value)


def test_unknown_keys_and_a_missing_dp_required_are_rejected(tmp_path):
    with pytest.raises(PolicyError, match=r"unknown key 'noise_seed'; allowed keys: dp_required"):
        load_policy(write_policy(tmp_path, noise_seed=3))
    with pytest.raises(PolicyError, match=r"'dp_required' is required"):
        policy_from_mapping({"delta": 1e-6}, where="site.yaml")
    with pytest.raises(PolicyError, match="not found"):
        load_policy(tmp_path / "nope.yaml")


def test_the_run_config_goes_through_the_same_validation_as_a_policy_file(tmp_path):
    cfg = load_config(None, ["privacy.enabled=true", "privacy.target_epsilon=8", "privacy.budget_epsilon=10",
                             "privacy.max_grad_norm=0.25", "model.mbstd_group_size=0"])
    from_config = policy_from_run_config(cfg.privacy, ledger_dir=tmp_path / "ledger", nominal_size=4000,
                                         min_site_size=1000)
    from_file = strict_policy(tmp_path, min_noise_multiplier=None)
    assert from_config == from_file  # `source` is not compared
    assert from_config.delta == DEFAULT_DELTA  # privacy.delta: null -> the policy default, not 1/(10n)
    # The run config is held to the same rules: a delta above 1e-5 or no ledger is refused the same way.
    loose = load_config(None, ["privacy.enabled=true", "privacy.noise_multiplier=1", "privacy.budget_epsilon=10",
                               "privacy.delta=0.001", "model.mbstd_group_size=0"])
    with pytest.raises(PolicyError, match=r"run config privacy section: 'delta' = 0.001 is above"):
        policy_from_run_config(loose.privacy, ledger_dir=tmp_path, nominal_size=100)
    no_budget = load_config(None, ["privacy.enabled=true", "privacy.noise_multiplier=1", "model.mbstd_group_size=0"])
    with pytest.raises(PolicyError, match=r"'lifetime_epsilon' is required"):
        policy_from_run_config(no_budget.privacy, ledger_dir=tmp_path, nominal_size=100)
    with pytest.raises(PolicyError, match=r"'ledger_dir' is required"):
        policy_from_run_config(cfg.privacy, nominal_size=100)


def test_site_size_below_the_minimum_is_refused_locally(tmp_path):
    policy = strict_policy(tmp_path)
    check_site_size(policy, 1000)
    with pytest.raises(PolicyError, match="fewer than min_site_size = 1000"):
        check_site_size(policy, 999)


# -- what the server asks for ---------------------------------------------------------------------


def test_a_request_within_the_policy_gets_public_settings(tmp_path):
    decision = check_request(strict_policy(tmp_path), request())
    assert decision.ok, decision.reason
    s = decision.settings
    assert s.dp and s.noise_multiplier == 1.0 and s.max_grad_norm == 0.25 and s.delta == 1e-5
    # q and the divisor of the noisy sum come from public numbers only: batch 16 over nominal 4000.
    assert s.sample_rate == 16 / 4000 and s.nominal_batch_size == pytest.approx(16)
    assert s.accountant == "rdp" and s.unit == "image"


@pytest.mark.parametrize("changes, words", [
    ({"dp": False, "noise_multiplier": None}, "requires differential privacy"),
    ({"noise_seed": 7}, "noise seed"),
    ({"noise_seed": 0}, "noise seed"),
    ({"noise_multiplier": 0.0}, "must be > 0"),
    ({"noise_multiplier": -1.0}, "must be > 0"),
    ({"noise_multiplier": float("nan")}, "must be > 0"),
    ({"noise_multiplier": 0.5}, "below this site's floor 0.8"),
    ({"noise_multiplier": None, "target_epsilon": 9.0, "planned_rounds": 10}, "above this site's epsilon per run"),
    ({"noise_multiplier": 0.85, "planned_rounds": 3000}, "above this site's epsilon per run"),
    ({"noise_multiplier": None}, "exactly one of noise_multiplier and target_epsilon"),
    ({"delta": 1e-4}, "above this site's delta"),
    ({"max_grad_norm": 1.0}, "clips at max_grad_norm 0.25"),
    ({"accountant": "prv"}, "accounts with 'rdp'"),
    ({"unit": "patient"}, "unit of privacy is 'image'"),
    ({"batch_size": 5000}, "larger than this site's nominal size"),
    ({"local_steps": 0}, "must be >= 1"),
])
def test_requests_that_break_the_policy_are_declined_with_a_reason(tmp_path, changes, words):
    decision = check_request(strict_policy(tmp_path), request(**changes))
    assert not decision.ok and decision.settings is None
    assert words in decision.reason


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_a_target_epsilon_within_the_policy_gets_the_opacus_sigma_for_the_planned_run(tmp_path):
    decision = check_request(strict_policy(tmp_path, min_noise_multiplier=None),
                             request(noise_multiplier=None, target_epsilon=6.0, planned_rounds=25))
    assert decision.ok, decision.reason
    q, steps = 16 / 4000, 40 * 25
    expected = get_noise_multiplier(target_epsilon=6.0, target_delta=1e-5, sample_rate=q, steps=steps,
                                    accountant="rdp")
    assert decision.settings.noise_multiplier == pytest.approx(expected, rel=1e-9)
    assert opacus_epsilon(decision.settings.noise_multiplier, q, steps, 1e-5) <= 6.0


def test_a_stricter_delta_is_accepted_and_a_policy_without_dp_allows_non_private_rounds(tmp_path):
    assert check_request(strict_policy(tmp_path), request(delta=1e-7)).settings.delta == 1e-7
    relaxed = policy_from_mapping({"dp_required": False}, where="phantoms.yaml")
    off = check_request(relaxed, request(dp=False, noise_multiplier=None))
    assert off.ok and not off.settings.dp
    # ... but it cannot train with DP: nothing to keep a ledger in.
    on = check_request(relaxed, request())
    assert not on.ok and "not set up for DP" in on.reason and "ledger_dir" in on.reason


def test_a_malformed_request_from_the_wire_is_declined_not_raised(tmp_path):
    policy = strict_policy(tmp_path)
    assert "must be float" in check_request(policy, {"dp": True, "local_steps": 4, "batch_size": 2,
                                                    "noise_multiplier": "1.0"}).reason
    assert "unknown key" in check_request(policy, {"dp": True, "local_steps": 4, "batch_size": 2,
                                                   "enable": False}).reason
    assert "lacks dp" in check_request(policy, {"local_steps": 4, "batch_size": 2}).reason
    wire = request(max_grad_norm=None).to_mapping()
    assert "max_grad_norm" not in wire and check_request(policy, wire).ok


def test_the_server_half_of_a_run_config_asks_for_what_the_config_says():
    cfg = load_config(None, ["privacy.enabled=true", "privacy.target_epsilon=8", "privacy.budget_epsilon=10",
                             "privacy.noise_seed=3", "model.mbstd_group_size=0", "federation.rounds=5"])
    req = request_from_run_config(cfg)
    assert req.dp and req.target_epsilon == 8.0 and req.planned_rounds == 5 and req.noise_seed == 3
    assert req.local_steps == cfg.federation.local_steps and req.batch_size == cfg.train.batch_size


def test_declined_reasons_do_not_depend_on_the_site_data(tmp_path):
    # check_request has no access to n: the same policy and request give the same decision.
    policy = strict_policy(tmp_path)
    assert check_request(policy, request(noise_multiplier=0.1)) == check_request(policy, request(noise_multiplier=0.1))


# -- the lifetime budget ----------------------------------------------------------------------------


def test_the_lifetime_budget_declines_the_round_that_would_pass_it(tmp_path):
    policy = strict_policy(tmp_path, epsilon_per_run=None, lifetime_epsilon=5.5, min_noise_multiplier=1.0,
                           nominal_size=400, min_site_size=100)
    settings = check_request(policy, request(noise_multiplier=1.0, local_steps=100)).settings
    q = settings.sample_rate
    per_round = [opacus_epsilon(1.0, q, 100 * k, 1e-5) for k in (1, 2, 3, 4, 5, 6)]
    allowed = max(k for k, eps in enumerate(per_round, start=1) if eps <= 5.5)
    assert 1 < allowed < 6, per_round
    ledger = PrivacyLedger(policy.ledger_dir, "f" * 64)
    trained = 0
    for round_num in range(1, 8):
        # A new run token every round (a restarted server): the lifetime budget does not care.
        decision = check_budget(policy, settings, ledger, run=f"run-{round_num}")
        if not decision.ok:
            assert "lifetime privacy budget" in decision.reason
            continue
        ledger.record_release(Release(run=f"run-{round_num}", round=1, noise_multiplier=1.0, sample_rate=q,
                                      steps=100, accountant="rdp", unit="image", max_grad_norm=0.25, delta=1e-5))
        trained += 1
    assert trained == allowed
    assert ledger.lifetime_epsilon(1e-5) <= 5.5
    assert math.isclose(ledger.lifetime_epsilon(1e-5), per_round[allowed - 1], abs_tol=1e-6)


def test_the_per_run_budget_counts_only_that_runs_releases(tmp_path):
    policy = strict_policy(tmp_path, epsilon_per_run=4.0, lifetime_epsilon=10.0, min_noise_multiplier=None,
                           nominal_size=400, min_site_size=100)
    settings = check_request(policy, request(noise_multiplier=1.0, local_steps=50)).settings
    ledger = PrivacyLedger(policy.ledger_dir, "f" * 64)
    trained = {"a": 0, "b": 0}
    for run in ("a", "a", "a", "a", "b"):
        if check_budget(policy, settings, ledger, run=run).ok:
            ledger.record_release(Release(run=run, round=trained[run] + 1, noise_multiplier=1.0,
                                          sample_rate=settings.sample_rate, steps=50, accountant="rdp", unit="image",
                                          max_grad_norm=0.25, delta=1e-5))
            trained[run] += 1
    assert trained == {"a": 3, "b": 1}
    assert ledger.run_epsilon("a", 1e-5) <= 4.0 < ledger.lifetime_epsilon(1e-5)
