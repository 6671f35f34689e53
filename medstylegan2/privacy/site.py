"""One site round under the site's own privacy policy: refuse, decline, or train and record.

The site, not the server, decides its privacy. Its policy is a file it names itself (node config
``privacy-policy``; a simulated site: the file the simulation driver wrote for it,
``simulated_policy_path``); the server's run config only *asks* (``request.RoundRequest``).
``SitePrivacy.round`` is the order of every round, held under the ledger's lock:

1. **lock** the site's lifetime ledger (one process of the site at a time; a damaged, edited or
   rewound ledger raises ``LedgerError`` here and the site does not train);
2. **check the request** against the policy (``request.check_request``): a request for less
   privacy than the policy allows (DP off, less noise, another clip norm, a larger delta, a noise
   seed, ...) raises ``PrivacyRefusal``, whose reason (computed from policy and request only,
   never from the data) the server logs as a failed site;
3. **check the budget**: would the lifetime epsilon after this round, composed by Opacus'
   accountant over every release the ledger holds plus this one, pass the policy's budget? Then
   the round is declined (``RoundPrivacy.declined``): nothing trains, the ledger is unchanged;
   With a class guide (``train.class_guide_weight``), ``RoundPrivacy.class_guide`` reuses the
   run's guide or checks the budget with the guide's release added, trains it with DP-SGD and
   records that release before it is used (``privacy.class_guide``); with class moments
   (``train.class_moments_weight``), ``RoundPrivacy.class_moments`` does the same for their one
   Gaussian release (``privacy.class_moments``);
4. **train** (the caller, ``fl.site_round.run_site_round``) with an engine whose accountant history
   is the ledger's (``make_engine``, ``restore``): epsilon continues from everything the site
   ever released, whatever local state was lost;
5. **record** the release in the ledger (appended, fsynced) and only then return the reply's
   privacy figures; the caller builds the reply after that, so no update leaves unrecorded.

A site without a policy trains only rounds that ask for no DP; a DP round is refused (it has no
ledger to keep its spend in).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional

import numpy as np

from medstylegan2.errors import UserError
from medstylegan2.patient_ids import read_patient_ids
from medstylegan2.privacy.fingerprint import dataset_fingerprint
from medstylegan2.privacy.ledger import CLASS_GUIDE, CLASS_MOMENTS, PrivacyLedger, Release
from medstylegan2.privacy.policy import SitePolicy, check_site_size, load_policy
from medstylegan2.privacy.request import EffectiveSettings, RoundRequest, check_budget, check_request

if TYPE_CHECKING:
    from medstylegan2.privacy.class_moments import ClassMoments

log = logging.getLogger(__name__)

# Node config key naming the site's policy file (deployment: --node-config "privacy-policy=...").
POLICY_NODE_KEY = "privacy-policy"
# Simulation: the folder where the driver wrote one policy file per virtual site (the site
# operator's side of a simulation: set by the driver in its own environment, never sent by the
# server). See ``simulated_policy_path``.
SIMULATED_POLICIES_ENV = "MEDSTYLEGAN2_SITE_POLICIES"
REFUSAL_PREFIX = "refused by the site's privacy policy: "


class PrivacyRefusal(UserError):
    """The server asked for a round that the site's privacy policy does not allow; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(REFUSAL_PREFIX + reason)
        self.reason = reason


def simulated_policy_path(folder: str | Path, site: str) -> Path:
    """Where a simulation driver keeps the policy of virtual site ``site``."""
    return Path(folder) / f"{site}.yaml"


