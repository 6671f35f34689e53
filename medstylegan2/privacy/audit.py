"""``medstylegan2 audit-privacy``: membership-inference attacks on what a run released.

Given a run's checkpoint, images the site trained on (members) and images from the same
distribution it never saw (non-members), each attack gives every candidate image a score, higher
meaning "more likely a member", and the audit reports the attack's ROC: its AUC and its TPR at a
low FPR (1%, and 0.1% when there are at least 1000 non-members; a rate below 1/n_non_members is
not measurable).

- **White-box, discriminator** (LOGAN, Hayes et al. 2019): the score is D's logit for the candidate
  with its own label. An overfitted D gives its training images higher logits. (D's real loss
  ``softplus(-logit)`` is a decreasing function of it: the same ROC.)
- **Black-box, generator** (GAN-Leaks, Chen et al. 2020): the score is minus the distance from the
  candidate to its nearest among M images the generator (G_ema) made for the candidate's class, in
  pixel space (RMS, [0, 1] scale) and, when the run has its domain classifier, in that
  classifier's feature space.

Under (epsilon, delta)-DP every membership test obeys TPR <= e^eps FPR + delta and
1 - FPR <= e^eps (1 - TPR) + delta (Kairouz et al. 2015); ``audit.png`` draws the empirical ROC
curves beside that bound, with epsilon from ``--epsilon``, from a site's lifetime ledger
(``--ledger``) or, for a private run, from the checkpoint's accountant history or the run's
``privacy.json``.

The command (files, checkpoint, where epsilon comes from) is ``medstylegan2.privacy.audit_command``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Callable, Optional

import numpy as np
import torch

log = logging.getLogger(__name__)

FPR_TARGETS = (0.01, 0.001)


# ----------------------------------------------------------------------------------------------
# ROC statistics


def roc_curve(member_scores: np.ndarray, non_member_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) of the test "member if score >= threshold", one point per distinct score.

    Starts at (0, 0) (threshold +inf) and ends at (1, 1). Tied scores form one point, so the area
    under the curve counts a tied member/non-member pair as one half.
    """
    pos = np.asarray(member_scores, dtype=np.float64).reshape(-1)
    neg = np.asarray(non_member_scores, dtype=np.float64).reshape(-1)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("an ROC needs at least one member and one non-member score")
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        raise ValueError("attack scores must be finite")
    scores = np.concatenate([pos, neg])
    is_member = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    order = np.argsort(-scores, kind="mergesort")
    scores, is_member = scores[order], is_member[order]
    last_of_each = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tps = np.cumsum(is_member)[last_of_each]
    fps = (last_of_each + 1) - tps
    fpr = np.r_[0.0, fps / len(neg)]
    tpr = np.r_[0.0, tps / len(pos)]
    return fpr, tpr, np.r_[np.inf, scores[last_of_each]]


def roc_auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    return float(np.trapezoid(tpr, fpr))


