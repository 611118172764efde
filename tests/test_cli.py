"""The embedkit command, run as a real subprocess."""
import json
import subprocess
import sys

import numpy as np
from support import run_cli

import embedkit


def test_import_and_help_do_not_import_torch():
    code = (
        "import sys, embedkit, embedkit.cli\n"
        "try:\n    embedkit.cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "embedkit.cli.main(['backbones'])\n"
        "print('TORCH', 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "TORCH False False" in out.stdout, out.stderr
    assert "minilm-l6" in out.stdout


def test_backbones_and_plugins_json():
    rows = {r["name"]: r for r in json.loads(run_cli("backbones", "--json").stdout)}
    assert rows["minilm-l6"]["dim"] == 384 and rows["minilm-l6"]["plugin"] == "text"
    assert rows["mobilenet-v2"]["modality"] == "image" and rows["mobilenet-v2"]["plugin"] == "vision"
    plugins = {p["name"]: p for p in json.loads(run_cli("plugins", "--json").stdout)}
    assert plugins["text"]["distribution"] == "embedkit-text" and plugins["text"]["status"] == "ok"
    assert plugins["vision"]["backbones"] == ["mobilenet-v2", "efficientnet-lite0"]


def test_embed_text_file_with_a_bad_line(minilm, tmp_path):
    src = tmp_path / "texts.txt"
    src.write_bytes(b"first line\n\xff\xfe broken bytes\n\nlast line\n")
    out = tmp_path / "v.npy"
    done = run_cli("embed", "minilm-l6", str(src), "--out", str(out), "--no-progress")
    assert done.returncode == 2, done.stderr  # some items failed, output still written
    vectors = np.load(out)
    assert vectors.shape == (4, 384)
    assert np.isnan(vectors[1]).all() and np.isfinite(vectors[[0, 2, 3]]).all()
    errors = [json.loads(l) for l in (tmp_path / "v.npy.errors.jsonl").read_text().splitlines()]
    assert [(e["index"], e["code"]) for e in errors] == [(1, "invalid_utf8")]
    assert "4 texts: 3 ok, 1 failed" in done.stderr
    ref = embedkit.embed(["first line", "last line"], backbone="minilm-l6").vectors
    np.testing.assert_allclose(vectors[[0, 3]], ref, atol=1e-5)


def test_embed_csv_column_to_parquet(minilm, tmp_path):
    import pyarrow.parquet as pq

    src = tmp_path / "data.csv"
    src.write_text('id,text\n1,"hello, world"\n2,card arrived\n', encoding="utf-8")
    out = tmp_path / "out.parquet"
    done = run_cli("embed", "minilm-l6", str(src), "--column", "text", "--out", str(out))
    assert done.returncode == 0, done.stderr
    table = pq.read_table(out)
    assert table.column("ok").to_pylist() == [True, True]
    assert table.schema.metadata[b"embedkit.digest"].decode() == minilm.digest
    got = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    ref = embedkit.embed(["hello, world", "card arrived"], backbone="minilm-l6").vectors
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_embed_reports_a_missing_column(tmp_path):
    src = tmp_path / "data.csv"
    src.write_text("id,body\n1,hi\n")
    done = run_cli("embed", "minilm-l6", str(src), "--out", str(tmp_path / "o.npy"))
    assert done.returncode == 1 and "no column 'text'" in done.stderr and "body" in done.stderr


def test_unknown_backbone_message_lists_alternatives():
    done = run_cli("export", "nope")
    assert done.returncode == 1 and "minilm-l6" in done.stderr


def test_check_minilm(minilm):
    done = run_cli("check", "minilm-l6")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok  parity" in done.stdout and "all rules pass" in done.stdout


def test_embed_jsonl_and_a_broken_line(minilm, tmp_path):
    src = tmp_path / "data.jsonl"
    src.write_text('{"text": "hello"}\n{"text": 7}\n{"other": "x"}\n')
    out = tmp_path / "o.npy"
    done = run_cli("embed", "minilm-l6", str(src), "--out", str(out), "--no-progress")
    assert done.returncode == 2
    errors = [json.loads(l) for l in (tmp_path / "o.npy.errors.jsonl").read_text().splitlines()]
    assert [(e["index"], e["code"]) for e in errors] == [(1, "not_text"), (2, "not_text")]
    src.write_text('{"text": "hello"}\n{"text": \n')
    done = run_cli("embed", "minilm-l6", str(src), "--out", str(out), "--no-progress")
    assert done.returncode == 2  # a bad line is that row's failure, as in extract (one reader)
    [error] = [json.loads(l) for l in (tmp_path / "o.npy.errors.jsonl").read_text().splitlines()]
    assert (error["index"], error["code"]) == (1, "invalid_json") and "line 2 is not JSON" in error["message"]


def test_embed_refuses_an_unknown_output_format_before_working(tmp_path):
    src = tmp_path / "t.txt"
    src.write_text("hello\n")
    done = run_cli("embed", "minilm-l6", str(src), "--out", str(tmp_path / "v.csv"))
    assert done.returncode == 1 and ".npy or .parquet" in done.stderr
    assert list(tmp_path.iterdir()) == [src]
