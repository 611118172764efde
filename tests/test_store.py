"""The feature store: atomic shards, checksums, readers without embedkit, concurrent writers."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import embedkit
from embedkit.features.store import FeatureStore


class FakeArtifact:
    """Just what a namespace reads from an artifact: name, digest, dim, modality, manifest."""

    def __init__(self, name="toy", digest="ab" * 32, dim=4):
        self.name, self.digest, self.dim, self.modality = name, digest, dim, "text"
        self.manifest = {"preprocess": {"kind": "text", "max_length": 8}}


def vectors(n: int, dim: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def test_commit_load_roundtrip_is_memory_mapped(tmp_path: Path):
    ns = FeatureStore(tmp_path).namespace(FakeArtifact())
    ns.commit(["a", "b"], vectors(2), ["s:1", "s:2"])
    ns.commit(["c"], vectors(1, seed=1), ["s:3"], failures=[{"id": "d", "source": "s:4", "stage": "decode",
                                                          "code": "not_text", "message": "got NoneType"}])
    ids, X = FeatureStore(tmp_path).load("toy")
    assert list(ids) == ["a", "b", "c"]
    assert isinstance(X, np.memmap) and X.shape == (3, 4)
    np.testing.assert_array_equal(X[:2], vectors(2))
    assert [f["id"] for f in FeatureStore(tmp_path).failures("toy")] == ["d"]
    manifest = json.loads((ns.path / "manifest.json").read_text())
    assert manifest["schema"] == 2 and manifest["digest"] == "ab" * 32 and manifest["rows"] == 3
    assert [s["rows"] for s in manifest["shards"]] == [2, 1] and all(s["sha256"] for s in manifest["shards"])


def test_latest_commit_wins_for_an_id_written_twice(tmp_path: Path):
    ns = FeatureStore(tmp_path).namespace(FakeArtifact())
    first, second = vectors(1, seed=1), vectors(1, seed=2)
    ns.commit(["x"], first)
    ns.commit(["x", "y"], np.concatenate([second, second]))
    ids, X = ns.load()
    assert list(ids) == ["x", "y"]  # every id once
    np.testing.assert_array_equal(X[0], second[0])  # an id recomputed (its content changed) serves the new vector


def test_shards_open_without_embedkit(tmp_path: Path):
    ns = FeatureStore(tmp_path).namespace(FakeArtifact())
    ns.commit(["a", "b"], vectors(2), ["file.txt:line 1", "file.txt:line 2"])
    shard = next((ns.path / "shards").glob("*.arrow"))
    code = (
        "import sys, pandas, pyarrow.ipc as ipc\n"
        "assert 'embedkit' not in sys.modules\n"
        f"df = pandas.read_feather({str(shard)!r})\n"
        f"t = ipc.open_file({str(shard)!r}).read_all()\n"
        "print(list(df['id']), list(df['source']), len(df['embedding'][0]), t.schema.metadata[b'embedkit.digest'].decode()[:4])\n"
    )
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["['a',", "'b']", "['file.txt:line", "1',", "'file.txt:line", "2']", "4", "abab"], out.stderr


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_shards_are_detected_and_set_aside(tmp_path: Path, damage: str):
    ns = FeatureStore(tmp_path).namespace(FakeArtifact())
    ns.commit(["a", "b"], vectors(2))
    ns.commit(["c"], vectors(1, seed=1))
    shard = sorted((ns.path / "shards").glob("*.arrow"))[0]
    data = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        shard.write_bytes(data[:200] + bytes([data[200] ^ 0xFF]) + data[201:])
    else:
        shard.unlink()
    problems = ns.verify()
    assert [p.shard for p in problems] == [shard.stem]
    ns.quarantine(problems)
    assert ns.verify() == []
    assert ns.done_ids() == {"c"}  # a and b count as missing again: a rerun recomputes them
    ids, _ = ns.load()
    assert list(ids) == ["c"]


def test_gc_removes_orphans_and_temp_files(tmp_path: Path):
    ns = FeatureStore(tmp_path).namespace(FakeArtifact())
    ns.commit(["a"], vectors(1))
    (ns.path / "shards" / "99999999999999999999-1-deadbeef.arrow").write_bytes(b"half a shard, never committed")
    (ns.path / "shards" / ".99999999999999999999-1-deadbeef.arrow.tmp").write_bytes(b"tmp")
    # files a user put there are not embedkit's: never removed, whatever their name
    mine = ["mybackup.arrow", ".x.arrow.tmp", "notes.txt", "99999999999999999999-1-deadbeef.arrow.bak"]
    for name in mine:
        (ns.path / "shards" / name).write_bytes(b"the user's")
    (ns.path / "shards" / "a-folder.arrow").mkdir()
    removed = FeatureStore(tmp_path).gc()
    [(key, counts)] = removed.items()
    assert counts["orphan_shards"] == 1 and counts["temp_files"] == 1
    assert ns.verify() == [] and list(ns.load()[0]) == ["a"]
    assert all((ns.path / "shards" / name).read_bytes() == b"the user's" for name in mine)
    assert (ns.path / "shards" / "a-folder.arrow").is_dir()


def test_wrong_commit_is_refused(tmp_path: Path):
    ns = FeatureStore(tmp_path).namespace(FakeArtifact())
    with pytest.raises(embedkit.StoreError):
        ns.commit(["a", "b"], vectors(1))
    bad = vectors(1)
    bad[0, 0] = np.nan
    with pytest.raises(embedkit.StoreError, match="non-finite"):
        ns.commit(["a"], bad)


def test_unknown_backbone_lists_what_is_there(tmp_path: Path):
    FeatureStore(tmp_path).namespace(FakeArtifact()).commit(["a"], vectors(1))
    with pytest.raises(embedkit.StoreError, match="toy"):
        FeatureStore(tmp_path).load("other")


WRITER = """
import sys, numpy as np
sys.path.insert(0, {tests!r})
from test_store import FakeArtifact
from embedkit.features.store import FeatureStore
ns = FeatureStore({root!r}).namespace(FakeArtifact())
k = int(sys.argv[1])
for i in range(20):
    ids = [f"w{{k}}-{{i}}-{{j}}" for j in range(5)] + [f"shared-{{i}}"]
    ns.commit(ids, np.full((6, 4), k, np.float32))
"""


def test_two_processes_writing_one_namespace_stay_correct(tmp_path: Path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(tests=str(Path(__file__).parent), root=str(tmp_path / "fs")))
    procs = [subprocess.Popen([sys.executable, str(script), str(k)]) for k in (1, 2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    ns = FeatureStore(tmp_path / "fs").find("toy")
    assert ns.verify() == []
    ids, X = ns.load()
    assert len(ids) == len(set(ids)) == 2 * 20 * 5 + 20  # every id once, shared ones included
    assert len(ns.commits()) == 40  # the commit records are the truth; manifest.json is a view of them
    [info] = FeatureStore(tmp_path / "fs").info()
    assert (info["rows"], info["shard_rows"]) == (len(ids), 240)  # store info counts what load returns
    ns.write_manifest()
    assert json.loads((ns.path / "manifest.json").read_text())["rows"] == 40 * 6
