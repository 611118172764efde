"""An item id stands for one content (issue 10, kind 4, store side): user ids carry a content
fingerprint; a changed content is recomputed, two contents under one id are a recorded conflict,
and the label join never gives one row's label to another row's vector."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from store_support import tiny_fixture  # noqa: F401 (the tiny fixture)

import embedkit
from embedkit.features.store import FeatureStore
from embedkit.heads.training import labels_for


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rows_of(n: int) -> list[dict]:
    return [{"key": f"k{i}", "text": f"a short note about topic number {i}", "label": "ab"[i % 2]} for i in range(n)]


def served(store: Path, name: str) -> dict[str, np.ndarray]:
    ids, X = FeatureStore(store).load(name)
    return dict(zip(ids.tolist(), np.asarray(X)))


def test_an_edited_text_under_the_same_id_is_recomputed(tiny, tmp_path: Path):
    rows = rows_of(6)
    source = write_rows(tmp_path / "items.jsonl", rows)
    first = embedkit.extract(str(source), str(tiny.path), str(tmp_path / "fs"), id_column="key")
    assert first.computed == 6
    old = served(tmp_path / "fs", tiny.name)["k2"]
    rows[2]["text"] = "refund for a duplicated transfer abroad"
    write_rows(source, rows)
    again = embedkit.extract(str(source), str(tiny.path), str(tmp_path / "fs"), id_column="key")
    new = embedkit.embed([rows[2]["text"]], backbone=str(tiny.path)).vectors[0]
    vector = served(tmp_path / "fs", tiny.name)["k2"]
    np.testing.assert_allclose(vector, new, atol=1e-5)  # the new text's vector, not the old one
    assert not np.allclose(vector, old, atol=1e-3)
    assert (again.cached, again.changed, again.computed, again.ok, again.failed) == (5, 1, 1, 6, 0)
    assert len(served(tmp_path / "fs", tiny.name)) == 6


def test_an_id_whose_new_content_fails_serves_no_stale_vector(tiny, tmp_path: Path):
    rows = rows_of(4)
    source = write_rows(tmp_path / "items.jsonl", rows)
    embedkit.extract(str(source), str(tiny.path), str(tmp_path / "fs"), id_column="key")
    rows[1]["text"] = None  # the row lost its text
    report = embedkit.extract(str(write_rows(source, rows)), str(tiny.path), str(tmp_path / "fs"), id_column="key")
    assert sorted(served(tmp_path / "fs", tiny.name)) == ["k0", "k2", "k3"]  # not the old text's vector
    assert (report.ok, report.failed, report.changed) == (3, 1, 1)
    assert [f["id"] for f in FeatureStore(tmp_path / "fs").failures(tiny.name)] == ["k1"]


@pytest.mark.parametrize("shard_size", [100, 2])  # the first row in the same shard, or already committed
def test_two_contents_under_one_id_in_one_run_are_a_recorded_conflict(tiny, tmp_path: Path, shard_size: int):
    rows = rows_of(6) + [{"key": "k1", "text": "an entirely different second text", "label": "b"}]
    source = write_rows(tmp_path / "items.jsonl", rows)
    report = embedkit.extract(str(source), str(tiny.path), str(tmp_path / "fs"), id_column="key",
                              shard_size=shard_size)
    assert (report.total, report.ok, report.failed) == (7, 5, 2)  # before: 7 ok, k1's second text never embedded
    assert (report.conflicts, report.duplicates) == (1, 0)
    [failure] = FeatureStore(tmp_path / "fs").failures(tiny.name)
    assert failure["id"] == "k1" and failure["code"] == "id_conflict"
    assert "items.jsonl:row 2" in failure["message"] and "items.jsonl:row 7" in failure["message"]
    assert sorted(served(tmp_path / "fs", tiny.name)) == ["k0", "k2", "k3", "k4", "k5"]  # k1 serves no vector
    # train-head's join: no label lands on a vector of another row's text
    ns = FeatureStore(tmp_path / "fs").find(tiny.name)
    ids, _, sources, contents = ns.load_all()
    y = labels_for(ids, sources, str(source), "text", "label", "key", contents=contents)
    assert dict(zip(ids.tolist(), y.tolist())) == {f"k{i}": "ab"[i % 2] for i in (0, 2, 3, 4, 5)}
    # the input fixed, a rerun embeds k1 and the conflict is gone
    fixed = embedkit.extract(str(write_rows(source, rows[:6])), str(tiny.path), str(tmp_path / "fs"), id_column="key",
                             shard_size=shard_size)
    assert (fixed.computed, fixed.cached, fixed.failed) == (1, 5, 0)
    assert FeatureStore(tmp_path / "fs").failures(tiny.name) == []
    k1 = embedkit.embed([rows[1]["text"]], backbone=str(tiny.path)).vectors[0]
    np.testing.assert_allclose(served(tmp_path / "fs", tiny.name)["k1"], k1, atol=1e-5)


def test_the_label_join_refuses_a_row_whose_content_is_not_the_stored_one(tiny, tmp_path: Path):
    rows = rows_of(6)
    source = write_rows(tmp_path / "items.jsonl", rows)
    embedkit.extract(str(source), str(tiny.path), str(tmp_path / "fs"), id_column="key")
    rows[3] = {"key": "k3", "text": "text edited after the extract", "label": "z"}  # not re-extracted
    write_rows(source, rows)
    ids, _, sources, contents = FeatureStore(tmp_path / "fs").find(tiny.name).load_all()
    y = dict(zip(ids.tolist(), labels_for(ids, sources, str(source), "text", "label", "key", contents=contents)))
    assert y == {"k0": "a", "k1": "b", "k2": "a", "k3": None, "k4": "a", "k5": "b"}


def test_one_id_with_two_labels_and_no_payload_column_stays_unlabelled(tmp_path: Path):
    table = tmp_path / "labels.csv"
    table.write_text("id,label\nk0,a\nk1,a\nk1,b\nk2,b\nk2,b\n")
    ids = np.asarray(["k0", "k1", "k2"])
    y = labels_for(ids, np.asarray(["", "", ""]), str(table), "text", "label")
    assert y.tolist() == ["a", None, "b"]  # before: k1 silently took the last row's label


def test_vectors_stored_without_fingerprints_are_recomputed_under_user_ids(tiny, tmp_path: Path):
    """A schema-1 store (no content column) stays readable; a user-id rerun cannot trust it."""
    ns = FeatureStore(tmp_path / "fs").namespace(tiny)
    ns.commit(["k0", "k1"], np.ones((2, tiny.dim), np.float32), ["old:1", "old:2"])  # as embedkit 1 wrote
    assert sorted(served(tmp_path / "fs", tiny.name)) == ["k0", "k1"]
    rows = rows_of(3)
    report = embedkit.extract(str(write_rows(tmp_path / "items.jsonl", rows)), str(tiny.path), str(tmp_path / "fs"),
                              id_column="key")
    assert (report.changed, report.computed, report.cached) == (2, 3, 0)
    want = embedkit.embed([r["text"] for r in rows], backbone=str(tiny.path)).vectors
    got = served(tmp_path / "fs", tiny.name)
    np.testing.assert_allclose(np.stack([got[f"k{i}"] for i in range(3)]), want, atol=1e-5)


def test_extract_after_namespace_json_and_manifest_were_damaged(tiny, tmp_path: Path):
    texts = [f"text number {i}" for i in range(5)]
    embedkit.extract(texts, str(tiny.path), str(tmp_path / "fs"))
    [ns] = FeatureStore(tmp_path / "fs").namespaces()
    (ns.path / "namespace.json").write_text('{"schema": 2, "dig')
    (ns.path / "manifest.json").write_text("")
    report = embedkit.extract(texts, str(tiny.path), str(tmp_path / "fs"))  # before: raw JSONDecodeError
    assert (report.cached, report.computed) == (5, 0)
    assert json.loads((ns.path / "namespace.json").read_text())["digest"] == tiny.digest
    assert len(served(tmp_path / "fs", tiny.name)) == 5
