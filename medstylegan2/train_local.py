"""``medstylegan2 train-local``: train one site on its own data, with progress, grids and checkpoints.

The loop reads top to bottom: build (or resume), then repeat {train a tick of steps, log, grid,
checkpoint} until the requested total number of steps.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from tqdm import tqdm

from medstylegan2.config import RunConfig, load_config
from medstylegan2.errors import UserError
from medstylegan2.privacy.accounting import gaussian_release
from medstylegan2.privacy.public_term import public_images_of
from medstylegan2.runfolder import (append_json_line, atomic_write_text, config_from_checkpoint, config_yaml,
                                   read_checkpoint)
from medstylegan2.sampling import save_class_grid
from medstylegan2.trainer import SiteTrainer, resolve_device
from medstylegan2.warm_start import load_init_weights, planned_d_steps

log = logging.getLogger(__name__)

COMMAND_HELP = ("Train one site's class-conditional GAN on a data folder, a COVID-QU-Ex root, or 'phantoms' "
                "(the embedded default).")
CHECKPOINT_NAME = "checkpoint.pt"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="phantoms",
                   help="'phantoms' (built-in generator, default), a folder of <class>/*.png, or a COVID-QU-Ex root")
    p.add_argument("--resolution", type=int, default=None, help="image size in pixels (default: config, 64)")
    p.add_argument("--steps", type=int, required=True, help="total G+D steps to reach (counting resumed ones)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: config, 16)")
    p.add_argument("--out", required=True, help="run folder: checkpoint.pt, grids, log.jsonl, config.yaml")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt exactly")
    p.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lambda_ds=2 (repeatable)")
    p.add_argument("--arch", choices=["stylegan2", "dcgan"], default=None, help="model.arch override")
    p.add_argument("--device", default=None, help="cpu, cuda, or auto")
    p.add_argument("--grid-every", type=int, default=None, help="steps between sample grids (train.grid_every)")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="steps between checkpoints (train.checkpoint_every)")
    p.add_argument("--seed", type=int, default=None, help="run seed (default: config, 0)")
    p.add_argument("--init", default=None, metavar="CKPT",
                   help="warm start from a checkpoint's G, G_ema and D (train.init_checkpoint), "
                        "e.g. one pretrained on public data")


def _build_config(args: argparse.Namespace) -> RunConfig:
    overrides = list(args.overrides)
    flag_overrides = {"model.resolution": args.resolution, "train.batch_size": args.batch, "model.arch": args.arch,
                      "device": args.device, "train.grid_every": args.grid_every,
                      "train.checkpoint_every": args.checkpoint_every, "seed": args.seed,
                      "train.init_checkpoint": args.init}
    overrides += [f"{k}={v}" for k, v in flag_overrides.items() if v is not None]
    return load_config(args.config, overrides)


def run(args: argparse.Namespace) -> int:
    from medstylegan2.data import class_summary, resolve_data_argument

    out = Path(args.out)
    ckpt_path = out / CHECKPOINT_NAME
    if args.steps <= 0:
        raise UserError("--steps must be > 0")
    if args.resume:
        if not ckpt_path.is_file():
            raise UserError(f"--resume: no checkpoint at {ckpt_path}; start without --resume")
        state = read_checkpoint(ckpt_path)
        cfg = config_from_checkpoint(state)
    else:
        if ckpt_path.exists():
            raise UserError(f"{ckpt_path} exists; pass --resume to continue it or choose another --out")
        cfg = _build_config(args)
        state = None

    train_set, heldout = resolve_data_argument(args.data, cfg.model.resolution, base=cfg.data)
    print(f"data: {args.data}: {len(train_set)} training images ({class_summary(train_set)}), "
          f"{len(heldout)} held out (never trained on)")
    device = resolve_device(cfg.device)
    privacy = None
    guide_steps = cfg.train.class_guide_steps if cfg.train.class_guide_weight > 0 else 0
    moments_on = cfg.train.class_moments_weight > 0
    moments_release = gaussian_release(cfg.train.class_moments_noise)
    if cfg.privacy.enabled:
        from medstylegan2.privacy.engine import make_privacy_engine

        # Planned for the whole run (D's steps, the class guide's and the class moments' release),
        # so a target epsilon is met after --steps steps.
        privacy = make_privacy_engine(cfg, len(train_set), planned_d_steps(cfg, args.steps) + guide_steps,
                                      seed=cfg.seed, planned_also=[moments_release] if moments_on else [])
    guide = local_class_guide(cfg, train_set, privacy, state, device) if guide_steps else None
    moments = local_class_moments(cfg, train_set, privacy, state, moments_release) if moments_on else None
    trainer = SiteTrainer(cfg, train_set.images, train_set.labels, device=device, privacy=privacy, class_guide=guide,
                          class_moments=moments,
                          public_images=public_images_of(cfg) if privacy is not None else None)
    if state is None and cfg.train.init_checkpoint:
        load_init_weights(trainer, cfg.train.init_checkpoint)
    if state is not None:
        trainer.load_state_dict(state)
        print(f"resumed from {ckpt_path} at step {trainer.step}")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", config_yaml(cfg.to_dict()))
    train_loop(trainer, total_steps=args.steps, out=out)
    return 0


def local_class_guide(cfg: RunConfig, train_set, privacy, state, device):
    """The run's class guide (``privacy.class_guide``): the checkpoint's on resume, else trained now.

    Under DP it is trained with DP-SGD at the engine's sigma and sample rate and its steps go into
    the engine's accountant history before D's first step (and so into every checkpoint after it).
    """
    from medstylegan2.privacy.class_guide import (STATE_KEY, GuideNoise, guide_from_state, guide_settings,
                                                  train_from_settings)

    settings = guide_settings(cfg)
    if state is not None:
        if STATE_KEY not in state:
            raise UserError("the checkpoint was trained without a class guide but train.class_guide_weight > 0: "
                            "resume with the checkpoint's own config")
        return guide_from_state(state[STATE_KEY], settings, "the checkpoint's class guide").to(device)
    noise = None
    if privacy is not None:
        noise = GuideNoise(noise_multiplier=privacy.noise_multiplier, sample_rate=privacy.sample_rate,
                           expected_batch_size=privacy.expected_batch_size, seed=cfg.privacy.noise_seed)
    print(f"class guide: training {settings['steps']} steps" + (" with DP-SGD" if noise else "") + " ...")
    guide = train_from_settings(train_set.images, train_set.labels, settings, noise=noise, seed=cfg.seed, device=device)
    if privacy is not None:
        privacy.accountant.history.append((privacy.noise_multiplier, privacy.sample_rate, settings["steps"]))
    return guide


def local_class_moments(cfg: RunConfig, train_set, privacy, state, release: tuple[float, float, int]):
    """The run's class moments (``privacy.class_moments``): the checkpoint's on resume, else released now.

    Under DP they are released with ``train.class_moments_noise`` and the release goes into the
    engine's accountant history (as ``release``) before D's first step (and so into every
    checkpoint after it).
    """
    from medstylegan2.privacy.class_moments import STATE_KEY, ClassMoments, release_from_config

    if state is not None:
        if STATE_KEY not in state:
            raise UserError("the checkpoint was trained without class moments but train.class_moments_weight > 0: "
                            "resume with the checkpoint's own config")
        return ClassMoments.from_state(state[STATE_KEY], "the checkpoint's class moments")
    noise = cfg.train.class_moments_noise if privacy is not None else None
    moments = release_from_config(cfg, train_set.images, train_set.labels, noise_multiplier=noise,
                                  seed=cfg.privacy.noise_seed)
    if privacy is not None:
        privacy.accountant.history.append(release)
    return moments


def train_loop(trainer: SiteTrainer, *, total_steps: int, out: Path) -> None:
    t = trainer.cfg.train
    if trainer.step >= total_steps:
        print(f"already at step {trainer.step} >= {total_steps}; nothing to do")
        return
    bar = tqdm(total=total_steps, initial=trainer.step, unit="step", dynamic_ncols=True)
    start = time.perf_counter()
    try:
        while trainer.step < total_steps:
            tick = min(t.log_every, total_steps - trainer.step)
            stats = trainer.train_steps(tick)
            kimg = trainer.cur_nimg / 1000
            bar.update(tick)
            bar.set_postfix_str(f"kimg {kimg:.1f} G {stats.get('loss_g', float('nan')):.3f} "
                                f"D {stats.get('loss_d_real', 0) + stats.get('loss_d_fake', 0):.3f} "
                                f"{stats['images_per_second']:.1f} img/s")
            record = {"step": trainer.step, "kimg": kimg, "elapsed_s": time.perf_counter() - start, **stats}
            if trainer.privacy is not None:
                record["epsilon"] = trainer.privacy.epsilon()
            append_json_line(out / "log.jsonl", record)
            done = trainer.step >= total_steps
            if done or trainer.step % t.grid_every < tick:
                save_class_grid(trainer.G_ema, out / f"grid_{trainer.step:06d}.png", device=trainer.device,
                                truncation_psi=t.truncation_psi)
            if done or trainer.step % t.checkpoint_every < tick:
                trainer.save_checkpoint(out / CHECKPOINT_NAME)
    finally:
        bar.close()
    print(f"done: step {trainer.step}, checkpoint {out / CHECKPOINT_NAME}, "
          f"last grid {out / f'grid_{trainer.step:06d}.png'}")
    if trainer.privacy is not None:
        print(f"privacy: {trainer.privacy.describe()}")
