"""Feature store integrity: identity on every read, a checksummed cache, damaged metadata,
honest counts, gc beside a live writer, schema versions (issue 10 kinds 2, 3; issue 11 item 5)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from support import run_cli
from test_store import FakeArtifact, vectors

import embedkit
from embedkit.features.store import FeatureStore
from embedkit.fs.locks import held


def two_namespaces(root: Path):
    """A float namespace and an int8-like sibling of the same dimension."""
    store = FeatureStore(root)
    a = store.namespace(FakeArtifact("toy", "ab" * 32))
    b = store.namespace(FakeArtifact("toy-int8", "cd" * 32))
    a.commit(["a", "b"], vectors(2), ["s:1", "s:2"])
    b.commit(["a", "z"], vectors(2, seed=9) * 100, ["s:1", "s:9"])
    return a, b


def test_a_shard_copied_from_another_namespace_is_refused(tmp_path: Path):
    a, b = two_namespaces(tmp_path)
    [shard] = (b.path / "shards").glob("*.arrow")
    shutil.copy(shard, a.path / "shards" / shard.name)
    record = json.loads((b.path / "commits" / f"{shard.stem}.json").read_text())
    record.pop("digest", None)  # as schema-1 records: only the shard's own metadata tells
    (a.path / "commits" / f"{shard.stem}.json").write_text(json.dumps(record))
    problems = a.verify()
    assert [p.shard for p in problems] == [shard.stem]
    assert "cdcdcdcdcdcd" in problems[0].reason  # the digest the shard's own metadata names
    with pytest.raises(embedkit.StoreError, match="copied from another namespace"):
        a.load()
    assert run_cli("store", "verify", str(tmp_path)).returncode == 1
    a.quarantine(problems)  # what a rerun of extract does
    ids, X = a.load()
    assert list(ids) == ["a", "b"]
    np.testing.assert_array_equal(X, vectors(2))


def test_a_commit_record_renamed_onto_another_shard_is_refused(tmp_path: Path):
    a, _ = two_namespaces(tmp_path)
    [record] = (a.path / "commits").glob("*.json")
    data = json.loads(record.read_text())
    data["digest"] = "cd" * 32
    record.write_text(json.dumps(data))
    assert "not this namespace" in a.verify()[0].reason
    with pytest.raises(embedkit.StoreError):
        a.load()


def cache_file(ns, part: str = "x") -> Path:
    [path] = (ns.path / "cache").glob(f"*.{part}.npy")
    return path


def test_a_flipped_byte_in_the_cache_never_changes_returned_vectors(tmp_path: Path):
    a, _ = two_namespaces(tmp_path)
    a.load()  # builds the cache
    x = cache_file(a)
    data = bytearray(x.read_bytes())
    data[-3] ^= 0xFF  # inside the last vector
    x.write_bytes(bytes(data))
    [problem] = a.verify()
    assert problem.shard == "cache" and "checksum" in problem.reason
    ids, X = FeatureStore(tmp_path).load("toy")
    assert list(ids) == ["a", "b"]
    np.testing.assert_array_equal(X, vectors(2))  # rebuilt from the shards, not the flipped copy
    assert a.verify() == []


@pytest.mark.parametrize("part", ["x", "ids"])
def test_a_truncated_cache_is_rebuilt(tmp_path: Path, part: str):
    a, _ = two_namespaces(tmp_path)
    a.load()
    path = cache_file(a, part)
    path.write_bytes(path.read_bytes()[:100])
    for _ in range(2):  # every later load works, not only the first
        ids, X = a.load()
        assert list(ids) == ["a", "b"]
        np.testing.assert_array_equal(X, vectors(2))


def test_a_damaged_namespace_json_is_rebuilt_from_the_manifest(tmp_path: Path):
    a, _ = two_namespaces(tmp_path)
    (a.path / "namespace.json").write_text('{"schema": 2, "backb')
    found = FeatureStore(tmp_path).verify()
    assert sorted(found) == ["toy-int8/cdcdcdcdcdcd", "toy/abababababab"] and not any(found.values())
    assert json.loads((a.path / "namespace.json").read_text())["digest"] == "ab" * 32
    assert list(FeatureStore(tmp_path).load("toy")[0]) == ["a", "b"]


def test_a_damaged_namespace_json_is_reported_and_rebuilt_by_the_next_extract(tmp_path: Path):
    a, _ = two_namespaces(tmp_path)
    (a.path / "namespace.json").write_text("{not json")
    (a.path / "manifest.json").unlink()  # nothing to rebuild it from
    found = FeatureStore(tmp_path).verify()
    assert [p.shard for p in found["toy/abababababab"]] == ["namespace.json"]
    out = run_cli("store", "verify", str(tmp_path))
    assert out.returncode == 1 and "2 namespace(s) checked" in out.stdout, out.stdout
    ns = FeatureStore(tmp_path).namespace(FakeArtifact("toy", "ab" * 32))  # extract's entry point
    assert list(ns.load()[0]) == ["a", "b"]
    assert not any(FeatureStore(tmp_path).verify().values())


def test_namespace_json_of_another_namespace_is_not_trusted(tmp_path: Path):
    a, b = two_namespaces(tmp_path)
    shutil.copy(b.path / "namespace.json", a.path / "namespace.json")
    [ns] = [n for n in FeatureStore(tmp_path).namespaces() if n.path == a.path]
    assert ns.digest == "ab" * 32  # rebuilt from its own manifest, not the copied record


def test_info_counts_what_load_returns_and_the_cache_separately(tmp_path: Path):
    a, _ = two_namespaces(tmp_path)
    a.commit(["a", "b", "c"], vectors(3, seed=3))  # a and b computed again (two writers)
    [row] = [r for r in FeatureStore(tmp_path).info() if r["backbone"] == "toy"]
    assert row["cache_bytes"] == 0
    ids, _ = a.load()
    [row] = [r for r in FeatureStore(tmp_path).info() if r["backbone"] == "toy"]
    assert row["rows"] == len(ids) == 3 and row["shard_rows"] == 5
    cache = sum(p.stat().st_size for p in (a.path / "cache").iterdir())
    assert row["cache_bytes"] == cache > 0
    shards = sum(p.stat().st_size for p in a.path.rglob("*") if p.is_file() and "cache" not in p.parts)
    assert row["bytes"] == shards
    text = run_cli("store", "info", str(tmp_path)).stdout
    assert "rows=3 " in text and "cache" in text, text
    js = json.loads(run_cli("store", "info", str(tmp_path), "--json").stdout)
    assert {r["backbone"]: r["cache_bytes"] for r in js}["toy"] == cache


def test_gc_never_removes_what_a_live_writer_holds(tmp_path: Path):
    a, _ = two_namespaces(tmp_path)
    tmp = a.path / "shards" / ".99999999999999999999-1-deadbeef.arrow.tmp"
    renamed = a.path / "shards" / "99999999999999999999-1-deadbeef.arrow"  # renamed, not yet committed
    tmp.write_bytes(b"being written")
    renamed.write_bytes(b"just renamed")
    with held(a.path / ".lock"):  # what commit() holds while it writes
        removed = a.gc(wait=0.5)
        assert removed["busy"] == 1 and tmp.exists() and renamed.exists()
    removed = a.gc(wait=0.5)  # the writer is gone (a crash releases the lock too): abandoned
    assert (removed["busy"], removed["temp_files"], removed["orphan_shards"]) == (0, 1, 1)
    assert not tmp.exists() and not renamed.exists()
    assert list(a.load()[0]) == ["a", "b"]


def test_schema_versions(tmp_path: Path):
    a, _ = two_namespaces(tmp_path)
    info = json.loads((a.path / "namespace.json").read_text())
    (a.path / "namespace.json").write_text(json.dumps({**info, "schema": 1}))  # written by embedkit 1
    assert list(FeatureStore(tmp_path).load("toy")[0]) == ["a", "b"]  # readable as is
    ns = FeatureStore(tmp_path).namespace(FakeArtifact("toy", "ab" * 32))
    assert ns.info["schema"] == 2 and json.loads((a.path / "namespace.json").read_text())["schema"] == 2
    (a.path / "namespace.json").write_text(json.dumps({**info, "schema": 99}))
    with pytest.raises(embedkit.StoreError, match="upgrade embedkit"):
        FeatureStore(tmp_path).namespace(FakeArtifact("toy", "ab" * 32))
    assert [p.reason for p in FeatureStore(tmp_path).verify()["toy/abababababab"]][0].startswith("schema 99")


def test_info_on_a_damaged_store_answers_and_counts_the_damage(tmp_path: Path):
    a, _ = two_namespaces(tmp_path)
    a.commit(["c"], vectors(1, seed=3))
    shard = sorted((a.path / "shards").glob("*.arrow"))[0]
    shard.write_bytes(shard.read_bytes()[:50])
    [row] = [r for r in FeatureStore(tmp_path).info() if r["backbone"] == "toy"]
    assert (row["rows"], row["damaged"]) == (1, 1)
    a.quarantine(a.verify())
    assert list(a.load()[0]) == ["c"]


def test_a_rebuilt_namespace_json_does_not_make_an_old_digest_the_newest(tmp_path: Path):
    store = FeatureStore(tmp_path)
    old = store.namespace(FakeArtifact("toy", "01" * 32))
    old.commit(["a"], vectors(1))
    new = store.namespace(FakeArtifact("toy", "02" * 32))
    new.commit(["b"], vectors(1, seed=1))
    (old.path / "namespace.json").write_text("{damaged")
    assert FeatureStore(tmp_path).find("toy").digest == "02" * 32  # rebuilt, with its creation time kept
    assert json.loads((old.path / "namespace.json").read_text())["digest"] == "01" * 32
    assert FeatureStore(tmp_path).find("toy").digest == "02" * 32
