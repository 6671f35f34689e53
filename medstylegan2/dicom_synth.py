"""Synthetic DICOM files for tests, benchmarks and demos (no real patient data exists here).

``write_radiograph`` stores an anatomy image (float [H, W], 0 = air .. 1 = bone) as a DX
radiograph the way a modality would: stored values of ``bits_stored`` bits, MONOCHROME2 (bone high)
or MONOCHROME1 (bone low), optional rescale, window, VOI LUT and compressed transfer syntax, and
the patient tags a real file carries. ``write_text_report`` writes a Basic Text SR (no pixels).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

# SOP classes (PS3.4 B.5).
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def stored_values(anatomy: np.ndarray, *, bits_stored: int, photometric: str = "MONOCHROME2",
                  signed: bool = False) -> np.ndarray:
    """Anatomy in [0, 1] -> integer stored values spanning ``bits_stored`` bits (bone high in MONOCHROME2)."""
    top = 2 ** bits_stored - 1
    values = np.rint(np.clip(anatomy, 0.0, 1.0) * top).astype(np.int64)
    if photometric == "MONOCHROME1":
        values = top - values
    if signed:
        values -= 2 ** (bits_stored - 1)
    return values


def _base_dataset(sop_class: str, *, transfer_syntax: str, patient_name: str, patient_id: str | None,
                  modality: str):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = patient_name
    if patient_id is not None:
        ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.StudyDate = "20260101"
    ds.AccessionNumber = "ACC0001"
    ds.InstitutionName = "Synthetic General Hospital"
    ds.Modality = modality
    return ds


def write_radiograph(path: str | Path, anatomy: np.ndarray | None = None, *, stored: np.ndarray | None = None,
                     bits_stored: int = 12, bits_allocated: int = 16, photometric: str = "MONOCHROME2",
                     signed: bool = False, view: str | None = "PA", modality: str = "DX",
                     rescale: tuple[float, float] | None = None, window: tuple[float, float] | None = None,
                     voi_function: str | None = None, voi_lut: tuple[int, Sequence[int], int] | None = None,
                     lut_vr: str = "US",
                     transfer_syntax: str | None = None, patient_name: str = "Synthetic^Patient",
                     patient_id: str | None = "SYN-0001", frames: int = 1, preamble: bool = True) -> Path:
    """Write one radiograph. Give ``anatomy`` (float [H, W] in [0, 1]) or ``stored`` (integers).

    ``window`` = (center, width) in modality units; ``voi_lut`` = (first mapped value, table,
    bits per entry); ``rescale`` = (slope, intercept); ``frames`` > 1 repeats the image.
    """
    from pydicom.uid import ExplicitVRLittleEndian

    syntax = transfer_syntax or ExplicitVRLittleEndian
    if stored is None:
        if anatomy is None:
            raise ValueError("give anatomy or stored values")
        stored = stored_values(anatomy, bits_stored=bits_stored, photometric=photometric, signed=signed)
    ds = _base_dataset(DX_FOR_PRESENTATION, transfer_syntax=ExplicitVRLittleEndian, patient_name=patient_name,
                       patient_id=patient_id, modality=modality)
    if view is not None:
        ds.ViewPosition = view
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(stored.shape[0]), int(stored.shape[1])
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = int(signed)
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = f"{rescale[0]:g}", f"{rescale[1]:g}"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = f"{window[0]:g}", f"{window[1]:g}"
    if voi_function is not None:
        ds.VOILUTFunction = voi_function
    if voi_lut is not None:
        from pydicom.dataset import Dataset

        first, table, lut_bits = voi_lut
        item = Dataset()
        item.LUTDescriptor = [len(table) % 65536, int(first), int(lut_bits)]
        # LUT Data is "US or OW": modalities write either, so both are produced here.
        if lut_vr == "US":
            item.add_new(0x00283006, "US", [int(v) for v in table])
        else:
            item.add_new(0x00283006, "OW", np.asarray(table, dtype="<u2").tobytes())
        ds.VOILUTSequence = [item]
    dtype = {(8, False): np.uint8, (8, True): np.int8, (16, False): np.uint16, (16, True): np.int16}[
        (bits_allocated, signed)]
    frame = stored.astype(dtype)
    if signed and bits_stored < bits_allocated:
        # Two's complement within BitsStored, as a modality writes it (high bits zero).
        frame = (frame.astype(np.int64) & (2 ** bits_stored - 1)).astype(np.uint16 if bits_allocated == 16 else np.uint8)
    if frames > 1:
        ds.NumberOfFrames = frames
        frame = np.stack([frame] * frames)
    ds.PixelData = np.ascontiguousarray(frame).tobytes()
    if syntax != ExplicitVRLittleEndian:
        ds.compress(syntax)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if preamble:
        ds.save_as(path, enforce_file_format=True)
    else:
        # A raw data set without the 128-byte preamble and DICM magic (pre-Part-10 style).
        ds.save_as(path, implicit_vr=False, little_endian=True)
    return path


def write_text_report(path: str | Path, *, patient_name: str = "Synthetic^Patient",
                      patient_id: str | None = "SYN-0001") -> Path:
    """A Basic Text SR: a DICOM object without pixel data, as archives hold beside images."""
    from pydicom.uid import ExplicitVRLittleEndian

    ds = _base_dataset(BASIC_TEXT_SR, transfer_syntax=ExplicitVRLittleEndian, patient_name=patient_name,
                       patient_id=patient_id, modality="SR")
    ds.ValueType = "CONTAINER"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def phantom_anatomy(label: int, size: int, seed: int, *, aspect: float = 1.0) -> np.ndarray:
    """A chest phantom (``medstylegan2.phantoms``) as anatomy in [0, 1], ``size`` rows x size*aspect cols."""
    from PIL import Image

    from medstylegan2.phantoms import make_phantom, phantom_rng

    image = make_phantom(label, size, phantom_rng(seed, label, 0))
    if aspect != 1.0:
        width = max(1, round(size * aspect))
        image = np.asarray(Image.fromarray(image).resize((width, size), Image.Resampling.BICUBIC))
    return image.astype(np.float64) / 255.0
