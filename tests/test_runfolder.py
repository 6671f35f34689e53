"""The run folder: atomic files, strict-JSON lines, checkpoints, and the path rules of a run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from medstylegan2.errors import CheckpointError
from medstylegan2.runfolder import (CHECKPOINT_FORMAT, RunFolder, append_json_line, atomic_write, atomic_write_json,
                                   atomic_write_text, create_once_text, json_line, read_checkpoint, read_json_lines,
                                   round_numbers_in, site_state_folder, write_checkpoint)


def test_atomic_write_replaces_the_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "sub" / "file.txt"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    assert [p.name for p in path.parent.iterdir()] == ["file.txt"]


def test_a_failed_atomic_write_keeps_the_old_file_and_removes_its_temporary_file(tmp_path):
    path = tmp_path / "file.bin"
    atomic_write_text(path, "complete")

    def half_then_crash(fh):
        fh.write(b"half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(path, half_then_crash)
    assert path.read_text() == "complete"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_create_once_never_replaces_an_existing_file_and_keeps_it_private(tmp_path):
    path = tmp_path / "secret" / "salt"
    assert create_once_text(path, "first\n") is True
    assert create_once_text(path, "second\n") is False
    assert path.read_text() == "first\n"
    assert path.stat().st_mode & 0o077 == 0
    assert [p.name for p in path.parent.iterdir()] == ["salt"]


def test_json_is_strict_nan_and_inf_become_null_and_numpy_scalars_numbers(tmp_path):
    record = {"round": 1, "loss": float("nan"), "nested": {"inf": -math.inf, "n": np.float32(0.5)},
              "list": (np.int64(3), float("inf"))}
    line = json_line(record)
    assert json.loads(line) == {"round": 1, "loss": None, "nested": {"inf": None, "n": 0.5}, "list": [3, None]}
    atomic_write_json(tmp_path / "r.json", record)
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(line)


def test_appended_lines_are_one_strict_record_each(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    append_json_line(path, {"round": 1, "x": float("nan")})
    append_json_line(path, {"round": 2, "x": 1.5})
    assert read_json_lines(path) == [{"round": 1, "x": None}, {"round": 2, "x": 1.5}]
    assert read_json_lines(tmp_path / "absent.jsonl") == []


def test_checkpoints_round_trip_with_their_format_stamp(tmp_path):
    path = write_checkpoint(tmp_path / "ckpt.pt", {"step": 3, "config": {}})
    state = read_checkpoint(path)
    assert state["step"] == 3 and state["format"] == CHECKPOINT_FORMAT


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.pt"):
        read_checkpoint(tmp_path / "nope.pt")


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        read_checkpoint(path)


def test_a_foreign_torch_file_is_not_taken_for_a_checkpoint(tmp_path):
    import torch

    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a Med-StyleGAN2 checkpoint"):
        read_checkpoint(tmp_path / "other.pt")


def test_run_folder_names_every_file_of_a_round(tmp_path):
    folder = RunFolder(tmp_path)
    assert folder.checkpoint(7) == tmp_path / "round_007.pt"
    assert folder.grid(12) == tmp_path / "grids" / "round_012.png"
    assert folder.eval_record(3) == tmp_path / "eval" / "round_003.json"
    assert folder.metrics == tmp_path / "metrics.jsonl" and folder.config == tmp_path / "config.yaml"
    assert site_state_folder(folder.site_state, "tok", "site-0") == tmp_path / "site_state" / "tok" / "site-0"


def test_round_checkpoints_are_listed_and_pruned_to_the_newest(tmp_path):
    folder = RunFolder(tmp_path)
    for r in (1, 2, 3, 1000):
        folder.write_checkpoint(r, {"round": r}, keep=3)
    (tmp_path / "round_x.pt").write_bytes(b"")  # not a round number: ignored
    assert folder.checkpoint_rounds() == [2, 3, 1000]
    assert round_numbers_in(tmp_path / "absent") == []


def test_truncating_metrics_drops_the_lines_of_later_rounds(tmp_path):
    folder = RunFolder(tmp_path)
    for r in (1, 2, 3):
        folder.append_metrics({"round": r, "kind": "round"})
        folder.append_metrics({"round": r, "kind": "eval"})
    folder.truncate_metrics(2)
    assert [(line["round"], line["kind"]) for line in folder.metrics_records()] == \
        [(1, "round"), (1, "eval"), (2, "round"), (2, "eval")]


def test_ensure_metrics_never_writes_a_round_and_kind_twice_and_keeps_round_order(tmp_path):
    folder = RunFolder(tmp_path)
    folder.ensure_metrics([{"round": 1, "kind": "round"}, {"round": 3, "kind": "round"}])
    assert folder.ensure_metrics([{"round": 1, "kind": "round", "x": 2}]) == 0  # already there
    assert folder.ensure_metrics([{"round": 2, "kind": "round"}, {"round": 2, "kind": "eval"}]) == 2
    assert [(r["round"], r["kind"]) for r in folder.metrics_records()] == \
        [(1, "round"), (2, "round"), (2, "eval"), (3, "round")]


def test_repair_drops_a_torn_line_duplicates_and_uncommitted_rounds(tmp_path):
    folder = RunFolder(tmp_path)
    lines = [{"round": 1, "kind": "round"}, {"round": 1, "kind": "round"}, {"round": 2, "kind": "round"}]
    (tmp_path / "metrics.jsonl").write_text("".join(json_line(r) + "\n" for r in lines) + '{"round": 3, "ki')
    folder.repair_metrics(1)
    assert (tmp_path / "metrics.jsonl").read_text() == json_line({"round": 1, "kind": "round"}) + "\n"
    (tmp_path / ".round_002.pt.abc.tmp").write_bytes(b"half")
    assert [p.name for p in folder.remove_temporary_files()] == [".round_002.pt.abc.tmp"]
