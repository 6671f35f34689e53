"""DICOM ingestion: correct pixels, the filters a site needs, labels, and the salted patient key.

Every file is written with pydicom in tmp_path; images are tiny (64 x 48) so decoding is instant.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from medstylegan2.config import CLASS_NAMES, ConfigError, DataConfig, load_config
from medstylegan2.data import load_dataset, load_folder
from medstylegan2.dicom import apply_window, read_dicom
from medstylegan2.dicom_synth import phantom_anatomy, stored_values, write_radiograph, write_text_report
from medstylegan2.errors import DataError
from medstylegan2.ingest import SiteOptions, site_data_config
from medstylegan2.labels import LabelVocabulary
from medstylegan2.patient_key import PatientHasher
from medstylegan2.skips import SkipFile

pydicom = pytest.importorskip("pydicom")
from pydicom.uid import JPEG2000Lossless, RLELossless  # noqa: E402

ROWS, COLS = 48, 64  # landscape: the decoded 64 x 64 image has 8 black rows above and below


@pytest.fixture(scope="module")
def anatomy() -> np.ndarray:
    return phantom_anatomy(1, ROWS, seed=3, aspect=COLS / ROWS)


def decode(path, resolution=COLS, **kw) -> np.ndarray:
    return read_dicom(path, resolution, **kw).pixels


def content(pixels: np.ndarray) -> np.ndarray:
    """The image part of a decoded 64 x 64 landscape image (without the padding rows)."""
    return pixels[8:56].astype(np.int64)


def linear_window(x: np.ndarray, c: float, w: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 written out branch by branch, output 0..255."""
    x = np.asarray(x, np.float64)
    y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255
    y = np.where(x <= c - 0.5 - (w - 1) / 2, 0, y)
    y = np.where(x > c - 0.5 + (w - 1) / 2, 255, y)
    return np.rint(y).astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Pixels


@pytest.mark.parametrize("window", [None, "linear", "linear_exact"])
def test_monochrome1_and_monochrome2_of_the_same_anatomy_decode_to_the_same_image(tmp_path, anatomy, window):
    top = 4095
    kw1, kw2 = {}, {}
    if window == "linear":
        # The same window on the inverted scale: c' = top - c + 1 for the LINEAR function's half-pixel offset.
        kw2 = {"window": (1800, 2600)}
        kw1 = {"window": (top - 1800 + 1, 2600)}
    elif window == "linear_exact":
        kw2 = {"window": (1800, 2600), "voi_function": "LINEAR_EXACT"}
        kw1 = {"window": (top - 1800, 2600), "voi_function": "LINEAR_EXACT"}
    m2 = write_radiograph(tmp_path / "m2.dcm", anatomy, photometric="MONOCHROME2", **kw2)
    m1 = write_radiograph(tmp_path / "m1.dcm", anatomy, photometric="MONOCHROME1", **kw1)
    a, b = decode(m1), decode(m2)
    assert np.array_equal(a, b)
    # Bone bright, air dark: the spine column is brighter than the lung fields beside it.
    assert content(b)[:, 30:34].mean() > content(b)[:, 12:20].mean() + 20


def test_window_center_width_follows_the_dicom_linear_function(tmp_path):
    stored = np.tile(np.arange(COLS, dtype=np.int64) * 64, (ROWS, 1))  # 0 .. 4032 across the columns
    path = write_radiograph(tmp_path / "w.dcm", stored=stored, window=(1000, 801))
    got = content(decode(path))
    assert np.array_equal(got, linear_window(stored, 1000, 801))
    assert got[0, 0] == 0 and got[0, -1] == 255 and 0 < got[0, 16] < 255  # the window really clips
    # LINEAR_EXACT and SIGMOID per the standard too.
    exact = write_radiograph(tmp_path / "e.dcm", stored=stored, window=(1000, 800), voi_function="LINEAR_EXACT")
    want = np.rint(np.clip((stored - 1000) / 800 + 0.5, 0, 1) * 255)
    assert np.array_equal(content(decode(exact)), want)
    sigmoid = write_radiograph(tmp_path / "s.dcm", stored=stored, window=(1000, 800), voi_function="SIGMOID")
    want = np.rint(255 / (1 + np.exp(-4 * (stored - 1000) / 800)))
    assert np.abs(content(decode(sigmoid)) - want).max() <= 1


