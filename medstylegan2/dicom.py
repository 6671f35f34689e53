"""DICOM chest radiographs as the model sees them: detection, filters, correct pixels, patient key.

In: one file of a hospital archive. Out: ``DicomImage`` = uint8 ``[R, R]`` pixels (0 black/air ..
255 white/bone, aspect ratio kept, padded with black), the non-identifying facts ``inspect-data``
counts (modality, view, photometric interpretation, bit depth, transfer syntax, which VOI was
used), and the site-salted hash of the PatientID (or None) - or ``SkipFile`` with a reason code.

Only the tags in ``READ_TAGS`` are kept while pydicom parses the file; names, dates, accession
numbers and every other header field are dropped as they are read. PatientID is read only to be
hashed with the site's secret salt (HMAC-SHA256, ``medstylegan2.patient_key``) and the raw value
is never stored.

The pixel pipeline follows DICOM PS3.3 C.11 in order:
stored values (BitsStored, PixelRepresentation: pydicom masks unused bits and sign-extends) ->
Modality LUT (LUT sequence, else Rescale Slope/Intercept) -> VOI (first VOI LUT, else first Window
Center/Width with VOI LUT Function LINEAR / LINEAR_EXACT / SIGMOID, else a robust 0.5-99.5
percentile window) -> MONOCHROME1 inverted so that bone is bright as in MONOCHROME2 -> resized
into the square with its aspect ratio kept -> uint8.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from medstylegan2.patient_key import PatientHasher
from medstylegan2.skips import SkipFile

log = logging.getLogger(__name__)

# Recognised by name; extensionless files and UID-like names ("1.2.840...123") by the magic.
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
PREAMBLE_BYTES = 128
MAGIC = b"DICM"

FRONTAL_VIEWS = ("PA", "AP")
LATERAL_VIEWS = ("LL", "RL", "LAT", "LATERAL", "LLAT", "RLAT")
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")

# Everything the loader keeps from a header. pydicom drops every other element while parsing.
READ_TAGS = [
    "SOPClassUID", "Modality", "ViewPosition", "PatientID", "IssuerOfPatientID",
    "SamplesPerPixel", "PhotometricInterpretation", "NumberOfFrames", "PlanarConfiguration",
    "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    "RescaleSlope", "RescaleIntercept", "ModalityLUTSequence",
    "VOILUTSequence", "WindowCenter", "WindowWidth", "VOILUTFunction",
    "ExtendedOffsetTable", "ExtendedOffsetTableLengths", "PixelData",
]
# Robust window when the file has none: these percentiles of the modality values map to 0 and 1.
PERCENTILE_WINDOW = (0.5, 99.5)
# The percentiles are taken on a strided subsample of about this many pixels per side (fast on 2k x 2k).
PERCENTILE_SIDE = 512


# ----------------------------------------------------------------------------------------------
# Finding DICOM files


def has_dicom_magic(path: str | Path) -> bool:
    """True if the file has the DICOM Part 10 preamble: 128 bytes, then ``DICM``."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(PREAMBLE_BYTES + len(MAGIC))
    except OSError:
        return False
    return head[PREAMBLE_BYTES:] == MAGIC


def _name_needs_magic(path: Path) -> bool:
    """No extension, or a numeric one (files named by their UID): only the content can tell."""
    suffix = path.suffix
    return suffix == "" or suffix[1:].isdigit()


def is_dicom_file(path: str | Path) -> bool:
    """A ``.dcm``/``.dicom``/``.dic`` file, or an extensionless (or UID-named) file with the magic."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    return _name_needs_magic(path) and has_dicom_magic(path)


def find_dicom_files(folder: str | Path) -> list[Path]:
    """DICOM files anywhere under ``folder`` (archives nest patient/study/series), sorted; hidden skipped."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and is_dicom_file(Path(dirpath) / name):
                found.append(Path(dirpath) / name)
    return sorted(found)


# ----------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class DicomFacts:
    """What ``inspect-data`` counts about a file: nothing here identifies a patient."""

    modality: str
    view: str            # ViewPosition, "" when absent
    photometric: str
    bits_stored: int
    transfer_syntax: str
    voi: str             # "VOI LUT", "window", "window (fallback: percentile)" or "percentile"


@dataclass
class DicomImage:
    pixels: np.ndarray           # uint8 [R, R]
    facts: DicomFacts
    patient_key: str | None      # salted hash of PatientID; None without one (or without a hasher)


