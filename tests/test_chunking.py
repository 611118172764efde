"""The long-text policy ``long="chunk"``: windows cut at token boundaries, pooled by token count.

Real ONNX Runtime sessions through the public API: a tiny random-weight text backbone
(tests/tiny.py: the real MiniLM tokenizer, ``max_length=64``, so 62 content tokens a window) for
the arithmetic, the real MiniLM for bit-identity, the CLI and a real ``embedkit serve`` on
127.0.0.1. Hand computations use the tokenizer file and the artifact's ``model.onnx`` directly.
"""
from __future__ import annotations

import pickle
import time

import numpy as np
import pytest
from support import run_cli

torch = pytest.importorskip("torch")
from tiny import TOKENIZER, Pooled, TinyConv, text_backbone  # noqa: E402

import embedkit  # noqa: E402
from embedkit.inputs.text import TextTokenizer  # noqa: E402

CLS, SEP = 101, 102
C = 62  # content tokens per window: max_length 64 less [CLS] and [SEP]


@pytest.fixture(scope="module")
def tiny():
    return embedkit.export(text_backbone("tiny-chunk-text", lambda: Pooled(dim=8)))


@pytest.fixture(scope="module")
def tiny_raw():
    """The same network declared ``normalize=False``: pooled vectors are not renormalised."""
    return embedkit.export(embedkit.Backbone(
        name="tiny-chunk-raw", modality="text", dim=8, weights="random", license="MIT",
        preprocess=embedkit.TextPreprocess(tokenizer=TOKENIZER, max_length=64, normalize=False),
        builder=lambda: Pooled(dim=8),
    ))


def _bare():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(TOKENIZER)
    tok.no_padding()
    tok.no_truncation()
    return tok


@pytest.fixture(scope="module")
def words():
    """Vocabulary words that are one token each (checked), so token spans are word spans."""
    tok = _bare()
    vocab = sorted((i, w) for w, i in tok.get_vocab().items() if w.isalpha() and w.isascii() and len(w) >= 4)
    picked = [w for i, w in vocab if i > 2000 and tok.encode(w, add_special_tokens=False).ids == [i]][:600]
    assert len(picked) == 600
    return picked


def _session(artifact):
    import onnxruntime as ort

    return ort.InferenceSession(str(artifact.onnx_path), providers=["CPUExecutionProvider"])


