"""A site's label vocabulary and its label CSV: which class each file of an archive belongs to.

Hospitals name their findings in their own words ("covid", "covid-19 pneumonia", "healthy"). The
site maps them to the three classes in ``data.label_map`` (``word: class`` or ``word: skip``);
class names themselves always map to themselves. Words match ignoring case and surrounding spaces.

A label CSV has a header row with columns ``file`` and ``label`` (other columns are ignored); each
``file`` is a path relative to the data root. An unknown label is an error naming the label, how
many files carry it and the first of them: a site should decide what each of its labels means
rather than find out later that part of its archive was silently left out.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from medstylegan2.config import CLASS_NAMES, LABEL_SKIP
from medstylegan2.errors import DataError
from medstylegan2.skips import SkipTally


def _fold(word: str) -> str:
    return word.strip().casefold()


@dataclass(frozen=True)
class LabelVocabulary:
    """Site words -> class index (or None for "skip"), from ``data.label_map`` (already validated)."""

    label_map: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, label_map: dict[str, str] | None) -> "LabelVocabulary":
        return cls(tuple(sorted((label_map or {}).items())))

    @cached_property
    def _lookup(self) -> dict[str, str]:
        table = {_fold(name): name for name in CLASS_NAMES}
        table.update({_fold(word): target for word, target in self.label_map})
        return table

    def knows(self, word: str) -> bool:
        return _fold(word) in self._lookup

    def class_index(self, word: str) -> int | None:
        """The class of a site word; None when the site maps it to "skip". KeyError when unknown."""
        target = self._lookup[_fold(word)]
        return None if target == LABEL_SKIP else CLASS_NAMES.index(target)

    def words_for(self, class_name: str) -> list[str]:
        """Every word that means ``class_name`` (the class name first): the folder names to look for."""
        return [class_name] + [word for word, target in self.label_map if target == class_name]

    def skipped_words(self) -> list[str]:
        return [word for word, target in self.label_map if target == LABEL_SKIP]


def read_label_csv(csv_path: str | Path, root: Path, vocabulary: LabelVocabulary) -> tuple[list[tuple[Path, int]], SkipTally]:
    """(file, class index) for every row of a ``file,label`` CSV, and the rows left out, counted.

    Rows whose label maps to "skip" and rows whose file does not exist are counted and left out;
    an unknown label, a missing column or a file listed twice with different labels is a DataError.
    """
    path = Path(csv_path).expanduser()
    if not path.is_file():
        raise DataError(f"labels CSV not found: {path}")
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"labels CSV {path} is unreadable: {exc}") from exc
    if not rows:
        raise DataError(f"labels CSV {path} is empty: expected a header row 'file,label' and one row per image")
    header = [_fold(h) for h in rows[0]]
    if "file" not in header or "label" not in header:
        raise DataError(f"labels CSV {path}: the header row must name the columns 'file' and 'label', "
                        f"got {','.join(rows[0])}")
    col_file, col_label = header.index("file"), header.index("label")

    skipped = SkipTally()
    labelled: dict[str, tuple[int, int | None]] = {}  # relative path -> (row number, class or None)
    unknown: dict[str, list[str]] = {}
    for number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(col_file, col_label) or not row[col_file].strip() or not row[col_label].strip():
            raise DataError(f"labels CSV {path}, row {number}: needs a file and a label, got {','.join(row)}")
        name, word = _relative(row[col_file].strip(), root, path, number), row[col_label].strip()
        if not vocabulary.knows(word):
            unknown.setdefault(word, []).append(name)
            continue
        label = vocabulary.class_index(word)
        if name in labelled and labelled[name][1] != label:
            raise DataError(f"labels CSV {path}: {name} is listed twice with different labels "
                            f"(rows {labelled[name][0]} and {number})")
        labelled.setdefault(name, (number, label))
    if unknown:
        described = "; ".join(f"'{word}' ({len(files)} file(s), e.g. {files[0]})" for word, files in unknown.items())
        raise DataError(f"labels CSV {path}: label(s) not in data.label_map: {described}. Map each to one of "
                        f"{', '.join(CLASS_NAMES)} or to '{LABEL_SKIP}' in data.label_map")

    entries: list[tuple[Path, int]] = []
    for name, (_, label) in sorted(labelled.items()):
        if label is None:
            skipped.add("label-skipped", name)
        elif not (root / name).is_file():
            skipped.add("missing", name)
        else:
            entries.append((root / name, label))
    return entries, skipped


def _relative(text: str, root: Path, csv_path: Path, number: int) -> str:
    """A CSV file entry as a POSIX path relative to the root (absolute paths must lie under it)."""
    candidate = Path(text)
    if candidate.is_absolute():
        try:
            candidate = candidate.resolve().relative_to(root)
        except ValueError:
            raise DataError(f"labels CSV {csv_path}, row {number}: {text} is not under the data root {root}") from None
    if ".." in candidate.parts:
        raise DataError(f"labels CSV {csv_path}, row {number}: {text} leaves the data root {root}")
    return candidate.as_posix()
