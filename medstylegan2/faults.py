"""Named fault points: the places where a test crashes a process on purpose, deterministically.

A fault point is a call such as ``fault_point("after_checkpoint", round_num=r)`` at a place where a
crash matters (every write point of a server round, the stages of a site round). Unarmed, it does
nothing. The environment variable ``MEDSTYLEGAN2_FAULT`` arms points; tests set it for the process
they want to crash, so a crash lands at exactly one place, never "when a file appears":

    MEDSTYLEGAN2_FAULT="after_checkpoint:2:kill"               SIGKILL this process there, in round 2
    MEDSTYLEGAN2_FAULT="site_train:2:raise:site=site-1"        site-1's round 2 raises FaultInjected
    MEDSTYLEGAN2_FAULT="site_train:*:raise:site=site-1:p=0.3"  ... in 30% of its rounds
    MEDSTYLEGAN2_FAULT="spec,spec"                             several points at once

A spec is ``point:round[:mode][:site=NAME][:p=PROBABILITY][:once]``; ``round`` is a number or ``*``;
``once`` fires the point only the first time this process reaches it (a transient error).
Modes: ``kill`` (SIGKILL this process: nothing after it runs, no ``finally``, no flush),
``kill-group`` (SIGKILL this process' group: a SuperNode together with the ClientApp process it
started), ``raise`` (``FaultInjected``, an ordinary exception), ``hang`` (block for an hour: a
stalled site), ``sigterm`` / ``sigint`` (send that signal to this process and go on: a scheduler's
or a user's stop arriving at a known point). With ``p``, whether the point fires is drawn from (point, round, site) by a hash:
the same run fails in the same rounds every time.

The points themselves are listed where they are called: ``medstylegan2.fl.round_files``
(``SERVER_WRITE_POINTS``, the server's round) and ``medstylegan2.fl.site_round`` (a site's round).
"""

from __future__ import annotations

import functools
import hashlib
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Optional

ENV_VAR = "MEDSTYLEGAN2_FAULT"
MODES = ("kill", "kill-group", "raise", "hang", "sigterm", "sigint")


class FaultInjected(RuntimeError):
    """Raised at an armed fault point in ``raise`` mode."""


@dataclass(frozen=True)
class FaultSpec:
    point: str
    round_num: Optional[int]     # None: every round
    mode: str = "kill"
    site: Optional[str] = None   # None: any site (and the server)
    probability: float = 1.0
    once: bool = False

    def matches(self, point: str, round_num: Optional[int], site: Optional[str]) -> bool:
        if point != self.point:
            return False
        if self.round_num is not None and round_num != self.round_num:
            return False
        if self.site is not None and site != self.site:
            return False
        return self.probability >= 1.0 or _draw(point, round_num, site) < self.probability


def _draw(point: str, round_num: Optional[int], site: Optional[str]) -> float:
    """A number in [0, 1) fixed by (point, round, site): reproducible 'random' failures."""
    digest = hashlib.sha256(f"{point}|{round_num}|{site}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


@functools.lru_cache(maxsize=8)
def parse_faults(text: str) -> tuple[FaultSpec, ...]:
    """The specs of a ``MEDSTYLEGAN2_FAULT`` value; ValueError naming the bad part."""
    specs = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        tokens = item.split(":")
        if len(tokens) < 2 or not tokens[0]:
            raise ValueError(f"{ENV_VAR}: {item!r} must look like point:round[:mode][:site=NAME][:p=P]")
        round_num = None if tokens[1] == "*" else int(tokens[1])
        mode, site, probability, once = "kill", None, 1.0, False
        for token in tokens[2:]:
            if token in MODES:
                mode = token
            elif token == "once":
                once = True
            elif token.startswith("site="):
                site = token[len("site="):]
            elif token.startswith("p="):
                probability = float(token[len("p="):])
            else:
                raise ValueError(f"{ENV_VAR}: unknown part {token!r} in {item!r}; modes: {', '.join(MODES)}")
        specs.append(FaultSpec(tokens[0], round_num, mode, site, probability, once))
    return tuple(specs)


_fired: set[tuple[FaultSpec, Optional[int], Optional[str]]] = set()  # ``once`` points that fired here


def armed() -> tuple[FaultSpec, ...]:
    return parse_faults(os.environ.get(ENV_VAR, ""))


def fault_point(point: str, *, round_num: Optional[int] = None, site: Optional[str] = None) -> None:
    """Crash here if ``MEDSTYLEGAN2_FAULT`` arms this point (for this round and site); else nothing."""
    specs = armed()
    if not specs:
        return
    for spec in specs:
        if spec.matches(point, round_num, site) and (spec, round_num, site) not in _fired:
            if spec.once:
                _fired.add((spec, round_num, site))
            _fire(spec, point, round_num, site)


def _fire(spec: FaultSpec, point: str, round_num: Optional[int], site: Optional[str]) -> None:
    where = f"fault point {point!r} (round {round_num}{'' if site is None else ', site ' + site})"
    print(f"{where}: {spec.mode}", file=sys.stderr, flush=True)
    if spec.mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif spec.mode == "kill-group":
        os.killpg(os.getpgrp(), signal.SIGKILL)
    elif spec.mode == "hang":
        time.sleep(3600)
    elif spec.mode in ("sigterm", "sigint"):
        os.kill(os.getpid(), signal.SIGTERM if spec.mode == "sigterm" else signal.SIGINT)
        return
    raise FaultInjected(f"{where}: injected failure")
