"""The Banking77 sample shipped in ``embedkit/data/banking77`` (CC BY 4.0; see its README):
the demo's data and ``tune``'s default text sample, so neither needs a download."""
from __future__ import annotations

import csv
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "data" / "banking77"


def load_split(split: str) -> tuple[list[str], list[str]]:
    """Texts and intent labels of the shipped sample (``train`` or ``test``)."""
    with open(DATA / f"{split}.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], [r["category"] for r in rows]
