"""A calibration is used only on the vectors it fits, and compact / chunked outputs say how they were made.

Faults a tester found in issue 25's compact vectors and long-text chunking: a calibration record
without its sha256 was accepted (so an edit passed by dropping it); one fitted under another
long-text policy or on another backbone was applied; provenance never named the long-text
policy; failed rows of compact outputs were zeros while the docs said NaN; options that change
nothing were accepted; ``--long error`` counted truncated cached vectors as ok; ``dimensions``
equal to the backbone's width made a twin namespace. Real CLI subprocesses and the public API
over a tiny real text backbone (the MiniLM tokenizer, ``max_length`` 64: 62 content tokens a window).
"""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from store_support import tiny_fixture  # noqa: F401 (the tiny fixture)
from support import run_cli

import embedkit
from embedkit import Calibration, Compact
from embedkit.encoders.calibrations import CalibrationMismatchError
from embedkit.errors import UsageError
from embedkit.features.store import FeatureStore

torch = pytest.importorskip("torch")

SHORT = [f"sentence {i} about a lost card" for i in range(12)] + ["the exchange rate today", "top up my account"]
LONG = [" ".join([f"the card number {i} I ordered last week has still not arrived at my home address"] * 12)
        for i in range(3)]  # ~200 tokens each: 4 windows of 62 content tokens with overlap 8
TEXTS = SHORT + LONG
CHUNK = ["--long", "chunk", "--chunk-overlap", "8", "--max-chunks", "4"]


@pytest.fixture(scope="module")
def other(model_store):
    """Another 8-d backbone (other weights): a calibration of tiny's vectors does not fit it."""
    from tiny import Pooled, text_backbone

    return embedkit.export(text_backbone("tiny-pooled-other", lambda: Pooled(dim=8, seed=5)))


@pytest.fixture(scope="module")
def stored(tiny, tmp_path_factory):
    """A store with int8 namespaces of truncated and of chunked texts, and the calibration file of each."""
    folder = tmp_path_factory.mktemp("calibration-checks")
    source = folder / "texts.txt"
    source.write_text("\n".join(TEXTS) + "\n")
    store = folder / "fs"
    store.mkdir()
    for extra in ([], CHUNK):
        done = run_cli("extract", str(source), "--backbone", tiny.digest, "--out", str(store), "--no-progress",
                       "--precision", "int8", *extra)
        assert done.returncode == 0, done.stderr
    files = {}
    for key, extra in (("truncate", []), ("chunk", CHUNK[:2])):
        files[key] = folder / f"cal-{key}.json"
        done = run_cli("store", "calibration", str(store), "--backbone", tiny.digest[:16], *extra, "-o", str(files[key]))
        assert done.returncode == 0, done.stderr
    return {"folder": folder, "source": source, "store": store, **files}


def tampered(record: dict, drop_sha: bool = True) -> dict:
    """``record`` (a calibration file's) with ``low[0]`` edited and, by default, its sha256 removed."""
    record = json.loads(json.dumps(record))
    record["calibration"]["low"][0] -= 0.5
    if drop_sha:
        del record["calibration"]["sha256"]
    return record


def test_a_calibration_without_its_sha256_is_refused_by_embed_serve_and_a_saved_head(tiny, stored, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(tampered(json.loads(stored["truncate"].read_text()))))
    out = tmp_path / "rows.npy"
    refused = run_cli("embed", tiny.digest, str(stored["source"]), "--out", str(out), "--precision", "int8",
                      "--calibration", str(bad), "--no-progress")
    assert refused.returncode == 1 and "no sha256" in refused.stderr and "cannot be verified" in refused.stderr
    assert not out.exists()
    served = run_cli("serve", "--backbone", str(tiny.path), "--calibration", str(bad), "--port", "0")
    assert served.returncode == 1 and "no sha256" in served.stderr, served.stderr
    with pytest.raises(UsageError, match="no sha256"):
        embedkit.embed(SHORT, str(tiny.path), precision="int8", calibration=json.loads(bad.read_text()))
    with pytest.raises(UsageError, match="no sha256"):
        Calibration.from_dict(json.loads(bad.read_text())["calibration"])

    # a head trained on int8 features: the same edit in its model.json is refused, not loaded
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows([(t, "card" if "card" in t else "other") for t in TEXTS])
    run = tmp_path / "run"
    done = run_cli("train-head", str(stored["store"]), "--backbone", tiny.digest[:16], "--labels", str(labels),
                   "--precision", "int8", "--out", str(run), "--no-progress")
    assert done.returncode == 0, done.stderr
    manifest_file = run / "model" / "model.json"
    manifest = json.loads(manifest_file.read_text())
    assert embedkit.load(run / "model").predict(SHORT[:2]) is not None
    manifest["compact"]["calibration"]["low"][0] -= 0.5
    del manifest["compact"]["calibration"]["sha256"]
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(embedkit.ArtifactError, match="no sha256"):
        embedkit.load(run / "model")
    predicted = run_cli("predict", str(run / "model"), SHORT[0])
    assert predicted.returncode == 1 and "no sha256" in predicted.stderr


