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


INVISIBLE_ONLY = ["\u200b", "\u2060", "\u00ad", "\ufeff", "\x00", "\u200b \u2060\t\ufeff", "\u3164", "\u202e\u200d"]


def test_texts_of_only_invisible_characters_count_as_empty(minilm):
    items = INVISIBLE_ONLY + ["visible\u200b", "\x00a"]
    strict = embedkit.TextEncoder(minilm, threads=1, empty="error").encode(items)
    assert [(e.index, e.code) for e in strict.errors] == [(i, "empty_text") for i in range(len(INVISIBLE_ONLY))]
    assert strict.ok.tolist() == [False] * len(INVISIBLE_ONLY) + [True, True]
    lenient = embedkit.TextEncoder(minilm, threads=1).encode(items)
    assert lenient.stats.empty == len(INVISIBLE_ONLY) and lenient.ok.all()
    # the same rule for bytes (a .txt line) as for str
    assert embedkit.TextEncoder(minilm, threads=1, empty="error").encode([b"\xe2\x80\x8b"]).errors[0].code == "empty_text"


def test_the_invisible_class_matches_unicode_categories():
    import sys
    import unicodedata

    from embedkit.inputs.text import is_blank

    fillers = {0x115F, 0x1160, 0x3164, 0xFFA0}
    wrong = [cp for cp in range(sys.maxunicode + 1)
             if is_blank(chr(cp)) != (unicodedata.category(chr(cp)) in ("Cc", "Cf", "Zs", "Zl", "Zp")
                                      or chr(cp).isspace() or cp in fillers)]
    assert wrong == []


BIG_LINE = r"""
import json, resource, sys, time
import embedkit
from embedkit.inputs.sources import iter_items
path, route = sys.argv[1:]
enc = embedkit.TextEncoder(embedkit.export("minilm-l6"), threads=1)
enc.encode(["warm up"])
if route.startswith("file"):  # the .txt reader, as embed and extract read it
    items = [item.payload for item in iter_items(path, "text")] if route == "file" else [b"short"]
else:  # a 50 MB str in memory, as embed() and Embedder get it
    line = open(path, encoding="utf-8").readline().rstrip("\n")
    items = [line] if route == "memory" else ["short"]
start = time.perf_counter()
result = enc.encode(items)
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": time.perf_counter() - start, "truncated": result.stats.truncated,
                  "vector": result.vectors[0].tolist()}))
"""


def test_a_fifty_megabyte_line_costs_what_its_kept_tokens_cost(minilm, tmp_path):
    import json
    import subprocess
    import sys

    words = "".join(f"w{i % 997} " for i in range(1000))
    line = words * (50_000_000 // len(words))  # 50 MB, one line
    (tmp_path / "big.txt").write_text(line + "\nshort\n")
    runs = {}
    for route in ("file", "file-baseline", "memory", "memory-baseline"):  # peak RSS of each process, by getrusage
        done = subprocess.run([sys.executable, "-c", BIG_LINE, str(tmp_path / "big.txt"), route],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        runs[route] = json.loads(done.stdout.splitlines()[-1])
    expected = embedkit.TextEncoder(minilm, threads=1).encode([line[:20_000]]).vectors[0]  # ~4,000 tokens
    for route in ("file", "memory"):
        got = runs[route]
        assert got["truncated"] == 1
        np.testing.assert_allclose(got["vector"], expected, atol=1e-5)  # the full text's first 256 tokens
        grown = got["peak_mb"] - runs[f"{route}-baseline"]["peak_mb"]
        assert grown < 300, (route, grown)  # was ~7 GB
        assert got["seconds"] < 30, got["seconds"]  # was ~2 minutes


def test_a_text_made_of_one_huge_word_is_bounded_and_truncated(encoder):
    result = encoder.encode(["x" * 10_000_000, "a sentence " * 100_000 + "end"])
    assert result.ok.all() and result.stats.truncated == 2


def test_bounded_cut_keeps_the_first_tokens(minilm):
    tok = embedkit.TextEncoder(minilm, threads=1).tokenizer
    text = " ".join(f"token{i}" for i in range(20_000))
    head = tok.bounded(text)
    assert len(head) < len(text) and text.startswith(head)
    full, cut = tok.tokenizer.encode(text), tok.tokenizer.encode(head)
    assert full.ids == cut.ids  # truncation at max_length: the same 256 tokens
    assert tok.bounded("short text") == "short text"
    # a text without spaces (CJK) is cut later, but still cut and still exact
    cjk = "漢字" * 200_000
    assert tok.tokenizer.encode(tok.bounded(cjk)).ids == tok.tokenizer.encode(cjk).ids
