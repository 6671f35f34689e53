"""Write chest phantoms as a small DICOM archive, to try ``inspect-data`` and training on DICOM.

    python scripts/phantom_dicoms.py --out /tmp/phantom-archive [--per-class 8] [--rows 1024] [--cols 1280]
    medstylegan2 inspect-data /tmp/phantom-archive --resolution 256 --sheet /tmp/phantom-sheet.png

Every image is a 12-bit MONOCHROME1 DX radiograph (bone stored low, as many CR/DX systems write
it) with a window that spans the anatomy, landscape like a detector, nested as
``<class>/<patient>/<series>/IM0001``; each class also gets a lateral view and a text report, which
the loader skips and counts. Patient names and IDs are synthetic.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from medstylegan2.config import CLASS_NAMES
from medstylegan2.dicom_synth import phantom_anatomy, write_radiograph, write_text_report

BITS = 12
# Stored range used by the anatomy (a detector never spans all 4096 levels) and the window over it.
LOW, HIGH = 400, 3400
CENTER, WIDTH = (LOW + HIGH) / 2, HIGH - LOW


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--per-class", type=int, default=8)
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--cols", type=int, default=1280)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = Path(args.out)
    top = 2 ** BITS - 1
    for label, name in enumerate(CLASS_NAMES):
        for i in range(args.per_class):
            anatomy = phantom_anatomy(label, args.rows, seed=args.seed + i, aspect=args.cols / args.rows)
            monochrome2 = np.rint(LOW + anatomy * (HIGH - LOW)).astype(np.int64)
            patient = f"SYN-{label}{i:03d}"
            # MONOCHROME1: bone low. The window is mirrored with it (c' = top - c + 1 for LINEAR).
            write_radiograph(out / name / patient / "series1" / "IM0001", stored=top - monochrome2, bits_stored=BITS,
                             photometric="MONOCHROME1", window=(top - CENTER + 1, WIDTH), patient_id=patient,
                             patient_name=f"Phantom^{name}{i}")
        write_radiograph(out / name / "lateral" / "IM0001", stored=top - monochrome2, bits_stored=BITS,
                         photometric="MONOCHROME1", view="LL", patient_id=patient)
        write_text_report(out / name / "reports" / "SR0001.dcm", patient_id=patient)
    print(f"wrote {args.per_class} frontal radiographs per class, one lateral and one report each, under {out}")


if __name__ == "__main__":
    main()
