"""Pieces every command group shares: exit codes, output suffixes, the ``--store`` option."""
from __future__ import annotations

import argparse

EXIT_FAILED_ITEMS = 2
OUTPUT_SUFFIXES = (".npy", ".parquet")


def store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", help="model store folder (default: $EMBEDKIT_HOME or ./models)")