def _run_one(session, ids):
    feeds = {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
    return session.run(None, feeds)[0][0].astype(np.float32)


# -- windows ------------------------------------------------------------------------------------
def test_windows_of_a_text_of_three_and_a_half_windows_match_a_hand_cut(tiny, words):
    text = " ".join(words[:190])  # 190 content tokens: 62 + 52 + 52 + 24 new ones, overlap 10
    content = _bare().encode(text, add_special_tokens=False).ids
    assert len(content) == 190
    expected = [[CLS, *content[0:62], SEP], [CLS, *content[52:114], SEP], [CLS, *content[104:166], SEP],
                [CLS, *content[156:190], SEP]]
    out = TextTokenizer(tiny.preprocess, long="chunk", chunk_overlap=10).encode([text])
    assert out.ids == expected
    assert out.indices == [0, 0, 0, 0]
    assert out.windows.chunk == [0, 1, 2, 3]
    assert out.windows.token_spans == [(0, 62), (52, 114), (104, 166), (156, 190)]
    for (s, e), (a, b) in zip(out.windows.token_spans, out.windows.char_spans):
        assert text[a:b] == " ".join(words[s:e])  # one token a word: the passage of the window
    # window 0 is exactly the truncated text
    assert out.ids[0] == TextTokenizer(tiny.preprocess).encode([text]).ids[0]
    assert (out.stats.chunked, out.stats.chunks, out.stats.tokens, out.stats.truncated) == (1, 4, 64 * 3 + 36, 0)


def test_overlap_zero_and_exact_fits(tiny, words):
    tok = TextTokenizer(tiny.preprocess, long="chunk", chunk_overlap=0)
    fits, one_more = " ".join(words[:62]), " ".join(words[:63])
    out = tok.encode([fits, one_more])
    assert out.indices == [0, 1, 1]
    assert out.windows.token_spans == [(0, 62), (0, 62), (62, 63)]
    assert [len(x) for x in out.ids] == [64, 64, 3]
    assert (out.stats.chunked, out.stats.chunks) == (1, 3)


def test_char_spans_index_the_original_text_with_non_ascii(tiny):
    text = "café naïve 日本語 " * 40  # accents stripped and CJK split by the tokenizer: offsets still index `text`
    out = TextTokenizer(tiny.preprocess, long="chunk", chunk_overlap=5).encode([text, text.encode()])
    assert out.stats.chunked == 2
    spans = [s for i, s in zip(out.indices, out.windows.char_spans) if i == 0]
    assert spans == [s for i, s in zip(out.indices, out.windows.char_spans) if i == 1]  # bytes: its decoding
    assert spans[0][0] == 0 and spans[-1][1] == len(text.rstrip())
    assert all(text[a:b] == text[a:b].strip() and text[a:b] for a, b in spans)


# -- pooling ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny", "tiny_raw"])
def test_pooled_vector_equals_the_weighted_mean_of_windows_run_by_hand(name, request, words):
    artifact = request.getfixturevalue(name)
    text = " ".join(words[:190])
    content = _bare().encode(text, add_special_tokens=False).ids
    windows = [[CLS, *content[s:e], SEP] for s, e in ((0, 62), (52, 114), (104, 166), (156, 190))]
    session = _session(artifact)
    rows = np.stack([_run_one(session, w) for w in windows])
    weights = np.asarray([len(w) for w in windows], np.float64)
    want = (rows.astype(np.float64) * weights[:, None]).sum(0) / weights.sum()
    if artifact.preprocess.normalize:
        want = want / np.linalg.norm(want)
    items = ["a short text", text, "", "another short one"]
    got = embedkit.TextEncoder(artifact, threads=1, long="chunk", chunk_overlap=10).encode(items, chunk_rows=True)
    assert got.ok.all() and got.vectors.dtype == np.float32
    np.testing.assert_allclose(got.vectors[1], want, rtol=1e-5, atol=1e-6)
    assert bool(artifact.preprocess.normalize) == bool(np.isclose(np.linalg.norm(got.vectors[1]), 1.0, atol=1e-5))
    # per-window rows: every window of every item, in order, with its own vector
    c = got.chunks
    assert c.item.tolist() == [0, 1, 1, 1, 1, 2, 3] and c.chunk.tolist() == [0, 0, 1, 2, 3, 0, 0]
    assert c.vectors.shape == (7, 8) and c.vectors.dtype == np.float32
    assert c.item.dtype == c.chunk.dtype == c.token_span.dtype == c.char_span.dtype == np.int64
    assert c.token_span[1:5].tolist() == [[0, 62], [52, 114], [104, 166], [156, 190]]
    np.testing.assert_allclose(c.vectors[1:5], rows, rtol=1e-5, atol=1e-6)
    for k in (0, 5, 6):  # a text within the window: its one row is its vector
        np.testing.assert_array_equal(c.vectors[k], got.vectors[c.item[k]])
    assert c.char_span[5].tolist() == [0, 0]  # the empty text


def test_short_texts_are_bit_identical_to_truncate(minilm):
    from embedkit.inputs.text import pad, token_batches

    texts = ["the card was declined", "how do I top up?", "a", "", "where is my refund " * 20, "ok"]
    chunked = embedkit.TextEncoder(minilm, threads=1, long="chunk").encode(texts)
    truncated = embedkit.TextEncoder(minilm, threads=1).encode(texts)
    np.testing.assert_array_equal(chunked.vectors, truncated.vectors)
    # ... and both are the runtime's own rows, untouched (one batch: the same padding as run here)
    enc = embedkit.TextEncoder(minilm, threads=1, long="chunk", batch_tokens=100_000)
    ids = enc.tokenizer.encode(texts).ids
    (batch,) = token_batches([len(x) for x in ids], enc.batch_tokens)
    direct = np.empty((len(texts), 384), np.float32)
    direct[batch] = enc.runtime.run(pad([ids[j] for j in batch]))
    np.testing.assert_array_equal(enc.encode(texts).vectors, direct)
    assert (chunked.stats.chunked, chunked.stats.chunks, chunked.stats.truncated) == (0, len(texts), 0)
    assert chunked.stats.tokens == truncated.stats.tokens


def test_stats_count_chunked_texts_windows_and_failures(tiny, words):
    items = [" ".join(words[:62]), " ".join(words[:63]), " ".join(words[:190]), None, "x"]
    result = embedkit.TextEncoder(tiny, threads=1, long="chunk", chunk_overlap=10).encode(items)
    s = result.stats
    # windows: 1 + 2 (63 = 62 + 1) + 4 + 1
    assert (s.total, s.ok, s.failed, s.chunked, s.chunks, s.truncated) == (5, 4, 1, 2, 8, 0)
    assert s.tokens == 64 + (64 + 13) + (64 * 3 + 36) + 3
    assert [(e.index, e.code) for e in result.errors] == [(3, "not_text")]
    assert result.ok.tolist() == [True, True, True, False, True]


def test_error_policy_and_truncate_false_agree(tiny, words):
    long = " ".join(words[:100])
    for enc in (embedkit.TextEncoder(tiny, long="error"), embedkit.TextEncoder(tiny, truncate=False)):
        result = enc.encode([long, "short"])
        assert [(e.index, e.code) for e in result.errors] == [(0, "too_long")]
        assert enc.long == "error"


# -- bounds -------------------------------------------------------------------------------------
def test_max_chunks_bounds_windows_and_counts_truncated(tiny, words):
    text = " ".join(words[:600])  # 600 tokens: 12 windows at overlap 10 (step 52)
    full = TextTokenizer(tiny.preprocess, long="chunk", chunk_overlap=10).encode([text])
    assert full.stats.chunks == 12 and full.stats.truncated == 0
    capped = TextTokenizer(tiny.preprocess, long="chunk", chunk_overlap=10, max_chunks=3).encode([text])
    assert capped.ids == full.ids[:3] and capped.stats.truncated == 1 and capped.stats.chunks == 3
    vector = embedkit.TextEncoder(tiny, threads=1, long="chunk", chunk_overlap=10, max_chunks=3).encode([text])
    # the vector of the capped text is the vector of the text those 3 windows cover
    covered = " ".join(words[: 62 + 2 * 52])
    again = embedkit.TextEncoder(tiny, threads=1, long="chunk", chunk_overlap=10).encode([covered])
    np.testing.assert_allclose(vector.vectors[0], again.vectors[0], rtol=1e-6, atol=1e-7)


def test_a_huge_text_is_cut_before_tokenising(tiny):
    huge = "word " * 2_000_000  # 10 MB: tokenised whole it would take tens of seconds and gigabytes
    enc = embedkit.TextEncoder(tiny, threads=1, long="chunk", chunk_overlap=10, max_chunks=4)
    start = time.perf_counter()
    result = enc.encode([huge], chunk_rows=True)
    seconds = time.perf_counter() - start
    assert result.stats.truncated == 1 and result.stats.chunks == 4 and result.ok.all()
    assert result.chunks.char_span[-1, 1] < 1100  # 62 + 3 * 52 words of 5 characters
    same = enc.encode(["word " * 300]).vectors[0]  # the cut does not change the windows
    np.testing.assert_array_equal(result.vectors[0], same)
    assert seconds < 5, seconds


# -- options ------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [
    {"chunk_overlap": -1}, {"chunk_overlap": 31}, {"chunk_overlap": 62}, {"chunk_overlap": True},
    {"chunk_overlap": 2.0}, {"max_chunks": 0}, {"max_chunks": 1.5},
])
def test_bad_overlap_or_max_chunks_is_a_value_error(tiny, options):
    with pytest.raises(ValueError, match="chunk_overlap|max_chunks"):
        embedkit.TextEncoder(tiny, long="chunk", **options)


