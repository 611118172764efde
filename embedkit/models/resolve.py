"""The one route from a spec to an artifact: :func:`resolve`.

A spec is an :class:`~embedkit.Artifact` (returned as is), a :class:`~embedkit.Backbone` or a
backbone name or spec (exported on first use, through :func:`~embedkit.export`), an artifact
folder, a digest (or an unambiguous prefix of at least 8 hex digits) in the model store (a name
that is also a folder of the store is read as a name first), or the
name of an artifact made in the store (an int8 variant: the newest). Every caller that turns a
user's spec into an artifact (encoders, extraction, the service, saved heads, fine-tuning) comes
through here.
"""
from __future__ import annotations

from pathlib import Path

from ..backbones.backbone import Backbone
from ..errors import BackboneNotAvailableError, UnknownBackboneError
from .exporter import export
from .store import MANIFEST, Artifact, ModelStore


def resolve(spec: "str | Backbone | Artifact", store: ModelStore | str | None = None) -> Artifact:
    """An artifact from a backbone name or spec (exported on first use), an artifact folder, a
    digest, or the name of an artifact made in the store (an int8 variant: the newest)."""
    if isinstance(spec, Artifact):
        return spec
    if isinstance(spec, Backbone):
        return export(spec, store)
    store = store if isinstance(store, ModelStore) else ModelStore(store)
    folder = Path(spec)
    if (folder / MANIFEST).is_file():
        return Artifact.open(folder)
    digest_like = len(spec) >= 8 and all(c in "0123456789abcdef" for c in spec)
    named = (store.root / spec).is_dir() if "/" not in spec and not spec.startswith(".") else False
    if digest_like and not named and any(a.digest.startswith(spec) for a in store.artifacts()):
        return store.get(spec)
    try:
        return export(spec, store)
    except UnknownBackboneError:
        # Not a backbone: an artifact made in the store, e.g. an int8 variant, by its name.
        found = store.artifacts(spec) if "/" not in spec else []
        if found:
            found[-1].verify()
            return found[-1]
        if digest_like:
            raise BackboneNotAvailableError(spec, None, store.root) from None
        raise
