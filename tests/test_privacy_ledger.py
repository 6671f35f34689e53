"""The lifetime privacy ledger: what it composes (all releases, all runs, retries), that it is on
disk before record_release returns, that damage, edits and rewinds are loud, that two processes
cannot interleave, and the data set fingerprint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from opacus.accountants import create_accountant

from medstylegan2.privacy.fingerprint import dataset_fingerprint
from medstylegan2.privacy.ledger import (GENESIS, HEAD_FILE, LEDGER_FILE, LedgerBusyError, LedgerError, LedgerHead,
                                        PrivacyLedger, Release, open_ledger_for_policy)
from medstylegan2.privacy.policy import policy_from_mapping

REPO = Path(__file__).resolve().parents[1]
FP = "a" * 64


def release(run: str = "run-1", round_num: int = 1, sigma: float = 1.1, q: float = 0.01, steps: int = 40,
            unit: str = "image") -> Release:
    return Release(run=run, round=round_num, noise_multiplier=sigma, sample_rate=q, steps=steps, accountant="rdp",
                   unit=unit, max_grad_norm=0.25, delta=1e-5)


def opacus_epsilon(history, delta: float, mechanism: str = "rdp") -> float:
    accountant = create_accountant(mechanism=mechanism)
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta=delta))


def test_lifetime_epsilon_composes_restarts_new_run_tokens_and_repeated_rounds(tmp_path):
    releases = [release("run-1", 1), release("run-1", 2),
                release("run-1", 2),                        # the server repeated round 2: new spend
                release("run-2", 1, sigma=0.9, q=0.02),     # a new run token on the same data
                release("run-2", 1, steps=10)]
    for r in releases:
        # A fresh object every time: the site process restarted between releases.
        PrivacyLedger(tmp_path / "ledger", FP).record_release(r)
    ledger = PrivacyLedger(tmp_path / "ledger", FP)
    history = [(r.noise_multiplier, r.sample_rate, r.steps) for r in releases]
    assert ledger.history() == history
    for mechanism in ("rdp", "prv"):
        assert abs(ledger.lifetime_epsilon(1e-5, mechanism) - opacus_epsilon(history, 1e-5, mechanism)) < 1e-6
    assert abs(ledger.run_epsilon("run-2", 1e-5) - opacus_epsilon(history[3:], 1e-5)) < 1e-6
    extra = [(1.1, 0.01, 40)]
    assert abs(ledger.epsilon_after(extra, 1e-5) - opacus_epsilon(history + extra, 1e-5)) < 1e-6
    summary = ledger.summary(1e-5)
    assert summary["releases"] == 5 and summary["steps"] == 170
    assert summary["runs"]["run-1"]["rounds"] == [1, 2, 2] and summary["runs"]["run-2"]["steps"] == 50


def test_entries_are_a_hash_chain_with_a_counter_and_the_head_follows(tmp_path):
    ledger = PrivacyLedger(tmp_path, FP)
    assert ledger.head() == LedgerHead(0, GENESIS)
    first = ledger.record_release(release(round_num=1))
    second = ledger.record_release(release(round_num=2))
    assert (first["index"], second["index"]) == (0, 1)
    assert first["prev"] == GENESIS and second["prev"] == first["hash"]
    assert first["fingerprint"] == FP and first["run"] == "run-1"
    assert ledger.head() == LedgerHead(2, second["hash"])
    assert json.loads((tmp_path / HEAD_FILE).read_text()) == {"count": 2, "hash": second["hash"]}
    lines = (tmp_path / LEDGER_FILE).read_text().splitlines()
    assert [json.loads(line) for line in lines] == [first, second]


def test_record_release_returns_only_after_fsync(tmp_path, monkeypatch):
    ledger = PrivacyLedger(tmp_path / "new" / "ledger", FP)
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    ledger.record_release(release())
    ledger_file = str((tmp_path / "new" / "ledger" / LEDGER_FILE).resolve())
    assert synced[0] == ledger_file  # the entry itself first
    assert str((tmp_path / "new" / "ledger").resolve()) in synced  # the folder, the file being new


def _write_two(tmp_path) -> Path:
    ledger = PrivacyLedger(tmp_path, FP)
    ledger.record_release(release(round_num=1))
    ledger.record_release(release(round_num=2))
    return tmp_path / LEDGER_FILE


def test_a_truncated_last_line_refuses_naming_the_file(tmp_path):
    path = _write_two(tmp_path)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(LedgerError, match=rf"{path}: the last line \(2\) is incomplete"):
        PrivacyLedger(tmp_path, FP)


def test_an_edited_entry_breaks_the_chain(tmp_path):
    path = _write_two(tmp_path)
    lines = path.read_text().splitlines()
    entry = json.loads(lines[0])
    entry["noise_multiplier"] = 5.0  # someone makes the past look cheaper
    path.write_text(json.dumps(entry) + "\n" + lines[1] + "\n")
    with pytest.raises(LedgerError, match=rf"{path}:1: the hash chain is broken"):
        PrivacyLedger(tmp_path, FP)


def test_a_ledger_replaced_by_an_older_copy_is_a_rewind(tmp_path):
    path = _write_two(tmp_path)
    older = path.read_text().splitlines()[0] + "\n"
    path.write_text(older)  # a valid chain, one release short
    with pytest.raises(LedgerError, match="has 1 entries but .*ledger.head says 2: .*steps went backwards"):
        PrivacyLedger(tmp_path, FP)
    path.unlink()
    with pytest.raises(LedgerError, match="has 0 entries"):
        PrivacyLedger(tmp_path, FP)


def test_a_remembered_head_catches_a_whole_folder_restored_from_backup(tmp_path):
    ledger = PrivacyLedger(tmp_path / "a", FP)
    ledger.record_release(release(round_num=1))
    backup = {name: (tmp_path / "a" / name).read_bytes() for name in (LEDGER_FILE, HEAD_FILE)}
    ledger.record_release(release(round_num=2))
    remembered = ledger.head()  # e.g. kept in the site's own state folder
    for name, data in backup.items():
        (tmp_path / "a" / name).write_bytes(data)
    PrivacyLedger(tmp_path / "a", FP)  # consistent in itself...
    with pytest.raises(LedgerError, match="the head this site remembered"):
        PrivacyLedger(tmp_path / "a", FP, expected_head=remembered)


def test_a_crash_between_entry_and_head_keeps_the_entry(tmp_path):
    path = _write_two(tmp_path)
    head = (tmp_path / HEAD_FILE).read_text()
    PrivacyLedger(tmp_path, FP).record_release(release(round_num=3))
    (tmp_path / HEAD_FILE).write_text(head)  # the head write did not happen
    ledger = PrivacyLedger(tmp_path, FP)
    assert len(ledger.entries()) == 3 and ledger.head().count == 3
    assert len(path.read_text().splitlines()) == 3


def test_garbage_and_removed_entries_are_refused(tmp_path):
    path = _write_two(tmp_path)
    lines = path.read_text().splitlines()
    path.write_text(lines[1] + "\n")
    (tmp_path / HEAD_FILE).unlink()
    with pytest.raises(LedgerError, match="entry counter 1 where 0 was expected"):
        PrivacyLedger(tmp_path, FP)
    path.write_text("not json\n")
    with pytest.raises(LedgerError, match=rf"{path}:1: not valid JSON"):
        PrivacyLedger(tmp_path, FP)


def test_units_do_not_mix_in_one_ledger(tmp_path):
    ledger = PrivacyLedger(tmp_path, FP)
    ledger.record_release(release())
    with pytest.raises(LedgerError, match="image-level releases; a patient-level release cannot compose"):
        ledger.record_release(release(unit="patient"))


def test_a_dp_policy_without_a_usable_ledger_folder_refuses(tmp_path):
    relaxed = policy_from_mapping({"dp_required": False}, where="site.yaml")
    with pytest.raises(LedgerError, match="no ledger_dir"):
        open_ledger_for_policy(relaxed, FP)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(LedgerError, match="cannot create the privacy ledger folder"):
        PrivacyLedger(blocker / "ledger", FP)


def test_the_lock_keeps_a_second_process_out(tmp_path):
    ledger = PrivacyLedger(tmp_path, FP)
    script = ("import sys; from medstylegan2.privacy.ledger import *\n"
              "ledger = PrivacyLedger(sys.argv[1], 'b' * 64)\n"
              "try:\n"
              "    with ledger.lock(timeout=0):\n"
              "        ledger.record_release(Release('other', 1, 1.0, 0.1, 5, 'rdp', 'image', 1.0, 1e-5))\n"
              "except LedgerBusyError as exc:\n"
              "    print('busy:', exc)\n"
              "else:\n"
              "    print('recorded')\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def other_process() -> str:
        return subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                              env=env, check=True).stdout

    with ledger.lock():
        ledger.record_release(release())  # re-entrant within one object
        assert other_process().startswith("busy:")
    assert other_process().strip() == "recorded"
    assert [e["run"] for e in ledger.entries()] == ["run-1", "other"]
    with pytest.raises(LedgerBusyError):
        with ledger.lock():
            with PrivacyLedger(tmp_path, FP).lock(timeout=0):
                pass


def test_a_reader_is_not_fooled_by_a_release_recorded_while_it_reads(tmp_path, monkeypatch):
    writer = PrivacyLedger(tmp_path, FP)
    writer.record_release(release(round_num=1))
    reader = PrivacyLedger(tmp_path, None)
    read_bytes = Path.read_bytes
    injected = []

    def read_then_another_release_lands(path: Path) -> bytes:
        data = read_bytes(path)
        if path == reader.path and not injected:  # the named point: just after the entries were read
            injected.append(True)
            writer.record_release(release(round_num=2))
        return data

    monkeypatch.setattr(Path, "read_bytes", read_then_another_release_lands)
    assert [e["round"] for e in reader.entries()] == [1]
    assert injected
    monkeypatch.undo()
    assert [e["round"] for e in reader.entries()] == [1, 2]


def test_a_half_written_last_line_is_left_out_while_a_writer_holds_the_lock_and_is_an_error_after(tmp_path):
    writer = PrivacyLedger(tmp_path, FP)
    writer.record_release(release(round_num=1))
    reader = PrivacyLedger(tmp_path, None)
    with writer.lock():
        with open(writer.path, "ab") as f:
            f.write(b'{"index": 1, "run": "run-1"')  # a release being appended right now
        assert [e["round"] for e in reader.entries()] == [1]
    with pytest.raises(LedgerError, match="incomplete"):
        reader.entries()


def test_concurrent_writers_leave_one_valid_chain(tmp_path):
    script = ("import sys; from medstylegan2.privacy.ledger import *\n"
              "ledger = PrivacyLedger(sys.argv[1], 'c' * 64)\n"
              "for r in range(15):\n"
              "    ledger.record_release(Release(sys.argv[2], r, 1.0, 0.1, 1, 'rdp', 'image', 1.0, 1e-5))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), f"p{i}"], env=env) for i in range(3)]
    assert [p.wait() for p in procs] == [0, 0, 0]
    entries = PrivacyLedger(tmp_path, FP).entries()
    assert len(entries) == 45 and [e["index"] for e in entries] == list(range(45))


def test_the_fingerprint_ignores_order_and_patient_numbering_but_not_content_or_grouping():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 1, 8, 8), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2])
    base = dataset_fingerprint(images, labels)
    perm = rng.permutation(6)
    assert dataset_fingerprint(images[perm], labels[perm]) == base
    changed = images.copy()
    changed[0, 0, 0, 0] ^= 1
    assert dataset_fingerprint(changed, labels) != base
    assert dataset_fingerprint(images, np.array([1, 1, 2, 0, 1, 2])) != base
    patients = np.array([10, 10, 11, 12, 12, 12])
    by_patient = dataset_fingerprint(images, labels, patients)
    assert by_patient != base
    assert dataset_fingerprint(images[perm], labels[perm], (patients * 7 + 3)[perm]) == by_patient
    assert dataset_fingerprint(images, labels, np.array([10, 11, 11, 12, 12, 12])) != by_patient


def test_a_changed_data_set_keeps_composing_with_the_old_releases(tmp_path, caplog):
    PrivacyLedger(tmp_path, FP).record_release(release())
    ledger = PrivacyLedger(tmp_path, "d" * 64)
    assert "the data set changed" in caplog.text
    ledger.record_release(release(round_num=2))
    assert [e["fingerprint"] for e in ledger.entries()] == [FP, "d" * 64]
    assert ledger.history() == [(1.1, 0.01, 40)] * 2
