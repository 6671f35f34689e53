"""A site's lifetime privacy ledger: every DP release of its data set, append-only, fsynced.

One folder per data set (the policy's ``ledger_dir``) holds::

    ledger.jsonl   one JSON object per release, in order
    ledger.head    the count and hash of the last entry (written after each append)
    ledger.lock    taken with fcntl.flock by whoever reads-checks-appends

An entry is one release (one round the site trained under DP and replied to)::

    {"index": 0, "prev": "<hash of entry index-1, 64 zeros for the first>", "time": "...",
     "fingerprint": "<data set fingerprint>", "run": "<server run token: informational>",
     "round": 3, "noise_multiplier": 1.1, "sample_rate": 0.004, "steps": 40, "accountant": "rdp",
     "unit": "image", "max_grad_norm": 0.25, "delta": 1e-05, "mechanism": "discriminator",
     "hash": "<sha256 of the rest>"}

``mechanism`` says what the release trained: ``discriminator`` (a round of D's DP-SGD),
``class_guide`` (the site's class guide, ``privacy.class_guide``) or ``class_moments`` (its
classes' coarse statistics, ``privacy.class_moments``: one step at sample rate 1); entries written
before it existed lack it and are D's. Every mechanism composes into the same epsilon.

Epsilon over the data set's lifetime composes ALL entries with Opacus' accountant, whatever run
token, round or fingerprint they carry: a restarted site, a new run token and a repeated round
all keep counting, and a data set that changed (one image added, another resolution) keeps the
spend of the releases before the change (the fingerprint of each entry says which data set it
was; composing over all of them is an upper bound for every record that was ever in one).

Tampering and damage are loud, never a reset: a line that does not parse, a truncated last line,
an entry whose hash or index or ``prev`` does not match, or a ledger shorter than its head file
(or than a head the caller remembered, ``expected_head``) raises ``LedgerError`` naming the file.
``record_release`` returns only after the entry is on disk (flush + fsync, and the folder fsynced
when the file is created), so the reply that the entry covers can leave the site after it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence


from medstylegan2.errors import UserError
from medstylegan2.privacy.accounting import epsilon_of_history
from medstylegan2.privacy.policy import ACCOUNTANTS, UNITS
from medstylegan2.runfolder import append_json_line, atomic_write_text, fsync_folder

log = logging.getLogger(__name__)

LEDGER_FILE = "ledger.jsonl"
HEAD_FILE = "ledger.head"
LOCK_FILE = "ledger.lock"
GENESIS = "0" * 64
ENTRY_KEYS = ("index", "prev", "time", "fingerprint", "run", "round", "noise_multiplier", "sample_rate", "steps",
              "accountant", "unit", "max_grad_norm", "delta", "hash")
OPTIONAL_KEYS = ("mechanism",)
DISCRIMINATOR, CLASS_GUIDE, CLASS_MOMENTS = "discriminator", "class_guide", "class_moments"  # what a release made
MECHANISMS = (DISCRIMINATOR, CLASS_GUIDE, CLASS_MOMENTS)


class LedgerError(UserError):
    """The ledger is missing, damaged, edited or rewound; the site must not train until someone looks."""


class LedgerBusyError(LedgerError):
    """Another process of this site holds the ledger's lock."""


# ----------------------------------------------------------------------------------------------
# Entries


@dataclass(frozen=True)
class Release:
    """One round a site trained under DP and replied to: what the accountant needs, and where it came from."""

    run: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    accountant: str
    unit: str
    max_grad_norm: float
    delta: float
    mechanism: str = DISCRIMINATOR


@dataclass(frozen=True)
class LedgerHead:
    """How many entries a ledger had and the hash of the last one: remember it, and a rewind shows."""

    count: int
    hash: str

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "hash": self.hash}

    @classmethod
    def from_dict(cls, raw: Any) -> "LedgerHead":
        return cls(count=int(raw["count"]), hash=str(raw["hash"]))


def _canonical(fields: dict[str, Any]) -> str:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _entry_hash(entry: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in entry.items() if k != "hash"}).encode()).hexdigest()


