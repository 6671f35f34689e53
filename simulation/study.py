"""The ``study`` command: the privacy-utility study as one resumable command.

    medstylegan2 study --config configs/study.yaml --out DIR [--profile quick|full] [--arms a,b,...]

Every arm (and seed) is a run folder ``DIR/<arm>/seed-<s>`` trained through the project's Flower
simulation (``simulation.cli.simulate``), then evaluated the same way as every other arm
(``medstylegan2.study.evaluate_checkpoint``). ``DIR/<arm>/seed-<s>/arm.json`` marks a finished
arm: rerunning skips it. An arm killed mid-run resumes from its last round checkpoint; one killed
before its first checkpoint restarts from scratch. Arms that start from public data share one
pretraining run, ``DIR/public-pretrain``. Outputs (``study.json``, ``study.md``, ``utility.png``,
``arms.png``) are rewritten after every finished arm from all finished arms in DIR.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from medstylegan2.config import RunConfig, load_config
from medstylegan2.errors import UserError
from medstylegan2.runfolder import RunFolder, atomic_write_text, read_checkpoint, round_numbers_in
from medstylegan2.study import config as sc
from medstylegan2.study import evaluate as se
from medstylegan2.study import report as sr

COMMAND_HELP = ("Run the privacy-utility study (arms central, fed-iid, fed-noniid, dp-eps10, dp-eps1): one "
                "run folder per arm, resumable; writes study.json, study.md, utility.png, arms.png.")

log = logging.getLogger("medstylegan2.study")

SETTINGS_FILE = "study-settings.json"
PUBLIC_DIR = "public-pretrain"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="configs/study.yaml", help="study YAML (default configs/study.yaml)")
    p.add_argument("--out", required=True, help="study folder: one run folder per arm, study.json, figures")
    p.add_argument("--profile", default="quick", help="profile of the study config (quick or full)")
    p.add_argument("--arms", default=None, help="comma-separated arms to run (default: all)")


def run(args: argparse.Namespace) -> int:
    from simulation.cli import quiet_flower_duplicates

    quiet_flower_duplicates()
    arms = [a.strip() for a in args.arms.split(",") if a.strip()] if args.arms else None
    doc = run_study(args.config, args.out, profile=args.profile, arms=arms)
    print((Path(args.out) / "study.md").read_text() if (Path(args.out) / "study.md").is_file() else json.dumps(doc))
    return 0


# ----------------------------------------------------------------------------------------------


def _default_simulate(config_path: Path, overrides: list[str], *, run_dir: Path, resume: bool) -> Path:
    from simulation.cli import simulate

    return simulate(config_path, overrides, run_dir=run_dir, resume=resume)


def run_study(config_path: str | Path, out: str | Path, *, profile: str = "quick",
              arms: Optional[Sequence[str]] = None,
              simulate_fn: Optional[Callable[..., Path]] = None) -> dict[str, Any]:
    """Run (or finish) the selected arms, evaluate them, write the outputs; returns study.json's content."""
    study = sc.load_study(config_path)
    spec = study.profile(profile)
    names = study.arm_names(arms)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    simulate_fn = simulate_fn or _default_simulate

    first_cfg = load_config(study.base_config_path, sc.arm_overrides(study, profile, names[0], seed=spec.seeds[0]))
    train, heldout = _load_split(first_cfg)
    classifier = _shared_classifier(out, train, spec, first_cfg)
    for arm in names:
        public_ckpt = _public_pretrain(study, profile, out, arm) if study.arms[arm].public_init else None
        for seed in spec.seeds:
            _run_arm_seed(study, profile, arm, seed, out=out, classifier=classifier, public_ckpt=public_ckpt,
                          train=train, heldout=heldout, simulate_fn=simulate_fn)
        _write_outputs(study, profile, out, train.class_names)
    doc = json.loads((out / sr.STUDY_FILE).read_text())
    return doc


def _load_split(cfg: RunConfig):
    from medstylegan2.fl.partition import load_split

    return load_split(cfg)


def _shared_classifier(out: Path, train, spec: sc.ProfileSpec, cfg: RunConfig) -> Path:
    """The real-trained domain classifier every arm is judged by (trained once per study folder)."""
    from medstylegan2.config import MetricsConfig
    from medstylegan2.metrics.evaluate import CLASSIFIER_FILE, domain_classifier

    path = out / CLASSIFIER_FILE
    domain_classifier(path, train, MetricsConfig(classifier_steps=spec.classifier_steps), seed=0)
    return path


