"""Which patient each training image belongs to, for patient-level privacy (``unit: patient``).

The site keeps a CSV with the columns ``image`` (the image's path relative to the data root, as in
``ImageSet.sources``) and ``patient_id`` (any text: an MRN, a hashed DICOM PatientID). Rows for
images that are not read (other splits) are allowed; an image without a row, or with two rows, is an
error naming the file and line. A site's folder is grouped before its held-out split
(``with_patient_ids``), so that split keeps each patient on one side. The ids never leave
the site: only the grouping matters (``privacy.DPEngine(groups=...)``, the ledger's fingerprint).
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

from medstylegan2.errors import DataError
from medstylegan2.images import ImageSet

COLUMNS = ("image", "patient_id")


def read_patient_ids(csv_path: str | Path, sources: Sequence[str] | None) -> np.ndarray:
    """The patient of each image in ``sources`` as integers 0..P-1 (in order of first appearance)."""
    path = Path(csv_path)
    if sources is None:
        raise DataError(f"patient ids from {path} need the images' source paths, and this image set has none")
    if not path.is_file():
        raise DataError(f"patient id file not found: {path}")
    patient_of: dict[str, str] = {}
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not set(COLUMNS) <= {c.strip() for c in reader.fieldnames}:
            raise DataError(f"{path}: needs the columns {', '.join(COLUMNS)} (got {reader.fieldnames})")
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            image, patient = row["image"], row["patient_id"]
            if not image or not patient:
                raise DataError(f"{path}:{line}: empty image or patient_id")
            if image in patient_of:
                raise DataError(f"{path}:{line}: image {image!r} is listed twice")
            patient_of[image] = patient
    missing = [s for s in sources if s not in patient_of]
    if missing:
        raise DataError(f"{path}: no patient_id for {len(missing)} training image(s), e.g. {missing[0]!r}: "
                        "patient-level privacy needs the patient of every image")
    numbers: dict[str, int] = {}
    return np.array([numbers.setdefault(patient_of[s], len(numbers)) for s in sources], dtype=np.int64)


def with_patient_ids(images: ImageSet, csv_path: str | Path | None) -> ImageSet:
    """``images`` grouped by the patients of ``csv_path`` (unchanged when None), before any split:
    the held-out split then keeps each patient on one side. The CSV wins over DICOM PatientIDs."""
    if csv_path is None:
        return images
    return dataclasses.replace(images, groups=read_patient_ids(csv_path, images.sources))
