"""Epsilon of a list of releases, and sigma for a target epsilon, with Opacus' accountants.

Shared by the DP engine, the site's policy check (``privacy.request``), its lifetime ledger
(``privacy.ledger``) and the audit command: one place that turns (sigma, q, steps) into epsilon.
"""

from __future__ import annotations

import math
import warnings


def epsilon_of_history(history: list[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """Epsilon at ``delta`` of a list of (sigma, q, steps) with Opacus' accountant; inf if unbounded."""
    from opacus.accountants import create_accountant

    history = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]
    if not history:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = history
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        eps = float(acc.get_epsilon(delta=delta))
    return eps if math.isfinite(eps) else float("inf")


def sigma_for(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """The noise multiplier reaching ``target_epsilon`` at ``delta`` after ``steps`` steps at rate ``sample_rate``."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps, accountant=accountant))