def read_dicom(path: str | Path, resolution: int, *, frontal_only: bool = True,
               hasher: PatientHasher | None = None) -> DicomImage:
    """Decode one DICOM file for training; raises ``SkipFile`` for a file that is left out."""
    ds = _read_tags(Path(path))
    facts = _facts(ds)
    if "PixelData" not in ds:
        raise SkipFile("no-pixel-data", _sop_class_name(ds))
    view = facts.view.upper()
    if frontal_only and view and view not in FRONTAL_VIEWS:
        raise SkipFile("lateral" if view in LATERAL_VIEWS else "not-frontal", f"ViewPosition {facts.view}")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        # Frames can be different images (dual-energy bone/soft tissue, tomosynthesis): none is "the" X-ray.
        raise SkipFile("multi-frame", f"{frames} frames")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1 or facts.photometric not in MONOCHROME:
        raise SkipFile("colour", f"PhotometricInterpretation {facts.photometric or '(none)'}")
    if int(ds.get("BitsAllocated", 0) or 0) not in (8, 16):
        raise SkipFile("unsupported-pixels", f"BitsAllocated {ds.get('BitsAllocated')}")
    stored = _stored_values(ds)
    if stored.min() == stored.max():
        raise SkipFile("blank", f"every pixel {stored.flat[0]}")
    unit, voi = to_unit_range(ds, modality_values(ds, stored))
    if facts.photometric == "MONOCHROME1":
        # MONOCHROME1 displays its minimum white: invert after the VOI, where the standard puts it.
        unit = 1.0 - unit
    facts = dataclasses.replace(facts, voi=voi)
    return DicomImage(pixels=fit_square(unit, resolution), facts=facts, patient_key=_patient_key(ds, hasher))


def _read_tags(path: Path):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, force=False, specific_tags=READ_TAGS)
    except InvalidDicomError as exc:
        raise SkipFile("not-dicom", str(exc).split(".")[0]) from exc
    # pydicom reports a damaged file through many exception types (struct, EOF, value errors...).
    except Exception as exc:  # noqa: BLE001 - any parse failure means this one file is unreadable
        raise SkipFile("unreadable", f"{type(exc).__name__}: {exc}") from exc


def _text(ds, keyword: str) -> str:
    value = ds.get(keyword, "")
    return str(value).strip() if value is not None else ""


def _facts(ds) -> DicomFacts:
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID", None) if meta is not None else None
    return DicomFacts(modality=_text(ds, "Modality"), view=_text(ds, "ViewPosition"),
                      photometric=_text(ds, "PhotometricInterpretation"),
                      bits_stored=int(ds.get("BitsStored", 0) or 0),
                      transfer_syntax=syntax.name if syntax is not None else "", voi="")


def _sop_class_name(ds) -> str:
    uid = ds.get("SOPClassUID", None)
    return f"SOP class {uid.name}" if uid is not None else "no SOP class"


def _patient_key(ds, hasher: PatientHasher | None) -> str | None:
    patient_id = _text(ds, "PatientID")
    if hasher is None or not patient_id:
        return None
    return hasher.key(patient_id, _text(ds, "IssuerOfPatientID"))


def _stored_values(ds) -> np.ndarray:
    """Stored pixel values as signed/unsigned integers (pydicom masks unused high bits, sign-extends)."""
    from pydicom.pixels import get_decoder

    syntax = ds.file_meta.TransferSyntaxUID
    if syntax.is_compressed:
        try:
            available = get_decoder(syntax).is_available
        except NotImplementedError:
            available = False
        if not available:
            raise SkipFile("unsupported-pixels", f"no decoder installed for {syntax.name}")
    try:
        array = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - broken pixel data in one file must not stop the load
        raise SkipFile("unreadable", f"pixel data: {type(exc).__name__}: {exc}") from exc
    if array.ndim != 2:
        raise SkipFile("unsupported-pixels", f"pixel array of shape {list(array.shape)}")
    return array


# ----------------------------------------------------------------------------------------------
# Modality LUT and VOI


def modality_values(ds, stored: np.ndarray) -> np.ndarray:
    """Stored values -> modality values (float32): the Modality LUT, else Rescale Slope/Intercept."""
    seq = ds.get("ModalityLUTSequence", None)
    if seq:
        return lut_lookup(stored, seq[0], signed_input=int(ds.get("PixelRepresentation", 0) or 0) == 1)[0]
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    values = stored.astype(np.float32)
    if slope != 1.0:
        values *= np.float32(slope)
    if intercept != 0.0:
        values += np.float32(intercept)
    return values


def lut_lookup(values: np.ndarray, item, *, signed_input: bool) -> tuple[np.ndarray, int]:
    """Apply a LUT item (LUTDescriptor + LUTData): (float32 output, bits of the output range).

    Inputs below the first mapped value take the first entry, above the last the last entry
    (PS3.3 C.11.2.1.1 / C.11.1.1.1).
    """
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    if entries == 0:
        entries = 65536
    if signed_input and first > 32767:  # the descriptor's 2nd value is SS for signed pixel data
        first -= 65536
    data = item.LUTData
    if isinstance(data, (bytes, bytearray)):
        # Each entry is a 16-bit word; a few writers pack 8-bit entries one per byte.
        table = np.frombuffer(data, dtype="<u2" if len(data) >= 2 * entries else np.uint8)
    else:
        table = np.asarray(data if not isinstance(data, (int, float)) else [data])
    table = table[:entries].astype(np.float32)
    index = np.clip(np.rint(values).astype(np.int64) - first, 0, len(table) - 1)
    # Some writers declare 16 bits for 12-bit LUT data and vice versa; trust the data if it exceeds.
    top = int(table.max()) if len(table) else 0
    if top >= 2 ** bits:
        bits = max(1, top.bit_length())
    return table[index], bits


