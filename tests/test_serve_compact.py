"""``/v1/embeddings`` compact vectors on a real ``embedkit serve`` on 127.0.0.1: ``dimensions``
(truncated, renormalised), ``encoding_format`` binary / int8 / uint8 (with ``--calibration``),
the typed 422s, and the ``embedkit`` provenance record; each answer equals the library's Compact
applied in-process. The server is stopped at the end.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
torch = pytest.importorskip("torch")

from serving import Server  # noqa: E402
from tiny import Pooled, TinyConv, text_backbone  # noqa: E402

import embedkit  # noqa: E402
from embedkit.encoders.compact import Calibration, Compact  # noqa: E402

TEXTS = ["the card was declined", "how do I top up?", "a", "where is my refund for the order I placed last week"]
TRUNCATE = {"long": "truncate", "chunk_overlap": None, "max_chunks": None}  # the server's long-text policy
CALIBRATION_TEXTS = ["my card has not arrived", "exchange rate for euros", "top up failed twice", "I lost my wallet",
                     "why was I charged a fee", "cash withdrawal not recognised", "change my PIN", "refund pending"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    text = embedkit.export(text_backbone("tiny-compact-a", lambda: Pooled(dim=8, seed=3)))
    other = embedkit.export(text_backbone("tiny-compact-b", lambda: Pooled(dim=8, seed=4)))
    image = embedkit.export(embedkit.Backbone(
        name="tiny-compact-image", modality="image", dim=8, weights="random", license="MIT",
        preprocess=embedkit.ImagePreprocess(crop=(32, 32), resize=32), builder=TinyConv,
    ))
    folder = tmp_path_factory.mktemp("calibration")
    calib = embedkit.embed(CALIBRATION_TEXTS, backbone=str(text.path)).vectors
    full = Calibration.fit(calib, source="test")
    four = Calibration.fit(Compact(4).truncate(calib), source="test")
    # as `embedkit store calibration` writes it (naming the artifact), and a bare Calibration record
    (folder / "full.json").write_text(json.dumps({"kind": "embedkit.calibration", "backbone": text.name,
                                                  "digest": text.digest, "calibration": full.to_dict()}))
    (folder / "four.json").write_text(json.dumps({"kind": "embedkit.calibration", "backbone": text.name,
                                                  "digest": text.digest, "calibration": four.to_dict()}))
    # a saved model whose head was trained on int8 features (a CompactHead): /predict must quantise first
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    from embedkit.heads.compacted import CompactHead

    compact = Compact(None, "int8", full)
    labels = ["card", "rate", "topup", "card", "fee", "cash", "pin", "refund"]
    inner = LogisticRegression(max_iter=500).fit(compact.restore(compact.apply(calib)), labels)
    model = embedkit.save(Pipeline([("embed", embedkit.Embedder(str(text.path)).fit()),
                                    ("head", CompactHead.wrap(inner, compact))]), folder / "intent8")
    # a saved model whose Embedder itself makes int8 rows (calibrated in fit): its head saw int8 rows
    pipe8 = Pipeline([("embed", embedkit.Embedder(str(text.path), precision="int8")),
                      ("head", LogisticRegression(max_iter=500))]).fit(CALIBRATION_TEXTS, labels)
    embedder8 = embedkit.save(pipe8, folder / "embedder8")
    return {"text": text, "other": other, "image": image, "full": full, "four": four, "folder": folder,
            "model": model, "inner": inner, "compact": compact, "pipe8": pipe8, "embedder8": embedder8}


@pytest.fixture(scope="module")
def server(setup):
    folder = setup["folder"]
    with Server("--backbone", f"a={setup['text'].path}", "--backbone", f"b={setup['other'].path}",
                "--backbone", f"img={setup['image'].path}", "--calibration", str(folder / "full.json"),
                "--calibration", str(folder / "four.json"), "--model", f"intent8={setup['model']}",
                "--model", f"embedder8={setup['embedder8']}",
                "--max-wait-ms", "2") as s:
        yield s


def post(server, body, path="/v1/embeddings"):
    return httpx.post(server.url + path, json=body, timeout=30)


def library(setup, key="text"):
    return embedkit.embed(TEXTS, backbone=str(setup[key].path)).vectors


def embeddings(response):
    assert response.status_code == 200, response.text
    return np.array([d["embedding"] for d in response.json()["data"]])


def test_dimensions_truncates_and_renormalises_as_compact_does(server, setup):
    r = post(server, {"model": "a", "input": TEXTS, "dimensions": 4})
    got = embeddings(r)
    expected = Compact(4).apply(library(setup))
    assert got.shape == (4, 4)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert r.json()["embedkit"] == {"precision": "float32", "dimensions": 4, "calibration": None,
                                    "digest": setup["text"].digest, **TRUNCATE}
    b64 = post(server, {"model": "a", "input": TEXTS[:1], "dimensions": 4, "encoding_format": "base64"})
    import base64

    row = np.frombuffer(base64.b64decode(b64.json()["data"][0]["embedding"]), "<f4")
    np.testing.assert_allclose(row, expected[0], atol=1e-5)
    whole = post(server, {"model": "a", "input": TEXTS, "dimensions": 8})  # D itself: the vectors as they are
    np.testing.assert_allclose(embeddings(whole), library(setup), atol=1e-5)


@pytest.mark.parametrize("dims", [0, -1, "x", 9, 4.0, True, [4]])
def test_bad_dimensions_get_the_typed_422(server, dims):
    r = post(server, {"model": "a", "input": TEXTS[:1], "dimensions": dims})
    assert r.status_code == 422 and r.json()["error"]["code"] == "unsupported_dimensions", r.text


def test_dimensions_for_an_image_backbone_and_on_embed_are_refused(server):
    r = post(server, {"model": "img", "input": "x", "dimensions": 4})
    assert r.status_code == 422 and r.json()["error"]["code"] == "unsupported_dimensions"
    r = post(server, {"model": "a", "texts": TEXTS[:1], "dimensions": 4}, path="/embed")
    assert r.status_code == 422 and r.json()["error"]["code"] == "unsupported_dimensions"
    r = post(server, {"model": "a", "texts": TEXTS[:1], "encoding_format": "int8"}, path="/embed")
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_encoding_format"
    r = post(server, {"model": "a", "input": TEXTS[:1], "encoding_format": "int4"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_encoding_format"


def test_binary_is_packed_sign_bits_equal_to_compact(server, setup):
    r = post(server, {"model": "a", "input": TEXTS, "encoding_format": "binary"})
    got = embeddings(r)
    np.testing.assert_array_equal(got, Compact(precision="binary").apply(library(setup)))
    assert got.shape == (4, 1) and r.json()["embedkit"]["precision"] == "binary"
    r = post(server, {"model": "a", "input": TEXTS, "encoding_format": "binary", "dimensions": 4})
    np.testing.assert_array_equal(embeddings(r), Compact(4, "binary").apply(library(setup)))


def test_int8_and_uint8_use_the_servers_calibration_for_that_backbone(server, setup):
    for fmt in ("int8", "uint8"):
        r = post(server, {"model": "a", "input": TEXTS, "encoding_format": fmt})
        expected = Compact(None, fmt, setup["full"]).apply(library(setup))
        np.testing.assert_array_equal(embeddings(r), expected)
        assert r.json()["embedkit"] == {"precision": fmt, "dimensions": 8, "calibration": setup["full"].digest,
                                        "digest": setup["text"].digest, **TRUNCATE}
    r = post(server, {"model": "a", "input": TEXTS, "encoding_format": "int8", "dimensions": 4})
    np.testing.assert_array_equal(embeddings(r), Compact(4, "int8", setup["four"]).apply(library(setup)))
    assert r.json()["embedkit"]["calibration"] == setup["four"].digest


def test_int8_without_a_calibration_for_that_backbone_or_those_dimensions_is_refused(server):
    r = post(server, {"model": "b", "input": TEXTS[:1], "encoding_format": "int8"})  # the records name backbone a
    assert r.status_code == 422 and r.json()["error"]["code"] == "calibration_required", r.text
    r = post(server, {"model": "a", "input": TEXTS[:1], "encoding_format": "uint8", "dimensions": 6})
    assert r.status_code == 422 and r.json()["error"]["code"] == "calibration_mismatch", r.text
    assert "8, 4" in r.json()["error"]["message"]


def test_no_calibration_at_all_and_a_bad_calibration_file(setup, tmp_path):
    bad = tmp_path / "bad.json"
    record = setup["full"].to_dict()
    record["high"][0] += 1.0  # altered: its sha256 no longer matches
    bad.write_text(json.dumps(record))
    from support import run_cli

    refused = run_cli("serve", "--backbone", str(setup["text"].path), "--calibration", str(bad), "--port", "0")
    assert refused.returncode == 1 and "not a calibration record" in refused.stderr and "sha256" in refused.stderr
    with Server("--backbone", f"a={setup['text'].path}") as plain:
        r = post(plain, {"model": "a", "input": TEXTS[:1], "encoding_format": "int8"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "calibration_required"
        ok = post(plain, {"model": "a", "input": TEXTS, "encoding_format": "binary"})
        np.testing.assert_array_equal(embeddings(ok), Compact(precision="binary").apply(library(setup)))
    assert plain.stop() == 0


def test_the_openai_client_reads_compact_answers(server, setup):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    got = client.embeddings.create(model="a", input=TEXTS, dimensions=4, encoding_format="float")
    np.testing.assert_allclose(np.array([d.embedding for d in got.data]), Compact(4).apply(library(setup)), atol=1e-5)


def test_predict_with_a_head_trained_on_int8_features_quantises_first(server, setup):
    r = post(server, {"model": "intent8", "inputs": TEXTS + CALIBRATION_TEXTS}, path="/predict")
    assert r.status_code == 200, r.text
    got = [p["label"] for p in r.json()["predictions"]]
    X = embedkit.embed(TEXTS + CALIBRATION_TEXTS, backbone=str(setup["text"].path)).vectors
    compact = setup["compact"]
    assert got == setup["inner"].predict(compact.restore(compact.apply(X))).tolist()
    proba = np.array([[p["probabilities"][c] for c in setup["inner"].classes_] for p in r.json()["predictions"]])
    np.testing.assert_allclose(proba, setup["inner"].predict_proba(compact.restore(compact.apply(X))), atol=1e-6)


def test_predict_with_an_embedder_that_makes_int8_rows_feeds_its_head_those_rows(server, setup):
    """A saved Pipeline(Embedder(precision="int8"), head): the head was trained on the Embedder's int8
    rows, so the service must quantise with the Embedder's fitted calibration, never feed floats."""
    r = post(server, {"model": "embedder8", "inputs": TEXTS + CALIBRATION_TEXTS}, path="/predict")
    assert r.status_code == 200, r.text
    got = [p["label"] for p in r.json()["predictions"]]
    pipe = setup["pipe8"]
    assert got == pipe.predict(TEXTS + CALIBRATION_TEXTS).tolist()
    proba = np.array([[p["probabilities"][c] for c in pipe.classes_] for p in r.json()["predictions"]])
    np.testing.assert_allclose(proba, pipe.predict_proba(TEXTS + CALIBRATION_TEXTS), atol=1e-6)