def test_contradictions_and_unknown_policies_are_value_errors(tiny):
    assert embedkit.TextEncoder(tiny, long="chunk", chunk_overlap=30).long == "chunk"  # the largest overlap
    for options in ({"long": "chunk", "truncate": False}, {"long": "error", "truncate": True}, {"long": "split"},
                    {"long": None}):
        with pytest.raises(ValueError):
            embedkit.TextEncoder(tiny, **options)
    assert embedkit.TextEncoder(tiny, long="chunk", chunk_overlap=10, truncate=True).long == "chunk"  # old Embedders
    with pytest.raises(ValueError, match="chunk_rows"):
        embedkit.TextEncoder(tiny).encode(["a"], chunk_rows=True)


def test_image_backbones_refuse_long_with_a_type_error():
    image = embedkit.export(embedkit.Backbone(
        name="tiny-chunk-image", modality="image", dim=8, weights="random", license="MIT",
        preprocess=embedkit.ImagePreprocess(crop=(32, 32), resize=32), builder=TinyConv,
    ))
    for option in ({"long": "chunk"}, {"chunk_overlap": 8}):
        with pytest.raises(TypeError, match="do not apply to image backbones"):
            embedkit.embed([np.zeros((32, 32, 3), np.uint8)], backbone=str(image.path), **option)