def _public_pretrain(study: sc.StudyConfig, profile: str, out: Path, arm: str) -> Path:
    """Pretrain G and D on the public stand-in set for ``arm``'s model (no private image is read,
    so no privacy is spent). One folder per model config: arms with the same model share it."""
    from medstylegan2.trainer import SiteTrainer

    spec = study.profile(profile)
    cfg = load_config(study.base_config_path, sc.public_overrides(study, profile, arm))
    sc.check_public_differs(study, cfg.data.seed)
    folder = out / PUBLIC_DIR / _pretraining_digest(study, profile, cfg)
    ckpt, done = folder / "checkpoint.pt", folder / "done.json"
    if done.is_file() and ckpt.is_file():
        log.info("public pretraining: reusing %s", ckpt)
        return ckpt
    if folder.exists():
        shutil.rmtree(folder)
    public = sc.public_images(study, cfg.model.resolution)
    log.info("public pretraining for %s: %d Normal-only phantoms (data seed %d), %d steps", arm, len(public),
             study.spec.public.data_seed, spec.public_steps)
    started = time.perf_counter()
    trainer = SiteTrainer(cfg, public.images, public.labels, device="cpu", seed=0)
    trainer.train_steps(spec.public_steps, progress=_pretraining_progress(spec.public_steps, started))
    trainer.save_checkpoint(ckpt)
    atomic_write_text(done, json.dumps({"minutes": (time.perf_counter() - started) / 60, "images": len(public),
                                           "data_seed": study.spec.public.data_seed, "steps": spec.public_steps}))
    return ckpt


def public_pretraining_digest(study: sc.StudyConfig, profile: str, arm: str) -> str:
    """What decides ``arm``'s public pretraining: its model, its public training settings, the public
    set and the steps. Arms with the same digest share one pretraining folder."""
    return _pretraining_digest(study, profile, load_config(study.base_config_path,
                                                           sc.public_overrides(study, profile, arm)))


def _pretraining_digest(study: sc.StudyConfig, profile: str, cfg: RunConfig) -> str:
    """``public_pretraining_digest`` of the pretraining's run config ``cfg``."""
    d = sc.digest_view(cfg.to_dict())
    return sc.settings_digest([json.dumps(d["model"], sort_keys=True), json.dumps(d["train"], sort_keys=True)],
                              {"public": sc.dataclass_dict(study.spec.public),
                               "steps": study.profile(profile).public_steps})


