"""The feature-store namespace a head or an index is made from, found by what its vectors are.

:func:`find` is :meth:`FeatureStore.find` (precision, dimensions, long-text policy) with errors
that say what the store holds instead and how to ask for it, in the caller's words (``style``:
``python`` keywords or ``cli`` flags): a store of chunked vectors only, asked for the plain ones,
names them and ``long="chunk"`` / ``--long chunk``; two namespaces that answer one request are
told apart by what differs (their chunk settings, or their int8 / uint8 calibrations, which no
request can name). :func:`long_of` is the long-text part of a namespace's variant, what a head
or an index records so that new items and queries are embedded the same way.
"""
from __future__ import annotations

import os
from typing import Any

from ..errors import StoreError
from ..features.store import FeatureStore, Namespace
from ..features.variants import Wanted, label, long_of, request, rivals_error


def kind(variant: dict[str, Any]) -> str:
    """What a variant's vectors are, for people: ``chunked vectors``, ``int8 vectors``..."""
    compact = variant.get("compact") or {}
    what = compact.get("precision", "float32")
    if compact.get("dimensions"):
        what = f"{what} {compact['dimensions']}-d"
    if variant.get("rows"):
        return "per-chunk rows"
    if variant.get("long") == "chunk":
        return "chunked vectors" if what == "float32" else f"{what} vectors of chunked texts"
    return "plain vectors" if what == "float32" else f"{what} vectors"


def _named(spaces: list[Namespace], backbone: str | None) -> list[Namespace]:
    """The namespaces of ``backbone`` (a name, or a digest prefix of >= 8 hex naming one digest), as
    :meth:`FeatureStore.find` matches them; all of them when None."""
    if backbone is None:
        return spaces
    named = [n for n in spaces if n.name == backbone]
    if not named and len(backbone) >= 8:
        named = [n for n in spaces if n.digest.startswith(backbone)]
        if len({n.digest for n in named}) > 1:
            named = []
    return named


def _newest(spaces: list[Namespace]) -> Namespace:
    return max(spaces, key=lambda n: n.info.get("created") or (n.path / "namespace.json").stat().st_mtime)


def find(features: Any, backbone: str | None, *, precision: str = "float32", dimensions: int | None = None,
         long: str = "truncate", chunk_overlap: int | None = None, max_chunks: int | None = None,
         chunk_rows: bool = False, style: str = "python") -> Namespace:
    """The namespace of ``backbone`` (None: the only backbone with such vectors) in the feature
    store ``features`` (a folder or a :class:`FeatureStore`) made as asked; see
    :meth:`FeatureStore.find` for the variant's parameters (``chunk_rows=True``: the per-chunk
    rows of chunked texts, never their pooled vectors).

    Raises:
        StoreError: none answers (the message lists what the store holds and the options that ask
            for it), several backbones do (``backbone`` None), or several namespaces of one digest
            do (what differs: chunk settings to name, or calibrations no request can name).
        UsageError: an unknown precision or long-text policy, bad dimensions, or ``chunk_rows``
            without ``long="chunk"``.
    """
    want = Wanted(precision, dimensions, long, chunk_overlap, max_chunks, chunk_rows)
    store = features if isinstance(features, FeatureStore) else FeatureStore(features)
    spaces = store.namespaces()
    named = _named(spaces, backbone)
    fits = [n for n in named if want.matches(n.variant, n.dim)]
    where = store.root if isinstance(features, FeatureStore) else os.fspath(features)
    if not fits:
        if backbone is not None and not named:
            return store.find(backbone, precision=precision, dimensions=dimensions, long=long, chunk_overlap=chunk_overlap,
                              max_chunks=max_chunks, chunk_rows=chunk_rows)  # its message lists the store
        if not spaces:
            run = f"`embedkit extract SOURCE --out {where}`" if style == "cli" else "embedkit.extract"
            raise StoreError(f"{where} holds no features; run {run} first")
        kinds = " and ".join(sorted({kind(n.variant) for n in named}))
        chunking = len({tuple(long_of(n.variant).items()) for n in named if n.variant.get("long")}) > 1
        present = "; ".join(sorted(f"{n.name} ({n.digest[:12]}, {label(n.variant)}): pass "
                                   f"{request(n.variant, style, chunking)}" for n in named))
        who = f" of {backbone}" if backbone is not None else ""
        raise StoreError(f"{where} holds no {kind(_variant_of(want))}{who} as asked ({want.describe()}); it holds "
                         f"{kinds} only: {present}")
    digests = sorted({(n.name, n.digest) for n in fits})
    if backbone is None and len({d for _, d in digests}) > 1:
        names = ", ".join(f"{name} ({digest[:12]})" for name, digest in digests)
        flag = "--backbone NAME" if style == "cli" else "the backbone's name or digest"
        raise StoreError(f"{where} holds features of several backbones: {names}; choose one with {flag}")
    best = _newest(fits)
    rivals = [n for n in fits if n.digest == best.digest and n.tag != best.tag]
    if rivals:
        raise rivals_error(best, rivals, want, style)
    return best


def _variant_of(want: Wanted) -> dict[str, Any]:
    """A variant record shaped like what ``want`` asks for (for :func:`kind`)."""
    out: dict[str, Any] = {"long": "chunk", **({"rows": True} if want.chunk_rows else {})} if want.long == "chunk" else {}
    if want.precision != "float32" or want.dimensions is not None:
        out["compact"] = {"precision": want.precision, "dimensions": want.dimensions}
    return out
