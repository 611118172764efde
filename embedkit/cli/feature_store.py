"""The ``store`` command (inspect a feature store: info, verify, gc, failures; derive from it:
compact, calibration) and the compact-vector options that ``embed`` and ``extract`` share."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from .common import existing_dir, existing_file, non_negative_int, positive_int

PRECISIONS = ("float32", "int8", "uint8", "binary")
CALIBRATION_ROWS = 100_000  # embedkit.encoders.compact.CALIBRATION_ROWS (not imported: --help stays light)
ACTIONS = ("info", "verify", "gc", "failures", "compact", "calibration")
_VARIANT = ("precision", "dimensions", "long", "chunk_overlap", "max_chunks")
_APPLY = {  # the options each action takes, beyond PATH and --json
    "info": (), "verify": (), "gc": (),
    "failures": ("backbone",) + _VARIANT,
    "compact": ("backbone", "calibration_rows") + _VARIANT,
    "calibration": ("backbone", "out") + _VARIANT,
}


def two_or_more(text: str) -> int:
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected an integer >= 2, got {text}")
    return value


def add_compact_arguments(p: argparse.ArgumentParser, command: str) -> None:
    """``--precision``, ``--dimensions`` and (``embed``) ``--calibration`` or (``extract``) ``--calibration-rows``."""
    then = "the rows written" if command == "embed" else "besides the float32 vectors, a compact namespace derived from them"
    p.add_argument("--precision", default="float32", choices=PRECISIONS,
                   help=f"compact vectors: {then}, int8 / uint8 (per-dimension ranges calibrated on your own "
                   "vectors), binary (sign bits, 8 per byte) or float32 (default: float32, nothing compact)")
    p.add_argument("--dimensions", type=positive_int,
                   help="keep the first N dimensions of each vector, renormalised (default: all; a backbone not "
                   "trained for it loses quality)")
    if command == "embed":
        p.add_argument("--calibration", type=existing_file, metavar="FILE",
                       help="--precision int8 / uint8: the calibration record (JSON) to quantise with, as "
                       "`embedkit store calibration` writes it (required for int8 / uint8; no default)")
    else:
        p.add_argument("--calibration-rows", type=two_or_more, metavar="N",
                       help="--precision int8 / uint8, first run: fit the ranges on a seeded sample of at most N "
                       f"stored vectors, recorded and reused by every later run (default {CALIBRATION_ROWS})")


def compact_of_args(args: argparse.Namespace, artifact: Any, policy: dict[str, Any] | None = None) -> Any:
    """The Compact of ``embed --precision/--dimensions/--calibration`` (None: plain float32, as with
    ``--dimensions`` equal to the backbone's), checked against the artifact and the long-text
    ``policy`` (the encoder options of ``--long``...) before any work. Raises UsageError (a
    CalibrationMismatchError for a calibration fitted on another backbone or long-text policy)."""
    from ..encoder import checked_compact
    from ..encoders.calibrations import read_file
    from ..encoders.compact import Compact
    from ..errors import UsageError

    cal = fitted = None
    if args.calibration is not None:
        if args.precision not in ("int8", "uint8"):
            raise UsageError(f"--calibration applies to --precision int8 / uint8, not {args.precision}")
        cal, fitted = read_file(args.calibration)  # a missing or wrong sha256 is refused here
    elif args.precision in ("int8", "uint8"):
        raise UsageError(f"--precision {args.precision} needs --calibration FILE (write one from a feature store "
                         "with `embedkit store calibration STORE --backbone NAME -o FILE`)")
    return checked_compact(Compact(args.dimensions, args.precision, cal), fitted, artifact, policy or {},
                           what=f"--calibration {args.calibration}")


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("store", help="inspect a feature store: info | verify | gc | failures; derive from it: "
                       "compact | calibration")
    p.add_argument("action", choices=ACTIONS,
                   help="failures: the items that have no embedding, with id, source, stage, code and message; "
                   "compact: derive (or bring up to date) the compact namespace of a backbone's float vectors, "
                   "without running the model; calibration: write the int8 / uint8 ranges of a compact namespace "
                   "to --out, for `embedkit embed --calibration`")
    p.add_argument("path", type=existing_dir, help="feature store folder")
    p.add_argument("--backbone", help="failures: only this backbone's (name or digest prefix; default: every "
                   "backbone); compact, calibration: the backbone (required)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="compact, calibration: int8 (default), uint8, binary, float32 (with --dimensions); "
                   "failures: the variant (default float32)")
    p.add_argument("--dimensions", type=positive_int, help="compact, calibration, failures: dimensions kept (default: all)")
    p.add_argument("--long", choices=["truncate", "chunk"],
                   help="compact, calibration, failures: the vectors of truncated (default) or chunked long texts")
    p.add_argument("--chunk-overlap", type=non_negative_int, help="--long chunk: the chunk variant's overlap (default: any)")
    p.add_argument("--max-chunks", type=positive_int, help="--long chunk: the chunk variant's windows (default: any)")
    p.add_argument("--calibration-rows", type=two_or_more, metavar="N",
                   help=f"compact, first run: fit int8 / uint8 ranges on at most N stored vectors (default {CALIBRATION_ROWS})")
    p.add_argument("-o", "--out", help="calibration: the JSON file to write (required; an existing file is never "
                   "overwritten)")
    p.add_argument("--json", action="store_true")


def _check_action(args: argparse.Namespace) -> None:
    from ..errors import UsageError

    given = [k for k in ("backbone",) + _VARIANT + ("calibration_rows", "out") if getattr(args, k) is not None]
    extra = [k for k in given if k not in _APPLY[args.action]]
    if extra:
        names = ", ".join("--" + k.replace("_", "-") for k in extra)
        raise UsageError(f"{names} do not apply to `store {args.action}`")
    if args.action in ("compact", "calibration") and args.backbone is None:
        raise UsageError(f"`store {args.action}` needs --backbone NAME")
    if args.action == "calibration" and args.out is None:
        raise UsageError("`store calibration` needs --out FILE")
    if args.long != "chunk" and (args.chunk_overlap is not None or args.max_chunks is not None):
        raise UsageError("--chunk-overlap and --max-chunks apply with --long chunk")
    refuse_idle_calibration_rows(args, "int8")


def refuse_idle_calibration_rows(args: argparse.Namespace, default: str = "float32") -> None:
    """``--calibration-rows`` without ``--precision int8 / uint8`` would change nothing: UsageError."""
    from ..errors import UsageError

    precision = args.precision or default
    if getattr(args, "calibration_rows", None) is not None and precision not in ("int8", "uint8"):
        raise UsageError(f"--calibration-rows applies with --precision int8 / uint8 (the ranges it fits), "
                         f"not {precision}")


def _variant(args: argparse.Namespace, default: str) -> dict[str, Any]:
    return {"precision": args.precision or default, "dimensions": args.dimensions, "long": args.long or "truncate",
            "chunk_overlap": args.chunk_overlap, "max_chunks": args.max_chunks}


def cmd_store(args: argparse.Namespace) -> int:
    from ..errors import StoreError
    from ..features.store import FeatureStore

    _check_action(args)
    store = FeatureStore(args.path)
    root = Path(args.path)
    if args.action == "compact":
        return store_compact(store, args)
    if args.action == "calibration":
        return store_calibration(store, args)
    if not any(root.glob("*/*/namespace.json")) and not any(root.glob("*/*/commits")):
        if any(root.iterdir()):  # another folder given by mistake: say so (gc there would touch nothing anyway)
            raise StoreError(f"{root} is not a feature store: it holds no <backbone>/<digest>/namespace.json; "
                             "give the folder that `embedkit extract --out` wrote")
        print(f"{root} holds no features yet (an empty folder)", file=sys.stderr)
        return 0
    if args.action == "failures":
        return store_failures(store, args)
    if args.action == "info":
        rows = store.info()
        if args.json:
            print(json.dumps(rows, indent=2))
        for r in rows:
            if not args.json:
                print(f"{r['backbone']:<22} {r['digest'][:12]}  {r['variant'] or 'plain':<16} dim={r['dim']:<5} "
                      f"rows={r['rows']:<9} shards={r['shards']:<5} failures={r['failures']:<6} "
                      f"{r['precision']} d={r['dimensions']}: {r['vector_bytes']} bytes/vector "
                      f"({r['bytes_per_row']:.0f} stored per row) {r['bytes'] / 1e6:.1f} MB "
                      f"(+ cache {r['cache_bytes'] / 1e6:.1f} MB, derived: deletable)")
        return 0
    if args.action == "verify":
        found = store.verify(deep=True)
        bad = {k: [p.to_json() for p in v] for k, v in found.items() if v}
        if args.json:
            print(json.dumps({"namespaces": len(found), "problems": bad}, indent=2))
        else:
            for key, problems in bad.items():
                for p in problems:
                    print(f"{key}: shard {p['shard']}: {p['reason']}")
            print(f"{len(found)} namespace(s) checked, {sum(len(v) for v in bad.values())} damaged shard(s)"
                  + (" (a rerun of extract sets them aside and recomputes their items)" if bad else ""))
        return 1 if bad else 0
    removed = store.gc()
    if args.json:
        print(json.dumps(removed, indent=2))
    else:
        for key, counts in removed.items():
            print(f"{key}: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items()))
    return 0


def store_failures(store: Any, args: argparse.Namespace) -> int:
    """``store failures``: one record per item without an embedding (a later success supersedes a failure)."""
    spaces = [store.find(args.backbone, **_variant(args, "float32"))] if args.backbone else store.namespaces()
    records = [dict(backbone=ns.name, digest=ns.digest, variant=ns.tag, **f) for ns in spaces for f in ns.failures()]
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    for r in records:
        print(f"{r['backbone']}  {r['id']}  {r['source']}  {r['stage']}  {r['code']}: {r['message']}")
    print(f"{len(records)} failed item(s) in {len(spaces)} namespace(s)", file=sys.stderr)
    return 0


def store_compact(store: Any, args: argparse.Namespace) -> int:
    """``store compact``: :func:`embedkit.compact_features` of one backbone; the report on stdout with ``--json``."""
    from ..features.compaction import compact

    report = compact(store, args.backbone, **_variant(args, "int8"), calibration_rows=args.calibration_rows)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    print(report.summary(), file=sys.stderr)
    return 0


def store_calibration(store: Any, args: argparse.Namespace) -> int:
    """``store calibration``: the recorded ranges of an int8 / uint8 namespace, written to a new file."""
    from ..encoders.calibrations import policy_record
    from ..errors import OutputExistsError, OutputFolderMissingError, UsageError

    want = _variant(args, "int8")
    if want["precision"] not in ("int8", "uint8"):
        raise UsageError(f"only int8 / uint8 namespaces have a calibration, not {want['precision']}")
    out = Path(args.out)
    if os.path.lexists(out):
        raise OutputExistsError(f"{out} exists; `store calibration` never overwrites a file: give a new name")
    if not out.absolute().parent.is_dir():
        raise OutputFolderMissingError(f"cannot write {out}: its folder {out.absolute().parent} does not exist")
    ns = store.find(args.backbone, **want)
    cal = ns.compact.calibration
    # the full long-text policy of the vectors it was fitted on: embed and serve refuse it under another
    policy = {k: ns.variant.get(k) for k in ("long", "chunk_overlap", "max_chunks")} if ns.variant.get("long") else {}
    record = {"kind": "embedkit.calibration", "backbone": ns.name, "digest": ns.digest, "namespace": ns.key,
              "precision": ns.compact.precision, "dimensions": ns.compact.dimensions,
              **policy_record(policy), "calibration": cal.to_dict()}
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.link(tmp, out)  # never replaces: a file that appeared meanwhile is refused, not overwritten
    except FileExistsError:
        raise OutputExistsError(f"{out} exists; `store calibration` never overwrites a file: give a new name") from None
    finally:
        tmp.unlink(missing_ok=True)
    print(f"calibration {cal.digest[:12]} of {ns.key} ({cal.rows} rows of {cal.source}) -> {out}", file=sys.stderr)
    return 0


COMMANDS = {"store": cmd_store}
