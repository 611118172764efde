"""Folders and files published through embedkit.fs.atomic are complete or untouched."""
from __future__ import annotations

import pytest

from embedkit.fs.atomic import staged_folder, write_atomic


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


def test_publish_rechecks_the_target_and_never_replaces_what_the_predicate_refuses(tmp_path):
    from embedkit.errors import OutputExistsError

    final = tmp_path / "out"
    final.mkdir()
    (final / "letter.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        with staged_folder(final, replaceable=lambda p: (p / "model.json").is_file()) as staging:
            (staging / "model.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in final.iterdir()] == ["letter.txt"]


def test_current_puts_back_the_version_a_dead_writer_set_aside(tmp_path):
    import os
    import subprocess
    import sys

    from embedkit.fs.atomic import current

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout)
    final = tmp_path / "idx"
    aside = tmp_path / f".idx.{dead}-12345678.old"
    aside.mkdir()
    (aside / "index.json").write_text('{"v": 1}')
    assert current(final, "index.json") == final
    assert (final / "index.json").read_text() == '{"v": 1}' and not aside.exists()
    # a live writer (this process) between its two renames is waited for, not undone
    mine = tmp_path / f".idx.{os.getpid()}-12345678.old"
    os.rename(final, mine)
    assert current(final, "index.json", wait=0.2) == final  # gave up waiting: the whole old version
    assert (final / "index.json").is_file()