def test_the_calibration_file_records_the_text_policy_and_embed_refuses_another(tiny, stored, tmp_path):
    chunk = json.loads(stored["chunk"].read_text())
    plain = json.loads(stored["truncate"].read_text())
    assert (chunk["long"], chunk["chunk_overlap"], chunk["max_chunks"]) == ("chunk", 8, 4)
    assert (plain["long"], plain["chunk_overlap"], plain["max_chunks"]) == ("truncate", None, None)
    source, out = str(stored["source"]), tmp_path / "rows.npy"

    def embed(calibration: Path, *policy: str):
        return run_cli("embed", tiny.digest, source, "--out", str(out), "--precision", "int8", "--calibration",
                       str(calibration), "--no-progress", *policy)

    for calibration, policy in ((stored["chunk"], []), (stored["truncate"], CHUNK),
                                (stored["chunk"], ["--long", "chunk", "--chunk-overlap", "16", "--max-chunks", "4"])):
        refused = embed(calibration, *policy)
        assert refused.returncode == 1 and "was fitted on vectors of long=" in refused.stderr, refused.stderr
        assert not out.exists()
    done = embed(stored["chunk"], *CHUNK)
    assert done.returncode == 0, done.stderr
    ids, rows = FeatureStore(stored["store"]).load(tiny.digest, precision="int8", long="chunk")
    from embedkit.inputs.files import content_id

    by_id = {str(i): r for i, r in zip(ids, np.asarray(rows))}
    expected = np.stack([by_id[content_id(t.encode())] for t in TEXTS])
    assert np.abs(np.load(out).astype(int) - expected).max() <= 1  # the stored chunked int8 rows
    assert embed(stored["truncate"], "--long", "error").returncode == 2  # error embeds truncate's vectors: agreed
    # the library and the service refuse the same
    with pytest.raises(CalibrationMismatchError, match="long=chunk"):
        embedkit.embed(SHORT, str(tiny.path), precision="int8", calibration=chunk)
    with pytest.raises(CalibrationMismatchError, match="long=truncate"):
        embedkit.Embedder(str(tiny.path), precision="int8", calibration=plain, long="chunk").fit()
    result = embedkit.embed(TEXTS, str(tiny.path), precision="int8", calibration=chunk, long="chunk", chunk_overlap=8,
                            max_chunks=4)
    assert result.vectors.dtype == np.int8
    for calibration, policy in ((stored["truncate"], ["--long", "chunk"]), (stored["chunk"], [])):
        served = run_cli("serve", "--backbone", str(tiny.path), "--calibration", str(calibration), *policy,
                         "--port", "0")
        assert served.returncode == 1 and "long=" in served.stderr, served.stderr


