"""Nothing from a DICOM header leaves the site: not in a run folder, cache, log line or Flower reply.

A small archive of DICOMs that carry a patient name and ID goes through ``train-local`` and through
one federated round of the real ClientApp (in-process grid, as a SuperNode with ``data-dir``).
Then every byte the runs wrote, every log line and every serialized outgoing message is searched
for the name, the ID and the site's salted hash of the ID.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from medstylegan2.config import CLASS_NAMES, load_config
from medstylegan2.dicom_synth import phantom_anatomy, write_radiograph
from medstylegan2.patient_key import PatientHasher

pytest.importorskip("pydicom")

PATIENT_NAME = "Doe^Jane-SECRET"
PATIENT_ID = "PID-123-SECRET"
TINY = ["--set", "model.channel_base=256", "--set", "model.channel_max=32", "--set", "model.z_dim=16",
        "--set", "model.w_dim=16", "--set", "model.mapping_layers=2", "--set", "model.cmap_dim=16"]


def _archive(root: Path) -> Path:
    for k, name in enumerate(CLASS_NAMES):
        for i in range(4):
            write_radiograph(root / name / f"IM{i:04d}.dcm", phantom_anatomy(k, 40, seed=i, aspect=1.25),
                             photometric="MONOCHROME1" if i % 2 else "MONOCHROME2",
                             patient_name=PATIENT_NAME, patient_id=PATIENT_ID if i < 3 else f"{PATIENT_ID}-{i}")
    return root


def _needles(salt_file: Path) -> dict[str, bytes]:
    assert salt_file.is_file(), "the PatientID was never hashed: the test would prove nothing"
    key = PatientHasher(salt_file).key(PATIENT_ID)
    return {"patient name": PATIENT_NAME.encode(), "name part": b"Jane-SECRET", "patient id": PATIENT_ID.encode(),
            "hashed id (hex)": key.encode(), "hashed id (bytes)": bytes.fromhex(key)}


def _assert_nowhere(needles: dict[str, bytes], blobs: dict[str, bytes]) -> None:
    # The search itself works: the source files do hold the name and the ID as plain bytes.
    source = blobs["source file"]
    assert needles["patient name"] in source and needles["patient id"] in source
    del blobs["source file"]
    for where, blob in blobs.items():
        for what, needle in needles.items():
            assert needle not in blob, f"{what} found in {where}"


def _files_under(folder: Path, skip: set[Path] = frozenset()) -> dict[str, bytes]:
    blobs = {}
    for path in folder.rglob("*"):
        if path.is_file() and path not in skip:
            blobs[str(path)] = path.read_bytes()
            blobs[f"name of {path}"] = str(path.relative_to(folder)).encode()
    assert blobs
    return blobs


@pytest.fixture
def log_text(caplog):
    caplog.set_level(logging.DEBUG)
    return lambda: "\n".join(f"{r.name} {r.getMessage()}" for r in caplog.records).encode()


def test_train_local_on_dicoms_writes_no_header_value_anywhere(tmp_path, log_text, capsys):
    from medstylegan2.cli import main

    archive, work = _archive(tmp_path / "archive"), tmp_path / "work"
    salt = work / "site" / "patient-id.salt"
    assert main(["train-local", "--data", str(archive), "--resolution", "16", "--steps", "2", "--batch", "4",
                 "--out", str(work / "run"), "--grid-every", "1", *TINY, "--set", f"data.cache_dir={work / 'cache'}",
                 "--set", f"data.patient_salt_file={salt}", "--set", "data.heldout_fraction=0.25"]) == 0
    printed = capsys.readouterr()
    assert "9 training images" in printed.out
    assert list((work / "cache").glob("*.npz")) and (work / "run" / "checkpoint.pt").is_file()
    blobs = _files_under(work, skip={salt})
    blobs["log"] = log_text()
    blobs["stdout+stderr"] = (printed.out + printed.err).encode()
    blobs["source file"] = (archive / "Normal" / "IM0000.dcm").read_bytes()
    _assert_nowhere(_needles(salt), blobs)
    # The cache holds the patient groups (numbers only) and the images.
    with np.load(next((work / "cache").glob("*.npz"))) as z:
        assert bool(z["has_groups"]) and len(set(z["groups"].tolist())) == 2


def test_a_federated_site_on_dicoms_sends_and_writes_no_header_value(tmp_path, log_text):
    from flwr.common.serde import message_to_proto

    from client.client_app import app
    from server.loopback import LoopbackGrid
    from server.strategy import run_federation

    archive, work = _archive(tmp_path / "archive"), tmp_path / "work"
    state = work / "site-state"
    cfg = load_config("configs/smoke.yaml", ["federation.rounds=1", "federation.sites=1", "federation.min_sites=1",
                                             "federation.local_steps=2"])
    before = torch.get_num_threads()
    try:
        grid = LoopbackGrid(app, [{"data-dir": str(archive), "site-name": "hospital-a", "state-dir": str(state),
                                   "num-threads": 1}])
        run_federation(grid, cfg, work / "run", server_data=False)
    finally:
        torch.set_num_threads(before)
    assert len(grid.outgoing) == 2  # roll call and one round
    assert (work / "run" / "round_001.pt").is_file()
    assert list((state / "data-cache").glob("*.npz"))  # the site's cache went to its own state folder
    blobs = _files_under(work, skip={state / "patient-id.salt"})
    for i, (_, reply) in enumerate(grid.outgoing):
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        blobs[f"outgoing message {i}"] = message_to_proto(reply).SerializeToString()
    blobs["log"] = log_text()
    blobs["source file"] = (archive / "Normal" / "IM0000.dcm").read_bytes()
    _assert_nowhere(_needles(state / "patient-id.salt"), blobs)