def to_unit_range(ds, values: np.ndarray) -> tuple[np.ndarray, str]:
    """Modality values -> float32 in [0, 1] through the file's VOI (or a robust window): (image, how)."""
    seq = ds.get("VOILUTSequence", None)
    if seq:
        signed = int(ds.get("PixelRepresentation", 0) or 0) == 1 or float(values.min()) < 0
        out, bits = lut_lookup(values, seq[0], signed_input=signed)
        return np.clip(out / np.float32(2 ** bits - 1), 0.0, 1.0), "VOI LUT"
    center, width = _first_value(ds, "WindowCenter"), _first_value(ds, "WindowWidth")
    if center is not None and width is not None:
        function = _text(ds, "VOILUTFunction").upper() or "LINEAR"
        windowed = apply_window(values, center, width, function)
        if windowed is not None:
            return windowed, "window"
        log.debug("window center %s width %s (%s) is not valid; using a percentile window", center, width, function)
        return percentile_window(values), "window (fallback: percentile)"
    return percentile_window(values), "percentile"


def _first_value(ds, keyword: str) -> float | None:
    """The first of a multi-valued window (the standard's default view), or None."""
    value = ds.get(keyword, None)
    if value is None or value == "":
        return None
    try:
        return float(value[0]) if hasattr(value, "__len__") and not isinstance(value, str) else float(value)
    except (TypeError, ValueError, IndexError):
        return None


def apply_window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray | None:
    """The VOI LUT Function of PS3.3 C.11.2.1.2 with output range [0, 1]; None for an invalid width.

    LINEAR:       x <= c - 0.5 - (w-1)/2 -> 0;  x > c - 0.5 + (w-1)/2 -> 1;
                  else ((x - (c - 0.5)) / (w - 1) + 0.5)               (w >= 1)
    LINEAR_EXACT: x <= c - w/2 -> 0;  x > c + w/2 -> 1;  else (x - c) / w + 0.5   (w > 0)
    SIGMOID:      1 / (1 + exp(-4 (x - c) / w))                               (w > 0)
    """
    x = values.astype(np.float32, copy=False)
    c, w = np.float32(center), np.float32(width)
    if function == "SIGMOID":
        if width <= 0:
            return None
        return (1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))).astype(np.float32)
    if function == "LINEAR_EXACT":
        if width <= 0:
            return None
        return np.clip((x - c) / w + np.float32(0.5), 0.0, 1.0)
    if function != "LINEAR":
        log.debug("unknown VOI LUT Function %r; applying LINEAR", function)
    if width < 1:
        return None
    if width == 1:  # the linear ramp degenerates to a step at c - 0.5
        return (x > c - np.float32(0.5)).astype(np.float32)
    return np.clip((x - (c - np.float32(0.5))) / (w - np.float32(1)) + np.float32(0.5), 0.0, 1.0)


def percentile_window(values: np.ndarray, percentiles: tuple[float, float] = PERCENTILE_WINDOW) -> np.ndarray:
    """Linear window from the given percentiles of the image (a strided subsample) to [0, 1]."""
    step = max(1, min(values.shape) // PERCENTILE_SIDE)
    lo, hi = np.percentile(values[::step, ::step], percentiles)
    if hi <= lo:  # nearly constant image: the full range is all there is
        lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, np.float32)
    out = values - np.float32(lo)  # float32, one new array; the rest works in place
    out *= np.float32(1.0 / (hi - lo))
    return np.clip(out, 0.0, 1.0, out=out)


# ----------------------------------------------------------------------------------------------
# Geometry


def fit_square(unit: np.ndarray, resolution: int) -> np.ndarray:
    """float [H, W] in [0, 1] -> uint8 [R, R]: scaled to fit, aspect ratio kept, centred on black."""
    h, w = unit.shape
    scale = resolution / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    image = Image.fromarray(np.ascontiguousarray(unit, dtype=np.float32))
    if (new_w, new_h) != (w, h):
        # Box filtering averages every source pixel when shrinking (no aliasing), as for PNGs.
        image = image.resize((new_w, new_h), Image.Resampling.BOX if scale < 1 else Image.Resampling.LANCZOS)
    fitted = np.rint(np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)
    out = np.zeros((resolution, resolution), np.uint8)
    top, left = (resolution - new_h) // 2, (resolution - new_w) // 2
    out[top:top + new_h, left:left + new_w] = fitted
    return out