def test_window_of_width_below_one_is_invalid_and_falls_back_to_percentiles(tmp_path, anatomy):
    assert apply_window(np.zeros((2, 2), np.float32), 10, 0.5) is None
    bad = read_dicom(write_radiograph(tmp_path / "bad.dcm", anatomy, window=(2000, 0.5)), COLS)
    plain = read_dicom(write_radiograph(tmp_path / "plain.dcm", anatomy), COLS)
    assert bad.facts.voi == "window (fallback: percentile)" and plain.facts.voi == "percentile"
    assert np.array_equal(bad.pixels, plain.pixels)


@pytest.mark.parametrize("lut_vr", ["US", "OW"])
def test_voi_lut_sequence_is_applied_in_preference_to_the_window(tmp_path, lut_vr):
    stored = np.tile(np.arange(COLS, dtype=np.int64) * 64, (ROWS, 1))
    first, entries = 500, 3000
    table = np.rint(255 * np.sqrt(np.arange(entries) / (entries - 1))).astype(int)  # 8-bit gamma curve
    path = write_radiograph(tmp_path / "lut.dcm", stored=stored, voi_lut=(first, table, 8), window=(1000, 100),
                            lut_vr=lut_vr)
    decoded = read_dicom(path, COLS)
    want = table[np.clip(stored - first, 0, entries - 1)]  # below first -> entry 0, above -> last entry
    assert decoded.facts.voi == "VOI LUT"
    assert np.array_equal(content(decoded.pixels), want)


def test_rescale_slope_and_intercept_come_before_the_window(tmp_path, anatomy):
    stored = stored_values(anatomy, bits_stored=12)
    # Modality values 2 * stored - 1000; a window in those units equals a halved window on stored values.
    rescaled = write_radiograph(tmp_path / "r.dcm", stored=stored, rescale=(2, -1000), window=(1000, 4000),
                                voi_function="LINEAR_EXACT")
    direct = write_radiograph(tmp_path / "d.dcm", stored=stored, window=(1000, 2000), voi_function="LINEAR_EXACT")
    assert np.array_equal(decode(rescaled), decode(direct))
    # Without rescaling, the same window would map everything differently.
    ignored = write_radiograph(tmp_path / "i.dcm", stored=stored, window=(1000, 4000), voi_function="LINEAR_EXACT")
    assert not np.array_equal(decode(ignored), decode(direct))


@pytest.mark.parametrize("bits, signed", [(10, False), (12, False), (16, False), (16, True), (12, True)])
def test_10_to_16_bit_signed_and_unsigned_pixels_decode_like_the_12_bit_reference(tmp_path, anatomy, bits, signed):
    reference = decode(write_radiograph(tmp_path / "ref.dcm", anatomy, bits_stored=12))
    other = decode(write_radiograph(tmp_path / "x.dcm", anatomy, bits_stored=bits, signed=signed))
    # Quantisation to 10..16 bits moves a percentile window by a fraction of a gray level at most.
    assert np.abs(other.astype(int) - reference).max() <= 1
    assert np.mean(other != reference) < 0.1


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "jpeg2000-lossless"])
def test_compressed_transfer_syntaxes_decode_to_the_same_pixels_as_uncompressed(tmp_path, anatomy, syntax):
    plain = write_radiograph(tmp_path / "plain.dcm", anatomy, bits_stored=12, window=(2000, 3000))
    packed = write_radiograph(tmp_path / "packed.dcm", anatomy, bits_stored=12, window=(2000, 3000),
                              transfer_syntax=syntax)
    assert pydicom.dcmread(packed).file_meta.TransferSyntaxUID == syntax
    assert np.array_equal(pydicom.dcmread(packed).pixel_array, pydicom.dcmread(plain).pixel_array)
    result = read_dicom(packed, COLS)
    assert result.facts.transfer_syntax == syntax.name
    assert np.array_equal(result.pixels, decode(plain))


def test_jpeg_ls_lossless_decodes_to_the_uncompressed_pixels():
    from pydicom.data import get_testdata_file

    # pydicom ships these two files: the same MR slice, uncompressed and JPEG-LS lossless.
    plain, packed = get_testdata_file("MR_small.dcm"), get_testdata_file("MR_small_jpeg_ls_lossless.dcm")
    assert np.array_equal(decode(packed), decode(plain))