def write_simulated_policies(cfg: Any, run_dir: str | Path, site_sizes: Mapping[str, int]) -> Optional[Path]:
    """Each virtual site's own policy file, ``RUN_DIR/site_policies/<site>.yaml``; the folder (None: none needed).

    A simulation's driver plays every hospital's operator: the policy is ``privacy.policy`` (or
    the ``privacy`` section) with each site's own ledger folder (default
    ``RUN_DIR/privacy_ledgers/<site>``; ``policy.write_site_policies``). Without DP and without a
    policy file there is nothing to write: the sites then train only rounds without DP.
    """
    from medstylegan2.privacy.policy import write_site_policies

    if not cfg.privacy.enabled and not cfg.privacy.policy:
        return None
    folder = Path(run_dir) / "site_policies"
    write_site_policies(folder, site_sizes, ledger_root=Path(run_dir) / "privacy_ledgers",
                        policy_file=cfg.privacy.policy, privacy=cfg.privacy)
    return folder


def policy_path_of(node_config: Mapping[str, Any], site: str) -> Optional[Path]:
    """The site's policy file: node config ``privacy-policy``; a simulated site: the driver's file for it."""
    if node_config.get(POLICY_NODE_KEY):
        return Path(str(node_config[POLICY_NODE_KEY])).expanduser()
    simulated = "partition-id" in node_config and "data-dir" not in node_config
    folder = os.environ.get(SIMULATED_POLICIES_ENV)
    if simulated and folder:
        path = simulated_policy_path(folder, site)
        return path if path.is_file() else None
    return None


