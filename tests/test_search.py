"""embedkit index / search: nearest stored items with ids and sources; a changed index is refused."""
from __future__ import annotations

import json
from pathlib import Path

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
