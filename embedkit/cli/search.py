"""Commands on nearest-neighbour indexes: index, search (what matched, with a labelled score)."""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from ..errors import EmbedkitError
from .common import (
    backbone_arg,
    chunk_rows_arg,
    existing_dir,
    existing_file,
    long_args,
    non_negative_int,
    positive_float,
    positive_int,
    published_dir,
    store_arg,
    variant_args,
)
from .common import flag_errors as common_flag_errors

PRECISIONS = ("float32", "int8", "uint8", "binary")
RESCORE = 100  # embedkit.heads.binary.RESCORE (not imported: --help stays light)

# Locators written by extraction (embedkit.inputs.sources.iter_items): "file.csv:row 12" (1-based data row),
# "file.txt:line 3", an image path, or "item 4" for an in-memory iterable.
_LOCATOR = re.compile(r"^(?P<file>.+):(?P<unit>row|line) (?P<n>\d+)$")
_CONTENT_ID = re.compile(r"^[0-9a-f]{32}$")
_ONE_LINE = {ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"}
# The library's errors name its Python parameters (``nprobe: ...``, ``k=100``); the user typed flags.
_PARAMETER = re.compile(r"(?<![\w/.-])(k|nprobe|rescore|features|memory_budget_mb|index|chunk_overlap|max_chunks)(=|: )")
_FLAGS = {"k": "-k", "index": "--kind"}


def _flags(message: str) -> str:
    """``message`` with the index and search flags in place of the Python parameters it names."""
    def flag(m: re.Match[str]) -> str:
        name = _FLAGS.get(m[1], "--" + m[1].replace("_", "-"))
        return f"{name} " if m[2] == "=" else f"{name}: "
    return _PARAMETER.sub(flag, message)


def flag_errors() -> Any:
    """Re-raise a library error with the command's flags in place of the Python parameters it names."""
    return common_flag_errors(_flags)


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("index", help="build a nearest-neighbour index over stored features")
    p.add_argument("features", type=existing_dir, help="feature store folder")
    backbone_arg(p)
    p.add_argument("--out", required=True, help="index folder")
    p.add_argument("--metric", default="cosine", choices=["cosine", "euclidean", "inner_product"],
                   help="default: cosine")
    p.add_argument("--kind", default="auto", choices=["auto", "flat", "hnsw", "ivfpq", "ivf"],
                   help="default: auto; binary rows take auto, flat or ivf (IndexBinaryIVF), the others auto, flat, "
                   "hnsw or ivfpq (ivf: ivfpq; at least 256 rows)")
    p.add_argument("--memory-budget-mb", type=positive_float,
                   help="index memory budget in MB (--kind auto on float rows: IVF-PQ when HNSW would exceed it)")
    compact_args(p, "index")
    long_args(p, "index")
    chunk_rows_arg(p, "index")
    p.add_argument("--nprobe", type=positive_int,
                   help="IVF indexes: lists searched per query, recorded as search's default (default 16)")

    p = sub.add_parser("search", help="nearest stored items for raw queries (texts or image paths)")
    p.intermixed = True  # search INDEX -k 3 "query" as well as search INDEX "query" -k 3
    p.add_argument("index", type=published_dir("index.json"),
                   help="index folder made by `embedkit index`, or a feature store folder (searched through an "
                   "exact index built in memory; --backbone, --precision, --dimensions choose the namespace)")
    p.add_argument("queries", nargs="+")
    p.add_argument("-k", type=positive_int, default=10, help="neighbours per query (default 10)")
    p.add_argument("--source", type=existing_file, metavar="FILE",
                   help="the file that was extracted, to show the matched texts (default: the file named in "
                   "each match's locator, looked up in the current folder)")
    p.add_argument("--column", help="text column of --source (default text)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--backbone", help="a feature store: the backbone (default: the store's only one)")
    compact_args(p, "search")
    long_args(p, "search (a feature store)")
    chunk_rows_arg(p, "search (a feature store)")
    p.add_argument("--nprobe", type=positive_int, help="IVF index: lists searched per query (default: as indexed)")
    p.add_argument("--features", type=existing_dir, metavar="DIR",
                   help="binary index: the feature store whose float32 rows rescore it (default: the one indexed, "
                   "else the bits); one that is not a store, holds another backbone or lacks an id is an error")
    store_arg(p)


def compact_args(p: Any, command: str) -> None:
    """``--precision``, ``--dimensions`` and ``--rescore`` of ``index`` and ``search``."""
    where = "index" if command == "index" else "search (a feature store)"
    p.add_argument("--precision", default=None if command == "search" else "float32", choices=PRECISIONS,
                   help=f"{where} the backbone's compact namespace of this precision (made by extract --precision "
                   "or `store compact`): binary rows by Hamming distance, int8 / uint8 rows restored to float32 "
                   "(default float32)")
    p.add_argument("--dimensions", type=positive_int,
                   help=f"{where} the namespace of vectors truncated to N dimensions (default: all)")
    p.add_argument("--rescore", type=non_negative_int, default=None,
                   help="binary rows only: Hamming candidates ranked again by the float query against the float32 "
                   f"rows of the same store (or their bits as -1/+1 when that store has none); 0: Hamming only "
                   f"(default {'as indexed, or ' if command == 'search' else ''}{RESCORE})")


def cmd_index(args: argparse.Namespace) -> int:
    from ..heads.indexes import check_options
    from ..heads.persistence import save_index
    from .common import namespace_of

    with flag_errors():
        check_options(args.precision, args.kind, args.rescore, args.nprobe, args.memory_budget_mb)  # before any work
        namespace = namespace_of(args.features, args.backbone, **variant_args(args))
        chunked = {k: namespace.variant[k] for k in ("long", "chunk_overlap", "max_chunks") if k in namespace.variant}
        path = save_index(args.features, namespace.digest, args.out, metric=args.metric, index=args.kind,
                          memory_budget_mb=args.memory_budget_mb, precision=args.precision, dimensions=args.dimensions,
                          rescore=args.rescore, nprobe=args.nprobe, chunk_rows=bool(args.chunk_rows), **chunked)
    meta = json.loads((path / "index.json").read_text())
    compact = meta.get("compact") or {}
    made = f"{compact['precision']} rows of {meta['dim']} dimensions, " if compact else ""
    if chunked:
        made += ("per-chunk rows (windows) of " if meta.get("chunk_rows") else "") + \
            f"chunked texts (overlap {chunked['chunk_overlap']}, at most {chunked['max_chunks']} windows), "
    ivf = meta.get("ivf") or {}
    built = ", ".join(f"{k} {v}" for k, v in ivf.items())
    print(f"{meta['rows']} {'rows' if meta.get('chunk_rows') else 'items'} of {meta['backbone']['name']} ({meta['backbone']['digest'][:12]}), "
          f"{made}{meta['index_kind']} index{f' ({built})' if built else ''}, {meta['metric']} -> {path}")
    return 0


def score(metric: str, distance: float) -> tuple[str, float, bool]:
    """``(name, value, higher_is_better)`` of a neighbour's score for people: cosine similarity
    (1 - cosine distance), inner product, or the euclidean or Hamming (binary rows, not rescored)
    distance itself."""
    if metric == "cosine":
        return "cosine similarity", 1.0 - distance, True
    if metric == "inner_product":
        return "inner product", -distance, True
    if metric == "hamming":
        return "hamming distance", distance, False
    return "euclidean distance", distance, False


def matched_texts(hits: list[dict[str, Any]], source: str | None, column: str | None) -> dict[str, tuple[int, Any, str]]:
    """``locator -> (0-based row, text, id now)`` for text matches whose file can be read.

    The file named by ``source`` (else the one the locator names, from the current folder) is
    read item by item exactly as extraction read it, so the position is ``df.iloc``'s row.
    """
    from ..inputs.sources import iter_items

    wanted: dict[str, set[str]] = {}
    for hit in hits:
        match = _LOCATOR.match(hit.get("source", ""))
        if match:
            wanted.setdefault(match["file"], set()).add(hit["source"])
    found: dict[str, tuple[int, Any, str]] = {}
    for name, locators in wanted.items():
        path = Path(source) if source and Path(source).name == name else Path(name)
        if not path.is_file():
            continue
        try:
            for position, item in enumerate(iter_items(path, "text", column)):
                if item.source in locators:
                    found[item.source] = (position, item.payload, item.id)
        except EmbedkitError:  # not the file that was extracted (no such column...): texts stay unknown
            continue
    return found


def describe(hit: dict[str, Any], metric: str, texts: dict[str, tuple[int, Any, str]]) -> dict[str, Any]:
    """A hit with ``score``, ``row`` (0-based, or None) and ``match`` (the text or path, or None; of a
    per-chunk row, its passage: ``text[start:end]`` of its ``char_span``)."""
    name, value, _ = score(metric, hit["distance"])
    row: dict[str, Any] = dict(hit, score=value, row=None, match=None)
    locator = _LOCATOR.match(hit["source"])
    if locator is None:  # an image path (or an in-memory item): the source is what matched
        row["match"] = None if hit["source"].startswith("item ") else hit["source"]
    elif hit["source"] in texts:
        position, payload, item_id = texts[hit["source"]]
        row["row"] = position
        parent = hit.get("parent", hit["id"])  # a per-chunk row: its item's id
        # what was embedded: the fingerprint kept beside a user id, else the id is the content's hash
        # (an index saved before fingerprints were kept, over user ids: not checkable)
        embedded = hit.get("content") or (parent if _CONTENT_ID.match(parent) else None)
        if embedded is None or item_id == embedded:
            row["match"] = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else payload
            if "char_span" in hit and isinstance(row["match"], str):
                row["match"] = row["match"][hit["char_span"][0]:hit["char_span"][1]]
        else:
            row["note"] = f"{locator['file']} changed since extraction: that row holds other content now"
    elif locator["unit"] == "row":
        row["row"] = int(locator["n"]) - 1
    return row


def cmd_search(args: argparse.Namespace) -> int:
    from ..errors import UsageError
    from ..heads.indexes import search, search_store
    from .common import namespace_of

    chosen = ("backbone", "precision", "dimensions", "long", "chunk_overlap", "max_chunks", "chunk_rows")
    if (Path(args.index) / "index.json").is_file():
        given = [f"--{k.replace('_', '-')}" for k in chosen if getattr(args, k) is not None]
        if given:
            raise UsageError(f"{', '.join(given)}: an index searches the namespace it was built on (and embeds the "
                             "queries as its texts were); these choose the namespace of a feature store")
        with flag_errors():
            results = search(args.index, list(args.queries), k=args.k, store=args.store, rescore=args.rescore,
                             nprobe=args.nprobe, features=args.features)
        meta = json.loads((Path(args.index) / "index.json").read_text())
        metric, indexed = meta.get("metric", "cosine"), meta.get("features")
    else:
        if args.features is not None or args.nprobe is not None:
            raise UsageError("--features and --nprobe apply to a saved index; a feature store is searched exactly "
                             "and rescored from its own float32 rows")
        with flag_errors():
            namespace = namespace_of(args.index, args.backbone, **variant_args(args))
            chunked = {k: namespace.variant[k] for k in ("long", "chunk_overlap", "max_chunks") if k in namespace.variant}
            results = search_store(args.index, namespace.digest, list(args.queries), k=args.k,
                                   precision=args.precision or "float32", dimensions=args.dimensions,
                                   rescore=args.rescore, store=args.store, chunk_rows=bool(args.chunk_rows), **chunked)
        metric, indexed = "cosine", args.index
    rescored = {h.get("rescored", "") for hits in results for h in hits if "error" not in h}
    if None in rescored:
        metric = "hamming"  # binary rows ranked by Hamming distance only (--rescore 0)
    name, _, higher = score(metric, 0.0)
    texts = matched_texts([h for hits in results for h in hits if "error" not in h], args.source, args.column)
    table = [{"query": query, "score": name, "higher_is_better": higher,
              "neighbours": [h if "error" in h else describe(h, metric, texts) for h in hits]}
             for query, hits in zip(args.queries, results)]
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    print(f"score: {name} ({'higher' if higher else 'lower'} is better); ranks and rows are 0-based, as df.iloc")
    if None in rescored:
        print("scored by Hamming distance between sign bits only (--rescore 0): no float rescoring")
    elif "bits" in rescored:
        why = ("this feature store holds no float32 rows of every item (extract them into it to rescore with them)"
               if indexed == args.index else
               f"the feature store the index was built from ({indexed}) no longer holds their float32 rows" if indexed
               else "the index records no feature store")
        print(f"scored against the candidates' sign bits as -1/+1, not float32 rows: {why}"
              + ("" if indexed == args.index else "; pass --features DIR to rescore with a store's float32 rows"))
    unknown = False
    for entry in table:
        print(f"# {entry['query']}")
        for rank, hit in enumerate(entry["neighbours"]):
            if "error" in hit:
                print(f"  error {hit['error']}: {hit['message']}")
                continue
            locator = _LOCATOR.match(hit["source"])
            name = hit.get("parent", hit["id"])[:12]
            if "chunk" in hit:  # a per-chunk row: which window of the item, and where its passage lies
                name += f", chunk {hit['chunk']}, chars {hit['char_span'][0]}:{hit['char_span'][1]}"
            if locator is None:
                where = f"id {name}"
            elif hit["row"] is not None:
                where = f"{locator['file']} row {hit['row']}, id {name}"
            else:
                where = f"{hit['source']}, id {name}"
            shown = hit["match"] if hit["match"] is not None else hit.get("note", "(text not shown)")
            shown = shown.translate(_ONE_LINE)  # a hit per line: line breaks in a passage shown as \n
            unknown = unknown or (hit["match"] is None and "note" not in hit)
            print(f"  {rank:>3}  {hit['score']:8.4f}  {shown}  [{where}]")
    if unknown:
        print("texts are read from the extracted file: pass --source FILE, or run from its folder", file=sys.stderr)
    return 0


COMMANDS = {
    "index": cmd_index,
    "search": cmd_search,
}
