"""paths.member: the one containment check for files that metadata names."""
from __future__ import annotations

import os

import pytest

from embedkit.errors import ArtifactError, UnsafeModelError
from embedkit.fs.paths import member, within


def test_member_accepts_only_regular_files_inside_the_folder(tmp_path):
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "head.skops").write_bytes(b"x")
    (folder / "sub" / "a.bin").write_bytes(b"y")
    (tmp_path / "secret").write_text("outside")
    assert member(folder, "head.skops") == (folder / "head.skops").resolve()
    assert member(folder, "sub/a.bin") == (folder / "sub" / "a.bin").resolve()
    (folder / "out").symlink_to(tmp_path / "secret")
    (folder / "zero").symlink_to("/dev/zero")
    os.mkfifo(folder / "fifo")
    cases = {"../secret": "outside", str(tmp_path / "secret"): "relative", "out": "outside", "zero": "outside",
             "fifo": "not a regular file", "sub": "not a regular file", "missing": "missing", "": "relative",
             "sub/../../secret": "outside"}
    for name, why in cases.items():
        with pytest.raises(UnsafeModelError, match=why):
            member(folder, name)
    with pytest.raises(ArtifactError):  # each reader raises its own typed error
        member(folder, "../secret", error=ArtifactError)


def test_within(tmp_path):
    assert within(tmp_path / "a" / "b", tmp_path) and within(tmp_path, tmp_path)
    assert not within(tmp_path, tmp_path / "a") and not within(tmp_path.parent / "other", tmp_path)


def test_a_commit_record_naming_a_shard_outside_the_store_is_refused(minilm, tmp_path):
    import json
    import shutil

    import embedkit
    from embedkit.errors import StoreError

    embedkit.extract(["my card is lost", "top up failed"], "minilm-l6", str(tmp_path / "fs"))
    namespace = embedkit.FeatureStore(tmp_path / "fs").find("minilm-l6")
    record_path = next((namespace.path / "commits").glob("*.json"))
    record = json.loads(record_path.read_text())
    shard = namespace.path / "shards" / f"{record['shard']}.arrow"
    shutil.copy(shard, tmp_path / "elsewhere.arrow")  # a valid shard, but not this store's
    record["shard"] = "../../../../elsewhere"
    record_path.write_text(json.dumps(record))
    shutil.rmtree(namespace.path / "cache", ignore_errors=True)
    with pytest.raises(StoreError, match="outside|names shard"):
        namespace.load()
