"""Calibration records read back, and checked against where they are used.

int8 / uint8 ranges (:class:`~embedkit.encoders.compact.Calibration`) fit the vectors they were
fitted on: one artifact's, made with one long-text policy (chunk-pooled vectors are distributed
unlike truncated ones). Applied to another backbone's vectors most values clip; applied under
another policy they clip more than they should. So a record says what it was fitted on, and
:func:`check` refuses it elsewhere (:class:`CalibrationMismatchError`, a UsageError):

- the file ``embedkit store calibration`` writes: ``{"kind": "embedkit.calibration", "backbone",
  "digest", "namespace", "precision", "dimensions", "long", "chunk_overlap", "max_chunks",
  "calibration": Calibration.to_dict()}``: the artifact and the full text policy;
- a bare :meth:`Calibration.to_dict` record (or a :class:`Calibration`): its ``source`` names
  the artifact when embedkit fitted it: ``store:<backbone>/<digest 12>[.<tag>]`` (the feature
  store namespace whose vectors it was fitted on; a ``chunk-o<overlap>-m<windows>`` tag is the
  chunk policy, none is truncated texts) or ``Embedder.fit:<backbone>/<digest 12>[.<tag>]``.

Rules: every record must carry its sha256 (:meth:`Calibration.from_dict`); a record whose digest
(or source) names another artifact is refused; one whose policy is not the policy in use is
refused (``long="error"`` embeds the same vectors as ``"truncate"``: they agree); a record that
names no artifact (a ``source`` of your own) is accepted when its dimension count fits (the
:class:`~embedkit.encoders.compact.Compact` checks that), with a logged warning that nothing was
checked beyond it.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..inputs.windows import DEFAULT_MAX_CHUNKS, DEFAULT_OVERLAP, long_policy
from .compact import Calibration

logger = logging.getLogger(__name__)

KIND = "embedkit.calibration"
_SOURCE = re.compile(r"^(?:store|Embedder\.fit):(?P<name>.*)/(?P<digest>[0-9a-f]{8,64})(?:\.(?P<tag>[^/]*))?$")
_CHUNK_TAG = re.compile(r"^chunk-o(?P<overlap>\d+)-m(?P<most>\d+)$")


class CalibrationMismatchError(UsageError):
    """A calibration fitted on other vectors than those it would quantise: another artifact, or
    another long-text policy."""


def policy_of(long: str | None = "truncate", chunk_overlap: int | None = None, max_chunks: int | None = None,
              truncate: bool | None = None) -> dict[str, Any]:
    """The long-text policy as a text encoder's ``identity()``: ``{}`` for ``truncate`` and ``error``
    (the same vectors), ``{"long": "chunk", "chunk_overlap", "max_chunks"}`` (defaults filled in) for
    ``chunk``. Raises ValueError for an unknown policy or a contradiction (as the encoder does)."""
    if long_policy(long or "truncate", truncate) != "chunk":
        return {}
    return {"long": "chunk", "chunk_overlap": DEFAULT_OVERLAP if chunk_overlap is None else chunk_overlap,
            "max_chunks": DEFAULT_MAX_CHUNKS if max_chunks is None else max_chunks}


def policy_tag(policy: dict[str, Any]) -> str:
    """``chunk-o<overlap>-m<windows>`` for a chunk policy (a namespace's tag), ``""`` otherwise."""
    return f"chunk-o{policy['chunk_overlap']}-m{policy['max_chunks']}" if policy.get("long") == "chunk" else ""


def policy_record(policy: dict[str, Any], long: str = "truncate") -> dict[str, Any]:
    """``{"long", "chunk_overlap", "max_chunks"}`` for files and provenance (``long`` names the
    policy when it is not chunk: ``truncate`` or ``error``; the counts are None then)."""
    if policy.get("long") == "chunk":
        return {"long": "chunk", "chunk_overlap": policy["chunk_overlap"], "max_chunks": policy["max_chunks"]}
    return {"long": long if long in ("truncate", "error") else "truncate", "chunk_overlap": None, "max_chunks": None}


def describe_policy(policy: dict[str, Any]) -> str:
    if policy.get("long") != "chunk":
        return "long=truncate"
    known = [f"{k}={policy[k]}" for k in ("chunk_overlap", "max_chunks") if policy.get(k) is not None]
    return "long=chunk" + (f" ({', '.join(known)})" if known else "")


@dataclass(frozen=True)
class FittedOn:
    """What a calibration record says it was fitted on: an artifact ``digest`` (whole, or the 12-hex
    prefix a source gives; None: not named), its ``backbone`` name, and the long-text ``policy``
    (:func:`policy_of`'s form; None: not named; a chunk policy may lack its counts)."""

    digest: str | None = None
    backbone: str | None = None
    policy: dict[str, Any] | None = None
    source: str = ""

    @property
    def named(self) -> bool:
        return self.digest is not None


def _from_source(source: str) -> FittedOn:
    found = _SOURCE.match(source or "")
    if not found:
        return FittedOn(source=source or "")
    policy: dict[str, Any] = {}
    for part in (found.group("tag") or "").split("."):
        chunk = _CHUNK_TAG.match(part)
        if chunk:
            policy = {"long": "chunk", "chunk_overlap": int(chunk["overlap"]), "max_chunks": int(chunk["most"])}
    return FittedOn(found.group("digest"), found.group("name") or None, policy, source)


def read(data: Any) -> tuple[Calibration, FittedOn]:
    """A :class:`Calibration` and what it was fitted on, from a Calibration, its record, or a file's
    record (``kind`` ``embedkit.calibration``, the record under ``calibration``). Raises UsageError
    on a malformed, altered or unverifiable (no sha256) record."""
    if isinstance(data, Calibration):
        return data, _from_source(data.source)
    if not isinstance(data, dict):
        raise UsageError(f"a calibration is a Calibration or its record, got {type(data).__name__}")
    if data.get("kind", KIND) != KIND:
        raise UsageError(f"not a calibration record: its kind is {data.get('kind')!r}, not {KIND!r}")
    if "calibration" not in data:  # a bare Calibration.to_dict() record
        cal = Calibration.from_dict(data)
        return cal, _from_source(cal.source)
    cal = Calibration.from_dict(data["calibration"])
    inner = _from_source(cal.source)
    digest = data.get("digest")
    policy = inner.policy
    long = data.get("long")
    if long is not None:
        if long not in ("truncate", "error", "chunk"):
            raise UsageError(f"malformed calibration record: long is {long!r}")
        policy = {}
        if long == "chunk":
            policy = {"long": "chunk", **{k: data[k] for k in ("chunk_overlap", "max_chunks") if data.get(k) is not None}}
    return cal, FittedOn(str(digest) if digest else inner.digest, data.get("backbone") or inner.backbone, policy,
                         cal.source)


def read_file(path: Any, option: str = "--calibration") -> tuple[Calibration, FittedOn]:
    """:func:`read` of a JSON file; UsageError naming ``option`` and the file when it is not a
    (verifiable) calibration record."""
    try:
        data = json.loads(Path(path).read_text())
        return read(data)
    except (OSError, ValueError) as exc:  # UsageError is a ValueError
        raise UsageError(f"{option} {path}: not a calibration record: {exc}") from None


def _same_policy(fitted: dict[str, Any], used: dict[str, Any]) -> bool:
    if fitted.get("long") != used.get("long"):
        return False
    return all(fitted.get(k) is None or fitted[k] == used.get(k) for k in ("chunk_overlap", "max_chunks"))


def check_policy(fitted: FittedOn, policy: dict[str, Any] | None, what: str = "the calibration") -> None:
    """CalibrationMismatchError when ``fitted`` names a long-text policy other than ``policy`` (None:
    no text policy, an image backbone; a record that names none is not refused here)."""
    if policy is not None and fitted.policy is not None and not _same_policy(fitted.policy, policy):
        raise CalibrationMismatchError(
            f"{what} was fitted on vectors of {describe_policy(fitted.policy)} texts, but these are embedded with "
            f"{describe_policy(policy)}: chunk-pooled and truncated vectors differ; use a calibration of the same "
            "long-text policy (`embedkit store calibration ... --long ...`) or embed with its policy")


def check(fitted: FittedOn, digest: str, name: str, policy: dict[str, Any] | None, what: str = "the calibration") -> None:
    """Refuse a calibration fitted on other vectors than artifact ``digest`` (``name``) makes with the
    long-text ``policy`` (None: no text policy, an image backbone): CalibrationMismatchError. One
    that names no artifact is accepted with a warning (its dimension count is checked by Compact)."""
    if fitted.digest is not None and not digest.startswith(fitted.digest):
        raise CalibrationMismatchError(
            f"{what} was fitted on vectors of {fitted.backbone or 'another backbone'} ({fitted.digest[:12]}), not of "
            f"{name} ({digest[:12]}): its ranges do not fit these vectors (write one from this backbone's features "
            f"with `embedkit store calibration`)")
    check_policy(fitted, policy, what)
    if fitted.digest is None:
        warn_unnamed(fitted, name, what)


def warn_unnamed(fitted: FittedOn, name: str, what: str = "the calibration") -> None:
    logger.warning("%s names no artifact it was fitted on (source %r): used for %s because its dimension count "
                   "fits; nothing else was checked", what, fitted.source, name)
