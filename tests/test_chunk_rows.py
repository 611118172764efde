"""Per-chunk rows (issue 25, item 1): ``extract(..., long="chunk", chunk_rows=True)`` stores every window
of a chunked text as a row of its own (parent id, chunk, token and character spans), in a namespace
that never answers a pooled request, exactly once across ``kill -9``; ``index`` / ``search`` answer
with the parent, chunk and passage.

Real ONNX Runtime sessions through the public API and the CLI, on the tiny random-weight text
backbone of the feature-store tests (tests/store_support.py: the real MiniLM tokenizer,
``max_length=64``, so 62 content tokens a window). Texts are made of words that are one token
each, so a window's token span is a span of words and its passage can be written down by hand.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from store_support import tiny_fixture  # noqa: F401 (the tiny fixture)
from support import kill_when, run_cli

import embedkit
from embedkit.errors import StoreError, UsageError
from embedkit.features.store import FeatureStore
from embedkit.inputs.files import content_id

OVERLAP = 10  # windows of 62 content tokens start 52 tokens apart


@pytest.fixture(scope="module")
def words():
    """Vocabulary words that are one token each (checked), so token spans are word spans."""
    from tiny import TOKENIZER
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(TOKENIZER)
    tok.no_padding()
    tok.no_truncation()
    vocab = sorted((i, w) for w, i in tok.get_vocab().items() if w.isalpha() and w.isascii() and len(w) >= 4)
    picked = [w for i, w in vocab if i > 2000 and tok.encode(w, add_special_tokens=False).ids == [i]][:600]
    assert len(picked) == 600
    return picked


def texts_of(words: list[str]) -> list[str]:
    """Four windows, one window, two windows, one short text: 7 rows with overlap 10."""
    return [" ".join(words[:190]), "a short text", " ".join(words[200:300]), " ".join(words[300:330])]


def windows_of(n: int) -> list[tuple[int, int]]:
    """The content-token spans of a text of ``n`` one-token words (62 a window, 52 apart)."""
    if n <= 62:
        return [(0, n)]
    spans, start = [], 0
    while True:
        spans.append((start, min(start + 62, n)))
        if start + 62 >= n:
            return spans
        start += 62 - OVERLAP


def by_row(rows) -> dict[str, tuple]:
    return {str(i): (np.asarray(v), int(c), tuple(t), tuple(s))
            for i, v, c, t, s in zip(rows.ids, rows.vectors, rows.chunk, rows.token_span, rows.char_span)}


def test_rows_are_the_encoders_chunk_rows_bit_for_bit_and_cut_the_passage(tiny, words, tmp_path: Path):
    texts = texts_of(words)
    report = embedkit.extract(texts, tiny, str(tmp_path), long="chunk", chunk_overlap=OVERLAP, chunk_rows=True)
    assert report.ok == 4 and report.chunk_rows == 4 + 1 + 2 + 1
    assert Path(report.rows_namespace).name == f"{tiny.digest}.chunk-o{OVERLAP}-m64.rows"
    rows = FeatureStore(tmp_path).chunk_rows(tiny.name)
    assert len(rows) == 8 and len(set(rows.ids.tolist())) == 8
    assert rows.vectors.dtype == np.float32 and rows.vectors.shape == (8, tiny.dim)
    assert rows.token_span.dtype == rows.char_span.dtype == rows.chunk.dtype == np.int64
    encoder = embedkit.encoder_for(tiny, long="chunk", chunk_overlap=OVERLAP)
    direct = encoder.encode(texts, chunk_rows=True).chunks
    stored = by_row(rows)
    for m in range(len(direct)):
        parent = content_id(texts[direct.item[m]].encode())
        vector, chunk, token_span, char_span = stored[f"{parent}#{direct.chunk[m]}"]
        assert np.array_equal(vector, direct.vectors[m])  # bit for bit
        assert (chunk, token_span, char_span) == (direct.chunk[m], tuple(direct.token_span[m]), tuple(direct.char_span[m]))
    # each row names its parent; its spans cut the window's words out of the parent's text
    for k, text in enumerate(texts):
        parent = content_id(text.encode())
        mine = sorted((c, t, s) for _, c, t, s in (stored[i] for i in stored if i.rpartition("#")[0] == parent))
        n = len(text.split())
        assert [t for _, t, _ in mine] == windows_of(n) and [c for c, _, _ in mine] == list(range(len(mine)))
        for _, (t0, t1), (c0, c1) in mine:
            assert text[c0:c1] == " ".join(text.split()[t0:t1])
    assert set(rows.parent.tolist()) == {content_id(t.encode()) for t in texts}
    # the store's plain reader agrees; pooled vectors are the encoder's, as without chunk_rows
    ids, X = FeatureStore(tmp_path).load(tiny.name, long="chunk", chunk_rows=True)
    assert sorted(ids.tolist()) == sorted(rows.ids.tolist())
    ids, X = FeatureStore(tmp_path).load(tiny.name, long="chunk")
    pooled = dict(zip(ids.tolist(), np.asarray(X)))
    again = encoder.encode(texts).vectors
    for k, text in enumerate(texts):
        assert np.array_equal(pooled[content_id(text.encode())], again[k])


def test_rows_never_answer_a_pooled_request_nor_the_reverse(tiny, words, tmp_path: Path):
    texts = texts_of(words)
    both, pooled_only = tmp_path / "both", tmp_path / "pooled"
    embedkit.extract(texts, tiny, str(both), long="chunk", chunk_overlap=OVERLAP, chunk_rows=True)
    embedkit.extract(texts, tiny, str(pooled_only), long="chunk", chunk_overlap=OVERLAP)
    fs = FeatureStore(both)
    assert fs.find(tiny.name, long="chunk").tag == f"chunk-o{OVERLAP}-m64"
    assert fs.find(tiny.name, long="chunk", chunk_rows=True).tag == f"chunk-o{OVERLAP}-m64.rows"
    assert all("#" not in i for i in fs.load(tiny.name, long="chunk")[0].tolist())
    with pytest.raises(StoreError, match="no features"):
        fs.find(tiny.name)  # nor a truncated request
    with pytest.raises(StoreError, match="no features"):
        FeatureStore(pooled_only).find(tiny.name, long="chunk", chunk_rows=True)
    with pytest.raises(StoreError, match="no features"):
        FeatureStore(pooled_only).chunk_rows(tiny.name)
    # a store holding the rows alone does not answer a pooled request with them
    shutil.rmtree(fs.find(tiny.name, long="chunk").path)
    with pytest.raises(StoreError, match="chunk_rows=True"):
        _find_head_namespace(both, tiny.name)
    with pytest.raises(StoreError, match="no features"):
        fs.find(tiny.name, long="chunk")
    # a rows shard copied into a pooled namespace is refused: same digest, dtype and width, other variant
    rows_ns = fs.find(tiny.name, long="chunk", chunk_rows=True)
    target = FeatureStore(pooled_only).find(tiny.name, long="chunk")
    shard = next((rows_ns.path / "shards").glob("*.arrow"))
    shutil.copy(shard, target.path / "shards" / shard.name)
    shutil.copy(rows_ns.path / "commits" / f"{shard.stem}.json", target.path / "commits" / f"{shard.stem}.json")
    with pytest.raises(StoreError, match=f"variant chunk-o{OVERLAP}-m64.rows, not chunk-o{OVERLAP}-m64"):
        FeatureStore(pooled_only).load(tiny.name, long="chunk")
    # chunk_rows without long="chunk" is a usage error, before any work
    with pytest.raises(UsageError, match="long='chunk'"):
        embedkit.extract(texts, tiny, str(tmp_path / "never"), chunk_rows=True)
    assert not (tmp_path / "never").exists()
    with pytest.raises(UsageError, match="long='chunk'"):
        fs.find(tiny.name, chunk_rows=True)
    with pytest.raises(UsageError, match="float32"):
        fs.find(tiny.name, long="chunk", chunk_rows=True, precision="int8")


def _find_head_namespace(store: Path, name: str):
    """What a head or an index asks for when it wants pooled vectors of chunked texts."""
    from embedkit.heads.namespaces import find

    return find(store, name, long="chunk")


def test_a_crash_between_the_rows_and_the_pooled_commit_recomputes_the_job_and_serves_each_row_once(
        tiny, words, tmp_path: Path):
    texts = [" ".join(words[k:k + 80 + k]) for k in range(0, 120, 10)]  # 12 texts of 2-3 windows
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    options = dict(long="chunk", chunk_overlap=OVERLAP, chunk_rows=True, shard_size=4)
    embedkit.extract(texts, tiny, str(clean), **options)
    embedkit.extract(texts, tiny, str(crashed), **options)
    # the state kill -9 leaves after a job's rows were committed and before its pooled vectors were
    pooled = FeatureStore(crashed).find(tiny.name, long="chunk")
    last = sorted((pooled.path / "commits").glob("*.json"))[-1]
    (pooled.path / "shards" / f"{last.stem}.arrow").unlink()
    last.unlink()
    report = embedkit.extract(texts, tiny, str(crashed), **options)
    assert (report.computed, report.cached) == (4, 8) and report.chunk_rows > 0
    a, b = FeatureStore(clean).chunk_rows(tiny.name), FeatureStore(crashed).chunk_rows(tiny.name)
    assert len(b.ids) == len(set(b.ids.tolist())) == len(a.ids)  # every row once, though committed twice
    sa, sb = by_row(a), by_row(b)
    assert sa.keys() == sb.keys()
    for row in sa:
        assert np.array_equal(sa[row][0], sb[row][0]) and sa[row][1:] == sb[row][1:]


def test_a_recomputed_or_failed_parent_leaves_no_stale_window(tiny, words, tmp_path: Path):
    source = tmp_path / "items.jsonl"

    def write(texts: dict[str, str]) -> str:
        source.write_text("".join(json.dumps({"key": k, "text": t}) + "\n" for k, t in texts.items()))
        return str(source)

    long, short = " ".join(words[:190]), " ".join(words[400:420])
    options = dict(id_column="key", long="chunk", chunk_overlap=OVERLAP, chunk_rows=True)
    embedkit.extract(write({"a": long, "b": long, "c": short}), tiny, str(tmp_path / "fs"), **options)
    fs = FeatureStore(tmp_path / "fs")
    assert sorted(fs.chunk_rows(tiny.name).ids.tolist()) == ["a#0", "a#1", "a#2", "a#3", "b#0", "b#1", "b#2", "b#3", "c#0"]
    # a shorter text under id a (one window now), an empty one under id b (an error with empty="error")
    report = embedkit.extract(write({"a": short, "b": "", "c": short}), tiny, str(tmp_path / "fs"), empty="error",
                              **options)
    assert (report.changed, report.failed, report.cached) == (2, 1, 1)
    rows = fs.chunk_rows(tiny.name)
    assert sorted(rows.ids.tolist()) == ["a#0", "c#0"]
    assert [f["id"] for f in fs.failures(tiny.name, long="chunk")] == ["b"]
    a = int(np.flatnonzero(rows.ids == "a#0")[0])
    c0, c1 = rows.char_span[a]
    assert short[c0:c1] == short and tuple(rows.token_span[a]) == (0, 20)


def test_kill_9_during_extract_then_rerun_gives_every_row_once(tiny, words, tmp_path: Path):
    rng = np.random.default_rng(7)
    lines = [" ".join(rng.choice(words, size=int(rng.integers(40, 200)))) for _ in range(240)]
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(lines) + "\n")
    command = [sys.executable, "-m", "embedkit.cli", "extract", str(source), "--backbone", tiny.digest,
               "--no-progress", "--shard-size", "8", "--long", "chunk", "--chunk-overlap", str(OVERLAP), "--chunk-rows"]
    clean = subprocess.run(command + ["--out", str(tmp_path / "clean")], capture_output=True, text=True, timeout=600)
    assert clean.returncode == 0, clean.stderr
    crashed = tmp_path / "crashed"
    def rows_commits() -> int:  # the store names the artifact as it resolved (one digest may have several names)
        return sum(1 for _ in crashed.glob(f"*/{tiny.digest}.chunk-o{OVERLAP}-m64.rows/commits/*.json"))

    kills = 0
    for at_least in (1, 8, 16):  # commits of the rows namespace seen before the kill (they add up over runs)
        proc = subprocess.Popen(command + ["--out", str(crashed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        kills += kill_when(proc, lambda: rows_commits() >= at_least, 300)
    assert kills >= 2
    final = subprocess.run(command + ["--out", str(crashed), "--json"], capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr
    assert json.loads(final.stdout)["cached"] > 0
    a, b = FeatureStore(tmp_path / "clean").chunk_rows(tiny.digest), FeatureStore(crashed).chunk_rows(tiny.digest)
    assert len(b.ids) == len(set(b.ids.tolist())) == len(a.ids)
    sa, sb = by_row(a), by_row(b)
    assert sa.keys() == sb.keys()
    for row in sa:
        assert np.array_equal(sa[row][0], sb[row][0]) and sa[row][1:] == sb[row][1:]
    assert len(set(b.parent.tolist())) == len(set(lines))
    for ns in FeatureStore(crashed).namespaces():
        assert ns.verify() == []


def test_cli_index_and_search_answer_with_the_parent_chunk_and_passage(tiny, words, tmp_path: Path):
    texts = texts_of(words)
    source = tmp_path / "docs.txt"
    source.write_text("\n".join(texts) + "\n")
    store, index = tmp_path / "fs", tmp_path / "ix"
    done = run_cli("extract", str(source), "--backbone", tiny.digest, "--out", str(store), "--no-progress",
                   "--long", "chunk", "--chunk-overlap", str(OVERLAP), "--chunk-rows", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["chunk_rows"] == 8 and "per-chunk rows: 8 committed" in done.stderr
    built = run_cli("index", str(store), "--out", str(index), "--long", "chunk", "--chunk-rows")
    assert built.returncode == 0, built.stderr
    assert built.stdout.startswith("8 rows of") and "per-chunk rows" in built.stdout
    passage = " ".join(words[104:166])  # window 2 of the first text: its own passage is the best match
    parent = content_id(texts[0].encode())
    for where, extra in ((str(index), []), (str(store), ["--long", "chunk", "--chunk-rows"])):
        found = run_cli("search", where, passage, "-k", "3", "--json", "--source", str(source), *extra)
        assert found.returncode == 0, found.stderr
        top = json.loads(found.stdout)[0]["neighbours"][0]
        assert (top["parent"], top["chunk"], top["id"]) == (parent, 2, f"{parent}#2")
        assert top["token_span"] == [104, 166] and top["row"] == 0
        c0, c1 = top["char_span"]
        assert texts[0][c0:c1] == passage == top["match"]
        assert top["score"] == pytest.approx(1.0, abs=1e-5)
    shown = run_cli("search", str(index), passage, "-k", "1", "--source", str(source))
    assert shown.returncode == 0, shown.stderr
    assert f"id {parent[:12]}, chunk 2, chars {c0}:{c1}" in shown.stdout and passage in shown.stdout
    # the pooled namespace of the same store: hits are whole items, without a chunk
    pooled = run_cli("search", str(store), passage, "-k", "1", "--json", "--long", "chunk")
    assert pooled.returncode == 0, pooled.stderr
    assert "chunk" not in json.loads(pooled.stdout)[0]["neighbours"][0]


def test_cli_refuses_chunk_rows_without_long_chunk(tiny, words, tmp_path: Path):
    source = tmp_path / "docs.txt"
    source.write_text("\n".join(texts_of(words)) + "\n")
    refused = run_cli("extract", str(source), "--backbone", tiny.digest, "--out", str(tmp_path / "fs"), "--chunk-rows",
                      "--no-progress")
    assert refused.returncode == 1 and "--chunk-rows" in refused.stderr and "--long chunk" in refused.stderr
    assert not (tmp_path / "fs").exists()
    done = run_cli("extract", str(source), "--backbone", tiny.digest, "--out", str(tmp_path / "fs"), "--no-progress",
                   "--long", "chunk", "--chunk-overlap", str(OVERLAP))
    assert done.returncode == 0, done.stderr
    refused = run_cli("index", str(tmp_path / "fs"), "--out", str(tmp_path / "ix"), "--chunk-rows")
    assert refused.returncode == 1 and "add --long chunk" in refused.stderr
    # a store of pooled vectors only: asked for rows, the error says what it holds
    missing = run_cli("index", str(tmp_path / "fs"), "--out", str(tmp_path / "ix"), "--long", "chunk", "--chunk-rows")
    assert missing.returncode == 1 and "chunked vectors" in missing.stderr
    built = run_cli("index", str(tmp_path / "fs"), "--out", str(tmp_path / "ix"), "--long", "chunk")
    assert built.returncode == 0, built.stderr
    refused = run_cli("search", str(tmp_path / "ix"), "a query", "--chunk-rows")
    assert refused.returncode == 1 and "--chunk-rows" in refused.stderr


def test_a_chunk_rerun_without_chunk_rows_keeps_the_stored_rows_up_to_date(tiny, words, tmp_path: Path):
    """A store that keeps per-chunk rows: a later long="chunk" extract without chunk_rows=True
    (a text of an id changed) updates its rows too, so no stale window is served."""
    source = tmp_path / "items.jsonl"

    def write(texts: dict[str, str]) -> str:
        source.write_text("".join(json.dumps({"key": k, "text": t}) + "\n" for k, t in texts.items()))
        return str(source)

    long, short = " ".join(words[:190]), " ".join(words[400:420])
    options = dict(id_column="key", long="chunk", chunk_overlap=OVERLAP)
    embedkit.extract(write({"a": long, "c": short}), tiny, str(tmp_path / "fs"), chunk_rows=True, **options)
    report = embedkit.extract(write({"a": short, "c": short}), tiny, str(tmp_path / "fs"), **options)
    assert report.changed == 1 and report.chunk_rows == 1 and report.rows_namespace
    rows = FeatureStore(tmp_path / "fs").chunk_rows(tiny.name)
    assert sorted(rows.ids.tolist()) == ["a#0", "c#0"]
    a = int(np.flatnonzero(rows.ids == "a#0")[0])
    pooled = dict(zip(*FeatureStore(tmp_path / "fs").load(tiny.name, long="chunk")))
    np.testing.assert_array_equal(rows.vectors[a], pooled["a"])  # one window: the pooled vector itself
    # the Ray engine cannot update the rows: refused before any work
    with pytest.raises(UsageError, match="per-chunk rows"):
        embedkit.extract(write({"a": long, "c": short}), tiny, str(tmp_path / "fs"), engine="ray", **options)


def test_search_never_cuts_a_passage_from_a_text_changed_since_extraction(tiny, words, tmp_path: Path):
    """Ids from a column: the file's text at a hit's row changed after extraction. The hit shows
    no passage (``match`` None, a note), on the store and on a saved index, never text[c0:c1] of
    the new text; the unchanged text's passage is still shown."""
    source = tmp_path / "docs.csv"
    texts = {"k1": " ".join(words[:190]), "k2": " ".join(words[200:300])}

    def write(rows: dict[str, str]) -> None:
        source.write_text("key,text\n" + "".join(f"{k},{t}\n" for k, t in rows.items()))

    write(texts)
    store, index = tmp_path / "fs", tmp_path / "ix"
    done = run_cli("extract", str(source), "--backbone", tiny.digest, "--out", str(store), "--no-progress",
                   "--id-column", "key", "--long", "chunk", "--chunk-overlap", str(OVERLAP), "--chunk-rows")
    assert done.returncode == 0, done.stderr
    built = run_cli("index", str(store), "--out", str(index), "--long", "chunk", "--chunk-rows")
    assert built.returncode == 0, built.stderr
    write({"k1": texts["k1"].replace(words[110], "EDITED"), "k2": texts["k2"]})
    for where, extra in ((str(index), []), (str(store), ["--long", "chunk", "--chunk-rows"])):
        for query, parent, changed in ((" ".join(words[104:166]), "k1", True), (" ".join(words[200:262]), "k2", False)):
            found = run_cli("search", where, query, "-k", "1", "--json", "--source", str(source), *extra)
            assert found.returncode == 0, found.stderr
            top = json.loads(found.stdout)[0]["neighbours"][0]
            assert top["parent"] == parent and len(top["content"]) == 32
            if changed:
                assert top["match"] is None and "changed since extraction" in top["note"]
            else:
                c0, c1 = top["char_span"]
                assert top["match"] == texts["k2"][c0:c1] == query