def test_aspect_ratio_is_kept_by_padding_not_stretching(tmp_path):
    wide = np.full((32, 64), 3000)
    wide[:, ::2] = 3100  # not blank, but all above the window: the image is white
    path = write_radiograph(tmp_path / "wide.dcm", stored=wide, window=(1000, 100))
    out = decode(path, 32)
    assert out.shape == (32, 32)
    assert (out[:8] == 0).all() and (out[24:] == 0).all() and (out[8:24] == 255).all()
    tall = write_radiograph(tmp_path / "tall.dcm", stored=wide.T.copy(), window=(1000, 100))
    out = decode(tall, 32)
    assert (out[:, :8] == 0).all() and (out[:, 24:] == 0).all() and (out[:, 8:24] == 255).all()


# ----------------------------------------------------------------------------------------------
# Filters and detection


def _site_archive(root: Path, anatomy: np.ndarray) -> Path:
    """3 classes x 2 frontal images, plus a lateral, an oblique, a report, a multi-frame and a colour-less
    file without magic; nested like a PACS export; one image has no ViewPosition and no PatientID."""
    for k, name in enumerate(CLASS_NAMES):
        for i in range(2):
            write_radiograph(root / name / f"P{k}{i}" / "series1" / f"IM{i:04d}", anatomy,
                             view="PA" if i == 0 else "AP", patient_id=f"PAT-{k}-{i}")
    write_radiograph(root / "Normal" / "P00" / "series2" / "IM0009", anatomy, view="LL", patient_id="PAT-0-0")
    write_radiograph(root / "Normal" / "P00" / "series3" / "IM0010.dcm", anatomy, view="RLO", patient_id="PAT-0-0")
    write_text_report(root / "Normal" / "P00" / "report.dcm")
    write_radiograph(root / "COVID-19" / "multi.dcm", anatomy, frames=2)
    write_radiograph(root / "COVID-19" / "noview.dcm", anatomy, view=None, patient_id=None)
    write_radiograph(root / "Non-COVID" / "raw.dcm", anatomy, preamble=False)
    (root / "Non-COVID" / "README").write_text("not an image")
    return root


def test_lateral_views_and_non_image_objects_are_skipped_and_counted_by_reason(tmp_path, anatomy, caplog):
    root = _site_archive(tmp_path / "archive", anatomy)
    with caplog.at_level(logging.WARNING):
        images = load_folder(root, 32, options=SiteOptions(patient_salt_file=str(tmp_path / "salt")))
    assert images.class_counts() == [2, 3, 2]
    assert "COVID-19/noview.dcm" in images.sources  # no ViewPosition: kept
    text = "\n".join(r.getMessage() for r in caplog.records)
    for line in ("1 lateral view (data.frontal_only): Normal/P00/series2/IM0009",
                 "1 neither frontal nor lateral view (data.frontal_only): Normal/P00/series3/IM0010.dcm",
                 "1 not an image (no PixelData: structured report, presentation state, ...): Normal/P00/report.dcm",
                 "1 multi-frame image: COVID-19/multi.dcm",
                 "1 not a DICOM file (no DICM magic, pydicom refused it): Non-COVID/raw.dcm"):
        assert line in text, text
    assert "README" not in text  # not a DICOM candidate and not an image: never listed

    everything = load_folder(root, 32, options=SiteOptions(frontal_only=False, patient_salt_file=str(tmp_path / "salt")))
    assert everything.class_counts() == [4, 3, 2]


def test_extensionless_and_uid_named_files_are_found_by_their_magic(tmp_path, anatomy):
    for k, name in enumerate(CLASS_NAMES):
        write_radiograph(tmp_path / name / "1.2.826.0.1.3680043.8.498.1", anatomy)
        write_radiograph(tmp_path / name / "IM0001", anatomy)
    images = load_folder(tmp_path, 32, options=SiteOptions(patient_salt_file=str(tmp_path / "salt")))
    assert images.class_counts() == [2, 2, 2]


