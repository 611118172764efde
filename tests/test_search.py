"""embedkit index / search: nearest stored items with ids and sources; a changed index is refused."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from support import read_banking, run_cli


def test_index_and_search(minilm, tmp_path: Path):
    texts, _ = read_banking("test")
    texts = [" ".join(t.split()) for t in texts[::20]]
    (tmp_path / "t.txt").write_text("\n".join(texts) + "\n")
    fs, idx = tmp_path / "fs", tmp_path / "idx"
    assert run_cli("extract", str(tmp_path / "t.txt"), "--out", str(fs), "--no-progress").returncode == 0
    built = run_cli("index", str(fs), "--out", str(idx))
    assert built.returncode == 0 and "flat index" in built.stdout, built.stderr
    found = run_cli("search", str(idx), texts[5], "a query", "-k", "3", "--json")
    assert found.returncode == 0, found.stderr
    results = json.loads(found.stdout)
    first = results[0]["neighbours"]
    assert len(first) == 3 and first[0]["source"] == "t.txt:line 6" and abs(first[0]["distance"]) < 1e-5
    assert first[0]["distance"] <= first[1]["distance"] <= first[2]["distance"]
    with open(idx / "ids.npy", "ab") as f:
        f.write(b"x")
    refused = run_cli("search", str(idx), "a query")
    assert refused.returncode == 1 and "sha256" in refused.stderr


def _index(tmp_path: Path) -> Path:
    import embedkit

    embedkit.extract(["my card is lost", "top up failed", "where is my money"], "minilm-l6", str(tmp_path / "fs"))
    return embedkit.save_index(str(tmp_path / "fs"), "minilm-l6", tmp_path / "idx")


def _name_in_index_json(idx: Path, name: str, digest: str) -> None:
    meta = json.loads((idx / "index.json").read_text())
    meta["files"] = {**meta["files"], name: digest}
    (idx / "index.json").write_text(json.dumps(meta))


def test_search_reads_no_file_outside_its_index_folder(minilm, tmp_path: Path):
    import subprocess
    import sys

    from embedkit.models.store import sha256_file

    idx = _index(tmp_path)
    secret = Path("/etc/hostname") if Path("/etc/hostname").is_file() else Path(__file__)
    _name_in_index_json(idx, "../../../../../../../../.." + str(secret), sha256_file(secret))
    refused = run_cli("search", str(idx), "a query")
    assert refused.returncode == 1 and "outside" in refused.stderr, refused.stderr  # was read and searched
    (idx / "index.json").write_text(json.dumps({**json.loads((idx / "index.json").read_text()),
                                                "files": {str(secret): sha256_file(secret)}}))
    assert run_cli("search", str(idx), "a query").returncode == 1
    # /dev/zero hung the hash forever; it is refused at once
    meta = json.loads((idx / "index.json").read_text())
    meta["files"] = {"index.faiss": "0" * 64, "ids.npy": "0" * 64, "sources.npy": "0" * 64}
    (idx / "index.json").write_text(json.dumps(meta))
    (idx / "ids.npy").unlink()
    (idx / "ids.npy").symlink_to("/dev/zero")
    hang = subprocess.run([sys.executable, "-m", "embedkit.cli", "search", str(idx), "a query"],
                          capture_output=True, text=True, timeout=120)
    assert hang.returncode == 1 and "outside" in hang.stderr, hang.stderr
    (idx / "ids.npy").unlink()
    os.mkfifo(idx / "ids.npy")
    fifo = subprocess.run([sys.executable, "-m", "embedkit.cli", "search", str(idx), "a query"],
                          capture_output=True, text=True, timeout=120)
    assert fifo.returncode == 1 and "not a regular file" in fifo.stderr, fifo.stderr


def test_indexing_a_namespace_whose_every_item_failed_is_a_store_error_not_a_crash(minilm, tmp_path):
    """`extract` of inputs that all failed leaves a namespace of 0 rows; `index` on it crashed
    with scikit-learn's 'Found array with 0 sample(s)' traceback."""
    from support import run_cli

    import embedkit

    report = embedkit.extract([None, 5], minilm, tmp_path / "fs")
    assert report.ok == 0 and report.failed == 2
    with pytest.raises(embedkit.StoreError, match="0 rows"):
        embedkit.save_index(tmp_path / "fs", "minilm-l6", tmp_path / "ix")
    done = run_cli("index", str(tmp_path / "fs"), "--out", str(tmp_path / "ix"))
    assert done.returncode == 1 and done.stderr.startswith("error: ") and "Traceback" not in done.stderr
    assert not (tmp_path / "ix").exists()


def test_save_index_takes_the_store_as_a_pathlib_path(minilm, tmp_path):
    """save_index(Path("fs"), ...) refused every output: a Path's .root ("/") was taken for the store folder."""
    import embedkit

    embedkit.extract(["my card has not arrived", "what is the rate"], minilm, tmp_path / "fs")
    (tmp_path / "out").mkdir()
    assert embedkit.save_index(tmp_path / "fs", "minilm-l6", tmp_path / "out" / "ix") == tmp_path / "out" / "ix"
    with pytest.raises(embedkit.OutputIsInputError):
        embedkit.save_index(tmp_path / "fs", "minilm-l6", tmp_path / "fs" / "ix")