def test_a_bare_calibration_is_applied_only_to_the_backbone_its_source_names(tiny, other, stored, tmp_path, caplog):
    namespace = FeatureStore(stored["store"]).find(tiny.digest, precision="int8")
    bare = namespace.compact.calibration.to_dict()
    assert bare["source"].startswith("store:") and bare["source"].endswith(f"/{tiny.digest[:12]}")  # names the artifact
    with pytest.raises(CalibrationMismatchError, match=f"{tiny.digest[:12]}.*not of tiny-pooled-other"):
        embedkit.embed(SHORT, str(other.path), precision="int8", calibration=bare)
    with pytest.raises(CalibrationMismatchError):
        embedkit.Embedder(str(other.path), precision="int8", calibration=Calibration.from_dict(bare)).fit()
    mine = embedkit.embed(SHORT, str(tiny.path), precision="int8", calibration=bare).vectors
    np.testing.assert_array_equal(mine, Compact(None, "int8", Calibration.from_dict(bare)).apply(
        embedkit.embed(SHORT, str(tiny.path)).vectors))
    file = tmp_path / "bare.json"
    file.write_text(json.dumps(bare))
    refused = run_cli("embed", other.digest, str(stored["source"]), "--out", str(tmp_path / "x.npy"), "--precision",
                      "int8", "--calibration", str(file), "--no-progress")
    assert refused.returncode == 1 and "was fitted on vectors of" in refused.stderr and tiny.digest[:12] in refused.stderr
    # a record that names nothing: used for its dimension count only, and the log says so
    anonymous = Calibration.fit(embedkit.embed(SHORT, str(other.path)).vectors, source="my own vectors")
    with caplog.at_level(logging.WARNING, logger="embedkit.encoders.calibrations"):
        embedkit.embed(SHORT, str(other.path), precision="int8", calibration=anonymous.to_dict())
    assert "names no artifact" in caplog.text and "my own vectors" in caplog.text
    with pytest.raises(UsageError, match="4 dimensions"):
        embedkit.embed(SHORT, str(other.path), precision="int8",
                       calibration=Calibration(np.zeros(4), np.ones(4), rows=2))


def test_provenance_names_the_long_text_policy_and_failed_compact_rows_are_documented(tiny, tmp_path):
    import pyarrow.parquet as pq

    source = tmp_path / "texts.txt"
    source.write_text("\n".join(TEXTS[:3] + ["   "] + LONG) + "\n")  # row 3 is empty: --empty error fails it
    out = tmp_path / "pc.parquet"
    done = run_cli("embed", tiny.digest, str(source), "--out", str(out), "--long", "chunk", "--chunk-overlap", "8",
                   "--max-chunks", "2", "--precision", "binary", "--dimensions", "4", "--empty", "error",
                   "--no-progress")
    assert done.returncode == 2, done.stderr
    table = pq.read_table(out)
    meta = table.schema.metadata
    assert json.loads(meta[b"embedkit.long"]) == {"long": "chunk", "chunk_overlap": 8, "max_chunks": 2}
    assert json.loads(meta[b"embedkit.compact"]) == {"precision": "binary", "dimensions": 4}
    assert table.column("ok").to_pylist() == [True, True, True, False, True, True, True]
    assert "failed rows are zeros" in done.stderr and "errors.jsonl" in done.stderr and "ok column" in done.stderr
    npy = tmp_path / "rows.npy"
    done = run_cli("embed", tiny.digest, str(source), "--out", str(npy), "--precision", "binary", "--empty", "error",
                   "--no-progress")
    assert done.returncode == 2 and "failed rows are zeros" in done.stderr, done.stderr
    assert np.load(npy)[3].tolist() == [0]
    errors = (tmp_path / "rows.npy.errors.jsonl").read_text().splitlines()
    assert [(json.loads(line)["index"], json.loads(line)["code"]) for line in errors] == [(3, "empty_text")]
    plain = tmp_path / "plain.parquet"
    assert run_cli("embed", tiny.digest, str(source), "--out", str(plain), "--no-progress").returncode == 0
    assert json.loads(pq.read_table(plain).schema.metadata[b"embedkit.long"]) == {
        "long": "truncate", "chunk_overlap": None, "max_chunks": None}


