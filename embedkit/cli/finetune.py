"""The finetune command: a backbone + labelled raw items -> a new backbone and a saved classifier.

The source and the label join are train-head's (:func:`embedkit.inputs.sources.iter_items`,
:func:`embedkit.heads.training.labels_for`); the work is :func:`embedkit.finetune`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..errors import DatasetError, EmbedkitError, OutputError, UsageError
from ..fs.locks import owned
from .common import (
    EXIT_FAILED_ITEMS,
    existing_or_glob,
    fraction,
    labels_source,
    non_negative_float,
    positive_float,
    positive_int,
    progress_bar,
    store_arg,
)

# What :func:`embedkit.finetune`'s messages say in Python parameters, said in this command's flags
# (its checkpoint_dir is <--out>/checkpoints, its resume is --resume).
FLAGS = {"choose another checkpoint_dir": "choose another --out",
         "without resume to start over": "without --resume to start over",
         "start without resume": "start without --resume",
         "run of this checkpoint_dir that made it, run again with resume": "run of this --out that made it, run "
                                                                           "again with --resume",
         "give store= ": "give --store ",
         "(lower lr / head_lr": "(lower --lr / --head-lr",
         "lower lr / head_lr": "lower --lr / --head-lr",
         "lower lr ": "lower --lr ",
         "max_grad_norm=1.0": "--max-grad-norm 1.0",
         "choose another name": "choose another --name",
         "resume with its settings": "--resume with its settings",
         "the run of this checkpoint_dir": "the run of this --out",
         "this checkpoint_dir holds no checkpoints": "this --out holds no checkpoints",
         "resume finishes a run only from its own checkpoint folder: give that run's checkpoint_dir":
             "--resume finishes a run only from its own --out: give that run's --out",
         "are in this checkpoint_dir": "are in this --out",
         "run again with resume (from the": "run again with --resume (from the"}


def _in_flags(exc: EmbedkitError) -> None:
    """Replace, in ``exc``'s message, the Python parameters it names with this command's flags."""
    if len(exc.args) == 1 and isinstance(exc.args[0], str):
        message = exc.args[0]
        for parameter, flag in FLAGS.items():
            message = message.replace(parameter, flag)
        exc.args = (message,)


def _unfreeze(text: str) -> str:
    from ..backbones.blocks import parse_unfreeze

    try:
        return str(parse_unfreeze(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _decay(text: str) -> float:
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


def _warmup(text: str) -> float:
    value = non_negative_float(text)
    if value >= 1 and not float(value).is_integer():
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1) or a whole number of steps, got {text}")
    return int(value) if value >= 1 else value


def _zero(text: str) -> bool:
    """Whether ``text`` is a number equal to zero (``0``, ``0.00``, ``-0``, ``1e-400``) or none / off."""
    if text.strip().lower() in ("none", "off"):
        return True
    try:
        return float(text) == 0.0
    except ValueError:
        return False


def _clipping(text: str) -> float | None:
    """``--max-grad-norm``: a positive number, or 0 / none / off: no gradient clipping (max_grad_norm=None)."""
    if _zero(text):
        return None
    try:
        return positive_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive number, or 0 / none for no clipping, got {text}") from None


def _validation(text: str) -> float:
    """``--validation``: a fraction in (0, 1), or 0 / none (numerically: ``0.0`` too): no validation."""
    return 0.0 if _zero(text) else fraction(text)


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("finetune", help="fine-tune a backbone (head, last:N blocks, or all) on labelled raw items; "
                       "the result is a new backbone and a saved classifier")
    p.add_argument("backbone", help="the backbone to start from (name or spec)")
    p.add_argument("source", type=existing_or_glob,
                   help="the items: an image folder, a .txt (one text or image path per line), or a CSV/TSV/JSONL/"
                   "Parquet column (--column)")
    p.add_argument("--labels", required=True, type=labels_source,
                   help="a table with id (or the payload column) and label columns, or 'folder' (images: the class subfolder)")
    p.add_argument("--label-column", default="label", help="default: label")
    p.add_argument("--id-column", help="id column of the source and labels tables (default: content ids)")
    p.add_argument("--column", help="payload column of a table source (default text / path)")
    p.add_argument("--validation", type=_validation, default=0.1,
                   help="held-out fraction of the source for validation (default 0.1; 0: none)")
    p.add_argument("--validation-source", type=existing_or_glob,
                   help="validation items instead of a held-out fraction (labels from --validation-labels)")
    p.add_argument("--validation-labels", type=labels_source,
                   help="labels of --validation-source (default: --labels)")
    p.add_argument("--unfreeze", type=_unfreeze, default="last:2", help="head | last:N | all (default last:2)")
    p.add_argument("--objective", choices=["classify", "contrastive"], default="classify")
    p.add_argument("--iterations", type=positive_int, help="contrastive: pair-sampling iterations (SetFit's)")
    p.add_argument("--loss", choices=["cosine", "in-batch"],
                   help="contrastive: cosine (SetFit's pairs, default) or in-batch (in-batch negatives; "
                        "--batch-size classes per batch)")
    p.add_argument("--epochs", type=positive_int, default=3, help="default 3")
    p.add_argument("--batch-size", type=positive_int, default=32, help="default 32")
    p.add_argument("--lr", type=positive_float, default=2e-5, help="backbone learning rate (default 2e-5)")
    p.add_argument("--head-lr", type=positive_float, default=1e-3, help="head learning rate (default 1e-3)")
    p.add_argument("--layer-decay", type=_decay, help="layer-wise lr decay per block from the last one down, in (0, 1]")
    p.add_argument("--weight-decay", type=non_negative_float, default=0.01, help="AdamW weight decay (default 0.01)")
    p.add_argument("--warmup", type=_warmup, default=0.1, help="warm-up: fraction of the steps, or steps (default 0.1)")
    p.add_argument("--max-grad-norm", type=_clipping, default=1.0,
                   help="gradient clipping: the largest gradient norm (default 1.0; 0 or none: no clipping)")
    p.add_argument("--patience", type=positive_int, help="early stopping: epochs without a better validation accuracy")
    p.add_argument("--class-weight", choices=["balanced"], help="weight the loss by inverse class frequency")
    p.add_argument("--seed", type=int, default=0, help="default 0")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"], help="default cpu (cuda: mixed precision)")
    p.add_argument("--no-augment", action="store_true", help="images: no random resized crop / flip while training")
    p.add_argument("--checkpoint-every", type=positive_int, metavar="K",
                   help="also checkpoint every K steps (always: each epoch)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--name", help="name of the new backbone (default <backbone>+ft-<hash>)")
    p.add_argument("--out", required=True, help="folder for model/, checkpoints/, metrics.json, failures.jsonl "
                   "(missing folders above it are created, and removed again if the run is refused before training)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-progress", action="store_true")
    store_arg(p)


def _labelled(source: str, labels: str, modality: str, args: argparse.Namespace, split: str = "train"
              ) -> tuple[list[Any], list[Any], list[dict[str, Any]], list[tuple[int, str]]]:
    """``(payloads, labels, unreadable rows)`` of a source joined to its labels as train-head joins them."""
    import numpy as np

    from ..heads.training import labels_for
    from ..inputs.fingerprints import fingerprint
    from ..inputs.items import ItemFailure
    from ..inputs.sources import iter_items

    items = list(iter_items(source, modality, args.column, args.id_column))
    if not items:
        raise DatasetError(f"{source} holds no items")
    ids = np.asarray([i.id for i in items], dtype=object)
    sources = np.asarray([i.source for i in items], dtype=object)
    contents = np.asarray([fingerprint(i.payload, modality) or "" for i in items], dtype=object)
    values = labels_for(ids, sources, labels, modality, args.label_column, args.id_column, args.column, contents)
    bad = [{"index": n, "code": i.payload.code, "stage": i.payload.stage, "message": i.payload.message,
            "source": i.source, "split": split}
           for n, i in enumerate(items) if isinstance(i.payload, ItemFailure)]
    skip = {b["index"] for b in bad}
    missing = [items[n].source for n, v in enumerate(values) if n not in skip and (v is None or v == "")]
    if missing:
        raise DatasetError(f"{len(missing)} of {len(items)} items of {source} have no label in {labels} (e.g. "
                           f"{', '.join(missing[:3])}); label them or leave them out of the source")
    keep = [n for n in range(len(items)) if n not in skip]
    where = [(n, str(items[n].source)) for n in keep]  # each kept item's index and locator in the source
    return [items[n].payload for n in keep], [values[n] for n in keep], bad, where


@contextmanager
def _removed_if_refused(out: Path, created: bool) -> Iterator[None]:
    """Remove the run folder this run created when the run stops before its first checkpoint
    (a setting refused once the backbone is built, e.g. ``last:N`` beyond its blocks, or Ctrl-C):
    a folder of a run that never trained, marked "running", is only litter. A folder holding a
    checkpoint stays for ``--resume``; one holding anything embedkit did not write stays too."""
    from ..finetuning.checkpoints import LAST
    from ..fs.outputs import foreign_entries

    try:
        yield
    except BaseException:
        if created and not (out / "checkpoints" / LAST).exists() and foreign_entries(out, "finetune") == []:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _make_parents(out: Path) -> list[Path]:
    """Create the missing folders above ``out`` (``--out runs/ants`` with no ``runs/`` yet, as a user
    types it); returns those created, innermost first, for :func:`_remove_parents`.

    Raises:
        OutputFolderMissingError: a file stands where one of them should be (named).
        OutputError: one cannot be created (a read-only folder); names it.
    """
    from ..fs.outputs import check_folders_above

    check_folders_above(out, "finetune")
    missing = []
    for folder in out.absolute().parents:
        if os.path.lexists(folder):
            break
        missing.append(folder)
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            missing.remove(folder)  # made meanwhile by someone else: not ours to remove
        except OSError as exc:
            _remove_parents([m for m in missing if m.is_dir() and m != folder])
            raise OutputError(f"cannot create the folder {folder} for --out {out}: {exc.strerror or exc}") from exc
    return missing


def _remove_parents(created: list[Path]) -> None:
    """Remove the folders :func:`_make_parents` created, innermost first, while they are empty (a
    run refused before it wrote anything leaves no folder behind; nothing else is ever removed)."""
    for folder in created:
        try:
            folder.rmdir()
        except OSError:  # not empty (the run wrote into it, or someone else did): it stays
            return


def cmd_finetune(args: argparse.Namespace) -> int:
    created = _make_parents(Path(args.out))
    try:
        return _finetune(args)
    except BaseException:
        _remove_parents(created)
        raise


def _finetune(args: argparse.Namespace) -> int:
    from ..backbones.registry import get_backbone
    from ..finetuning.checkpoints import LAST, check_folder
    from ..fs.outputs import check_output

    try:  # checkpoints without a readable marker, or a folder in a file's place: said so, not "not embedkit's"
        check_folder(Path(args.out) / "checkpoints", args.resume)
    except EmbedkitError as exc:
        _in_flags(exc)
        raise
    out = check_output(args.out, "finetune", inputs=[args.source, args.validation_source])
    for flag, value in (("--iterations", args.iterations), ("--loss", args.loss)):
        if value and args.objective != "contrastive":
            raise UsageError(f"{flag} is an option of --objective contrastive")
    if args.objective == "contrastive" and (args.resume or args.checkpoint_every):
        raise UsageError("--resume and --checkpoint-every are for --objective classify (a contrastive run is "
                         "short and keeps no checkpoints: rerun it)")
    if args.resume and not (out / "checkpoints" / LAST).is_file():
        best = " (its best.safetensors, of a run stopped in its first epoch, is discarded)" \
            if (out / "checkpoints" / "best.safetensors").is_file() else ""
        print(f"note: no checkpoint in {out} yet: starting from the beginning{best}", file=sys.stderr)
    modality = get_backbone(args.backbone).modality
    items, labels, unreadable, where = _labelled(args.source, args.labels, modality, args)
    located = {"train": where}
    validation: Any = args.validation
    if args.validation_source:
        v_items, v_labels, v_bad, located["validation"] = _labelled(
            args.validation_source, args.validation_labels or args.labels, modality, args, "validation")
        unreadable += v_bad
        validation = (v_items, v_labels)
    created = not out.exists()
    before = set(os.listdir(out)) if out.is_dir() else set()
    out.mkdir(exist_ok=True)
    writer = contextlib.ExitStack()
    if not writer.enter_context(owned(out / "finetune.lock")):  # held until the command ends
        writer.close()
        if not before:
            (out / "finetune.lock").unlink(missing_ok=True)
        raise OutputError(f"another `embedkit finetune` is writing {out} now; wait for it to end, or choose "
                          "another --out")
    started: list[bool] = []
    try:
        with writer:
            return _run(args, out, created, items, labels, unreadable, validation, located, started)
    except BaseException:
        if not started:  # refused before training: --out is left as it was (what this run added goes)
            _undo(out, before)
        raise


def _undo(out: Path, before: set[str]) -> None:
    """Remove what a run refused before training added to ``out`` (its lock file, its checkpoint
    folder while that holds no checkpoint); anything that was there before stays, as does anything
    embedkit did not write."""
    from ..finetuning.checkpoints import LAST, MARKER

    for name in ("finetune.lock", "finetune.json"):
        if name not in before:
            (out / name).unlink(missing_ok=True)
    folder = out / "checkpoints"
    if "checkpoints" not in before and folder.is_dir() and not folder.is_symlink() and not (folder / LAST).exists():
        if all(p.name in ("checkpoint.lock", MARKER) for p in folder.iterdir()):
            shutil.rmtree(folder, ignore_errors=True)


def _located(failure: dict[str, Any], located: dict[str, list[tuple[int, str]]]) -> dict[str, Any]:
    """A failure record of :func:`embedkit.finetune` (index into the items it was given, which
    leave out the source's unreadable rows) with the item's index and locator in its source."""
    where = located.get(failure.get("split", "train"))
    if where is None or not 0 <= failure.get("index", -1) < len(where):
        return failure
    index, source = where[failure["index"]]
    return {**failure, "index": index, "source": source}


def _run(args: argparse.Namespace, out: Path, created: bool, items: list[Any], labels: list[Any],
         unreadable: list[dict[str, Any]], validation: Any, located: dict[str, list[tuple[int, str]]],
         started: list[bool]) -> int:
    """The fine-tune itself, its outputs and summary (the caller holds ``out``'s writer lock).
    ``finetune.json`` says "running" from the first training step on (``started`` is then
    ``[True]``): a run refused by a check leaves the last run's record as it was."""
    from ..finetuning.finetune import finetune
    from ..fs.atomic import write_atomic
    from ..fs.outputs import stamp

    marker = {**stamp("finetune"), "status": "running", "backbone": args.backbone, "source": str(args.source)}

    def begun() -> None:
        if not started:
            write_atomic(out / "finetune.json", json.dumps(marker, indent=2).encode())
            started.append(True)

    options = {k: v for k, v in (("iterations", args.iterations), ("loss", args.loss)) if v}
    with _removed_if_refused(out, created), progress_bar("finetune", None, "step", not args.no_progress) as bar:
        def progress(done: int, total: int, info: dict[str, Any]) -> None:
            begun()
            bar.update_to(done, total)
            shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in info.items() if v is not None}
            bar.set_postfix(shown, refresh=False)

        try:
            result = finetune(
                args.backbone, items, labels, unfreeze=args.unfreeze, objective=args.objective, epochs=args.epochs,
                batch_size=args.batch_size, lr=args.lr, head_lr=args.head_lr, layer_decay=args.layer_decay,
                weight_decay=args.weight_decay, warmup=args.warmup, max_grad_norm=args.max_grad_norm,
                validation=validation, patience=args.patience, class_weight=args.class_weight, seed=args.seed,
                device=args.device, augment=not args.no_augment,
                checkpoint_dir=out / "checkpoints" if args.objective == "classify" else None,
                checkpoint_every=args.checkpoint_every, resume=args.resume, name=args.name, store=args.store,
                out=out / "model", progress=progress, **options)
        except EmbedkitError as exc:  # said in this command's flags
            _in_flags(exc)
            raise
    begun()
    failures = unreadable + [_located(f, located) for f in result.failures]
    write_atomic(out / "metrics.json", json.dumps(result.history, indent=2).encode())
    write_atomic(out / "failures.jsonl", "".join(json.dumps(f) + "\n" for f in failures).encode())
    summary = {"backbone": result.backbone, "digest": result.digest, "parent": result.parent,
               "parent_digest": result.parent_digest, "model": str(result.model_path), "failed_items": len(failures),
               "history": result.history, "warnings": result.warnings, "seconds": result.seconds}
    write_atomic(out / "finetune.json", json.dumps({**marker, **summary, "status": "done"}, indent=2).encode())
    for warning in result.warnings:  # kept, but it looks wrong: said, and recorded in the lineage
        print(f"warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        last = result.history[-1] if result.history else {}
        val = f", validation accuracy {last['val_accuracy']:.4f}" if last.get("val_accuracy") is not None else ""
        print(f"{result.backbone} ({result.digest[:12]}), fine-tuned from {result.parent} ({result.parent_digest[:12]}) "
              f"in {result.seconds:.1f}s{val}")
        print(f"model -> {result.model_path}; per-epoch metrics -> {out / 'metrics.json'}")
    if failures:
        print(f"{len(failures)} items could not be used (excluded): see {out / 'failures.jsonl'}", file=sys.stderr)
        return EXIT_FAILED_ITEMS
    return 0


COMMANDS = {"finetune": cmd_finetune}
