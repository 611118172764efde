"""Commands on heads and search: train-head, predict, index, search, report."""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

from ..errors import UnsupportedInputError
from .common import (backbone_arg, existing_dir, existing_file, folds, fraction, input_or_stdin, labels_source,
                     namespace_of, positive_float, positive_int, store_arg)


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("train-head", help="train a head on cached features; metrics, confusion matrix, saved model")
    p.add_argument("features", type=existing_dir, help="feature store folder")
    backbone_arg(p)
    p.add_argument("--labels", required=True, type=labels_source,
                   help="a table with id (or the extracted payload column) and label columns, or 'folder' "
                   "(images: the class subfolder)")
    p.add_argument("--label-column", default="label")
    p.add_argument("--id-column", help="id column of the labels table (default: id, else content ids)")
    p.add_argument("--column", help="payload column to recompute content ids from (default text / path)")
    p.add_argument("--head", default="logreg", choices=["logreg", "linear-svm", "ridge", "mlp", "knn", "faiss-knn"])
    p.add_argument("--param", action="append", default=[], help="head parameter key=value (repeatable)")
    p.add_argument("--cv", type=folds, default=0, help="also report k-fold accuracy (folds >= 2; default 0: off)")
    p.add_argument("--test-size", type=fraction, default=0.2, help="held-out fraction (default 0.2)")
    p.add_argument("--out", required=True, help="folder for the saved model, report.json and confusion.png")
    p.add_argument("--json", action="store_true")
    store_arg(p)

    p = sub.add_parser("predict", help="predict with a saved model from raw inputs")
    p.add_argument("model", type=existing_dir, help="a model folder saved by train-head (its model/ folder)")
    p.add_argument("inputs", nargs="+", help="texts or image paths")
    p.add_argument("--trust-pickle", action="store_true", help="allow a pickle head you made yourself")
    store_arg(p)

    p = sub.add_parser("index", help="build a nearest-neighbour index over stored features")
    p.add_argument("features", type=existing_dir, help="feature store folder")
    backbone_arg(p)
    p.add_argument("--out", required=True, help="index folder")
    p.add_argument("--metric", default="cosine", choices=["cosine", "euclidean", "inner_product"])
    p.add_argument("--kind", default="auto", choices=["auto", "flat", "hnsw", "ivfpq"])
    p.add_argument("--memory-budget-mb", type=positive_float, help="index memory budget in MB (auto kind)")

    p = sub.add_parser("search", help="nearest stored items for raw queries (texts or image paths)")
    p.add_argument("index", type=existing_dir, help="index folder made by `embedkit index`")
    p.add_argument("queries", nargs="+")
    p.add_argument("-k", type=positive_int, default=10, help="neighbours per query (default 10)")
    p.add_argument("--json", action="store_true")
    store_arg(p)

    p = sub.add_parser("report", help="learning curves: frozen-backbone head vs a from-scratch baseline")
    p.add_argument("features", type=existing_dir, help="feature store folder")
    backbone_arg(p)
    p.add_argument("--labels", required=True, type=labels_source, help="the labelled table that was extracted, or 'folder' for images")
    p.add_argument("--label-column", default="label")
    p.add_argument("--column", help="payload column (default text / path)")
    p.add_argument("--head", default="logreg", choices=["logreg", "linear-svm", "ridge", "mlp", "knn", "faiss-knn"])
    p.add_argument("--param", action="append", default=[])
    p.add_argument("--repeats", type=positive_int, default=3, help="random subsets per size (default 3)")
    p.add_argument("--out", required=True, help="folder for learning_curve.csv and learning_curve.png")


def cmd_train_head(args: argparse.Namespace) -> int:
    import numpy as np

    from ..training import parse_params, train_head

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
    from ..persistence import load

    model = load(args.model, store=args.store, trust_pickle=args.trust_pickle)
    for item, label in zip(args.inputs, model.predict(list(args.inputs))):
        print(f"{label}\t{item}")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from ..persistence import save_index

    path = save_index(args.features, args.backbone, args.out, metric=args.metric, index=args.kind,
                      memory_budget_mb=args.memory_budget_mb)
    meta = json.loads((path / "index.json").read_text())
    print(f"{meta['rows']} items of {meta['backbone']['name']} ({meta['backbone']['digest'][:12]}), "
          f"{meta['kind']} index, {meta['metric']} -> {path}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from ..persistence import search

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

    from ..sources import iter_items
    from ..store import FeatureStore
    from ..training import _baseline_features, labels_for, learning_curve, parse_params, plot_learning_curve

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


COMMANDS = {
    "train-head": cmd_train_head,
    "predict": cmd_predict,
    "index": cmd_index,
    "search": cmd_search,
    "report": cmd_report,
}
