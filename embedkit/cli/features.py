"""Commands that compute or inspect features: embed, extract, store (the last in :mod:`.feature_store`)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import UnsupportedInputError
from ..runtimes.table import RUNTIMES, help_text
from .common import (
    EXIT_FAILED_ITEMS,
    EXIT_INCOMPLETE,
    OUTPUT_SUFFIXES,
    existing_or_glob,
    existing_path,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    ray_output_filtered,
    store_arg,
)
from .feature_store import COMMANDS as STORE_COMMANDS
from .feature_store import add_compact_arguments, compact_of_args, refuse_idle_calibration_rows
from .feature_store import add_parsers as add_store_parser


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "embed", help="embed texts or images: a text file (one text or image path per line), a CSV/TSV/JSONL/Parquet "
        "column, or (images) a folder",
    )
    p.add_argument("backbone")
    p.add_argument("input", type=existing_path, help=".txt, .csv, .tsv, .jsonl, .parquet, or an image folder (class subfolders = labels)")
    p.add_argument("--out", required=True, help=".npy or .parquet")
    p.add_argument("--column", help="column holding the texts or image paths (tables; default text / path)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--runtime", default="auto", choices=("auto",) + RUNTIMES,
                   help="auto: the faster one measured by `embedkit tune` on this device; " + help_text())
    p.add_argument("--threads", type=positive_int, help="CPU threads (default: the cores this process may use)")
    p.add_argument("--no-truncate", action="store_true", help="text: texts over max length become errors "
                   "(the older spelling of --long error)")
    p.add_argument("--long", choices=["truncate", "chunk", "error"],
                   help="text: a text over the backbone's max length is truncated there (default truncate), "
                   "chunked (windows of max length, each embedded, pooled as their mean weighted by tokens, "
                   "normalised as the backbone normalises) or an error (too_long)")
    p.add_argument("--chunk-overlap", type=non_negative_int,
                   help="--long chunk: tokens shared by neighbouring windows (default 32; under half a window)")
    p.add_argument("--max-chunks", type=positive_int,
                   help="--long chunk: windows per text at most; a longer text is embedded from its first "
                   "ones and counted as truncated (default 64)")
    p.add_argument("--empty", default="embed", choices=["embed", "error"], help="text: empty texts")
    p.add_argument("--batch-size", type=positive_int, help="images per batch (default 16 on CPU)")
    p.add_argument("--workers", type=positive_int, help="image decoding threads (default: cores)")
    p.add_argument("--max-pixels", type=positive_int, help="refuse larger images (decompression-bomb guard)")
    p.add_argument("--keep-blank", action="store_true", help="embed blank / placeholder graphics instead of refusing them")
    add_compact_arguments(p, "embed")
    p.add_argument("--no-progress", action="store_true")
    store_arg(p)

    p = sub.add_parser(
        "extract", help="extract features of a source into a feature store, resumable and exactly once",
    )
    p.add_argument("source", type=existing_or_glob, help="folder, glob, .txt, .csv, .tsv, .jsonl or .parquet")
    p.add_argument("--backbone", default="minilm-l6",
                   help="registered name, digest or local model folder to extract with (default: minilm-l6)")
    p.add_argument("--out", required=True, help="feature store folder")
    p.add_argument("--column", help="payload column of a table (default text / path)")
    p.add_argument("--id-column", help="column of item ids (default: a hash of the content)")
    p.add_argument("--shard-size", type=positive_int, help="source items per shard (default 4096 texts / 512 images)")
    p.add_argument("--max-failures", type=non_negative_int, default=0, help="exit 2 when more items fail (default 0)")
    p.add_argument("--no-verify", action="store_true", help="skip checksumming the committed shards first")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--runtime", default="auto", choices=("auto",) + RUNTIMES,
                   help="auto: the faster one measured by `embedkit tune` on this device; " + help_text())
    p.add_argument("--threads", type=positive_int, help="CPU threads (default: the cores this process may use)")
    p.add_argument("--batch-size", type=positive_int, help="images per batch")
    p.add_argument("--workers", type=positive_int,
                   help="local engine: image decoding threads; --engine ray: actors (one encoder each)")
    p.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="local: this process; ray: Ray Data actors, same shards and commit records (pip install "
                        "'embedkit[ray]')")
    p.add_argument("--address", help="--engine ray: the Ray cluster (HOST:PORT, auto, ray://...); default: a private "
                                     "local Ray on 127.0.0.1, shut down after the run")
    p.add_argument("--cpus-per-worker", type=positive_float,
                   help="--engine ray: CPUs per actor (default: fractional, so the actors fit the machine)")
    p.add_argument("--gpus-per-worker", type=non_negative_float, help="--engine ray: GPUs per actor (default 0)")
    p.add_argument("--long", choices=["truncate", "chunk", "error"],
                   help="text: a text over the backbone's max length is truncated there (default truncate), chunked "
                   "(windows embedded and pooled; stored in a namespace of their own, never beside truncated "
                   "vectors) or an error (too_long)")
    p.add_argument("--chunk-overlap", type=non_negative_int,
                   help="--long chunk: tokens shared by neighbouring windows (default 32)")
    p.add_argument("--max-chunks", type=positive_int, help="--long chunk: windows per text at most (default 64)")
    p.add_argument("--chunk-rows", action="store_true",
                   help="--long chunk: also store every window as a row of its own (item id, chunk, token and "
                   "character spans), so `index` / `search --long chunk --chunk-rows` return the passage")
    add_compact_arguments(p, "extract")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    store_arg(p)

    add_store_parser(sub)


def read_items(path: Path, modality: str, column: str | None) -> tuple[list[Any], dict[str, list[Any]]]:
    """Payloads, one per input row, and extra output columns, through the one reader of ``extract``.

    Images get a ``path`` column (valid UTF-8, see :func:`embedkit.inputs.sources.display`) and, from a
    folder, a ``label`` column (the class subfolder).
    """
    from ..inputs.files import display
    from ..inputs.folders import folder_label
    from ..inputs.sources import iter_items

    items = list(iter_items(path, modality, column))
    payloads = [item.payload for item in items]
    if modality != "image":
        return payloads, {}
    extra: dict[str, list[Any]] = {"path": [item.source for item in items]}
    if path.is_dir():
        extra["label"] = [display(folder_label(path, p)) if isinstance(p, str) else "" for p in payloads]
    return payloads, extra


def _parquet_table(result: Any, extra: dict[str, list[Any]], artifact: Any, long: dict[str, Any] | None = None) -> Any:
    """One schema for every run: ``error_code``/``error_message`` are nullable strings even when nothing failed.
    The schema metadata is the provenance: ``embedkit.digest``, ``embedkit.backbone``, ``embedkit.compact``
    (compact rows) and ``embedkit.long`` (texts: the long-text policy, ``{"long", "chunk_overlap", "max_chunks"}``)."""
    import numpy as np
    import pyarrow as pa

    n = len(result.ok)
    width, kind = result.vectors.shape[1], pa.from_numpy_dtype(result.vectors.dtype)  # compact rows: int8 / uint8
    by_row = {e.index: e for e in result.errors}
    fields = [pa.field("row", pa.int64())] + [pa.field(k, pa.string()) for k in extra] + [
        pa.field("ok", pa.bool_()), pa.field("embedding", pa.list_(kind, width)),
        pa.field("error_code", pa.string()), pa.field("error_message", pa.string())]
    columns = [pa.array(np.arange(n, dtype=np.int64))]
    columns += [pa.array([v if isinstance(v, str) else None for v in vs], pa.string()) for vs in extra.values()]
    columns += [
        pa.array(np.asarray(result.ok, dtype=bool)),
        pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(result.vectors).reshape(-1)), width),
        pa.array([by_row[i].code if i in by_row else None for i in range(n)], pa.string()),
        pa.array([by_row[i].message if i in by_row else None for i in range(n)], pa.string()),
    ]
    table = pa.Table.from_arrays(columns, schema=pa.schema(fields))
    compact = {"embedkit.compact": json.dumps(result.compact)} if getattr(result, "compact", None) else {}
    if long is not None:
        compact["embedkit.long"] = json.dumps(long)
    return table.replace_schema_metadata({"embedkit.digest": artifact.digest, "embedkit.backbone": artifact.name,
                                          **compact})


def long_options(args: argparse.Namespace, modality: str) -> dict[str, Any]:
    """``--long``, ``--chunk-overlap``, ``--max-chunks`` (and ``--no-truncate``) as encoder options;
    UsageError for a contradiction or for text options given with an image backbone."""
    from ..errors import UsageError

    given = [f"--{n.replace('_', '-')}" for n in ("long", "chunk_overlap", "max_chunks") if getattr(args, n) is not None]
    if modality == "image":
        if given:
            raise UsageError(f"{', '.join(given)} apply to text backbones; this one is an image backbone")
        return {}
    if getattr(args, "no_truncate", False) and args.long not in (None, "error"):
        raise UsageError(f"--no-truncate contradicts --long {args.long}; use --long error or --long {args.long} alone")
    if args.long != "chunk" and (args.chunk_overlap is not None or args.max_chunks is not None):
        raise UsageError("--chunk-overlap and --max-chunks apply with --long chunk")
    return {"truncate": False if getattr(args, "no_truncate", False) else None, "long": args.long,
            "chunk_overlap": args.chunk_overlap, "max_chunks": args.max_chunks}


def cmd_embed(args: argparse.Namespace) -> int:
    import numpy as np

    from ..encoder import encoder_for
    from ..encoders.calibrations import policy_record
    from ..errors import UsageError
    from ..fs.atomic import staged_file
    from ..fs.outputs import check_output, errors_path, remember
    from ..models.resolve import resolve

    out = Path(args.out)
    if out.suffix not in OUTPUT_SUFFIXES:  # checked before any work; np.save would append .npy
        raise UnsupportedInputError(f"--out {out.name}: the output must end in {' or '.join(OUTPUT_SUFFIXES)}")
    check_output(out, "embeddings", inputs=[args.input])  # before any work: never the input, never a foreign file
    artifact = resolve(args.backbone, args.store)
    policy = long_options(args, artifact.modality)  # before reading: a usage error costs nothing
    compact = compact_of_args(args, artifact, policy)  # --precision / --dimensions / --calibration, before any work
    items, extra = read_items(Path(args.input), artifact.modality, args.column)
    if artifact.modality == "image":
        encoder = encoder_for(
            artifact, device=args.device, threads=args.threads, runtime=args.runtime, batch_size=args.batch_size,
            workers=args.workers, max_pixels=args.max_pixels, reject_blank=not args.keep_blank,
        )
        unit = "image"
    else:
        try:
            encoder = encoder_for(artifact, device=args.device, threads=args.threads, runtime=args.runtime,
                                  empty=args.empty, **policy)
        except ValueError as exc:  # a chunk overlap too large for this backbone's window
            raise UsageError(str(exc)) from None
        unit = "text"
    from tqdm import tqdm

    with tqdm(total=len(items), unit=unit, disable=args.no_progress, file=sys.stderr) as bar:  # rows, not lines
        result = encoder.encode(items, progress=bar.update)
    if compact is not None:
        from ..encoders.compact import compact_result

        compact_result(result, compact)
    if out.suffix == ".parquet":
        import pyarrow.parquet as pq

        with staged_file(out) as tmp, open(tmp, "wb") as f:  # a file object: pyarrow cannot name non-UTF-8 paths
            long = policy_record(encoder.identity(), encoder.long) if unit == "text" else None
            pq.write_table(_parquet_table(result, extra, artifact, long), f)
    else:
        # Written beside the target and renamed over it: an interrupted run leaves the earlier
        # output whole. The journal records the new file as embed's own before the rename.
        with staged_file(out) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, result.vectors)
            remember(tmp, out)
    errors_file = errors_path(out)
    if result.errors:
        with staged_file(errors_file) as tmp, open(tmp, "w") as f:
            for e in result.errors:
                record = e.to_json()
                if "path" in extra:  # images: the file is the item's id
                    record["path"] = extra["path"][e.index]
                f.write(json.dumps(record) + "\n")
    elif errors_file.exists():  # an earlier run's records (checked by check_output) would claim failures of this one
        errors_file.unlink()
    s = result.stats
    detail = f", {s.truncated} truncated, {s.empty} empty" if unit == "text" else ""
    if unit == "text" and args.long == "chunk":
        detail += f", {s.chunked} chunked ({s.chunks} windows)"
    rate = f"; {s.ok / max(result.seconds, 1e-9):.0f} {unit}s/s" if s.ok else ""  # no rate for nothing done
    where = f" (errors: {errors_path(out).name})" if result.errors else ""
    if result.errors and compact is not None and compact.dtype.kind != "f":  # int8 / uint8 / binary rows
        where = (f" (failed rows are zeros, a valid {compact.precision} vector: which rows failed is in "
                 f"{errors_path(out).name}" + (" and the ok column" if out.suffix == ".parquet" else "") + ")")
    print(f"{s.total} {unit}s: {s.ok} ok, {s.failed} failed{detail}{rate} -> {out}{where}", file=sys.stderr)
    if not s.ok:
        hint = missing_files_hint([e.code for e in result.errors], Path(args.input))
        if hint:
            print(f"note: {hint}", file=sys.stderr)
    return EXIT_FAILED_ITEMS if s.failed else 0


def cmd_extract(args: argparse.Namespace) -> int:
    from ..errors import IncompleteExtractionError, UsageError
    from ..features.extraction import extract
    from ..fs.outputs import check_output
    from ..inputs.sources import count_items
    from ..models.resolve import resolve

    ray = args.engine == "ray"
    if not ray:
        given = [o for o, v in (("--address", args.address), ("--cpus-per-worker", args.cpus_per_worker),
                                ("--gpus-per-worker", args.gpus_per_worker)) if v is not None]
        if given:
            raise UsageError(f"{', '.join(given)} apply to --engine ray")
    refuse_idle_calibration_rows(args)
    if args.chunk_rows and args.long != "chunk":
        raise UsageError("--chunk-rows stores the windows of texts chunked by --long chunk: add --long chunk")
    if args.chunk_rows and ray:
        raise UsageError("--chunk-rows runs on --engine local only (the Ray engine stores pooled vectors)")
    check_output(args.out, "feature-store", inputs=[args.source])  # before the backbone is resolved (or exported)
    artifact = resolve(args.backbone, args.store)
    options: dict[str, Any] = {"device": args.device, "threads": args.threads, "runtime": args.runtime}
    if ray:
        options.update(engine="ray", address=args.address, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                       gpus_per_worker=args.gpus_per_worker)
        if artifact.modality == "image":
            options.update(batch_size=args.batch_size)
    elif artifact.modality == "image":
        options.update(batch_size=args.batch_size, workers=args.workers)
    elif args.batch_size or args.workers:
        raise UnsupportedInputError("--batch-size and --workers apply to image backbones (or --workers to --engine ray)")
    options.update(long_options(args, artifact.modality), precision=args.precision, dimensions=args.dimensions,
                   calibration_rows=args.calibration_rows, **({"chunk_rows": True} if args.chunk_rows else {}))
    from tqdm import tqdm

    total = None if args.no_progress else count_items(args.source, artifact.modality)
    import contextlib

    incomplete = None
    # Ray prints its start-up banner and its workers' crash notices on stdout and stderr: its own
    # lines are dropped (all shown with -v), and stdout stays the report only
    quiet = ray_output_filtered(args.verbose == 0) if ray else \
        contextlib.nullcontext({"counts": {"died": 0}, "terminal": sys.stderr})
    with quiet as noise, tqdm(total=total, unit="item", disable=args.no_progress, file=noise["terminal"],
                              smoothing=0.1) as bar, contextlib.redirect_stdout(sys.stderr):
        try:
            report = extract(
                args.source, artifact, args.out, column=args.column, id_column=args.id_column,
                shard_size=args.shard_size, verify=not args.no_verify, progress=bar.update, **options,
            )
        except IncompleteExtractionError as exc:  # reconciled: some planned items neither stored nor failed
            report, incomplete = exc.report, exc
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    print(extract_summary(report), file=sys.stderr)
    if report.compact:
        print(f"compact: {report.compact['rows']} {report.compact['precision']} vectors of "
              f"{report.compact['dimensions']} dims ({report.compact['converted']} converted), "
              f"{report.compact['vector_bytes']} bytes/vector -> {report.compact['namespace']}", file=sys.stderr)
    if report.rows_namespace:
        print(f"per-chunk rows: {report.chunk_rows} committed -> {report.rows_namespace}", file=sys.stderr)
    if noise["counts"]["died"]:
        print(f"note: Ray reported {noise['counts']['died']} worker process(es) dying during the run; their work was retried "
              "and reconciled from the commit records: the counts above are the outcome", file=sys.stderr)
    if report.total and not report.ok and Path(args.source).is_file():
        from ..features.store import FeatureStore

        written = [ns for ns in FeatureStore(args.out).namespaces() if str(ns.path) == report.namespace]
        codes = [f["code"] for ns in written for f in ns.failures()]
        hint = missing_files_hint(codes, Path(args.source))
        if hint:
            print(f"note: {hint}", file=sys.stderr)
    if incomplete is not None:
        print(f"error: {incomplete}", file=sys.stderr)
        return EXIT_INCOMPLETE
    if report.failed > args.max_failures:
        print(f"error: {report.failed} items failed (--max-failures {args.max_failures}); "
              f"see `embedkit store failures {args.out}`", file=sys.stderr)
        return EXIT_FAILED_ITEMS
    return 0


def extract_summary(report: Any) -> str:
    """One line for people: counts, and a rate only when something was computed."""
    rate = f"; {report.computed / report.seconds:.0f} items/s computed" if report.computed and report.seconds > 0 else ""
    return (f"{report.total} items: {report.ok} ok ({report.computed} computed, {report.cached} already cached, "
            f"{report.duplicates} duplicates), {report.failed} failed, {report.truncated} truncated"
            f"{f', {report.missing} missing' if getattr(report, 'missing', 0) else ''}{rate} "
            f"-> {report.namespace}")


def missing_files_hint(codes: list[str], source: Path) -> str | None:
    """When every item of a file list or table failed as a missing file: where its paths were looked for."""
    if not codes or any(c != "not_found" for c in codes) or source.is_dir():
        return None
    folder = source.resolve().parent
    return (f"none of the {len(codes)} files named in {source} exists: relative paths in a file list or table are "
            f"resolved from the folder of that file ({folder}), not from the current folder ({Path.cwd()})")


COMMANDS = {
    "embed": cmd_embed,
    "extract": cmd_extract,
    **STORE_COMMANDS,
}
