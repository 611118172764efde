"""Commands on heads: train-head, predict, report."""
from __future__ import annotations

import argparse
import contextlib
import importlib.abc
import json
import sys
from pathlib import Path
from typing import Any, Iterator

from ..errors import UnsupportedInputError, UsageError
from ..inputs.sources import read_texts
from .common import (
    backbone_arg,
    existing_dir,
    folds,
    fraction,
    input_or_stdin,
    labels_source,
    long_args,
    namespace_of,
    positive_int,
    progress_bar,
    published_dir,
    store_arg,
    variant_args,
)
from .common import flag_errors as common_flag_errors

HEAD_CHOICES = ["logreg", "linear-svm", "ridge", "mlp", "knn", "faiss-knn", "binary-knn"]
PRECISIONS = ("float32", "int8", "uint8", "binary")

# The library's errors name its Python parameters: one about a single parameter starts with its
# name ("params: ..."), a keyword to pass is written name=value. The user typed flags: name those.
FLAGS = {"params": "--param", "labels": "--labels", "label_column": "--label-column", "id_column": "--id-column",
         "column": "--column", "head": "--head", "cv": "--cv", "test_size": "--test-size", "repeats": "--repeats",
         "finetune": "--finetune", "unfreeze": "--unfreeze", "epochs": "--epochs", "iterations": "--iterations",
         "finetune_max_items": "--finetune-max-items"}
KEYWORDS = {"trust_pickle=True": "--trust-pickle", "objective='contrastive'": "--finetune contrastive",
            "objective='classify'": "--finetune classify", "objective must be": "--finetune must be",
            "draw the learning curve without a fine-tuned line": "leave out --finetune"}


def _flags(message: str) -> str:
    """``message`` with the head commands' flags in place of the Python parameters it names."""
    name, sep, rest = message.partition(": ")
    if sep and name in FLAGS:
        message = f"{FLAGS[name]}: {rest}"
    for keyword, flag in KEYWORDS.items():
        message = message.replace(keyword, flag)
    return message


