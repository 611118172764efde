"""Extraction: sources, resume, dedupe, namespaces, failures, and kill -9 at random moments."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from support import SHARED, read_banking, run_cli

import embedkit
from embedkit import FeatureStore
from embedkit.inputs.files import content_id


def sorted_store(path: Path, backbone: str = "minilm-l6") -> tuple[list[str], np.ndarray]:
    ids, X = FeatureStore(path).load(backbone)
    order = np.argsort(ids)
    return list(ids[order]), np.asarray(X)[order]


def test_text_file_extract_resume_and_store_commands(minilm, tmp_path: Path):
    texts, _ = read_banking("test", limit=300)
    texts = [" ".join(t.split()) for t in texts]
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(texts + texts[:20]) + "\n")  # 20 duplicates
    out = tmp_path / "fs"
    first = run_cli("extract", str(source), "--backbone", "minilm-l6", "--out", str(out), "--no-progress",
                    "--shard-size", "64", "--json")
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    unique = len(set(texts))
    assert report["total"] == 320 and report["ok"] + report["failed"] == report["total"]
    assert report["computed"] == unique and report["duplicates"] == 320 - unique and report["failed"] == 0
    again = json.loads(run_cli("extract", str(source), "--backbone", "minilm-l6", "--out", str(out),
                               "--no-progress", "--shard-size", "64", "--json").stdout)
    assert again["computed"] == 0 and again["cached"] + again["duplicates"] == 320
    ids, X = sorted_store(out)
    assert len(ids) == unique
    reference = embedkit.embed(sorted(set(texts)), backbone="minilm-l6").vectors
    by_text = {content_id(t.encode()): v for t, v in zip(sorted(set(texts)), reference)}
    np.testing.assert_allclose(X, np.stack([by_text[i] for i in ids]), atol=1e-5)
    info = run_cli("store", "info", str(out))
    assert "minilm-l6" in info.stdout and f"rows={unique}" in info.stdout
    assert run_cli("store", "verify", str(out)).returncode == 0


def test_table_with_ids_and_bad_rows_accounts_for_every_item(minilm, tmp_path: Path):
    source = tmp_path / "items.jsonl"
    lines = [json.dumps({"key": f"k{i}", "text": f"sentence number {i}"}) for i in range(10)]
    lines[3] = "{not json"
    lines[5] = json.dumps({"key": "k5", "text": None})
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "fs"
    run = run_cli("extract", str(source), "--backbone", "minilm-l6", "--out", str(out), "--id-column", "key",
                  "--no-progress", "--json", "--max-failures", "1")
    assert run.returncode == 2, run.stderr  # 2 failures > --max-failures 1
    report = json.loads(run.stdout)
    assert (report["total"], report["ok"], report["failed"]) == (10, 8, 2)
    failures = FeatureStore(out).failures("minilm-l6")
    assert sorted((f["source"], f["code"]) for f in failures) == [("items.jsonl:row 4", "invalid_json"), ("items.jsonl:row 6", "not_text")]
    assert all("sentence" not in json.dumps(f) for f in failures)  # records never carry the content
    ids, _ = sorted_store(out)
    assert ids == sorted(f"k{i}" for i in range(10) if i not in (3, 5))
    ok = run_cli("extract", str(source), "--backbone", "minilm-l6", "--out", str(out), "--id-column", "key",
                 "--no-progress", "--max-failures", "2")
    assert ok.returncode == 0, ok.stderr


def test_parquet_and_csv_sources(minilm, tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"row {i} about cards" for i in range(50)]
    pq.write_table(pa.table({"body": texts}), tmp_path / "t.parquet")
    (tmp_path / "t.csv").write_text("body\n" + "\n".join(texts) + "\n")
    a = embedkit.extract(str(tmp_path / "t.parquet"), "minilm-l6", str(tmp_path / "a"), column="body")
    b = embedkit.extract(str(tmp_path / "t.csv"), "minilm-l6", str(tmp_path / "b"), column="body")
    assert a.computed == b.computed == 50
    ids_a, X_a = sorted_store(tmp_path / "a")
    ids_b, X_b = sorted_store(tmp_path / "b")
    assert ids_a == ids_b
    np.testing.assert_array_equal(X_a, X_b)
    # The torch runtime computes the same features; each commit says which runtime computed it.
    c = embedkit.extract(str(tmp_path / "t.csv"), "minilm-l6", str(tmp_path / "c"), column="body", runtime="torch")
    assert c.computed == 50
    ids_c, X_c = sorted_store(tmp_path / "c")
    assert ids_c == ids_a and np.abs(X_c - X_a).max() <= 1e-4
    kinds = {str(p): [r["stats"]["runtime"]["kind"] for r in embedkit.FeatureStore(p).find("minilm-l6").commits()]
             for p in (tmp_path / "a", tmp_path / "c")}
    assert kinds == {str(tmp_path / "a"): ["Runtime"], str(tmp_path / "c"): ["TorchRuntime"]}


def test_changed_preprocessing_gets_its_own_namespace(minilm, tmp_path: Path):
    from embedkit_text import folder_backbone, minilm_folder

    short = folder_backbone(minilm_folder(), name="minilm-l6", max_length=32)
    texts = ["a short text", "another text that is short"]
    embedkit.extract(texts, "minilm-l6", str(tmp_path))
    report = embedkit.extract(texts, short, str(tmp_path))
    assert report.computed == 2 and report.cached == 0  # nothing reused across preprocessing
    spaces = FeatureStore(tmp_path).namespaces()
    assert len(spaces) == 2 and len({s.digest for s in spaces}) == 2


def test_image_folder_extraction_records_the_placeholder(tmp_path: Path):
    folder = SHARED / "images" / "hymenoptera" / "train" / "ants"
    if not folder.is_dir():
        pytest.skip("hymenoptera is not present")
    files = sorted(folder.iterdir())[:12] + [folder / "imageNotFound.gif"]
    source = tmp_path / "list.txt"
    source.write_text("\n".join(str(f) for f in files) + "\n")
    report = embedkit.extract(str(source), "mobilenet-v2", str(tmp_path / "fs"), shard_size=5)
    assert report.total == 13 and report.failed == 1 and report.ok == 12
    [failure] = FeatureStore(tmp_path / "fs").failures("mobilenet-v2")
    assert failure["source"].endswith("imageNotFound.gif") and failure["code"] == "blank_image"
    ids, X = FeatureStore(tmp_path / "fs").load("mobilenet-v2")
    assert X.shape == (12, 1280)


def test_damaged_shard_is_recomputed_on_rerun(minilm, tmp_path: Path):
    texts = [f"text number {i}" for i in range(40)]
    embedkit.extract(texts, "minilm-l6", str(tmp_path), shard_size=10)
    before = sorted_store(tmp_path)
    ns = FeatureStore(tmp_path).find("minilm-l6")
    shard = sorted((ns.path / "shards").glob("*.arrow"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    report = embedkit.extract(texts, "minilm-l6", str(tmp_path), shard_size=10)
    assert report.quarantined == 1 and report.computed == 10 and report.cached == 30
    after = sorted_store(tmp_path)
    assert after[0] == before[0]
    np.testing.assert_array_equal(after[1], before[1])


def test_kill_9_at_random_moments_then_rerun_gives_the_uninterrupted_store(minilm, tmp_path: Path):
    texts, _ = read_banking("train", limit=3000)
    texts = [" ".join(t.split()) for t in texts]  # one text per line
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(texts) + "\n")
    command = [sys.executable, "-m", "embedkit.cli", "extract", str(source), "--backbone", "minilm-l6",
               "--no-progress", "--shard-size", "256"]
    started = time.monotonic()
    clean = subprocess.run(command + ["--out", str(tmp_path / "clean")], capture_output=True, text=True, timeout=600)
    assert clean.returncode == 0, clean.stderr
    whole = time.monotonic() - started  # kill moments scale with this machine's speed (a fixed 2-7 s missed fast runs)
    rng = random.Random(1234)
    crashed = tmp_path / "crashed"
    kills = 0
    for _ in range(4):
        proc = subprocess.Popen(command + ["--out", str(crashed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        time.sleep(rng.uniform(0.2, 0.5) * whole)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
    final = subprocess.run(command + ["--out", str(crashed)], capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr
    assert kills >= 2
    a_ids, a_X = sorted_store(tmp_path / "clean")
    b_ids, b_X = sorted_store(crashed)
    assert b_ids == a_ids and len(b_ids) == len(set(texts))
    np.testing.assert_array_equal(a_X, b_X)  # bit for bit: the interrupted shards were recomputed whole
    assert FeatureStore(crashed).find("minilm-l6").verify() == []
