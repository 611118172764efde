"""int8 variants: their own artifacts and digests, resolvable by name, and a report on real data."""
from __future__ import annotations

import json

import numpy as np
from support import read_banking, run_cli

import embedkit


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
    out = json.loads(run.stdout)
    rows = {r["variant"]: r for r in out["rows"]}
    assert set(rows) == {"fp32", "dynamic", "static"}
    assert rows["fp32"]["mean_cosine"] > 0.99999 and rows["fp32"]["speedup"] == 1.0
    assert rows["dynamic"]["mean_cosine"] >= 0.98
    assert all(0 <= r["accuracy"] <= 1 and r["items_per_s"] > 0 for r in rows.values())
    assert "Axis 1 is out-of-range" not in run.stderr
    # each variant says whether it is worth using, by the documented rule, and one is recommended
    for name in ("dynamic", "static"):
        r = rows[name]
        qualifies = (r["mean_cosine"] >= 0.99 and r["accuracy"] >= rows["fp32"]["accuracy"] - 0.01
                     and r["speedup"] >= 1.05)
        assert r["worth_using"] is qualifies and r["why"]
    good = [r for r in rows.values() if r.get("worth_using")]
    expected = max(good, key=lambda r: r["items_per_s"])["variant"] if good else "fp32"
    assert out["recommended"] == expected
    assert "quantize --report: 100%" in run.stderr and "3/3" in run.stderr


def test_recommendation_keeps_fp32_when_no_variant_qualifies_and_names_why():
    from embedkit.encoders.quantization import recommend

    def row(variant, rate, cos, acc):
        return {"variant": variant, "name": f"m-{variant}", "items_per_s": rate, "mean_cosine": cos, "accuracy": acc,
                "speedup": rate / 100.0}

    rows = [row("fp32", 100.0, 1.0, 0.90), row("dynamic", 180.0, 0.985, 0.90), row("static", 90.0, 0.995, 0.85)]
    advice = recommend(rows)
    assert advice["variant"] == "fp32" and advice["reason"] == "none qualifies: keep fp32"
    assert advice["verdicts"]["dynamic"] == (False, "mean cosine 0.9850 < 0.99")
    assert advice["verdicts"]["static"][1] == "accuracy -5.0 points vs fp32; not faster than fp32 (0.90x)"
    rows += [row("dynamic-per-tensor", 150.0, 0.992, 0.895), row("extra", 170.0, 0.999, 0.905)]
    advice = recommend(rows)
    assert advice["variant"] == "extra" and advice["reason"].startswith("the fastest that qualifies: 1.70x faster")
    assert advice["verdicts"]["dynamic-per-tensor"][0] is True  # qualifies too, but slower


def test_report_text_says_when_each_variant_is_worth_using(minilm):
    from support import BANKING

    run = run_cli("quantize", "minilm-l6", "--report", "--data", str(BANKING / "test.csv"), "--label-column",
                  "category", "--limit", "200", "--variant", "dynamic", "--no-progress")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[1].endswith("worth using?")
    assert [l.split()[0] for l in lines[2:4]] == ["fp32", "dynamic"] and lines[2].endswith("(reference)")
    assert " yes: " in lines[3] or " no: " in lines[3]
    assert lines[-1].startswith("recommended: ") and "mean cosine >= 0.99" in lines[-1]


def test_static_needs_data():
    run = run_cli("quantize", "minilm-l6", "--variant", "static")
    assert run.returncode == 1 and "--data" in run.stderr
