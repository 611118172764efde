"""Commands about backbones and artifacts: backbones, plugins, export, check, tune, quantize, demo."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import UnsupportedInputError
from ..inputs.sources import read_texts
from ..runtimes.table import INT8, RUNTIMES
from .common import existing_file, positive_float, positive_int, progress_bar, store_arg


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("backbones", help="list registered backbones, their exports and variants, and where the model "
                       "store is; --remove NAME removes a fine-tune")
    p.add_argument("--json", action="store_true")
    p.add_argument("--remove", metavar="NAME",
                   help="remove the fine-tuned backbone NAME (its weights, exports and their variants) from the model "
                   "store; refused while a fine-tune of it is in the store, or a model `embedkit finetune` saved on it "
                   "is still at the folder it was saved to (a saved model moved elsewhere is not seen)")
    store_arg(p)

    p = sub.add_parser("plugins", help="list plugins with their version, status and errors")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("export", help="export a backbone to ONNX (reused when already exported)")
    p.add_argument("backbone", help="registered name or local model folder")
    p.add_argument("--exporter", default="auto", choices=["auto", "torchscript", "dynamo"])
    p.add_argument("--force", action="store_true", help="export again even if an artifact exists")
    p.add_argument("--fp16", action="store_true",
                   help="also make the fp16 variant for GPUs (<name>-fp16), gated against fp32 on the probes")
    store_arg(p)

    p = sub.add_parser("check", help="run the backbone contract (embedkit.testing.check_backbone)")
    p.add_argument("backbone")

    p = sub.add_parser("tune", help="measure runtimes and precisions (ONNX Runtime, torch, OpenVINO; fp32, bf16, int8) "
                                    "for a backbone on this device; record the fastest that passes the gate")
    p.add_argument("backbone", help="name, digest, or a variant's name (e.g. minilm-l6-fp16)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--runtime", action="append", type=runtime_name,
                   help=f"repeatable: {', '.join(RUNTIMES)}, int8-<variant> (default: every candidate for this "
                        "device and CPU, see embedkit.runtimes.candidates)")
    p.add_argument("--data", type=existing_file, help="a sample of your items (.txt, .csv, .tsv, .jsonl, .parquet); default: shipped sentences / probe images")
    p.add_argument("--column", help="payload column (default text / path)")
    p.add_argument("--limit", type=positive_int, default=1000, help="items used from --data (default 1000)")
    p.add_argument("--seconds", type=positive_float, default=2.0, help="minimum timing per runtime (default 2.0)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    store_arg(p)

    p = sub.add_parser("quantize", help="int8 variants for CPU, with a report of their cost on your data")
    p.add_argument("backbone")
    p.add_argument("--variant", action="append", choices=["dynamic", "dynamic-per-tensor", "static"],
                   help="repeatable (default: all three)")
    p.add_argument("--report", action="store_true", help="measure cosine to fp32, speed and head accuracy")
    p.add_argument("--data", type=existing_file, help="your items: .txt, .csv, .tsv, .jsonl or .parquet (needed by --report and static)")
    p.add_argument("--column", help="payload column (default text / path)")
    p.add_argument("--label-column", help="labels for the head-accuracy column of the report")
    p.add_argument("--limit", type=positive_int, default=2000, help="items used from --data (default 2000)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    store_arg(p)

    p = sub.add_parser("demo", help="the built-in demo: MiniLM + LogisticRegression on a Banking77 sample")
    store_arg(p)


def cmd_backbones(args: argparse.Namespace) -> int:
    from ..backbones.registry import list_backbones, registry
    from ..models.store import ModelStore, describe_root

    if args.remove is not None:
        return _remove_finetune(args)
    store = ModelStore(args.store)
    inventory = store.inventory()
    from ..models.finetuned import listing

    rows = [dict(b.spec(), plugin=registry().owner.get(b.name)) for b in list_backbones()]
    registered = {r["name"] for r in rows}
    # fine-tunes kept in this model store: backbones too, each naming its parent (and its digest)
    rows += [dict(b.spec(), plugin=None, finetuned=True,
                  parent_digest=(b.lineage.get("parent") or {}).get("digest")) for b in listing(store.root)]
    for r in rows:  # exports of this backbone, and the variants made from them
        r["exported"] = [a for a in inventory if a["kind"] == "export" and a["name"] == r["name"]]
        own = {a["digest"] for a in r["exported"]}
        # made from its exports and named after it: a head-only fine-tune's fp16 shares its parent's digest
        r["variants"] = [a for a in inventory if a["kind"] != "export" and a["parent"] in own
                         and a["name"] == f"{r['name']}-{a['kind']}"]
    listed = {a["digest"] for r in rows for a in r["exported"] + r["variants"]}
    others = [a for a in inventory if a["digest"] not in listed]  # from folders, or whose parent is gone
    if args.json:
        # One row per registered backbone (as before), then one per artifact of no registered backbone.
        print(json.dumps(rows + [dict(a, registered=False) for a in others], indent=2))
        return 0
    print(f"model store: {describe_root(args.store)}")
    tuned_rows = [r for r in rows if r.get("finetuned")]
    for r in rows:
        if r.get("finetuned"):
            continue
        print(f"{r['name']:<24} {r['modality']:<6} dim={r['dim']:<5} plugin={r['plugin'] or '-':<16} {r['license']:<12} {r['description']}")
        _artifact_lines(r)
    if tuned_rows:  # their own section: they need their parent's plugin to be built again, not to be used
        print("fine-tuned backbones in the store (name, modality/dim, parent):")
        for r in tuned_rows:
            print(f"    {r['name']:<30} {r['modality']}/{r['dim']:<5} parent {r['parent']} "
                  f"{(r['parent_digest'] or '?')[:12]}")
            _artifact_lines(r, "    ")
    if others:
        print("other artifacts in the store (exported from a folder or spec, or whose parent is gone):")
        for a in others:
            parent = f"parent {a['parent_name'] or '?'} {a['parent'][:12]}" if a["parent"] else ""
            print(f"    {a['name']:<30} {a['kind']:<20} {a['digest'][:12]}  {parent}".rstrip())
    if not registered:
        print("no backbones registered: is a plugin such as embedkit-text installed?")
    return 0


def _remove_finetune(args: argparse.Namespace) -> int:
    """``backbones --remove NAME``: one fine-tune out of the model store, saying what was checked,
    or one ``error:`` line (with ``--json``, also a JSON error object on stdout)."""
    from ..models.finetuned import remove

    removed = remove(args.remove, args.store)
    checked = ("the fine-tunes in the model store, and the saved models `finetune` recorded, at the folders they "
               "were saved to (a saved model moved elsewhere is not seen)")
    summary = {"removed": removed.name, "folder": str(removed.folder), "exports": removed.digests,
               "variants": removed.variants, "checked": checked, "checked_models": removed.checked_models,
               "missing_models": removed.missing_models, "kept": removed.kept}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"removed fine-tuned backbone {removed.name} ({removed.folder}; {len(removed.digests)} exports, "
              f"{len(removed.variants)} variants)")
        print(f"checked for dependents: {checked}; {len(removed.checked_models)} recorded saved model(s) found, "
              "none using it")
    if removed.kept:
        print(f"note: kept {len(removed.kept)} file(s) in {removed.folder} that embedkit did not make: "
              f"{', '.join(removed.kept)}", file=sys.stderr)
    if removed.missing_models:
        print(f"note: {len(removed.missing_models)} saved model(s) made on it are no longer at their recorded folders "
              f"(deleted, or moved: a moved one was not checked and will not load any more): "
              f"{', '.join(removed.missing_models)}", file=sys.stderr)
    return 0


def _artifact_lines(r: dict, indent: str = "") -> None:
    for a in r["exported"]:
        print(f"{indent}    exported  {a['digest'][:12]}  {a['path']}")
    for a in r["variants"]:
        print(f"{indent}    variant   {a['name']:<30} {a['kind']:<20} {a['digest'][:12]}  parent {a['parent'][:12]}")


def cmd_plugins(args: argparse.Namespace) -> int:
    from ..backbones.registry import plugin_report

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
    from ..models.exporter import export

    artifact = export(args.backbone, args.store, exporter=args.exporter, force=args.force)
    parity = artifact.manifest["parity"]
    print(f"{artifact.name} {artifact.digest}")
    print(f"  path     {artifact.path}")
    print(f"  exporter {parity['exporter']}  max|diff| {parity['max_abs_diff']:.3g}  min cosine {parity['min_cosine']:.8f}")
    if args.fp16:
        from ..models.precision import half

        variant = half(artifact, args.store)
        parity = variant.manifest["precision"]["parity"]
        print(f"{variant.name} {variant.digest}")
        print(f"  path     {variant.path}")
        print(f"  fp16 vs fp32  max|diff| {parity['max_abs_diff']:.3g}  min cosine {parity['min_cosine']:.8f}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from ..testing import check_backbone

    report = check_backbone(args.backbone)
    for rule in report["rules"]:
        print(f"ok  {rule}")
    for rule, why in report["skipped"].items():
        print(f"skipped  {rule}: {why}")
    parity = report["parity"]
    against = "vs the source ONNX file" if parity.get("exporter") == "onnx-import" else "vs torch"
    print(f"{report['backbone']}: all rules pass ({len(report['rules'])} applied, {len(report['skipped'])} skipped; "
          f"parity {against} max|diff| "
          f"{parity['max_abs_diff']:.3g}, min cosine {parity['min_cosine']:.8f}; batch invariance "
          f"{report['batch_invariance_max_abs_diff']:.3g})")
    return 0


def runtime_name(value: str) -> str:
    """A ``--runtime`` value of ``tune``: a runtime name or ``int8-<variant>`` (argparse type)."""
    from ..models.quantization import VARIANTS
    if value in RUNTIMES or (value.startswith(INT8) and value[len(INT8):] in VARIANTS):
        return value
    raise argparse.ArgumentTypeError(f"invalid runtime {value!r}: choose from {', '.join(RUNTIMES)} or "
                                     f"{', '.join(INT8 + v for v in VARIANTS)}")


def cmd_tune(args: argparse.Namespace) -> int:
    from ..encoders.tuning import tune, tune_table
    from ..inputs.sources import iter_items
    from ..models.resolve import resolve

    artifact = resolve(args.backbone, args.store)
    items = None
    if args.data:
        items = [item.payload for _, item in zip(range(args.limit), iter_items(Path(args.data), artifact.modality, args.column))]
    runtimes = tuple(args.runtime) if args.runtime else None
    with progress_bar("tune", None, "runtime", not args.no_progress) as bar:
        record = tune(artifact, args.device, items=items, seconds=args.seconds, runtimes=runtimes,
                      progress=bar.update_to)
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    print(f"{artifact.name} {artifact.digest[:12]} on {record['device']} ({record['items']} items, end to end)")
    print("\n".join(tune_table(record)))
    print(f"choice: {record['choice']} ({record.get('precision', 'fp32')}; recorded: encoders with runtime='auto' "
          "on this device use it)")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from ..encoders.quantization import MAX_ACCURACY_DROP, MIN_MEAN_COSINE, MIN_SPEEDUP, quantization_report, recommend
    from ..inputs.sources import iter_items
    from ..models.quantization import VARIANTS, quantize
    from ..models.resolve import resolve

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
    with progress_bar("quantize --report", 1 + len(variants), "variant", not args.no_progress) as bar:
        rows = quantization_report(base, items, labels, variants=variants, store=args.store, progress=bar.update_to)
    advice = recommend(rows)
    for r in rows:
        if r["variant"] in advice["verdicts"]:
            r["worth_using"], r["why"] = advice["verdicts"][r["variant"]]
    if args.json:
        print(json.dumps({"rows": rows, "recommended": advice["variant"], "reason": advice["reason"]}, indent=2))
        return 0
    print(f"{len(items)} items from {Path(args.data).name}; measured on a 30 % held-out part")
    header = f"{'variant':<20} {'items/s':>8} {'speed':>6} {'mean cos':>9} {'min cos':>8} {'MB':>6}"
    print(header + ("  accuracy" if labels is not None else "") + "  worth using?")
    for r in rows:
        line = (f"{r['variant']:<20} {r['items_per_s']:8.0f} {r['speedup']:5.2f}x {r['mean_cosine']:9.4f} "
                f"{r['min_cosine']:8.4f} {r['size_mb']:6.1f}")
        line += f"  {r['accuracy']:8.4f}" if labels is not None else ""
        print(line + ("  (reference)" if r["variant"] == "fp32" else f"  {'yes' if r['worth_using'] else 'no'}: {r['why']}"))
    print(f"recommended: {advice['variant']} ({advice['reason']}); rule: the fastest variant with mean cosine "
          f">= {MIN_MEAN_COSINE}, accuracy within {100 * MAX_ACCURACY_DROP:.0f} point of fp32 and >= {MIN_SPEEDUP}x speed")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run

    run(sys.stdout, store=args.store)
    return 0


COMMANDS = {
    "backbones": cmd_backbones,
    "plugins": cmd_plugins,
    "export": cmd_export,
    "check": cmd_check,
    "tune": cmd_tune,
    "quantize": cmd_quantize,
    "demo": cmd_demo,
}
