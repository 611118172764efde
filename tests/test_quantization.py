"""int8 variants: their own artifacts and digests, resolvable by name, and a report on real data."""
from __future__ import annotations

import json

import numpy as np

import embedkit
from support import read_banking, run_cli


def test_dynamic_int8_is_its_own_artifact_and_stays_close(minilm):
    int8 = embedkit.quantize(minilm, "dynamic")
    assert int8.digest != minilm.digest and int8.name == "minilm-l6-int8-dynamic"
    assert int8.manifest["quantization"]["parent"] == minilm.digest
    assert embedkit.quantize(minilm, "dynamic").digest == int8.digest  # reused, not redone
    assert embedkit.resolve("minilm-l6-int8-dynamic").digest == int8.digest
    texts, _ = read_banking("test", limit=200)
    fp32 = embedkit.embed(texts, backbone=minilm).vectors
    q = embedkit.embed(texts, backbone=int8).vectors
    cos = (fp32 * q).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(q, axis=1)
    assert cos.mean() >= 0.98


def test_report_cli_measures_cosine_speed_and_accuracy(minilm, tmp_path):
    from support import BANKING

    run = run_cli("quantize", "minilm-l6", "--report", "--data", str(BANKING / "test.csv"),
                  "--label-column", "category", "--limit", "300", "--variant", "dynamic",
                  "--variant", "static", "--json")
    assert run.returncode == 0, run.stderr
    rows = {r["variant"]: r for r in json.loads(run.stdout)}
    assert set(rows) == {"fp32", "dynamic", "static"}
    assert rows["fp32"]["mean_cosine"] > 0.99999 and rows["fp32"]["speedup"] == 1.0
    assert rows["dynamic"]["mean_cosine"] >= 0.98
    assert all(0 <= r["accuracy"] <= 1 and r["items_per_s"] > 0 for r in rows.values())
    assert "Axis 1 is out-of-range" not in run.stderr


def test_static_needs_data():
    run = run_cli("quantize", "minilm-l6", "--variant", "static")
    assert run.returncode == 1 and "--data" in run.stderr
