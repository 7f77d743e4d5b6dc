"""Atomic writes: a failed write keeps the old file and leaves no temp file behind."""

import os

import pytest

from peft_rst.files import atomic_write_bytes, atomic_write_text


def test_write_replaces_and_creates_parents(tmp_path):
    path = tmp_path / "sub" / "card.md"
    assert atomic_write_text(path, "héllo") == path
    assert path.read_bytes() == "héllo".encode()
    atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01" and os.listdir(path.parent) == ["card.md"]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "results.md"
    atomic_write_text(path, "old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["results.md"]
