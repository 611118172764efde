"""embed and extract read every source through one reader and write one schema: the CLI end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support import run_cli

import embedkit
from embedkit import FeatureStore


class Pool(object):
    """A zero-argument builder of a tiny image model: 2x2 average pooling and a linear layer."""

    def __call__(self):
        import torch

        class Module(torch.nn.Module):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.proj = torch.nn.Linear(12, 8)

            def forward(self, pixel_values):
                return self.proj(torch.nn.functional.avg_pool2d(pixel_values, 16).flatten(1))

        return Module()


@pytest.fixture(scope="module")
def tiny_image(model_store):
    backbone = embedkit.Backbone(name="tiny-image", modality="image", dim=8, weights="random", license="MIT",
                                 preprocess=embedkit.ImagePreprocess(crop=(32, 32), resize=32), builder=Pool())
    return embedkit.export(backbone)


def photo(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))


def test_embed_parquet_files_of_two_runs_concatenate(minilm, tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "good.txt").write_text("one\ntwo\n")
    (tmp_path / "bad.txt").write_text("one\n\u200b\ntwo\n")  # an invisible-only line: empty_text
    for name in ("good", "bad"):
        done = run_cli("embed", "minilm-l6", str(tmp_path / f"{name}.txt"), "--out", str(tmp_path / f"{name}.parquet"),
                       "--empty", "error", "--no-progress")
        assert done.returncode == (0 if name == "good" else 2), done.stderr
    good, bad = pq.read_table(tmp_path / "good.parquet"), pq.read_table(tmp_path / "bad.parquet")
    assert good.schema.field("error_code").type == pa.string() == bad.schema.field("error_message").type
    both = pa.concat_tables([good, bad])
    assert both.num_rows == 5 and both.column("error_code").to_pylist() == [None, None, None, "empty_text", None]
    assert not (tmp_path / "good.parquet.errors.jsonl").exists()  # nothing failed: no errors file
    [record] = [json.loads(line) for line in (tmp_path / "bad.parquet.errors.jsonl").read_text().splitlines()]
    assert record["index"] == 1 and record["code"] == "empty_text"


def test_a_stale_errors_file_is_replaced_and_a_foreign_one_kept(minilm, tmp_path: Path):
    src, out = tmp_path / "t.txt", tmp_path / "v.npy"
    errors = tmp_path / "v.npy.errors.jsonl"
    src.write_text("one\n\ntwo\n")
    assert run_cli("embed", "minilm-l6", str(src), "--out", str(out), "--empty", "error", "--no-progress").returncode == 2
    assert errors.exists()
    done = run_cli("embed", "minilm-l6", str(src), "--out", str(out), "--no-progress")  # empty texts now embedded
    assert done.returncode == 0, done.stderr
    assert not errors.exists()  # an earlier run's records no longer claim failures of this one
    errors.write_text("my own notes\n")
    done = run_cli("embed", "minilm-l6", str(src), "--out", str(out), "--no-progress")
    assert done.returncode == 1 and "not embedkit's error records" in done.stderr
    assert errors.read_text() == "my own notes\n"


def test_a_bad_jsonl_line_is_one_failed_row_in_embed_and_extract(minilm, tmp_path: Path):
    src = tmp_path / "t.jsonl"
    src.write_text('{"text": "hello"}\n{"text": \n{"text": "world"}\n')
    done = run_cli("embed", "minilm-l6", str(src), "--out", str(tmp_path / "v.npy"), "--no-progress")
    assert done.returncode == 2, done.stderr
    vectors = np.load(tmp_path / "v.npy")
    assert vectors.shape == (3, 384) and np.isnan(vectors[1]).all() and not np.isnan(vectors[[0, 2]]).any()
    [record] = [json.loads(line) for line in (tmp_path / "v.npy.errors.jsonl").read_text().splitlines()]
    assert (record["index"], record["code"]) == (1, "invalid_json")
    done = run_cli("extract", str(src), "--out", str(tmp_path / "fs"), "--no-progress", "--json")
    assert done.returncode == 2, done.stderr
    report = json.loads(done.stdout)
    assert (report["total"], report["ok"], report["failed"]) == (3, 2, 1)
    [failure] = FeatureStore(tmp_path / "fs").failures("minilm-l6")
    assert (failure["code"], failure["source"]) == ("invalid_json", "t.jsonl:row 2")


def test_a_csv_with_a_bom_and_a_long_cell_embeds(minilm, tmp_path: Path):
    src = tmp_path / "t.csv"
    long = "word " * 40_000
    src.write_bytes(f'\ufefftext,label\nhello,a\n"{long}",b\n'.encode())
    done = run_cli("embed", "minilm-l6", str(src), "--out", str(tmp_path / "v.npy"), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "2 texts: 2 ok, 0 failed, 1 truncated" in done.stderr
    expected = embedkit.TextEncoder(minilm, threads=1).encode(["hello", long]).vectors
    np.testing.assert_allclose(np.load(tmp_path / "v.npy"), expected, atol=1e-5)


def test_image_list_rows_are_its_lines(tiny_image, tmp_path: Path):
    for k, name in enumerate(["#2.jpg", "b.png"]):
        photo(k).save(tmp_path / name)
    src = tmp_path / "list.txt"
    src.write_text("#2.jpg\nb.png\n\nmissing.png\n")
    done = run_cli("embed", str(tiny_image.path), str(src), "--out", str(tmp_path / "v.npy"), "--no-progress")
    assert done.returncode == 2, done.stderr
    vectors = np.load(tmp_path / "v.npy")
    alone = embedkit.ImageEncoder(tiny_image, threads=1).encode([tmp_path / "#2.jpg", tmp_path / "b.png"]).vectors
    assert vectors.shape == (4, 8)
    np.testing.assert_allclose(vectors[:2], alone, atol=1e-6)  # row i is line i
    assert np.isnan(vectors[2:]).all()
    codes = [json.loads(line)["code"] for line in (tmp_path / "v.npy.errors.jsonl").read_text().splitlines()]
    assert codes == ["not_found", "not_found"]


def test_a_file_name_that_is_not_utf8_survives_extract_reruns_and_parquet(tiny_image, tmp_path: Path):
    import pyarrow.parquet as pq

    folder = tmp_path / "imgs"
    (folder / "cats").mkdir(parents=True)
    photo(1).save(os.path.join(os.fsencode(folder / "cats"), b"caf\xe9.png"), "PNG")
    photo(2).save(folder / "cats" / "ok.png")
    for run in range(2):
        done = run_cli("extract", str(folder), "--backbone", str(tiny_image.path), "--out", str(tmp_path / "fs"),
                       "--no-progress", "--json")
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert (report["ok"], report["computed" if run == 0 else "cached"]) == (2, 2)
    ids, X, sources = FeatureStore(tmp_path / "fs").find("tiny-image").load_with_sources()
    assert sorted(Path(s).name for s in sources) == ["caf\\xe9.png", "ok.png"]
    done = run_cli("embed", str(tiny_image.path), str(folder), "--out", str(tmp_path / "v.parquet"), "--no-progress")
    assert done.returncode == 0, done.stderr
    table = pq.read_table(tmp_path / "v.parquet")
    assert [Path(p).name for p in table.column("path").to_pylist()] == ["caf\\xe9.png", "ok.png"]
    assert table.column("label").to_pylist() == ["cats", "cats"] and all(table.column("ok").to_pylist())


def test_fifos_and_dev_zero_in_lists_and_globs_never_hang(tiny_image, tmp_path: Path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    photo(3).save(folder / "a.png")
    os.mkfifo(folder / "b.png")
    (folder / "c.png").symlink_to("/dev/zero")
    (tmp_path / "list.txt").write_text("imgs/a.png\nimgs/b.png\nimgs/c.png\n")
    for k, source in enumerate([str(folder / "*.png"), str(tmp_path / "list.txt"), str(folder)]):
        out = tmp_path / f"fs{k}"
        done = subprocess.run([sys.executable, "-m", "embedkit.cli", "extract", source, "--backbone",
                               str(tiny_image.path), "--out", str(out), "--no-progress", "--max-failures", "5"],
                              capture_output=True, text=True, timeout=120)  # hung forever before
        assert done.returncode == 0, done.stderr
        failures = FeatureStore(out).failures("tiny-image")
        assert sorted((Path(f["source"]).name, f["code"]) for f in failures) == [
            ("b.png", "not_a_file"), ("c.png", "not_a_file")]
    done = run_cli("embed", str(tiny_image.path), str(tmp_path / "list.txt"), "--out", str(tmp_path / "v.npy"),
                   "--no-progress")
    assert done.returncode == 2 and np.isnan(np.load(tmp_path / "v.npy")[1:]).all()


def test_in_memory_twins_are_extracted_as_different_items(tiny_image, tmp_path: Path):
    indices = np.random.default_rng(0).integers(0, 256, (40, 48), dtype=np.uint8)
    red, green = Image.fromarray(indices, "P"), Image.fromarray(indices, "P")
    red.putpalette([v for i in range(256) for v in (i, 0, 0)])
    green.putpalette([v for i in range(256) for v in (0, i, 0)])
    array = np.asarray(photo(4))  # (40, 48, 3)
    twin = array.reshape(48, 40, 3)  # the same bytes, another image
    report = embedkit.extract([red, green, array, twin], tiny_image, str(tmp_path / "fs"))
    assert (report.computed, report.duplicates, report.cached) == (4, 0, 0)  # was 2 computed, 2 "duplicates"
    ids, X = FeatureStore(tmp_path / "fs").load("tiny-image")
    expected = embedkit.ImageEncoder(tiny_image, threads=1).encode([red, green, array, twin]).vectors
    assert len(ids) == 4 and len({tuple(np.round(v, 5)) for v in expected}) == 4
    stored = {tuple(np.round(v, 5)) for v in np.asarray(X)}
    assert stored == {tuple(np.round(v, 5)) for v in expected}


def test_embed_writes_and_replaces_a_parquet_file_whose_name_is_not_utf8(minilm, tmp_path: Path):
    """`embed ... --out $'o\\xff.parquet'` computed every vector, then crashed in pyarrow
    (UnicodeEncodeError: surrogates not allowed); .npy names like it always worked."""
    texts = tmp_path / "texts.txt"
    texts.write_text("my card has not arrived\nwhat is the exchange rate\n")
    out = os.fsdecode(bytes(tmp_path) + b"/o\xff.parquet")
    for _ in range(2):  # written, then recognised as embed's own and replaced
        done = run_cli("embed", "minilm-l6", str(texts), "--out", out, "--no-progress")
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
    import pyarrow.parquet as pq

    with open(out, "rb") as f:
        table = pq.read_table(f)
    assert table.num_rows == 2 and b"embedkit.digest" in table.schema.metadata


def test_a_feature_store_in_a_folder_whose_name_is_not_utf8(minilm, tmp_path: Path):
    store = os.fsdecode(os.fsencode(tmp_path) + b"/d\xfe")  # the name as Python's os functions give it
    os.mkdir(store)
    src = tmp_path / "t.txt"
    src.write_text("my card is lost\nwhat is the rate\n")
    done = run_cli("extract", str(src), "--backbone", "minilm-l6", "--out", os.path.join(store, "fs"), "--no-progress")
    assert done.returncode == 0, done.stderr  # was a UnicodeEncodeError inside pyarrow, leaving an empty namespace
    ids, X = FeatureStore(os.path.join(store, "fs")).load("minilm-l6")
    assert len(ids) == 2 and X.shape == (2, 384)
    np.testing.assert_allclose(X, embedkit.embed(["my card is lost", "what is the rate"], backbone="minilm-l6").vectors,
                               atol=1e-5)