def test_options_that_change_nothing_are_refused(tiny, stored, tmp_path):
    store = tmp_path / "fs"
    store.mkdir()
    done = run_cli("extract", str(stored["source"]), "--backbone", tiny.digest, "--out", str(store),
                   "--calibration-rows", "5", "--no-progress")
    assert done.returncode == 1 and "--calibration-rows applies with --precision int8 / uint8" in done.stderr
    assert not any(store.iterdir())  # refused before any work
    done = run_cli("store", "compact", str(stored["store"]), "--backbone", tiny.digest[:16], "--precision", "binary",
                   "--calibration-rows", "5")
    assert done.returncode == 1 and "--calibration-rows applies" in done.stderr
    with pytest.raises(UsageError, match="calibration_rows applies"):
        embedkit.extract(SHORT, str(tiny.path), str(store), calibration_rows=5)
    with pytest.raises(UsageError, match="apply with long='chunk'"):
        embedkit.embed(["a"], str(tiny.path), chunk_overlap=8)
    with pytest.raises(UsageError, match="apply with long='chunk'"):
        embedkit.embed(["a"], str(tiny.path), max_chunks=2, long="error")
    with pytest.raises(UsageError, match="apply with long='chunk'"):
        embedkit.Embedder(str(tiny.path), chunk_overlap=8).fit()
    assert embedkit.Embedder(str(tiny.path)).fit().transform(["a"]).shape == (1, 8)  # the defaults are fine


def test_long_error_is_refused_on_a_store_that_holds_truncated_vectors(tiny, tmp_path):
    table = tmp_path / "long.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text"])
        writer.writerows([t] for t in TEXTS)
    store = tmp_path / "sta"
    store.mkdir()
    first = run_cli("extract", str(table), "--backbone", tiny.digest, "--out", str(store), "--json", "--no-progress")
    assert first.returncode == 0 and json.loads(first.stdout)["truncated"] == 3, first.stderr
    again = run_cli("extract", str(table), "--backbone", tiny.digest, "--out", str(store), "--long", "error",
                    "--no-progress")
    assert again.returncode == 1 and "3 vector(s) of texts longer than the backbone's window" in again.stderr
    assert "0 failed" not in again.stderr
    with pytest.raises(UsageError, match="truncated by earlier runs"):
        embedkit.extract(str(table), tiny.digest, str(store), column="text", truncate=False)
    # a store without truncated vectors: --long error checks every new text, as before
    clean = tmp_path / "clean"
    clean.mkdir()
    short = tmp_path / "short.txt"
    short.write_text("\n".join(SHORT) + "\n")
    assert run_cli("extract", str(short), "--backbone", tiny.digest, "--out", str(clean), "--no-progress").returncode == 0
    done = run_cli("extract", str(table), "--backbone", tiny.digest, "--out", str(clean), "--long", "error", "--json",
                   "--no-progress", "--max-failures", "3")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["cached"], report["failed"], report["truncated"]) == (14, 3, 0)


def test_dimensions_equal_to_the_width_are_every_dimension(tiny, stored, tmp_path):
    store = tmp_path / "fs"
    store.mkdir()
    done = run_cli("extract", str(stored["source"]), "--backbone", tiny.digest, "--out", str(store),
                   "--precision", "float32", "--dimensions", "8", "--json", "--no-progress")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["compact"] is None
    assert [r["variant"] for r in FeatureStore(store).info()] == [""]  # no d8 twin of the float namespace
    refused = run_cli("store", "compact", str(store), "--backbone", tiny.digest[:16], "--precision", "float32",
                      "--dimensions", "8")
    assert refused.returncode == 1 and "nothing to compact" in refused.stderr
    done = run_cli("extract", str(stored["source"]), "--backbone", tiny.digest, "--out", str(store),
                   "--precision", "binary", "--dimensions", "8", "--json", "--no-progress")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["compact"]["variant"] == "binary"
    report = embedkit.compact_features(str(store), tiny.digest[:16], precision="binary", dimensions=8)
    assert report.variant == "binary" and report.converted == 0
    assert sorted(r["variant"] for r in FeatureStore(store).info()) == ["", "binary"]
    ids, bits = FeatureStore(store).load(tiny.digest, precision="binary", dimensions=8)
    assert bits.shape == (len(TEXTS), 1)
    assert FeatureStore(store).load(tiny.digest, dimensions=8)[1].dtype == np.float32
    whole = embedkit.embed(SHORT, str(tiny.path), dimensions=8)
    assert whole.compact is None
    np.testing.assert_array_equal(whole.vectors, embedkit.embed(SHORT, str(tiny.path)).vectors)
    assert embedkit.Embedder(str(tiny.path), dimensions=8).fit().compact_ is None
