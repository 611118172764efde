"""Pieces every command group shares: exit codes, output suffixes, the ``--models`` option."""
from __future__ import annotations

import argparse

EXIT_FAILED_ITEMS = 2
OUTPUT_SUFFIXES = (".npy", ".parquet")
MODEL_STORE_HELP = (
    "model store folder (default: $EMBEDKIT_HOME, else the user cache folder; "
    "`embedkit backbones` prints where it is); --store is the older spelling"
)


def store_arg(p: argparse.ArgumentParser) -> None:
    """``--models DIR`` (alias ``--store``): the model store, stored in ``args.store``."""
    p.add_argument("--models", "--store", dest="store", metavar="DIR", help=MODEL_STORE_HELP)