@dataclass
class RoundPrivacy:
    """One round's privacy, decided under the ledger's lock (see the module docstring)."""

    policy: Optional[SitePolicy]
    settings: EffectiveSettings
    ledger: Optional[PrivacyLedger]
    run: str
    round_num: int
    groups: Optional[np.ndarray] = None
    declined_reason: Optional[str] = None
    recorded: Optional[dict[str, Any]] = field(default=None, repr=False)

    @property
    def dp(self) -> bool:
        return self.settings.dp

    @property
    def declined(self) -> bool:
        return self.declined_reason is not None

    @property
    def nominal_size(self) -> Optional[int]:
        return self.settings.nominal_size

    def make_engine(self, num_examples: int):
        """The DP engine for this round (None without DP): the policy's settings, fresh OS-entropy noise."""
        if not self.dp:
            return None
        from medstylegan2.privacy.engine import DPEngine

        s = self.settings
        engine = DPEngine(num_examples=num_examples, batch_size=s.batch_size, max_grad_norm=s.max_grad_norm,
                          noise_multiplier=s.noise_multiplier, delta=s.delta, accountant=s.accountant,
                          nominal_size=s.nominal_size, groups=self.groups if s.unit == "patient" else None)
        self.restore(engine)
        return engine

    def restore(self, engine: Any) -> None:
        """Set the engine's accountant history to the ledger's: epsilon over every release, not just this run's."""
        if self.ledger is not None and engine is not None:
            engine.accountant.history = list(self.ledger.history())

    def class_guide(self, cfg: Any, images: np.ndarray, labels: np.ndarray, *, device: Any = "cpu",
                    seed: int = 0) -> Optional[Any]:
        """This run's class guide under the round's DP settings (``privacy.class_guide``), frozen.

        The one kept beside the ledger for this run, data set and setting; otherwise trained now
        with DP-SGD at the round's sigma and sample rate and recorded in the ledger (fsynced)
        before it is kept or used. None when the guide and this round together would pass the
        budget: the round is then declined (``declined_reason``) and nothing is spent.
        """
        from medstylegan2.privacy.class_guide import (GuideNoise, GuideStore, guide_digest, guide_settings,
                                                      train_from_settings)

        s = self.settings
        assert self.dp and self.ledger is not None and self.policy is not None
        if s.guide_steps < 1:
            raise UserError("train.class_guide_weight > 0 but the round's request has no guide_steps: the server's "
                            "and the site's run configs differ")
        settings = guide_settings(cfg)
        noise = GuideNoise(noise_multiplier=s.noise_multiplier, sample_rate=s.sample_rate,
                           expected_batch_size=s.nominal_batch_size)
        digest = guide_digest(run=self.run, fingerprint=self.ledger.fingerprint, settings=settings, noise=noise)
        store = GuideStore(self.ledger.dir)
        found = store.load(digest, settings, self.ledger.entries())
        if found is not None:
            log.info("round %d: class guide %s reused (no new privacy cost)", self.round_num, store.path(digest))
            return found.to(device)
        release = (s.noise_multiplier, s.sample_rate, s.guide_steps)
        budget = check_budget(self.policy, s, self.ledger, run=self.run, also=[release])
        if not budget.ok:
            self.declined_reason = budget.reason
            return None
        guide = train_from_settings(images, labels, settings, steps=s.guide_steps, batch_size=s.batch_size,
                                    noise=noise, groups=self.groups if s.unit == "patient" else None, seed=seed,
                                    device=device)
        entry = self.ledger.record_release(Release(
            run=self.run, round=self.round_num, noise_multiplier=s.noise_multiplier, sample_rate=s.sample_rate,
            steps=s.guide_steps, accountant=s.accountant, unit=s.unit, max_grad_norm=settings["max_grad_norm"],
            delta=s.delta, mechanism=CLASS_GUIDE))
        path = store.save(digest, guide, settings, entry)
        log.info("round %d: class guide trained (%d DP-SGD steps), recorded (ledger entry %d), kept in %s",
                 self.round_num, s.guide_steps, entry["index"], path)
        return guide

    def class_moments(self, cfg: Any, images: np.ndarray, labels: np.ndarray, *, device: Any = "cpu"
                      ) -> Optional["ClassMoments"]:
        """This run's class-moments release (``privacy.class_moments``) at the round's ``moments_noise``.

        The one kept beside the ledger for this run, data set and setting; otherwise made now and
        recorded in the ledger (fsynced) before it is kept or used. None when it and this round
        together would pass the budget: the round is then declined and nothing is spent.
        """
        from medstylegan2.privacy.accounting import gaussian_release
        from medstylegan2.privacy.class_moments import MomentsStore, SENSITIVITY, moments_digest, release_from_config

        s = self.settings
        assert self.dp and self.ledger is not None and self.policy is not None
        if s.moments_noise is None:
            raise UserError("train.class_moments_weight > 0 but the round's request has no moments_noise: the "
                            "server's and the site's run configs differ")
        digest = moments_digest(run=self.run, fingerprint=self.ledger.fingerprint, num_classes=cfg.model.num_classes,
                                grid=cfg.train.class_moments_grid, noise_multiplier=s.moments_noise,
                                spread=cfg.train.class_moments_spread)
        store = MomentsStore(self.ledger.dir)
        found = store.load(digest, self.ledger.entries())
        if found is not None:
            log.info("round %d: class moments %s reused (no new privacy cost)", self.round_num, store.path(digest))
            return found.to(device)
        sigma, sample_rate, steps = gaussian_release(s.moments_noise)
        budget = check_budget(self.policy, s, self.ledger, run=self.run, also=[(sigma, sample_rate, steps)])
        if not budget.ok:
            self.declined_reason = budget.reason
            return None
        moments = release_from_config(cfg, images, labels, noise_multiplier=s.moments_noise,
                                      groups=self.groups if s.unit == "patient" else None)
        entry = self.ledger.record_release(Release(
            run=self.run, round=self.round_num, noise_multiplier=sigma, sample_rate=sample_rate, steps=steps,
            accountant=s.accountant, unit=s.unit, max_grad_norm=SENSITIVITY, delta=s.delta, mechanism=CLASS_MOMENTS))
        path = store.save(digest, moments, entry)
        log.info("round %d: class moments released (sigma %.3g), recorded (ledger entry %d), kept in %s",
                 self.round_num, s.moments_noise, entry["index"], path)
        return moments.to(device)

    def figures(self) -> dict[str, float]:
        """The reply's privacy figures (``dp_*``), all from the policy, the request and the ledger:
        ``epsilon`` and ``steps`` over this run's releases (the server's run token), and
        ``lifetime_epsilon`` over every release the ledger holds (what the budget is checked against)."""
        if not self.dp or self.ledger is None:
            return {}
        from medstylegan2.privacy.accounting import epsilon_of_history

        s = self.settings
        entries = self.ledger.entries()
        everything = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries]
        this_run = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries if e["run"] == self.run]
        return {"epsilon": epsilon_of_history(this_run, s.delta, s.accountant), "delta": s.delta,
                "sample_rate": s.sample_rate, "steps": float(sum(n for _, _, n in this_run)),
                "noise_multiplier": s.noise_multiplier, "max_grad_norm": s.max_grad_norm,
                "lifetime_epsilon": epsilon_of_history(everything, s.delta, s.accountant)}

    def record(self, steps: int) -> dict[str, float]:
        """Append this round's release (``steps`` noised D updates) to the ledger, fsynced; the reply's figures.

        Call it after training and before anything of the round leaves the site.
        """
        if not self.dp:
            return {}
        assert self.ledger is not None
        s = self.settings
        self.recorded = self.ledger.record_release(Release(
            run=self.run, round=self.round_num, noise_multiplier=s.noise_multiplier, sample_rate=s.sample_rate,
            steps=int(steps), accountant=s.accountant, unit=s.unit, max_grad_norm=s.max_grad_norm, delta=s.delta))
        figures = self.figures()
        log.info("round %d: release recorded in %s (entry %d); epsilon %.4g this run, %.4g lifetime, at delta %.3g",
                 self.round_num, self.ledger.path, self.recorded["index"], figures["epsilon"],
                 figures["lifetime_epsilon"], s.delta)
        return figures