def _pretraining_progress(total: int, started: float) -> Callable[[int, dict], None]:
    """A ``train_steps`` hook that logs every tenth of the public pretraining's steps and the last
    (minutes of CPU work otherwise pass without a line)."""
    every = max(1, total // 10)

    def report(step: int, _stats: dict) -> None:
        if step % every == 0 or step == total:
            log.info("public pretraining: step %d / %d (%.1f min)", step, total, (time.perf_counter() - started) / 60)
    return report


def _arm_digest(study: sc.StudyConfig, profile: str, overrides: list[str], out: Path) -> str:
    """The resolved run config and the evaluation settings: comments and key order do not count, nor
    where the study folder lies (a warm start inside it counts by its path within it), so a study
    folder moved or copied elsewhere keeps its finished and unfinished arms."""
    return _config_digest(study, profile, overrides, relative_to=out)


def _config_digest(study: sc.StudyConfig, profile: str, overrides: list[str], *,
                   relative_to: Optional[Path]) -> str:
    spec = study.profile(profile)
    view = sc.digest_view(load_config(study.base_config_path, overrides).to_dict())
    init = view["train"].get("init_checkpoint")
    if init and relative_to is not None and Path(init).is_relative_to(relative_to.resolve()):
        view["train"]["init_checkpoint"] = Path(init).relative_to(relative_to.resolve()).as_posix()
    return sc.settings_digest([json.dumps(view, sort_keys=True)], {"n_per_class": spec.n_per_class,
                                                                   "classifier_steps": spec.classifier_steps})


def _init_path(overrides: Sequence[str]) -> Optional[str]:
    found = [o.split("=", 1)[1] for o in overrides if o.startswith(sc.INIT_OVERRIDE)]
    return found[-1] if found else None


def _digests_of_earlier_code(study: sc.StudyConfig, profile: str, overrides: list[str], run_dir: Path) -> set[str]:
    """The digests an arm warm-started from the public pretraining was recorded under before the
    warm start counted by its path within the study folder: its absolute path here, or where the
    folder lay when the arm ran (``study-settings.json`` keeps it) - the same pretraining only."""
    current = _init_path(overrides)
    if current is None:
        return set()
    paths = {current}
    settings = run_dir / SETTINGS_FILE
    if settings.is_file():
        stored = _init_path(json.loads(settings.read_text()).get("overrides", []))
        if stored is not None and Path(stored).parent.name == Path(current).parent.name:
            paths.add(stored)
    digests = set()
    for path in paths:
        at_path = [f"{sc.INIT_OVERRIDE}{path}" if o.startswith(sc.INIT_OVERRIDE) else o for o in overrides]
        digests.add(_config_digest(study, profile, at_path, relative_to=None))
    return digests


def _run_arm_seed(study: sc.StudyConfig, profile: str, arm: str, seed: int, *, out: Path, classifier: Path,
                  public_ckpt: Optional[Path], train, heldout, simulate_fn: Callable[..., Path]) -> dict[str, Any]:
    spec = study.profile(profile)
    run_dir = out / arm / f"seed-{seed}"
    overrides = sc.arm_overrides(study, profile, arm, seed=seed, public_checkpoint=public_ckpt)
    digest = _arm_digest(study, profile, overrides, out)
    accepted = {digest} | _digests_of_earlier_code(study, profile, overrides, run_dir)
    marker = run_dir / sr.ARM_FILE
    if marker.is_file():
        result = json.loads(marker.read_text())
        if result.get("digest") not in accepted:
            raise UserError(f"{run_dir} holds a finished arm with other settings than this study's; remove it or "
                            "choose another --out")
        if result["digest"] != digest:  # recorded by earlier code: from now on under the location-free digest
            result["digest"] = digest
            atomic_write_text(marker, json.dumps(result, indent=1))
        log.info("arm %s seed %d: finished before, skipped", arm, seed)
        return result

    settings = run_dir / SETTINGS_FILE
    resume = bool(round_numbers_in(run_dir))
    if resume and (not settings.is_file() or json.loads(settings.read_text()).get("digest") not in accepted):
        raise UserError(f"{run_dir} holds an unfinished run with other settings than this study's; remove it or "
                        "choose another --out")
    if not resume and run_dir.exists():
        shutil.rmtree(run_dir)  # killed before its first round checkpoint: start clean
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(settings, json.dumps({"digest": digest, "overrides": overrides}, indent=1))
    shutil.copyfile(classifier, run_dir / classifier.name)  # the run's own final evaluation reuses it

    cfg = load_config(study.base_config_path, overrides)
    rounds = round_numbers_in(run_dir)
    if not rounds or rounds[-1] < cfg.federation.rounds:
        log.info("arm %s seed %d: %s (%d site(s), %d rounds x %d local steps)%s", arm, seed,
                 "resuming" if resume else "training", cfg.federation.sites, cfg.federation.rounds,
                 cfg.federation.local_steps, f", warm start {public_ckpt}" if cfg.train.init_checkpoint else "")
        simulate_fn(study.base_config_path, overrides, run_dir=run_dir, resume=resume)
    _drop_failed_rounds(run_dir, arm, seed)
    rounds = round_numbers_in(run_dir)
    if not rounds:
        raise UserError(f"arm {arm} seed {seed}: the run wrote no round checkpoint into {run_dir}")
    checkpoint = run_dir / f"round_{rounds[-1]:03d}.pt"

    figures = se.evaluate_checkpoint(checkpoint, train=train, heldout=heldout, classifier_path=classifier,
                                     n_per_class=spec.n_per_class, classifier_steps=spec.classifier_steps,
                                     out_dir=run_dir / "study-eval", seed=seed)
    result = {"arm": arm, "seed": seed, "digest": digest, "checkpoint": str(checkpoint.relative_to(out)),
              "epsilon": _epsilon_of(checkpoint) if cfg.privacy.enabled else None,
              "delta": cfg.privacy.delta if cfg.privacy.enabled else None,
              "public_init": bool(cfg.train.init_checkpoint), "rounds": rounds[-1],
              "sites": cfg.federation.sites, "local_steps": cfg.federation.local_steps,
              "d_steps_per_g": cfg.train.d_steps_per_g, "updates": sc.updates_of(cfg),
              "minutes": training_seconds(run_dir, rounds[-1]) / 60,
              "declined_site_rounds": declined_site_rounds(run_dir), **figures}
    if result["declined_site_rounds"]:
        log.warning("arm %s seed %d: sites declined %d site-round(s) (see metrics.jsonl: e.g. a privacy budget spent "
                    "by a killed attempt), so the arm got less than its compute", arm, seed,
                    result["declined_site_rounds"])
    atomic_write_text(marker, json.dumps(result, indent=1))
    log.info("arm %s seed %d: CAS %.3f, TSTR-rel %s, FD-domain %s, %.1f min", arm, seed, result["cas"],
             result["tstr_relative"], result["fd_domain"], result["minutes"])
    return result


def _round_records(run_dir: Path) -> list[dict[str, Any]]:
    """The ``kind: round`` lines of the run's ``metrics.jsonl``, read by the file's owner (``RunFolder``)."""
    return [r for r in RunFolder(run_dir).metrics_records() if r.get("kind") == "round"]


def _site_statuses(record: dict[str, Any]) -> list[str]:
    return [str(site.get("status", "")) for site in record.get("sites", {}).values()]


def failed_rounds(run_dir: Path) -> list[int]:
    """Rounds of ``metrics.jsonl`` in which a site failed (an error, e.g. a worker killed for memory)."""
    return sorted(int(r["round"]) for r in _round_records(run_dir)
                  if any(status.startswith("error") for status in _site_statuses(r)))


def declined_site_rounds(run_dir: Path) -> int:
    """Site-rounds of ``metrics.jsonl`` that a site declined (e.g. its privacy budget spent: a killed
    attempt's D steps stay in its ledger), in which the arm did not get that site's compute."""
    per_round = {int(r["round"]): sum(status.startswith("declined") for status in _site_statuses(r))
                 for r in _round_records(run_dir)}
    return sum(per_round.values())


def _drop_failed_rounds(run_dir: Path, arm: str, seed: int) -> None:
    """A round in which a site failed does not count: the server carried on without that site's
    update, so the arm did not get its compute. Remove that round's checkpoint and every later one
    (the next run resumes before it) and stop with a message."""
    failed = failed_rounds(run_dir)
    if not failed:
        return
    for r in round_numbers_in(run_dir):
        if r >= failed[0]:
            (run_dir / f"round_{r:03d}.pt").unlink()
    raise UserError(f"arm {arm} seed {seed}: a site failed in round(s) {', '.join(map(str, failed))} (see the log: "
                    f"e.g. a worker killed for lack of memory); checkpoints from round {failed[0]} on were removed, "
                    "so running the study again resumes the arm before the failure")


def _epsilon_of(checkpoint: Path) -> Optional[float]:
    """The largest epsilon any site spent (privacy records kept in the round checkpoint)."""
    records = read_checkpoint(checkpoint).get("federation", {}).get("privacy", {})
    spent = [site[-1]["epsilon"] for site in records.values() if site]
    return max(spent) if spent else None


def training_seconds(run_dir: Path, last_round: int) -> float:
    """The arm's training wall time: the sum of its rounds' times in ``metrics.jsonl`` up to
    ``last_round``. Kept per round, it survives a killed run: a resumed arm counts the rounds of every
    attempt once (a round run again counts its last attempt), not only the last attempt's."""
    seconds = {int(r["round"]): float(r.get("seconds", 0.0)) for r in _round_records(run_dir)
               if int(r["round"]) <= last_round}
    return sum(seconds.values())


def _write_outputs(study: sc.StudyConfig, profile: str, out: Path, class_names: Sequence[str]) -> None:
    """Outputs from every arm of the study whose seeds have all finished (with the current settings)."""
    spec = study.profile(profile)
    arms, details = {}, {}
    for arm in study.arms:
        results = []
        for seed in spec.seeds:
            marker = out / arm / f"seed-{seed}" / sr.ARM_FILE
            if marker.is_file():
                results.append(json.loads(marker.read_text()))
        if len(results) != len(spec.seeds):
            continue
        arms[arm] = sr.combine_seeds(results)
        per_class = {c: sr._mean([r["cas_per_class"].get(c) for r in results]) for c in class_names}
        # arm.json files written before the count have no key: unknown ("-"), not 0.
        declined = [r.get("declined_site_rounds") for r in results]
        details[arm] = {"cas_per_class": per_class, "seeds": len(results),
                        "declined_site_rounds": None if None in declined else sum(map(int, declined))}
    if arms:
        sr.write_outputs(out, profile, arms, details, class_names)


def main(argv: Optional[list[str]] = None) -> int:
    from medstylegan2.cli_support import run_reporting_user_errors, setup_logging

    parser = argparse.ArgumentParser(prog="python -m simulation.study", description=COMMAND_HELP)
    add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(False)
    return run_reporting_user_errors(run, args)


if __name__ == "__main__":
    raise SystemExit(main())