def auc_stderr(auc: float, n_members: int, n_non_members: int) -> float:
    """Standard error of an empirical AUC (Hanley and McNeil 1982): how far chance alone moves it."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n_members - 1) * (q1 - auc * auc) + (n_non_members - 1) * (q2 - auc * auc))
    return float(math.sqrt(max(var, 0.0) / (n_members * n_non_members)))


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """The best TPR of any threshold whose FPR is at most ``target``."""
    return float(tpr[fpr <= target + 1e-12].max())


def attack_summary(member_scores: np.ndarray, non_member_scores: np.ndarray,
                   fpr_targets: tuple[float, ...] = FPR_TARGETS) -> dict[str, Any]:
    """AUC, TPR at each measurable FPR target (None where there are fewer than 1/target non-members),
    and the membership advantage max(TPR - FPR)."""
    fpr, tpr, _ = roc_curve(member_scores, non_member_scores)
    n_pos, n_neg = len(np.asarray(member_scores).reshape(-1)), len(np.asarray(non_member_scores).reshape(-1))
    auc = roc_auc(fpr, tpr)
    return {"auc": auc, "auc_stderr": auc_stderr(auc, n_pos, n_neg),
            "tpr_at_fpr": {f"{t:g}": (tpr_at_fpr(fpr, tpr, t) if n_neg * t >= 1 else None) for t in fpr_targets},
            "advantage": float((tpr - fpr).max()), "n_members": int(n_pos), "n_non_members": int(n_neg)}


# ----------------------------------------------------------------------------------------------
# The (epsilon, delta) bound on any membership test


def dp_tpr_bound(fpr: np.ndarray, epsilon: float, delta: float) -> np.ndarray:
    """Largest TPR any test can reach at ``fpr`` against an (epsilon, delta)-DP mechanism."""
    fpr = np.asarray(fpr, dtype=np.float64)
    if not math.isfinite(epsilon):
        return np.ones_like(fpr)
    e = math.exp(min(epsilon, 700.0))
    return np.clip(np.minimum.reduce([np.ones_like(fpr), e * fpr + delta, 1.0 - (1.0 - delta - fpr) / e]), 0.0, 1.0)


def dp_auc_bound(epsilon: float, delta: float) -> float:
    grid = np.linspace(0.0, 1.0, 20001)
    return float(np.trapezoid(dp_tpr_bound(grid, epsilon, delta), grid))


def bound_summary(epsilon: float, delta: float, fpr_targets: tuple[float, ...] = FPR_TARGETS) -> dict[str, Any]:
    return {"epsilon": epsilon, "delta": delta, "auc_max": dp_auc_bound(epsilon, delta),
            "tpr_at_fpr": {f"{t:g}": float(dp_tpr_bound(np.array([t]), epsilon, delta)[0]) for t in fpr_targets}}


# ----------------------------------------------------------------------------------------------
# The attacks


@torch.no_grad()
def white_box_scores(D: torch.nn.Module, images_uint8: np.ndarray, labels: np.ndarray, *, batch_size: int = 256,
                     device: torch.device | str = "cpu", reference: Optional[torch.Tensor] = None) -> np.ndarray:
    """D's logit for each (image, label). One image at a time when D mixes a batch (minibatch-stddev
    over the batch), so that no candidate's score depends on the others. ``reference``: the
    fakes a D with reference minibatch-stddev groups each candidate with (the same for every
    candidate; ``reference_fakes``)."""
    from medstylegan2.trainer import images_to_float

    if getattr(D, "mixes_batch", False):
        batch_size = 1
    was_training = D.training
    D.eval()
    out = []
    uses_reference = reference is not None and hasattr(D, "mbstd_reference")
    with D.mbstd_reference(reference.to(device)) if uses_reference else contextlib.nullcontext():
        for start in range(0, len(images_uint8), batch_size):
            x = images_to_float(images_uint8[start:start + batch_size], device)
            c = torch.as_tensor(np.asarray(labels[start:start + batch_size]), dtype=torch.long, device=device)
            out.append(D(x, c).reshape(-1).double().cpu())
    D.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0)


@torch.no_grad()
def reference_fakes(G: torch.nn.Module, D: torch.nn.Module, *, seed: int = 0,
                    device: torch.device | str = "cpu") -> Optional[torch.Tensor]:
    """For a D with reference minibatch-stddev: [num_classes, group - 1, C, H, W] fakes of G, as in
    training; None for any other D."""
    if not getattr(D, "mbstd_against_reference", False):
        return None
    labels = D.reference_labels(device)
    z = torch.randn(len(labels), G.z_dim, generator=torch.Generator().manual_seed(seed + 7919)).to(device)
    fake = G(z, labels)
    return fake.reshape(D.num_classes, -1, *fake.shape[1:])


def nearest_same_class_distance(candidates: np.ndarray, candidate_labels: np.ndarray, generated: np.ndarray,
                                generated_labels: np.ndarray) -> np.ndarray:
    """Distance from each candidate vector to its nearest generated vector of the same class."""
    from medstylegan2.metrics.memorization import nearest

    out = np.full(len(candidates), np.nan)
    for k in np.unique(candidate_labels):
        mine, theirs = candidate_labels == k, generated_labels == k
        if not theirs.any():
            raise ValueError(f"no generated images of class {int(k)} to compare with")
        out[mine] = nearest(candidates[mine], generated[theirs])[0]
    return out


def black_box_scores(candidates_uint8: np.ndarray, labels: np.ndarray, generated_uint8: np.ndarray,
                     generated_labels: np.ndarray, features: Optional[Callable[[np.ndarray], np.ndarray]] = None
                     ) -> np.ndarray:
    """Minus the distance to the nearest same-class generated image (pixel RMS, or in ``features`` space)."""
    from medstylegan2.metrics.memorization import pixel_vectors

    if features is None:
        scale = 1.0 / math.sqrt(candidates_uint8[0].size) if len(candidates_uint8) else 1.0
        a, b = pixel_vectors(candidates_uint8), pixel_vectors(generated_uint8)
    else:
        scale = 1.0
        a, b = features(candidates_uint8), features(generated_uint8)
    return -scale * nearest_same_class_distance(a, np.asarray(labels), b, np.asarray(generated_labels))


# ----------------------------------------------------------------------------------------------
# The audit of one checkpoint


def audit(D: torch.nn.Module, G: torch.nn.Module, members, non_members, *, samples_per_class: int = 1000,
          classifier: Any = None, epsilon: Optional[float] = None, delta: Optional[float] = None, seed: int = 0,
          device: torch.device | str = "cpu") -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Run every attack on ``members`` vs ``non_members`` (``ImageSet``s); (report, ROC curves by attack)."""
    from medstylegan2.sampling import generate_images

    attacks: dict[str, dict[str, Any]] = {}
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def record(name: str, description: str, pos: np.ndarray, neg: np.ndarray, **extra: Any) -> None:
        attacks[name] = {"score": description, **attack_summary(pos, neg), **extra}
        fpr, tpr, _ = roc_curve(pos, neg)
        curves[name] = (fpr, tpr)
        if epsilon is not None:
            attacks[name]["max_excess_over_bound"] = float((tpr - dp_tpr_bound(fpr, epsilon, delta or 0.0)).max())

    reference = reference_fakes(G, D, seed=seed, device=device)
    record("white_box_discriminator", "D logit of (candidate, its label); higher = member (LOGAN)",
           white_box_scores(D, members.images, members.labels, device=device, reference=reference),
           white_box_scores(D, non_members.images, non_members.labels, device=device, reference=reference))

    classes = np.unique(np.concatenate([members.labels, non_members.labels]))
    gen_labels = np.repeat(classes, samples_per_class)
    generated = generate_images(G, gen_labels, seed=seed, device=device)
    description = (f"minus the distance to the nearest of {samples_per_class} generated images of the candidate's "
                   "class (GAN-Leaks)")
    record("black_box_generator_pixel", description + ", pixel RMS",
           black_box_scores(members.images, members.labels, generated, gen_labels),
           black_box_scores(non_members.images, non_members.labels, generated, gen_labels),
           generated_per_class=samples_per_class)
    if classifier is not None:
        from medstylegan2.classifier import extract_features

        def features(images: np.ndarray) -> np.ndarray:
            return extract_features(classifier, images)

        record("black_box_generator_domain", description + ", domain-classifier features",
               black_box_scores(members.images, members.labels, generated, gen_labels, features),
               black_box_scores(non_members.images, non_members.labels, generated, gen_labels, features),
               generated_per_class=samples_per_class)
    report = {"attacks": attacks,
              "bound": None if epsilon is None else bound_summary(epsilon, delta or 0.0)}
    return report, curves
