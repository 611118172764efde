"""Folders and files published through embedkit.atomic are complete or untouched."""
from __future__ import annotations

import pytest

from embedkit.atomic import staged_folder, write_atomic


def test_staged_folder_replaces_the_old_folder_only_when_the_block_succeeds(tmp_path):
    final = tmp_path / "model"
    with staged_folder(final) as staging:
        (staging / "a.txt").write_text("first")
    assert (final / "a.txt").read_text() == "first"

    with pytest.raises(RuntimeError):
        with staged_folder(final) as staging:
            (staging / "a.txt").write_text("half")
            raise RuntimeError("crash while writing")
    assert (final / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging left behind

    with staged_folder(final) as staging:
        (staging / "b.txt").write_text("second")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]  # replaced, not merged


def test_write_atomic_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "manifest.json"
    write_atomic(target, b"{}")
    write_atomic(target, b'{"a": 1}')
    assert target.read_bytes() == b'{"a": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
