"""Namespace variants: compact and chunked vectors live in namespaces of their own, calibrated once,
derived incrementally and crash-safely, and never served for a plain request (issue 25, items 1 and 2)."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from store_support import tiny_fixture  # noqa: F401 (the tiny fixture)
from support import kill_when

import embedkit
from embedkit import Calibration, Compact
from embedkit.errors import StoreError, UsageError
from embedkit.features.store import FeatureStore
from embedkit.inputs.files import content_id

DIGEST = "ab" * 32


class FakeArtifact:
    """Just what a namespace reads from an artifact: name, digest, dim, modality, manifest."""

    def __init__(self, name="toy", digest=DIGEST, dim=16):
        self.name, self.digest, self.dim, self.modality = name, digest, dim, "text"
        self.manifest = {"preprocess": {"kind": "text", "max_length": 8}}


def floats(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def names(start: int, stop: int) -> list[str]:
    return [f"item-{i:05d}" for i in range(start, stop)]


def by_id(ids, X) -> dict[str, np.ndarray]:
    return {str(i): np.asarray(x) for i, x in zip(ids, X)}


def test_the_calibration_is_fitted_once_recorded_and_reused_never_refitted(tmp_path: Path):
    fs = FeatureStore(tmp_path)
    plain = fs.namespace(FakeArtifact())
    first = floats(200)
    plain.commit(names(0, 200), first)
    report = embedkit.compact_features(tmp_path, "toy", precision="int8")
    assert report.calibration["fitted"] and report.calibration["rows"] == 200 and report.converted == 200

    target = fs.find("toy", precision="int8")
    record = json.loads((target.path / "namespace.json").read_text())
    cal = record["variant"]["compact"]["calibration"]
    np.testing.assert_array_equal(np.asarray(cal["low"], np.float32), first.min(axis=0))
    np.testing.assert_array_equal(np.asarray(cal["high"], np.float32), first.max(axis=0))
    assert cal["sha256"] == Calibration.from_dict(cal).digest == report.calibration["sha256"]
    assert target.path.name == f"{DIGEST}.int8-{cal['sha256'][:8]}"
    recorded = (target.path / "namespace.json").read_bytes()
    before = by_id(*fs.load("toy", precision="int8"))

    wide = floats(50, seed=1) * 10  # far outside the first ranges
    plain.commit(names(200, 250), wide)
    again = embedkit.compact_features(tmp_path, "toy", precision="int8")
    assert not again.calibration["fitted"] and again.calibration["sha256"] == cal["sha256"]
    assert (again.converted, again.skipped) == (50, 200)
    assert (target.path / "namespace.json").read_bytes() == recorded  # the ranges are the first run's
    assert [n.tag for n in fs.namespaces() if n.variant] == [target.tag]  # no second, refitted namespace
    after = by_id(*fs.load("toy", precision="int8"))
    for item, row in before.items():
        np.testing.assert_array_equal(after[item], row)  # old ids: their rows did not move
    new = np.stack([after[i] for i in names(200, 250)])
    np.testing.assert_array_equal(new, Compact(None, "int8", Calibration.from_dict(cal)).apply(wide))
    assert new.min() == -128 and new.max() == 127  # clipped to the recorded ranges
    refit = Compact.fitted(np.concatenate([first, wide]), precision="int8")
    assert not np.array_equal(refit.apply(first), np.stack([before[i] for i in names(0, 200)]))  # a refit would show


def test_a_compact_namespace_never_answers_a_float_request(tmp_path: Path):
    fs = FeatureStore(tmp_path)
    X = floats(40)
    fs.namespace(FakeArtifact()).commit(names(0, 40), X)
    embedkit.compact_features(fs, "toy", precision="int8")
    embedkit.compact_features(fs, "toy", precision="binary")  # both newer than the float namespace
    ids, F = fs.load("toy")
    assert F.dtype == np.float32 and F.shape == (40, 16)
    np.testing.assert_array_equal(np.asarray(F), X)
    assert fs.find("toy").tag == "" and fs.find("toy").compact.is_float
    ids, Q = fs.load("toy", precision="int8")
    assert Q.dtype == np.int8 and Q.shape == (40, 16)
    ids, B = fs.load("toy", precision="binary")
    assert B.dtype == np.uint8 and B.shape == (40, 2)
    np.testing.assert_array_equal(np.asarray(B), np.packbits(X > 0, axis=1))
    with pytest.raises(StoreError, match=r"present: .*binary.*int8-.*plain"):
        fs.find("toy", precision="uint8")
    with pytest.raises(StoreError, match="dimensions=8"):
        fs.load("toy", precision="int8", dimensions=8)
    with pytest.raises(StoreError, match="long=chunk"):
        fs.find("toy", long="chunk")
    with pytest.raises(UsageError, match="precision"):
        fs.find("toy", precision="int4")
    # a compact shard copied into the float namespace is refused on read, never served as floats
    int8 = fs.find("toy", precision="int8")
    shard = next((int8.path / "shards").glob("*.arrow"))
    float_ns = fs.find("toy")
    shutil.copy(shard, float_ns.path / "shards" / shard.name)
    shutil.copy(int8.path / "commits" / f"{shard.stem}.json", float_ns.path / "commits" / f"{shard.stem}.json")
    with pytest.raises(StoreError, match="variant int8-"):
        fs.load("toy")
    assert [p.shard for p in fs.verify()[float_ns.key]] == [shard.stem]


def test_commit_refuses_rows_of_the_wrong_dtype_or_width(tmp_path: Path):
    fs = FeatureStore(tmp_path)
    X = floats(10)
    int8 = fs.namespace(FakeArtifact(), {"compact": Compact.fitted(X, precision="int8").describe()})
    rows = int8.compact.apply(X)
    for bad, why in ((X, "float32 vectors"), (rows.astype(np.uint8), "uint8 vectors"),
                     (rows[:, :15], r"shape \(10, 15\)"), (rows.astype(np.int16), "int16")):
        with pytest.raises(StoreError, match=why):
            int8.commit(names(0, 10), bad)
    int8.commit(names(0, 10), rows)
    binary = fs.namespace(FakeArtifact(), {"compact": {"precision": "binary", "dimensions": 12}})
    assert (binary.width, binary.dtype) == (2, np.uint8)
    with pytest.raises(StoreError, match=r"shape \(10, 16\)"):
        binary.commit(names(0, 10), np.zeros((10, 16), np.uint8))
    binary.commit(names(0, 10), Compact(12, "binary").apply(X))
    plain = fs.namespace(FakeArtifact())
    with pytest.raises(StoreError, match="int8 vectors"):
        plain.commit(names(0, 10), rows)
    assert not (plain.path / "shards").exists()  # nothing of a refused commit is left behind
    with pytest.raises(UsageError, match="calibration"):
        fs.namespace(FakeArtifact(), {"compact": {"precision": "int8"}})
    with pytest.raises(UsageError, match="long"):
        fs.namespace(FakeArtifact(), {"long": "truncate"})
    with pytest.raises(StoreError, match="another variant"):  # same folder tag, other ranges: refused
        other = Calibration(int8.compact.calibration.low, int8.compact.calibration.high, rows=11)
        fs.namespace(FakeArtifact(), {"compact": Compact(None, "int8", other).describe()})


def test_a_folder_whose_name_disagrees_with_its_variant_is_not_served(tmp_path: Path):
    fs = FeatureStore(tmp_path)
    fs.namespace(FakeArtifact()).commit(names(0, 20), floats(20))
    embedkit.compact_features(fs, "toy", precision="binary")
    folder = fs.find("toy", precision="binary").path
    folder.rename(folder.with_name(f"{DIGEST}.d8-binary"))  # renamed: it would claim another variant
    with pytest.raises(StoreError, match="binary"):
        fs.find("toy", precision="binary", dimensions=8)
    problems = fs.verify()["toy/abababababab.d8-binary"]
    assert "not this folder" in problems[0].reason


def test_a_namespace_written_before_variants_stays_readable(tmp_path: Path):
    """The layout every earlier embedkit wrote: no ``variant`` in namespace.json, shards without one."""
    import pyarrow as pa

    X = floats(12, dim=8)
    folder = tmp_path / "toy" / DIGEST
    (folder / "shards").mkdir(parents=True)
    (folder / "commits").mkdir()
    info = {"schema": 2, "backbone": "toy", "digest": DIGEST, "dim": 8, "modality": "text",
            "preprocess": {"kind": "text"}, "created": 1.0}
    (folder / "namespace.json").write_text(json.dumps(info))
    table = pa.table({"id": names(0, 12), "source": [""] * 12, "content": [None] * 12,
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), 8)})
    table = table.replace_schema_metadata({"embedkit.digest": DIGEST, "embedkit.backbone": "toy", "embedkit.schema": "2"})
    shard = folder / "shards" / "00000000000000000001-1-abcdef12.arrow"
    with pa.OSFile(str(shard), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    record = {"shard": shard.stem, "digest": DIGEST, "rows": 12, "bytes": shard.stat().st_size,
              "sha256": hashlib.sha256(shard.read_bytes()).hexdigest(), "failures": [], "stats": {}}
    (folder / "commits" / f"{shard.stem}.json").write_text(json.dumps(record))

    fs = FeatureStore(tmp_path)
    ids, F = fs.load("toy")
    np.testing.assert_array_equal(np.asarray(F), X)
    [row] = fs.info()
    assert (row["variant"], row["precision"], row["dimensions"], row["vector_bytes"]) == ("", "float32", 8, 32)
    assert fs.verify() == {"toy/abababababab": []}
    assert fs.find("toy").variant == {} and fs.find("toy").path == folder
    with pytest.raises(StoreError, match=r"present: toy \(abababababab, plain\)"):
        fs.find("toy", precision="int8")
    embedkit.compact_features(fs, "toy", precision="int8")  # an old namespace is a source like any other
    assert fs.load("toy", precision="int8")[1].shape == (12, 8)
    assert json.loads((folder / "namespace.json").read_text()) == info  # the old record was left as it was


def test_recomputed_and_failed_float_vectors_are_followed(tmp_path: Path):
    fs = FeatureStore(tmp_path)
    plain = fs.namespace(FakeArtifact())
    X = floats(30)
    plain.commit(names(0, 30), X)
    embedkit.compact_features(fs, "toy", precision="binary")
    changed = -X[:1]  # item-00000's content changed: its vector was recomputed
    plain.commit(names(0, 1), changed)
    plain.commit([], np.empty((0, 16), np.float32), failures=[{"id": "item-00001", "source": "s", "stage": "id",
                                                               "code": "id_conflict", "message": "two contents"}])
    report = embedkit.compact_features(fs, "toy", precision="binary")
    assert (report.converted, report.skipped, report.dropped, report.rows) == (1, 28, 1, 29)
    rows = by_id(*fs.load("toy", precision="binary"))
    assert "item-00001" not in rows and len(rows) == 29
    np.testing.assert_array_equal(rows["item-00000"], np.packbits(changed > 0, axis=1)[0])
    [failure] = fs.failures("toy", precision="binary")
    assert failure["id"] == "item-00001" and failure["code"] == "id_conflict"
    assert embedkit.compact_features(fs, "toy", precision="binary").converted == 0  # nothing left to do


def test_bytes_per_vector_are_reported(tmp_path: Path):
    fs = FeatureStore(tmp_path)
    fs.namespace(FakeArtifact(dim=64)).commit(names(0, 500), floats(500, dim=64))
    reports = {p: embedkit.compact_features(fs, "toy", precision=p) for p in ("int8", "binary")}
    assert (reports["int8"].vector_bytes, reports["binary"].vector_bytes) == (64, 8)
    info = {row["variant"].split("-")[0]: row for row in fs.info()}
    assert {k: v["vector_bytes"] for k, v in info.items()} == {"": 256, "int8": 64, "binary": 8}
    for key, row in info.items():
        # the vector, its id (10 characters and an offset), an empty source and Arrow's framing
        assert row["vector_bytes"] + 10 < row["bytes_per_row"] < row["vector_bytes"] + 40, (key, row)
    assert reports["binary"].bytes_per_row == info["binary"]["bytes_per_row"]


def test_chunked_and_truncated_vectors_never_mix(tiny, tmp_path: Path):
    long_text = " ".join(f"word{i} and more" for i in range(120))  # well over the window of 64 tokens
    texts = ["a short text", long_text]
    store = str(tmp_path)
    embedkit.extract(texts, tiny, store)
    chunked = embedkit.extract(texts, tiny, store, long="chunk", chunk_overlap=8, max_chunks=16)
    assert (chunked.computed, chunked.cached) == (2, 0)  # nothing reused from the truncated namespace
    assert Path(chunked.namespace).name == f"{tiny.digest}.chunk-o8-m16"
    fs = FeatureStore(tmp_path)
    truncated = by_id(*fs.load(tiny.name))
    pooled = by_id(*fs.load(tiny.name, long="chunk"))
    ids = [content_id(t.encode()) for t in texts]
    direct = embedkit.embed(texts, tiny, long="chunk", chunk_overlap=8, max_chunks=16).vectors
    plain = embedkit.embed(texts, tiny).vectors
    for k, item in enumerate(ids):
        np.testing.assert_allclose(pooled[item], direct[k], atol=1e-6)
        np.testing.assert_allclose(truncated[item], plain[k], atol=1e-6)
    np.testing.assert_allclose(pooled[ids[0]], truncated[ids[0]], atol=1e-6)  # a short text: one window, the same
    assert not np.allclose(pooled[ids[1]], truncated[ids[1]], atol=1e-3)  # the long one: pooled, not cut
    # another chunk setting is another namespace; asking without naming it is refused, not guessed
    embedkit.extract(texts, tiny, store, long="chunk", chunk_overlap=4, max_chunks=16)
    with pytest.raises(StoreError, match="chunk-o4-m16.*chunk-o8-m16|chunk-o8-m16.*chunk-o4-m16"):
        fs.find(tiny.name, long="chunk")
    assert fs.find(tiny.name, long="chunk", chunk_overlap=8).tag == "chunk-o8-m16"
    # a chunk shard copied into the truncated namespace is refused: same digest, dtype and width, other variant
    source = fs.find(tiny.name, long="chunk", chunk_overlap=8)
    shard = next((source.path / "shards").glob("*.arrow"))
    plain_ns = fs.find(tiny.name)
    shutil.copy(shard, plain_ns.path / "shards" / shard.name)
    shutil.copy(source.path / "commits" / f"{shard.stem}.json", plain_ns.path / "commits" / f"{shard.stem}.json")
    with pytest.raises(StoreError, match="variant chunk-o8-m16, not plain"):
        fs.load(tiny.name)
    # compact vectors of chunked texts: a variant of the chunk variant, asked for with both
    report = embedkit.compact_features(fs, tiny.name, precision="int8", long="chunk", chunk_overlap=8)
    assert Path(report.namespace).name.startswith(f"{tiny.digest}.chunk-o8-m16.int8-")
    assert fs.load(tiny.name, precision="int8", long="chunk", chunk_overlap=8)[1].dtype == np.int8
    with pytest.raises(StoreError, match="no features"):
        fs.find(tiny.name, precision="int8")


def test_extract_with_precision_calibrates_once_and_reuses(tiny, tmp_path: Path):
    first = [f"message number {i} about a card" for i in range(60)]
    later = [f"another sentence {i}, quite different from the others!" for i in range(30)]
    report = embedkit.extract(first, tiny, str(tmp_path), precision="int8", calibration_rows=50)
    assert report.compact["converted"] == 60 and report.compact["calibration"]["fitted"]
    assert report.compact["calibration"]["rows"] == 50 and report.compact["vector_bytes"] == tiny.dim
    fs = FeatureStore(tmp_path)
    before = by_id(*fs.load(tiny.name, precision="int8"))
    again = embedkit.extract(first + later, tiny, str(tmp_path), precision="int8")
    assert (again.computed, again.cached) == (30, 60)
    assert not again.compact["calibration"]["fitted"] and (again.compact["converted"], again.compact["skipped"]) == (30, 60)
    assert again.compact["calibration"]["sha256"] == report.compact["calibration"]["sha256"]
    after = by_id(*fs.load(tiny.name, precision="int8"))
    assert all(np.array_equal(after[i], row) for i, row in before.items())
    # the stored rows are what embed gives with the namespace's recorded calibration
    ns = fs.find(tiny.name, precision="int8")
    direct = embedkit.embed(first + later, tiny, precision="int8", calibration=ns.compact.calibration)
    assert direct.vectors.dtype == np.int8 and direct.compact == ns.compact.describe()
    stored = np.stack([after[content_id(t.encode())] for t in first + later])
    assert np.abs(stored.astype(int) - direct.vectors).max() <= 1  # the float vectors agree to ~1e-6, not bits
    assert (stored == direct.vectors).mean() > 0.99


def _compact_namespace(store: Path) -> Path | None:
    found = [p for p in (store / "toy").glob(f"{DIGEST}.*")] if (store / "toy").is_dir() else []
    return found[0] if found else None


def test_kill_9_during_compact_then_rerun_gives_the_uninterrupted_rows(tmp_path: Path):
    base = tmp_path / "base"
    plain = FeatureStore(base).namespace(FakeArtifact(dim=32))
    for k in range(20):
        plain.commit(names(k * 1000, (k + 1) * 1000), floats(1000, dim=32, seed=k))
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    shutil.copytree(base, clean)
    shutil.copytree(base, crashed)
    settings = dict(precision="int8", batch_rows=150, calibration_rows=5000)
    embedkit.compact_features(clean, "toy", **settings)
    code = f"import embedkit; embedkit.compact_features({str(crashed)!r}, 'toy', **{settings!r})"
    kills = 0
    for at_least in (0, 3, 40):  # as soon as the namespace folder appears, then after some commits
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
        def committed(at_least: int = at_least) -> bool:
            folder = _compact_namespace(crashed)
            return folder is not None and (folder / "commits").is_dir() and \
                len(list((folder / "commits").glob("*.json"))) >= at_least

        kills += kill_when(proc, committed, 120)
    assert kills >= 2
    report = embedkit.compact_features(crashed, "toy", **settings)
    assert report.converted < 20_000 and report.rows == 20_000
    a_ids, a_X = FeatureStore(clean).load("toy", precision="int8")
    b_ids, b_X = FeatureStore(crashed).load("toy", precision="int8")
    order_a, order_b = np.argsort(a_ids), np.argsort(b_ids)
    assert list(a_ids[order_a]) == list(b_ids[order_b]) and len(a_ids) == 20_000
    np.testing.assert_array_equal(np.asarray(a_X)[order_a], np.asarray(b_X)[order_b])  # bit for bit
    a_ns, b_ns = (FeatureStore(s).find("toy", precision="int8") for s in (clean, crashed))
    assert a_ns.variant == b_ns.variant and a_ns.path.name == b_ns.path.name  # the same calibration, fitted alike
    assert b_ns.verify() == []
    FeatureStore(crashed).gc()  # orphans of the killed runs go; what is served stays
    np.testing.assert_array_equal(np.asarray(FeatureStore(crashed).load("toy", precision="int8")[1])[order_b],
                                  np.asarray(a_X)[order_a])