def test_a_precision_field_is_a_typed_422_naming_encoding_format(server):
    r = post(server, {"model": "a", "input": TEXTS[:1], "precision": "int8"})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_encoding_format" and error["param"] == "precision"
    assert "encoding_format" in error["message"]


def test_image_backbones_compact_vectors_are_a_library_feature_and_the_refusal_says_so(server, setup):
    for path, body in (("/v1/embeddings", {"model": "img", "input": "x", "dimensions": 4}),
                       ("/embed", {"model": "img", "images": ["aGVsbG8="], "dimensions": 4})):
        r = post(server, body, path=path)
        assert r.status_code == 422 and r.json()["error"]["code"] == "unsupported_dimensions", r.text
        assert "library and command-line feature" in r.json()["error"]["message"]
    from tiny import png

    rows = embedkit.embed([png(1), png(2)], backbone=str(setup["image"].path), dimensions=4, precision="binary")
    assert rows.vectors.shape == (2, 1) and rows.compact == {"precision": "binary", "dimensions": 4}


def test_a_chunking_server_names_its_policy_refuses_what_never_fits_and_uses_calibrations_of_their_backbone(
        setup, tmp_path):
    text, other = setup["text"], setup["other"]
    calib = embedkit.embed(CALIBRATION_TEXTS, backbone=str(text.path), long="chunk", chunk_overlap=8).vectors
    # bare records: one whose source names backbone a (a store namespace of chunked texts), one naming nothing
    named = Calibration.fit(calib, source=f"store:{text.name}/{text.digest[:12]}.chunk-o8-m64")
    anonymous = Calibration.fit(Compact(4).truncate(calib), source="my own vectors")
    (tmp_path / "named.json").write_text(json.dumps(named.to_dict()))
    (tmp_path / "anon.json").write_text(json.dumps(anonymous.to_dict()))
    with Server("--backbone", f"a={text.path}", "--backbone", f"b={other.path}", "--long", "chunk",
                "--chunk-overlap", "8", "--max-queue", "8", "--calibration", str(tmp_path / "named.json"),
                "--calibration", str(tmp_path / "anon.json")) as s:
        r = post(s, {"model": "a", "input": TEXTS, "encoding_format": "int8"})
        assert r.status_code == 200, r.text
        assert r.json()["embedkit"] == {"precision": "int8", "dimensions": 8, "calibration": named.digest,
                                        "digest": text.digest, "long": "chunk", "chunk_overlap": 8, "max_chunks": 64}
        r = post(s, {"model": "b", "input": TEXTS, "encoding_format": "int8"})  # a's calibration is never b's
        assert r.status_code == 422 and r.json()["error"]["code"] == "calibration_mismatch", r.text
        r = post(s, {"model": "b", "input": TEXTS, "encoding_format": "int8", "dimensions": 4})
        assert r.status_code == 200 and r.json()["embedkit"]["calibration"] == anonymous.digest, r.text
        # one text of ~20 windows can never fit a queue of 8: 413, not a 429 that retrying never cures
        r = post(s, {"model": "a", "input": "the card I ordered has not arrived " * 150})
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_windows", r.text
        assert "Retry-After" not in r.headers and "--max-queue" in r.json()["error"]["message"]
        r = post(s, {"model": "a", "input": [f"text {i}" for i in range(9)]})
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_windows", r.text
        r = post(s, {"model": "a", "texts": [f"text {i}" for i in range(9)]}, path="/embed")
        assert r.status_code == 413, r.text
        assert s.stop() == 0
        log = s.stderr
    assert "names no artifact" in log and "my own vectors" in log  # the anonymous record, said at start-up