def _check_entry(entry: Any, where: str) -> None:
    if not isinstance(entry, dict) or not set(ENTRY_KEYS) <= set(entry) <= set(ENTRY_KEYS + OPTIONAL_KEYS):
        got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise LedgerError(f"{where}: not a ledger entry (keys {got}, expected {', '.join(ENTRY_KEYS)} and "
                          f"optionally {', '.join(OPTIONAL_KEYS)})")
    if entry.get("mechanism", MECHANISMS[0]) not in MECHANISMS:
        raise LedgerError(f"{where}: unknown mechanism {entry['mechanism']!r} (known: {', '.join(MECHANISMS)})")

    def number(key: str) -> float:
        value = entry[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise LedgerError(f"{where}: '{key}' = {value!r} is not a finite number")
        return float(value)

    if not (number("noise_multiplier") > 0 and 0 < number("sample_rate") <= 1 and 0 < number("delta") < 1
            and number("max_grad_norm") > 0):
        raise LedgerError(f"{where}: sigma, q, delta or C out of range")
    for key in ("index", "steps", "round"):
        if isinstance(entry[key], bool) or not isinstance(entry[key], int) or entry[key] < 0:
            raise LedgerError(f"{where}: '{key}' = {entry[key]!r} is not a count")
    if entry["steps"] < 1:
        raise LedgerError(f"{where}: 'steps' must be >= 1")
    if entry["accountant"] not in ACCOUNTANTS or entry["unit"] not in UNITS:
        raise LedgerError(f"{where}: unknown accountant {entry['accountant']!r} or unit {entry['unit']!r}")


# ----------------------------------------------------------------------------------------------
# The ledger


class PrivacyLedger:
    """The lifetime ledger in ``ledger_dir`` (created if missing), for the data set ``fingerprint``.

    Use one object per process. ``with ledger.lock():`` around "check the budget, train, record
    the release" keeps two processes of one site from both spending the same remaining budget;
    ``record_release`` takes the lock itself too (the lock is re-entrant within this object).
    """

    def __init__(self, ledger_dir: str | Path, fingerprint: Optional[str], *,
                 expected_head: Optional[LedgerHead] = None):
        self.dir = Path(ledger_dir).expanduser()
        # None: open to read (reports); recording a release needs the data set's fingerprint.
        self.fingerprint = None if fingerprint is None else str(fingerprint)
        self.expected_head = expected_head
        self.path = self.dir / LEDGER_FILE
        self.head_path = self.dir / HEAD_FILE
        self._lock_fd: Optional[int] = None
        self._lock_depth = 0
        if self.fingerprint is None:
            if not self.dir.is_dir():
                raise LedgerError(f"no privacy ledger folder at {self.dir}")
        else:
            try:
                created = not self.dir.exists()
                self.dir.mkdir(parents=True, exist_ok=True)
                fsync_folder(self.dir.parent)
            except OSError as exc:
                raise LedgerError(f"cannot create the privacy ledger folder {self.dir}: {exc.strerror or exc}; "
                                  "under DP a site with nowhere to keep its ledger does not train") from exc
            if created:
                log.info("created privacy ledger folder %s", self.dir)
            if not os.access(self.dir, os.W_OK | os.X_OK):
                raise LedgerError(f"the privacy ledger folder {self.dir} is not writable; under DP a site with "
                                  "nowhere to keep its ledger does not train")
        entries = self.entries()  # verify now: a damaged ledger stops the site before anything else
        if self.fingerprint is not None and entries and entries[-1]["fingerprint"] != self.fingerprint:
            log.warning("the data set changed since the last release recorded in %s (fingerprint %s..., was %s...): "
                        "lifetime epsilon keeps composing over all releases of this ledger",
                        self.path, self.fingerprint[:12], entries[-1]["fingerprint"][:12])

    # -- reading ----------------------------------------------------------------------------------
    def entries(self) -> list[dict[str, Any]]:
        """Every entry, verified (hash chain, counter, head); raises ``LedgerError`` otherwise.

        Safe beside another process that records a release: the head is read before the entries,
        and a release appends its entry before it moves the head, so the entries read cover the
        head. An incomplete last line while another process holds the lock is that release being
        written (left out); with the lock free it is a crash's remnant (an error).
        """
        head = self._read_head()
        entries: list[dict[str, Any]] = []
        if self.path.exists():
            try:
                data = self.path.read_bytes()
            except OSError as exc:
                raise LedgerError(f"cannot read the privacy ledger {self.path}: {exc}") from exc
            lines = data.split(b"\n")
            if lines[-1] and self._another_process_holds_the_lock():
                lines[-1] = b""
            if lines[-1]:
                raise LedgerError(f"{self.path}: the last line ({len(lines)}) is incomplete (a crash while recording "
                                  "a release?). The site refuses to train: an administrator must check whether "
                                  "that round's reply left the site; never delete complete entries")
            prev = GENESIS
            for number, line in enumerate(lines[:-1], start=1):
                where = f"{self.path}:{number}"
                try:
                    entry = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise LedgerError(f"{where}: not valid JSON ({exc}); the ledger is damaged or was edited") from exc
                _check_entry(entry, where)
                if entry["index"] != number - 1:
                    raise LedgerError(f"{where}: entry counter {entry['index']} where {number - 1} was expected: "
                                      "entries were removed, reordered or copied in")
                if entry["prev"] != prev or entry["hash"] != _entry_hash(entry):
                    raise LedgerError(f"{where}: the hash chain is broken: this entry or the one before it was edited")
                prev = entry["hash"]
                entries.append(entry)
        for known, what in ((head, self.head_path), (self.expected_head, "the head this site remembered")):
            if known is not None:
                self._check_against(entries, known, what)
        return entries

    def _another_process_holds_the_lock(self) -> bool:
        if self._lock_depth > 0:
            return False  # this object holds it: nobody else is writing
        try:
            fd = os.open(self.dir / LOCK_FILE, os.O_RDONLY)
        except OSError:
            return False  # never locked (or unreadable): no writer
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            return exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
        finally:
            os.close(fd)  # closing the descriptor releases a lock taken on it
        return False

    def _read_head(self) -> Optional[LedgerHead]:
        if not self.head_path.exists():
            return None
        try:
            return LedgerHead.from_dict(json.loads(self.head_path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LedgerError(f"{self.head_path}: unreadable ledger head ({exc})") from exc

    def _check_against(self, entries: list[dict[str, Any]], head: LedgerHead, what: Any) -> None:
        if len(entries) < head.count:
            raise LedgerError(f"{self.path} has {len(entries)} entries but {what} says {head.count}: the ledger was "
                              "truncated or replaced by an older copy (its steps went backwards). The site refuses "
                              "to train: restore the full ledger")
        last = entries[head.count - 1]["hash"] if head.count else GENESIS
        if last != head.hash:
            raise LedgerError(f"{self.path}: entry {head.count - 1} does not match {what}: the ledger was replaced "
                              "or edited")

    def head(self) -> LedgerHead:
        entries = self.entries()
        return LedgerHead(len(entries), entries[-1]["hash"] if entries else GENESIS)

    def history(self, run: Optional[str] = None) -> list[tuple[float, float, int]]:
        """(sigma, q, steps) of every release (or of one run token's releases), in order."""
        return [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in self.entries()
                if run is None or e["run"] == run]

    def lifetime_epsilon(self, delta: float, accountant: str = "rdp") -> float:
        """Epsilon at ``delta`` over every release in this ledger, composed by Opacus' accountant."""
        return epsilon_of_history(self.history(), delta, accountant)

    def run_epsilon(self, run: str, delta: float, accountant: str = "rdp") -> float:
        return epsilon_of_history(self.history(run), delta, accountant)

    def epsilon_after(self, extra: Sequence[tuple[float, float, int]], delta: float, accountant: str = "rdp", *,
                      run: Optional[str] = None) -> float:
        """Epsilon if the releases ``extra`` (sigma, q, steps) were added (lifetime, or of ``run`` only)."""
        return epsilon_of_history(self.history(run) + list(extra), delta, accountant)

    # -- writing ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, timeout: Optional[float] = None) -> Iterator["PrivacyLedger"]:
        """Hold the ledger's exclusive lock. ``timeout``: None waits; 0 raises ``LedgerBusyError`` at once."""
        if self._lock_depth == 0:
            fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | (0 if deadline is None else fcntl.LOCK_NB))
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        os.close(fd)
                        raise
                    if time.monotonic() >= deadline:
                        os.close(fd)
                        raise LedgerBusyError(f"{self.dir / LOCK_FILE}: another process of this site holds the "
                                              "privacy ledger") from exc
                    time.sleep(0.05)
            self._lock_fd = fd
        self._lock_depth += 1
        try:
            yield self
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0 and self._lock_fd is not None:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)
                self._lock_fd = None

    def record_release(self, release: Release) -> dict[str, Any]:
        """Append one release and return its entry once it is on disk (fsync). Call it before replying."""
        if release.steps < 1:
            raise ValueError("a release has at least one step")
        if self.fingerprint is None:
            raise ValueError("this ledger was opened to read (no data set fingerprint); it cannot record")
        with self.lock():
            entries = self.entries()
            units = {e["unit"] for e in entries}
            if units and units != {release.unit}:
                raise LedgerError(f"{self.path} holds {'/'.join(sorted(units))}-level releases; a {release.unit}-level "
                                  "release cannot compose with them (epsilon would be per another unit). Keep the "
                                  "policy's unit, or start a new ledger only for a data set that was never released")
            entry = {"index": len(entries), "prev": entries[-1]["hash"] if entries else GENESIS,
                     "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                     "fingerprint": self.fingerprint, **asdict(release)}
            entry["round"], entry["steps"] = int(entry["round"]), int(entry["steps"])
            for key in ("noise_multiplier", "sample_rate", "max_grad_norm", "delta"):
                entry[key] = float(entry[key])
            entry["run"] = str(entry["run"])
            _check_entry({**entry, "hash": ""}, f"release for {self.path}")
            entry["hash"] = _entry_hash(entry)
            created = not self.path.exists()
            append_json_line(self.path, entry)  # flushed and fsynced before it returns
            if created:
                fsync_folder(self.dir)
            head = LedgerHead(entry["index"] + 1, entry["hash"])
            atomic_write_text(self.head_path, json.dumps(head.to_dict()) + "\n")
            return entry

    def summary(self, delta: float, accountant: str = "rdp") -> dict[str, Any]:
        """Per run token and lifetime: releases (of which class moments'), steps (of which the class
        guide's) and epsilon."""
        entries = self.entries()
        runs: dict[str, dict[str, Any]] = {}
        for e in entries:
            row = runs.setdefault(e["run"], {"releases": 0, "steps": 0, "guide_steps": 0, "moments_releases": 0,
                                             "rounds": []})
            row["releases"] += 1
            row["moments_releases"] += e.get("mechanism") == CLASS_MOMENTS
            row["steps"] += e["steps"]
            row["guide_steps"] += e["steps"] if e.get("mechanism") == CLASS_GUIDE else 0
            row["rounds"].append(e["round"])
        for run, row in runs.items():
            row["epsilon"] = epsilon_of_history([(e["noise_multiplier"], e["sample_rate"], e["steps"])
                                                 for e in entries if e["run"] == run], delta, accountant)
        return {"ledger": str(self.path), "delta": delta, "accountant": accountant, "releases": len(entries),
                "steps": sum(e["steps"] for e in entries),
                "epsilon": epsilon_of_history([(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries],
                                              delta, accountant),
                "fingerprints": sorted({e["fingerprint"] for e in entries}), "runs": runs}


def open_ledger_for_policy(policy: Any, fingerprint: str, *, expected_head: Optional[LedgerHead] = None
                           ) -> PrivacyLedger:
    """The ledger a DP policy names; ``LedgerError`` when it has none (a DP site then refuses to train)."""
    if getattr(policy, "ledger_dir", None) is None:
        raise LedgerError(f"{getattr(policy, 'source', 'policy')}: no ledger_dir: under DP a site with nowhere to "
                          "keep its lifetime ledger does not train")
    return PrivacyLedger(policy.ledger_dir, fingerprint, expected_head=expected_head)
