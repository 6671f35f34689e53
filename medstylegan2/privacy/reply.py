"""What a site's reply may contain under DP: an allow-list of figures and a generic error text.

Under add/remove adjacency the number of the site's records is private (docs/privacy.md,
"Adjacency"), so a reply under DP carries only figures that are functions of public values and of
the DP-noised weights: the losses of G and of D on fakes (post-processing), the step count, the
privacy figures (all from the policy, the request and the ledger) and, as the FedAvg weight, the
policy's nominal size. Everything else - timings, images seen, real-data losses, the real count,
any key a later change adds - stays in the site's log. Allow-listing, rather than deleting known
keys, means a new statistic cannot leak by default.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional

log = logging.getLogger(__name__)

# Reply keys that may leave a site under DP (besides "num_examples", replaced by the nominal size).
DP_REPLY_KEYS = ("loss_g", "loss_d_fake", "loss_pl", "loss_ds", "steps", "declined")
# Privacy figures: functions of the policy, the request and the ledger only.
DP_FIGURE_PREFIX = "dp_"  # medstylegan2.fl.wire.PRIVACY_PREFIX
DP_FIGURE_KEYS = ("epsilon", "delta", "sample_rate", "steps", "noise_multiplier", "max_grad_norm", "lifetime_epsilon")
GENERIC_ERROR = "the site could not complete this round; the details are in the site's own log"


def reply_metrics(metrics: Mapping[str, Any], *, dp: bool, nominal_size: Optional[int] = None) -> dict[str, Any]:
    """The metrics a reply may carry. Without DP, all of them; under DP, the allow-list only,
    with ``num_examples`` set to the policy's ``nominal_size`` (the FedAvg weight)."""
    if not dp:
        return dict(metrics)
    if nominal_size is None:
        raise ValueError("under DP the reply's example count is the policy's nominal size; none was given")
    allowed = {k: v for k, v in metrics.items()
               if k in DP_REPLY_KEYS or (k.startswith(DP_FIGURE_PREFIX) and k[len(DP_FIGURE_PREFIX):] in DP_FIGURE_KEYS)}
    dropped = sorted(set(metrics) - set(allowed) - {"num_examples"})
    if dropped:
        log.info("kept in the site's log, not sent under DP: %s",
                 ", ".join(f"{k}={metrics[k]}" for k in dropped))
    allowed["num_examples"] = float(nominal_size) if allowed.get("declined") != 1.0 else 0.0
    return allowed


def reply_error_text(exc: BaseException, *, dp: bool) -> str:
    """The error text the server gets: the exception without DP, a generic text under DP.

    An error under DP may depend on the data (an out-of-memory error on a large Poisson batch tells
    that the batch was large): the details go to the site's log only.
    """
    if not dp:
        return f"{type(exc).__name__}: {exc}"
    log.error("round failed under DP (not sent to the server): %s: %s", type(exc).__name__, exc, exc_info=exc)
    return GENERIC_ERROR
