"""``medstylegan2 inspect-data``: counts, skipped files, contact sheet and export, on DICOM and PNG folders."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medstylegan2.cli import main
from medstylegan2.config import CLASS_NAMES
from medstylegan2.data import load_folder
from medstylegan2.dicom_synth import phantom_anatomy, write_radiograph, write_text_report
from medstylegan2.ingest import SiteOptions

pytest.importorskip("pydicom")


@pytest.fixture
def archive(tmp_path):
    root = tmp_path / "archive"
    for k, name in enumerate(CLASS_NAMES):
        for i in range(3):
            # Two series both named IM0001, as PACS exports do: the export must keep both.
            write_radiograph(root / name / f"S{i}" / "IM0001", phantom_anatomy(k, 40, seed=i, aspect=1.25),
                             photometric="MONOCHROME1" if k == 0 else "MONOCHROME2", bits_stored=12 if i else 16,
                             window=(2000, 3000) if i == 2 else None, patient_id=f"P{i}")
    write_radiograph(root / "Normal" / "lat.dcm", phantom_anatomy(0, 40, seed=9), view="LL")
    write_text_report(root / "COVID-19" / "report.dcm")
    return root


def test_inspect_data_counts_what_a_dicom_archive_holds_and_why_files_were_skipped(tmp_path, archive, capsys,
                                                                                   monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    sheet = tmp_path / "sheet.png"
    assert main(["inspect-data", str(archive), "--resolution", "32", "--sheet", str(sheet)]) == 0
    out = capsys.readouterr().out
    assert f"{archive}: 9 image(s) accepted at 32 px, 2 file(s) skipped" in out
    for line in ("Normal", "COVID-19", "Non-COVID"):
        assert any(row.split() == [line, "3"] for row in out.splitlines()), out
    assert any(row.split() == ["MONOCHROME1,", "16", "bits", "1"] for row in out.splitlines()), out
    assert any(row.split() == ["MONOCHROME2,", "12", "bits", "4"] for row in out.splitlines()), out
    assert any(row.split() == ["DX", "9"] for row in out.splitlines()) and "percentile" in out and "window" in out
    assert "patients: 3 distinct PatientID(s)" in out
    assert "1 lateral view (data.frontal_only): Normal/lat.dcm" in out
    assert "1 not an image (no PixelData: structured report, presentation state, ...): COVID-19/report.dcm" in out
    image = Image.open(sheet)
    assert image.mode == "L" and image.size[0] > 3 * 32 and image.size[1] >= 3 * 32
    # Patients were counted with a throw-away salt: no salt file appeared.
    assert not (tmp_path / "config").exists()


def test_export_writes_every_accepted_image_exactly_as_the_loader_decodes_it(tmp_path, archive, capsys):
    out = tmp_path / "export"
    assert main(["inspect-data", str(archive), "--resolution", "32", "--export", str(out),
                 "--sheet", str(tmp_path / "s.png")]) == 0
    assert "exported 9 image(s)" in capsys.readouterr().out
    loaded = load_folder(archive, 32, options=SiteOptions(patient_salt_file=str(tmp_path / "salt")))
    for name in CLASS_NAMES:
        files = sorted((out / name).glob("*.png"))
        # The first keeps its name; the others carry a suffix that tells them apart.
        assert len(files) == 3 and "IM0001.png" in {f.name for f in files}
        exported = {tuple(np.asarray(Image.open(f)).ravel()) for f in files}
        assert all(Image.open(f).mode == "L" for f in files)
        expected = {tuple(img[0].ravel()) for img in loaded.of_class(CLASS_NAMES.index(name)).images}
        assert exported == expected


def test_inspect_data_works_on_png_class_folders_and_with_a_labels_csv(tmp_path, capsys):
    png = tmp_path / "png"
    for name in CLASS_NAMES:
        (png / name).mkdir(parents=True)
        Image.fromarray(np.tile(np.arange(24, dtype=np.uint8) * 10, (20, 1)), mode="L").save(png / name / "a.png")
    assert main(["inspect-data", str(png), "--resolution", "16", "--sheet", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    assert "3 image(s) accepted" in out and "PNG/JPEG, 8 bits" in out

    flat = tmp_path / "flat"
    for i in range(3):
        write_radiograph(flat / f"x{i}.dcm", phantom_anatomy(i, 32, seed=i))
    (flat / "labels.csv").write_text("file,label\nx0.dcm,healthy\nx1.dcm,covid\nx2.dcm,Non-COVID\n")
    assert main(["inspect-data", str(flat), "--labels", str(flat / "labels.csv"), "--resolution", "16",
                 "--set", "data.label_map={healthy: Normal, covid: COVID-19}",
                 "--sheet", str(tmp_path / "f.png")]) == 0
    out = capsys.readouterr().out
    assert "3 image(s) accepted" in out
    # An unmapped word is one error line naming it.
    (flat / "labels.csv").write_text("file,label\nx0.dcm,healthy\nx1.dcm,covid\nx2.dcm,Non-COVID\n")
    assert main(["inspect-data", str(flat), "--labels", str(flat / "labels.csv"),
                 "--sheet", str(tmp_path / "f.png")]) == 2
    assert "'healthy' (1 file(s), e.g. x0.dcm)" in capsys.readouterr().err
