"""Image folders and file lists: every non-hidden file listed, labels from class subfolders."""
from pathlib import Path

import pytest

import embedkit
from embedkit.sources import file_list


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


def test_file_list_resolves_relative_paths(tmp_path: Path):
    listing = tmp_path / "list.txt"
    listing.write_text("# a comment\nimgs/a.jpg\n\n/abs/b.jpg\n")
    assert file_list(listing) == [str(tmp_path / "imgs/a.jpg"), "/abs/b.jpg"]
