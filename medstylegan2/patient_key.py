"""The patient key: a DICOM PatientID hashed with the site's secret salt, never the ID itself.

``PatientHasher.key(patient_id, issuer)`` is an HMAC-SHA256 under a salt that lives in a file of
the site's own (``data.patient_salt_file``, default ``~/.config/medstylegan2/patient-id.salt``),
created from OS entropy (mode 0600) the first time a PatientID is hashed. The keys group a site's
images by patient (``ImageSet.groups``) and never leave the site; neither does the salt.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
from pathlib import Path

from medstylegan2.errors import DataError
from medstylegan2.runfolder import create_once_text

log = logging.getLogger(__name__)


def default_salt_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "medstylegan2" / "patient-id.salt"


class PatientHasher:
    """PatientID -> HMAC-SHA256 hex key under this site's secret salt.

    The salt lives in a file of the site's own (``patient_salt_file``), created from OS entropy with
    mode 0600 the first time a PatientID is hashed, and never sent anywhere. Without the salt the
    key cannot be recomputed from a guessed PatientID; with a different salt every key differs.
    ``ephemeral()`` hashes with a random in-memory salt (counting patients without creating a file).
    """

    SALT_BYTES = 32

    def __init__(self, salt_file: str | Path | None = None, *, salt: bytes | None = None):
        self.salt_file = Path(salt_file).expanduser() if salt_file is not None else default_salt_file()
        self._salt = salt
        self._lock = threading.Lock()

    @classmethod
    def ephemeral(cls) -> "PatientHasher":
        return cls(salt=secrets.token_bytes(cls.SALT_BYTES))

    def key(self, patient_id: str, issuer: str = "") -> str:
        message = b"medstylegan2-patient\0" + issuer.encode("utf-8") + b"\0" + patient_id.encode("utf-8")
        return hmac.new(self._load_salt(), message, hashlib.sha256).hexdigest()

    def _load_salt(self) -> bytes:
        with self._lock:
            if self._salt is None:
                self._salt = read_or_create_salt(self.salt_file)
            return self._salt


def read_or_create_salt(path: Path) -> bytes:
    """The salt in ``path`` (hex text); created atomically from OS entropy, mode 0600, if absent."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Never replaces: if another process created the salt first, both use that one.
        if create_once_text(path, secrets.token_hex(PatientHasher.SALT_BYTES) + "\n"):
            log.info("created the site's patient-ID salt %s (keep it private; never share it)", path)
    try:
        text = path.read_text().strip()
        salt = bytes.fromhex(text)
    except (OSError, ValueError) as exc:
        raise DataError(f"patient-ID salt file {path} is unreadable or not hex text ({exc}); move it away to "
                        f"create a new one") from exc
    if len(salt) < 16:
        raise DataError(f"patient-ID salt file {path} holds {len(salt)} bytes; at least 16 are needed")
    if path.stat().st_mode & 0o077:
        log.warning("patient-ID salt file %s is readable by other users: chmod 600 it", path)
    return salt
