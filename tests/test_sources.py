"""The one reader: image folders, file lists and tables read as their authors wrote them, one item per row."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import embedkit
from embedkit.inputs.files import content_id
from embedkit.inputs.sources import count_items, file_list, iter_items, read_texts


def payloads(source, modality="text", column=None):
    return [item.payload for item in iter_items(source, modality, column)]


def test_image_folder_lists_recursively_with_labels(tmp_path: Path):
    for rel in ["ants/a.jpg", "ants/deep/b.png", "bees/c.jpg", "top.jpg", "bees/notes.txt", ".hidden/x.jpg", "ants/.DS_Store"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    folder = embedkit.image_folder(tmp_path)
    rel = [str(Path(p).relative_to(tmp_path)) for p in folder.paths]
    # Sorted, hidden entries skipped, a non-image file kept (it becomes an error record, not a silent drop).
    assert rel == ["top.jpg", "ants/a.jpg", "ants/deep/b.png", "bees/c.jpg", "bees/notes.txt"]
    assert folder.labels == ["", "ants", "ants", "bees", "bees"]
    assert folder.classes == ["", "ants", "bees"] and len(folder) == 5


def test_image_folder_refuses_a_file(tmp_path: Path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(embedkit.UnsupportedInputError):
        embedkit.image_folder(tmp_path / "f")


def test_every_line_of_a_file_list_is_an_item(tmp_path: Path):
    from embedkit.inputs.items import ItemFailure

    # A photo named "#2.jpg" is a file, not a comment; a blank line keeps its row (a not_found record).
    listing = tmp_path / "list.txt"
    listing.write_text("#2.jpg\nimgs/a.jpg\n\n/abs/b.jpg\n")
    assert file_list(listing) == [str(tmp_path / "#2.jpg"), str(tmp_path / "imgs/a.jpg"), "", "/abs/b.jpg"]
    items = list(iter_items(listing, "image"))
    assert len(items) == 4 == count_items(listing, "image")
    assert isinstance(items[2].payload, ItemFailure) and items[2].payload.code == "not_found"


def test_csv_and_jsonl_with_a_byte_order_mark(tmp_path: Path):
    table = tmp_path / "t.csv"
    table.write_bytes("\ufefftext,label\nhello,a\nworld,b\n".encode("utf-8"))
    assert payloads(table) == ["hello", "world"] == read_texts(table, "text")
    assert read_texts(table, "label") == ["a", "b"]
    lines = tmp_path / "t.jsonl"
    lines.write_bytes('\ufeff{"text": "hello"}\n{"text": "world"}\n'.encode("utf-8"))
    assert payloads(lines) == ["hello", "world"]
    tsv = tmp_path / "t.tsv"
    tsv.write_bytes("\ufefftext\tlabel\nhello\ta\n".encode("utf-8"))
    assert payloads(tsv) == ["hello"]


def test_tsv_text_starting_with_a_quote_keeps_every_row(tmp_path: Path):
    texts = ['"Quoted" at the start', "plain", '"an unclosed quote', 'a "middle" quote', "last"]
    tsv = tmp_path / "t.tsv"
    tsv.write_text("text\tlabel\n" + "".join(f"{t}\t{k}\n" for k, t in enumerate(texts)), encoding="utf-8")
    assert payloads(tsv) == texts  # read as written: no quote processing, 5 rows -> 5 items
    assert read_texts(tsv, "label") == ["0", "1", "2", "3", "4"]
    assert count_items(tsv, "text") == 5


def test_a_csv_cell_longer_than_the_csv_module_default(tmp_path: Path):
    long = "word " * 40_000  # 200,000 characters; the csv module's default limit is 131,072
    table = tmp_path / "t.csv"
    table.write_text(f"text\n\"{long}\"\nshort\n", encoding="utf-8")
    assert payloads(table) == [long, "short"]


def test_broken_csv_quoting_is_refused_not_guessed(tmp_path: Path):
    table = tmp_path / "t.csv"
    table.write_text('text\nfirst\n"an unclosed quote\nrow 3\nrow 4\n')  # would swallow rows 3 and 4
    with pytest.raises(embedkit.UnsupportedInputError, match="t.csv is not valid CSV in the row starting at line 3"):
        payloads(table)
    table.write_text('text\n"closed" then more\nrow 2\n')
    with pytest.raises(embedkit.UnsupportedInputError, match="starting at line 2"):
        payloads(table)


def test_records_over_the_limit_are_refused_unread(tmp_path: Path, monkeypatch):
    from embedkit.inputs import tables
    from embedkit.inputs.items import ItemFailure

    monkeypatch.setattr(tables, "MAX_RECORD_CHARS", 1000)  # the bound, small for the test
    lines = tmp_path / "t.jsonl"
    lines.write_text('{"text": "a"}\n{"text": "' + "x" * 5000 + '"}\n{"text": "b"}\n')
    got = payloads(lines)
    assert got[0] == "a" and got[2] == "b" and isinstance(got[1], ItemFailure) and got[1].code == "too_large"
    table = tmp_path / "t.csv"
    table.write_text("text\nshort\n" + "y" * 5000 + "\n")
    with pytest.raises(embedkit.UnsupportedInputError, match="line 3 is over 1000 characters"):
        payloads(table)


def test_count_items_counts_rows_not_lines(tmp_path: Path):
    table = tmp_path / "t.csv"
    table.write_text('text\n"one\nspread over\nthree lines"\ntwo\n"three, with a comma"\n')
    assert count_items(table, "text") == 3 == len(payloads(table))
    text = tmp_path / "t.txt"
    text.write_text("a\nb\nno final newline")
    assert count_items(text, "text") == 3 == len(payloads(text))
    lines = tmp_path / "t.jsonl"
    lines.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert count_items(lines, "text") == 2 == len(payloads(lines))


def test_a_bad_jsonl_line_is_that_items_failure(tmp_path: Path):
    from embedkit.inputs.items import ItemFailure

    lines = tmp_path / "t.jsonl"
    lines.write_text('{"text": "a"}\n{"text": \n[1, 2]\n{"text": "b"}\n')
    got = list(iter_items(lines, "text"))
    assert [i.payload.code if isinstance(i.payload, ItemFailure) else i.payload for i in got] == [
        "a", "invalid_json", "invalid_json", "b"]
    assert got[1].source == "t.jsonl:row 2"
    with pytest.raises(embedkit.UnsupportedInputError, match="line 2 is not JSON"):
        read_texts(lines, "text")  # labels and ids stay strict


def test_a_file_name_that_is_not_utf8(tmp_path: Path):
    from embedkit.inputs.files import read_regular

    name = os.fsdecode(b"caf\xe9.png")
    (tmp_path / name).write_bytes(b"data")
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"caf\xe9.png\n")
    for source in (tmp_path, listing):
        [item] = [i for i in iter_items(source, "image") if not str(i.payload).endswith("list.txt")]
        assert read_regular(item.payload, 100) == b"data"  # the payload opens the file
        assert item.source.endswith("caf\\xe9.png") and item.source.encode("utf-8")  # the locator is valid UTF-8
        assert item.id == content_id(b"data")


def test_a_long_txt_line_is_clipped_while_read_and_hashed_whole(tmp_path: Path):
    from embedkit.inputs.items import MAX_TEXT_BYTES, Clipped

    line = ("é" * 10 + " ") * (MAX_TEXT_BYTES // 10)  # 2 bytes per é: clipped at a character boundary
    text = tmp_path / "t.txt"
    text.write_bytes(line.encode() + b"\r\nnext\n")
    first, second = iter_items(text, "text")
    assert isinstance(first.payload, Clipped) and len(first.payload) <= MAX_TEXT_BYTES
    assert line.encode().startswith(first.payload) and first.payload.decode("utf-8")
    assert first.id == content_id(line.encode())  # the id hashes the whole line
    assert second.payload == b"next"


FIFO_SCRIPT = """
import json, sys
from embedkit.inputs.files import read_regular
from embedkit.inputs.sources import iter_items
from embedkit.inputs.items import ItemFailure
out = {}
for source in sys.argv[1:]:
    out[source] = [item.id[:4] for item in iter_items(source, "image")]
