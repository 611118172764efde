"""A read-only store or a full disk is an answer, not a crash (issue 10, kind 9)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
from store_support import confined, python, tiny_fixture  # noqa: F401 (the tiny fixture)

import embedkit
from embedkit.features.store import FeatureStore

TESTS = str(Path(__file__).parent)


def files_of(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def test_load_index_and_train_head_on_a_read_only_store(tiny, tmp_path: Path):
    texts = [f"my card number {i} was {'declined' if i % 2 else 'accepted'} today" for i in range(40)]
    labels = tmp_path / "labels.csv"
    labels.write_text("text,label\n" + "".join(f"{t},{'bad' if i % 2 else 'good'}\n" for i, t in enumerate(texts)))
    store = tmp_path / "fs"
    embedkit.extract(texts, str(tiny.path), str(store), shard_size=16)
    [ns] = FeatureStore(store).namespaces()
    (ns.path / "shards" / ".99999999999999999999-1-deadbeef.arrow.tmp").write_bytes(b"x")  # something for gc to remove
    before = files_of(store)
    assert not any("cache" in name for name in before)  # nothing loaded yet: no cache to lean on
    expected = embedkit.embed(texts, backbone=str(tiny.path)).vectors
    ro = f"mount --bind -o ro {store} {store}"
    code = (f"import sys, numpy as np; from embedkit import FeatureStore\n"
            f"ids, X = FeatureStore({str(store)!r}).load('tiny-pooled')\n"
            f"np.save({str(tmp_path / 'X.npy')!r}, np.asarray(X)); print(len(ids))\n")
    run = confined(python(code), ro)
    assert run.returncode == 0 and run.stdout.split() == ["40"], run.stderr
    X = np.load(tmp_path / "X.npy")
    np.testing.assert_allclose(np.sort(X, axis=0), np.sort(expected, axis=0), atol=1e-5)
    cli = [sys.executable, "-m", "embedkit.cli"]
    index = confined(cli + ["index", str(store), "--backbone", "tiny-pooled", "--out", str(tmp_path / "index")], ro)
    assert index.returncode == 0, index.stderr
    assert json.loads((tmp_path / "index" / "index.json").read_text())
    train = confined(cli + ["train-head", str(store), "--backbone", "tiny-pooled", "--labels", str(labels),
                            "--out", str(tmp_path / "run"), "--json"], ro)
    assert train.returncode == 0, train.stderr
    assert json.loads((tmp_path / "run" / "report.json").read_text())["n_train"] + \
        json.loads((tmp_path / "run" / "report.json").read_text())["n_test"] == 40
    # writing is a typed error naming the path, and changes nothing
    (tmp_path / "more.txt").write_text("a new text\n")
    extract = confined(cli + ["extract", str(tmp_path / "more.txt"), "--backbone", str(tiny.path), "--out",
                              str(store), "--no-progress"], ro)
    assert extract.returncode == 1, extract.stderr
    assert extract.stderr.startswith("error: cannot write ") and str(store) in extract.stderr, extract.stderr
    assert "Traceback" not in extract.stderr
    for action, code in (("info", 0), ("verify", 0), ("gc", 1)):
        run = confined(cli + ["store", action, str(store)], ro)
        assert run.returncode == code and "Traceback" not in run.stderr, (action, run.stderr)
    assert run.stderr.startswith("error: cannot write ") and ".99999999999999999999-1-deadbeef.arrow.tmp" in run.stderr
    assert files_of(store) == before


WRITER = """
import sys, numpy as np
sys.path.insert(0, {tests!r})
from test_store import FakeArtifact
from embedkit.features.store import FeatureStore
from embedkit.errors import StoreWriteError
ns = FeatureStore({root!r}).namespace(FakeArtifact(dim=1024))
ns.commit(["small"], np.ones((1, 1024), np.float32))
try:
    ns.commit([f"big-{{i}}" for i in range(2000)], np.ones((2000, 1024), np.float32))  # 8 MB on a 1 MB disk
except StoreWriteError as exc:
    print("ERRNO", exc.errno, isinstance(exc, OSError))
    print("MESSAGE", exc)
print("SHARDS", sorted(p.name.startswith(".") or p.suffix for p in (ns.path / "shards").iterdir()))
print("COMMITS", len(list((ns.path / "commits").iterdir())))
ids, X = ns.load()  # the cache does not fit either: loading still works
print("LOADED", ids.tolist(), float(X.sum()))
"""


def test_a_full_disk_is_a_typed_error_and_leaves_nothing_half_written(tmp_path: Path):
    disk = tmp_path / "disk"
    disk.mkdir()
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(tests=TESTS, root=str(disk / "fs")))
    run = confined([sys.executable, str(script)], f"mount -t tmpfs -o size=1m tmpfs {disk}; cd {disk}",
                   timeout=300)
    assert run.returncode == 0, run.stderr
    lines = dict(line.split(" ", 1) for line in run.stdout.splitlines())
    assert lines["ERRNO"] == "28 True"
    assert lines["MESSAGE"].startswith(f"cannot write {disk / 'fs'}") and "ENOSPC" in lines["MESSAGE"]
    assert lines["SHARDS"] == "['.arrow']" and lines["COMMITS"] == "1"  # no temp file, no orphan shard
    assert lines["LOADED"] == "['small'] 1024.0"
    assert os.listdir(disk) == []  # the tmpfs lived in the child's mount namespace only
