"""Epsilon of a list of releases, and sigma for a target epsilon, with Opacus' accountants.

Shared by the DP engine, the site's policy check (``privacy.request``), its lifetime ledger
(``privacy.ledger``) and the audit command: one place that turns (sigma, q, steps) into epsilon.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence


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


def gaussian_release(noise_multiplier: float) -> tuple[float, float, int]:
    """One release of the Gaussian mechanism (noise std sigma x its sensitivity) as the accountant
    counts it: one step at sample rate 1."""
    return (float(noise_multiplier), 1.0, 1)


def sigma_for(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str,
              also: Sequence[tuple[float, float, int]] = (), tolerance: float = 0.01) -> float:
    """The noise multiplier reaching ``target_epsilon`` at ``delta`` after ``steps`` steps at rate ``sample_rate``.

    ``also``: releases at fixed settings, (sigma, q, steps), that the same epsilon must cover
    besides these steps (e.g. the class moments' one release). Sigma is then found by bisection
    over ``epsilon_of_history`` of everything together, to within ``tolerance`` below the target.
    ``ValueError`` when ``also`` alone reaches the target: no sigma is enough.
    """
    if not also:
        from opacus.accountants.utils import get_noise_multiplier

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                              sample_rate=sample_rate, steps=steps, accountant=accountant,
                                              epsilon_tolerance=tolerance))
    fixed = list(also)
    floor = epsilon_of_history(fixed, delta, accountant)
    if floor >= target_epsilon - tolerance:
        raise ValueError(f"the fixed releases alone reach epsilon {floor:.4g}, not below the target "
                         f"{target_epsilon:g}: no noise multiplier for the other steps is enough")

    def epsilon_at(sigma: float) -> float:
        return epsilon_of_history([(sigma, sample_rate, steps), *fixed], delta, accountant)

    # Epsilon falls as sigma grows: find a sigma within the target, then close the interval
    # from below until its upper end is within ``tolerance`` of the target.
    low, high = 0.0, 10.0
    at_high = epsilon_at(high)
    while at_high > target_epsilon:
        low, high = high, 2 * high
        if high > 1e6:
            raise ValueError(f"no noise multiplier up to 1e6 reaches epsilon {target_epsilon:g}")
        at_high = epsilon_at(high)
    while target_epsilon - at_high > tolerance and high - low > 1e-9 * high:
        middle = (low + high) / 2
        at_middle = epsilon_at(middle)
        if at_middle > target_epsilon:
            low = middle
        else:
            high, at_high = middle, at_middle
    return high
