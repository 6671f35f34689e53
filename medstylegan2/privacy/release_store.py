"""What a site keeps beside its ledger from a release it made once per run, so it never pays twice.

The class guide (``privacy.class_guide``) and the class moments (``privacy.class_moments``) are
each made once per run from the site's data under DP. A later round, or a restarted site of the
same run, must reuse them rather than make (and spend on) them again. Each is kept in a folder
beside the ledger as ``<folder>/<digest>.pt``: the digest names the run token, the data set's
fingerprint and the settings (``release_digest``), and the file names the ledger entry of its
release. The entry is recorded before the file is written: a file whose entry the ledger does not
hold (with this store's mechanism) was not made through this ledger, and is refused.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from medstylegan2.errors import CheckpointError
from medstylegan2.privacy.ledger import LedgerError
from medstylegan2.runfolder import atomic_write_bytes

LEDGER_ENTRY_KEY = "ledger_entry"   # the kept state's entry holding its release's ledger hash


def release_digest(fields: Mapping[str, Any]) -> str:
    """Names one kept release: any change of run, data set, setting or noise names another file."""
    return hashlib.sha256(json.dumps(dict(fields), sort_keys=True).encode()).hexdigest()[:24]


class ReleaseStore:
    """``<ledger_dir>/<folder>/<digest>.pt`` for releases of one ``mechanism``; ``what`` names them in errors."""

    def __init__(self, ledger_dir: str | Path, folder: str, mechanism: str, what: str):
        self.folder = Path(ledger_dir) / folder
        self.mechanism = mechanism
        self.what = what

    def path(self, digest: str) -> Path:
        return self.folder / f"{digest}.pt"

    def load_state(self, digest: str, ledger_entries: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
        """The kept state (None: nothing kept under ``digest``), once its ledger entry is found."""
        path = self.path(digest)
        if not path.exists():
            return None
        try:
            state = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the same problem
            raise CheckpointError(f"{path}: unreadable {self.what} ({exc}); move it away and the site makes a new "
                                  "one (its privacy cost is recorded again)") from exc
        entry_hash = state.get(LEDGER_ENTRY_KEY) if isinstance(state, dict) else None
        if not any(e["hash"] == entry_hash and e.get("mechanism") == self.mechanism for e in ledger_entries):
            raise LedgerError(f"{path}: this {self.what} names ledger entry {str(entry_hash)[:12]}..., which the "
                              "site's ledger does not hold: it was not made through this ledger")
        return state

    def save_state(self, digest: str, state: Mapping[str, Any], entry: Mapping[str, Any]) -> Path:
        """Keep ``state`` naming ``entry`` (the release's ledger entry, already recorded)."""
        buffer = io.BytesIO()
        torch.save({**state, LEDGER_ENTRY_KEY: entry["hash"]}, buffer)
        path = self.path(digest)
        atomic_write_bytes(path, buffer.getvalue())
        return path