def test_decoded_dicom_folder_is_cached_with_groups_and_skips(tmp_path, anatomy, caplog):
    root = _site_archive(tmp_path / "archive", anatomy)
    options = SiteOptions(patient_salt_file=str(tmp_path / "salt"))
    first = load_folder(root, 32, cache_dir=tmp_path / "cache", options=options)
    with caplog.at_level(logging.WARNING):
        second = load_folder(root, 32, cache_dir=tmp_path / "cache", options=options)
    assert np.array_equal(first.images, second.images) and np.array_equal(first.groups, second.groups)
    assert any("1 lateral view" in r.getMessage() for r in caplog.records)
    # A different view filter is a different cache.
    third = load_folder(root, 32, cache_dir=tmp_path / "cache", options=SiteOptions(
        frontal_only=False, patient_salt_file=str(tmp_path / "salt")))
    assert len(third) == len(first) + 2


# ----------------------------------------------------------------------------------------------
# Labels


def _flat_archive(root: Path, anatomy: np.ndarray, words: list[str]) -> Path:
    for i, _ in enumerate(words):
        write_radiograph(root / "export" / f"img{i:02d}.dcm", anatomy, patient_id=f"P{i}")
    rows = ["file,label,comment"] + [f"export/img{i:02d}.dcm,{word},x" for i, word in enumerate(words)]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def test_labels_csv_and_label_map_assign_classes_and_count_skipped_labels(tmp_path, anatomy, caplog):
    words = ["covid", "COVID ", "healthy", "Normal", "pneumonia", "lateral-junk", "missing-file"]
    root = _flat_archive(tmp_path / "site", anatomy, words)
    (root / "export" / "img06.dcm").unlink()
    (root / "labels.csv").write_text((root / "labels.csv").read_text() + "export/absent.dcm,covid,x\n")
    cfg = load_config(None, ["data.source=folder", f"data.root={root}", f"data.labels_csv={root / 'labels.csv'}",
                             "data.label_map={covid: COVID-19, healthy: Normal, pneumonia: Non-COVID, "
                             "lateral-junk: skip, missing-file: Normal}", "data.heldout_fraction=0",
                             "data.cache_dir=null", f"data.patient_salt_file={tmp_path / 'salt'}"])
    with caplog.at_level(logging.WARNING):
        train, _ = load_dataset(cfg.data, 32)
    assert train.class_counts() == [2, 2, 1]
    by_source = dict(zip(train.sources, train.labels.tolist()))
    assert by_source["export/img01.dcm"] == CLASS_NAMES.index("COVID-19")  # case and spaces ignored
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "1 label mapped to 'skip' in data.label_map: export/img05.dcm" in text
    assert "2 listed in the labels CSV but not found: export/absent.dcm, export/img06.dcm" in text


def test_an_unmapped_label_is_an_error_naming_the_label_and_a_file(tmp_path, anatomy):
    root = _flat_archive(tmp_path / "site", anatomy, ["covid", "Normal", "Non-COVID", "tuberculosis"])
    cfg = DataConfig(source="folder", root=str(root), labels_csv=str(root / "labels.csv"), cache_dir=None,
                     label_map={"covid": "COVID-19"}, patient_salt_file=str(tmp_path / "salt"))
    with pytest.raises(DataError, match=r"'tuberculosis' \(1 file\(s\), e.g. export/img03.dcm\)"):
        load_dataset(cfg, 32)


def test_label_map_values_must_be_classes_or_skip(tmp_path):
    with pytest.raises(ConfigError, match=r"'data.label_map.covid' = 'Covid' is not a class"):
        load_config(None, ["data.label_map={covid: Covid}"])
    with pytest.raises(ConfigError, match="data.label_map.COVID"):
        load_config(None, ["data.label_map={covid: COVID-19, COVID: Normal}"])
    with pytest.raises(ConfigError, match="'data.label_map' must be a mapping"):
        load_config(None, ["data.label_map=[covid]"])


def test_class_folders_may_carry_the_sites_own_words(tmp_path, anatomy):
    for word in ("healthy", "covid", "other-pneumonia", "lateral-junk"):
        write_radiograph(tmp_path / word / "a.dcm", anatomy)
    vocabulary = LabelVocabulary.of({"healthy": "Normal", "covid": "COVID-19", "other-pneumonia": "Non-COVID",
                                     "lateral-junk": "skip"})
    images = load_folder(tmp_path, 16, options=SiteOptions(vocabulary=vocabulary,
                                                           patient_salt_file=str(tmp_path / "salt")))
    assert images.class_counts() == [1, 1, 1]
    assert images.sources == ["healthy/a.dcm", "covid/a.dcm", "other-pneumonia/a.dcm"]


