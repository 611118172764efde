"""The text input policy, through the public embed() API and real ONNX Runtime sessions."""
import numpy as np
import pytest

import embedkit


@pytest.fixture(scope="module")
def encoder(minilm):
    return embedkit.TextEncoder(minilm, threads=1)


def test_every_item_accounted_for(encoder):
    items = ["a normal sentence", "", "   ", None, 3.5, float("nan"), b"caf\xc3\xa9 bytes", b"\xff\xfe\x00",
             "lone \udcff surrogate", ["a", "list"], "another sentence"]
    result = encoder.encode(items)
    assert result.vectors.shape == (len(items), 384)
    assert result.stats.total == len(items)
    assert result.stats.ok + result.stats.failed == len(items)
    codes = {e.index: e.code for e in result.errors}
    assert codes == {3: "not_text", 4: "not_text", 5: "not_text", 7: "invalid_utf8", 8: "invalid_utf8", 9: "not_text"}
    assert result.stats.empty == 2
    assert np.isnan(result.vectors[list(codes)]).all()
    assert result.ok.tolist() == [i not in codes for i in range(len(items))]
    for e in result.errors:  # messages describe, never echo the content
        assert "surrogate" not in e.message or e.code == "invalid_utf8"
        assert "list" not in e.message or e.message.endswith("list")


def test_utf8_bytes_equal_the_string(encoder):
    got = encoder.encode([b"caf\xc3\xa9 au lait", "café au lait"]).vectors
    np.testing.assert_array_equal(got[0], got[1])


def test_empty_policy_error(minilm):
    enc = embedkit.TextEncoder(minilm, threads=1, empty="error")
    result = enc.encode(["", " \t\n", "fine"])
    assert [(e.index, e.code) for e in result.errors] == [(0, "empty_text"), (1, "empty_text")]
    assert result.ok.tolist() == [False, False, True]
    with pytest.raises(ValueError):
        embedkit.TextEncoder(minilm, empty="skip")


def test_truncation_counted_and_refusable(minilm):
    long = "word " * 2000
    short = "a short one"
    result = embedkit.TextEncoder(minilm, threads=1).encode([long, short])
    assert result.stats.truncated == 1 and not result.errors
    strict = embedkit.TextEncoder(minilm, threads=1, truncate=False).encode([long, short])
    assert [(e.index, e.code) for e in strict.errors] == [(0, "too_long")]
    np.testing.assert_allclose(strict.vectors[1], result.vectors[1], atol=1e-6)


def test_truncated_text_embeds_like_its_first_tokens(minilm):
    words = [f"w{i}" for i in range(400)]
    enc = embedkit.TextEncoder(minilm, threads=1)
    full = enc.encode([" ".join(words)]).vectors[0]
    ids = enc.tokenizer.tokenizer.encode(" ".join(words)).ids
    assert len(ids) == 256  # max length 256 including [CLS] and [SEP]
    prefix = enc.tokenizer.tokenizer.decode(ids[1:-1])
    np.testing.assert_allclose(enc.encode([prefix]).vectors[0], full, atol=1e-4)


def test_huge_string_is_handled(encoder):
    result = encoder.encode(["word " * 1_000_000, "ok"])  # 5 MB of text
    assert result.stats.truncated == 1 and result.ok.all()
