"""``medstylegan2 inspect-data DIR``: what a site holds, and the pixels the model will see, before training.

Lists the folder exactly as training would (class folders or ``--labels CSV``, DICOM and
PNG/JPEG, the site's label map and view filter from the config), decodes every file through the
training decoder, and prints counts per class, modality, view, photometric interpretation and
bit depth, transfer syntax and VOI source, the number of patients, and every skipped file's
reason. Writes a contact sheet (a sample per class after preprocessing) and, with ``--export``,
every accepted image as ``OUT/<class>/<original stem>.png``. Nothing is written into DIR, no salt
file is created (patients are counted with a throw-away salt) and no cache is touched.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from medstylegan2.config import CLASS_NAMES, load_config
from medstylegan2.data import list_site_files
from medstylegan2.errors import UserError
from medstylegan2.images import save_png
from medstylegan2.ingest import SiteOptions, decode_file, decode_workers
from medstylegan2.patient_key import PatientHasher
from medstylegan2.skips import SkipFile, SkipTally
from medstylegan2.tiling import save_image

log = logging.getLogger(__name__)

COMMAND_HELP = ("Show what a data folder (DICOM archive or PNG class folders) holds before training: counts per "
                "class, modality, view, photometric interpretation and bit depth, skipped files and why, and a "
                "contact sheet of the preprocessed pixels")
# Suffixes dropped from a file name to give its "original stem" (UID-like names keep their digits).
KNOWN_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".dic")
LABEL_WIDTH = 96


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="data folder: <class>/... of DICOM or PNG/JPEG files, or any folder with --labels")
    p.add_argument("--labels", default=None, metavar="CSV",
                   help="labels CSV with columns file,label (file relative to DIR); sets data.labels_csv")
    p.add_argument("--resolution", type=int, default=None, help="image size in pixels (default: config, 64)")
    p.add_argument("--export", default=None, metavar="OUT",
                   help="write every accepted image as the model sees it: OUT/<class>/<original stem>.png")
    p.add_argument("--sheet", default=None, metavar="PNG",
                   help="contact sheet path (default: ./<DIR name>-contact-sheet.png)")
    p.add_argument("--per-class", type=int, default=8, help="images per class on the contact sheet (default 8)")
    p.add_argument("--config", default=None, help="YAML config (data.label_map, data.frontal_only, ...)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set data.frontal_only=false (repeatable)")


@dataclass
class Inventory:
    """What ``inspect-data`` found; every counter is keyed by a printable value."""

    classes: Counter = field(default_factory=Counter)
    modality: Counter = field(default_factory=Counter)
    view: Counter = field(default_factory=Counter)
    pixels: Counter = field(default_factory=Counter)          # "MONOCHROME1, 12 bits" / "PNG/JPEG, 8 bits"
    transfer_syntax: Counter = field(default_factory=Counter)
    voi: Counter = field(default_factory=Counter)
    skipped: SkipTally = field(default_factory=SkipTally)
    patients: set = field(default_factory=set)              # throw-away salted keys: counted, never shown
    without_patient_id: int = 0
    exported: int = 0

    def accepted(self) -> int:
        return sum(self.classes.values())


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.labels is not None:
        overrides.append(f"data.labels_csv={args.labels}")
    if args.resolution is not None:
        overrides.append(f"model.resolution={args.resolution}")
    cfg = load_config(args.config, overrides)
    if args.per_class < 1:
        raise UserError("--per-class must be >= 1")
    resolution = cfg.model.resolution
    options = SiteOptions.from_config(cfg.data)
    base, entries, skipped = list_site_files(args.data, options, covidqu=True)

    inventory = Inventory()
    inventory.skipped.merge(skipped)
    sample = _sample_positions(entries, args.per_class)
    sheet_rows: list[list[np.ndarray]] = [[] for _ in CLASS_NAMES]
    export = Path(args.export) if args.export else None
    used_names: set[Path] = set()
    hasher = PatientHasher.ephemeral()
    with ThreadPoolExecutor(max_workers=decode_workers()) as pool:
        results = pool.map(lambda e: decode_file(e[0], resolution, options, hasher), entries)
        for i, ((path, label), result) in enumerate(zip(entries, results)):
            name = path.relative_to(base).as_posix()
            if isinstance(result, SkipFile):
                inventory.skipped.add(result.code, name)
                continue
            _count(inventory, label, result)
            if i in sample and len(sheet_rows[label]) < args.per_class:
                sheet_rows[label].append(result.pixels)
            if export is not None:
                _export(result.pixels, export, CLASS_NAMES[label], path, name, used_names)
                inventory.exported += 1

    print(report(inventory, base, resolution))
    sheet = Path(args.sheet) if args.sheet else Path.cwd() / f"{base.name}-contact-sheet.png"
    if inventory.accepted():
        write_contact_sheet(sheet_rows, sheet, counts=[inventory.classes[n] for n in CLASS_NAMES])
        print(f"contact sheet ({args.per_class} per class, {resolution} px, as the model sees them): {sheet}")
    else:
        print("no image was accepted: no contact sheet written")
    if export is not None:
        print(f"exported {inventory.exported} image(s) to {export}/<class>/")
    return 0


def _sample_positions(entries: list[tuple[Path, int]], per_class: int) -> set[int]:
    """Evenly spread candidates per class (twice the sheet's need, for files that get skipped)."""
    chosen: set[int] = set()
    for k in range(len(CLASS_NAMES)):
        members = [i for i, (_, label) in enumerate(entries) if label == k]
        if members:
            picks = np.linspace(0, len(members) - 1, min(len(members), 2 * per_class)).round().astype(int)
            chosen.update(members[j] for j in picks)
    return chosen


def _count(inventory: Inventory, label: int, decoded) -> None:
    inventory.classes[CLASS_NAMES[label]] += 1
    facts = decoded.facts
    if facts is None:
        inventory.modality["(PNG/JPEG)"] += 1
        inventory.view["(PNG/JPEG)"] += 1
        inventory.pixels["PNG/JPEG, 8 bits"] += 1
        return
    inventory.modality[facts.modality or "(none)"] += 1
    inventory.view[facts.view or "(none)"] += 1
    inventory.pixels[f"{facts.photometric}, {facts.bits_stored} bits"] += 1
    inventory.transfer_syntax[facts.transfer_syntax or "(none)"] += 1
    inventory.voi[facts.voi] += 1
    if decoded.patient_key is None:
        inventory.without_patient_id += 1
    else:
        inventory.patients.add(decoded.patient_key)


def original_stem(path: Path) -> str:
    return path.name[: -len(path.suffix)] if path.suffix.lower() in KNOWN_SUFFIXES else path.name


def _export(pixels: np.ndarray, out: Path, class_name: str, path: Path, name: str, used: set[Path]) -> None:
    folder = out / class_name
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{original_stem(path)}.png"
    if target in used:
        # Archives reuse names (IM0001 in every series): tell them apart by where they came from.
        target = folder / f"{original_stem(path)}-{hashlib.sha256(name.encode()).hexdigest()[:8]}.png"
    used.add(target)
    save_png(pixels, target)


def _table(title: str, counter: Counter) -> list[str]:
    if not counter:
        return []
    width = max(len(str(k)) for k in counter)
    return [f"{title}:"] + [f"  {str(k).ljust(width)}  {v:>7d}" for k, v in counter.most_common()]


def report(inventory: Inventory, root: Path, resolution: int) -> str:
    """The printed summary: tables of counts, patients, and skipped files per reason."""
    lines = [f"{root}: {inventory.accepted()} image(s) accepted at {resolution} px, "
             f"{inventory.skipped.total()} file(s) skipped"]
    classes = Counter({name: inventory.classes[name] for name in CLASS_NAMES})
    for title, counter in (("class", classes), ("modality", inventory.modality), ("view (ViewPosition)", inventory.view),
                           ("pixels (photometric interpretation, bits stored)", inventory.pixels),
                           ("transfer syntax", inventory.transfer_syntax),
                           ("VOI (how stored values became gray levels)", inventory.voi)):
        lines += _table(title, counter)
    dicom_images = sum(inventory.voi.values())
    if dicom_images:
        lines.append(f"patients: {len(inventory.patients)} distinct PatientID(s); "
                     f"{inventory.without_patient_id} DICOM image(s) without PatientID (each counts as its own "
                     f"patient)")
    if inventory.skipped:
        lines.append("skipped:")
        lines += [f"  {line}" for line in inventory.skipped.lines()]
    return "\n".join(lines)


def write_contact_sheet(rows: list[list[np.ndarray]], path: Path, *, counts: list[int], padding: int = 2) -> Path:
    """One row per class: the class name and its image count, then the sample images."""
    sized = [r for r in rows if r]
    h, w = sized[0][0].shape
    row_height = max(h, 28)  # room for the two text lines beside small images
    cols = max(1, max(len(r) for r in rows))
    sheet = Image.new("L", (LABEL_WIDTH + cols * (w + padding) + padding, len(rows) * (row_height + padding) + padding),
                      0)
    draw = ImageDraw.Draw(sheet)
    for k, (row, name) in enumerate(zip(rows, CLASS_NAMES)):
        top = padding + k * (row_height + padding)
        draw.text((4, top + 2), name, fill=255)
        draw.text((4, top + 14), f"{counts[k]} images", fill=160)
        for j, pixels in enumerate(row):
            sheet.paste(Image.fromarray(pixels, mode="L"), (LABEL_WIDTH + padding + j * (w + padding), top))
    return save_image(np.asarray(sheet), path)
