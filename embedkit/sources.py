"""Inputs -> items: image folders and file lists (streaming readers arrive with extraction)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UnsupportedInputError


@dataclass
class ImageFolder:
    """Files under a folder, recursively, with labels from their class subfolders.

    ``root/ants/1.jpg`` gets the label ``ants``; files directly in ``root`` get ``""``.
    Every regular file is listed except hidden ones (``.DS_Store``, ``.git``): a file that is
    not a supported image becomes an error record when embedded, never a silent drop.
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
    for directory, subdirs, files in os.walk(base, followlinks=False):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(directory) / name
            if not path.is_file():
                continue
            relative = path.relative_to(base)
            found.paths.append(str(path))
            found.labels.append(relative.parts[0] if len(relative.parts) > 1 else "")
    return found


def file_list(path: str | os.PathLike[str]) -> list[str]:
    """Paths from a text file, one per line; relative paths are taken from the list's folder."""
    listing = Path(path)
    items = []
    for line in listing.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            items.append(str(listing.parent / line) if not os.path.isabs(line) else line)
    return items