codes = []
for path in ("imgs/fifo.png", "imgs/zero.png"):
    try:
        read_regular(path, 1 << 20)
    except ItemFailure as exc:
        codes.append(exc.code)
out["codes"] = codes
print(json.dumps(out))
"""


def test_fifos_and_devices_are_refused_before_any_read(tmp_path: Path):
    (tmp_path / "imgs").mkdir()
    os.mkfifo(tmp_path / "imgs/fifo.png")
    (tmp_path / "imgs/zero.png").symlink_to("/dev/zero")
    (tmp_path / "list.txt").write_text("imgs/fifo.png\nimgs/zero.png\n")
    done = subprocess.run([sys.executable, "-c", FIFO_SCRIPT, str(tmp_path / "imgs/*.png"), "list.txt", "imgs"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["codes"] == ["not_a_file", "not_a_file"]
    # listed (never a silent drop), with locator ids instead of a hash that would read forever
    assert all(ids == ["src-", "src-"] for source, ids in out.items() if source != "codes") and len(out) == 4


def test_in_memory_image_ids_cover_what_defines_the_image():
    from embedkit.inputs.fingerprints import image_id

    indices = np.arange(64, dtype=np.uint8).reshape(8, 8)
    a, b = Image.fromarray(indices, "P"), Image.fromarray(indices, "P")
    a.putpalette([v for i in range(256) for v in (i, 0, 0)])
    b.putpalette([v for i in range(256) for v in (0, i, 0)])
    assert a.tobytes() == b.tobytes() and image_id(a, "") != image_id(b, "")
    c = b.copy()
    c.info["transparency"] = 3
    assert image_id(c, "") != image_id(b, "")
    array = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    assert image_id(array, "") != image_id(array.reshape(4, 12), "")
    assert image_id(array, "") != image_id(array.astype(np.uint16), "")
    assert image_id(array, "") == image_id(array.copy(), "") and image_id(a, "") == image_id(a.copy(), "")
    ids = [item.id for item in iter_items([a, b, array, array.reshape(4, 12)], "image")]
    assert len(set(ids)) == 4


def test_a_parquet_table_whose_name_is_not_utf8_is_read(tmp_path: Path):
    """README: file names that are not UTF-8 are opened as they are; a .parquet one crashed in
    pyarrow (UnicodeEncodeError: surrogates not allowed) in embed, extract and train-head."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(os.fsdecode(bytes(tmp_path) + b"/t\xfe.parquet"))
    with open(path, "wb") as f:
        pq.write_table(pa.table({"text": ["a card", "a rate"], "label": ["c", "r"]}), f)
    assert count_items(path, "text") == 2
    assert [item.payload for item in iter_items(path, "text", "text")] == ["a card", "a rate"]
    assert read_texts(path, "label") == ["c", "r"]


def test_csv_and_tsv_rows_with_the_wrong_number_of_cells_are_row_errors(tmp_path):
    from embedkit.inputs.items import ItemFailure
    from embedkit.inputs.sources import iter_items

    table = tmp_path / "t.csv"
    table.write_text("text,label\nfine text,a\nhello, world,b\ncut row\nlast,c\n")
    items = list(iter_items(table, "text", "text"))
    assert len(items) == 4  # one item per row, each in its place
    assert items[0].payload == "fine text" and items[3].payload == "last"
    assert isinstance(items[1].payload, ItemFailure) and items[1].payload.code == "invalid_row"
    assert "3 cells, the header 2" in items[1].payload.message  # was silently text 'hello'
    assert isinstance(items[2].payload, ItemFailure) and "1 cells" in items[2].payload.message
    tsv = tmp_path / "t.tsv"
    tsv.write_text("text\tlabel\na\tx\nb\tc\ty\n")
    rows = list(iter_items(tsv, "text", "text"))
    assert rows[0].payload == "a" and rows[1].payload.code == "invalid_row"
