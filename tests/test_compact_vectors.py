"""Compact vectors in ``embed``, ``Embedder`` and the command line (issue 25, item 2): int8 / uint8 with a
recorded calibration, binary, truncated dimensions; failed items stay accounted for."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone
from store_support import tiny_fixture  # noqa: F401 (the tiny fixture)
from support import run_cli

import embedkit
from embedkit import Calibration, Compact
from embedkit.errors import InvalidInputError, UsageError
from embedkit.features.store import FeatureStore

TEXTS = [f"sentence {i} about a lost card" for i in range(12)] + ["the exchange rate today", "top up my account"]


def test_embed_binary_and_dimensions_rows_and_the_failed_item(tiny):
    floats = embedkit.embed(TEXTS + [None], tiny)
    result = embedkit.embed(TEXTS + [None], tiny, precision="binary")
    assert result.vectors.dtype == np.uint8 and result.vectors.shape == (15, 1)  # 8 dims: one byte
    assert not result.ok[-1] and result.errors[0].index == 14 and result.errors[0].code == "not_text"
    assert result.vectors[-1].tolist() == [0]  # a failed item's row is zero, and ok says so
    np.testing.assert_array_equal(result.vectors[:-1], np.packbits(floats.vectors[:-1] > 0, axis=1))
    assert result.compact == {"precision": "binary", "dimensions": None}
    cut = embedkit.embed(TEXTS, tiny, dimensions=4)
    assert cut.vectors.shape == (14, 4) and cut.vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(cut.vectors, axis=1), 1.0, rtol=1e-5)  # renormalised
    expected = floats.vectors[:-1, :4] / np.linalg.norm(floats.vectors[:-1, :4], axis=1, keepdims=True)
    np.testing.assert_allclose(cut.vectors, expected, rtol=1e-5)
    assert embedkit.embed(TEXTS, tiny).compact is None


def test_embed_refuses_what_it_cannot_do_before_any_work(tiny):
    with pytest.raises(UsageError, match="needs a calibration"):
        embedkit.embed(TEXTS, tiny, precision="int8")
    with pytest.raises(UsageError, match="dimensions=9"):
        embedkit.embed(TEXTS, tiny, dimensions=9)
    with pytest.raises(UsageError, match="precision"):
        embedkit.embed(TEXTS, tiny, precision="int4")
    cal = Compact.fitted(embedkit.embed(TEXTS, tiny).vectors, dimensions=4).calibration
    with pytest.raises(UsageError, match="4 dimensions"):
        embedkit.embed(TEXTS, tiny, precision="int8", calibration=cal)  # fitted on 4 dims, used on all 8


def test_embed_int8_with_a_calibration_and_its_record(tiny):
    floats = embedkit.embed(TEXTS, tiny).vectors
    cal = Calibration.fit(floats[:6], source="six texts")
    result = embedkit.embed(TEXTS, tiny, precision="int8", calibration=cal)
    assert result.vectors.dtype == np.int8 and result.vectors.shape == (14, 8)
    np.testing.assert_array_equal(result.vectors, Compact(None, "int8", cal).apply(floats))
    assert result.compact["calibration"]["sha256"] == cal.digest
    again = embedkit.embed(TEXTS, tiny, precision="int8", calibration=json.loads(json.dumps(cal.to_dict())))
    np.testing.assert_array_equal(again.vectors, result.vectors)
    uint8 = embedkit.embed(TEXTS, tiny, precision="uint8", calibration=cal).vectors
    np.testing.assert_array_equal(uint8.astype(int) - 128, result.vectors.astype(int))


def test_embedder_fits_the_calibration_on_x_and_stays_a_scikit_learn_transformer(tiny):
    emb = embedkit.Embedder(str(tiny.path), precision="int8").fit(TEXTS)
    floats = embedkit.Embedder(str(tiny.path)).fit().transform(TEXTS)
    np.testing.assert_array_equal(emb.compact_.calibration.low, floats.min(axis=0))
    np.testing.assert_array_equal(emb.compact_.calibration.high, floats.max(axis=0))
    rows = emb.transform(TEXTS)
    assert rows.dtype == np.int8 and rows.shape == (14, 8) and emb.n_features_out_ == 8
    assert rows.min() == -128 and rows.max() == 127  # the extremes of X are the ends of the ranges
    assert emb.transform([]).shape == (0, 8) and emb.transform([]).dtype == np.int8
    twin = clone(emb)
    assert twin.get_params() == emb.get_params() and not hasattr(twin, "compact_")
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(emb)).transform(TEXTS), rows)
    binary = clone(emb).set_params(precision="binary", dimensions=4).fit(TEXTS)
    assert binary.transform(TEXTS).shape == (14, 1) and binary.get_feature_names_out().shape == (1,)
    given = Calibration.fit(floats[:5])
    fixed = embedkit.Embedder(str(tiny.path), precision="int8", calibration=given).fit(TEXTS)
    assert fixed.compact_.calibration is given  # a calibration given is used, never refitted on X
    assert clone(fixed).get_params()["calibration"].digest == given.digest
    with pytest.raises(UsageError, match="needs a calibration"):
        embedkit.Embedder(str(tiny.path), precision="int8").fit()
    with pytest.raises(InvalidInputError):
        emb.transform(TEXTS + [None])


def test_cli_extract_compact_calibration_and_embed_agree(tiny, tmp_path: Path):
    # by digest: another test may have exported the same weights under another name in the model store
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(TEXTS) + "\n")
    store = tmp_path / "fs"
    store.mkdir()
    done = run_cli("extract", str(source), "--backbone", tiny.digest, "--out", str(store), "--no-progress",
                   "--precision", "int8", "--calibration-rows", "10", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["compact"]["rows"] == 14 and report["compact"]["calibration"]["rows"] == 10
    assert "compact: 14 int8 vectors" in done.stderr
    info = json.loads(run_cli("store", "info", str(store), "--json").stdout)
    assert sorted((r["variant"].split("-")[0], r["vector_bytes"]) for r in info) == [("", 32), ("int8", 8)]
    assert "8 bytes/vector" in run_cli("store", "info", str(store)).stdout

    cal = tmp_path / "cal.json"
    done = run_cli("store", "calibration", str(store), "--backbone", tiny.digest[:16], "-o", str(cal))
    assert done.returncode == 0, done.stderr
    record = json.loads(cal.read_text())
    assert record["digest"] == tiny.digest and record["calibration"]["sha256"] == report["compact"]["calibration"]["sha256"]
    cal.write_text(cal.read_text() + " ")  # the file is the user's now
    mine = cal.read_text()
    refused = run_cli("store", "calibration", str(store), "--backbone", tiny.digest[:16], "-o", str(cal))
    assert refused.returncode == 1 and "never overwrites" in refused.stderr and cal.read_text() == mine

    out = tmp_path / "rows.npy"
    done = run_cli("embed", tiny.digest, str(source), "--out", str(out), "--precision", "int8", "--calibration",
                   str(cal), "--no-progress")
    assert done.returncode == 0, done.stderr
    rows = np.load(out)
    ids, stored = FeatureStore(store).load(tiny.digest, precision="int8")
    from embedkit.inputs.files import content_id

    by_id = {str(i): r for i, r in zip(ids, np.asarray(stored))}
    expected = np.stack([by_id[content_id(t.encode())] for t in TEXTS])
    assert rows.dtype == np.int8 and np.abs(rows.astype(int) - expected).max() <= 1
    again = run_cli("embed", tiny.digest, str(source), "--out", str(out), "--precision", "binary", "--no-progress")
    assert again.returncode == 0, again.stderr  # embed's own compact output is replaced like any of its outputs
    assert np.load(out).shape == (14, 1)
    parquet = tmp_path / "rows.parquet"
    assert run_cli("embed", tiny.digest, str(source), "--out", str(parquet), "--precision", "binary",
                   "--no-progress").returncode == 0
    import pyarrow.parquet as pq

    table = pq.read_table(parquet)
    kind = table.schema.field("embedding").type
    assert (str(kind.value_type), kind.list_size) == ("uint8", 1)
    assert json.loads(table.schema.metadata[b"embedkit.compact"])["precision"] == "binary"

    missing = run_cli("embed", tiny.digest, str(source), "--out", str(tmp_path / "x.npy"), "--precision", "int8")
    assert missing.returncode == 1 and "--calibration FILE" in missing.stderr
    done = run_cli("store", "compact", str(store), "--backbone", tiny.digest[:16], "--precision", "binary",
                   "--dimensions", "4", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["vector_bytes"] == 1
    wrong = run_cli("store", "compact", str(store), "--backbone", tiny.digest[:16], "--long", "chunk")
    assert wrong.returncode == 1 and "no features" in wrong.stderr and "plain" in wrong.stderr
    extra = run_cli("store", "info", str(store), "--precision", "int8")
    assert extra.returncode == 1 and "do not apply to `store info`" in extra.stderr
    chunked = run_cli("extract", str(source), "--backbone", tiny.digest, "--out", str(store), "--no-progress",
                      "--long", "chunk", "--chunk-overlap", "8", "--max-chunks", "4", "--json")
    assert chunked.returncode == 0, chunked.stderr
    assert json.loads(chunked.stdout)["namespace"].endswith(f"{tiny.digest}.chunk-o8-m4")
    assert json.loads(chunked.stdout)["computed"] == 14  # nothing taken from the truncated namespace
    assert "chunk-o8-m4" in run_cli("store", "info", str(store)).stdout


@pytest.mark.parametrize("command", [["extract"], ["embed"], ["store"]])
def test_help_states_the_defaults(command):
    from embedkit.cli import feature_store
    from embedkit.encoders import compact

    assert feature_store.CALIBRATION_ROWS == compact.CALIBRATION_ROWS  # the CLI's copy (its --help stays light)
    text = run_cli(*command, "--help").stdout
    for option in ("--precision", "--dimensions"):
        described = text.split(f"\n  {option}", 1)[1].split("\n  -", 1)[0]
        assert "default" in described, (option, described)