def flag_errors() -> Any:
    """Re-raise a library error with the CLI's flags in place of the Python parameters it names."""
    return common_flag_errors(_flags)


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """``--param`` values, ``["C=10", "weights=distance"]`` -> ``{"C": 10, "weights": "distance"}``
    (JSON values when they parse)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UnsupportedInputError(f"--param takes key=value, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("train-head", help="train a head on cached features; metrics, confusion matrix, saved model")
    p.add_argument("features", type=existing_dir, help="feature store folder")
    backbone_arg(p)
    p.add_argument("--labels", required=True, type=labels_source,
                   help="a table with id (or the extracted payload column) and label columns, or 'folder' "
                   "(images: the class subfolder)")
    p.add_argument("--label-column", default="label",
                   help="default: label; read as strings, each distinct value a class name (0.5 and 1.5 are two "
                        "classes, not numbers: the heads are classifiers)")
    p.add_argument("--id-column", help="id column of the labels table (default: id, else content ids)")
    p.add_argument("--column", help="payload column to recompute content ids from (default text / path)")
    p.add_argument("--head", default="logreg", choices=HEAD_CHOICES, help="default: logreg")
    p.add_argument("--param", action="append", default=[], help="head parameter key=value (repeatable)")
    p.add_argument("--cv", type=folds, default=0, help="also report k-fold accuracy (folds >= 2; default 0: off)")
    p.add_argument("--test-size", type=fraction, default=0.2, help="held-out fraction (default 0.2)")
    p.add_argument("--out", required=True, help="folder for the saved model, report.json and confusion.png")
    p.add_argument("--precision", default="float32", choices=PRECISIONS,
                   help="train on the backbone's compact namespace of this precision (made by extract --precision "
                   "or `store compact`): the head fits on the rows restored to float32 (Compact.restore), and the "
                   "saved model makes every new item compact with the same recorded calibration first "
                   "(default float32)")
    p.add_argument("--dimensions", type=positive_int,
                   help="train on the namespace of vectors truncated to N dimensions, renormalised (default: all)")
    long_args(p, "train on")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    store_arg(p)

    p = sub.add_parser("predict", help="predict with a saved model from raw inputs (arguments, a file, or stdin)")
    p.intermixed = True  # predict MODEL --proba "text" as well as predict MODEL "text" --proba
    p.add_argument("model", type=published_dir("model.json"), help="a model folder saved by train-head (its model/ folder)")
    p.add_argument("inputs", nargs="*", help="texts or image paths")
    p.add_argument("--input", type=input_or_stdin, metavar="FILE",
                   help="also read inputs from FILE (.txt: one per line; .csv/.tsv/.jsonl/.parquet: --column), "
                   "or '-' for standard input, one per line")
    p.add_argument("--column", help="column of an --input table (default text / path)")
    p.add_argument("--proba", action="store_true", help="also print the predicted class's probability and the top 3")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per input line (with every class's probability when --proba)")
    p.add_argument("--trust-pickle", action="store_true", help="allow a pickle head you made yourself")
    p.add_argument("--backbone", help="the backbone to embed with (default: the one the model records); any other "
                   "artifact than the head was trained on, e.g. a fine-tune of it, is refused")
    store_arg(p)

    p = sub.add_parser("report", help="learning curves: frozen-backbone head vs a from-scratch baseline")
    p.add_argument("features", type=existing_dir, help="feature store folder")
    backbone_arg(p)
    p.add_argument("--labels", required=True, type=labels_source,
                   help="the labelled table that was extracted, or 'folder' for images")
    p.add_argument("--label-column", default="label",
                   help="default: label; read as strings, each distinct value a class name (0.5 and 1.5 are two "
                        "classes, not numbers: the heads are classifiers)")
    p.add_argument("--column", help="payload column (default text / path)")
    p.add_argument("--head", default="logreg", choices=HEAD_CHOICES, help="default: logreg")
    p.add_argument("--param", action="append", default=[], help="head parameter key=value (repeatable)")
    p.add_argument("--repeats", type=positive_int, default=3, help="random subsets per size (default 3)")
    p.add_argument("--finetune", choices=["contrastive", "classify"],
                   help="also fine-tune the backbone at the affordable sizes (one subset each): contrastive "
                   "(SetFit, texts) or classify; needs the backbone's torch module")
    p.add_argument("--finetune-max-items", type=positive_int,
                   help="fine-tune only at sizes of at most this many training items (default 256)")
    p.add_argument("--unfreeze", help="with --finetune: head, last:N or all (default: all for contrastive, "
                   "last:2 for classify)")
    p.add_argument("--epochs", type=positive_int, help="with --finetune: epochs (default: 1 contrastive, 3 classify)")
    p.add_argument("--iterations", type=positive_int,
                   help="with --finetune contrastive: sentence pairs per item and kind (SetFit's num_iterations; "
                   "default 5)")
    p.add_argument("--out", required=True, help="folder for learning_curve.csv and learning_curve.png")
    p.add_argument("--no-progress", action="store_true")


def cmd_train_head(args: argparse.Namespace) -> int:
    import numpy as np

    from ..heads.training import train_head

    namespace = namespace_of(args.features, args.backbone, **variant_args(args))
    chunked = {k: namespace.variant[k] for k in ("long", "chunk_overlap", "max_chunks") if k in namespace.variant}
    params = parse_params(args.param)
    with flag_errors(), progress_bar("train-head", 1 + args.cv, "fit", not args.no_progress) as bar:
        report, model = train_head(
            args.features, namespace.digest, args.labels, head=args.head, params=params, out=args.out,
            label_column=args.label_column, id_column=args.id_column, column=args.column, cv=args.cv,
            test_size=args.test_size, store=args.store, progress=bar.update_to, precision=args.precision,
            dimensions=args.dimensions, **chunked,
        )
    for note in report.notes + numeric_label_notes(report.per_class, args.label_column):
        print(f"note: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0
    compact = "" if args.precision == "float32" and args.dimensions is None else \
        f" {args.precision} features" + (f" of {args.dimensions} dimensions" if args.dimensions else "")
    if chunked:
        compact += (f" of chunked texts (overlap {chunked['chunk_overlap']}, at most {chunked['max_chunks']} windows; "
                    "new texts are chunked the same way)")
    print(f"{args.head} on {namespace.name} ({namespace.digest[:12]}){compact}: {report.n_train} train / {report.n_test} "
          f"held-out items, {report.classes} classes, {report.unlabelled} stored items without a label")
    print(f"accuracy {report.accuracy:.4f}  macro-F1 {report.macro_f1:.4f}  fit {report.fit_seconds:.2f}s"
          + (f"  {args.cv}-fold accuracy {np.mean(report.cv_accuracy):.4f} +- {np.std(report.cv_accuracy):.4f}"
             if report.cv_accuracy else ""))
    print(f"model -> {model}; per-class report -> {Path(args.out) / 'report.json'}; "
          f"confusion matrix -> {Path(args.out) / 'confusion.png'}")
    return 0


def numeric_label_notes(per_class: dict[str, Any], column: str) -> list[str]:
    """A note when the class names look like measurements (``0.5``, ``1.5``): the CLI reads labels
    as strings, so each distinct value became a class of a classifier; say so rather than let a
    user believe a regression was trained."""
    import math

    names = [k for k, v in per_class.items() if isinstance(v, dict) and k not in ("macro avg", "weighted avg")]
    values = []
    for name in names:
        try:
            values.append(float(name))
        except ValueError:
            return []
    if not values or all(math.isfinite(v) and v == int(v) and "." not in n for v, n in zip(values, names)):
        return []  # integer codes (0, 1, 2) are ordinary class names
    shown = ", ".join(repr(n) for n in names[:5]) + (" ..." if len(names) > 5 else "")
    return [f"labels are read as strings: the {len(names)} distinct values of {column!r} ({shown}) were trained as "
            "classes of a classifier, not as numbers; embedkit's heads classify (for a numeric target, train a "
            "regressor on the stored features in Python: embedkit.FeatureStore(...).load(...))"]


@contextlib.contextmanager
def _skops_without_torch() -> Iterator[None]:
    """Import ``skops.io`` without importing torch.

    At import, skops lists scikit-learn's estimators (``all_estimators``), which walks every
    scikit-learn package, ``sklearn.externals.array_api_compat.torch`` included: that imports
    torch, over a second of every ``predict`` call, for nothing predict uses. That one package
    is unimportable while skops imports (the walk skips packages that fail to import); later
    imports of it work as usual.
    """
    blocked = "sklearn.externals.array_api_compat.torch"

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
            if name == blocked or name.startswith(blocked + "."):
                raise ImportError(f"{name} is not needed to load a head")
            return None

    finder = Block()
    if "skops.io" not in sys.modules and "torch" not in sys.modules:
        sys.meta_path.insert(0, finder)
    try:
        try:
            import skops.io  # noqa: F401
        except ImportError:
            pass  # persistence.load names the missing package
        yield
    finally:
        if finder in sys.meta_path:
            sys.meta_path.remove(finder)


def _read_inputs(args: argparse.Namespace, modality: str) -> list[Any]:
    """Inputs from the arguments, then ``--input`` (a file, or ``-`` for stdin), in that order."""
    items: list[Any] = list(args.inputs)
    if args.input == "-":
        items += [line.rstrip("\r\n") for line in sys.stdin]
    elif args.input:
        path = Path(args.input)
        if path.suffix.lower() == ".txt":
            lines = [v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else v for v in read_texts(path, "")]
            if modality == "image":  # paths in a list are relative to the list's folder, as in extract
                lines = [str(path.parent / v) if v and not Path(v).is_absolute() else v for v in lines]
            items += lines
        else:
            items += read_texts(path, args.column or ("path" if modality == "image" else "text"))
    if not items:
        raise UsageError("embedkit predict: no inputs; give texts or image paths, --input FILE, or --input - (stdin)")
    return items


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    with _skops_without_torch():
        from ..heads.persistence import load

        with flag_errors():
            model = load(args.model, store=args.store, trust_pickle=args.trust_pickle, backbone=args.backbone)
    items = _read_inputs(args, getattr(model.steps[0][1], "modality_", "text"))
    head = model.steps[-1][1]
    if args.proba and not hasattr(head, "predict_proba"):
        raise UsageError(f"embedkit predict: this model's head ({type(head).__name__}) gives no probabilities; "
                         "drop --proba, or train a head that has them (logreg, mlp, knn, faiss-knn)")
    from ..errors import InvalidInputError

    failed: dict[int, Any] = {}
    try:
        proba, labels = _predict(model, head, items, args.proba)
    except InvalidInputError as exc:  # some items failed: the others are still predicted, the run exits 2
        failed = {e.index: e for e in exc.errors}
        good = [i for i in range(len(items)) if i not in failed]
        proba, labels = _predict(model, head, [items[i] for i in good], args.proba) if good else (None, [])
        where = dict(zip(good, range(len(good))))
        labels = [labels[where[i]] if i in where else None for i in range(len(items))]
        if proba is not None:
            proba = [proba[where[i]] if i in where else None for i in range(len(items))]
    classes = np.asarray(head.classes_) if args.proba else None
    for i, (item, label) in enumerate(zip(items, labels)):
        shown = item if isinstance(item, str) else str(item)
        if i in failed:
            error = failed[i]
            if args.json:
                print(json.dumps({"input": shown, "error_code": error.code, "error_message": error.message}))
            else:
                print(f"!{error.code}\t{shown}")
            continue
        if args.json:
            record: dict[str, Any] = {"input": shown, "label": str(label)}
            if proba is not None:
                record["probability"] = float(proba[i].max())
                record["proba"] = {str(c): float(p) for c, p in zip(classes, proba[i])}
            print(json.dumps(record))
        elif proba is not None:
            top = np.argsort(-proba[i])[:3]
            print(f"{label}\t{proba[i].max():.4f}\t{shown}\t(top 3: "
                  + ", ".join(f"{classes[j]} {proba[i][j]:.3f}" for j in top) + ")")
        else:
            print(f"{label}\t{shown}")
    if failed:
        first = failed[min(failed)]
        print(f"error: {len(failed)} of {len(items)} input(s) could not be embedded (first: item {first.index}: "
              f"{first.code}: {first.message}); the others are predicted", file=sys.stderr)
        return 2
    return 0


def _predict(model: Any, head: Any, items: list[Any], with_proba: bool) -> tuple[Any, Any]:
    """(probabilities or None, labels) for ``items``."""
    import numpy as np

    if not with_proba:
        return None, model.predict(items)
    proba = np.asarray(model.predict_proba(items))
    return proba, np.asarray(head.classes_)[proba.argmax(axis=1)]


def cmd_report(args: argparse.Namespace) -> int:
    from ..evaluation import report

    if not args.finetune and (args.unfreeze or args.epochs or args.finetune_max_items or args.iterations):
        raise UsageError("--unfreeze, --epochs, --finetune-max-items and --iterations set how the report "
                         "fine-tunes: add --finetune contrastive|classify")
    if args.iterations and args.finetune != "contrastive":  # was ignored silently
        raise UsageError("--iterations is an option of --finetune contrastive")
    namespace = namespace_of(args.features, args.backbone)
    params = parse_params(args.param)
    with flag_errors(), progress_bar("report", None, "fit", not args.no_progress) as bar:
        result = report(args.features, namespace.digest, args.labels, args.out, head=args.head, params=params,
                        label_column=args.label_column, column=args.column, repeats=args.repeats,
                        finetune=args.finetune, unfreeze=args.unfreeze, epochs=args.epochs,
                        iterations=args.iterations, finetune_max_items=args.finetune_max_items,
                        progress=bar.update_to)
    print(f"{'per class':>9} {'items':>6}  {'model':<34} {'accuracy':>8} {'train s':>8}")
    for row in result.summary():
        print(f"{row['per_class']!s:>9} {row['train_items']:>6}  {row['model']:<34} {row['accuracy']:8.4f} "
              f"{row['train_seconds']:8.3f}")
    print(f"-> {result.files['csv']}, {result.files['png']}")
    return 0


COMMANDS = {
    "train-head": cmd_train_head,
    "predict": cmd_predict,
    "report": cmd_report,
}
