"""Files a loader left out, counted per reason, logged compactly, and kept in the cache.

A hospital archive holds lateral views, structured reports and other objects beside the frontal
radiographs: leaving them out is expected, but never silent. Every skipped file is counted under a
short reason code and logged once per reason with the first few names and the count, so a log of a
30,000-file archive stays readable and the site can still find the files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# What each reason code means, for log lines and ``inspect-data``.
REASONS: dict[str, str] = {
    "unreadable": "unreadable or corrupt file",
    "not-dicom": "not a DICOM file (no DICM magic, pydicom refused it)",
    "no-pixel-data": "not an image (no PixelData: structured report, presentation state, ...)",
    "lateral": "lateral view (data.frontal_only)",
    "not-frontal": "neither frontal nor lateral view (data.frontal_only)",
    "multi-frame": "multi-frame image",
    "colour": "not grayscale (colour or palette)",
    "unsupported-pixels": "pixel format not supported",
    "blank": "blank image (every pixel equal)",
    "too-small": "image too small (under 16 pixels on a side)",
    "too-large": "image too large (past the decompression-bomb limit)",
    "label-skipped": "label mapped to 'skip' in data.label_map",
    "missing": "listed in the labels CSV but not found",
}
# Names shown per reason in a log line; the rest are counted.
SHOWN_PER_REASON = 3


class SkipFile(Exception):
    """Raised by a decoder for a file that is left out: ``code`` is a key of REASONS."""

    def __init__(self, code: str, detail: str = ""):
        if code not in REASONS:
            raise ValueError(f"unknown skip reason {code!r}; known: {', '.join(REASONS)}")
        super().__init__(f"{REASONS[code]}{': ' + detail if detail else ''}")
        self.code = code
        self.detail = detail


@dataclass
class SkipTally:
    """Skipped files per reason code, in the order they were met (names relative to the data root)."""

    files: dict[str, list[str]] = field(default_factory=dict)

    def add(self, code: str, name: str) -> None:
        if code not in REASONS:
            raise ValueError(f"unknown skip reason {code!r}; known: {', '.join(REASONS)}")
        self.files.setdefault(code, []).append(name)

    def merge(self, other: "SkipTally") -> None:
        for code, names in other.files.items():
            for name in names:
                self.add(code, name)

    def counts(self) -> dict[str, int]:
        return {code: len(names) for code, names in self.files.items()}

    def total(self) -> int:
        return sum(len(names) for names in self.files.values())

    def __bool__(self) -> bool:
        return self.total() > 0

    def lines(self) -> list[str]:
        """One line per reason: ``12 lateral view (...): a.dcm, b.dcm, c.dcm (+9 more)``."""
        out = []
        for code, names in self.files.items():
            shown = ", ".join(names[:SHOWN_PER_REASON])
            more = f" (+{len(names) - SHOWN_PER_REASON} more)" if len(names) > SHOWN_PER_REASON else ""
            out.append(f"{len(names)} {REASONS[code]}: {shown}{more}")
        return out

    def log_summary(self, where: str, logger: logging.Logger = log) -> None:
        for line in self.lines():
            logger.warning("skipped under %s: %s", where, line)

    # The cache keeps skips as "code<TAB>name" strings (numpy string arrays, no pickle).
    def to_strings(self) -> list[str]:
        return [f"{code}\t{name}" for code, names in self.files.items() for name in names]

    @classmethod
    def from_strings(cls, items: list[str]) -> "SkipTally":
        tally = cls()
        for item in items:
            code, sep, name = item.partition("\t")
            if not sep or code not in REASONS:
                raise ValueError(f"not a skip record: {item!r}")
            tally.add(code, name)
        return tally