# ----------------------------------------------------------------------------------------------
# Patient key


def test_patient_hash_is_stable_per_salt_and_differs_across_salts(tmp_path):
    a = PatientHasher(tmp_path / "site-a" / "patient-id.salt")
    key = a.key("PID-1")
    salt_file = tmp_path / "site-a" / "patient-id.salt"
    assert stat.S_IMODE(os.stat(salt_file).st_mode) == 0o600
    assert len(bytes.fromhex(salt_file.read_text().strip())) == 32
    again = PatientHasher(salt_file)  # another process of the same site reads the same salt
    assert again.key("PID-1") == key and again.key("PID-2") != key
    other_site = PatientHasher(tmp_path / "site-b" / "patient-id.salt")
    assert other_site.key("PID-1") != key
    assert "PID-1" not in key and len(key) == 64
    # The issuer is part of the identity: the same number from two registries is two patients.
    assert a.key("PID-1", "HOSP-A") != a.key("PID-1", "HOSP-B")


def test_images_of_one_patient_share_a_group_and_images_without_an_id_are_their_own(tmp_path, anatomy):
    for k, name in enumerate(CLASS_NAMES):
        write_radiograph(tmp_path / name / "a.dcm", anatomy, patient_id="SAME")
        write_radiograph(tmp_path / name / "b.dcm", anatomy, patient_id=f"OTHER-{k}")
        write_radiograph(tmp_path / name / "c.dcm", anatomy, patient_id=None)
    images = load_folder(tmp_path, 16, options=SiteOptions(patient_salt_file=str(tmp_path / "salt")))
    groups = dict(zip(images.sources, images.groups.tolist()))
    assert groups["Normal/a.dcm"] == groups["COVID-19/a.dcm"] == groups["Non-COVID/a.dcm"]
    assert len({groups[f"{n}/b.dcm"] for n in CLASS_NAMES} | {groups["Normal/a.dcm"]}) == 4
    assert len({groups[f"{n}/c.dcm"] for n in CLASS_NAMES}) == 3
    assert len(set(images.groups.tolist())) == 7
    # Groups survive subsetting (the held-out split) aligned with their images.
    sub = images.subset([4, 0])
    assert sub.groups.tolist() == [images.groups[4], images.groups[0]]


def test_png_folders_carry_no_groups(tmp_path):
    from PIL import Image

    for name in CLASS_NAMES:
        (tmp_path / name).mkdir()
        Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16), mode="L").save(tmp_path / name / "a.png")
    assert load_folder(tmp_path, 16).groups is None


def test_a_site_takes_its_archive_settings_from_its_node_config_not_from_the_server(tmp_path):
    label_map = tmp_path / "labels.yaml"
    label_map.write_text("covid: COVID-19\nhealthy: Normal\n")
    server = DataConfig(label_map={"x": "Normal"}, labels_csv="/server/says.csv", frontal_only=False,
                        patient_salt_file="/server/salt", cache_dir="/server/cache")
    site = site_data_config(server, {"data-dir": "/data", "state-dir": str(tmp_path / "state"),
                                     "label-map": str(label_map), "labels-csv": "/site/labels.csv"})
    assert site.label_map == {"covid": "COVID-19", "healthy": "Normal"}
    assert site.labels_csv == "/site/labels.csv" and site.frontal_only is True
    assert site.patient_salt_file == str(tmp_path / "state" / "patient-id.salt")
    assert site.cache_dir == str(tmp_path / "state" / "data-cache")
    bare = site_data_config(server, {"data-dir": "/data", "frontal-only": "false"})
    assert bare.label_map == {} and bare.labels_csv is None and bare.frontal_only is False
    assert bare.patient_salt_file is None and bare.cache_dir == DataConfig().cache_dir
    label_map.write_text("covid: Covid\n")
    with pytest.raises(ConfigError, match="data.label_map.covid"):
        site_data_config(server, {"label-map": str(label_map)})


def test_skip_reasons_are_a_closed_vocabulary():
    with pytest.raises(ValueError, match="unknown skip reason"):
        SkipFile("because")