def test_embed_and_the_encoder_identity(tiny, words):
    text = " ".join(words[:190])
    got = embedkit.embed([text], backbone=str(tiny.path), long="chunk", chunk_overlap=10)
    want = embedkit.TextEncoder(tiny, long="chunk", chunk_overlap=10).encode([text])
    np.testing.assert_array_equal(got.vectors, want.vectors)
    assert got.stats.chunked == 1
    assert embedkit.TextEncoder(tiny).identity() == {}
    assert embedkit.TextEncoder(tiny, long="chunk", chunk_overlap=10).identity() == {
        "long": "chunk", "chunk_overlap": 10, "max_chunks": 64}


def test_embedder_params_clone_and_pickle(tiny, words):
    from sklearn.base import clone

    text = " ".join(words[:190])
    est = embedkit.Embedder(str(tiny.path), long="chunk", chunk_overlap=10, max_chunks=3)
    params = est.get_params()
    assert (params["long"], params["chunk_overlap"], params["max_chunks"]) == ("chunk", 10, 3)
    twin = clone(est)
    assert twin.get_params() == params
    X = twin.fit().transform([text, "short"])
    want = embedkit.TextEncoder(tiny, long="chunk", chunk_overlap=10, max_chunks=3).encode([text, "short"]).vectors
    np.testing.assert_array_equal(X, want)
    twin.set_params(max_chunks=64, chunk_overlap=0).fit()
    X0 = twin.transform([text])
    np.testing.assert_array_equal(X0, embedkit.TextEncoder(tiny, long="chunk", chunk_overlap=0).encode([text]).vectors)
    assert not np.array_equal(X0[0], X[0])
    restored = pickle.loads(pickle.dumps(twin))
    np.testing.assert_array_equal(restored.transform([text]), X0)
    # an Embedder pickled before these parameters existed reads as long="truncate"
    old = embedkit.Embedder(str(tiny.path)).fit()
    for name in ("long", "chunk_overlap", "max_chunks"):
        del old.__dict__[name]
    revived = pickle.loads(pickle.dumps(old))
    assert revived.get_params()["long"] == "truncate"
    np.testing.assert_array_equal(revived.transform([text]), embedkit.TextEncoder(tiny).encode([text]).vectors)


# -- CLI and service ----------------------------------------------------------------------------
def test_cli_embed_long_chunk(tiny, words, tmp_path):
    src = tmp_path / "texts.txt"
    lines = [" ".join(words[:190]), "a short line", " ".join(words[:600])]
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.npy"
    done = run_cli("embed", str(tiny.path), str(src), "--out", str(out), "--long", "chunk", "--chunk-overlap", "10",
                   "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "3 texts: 3 ok, 0 failed, 0 truncated, 0 empty, 2 chunked (17 windows)" in done.stderr
    want = embedkit.embed(lines, backbone=str(tiny.path), long="chunk", chunk_overlap=10).vectors
    np.testing.assert_array_equal(np.load(out), want)
    refused = run_cli("embed", str(tiny.path), str(src), "--out", str(tmp_path / "x.npy"), "--chunk-overlap", "10")
    assert refused.returncode == 1 and "--chunk-overlap and --max-chunks apply with --long chunk" in refused.stderr
    too_wide = run_cli("embed", str(tiny.path), str(src), "--out", str(tmp_path / "y.npy"), "--long", "chunk")
    assert too_wide.returncode == 1 and "chunk_overlap must be" in too_wide.stderr  # 32 > 62 / 2
    assert "Traceback" not in too_wide.stderr
    helped = run_cli("embed", "--help")
    assert "--long {truncate,chunk,error}" in helped.stdout and "default truncate" in helped.stdout


def test_serve_long_chunk_equals_the_library(tiny, words):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from serving import Server

    texts = [" ".join(words[:190]), "short", " ".join(words[:63])]
    want = embedkit.embed(texts, backbone=str(tiny.path), long="chunk", chunk_overlap=10).vectors
    truncated = embedkit.embed(texts, backbone=str(tiny.path)).vectors
    with Server("--backbone", f"tiny={tiny.path}", "--long", "chunk", "--chunk-overlap", "10") as server:
        body = httpx.post(server.url + "/embed", json={"texts": texts}, timeout=30).json()
        openai = httpx.post(server.url + "/v1/embeddings", json={"input": texts}, timeout=30).json()
    assert body["ok"] == [True, True, True]
    np.testing.assert_allclose(np.asarray(body["data"], np.float32), want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray([d["embedding"] for d in openai["data"]], np.float32), want,
                               rtol=1e-6, atol=1e-7)
    assert body["usage"]["total_tokens"] == (64 * 3 + 36) + 3 + (64 + 13)  # every window's tokens
    assert not np.allclose(want[0], truncated[0])  # the service did chunk
