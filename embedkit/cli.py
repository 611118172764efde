"""The ``embedkit`` command: one thin sub-command per public function.

Imports stay inside the commands so that ``embedkit --help`` never loads torch.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from .errors import EmbedkitError, UnsupportedInputError  # light: no heavy imports behind it
from .sources import read_texts  # light too: csv/json only, pyarrow imported on use

EXIT_FAILED_ITEMS = 2
OUTPUT_SUFFIXES = (".npy", ".parquet")


def _store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", help="model store folder (default: $EMBEDKIT_HOME or ./models)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embedkit", description="Frozen backbones -> ONNX -> fast embeddings.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("backbones", help="list registered backbones")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("plugins", help="list plugins with their version, status and errors")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("export", help="export a backbone to ONNX (reused when already exported)")
    p.add_argument("backbone", help="registered name or local model folder")
    p.add_argument("--exporter", default="auto", choices=["auto", "torchscript", "dynamo"])
    p.add_argument("--force", action="store_true", help="export again even if an artifact exists")
    p.add_argument("--fp16", action="store_true",
                   help="also make the fp16 variant for GPUs (<name>-fp16), gated against fp32 on the probes")
    _store_arg(p)

    p = sub.add_parser("check", help="run the backbone contract (embedkit.testing.check_backbone)")
    p.add_argument("backbone")

    p = sub.add_parser(
        "embed", help="embed texts or images: a text file (one text or image path per line), a CSV/TSV/JSONL/Parquet "
        "column, or (images) a folder",
    )
    p.add_argument("backbone")
    p.add_argument("input", help=".txt, .csv, .tsv, .jsonl, .parquet, or an image folder (class subfolders = labels)")
    p.add_argument("--out", required=True, help=".npy or .parquet")
    p.add_argument("--column", help="column holding the texts or image paths (tables; default text / path)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--runtime", default="auto", choices=["auto", "onnxruntime", "torch", "torch-compile"],
                   help="auto: the faster one measured by `embedkit tune` on this device")
    p.add_argument("--threads", type=int)
    p.add_argument("--no-truncate", action="store_true", help="text: texts over max length become errors")
    p.add_argument("--empty", default="embed", choices=["embed", "error"], help="text: empty texts")
    p.add_argument("--batch-size", type=int, help="images per batch (default 16 on CPU)")
    p.add_argument("--workers", type=int, help="image decoding threads (default: cores)")
    p.add_argument("--max-pixels", type=int, help="refuse larger images (decompression-bomb guard)")
    p.add_argument("--keep-blank", action="store_true", help="embed blank / placeholder graphics instead of refusing them")
    p.add_argument("--no-progress", action="store_true")
    _store_arg(p)

    p = sub.add_parser(
        "extract", help="extract features of a source into a feature store, resumable and exactly once",
    )
    p.add_argument("source", help="folder, glob, .txt, .csv, .tsv, .jsonl or .parquet")
    p.add_argument("--backbone", default="minilm-l6")
    p.add_argument("--out", required=True, help="feature store folder")
    p.add_argument("--column", help="payload column of a table (default text / path)")
    p.add_argument("--id-column", help="column of item ids (default: a hash of the content)")
    p.add_argument("--shard-size", type=int, help="source items per shard (default 4096 texts / 512 images)")
    p.add_argument("--max-failures", type=int, default=0, help="exit 2 when more items fail (default 0)")
    p.add_argument("--no-verify", action="store_true", help="skip checksumming the committed shards first")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--runtime", default="auto", choices=["auto", "onnxruntime", "torch", "torch-compile"],
                   help="auto: the faster one measured by `embedkit tune` on this device")
    p.add_argument("--threads", type=int)
    p.add_argument("--batch-size", type=int, help="images per batch")
    p.add_argument("--workers", type=int, help="image decoding threads")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _store_arg(p)

    p = sub.add_parser("store", help="inspect a feature store: info | verify | gc")
    p.add_argument("action", choices=["info", "verify", "gc"])
    p.add_argument("path", help="feature store folder")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("quantize", help="int8 variants for CPU, with a report of their cost on your data")
    p.add_argument("backbone")
    p.add_argument("--variant", action="append", choices=["dynamic", "dynamic-per-tensor", "static"],
                   help="repeatable (default: all three)")
    p.add_argument("--report", action="store_true", help="measure cosine to fp32, speed and head accuracy")
    p.add_argument("--data", help="your items: .txt, .csv, .tsv, .jsonl or .parquet (needed by --report and static)")
    p.add_argument("--column", help="payload column (default text / path)")
    p.add_argument("--label-column", help="labels for the head-accuracy column of the report")
    p.add_argument("--limit", type=int, default=2000, help="items used from --data (default 2000)")
    p.add_argument("--json", action="store_true")
    _store_arg(p)

    p = sub.add_parser("tune", help="measure ONNX Runtime vs torch for a backbone on this device; record the faster")
    p.add_argument("backbone", help="name, digest, or a variant's name (e.g. minilm-l6-fp16)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--runtime", action="append", choices=["onnxruntime", "torch", "torch-compile"],
                   help="repeatable (default: onnxruntime and torch; on CUDA also torch-compile)")
    p.add_argument("--data", help="a sample of your items (.txt, .csv, .tsv, .jsonl, .parquet); default: shipped sentences / probe images")
    p.add_argument("--column", help="payload column (default text / path)")
    p.add_argument("--limit", type=int, default=1000, help="items used from --data (default 1000)")
    p.add_argument("--seconds", type=float, default=2.0, help="minimum timing per runtime")
    p.add_argument("--json", action="store_true")
    _store_arg(p)

    p = sub.add_parser("train-head", help="train a head on cached features; metrics, confusion matrix, saved model")
    p.add_argument("features", help="feature store folder")
    p.add_argument("--backbone", default="minilm-l6")
    p.add_argument("--labels", required=True,
                   help="a table with id (or the extracted payload column) and label columns, or 'folder' "
                   "(images: the class subfolder)")
    p.add_argument("--label-column", default="label")
    p.add_argument("--id-column", help="id column of the labels table (default: id, else content ids)")
    p.add_argument("--column", help="payload column to recompute content ids from (default text / path)")
    p.add_argument("--head", default="logreg", choices=["logreg", "linear-svm", "ridge", "mlp", "knn", "faiss-knn"])
    p.add_argument("--param", action="append", default=[], help="head parameter key=value (repeatable)")
    p.add_argument("--cv", type=int, default=0, help="also report k-fold accuracy")
    p.add_argument("--test-size", type=float, default=0.2)
    p.add_argument("--out", required=True, help="folder for the saved model, report.json and confusion.png")
    p.add_argument("--json", action="store_true")
    _store_arg(p)

    p = sub.add_parser("predict", help="predict with a saved model from raw inputs")
    p.add_argument("model")
    p.add_argument("inputs", nargs="+", help="texts or image paths")
    p.add_argument("--trust-pickle", action="store_true", help="allow a pickle head you made yourself")
    _store_arg(p)

    p = sub.add_parser("index", help="build a nearest-neighbour index over stored features")
    p.add_argument("features", help="feature store folder")
    p.add_argument("--backbone", default="minilm-l6")
    p.add_argument("--out", required=True, help="index folder")
    p.add_argument("--metric", default="cosine", choices=["cosine", "euclidean", "inner_product"])
    p.add_argument("--kind", default="auto", choices=["auto", "flat", "hnsw", "ivfpq"])
    p.add_argument("--memory-budget-mb", type=float)

    p = sub.add_parser("search", help="nearest stored items for raw queries (texts or image paths)")
    p.add_argument("index", help="index folder made by `embedkit index`")
    p.add_argument("queries", nargs="+")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--json", action="store_true")
    _store_arg(p)

    p = sub.add_parser("report", help="learning curves: frozen-backbone head vs a from-scratch baseline")
    p.add_argument("features", help="feature store folder")
    p.add_argument("--backbone", default="minilm-l6")
    p.add_argument("--labels", required=True, help="the labelled table that was extracted, or 'folder' for images")
    p.add_argument("--label-column", default="label")
    p.add_argument("--column", help="payload column (default text / path)")
    p.add_argument("--head", default="logreg", choices=["logreg", "linear-svm", "ridge", "mlp", "knn", "faiss-knn"])
    p.add_argument("--param", action="append", default=[])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", required=True, help="folder for learning_curve.csv and learning_curve.png")

    p = sub.add_parser("demo", help="the built-in demo: MiniLM + LogisticRegression on a Banking77 sample")
    _store_arg(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(COMMANDS[args.command](args) or 0)
    except EmbedkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def cmd_backbones(args: argparse.Namespace) -> int:
    from .plugins import list_backbones, registry

    rows = [dict(b.spec(), plugin=registry().owner.get(b.name)) for b in list_backbones()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        print(f"{r['name']:<24} {r['modality']:<6} dim={r['dim']:<5} plugin={r['plugin']:<10} {r['license']:<12} {r['description']}")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from .plugins import plugin_report

    report = [p.to_json() for p in plugin_report()]
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for p in report:
        print(f"{p['name']:<16} {p['distribution']} {p['version']:<10} {p['status']:<7} backbones: {', '.join(p['backbones']) or '-'}")
        for e in p["errors"]:
            print(f"    error: {e}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .exporter import export

    artifact = export(args.backbone, args.store, exporter=args.exporter, force=args.force)
    parity = artifact.manifest["parity"]
    print(f"{artifact.name} {artifact.digest}")
    print(f"  path     {artifact.path}")
    print(f"  exporter {parity['exporter']}  max|diff| {parity['max_abs_diff']:.3g}  min cosine {parity['min_cosine']:.8f}")
    if args.fp16:
        from .precision import half

        variant = half(artifact, args.store)
        parity = variant.manifest["precision"]["parity"]
        print(f"{variant.name} {variant.digest}")
        print(f"  path     {variant.path}")
        print(f"  fp16 vs fp32  max|diff| {parity['max_abs_diff']:.3g}  min cosine {parity['min_cosine']:.8f}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .testing import check_backbone

    report = check_backbone(args.backbone)
    for rule in report["rules"]:
        print(f"ok  {rule}")
    parity = report["parity"]
    print(f"{report['backbone']}: all rules pass (parity max|diff| {parity['max_abs_diff']:.3g}, "
          f"min cosine {parity['min_cosine']:.8f}; batch invariance {report['batch_invariance_max_abs_diff']:.3g})")
    return 0


def read_images(path: Path, column: str) -> tuple[list[Any], dict[str, list[Any]]]:
    """Image items (paths) and extra output columns from a folder, a file list or a table."""
    from .sources import file_list, image_folder

    if path.is_dir():
        folder = image_folder(path)
        return list(folder.paths), {"path": folder.paths, "label": folder.labels}
    if path.suffix.lower() == ".txt":
        items = file_list(path)
        return list(items), {"path": items}
    if not path.is_file():
        raise UnsupportedInputError(f"{path} is neither a folder nor a file")
    values = read_texts(path, column)
    # Paths in a table are relative to the table's folder, as in a file list.
    items = [str(path.parent / v) if isinstance(v, str) and v and not Path(v).is_absolute() else v for v in values]
    return items, {column: values}


def cmd_embed(args: argparse.Namespace) -> int:
    import numpy as np

    from .encoder import encoder_for
    from .exporter import resolve

    out = Path(args.out)
    if out.suffix not in OUTPUT_SUFFIXES:  # checked before any work; np.save would append .npy
        raise UnsupportedInputError(f"--out {out.name}: the output must end in {' or '.join(OUTPUT_SUFFIXES)}")
    artifact = resolve(args.backbone, args.store)
    extra: dict[str, list[Any]] = {}
    if artifact.modality == "image":
        items, extra = read_images(Path(args.input), args.column or "path")
        encoder = encoder_for(
            artifact, device=args.device, threads=args.threads, runtime=args.runtime, batch_size=args.batch_size,
            workers=args.workers, max_pixels=args.max_pixels, reject_blank=not args.keep_blank,
        )
        unit = "image"
    else:
        items = read_texts(Path(args.input), args.column or "text")
        encoder = encoder_for(artifact, device=args.device, threads=args.threads, runtime=args.runtime,
                              truncate=not args.no_truncate, empty=args.empty)
        unit = "text"
    from tqdm import tqdm

    with tqdm(total=len(items), unit=unit, disable=args.no_progress, file=sys.stderr) as bar:
        result = encoder.encode(items, progress=bar.update)
    errors_path = out.with_name(out.name + ".errors.jsonl")
    if out.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        by_row = {e.index: e for e in result.errors}
        columns = {"row": np.arange(len(items))}
        columns.update({k: [v if isinstance(v, (str, type(None))) else repr(type(v)) for v in vs] for k, vs in extra.items()})
        table = pa.table({
            **columns,
            "ok": result.ok,
            "embedding": pa.FixedSizeListArray.from_arrays(result.vectors.reshape(-1), artifact.dim),
            "error_code": [by_row[i].code if i in by_row else None for i in range(len(items))],
            "error_message": [by_row[i].message if i in by_row else None for i in range(len(items))],
        })
        table = table.replace_schema_metadata({"embedkit.digest": artifact.digest, "embedkit.backbone": artifact.name})
        pq.write_table(table, out)
    else:
        np.save(out, result.vectors)
    with open(errors_path, "w") as f:
        for e in result.errors:
            record = e.to_json()
            if "path" in extra:  # images: the file is the item's id
                record["path"] = extra["path"][e.index]
            f.write(json.dumps(record) + "\n")
    s = result.stats
    detail = f", {s.truncated} truncated, {s.empty} empty" if unit == "text" else ""
    print(f"{s.total} {unit}s: {s.ok} ok, {s.failed} failed{detail}; "
          f"{s.total / max(result.seconds, 1e-9):.0f} {unit}s/s -> {out} (errors: {errors_path.name})", file=sys.stderr)
    return EXIT_FAILED_ITEMS if s.failed else 0


def cmd_extract(args: argparse.Namespace) -> int:
    from .exporter import resolve
    from .extraction import extract
    from .sources import count_items

    artifact = resolve(args.backbone, args.store)
    options: dict[str, Any] = {"device": args.device, "threads": args.threads, "runtime": args.runtime}
    if artifact.modality == "image":
        options.update(batch_size=args.batch_size, workers=args.workers)
    elif args.batch_size or args.workers:
        raise UnsupportedInputError("--batch-size and --workers apply to image backbones")
    from tqdm import tqdm

    total = None if args.no_progress else count_items(args.source, artifact.modality)
    with tqdm(total=total, unit="item", disable=args.no_progress, file=sys.stderr, smoothing=0.1) as bar:
        report = extract(
            args.source, artifact, args.out, column=args.column, id_column=args.id_column,
            shard_size=args.shard_size, verify=not args.no_verify, progress=bar.update, **options,
        )
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    print(report.summary(), file=sys.stderr)
    if report.failed > args.max_failures:
        print(f"error: {report.failed} items failed (--max-failures {args.max_failures}); "
              f"see `embedkit store info {args.out}` and the failure records", file=sys.stderr)
        return EXIT_FAILED_ITEMS
    return 0


def cmd_store(args: argparse.Namespace) -> int:
    from .store import FeatureStore

    store = FeatureStore(args.path)
    if not Path(args.path).is_dir():
        raise UnsupportedInputError(f"{args.path} is not a feature store folder")
    if args.action == "info":
        rows = store.info()
        if args.json:
            print(json.dumps(rows, indent=2))
        for r in rows:
            if not args.json:
                print(f"{r['backbone']:<22} {r['digest'][:12]}  dim={r['dim']:<5} rows={r['rows']:<9} "
                      f"shards={r['shards']:<5} failures={r['failures']:<6} {r['bytes'] / 1e6:.1f} MB")
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


def cmd_tune(args: argparse.Namespace) -> int:
    from .exporter import resolve
    from .sources import iter_items
    from .tuning import tune

    artifact = resolve(args.backbone, args.store)
    items = None
    if args.data:
        items = [item.payload for _, item in zip(range(args.limit), iter_items(Path(args.data), artifact.modality, args.column))]
    record = tune(artifact, args.device, items=items, seconds=args.seconds, runtimes=tuple(args.runtime) if args.runtime else None)
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    print(f"{artifact.name} {artifact.digest[:12]} on {record['device']} ({record['items']} items, end to end)")
    for name, row in record["candidates"].items():
        if "error" in row:
            print(f"  {name:<12} cannot run here: {row['error']}")
            continue
        gate = "passes" if row["passes"] else "FAILS"
        print(f"  {name:<12} {row['items_per_s']:9.1f} items/s  parity max|diff| {row['parity']['max_abs_diff']:.3g} "
              f"min cos {row['parity']['min_cosine']:.6f} ({gate})")
    print(f"choice: {record['choice']} (recorded; encoders with runtime='auto' on this device use it)")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from .exporter import resolve
    from .quantization import VARIANTS, quantization_report, quantize
    from .sources import iter_items

    variants = args.variant or list(VARIANTS)
    base = resolve(args.backbone, args.store)
    items: list[Any] = []
    labels: list[Any] | None = None
    if args.data:
        path = Path(args.data)
        items = [item.payload for _, item in zip(range(args.limit), iter_items(path, base.modality, args.column))]
        if args.label_column:
            labels = [row for _, row in zip(range(args.limit), read_texts(path, args.label_column))]
    if (args.report or "static" in variants) and not items:
        raise UnsupportedInputError("--report and the static variant need --data (a sample of your items)")
    if not args.report:
        for variant in variants:
            art = quantize(base, variant, calibration=items[:256], store=args.store)
            print(f"{art.name} {art.digest}\n  path {art.path}")
        return 0
    rows = quantization_report(base, items, labels, variants=variants, store=args.store)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{len(items)} items from {Path(args.data).name}; measured on a 30 % held-out part")
    header = f"{'variant':<20} {'items/s':>8} {'speed':>6} {'mean cos':>9} {'min cos':>8} {'MB':>6}"
    print(header + ("  accuracy" if labels is not None else ""))
    for r in rows:
        line = (f"{r['variant']:<20} {r['items_per_s']:8.0f} {r['speedup']:5.2f}x {r['mean_cosine']:9.4f} "
                f"{r['min_cosine']:8.4f} {r['size_mb']:6.1f}")
        print(line + (f"  {r['accuracy']:.4f}" if labels is not None else ""))
    return 0


def cmd_train_head(args: argparse.Namespace) -> int:
    import numpy as np

    from .training import parse_params, train_head

    report, model = train_head(
        args.features, args.backbone, args.labels, head=args.head, params=parse_params(args.param), out=args.out,
        label_column=args.label_column, id_column=args.id_column, column=args.column, cv=args.cv,
        test_size=args.test_size, store=args.store,
    )
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0
    print(f"{args.head} on {args.backbone}: {report.n_train} train / {report.n_test} held-out items, "
          f"{report.classes} classes, {report.unlabelled} stored items without a label")
    print(f"accuracy {report.accuracy:.4f}  macro-F1 {report.macro_f1:.4f}  fit {report.fit_seconds:.2f}s"
          + (f"  {args.cv}-fold accuracy {np.mean(report.cv_accuracy):.4f} +- {np.std(report.cv_accuracy):.4f}"
             if report.cv_accuracy else ""))
    print(f"model -> {model}; per-class report -> {Path(args.out) / 'report.json'}; "
          f"confusion matrix -> {Path(args.out) / 'confusion.png'}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .persistence import load

    model = load(args.model, store=args.store, trust_pickle=args.trust_pickle)
    for item, label in zip(args.inputs, model.predict(list(args.inputs))):
        print(f"{label}\t{item}")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from .persistence import save_index

    path = save_index(args.features, args.backbone, args.out, metric=args.metric, index=args.kind,
                      memory_budget_mb=args.memory_budget_mb)
    meta = json.loads((path / "index.json").read_text())
    print(f"{meta['rows']} items of {meta['backbone']['name']} ({meta['backbone']['digest'][:12]}), "
          f"{meta['kind']} index, {meta['metric']} -> {path}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from .persistence import search

    results = search(args.index, list(args.queries), k=args.k, store=args.store)
    if args.json:
        print(json.dumps([{"query": q, "neighbours": r} for q, r in zip(args.queries, results)], indent=2))
        return 0
    for query, hits in zip(args.queries, results):
        print(f"# {query}")
        for rank, hit in enumerate(hits, start=1):
            if "error" in hit:
                print(f"  error {hit['error']}: {hit['message']}")
            else:
                print(f"  {rank:>3}  {hit['distance']:.4f}  {hit['id']}  {hit['source']}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    import numpy as np

    from .sources import iter_items
    from .store import FeatureStore
    from .training import _baseline_features, labels_for, learning_curve, parse_params, plot_learning_curve

    namespace = FeatureStore(args.features).find(args.backbone)
    modality = namespace.info.get("modality", "text")
    ids, X, sources = namespace.load_with_sources()
    y = labels_for(ids, sources, args.labels, modality, args.label_column, None, args.column)
    if modality == "image":
        payloads = [str(s) for s in sources]
    else:
        if args.labels == "folder":
            raise UnsupportedInputError("text reports need --labels TABLE (its text column feeds the TF-IDF baseline)")
        by_id = {item.id: item.payload for item in iter_items(Path(args.labels), modality, args.column)}
        payloads = [by_id.get(str(i)) for i in ids]
    known = np.asarray([v is not None and v == v and v != "" for v in y]) & np.asarray([p is not None for p in payloads])
    raw = _baseline_features(modality, [p for p, k in zip(payloads, known) if k])
    rows = learning_curve(np.asarray(X)[known], raw, np.asarray(y[known]).astype(str), modality, args.head,
                          parse_params(args.param), repeats=args.repeats)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "learning_curve.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_learning_curve(rows, out / "learning_curve.png", f"{namespace.name}: {args.head} vs from-scratch baseline")
    print(f"{'per class':>9} {'items':>6}  {'model':<28} {'accuracy':>8} {'train s':>8}")
    summary: dict[tuple[Any, str], list[dict[str, Any]]] = {}
    for r in rows:
        summary.setdefault((r["per_class"], r["model"]), []).append(r)
    for (size, model), group in summary.items():
        print(f"{size!s:>9} {group[0]['train_items']:>6}  {model:<28} {np.mean([g['accuracy'] for g in group]):8.4f} "
              f"{np.mean([g['train_seconds'] for g in group]):8.3f}")
    print(f"-> {out / 'learning_curve.csv'}, {out / 'learning_curve.png'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run

    run(sys.stdout, store=args.store)
    return 0


COMMANDS = {
    "backbones": cmd_backbones,
    "plugins": cmd_plugins,
    "export": cmd_export,
    "check": cmd_check,
    "embed": cmd_embed,
    "extract": cmd_extract,
    "store": cmd_store,
    "quantize": cmd_quantize,
    "tune": cmd_tune,
    "train-head": cmd_train_head,
    "predict": cmd_predict,
    "index": cmd_index,
    "search": cmd_search,
    "report": cmd_report,
    "demo": cmd_demo,
}

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