@dataclass
class SitePrivacy:
    """A site's privacy policy (None: the site has none) and where it came from."""

    policy: Optional[SitePolicy]

    @classmethod
    def of_node(cls, node_config: Mapping[str, Any], site: str) -> "SitePrivacy":
        path = policy_path_of(node_config, site)
        return cls(policy=None if path is None else load_policy(path))

    @property
    def dp_required(self) -> bool:
        return self.policy is not None and self.policy.dp_required

    def reported_size(self, num_examples: int) -> int:
        """The example count the site may tell the server: under a DP policy, its public nominal size."""
        if self.dp_required and self.policy.nominal_size is not None:
            return int(self.policy.nominal_size)
        return int(num_examples)

    @contextlib.contextmanager
    def round(self, request: RoundRequest, images: np.ndarray, labels: np.ndarray, *, run: str, round_num: int,
              groups: Optional[np.ndarray] = None, sources: Optional[list[str]] = None) -> Iterator[RoundPrivacy]:
        """Lock, check the request, check the budget; the caller trains and records inside the ``with``."""
        policy = self.policy
        if policy is None:
            if request.dp:
                raise PrivacyRefusal("this site has no privacy policy (node config 'privacy-policy'), so it keeps "
                                     "no privacy ledger and does not train under DP")
            yield RoundPrivacy(policy=None, settings=EffectiveSettings(
                dp=False, local_steps=request.local_steps, batch_size=request.batch_size), ledger=None, run=run,
                round_num=round_num)
            return
        decision = check_request(policy, request)
        if not decision.ok:
            raise PrivacyRefusal(decision.reason)
        settings = decision.settings
        if not settings.dp:
            yield RoundPrivacy(policy=policy, settings=settings, ledger=None, run=run, round_num=round_num)
            return
        if settings.unit == "patient" and policy.patient_csv is not None:
            groups = read_patient_ids(policy.patient_csv, sources)
        if settings.unit == "patient" and groups is None:
            raise UserError(f"{policy.source}: unit is 'patient' but this site's images carry no patient ids "
                            "(DICOM PatientID, or the policy's patient_csv)")
        check_site_size(policy, len(labels) if settings.unit == "image" else len(np.unique(groups)))
        ledger = PrivacyLedger(policy.ledger_dir, dataset_fingerprint(
            images, labels, groups if settings.unit == "patient" else None))
        with ledger.lock():
            budget = check_budget(policy, settings, ledger, run=run)
            yield RoundPrivacy(policy=policy, settings=settings, ledger=ledger, run=run, round_num=round_num,
                               groups=groups, declined_reason=None if budget.ok else budget.reason)
