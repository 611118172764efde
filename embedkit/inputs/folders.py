"""Image folders: their files, listed recursively in sorted order, labelled by class subfolder."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..errors import UnsupportedInputError


@dataclass
class ImageFolder:
    """Files under a folder, recursively, with labels from their class subfolders.

    ``root/ants/1.jpg`` gets the label ``ants``; files directly in ``root`` get ``""``.
    Every entry is listed except folders and hidden ones (``.DS_Store``, ``.git``): a file that
    is not a supported image (or not a regular file) becomes an error record when embedded,
    never a silent drop.
    """

    root: Path
    paths: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels))

    def __len__(self) -> int:
        return len(self.paths)


def image_folder(root: str | os.PathLike[str]) -> ImageFolder:
    """List an image folder in a stable (sorted) order; see :class:`ImageFolder`."""
    base = Path(root)
    if not base.is_dir():
        raise UnsupportedInputError(f"{base} is not a folder")
    found = ImageFolder(base)
    for path in walk_files(base):
        found.paths.append(path)
        found.labels.append(folder_label(base, path))
    return found


def folder_label(root: Path, path: str) -> str:
    """The class of a file in an image folder: its first subfolder under ``root`` (``""`` at the top)."""
    parts = Path(path).relative_to(root).parts
    return parts[0] if len(parts) > 1 else ""


def walk_files(root: Path) -> Iterator[str]:
    """Non-hidden entries under ``root`` that are not folders, recursively, sorted, lazily per folder.

    FIFOs, devices and dangling symlinks are listed too: reading them gives an error record
    (``not_a_file`` / ``not_found``), never a silent drop and never a hang.
    """
    for directory, subdirs, files in os.walk(root, followlinks=False):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield os.path.join(directory, name)
