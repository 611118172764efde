"""The plugin manager: entry-point plugins, validation and the backbone registry.

Every backbone, built-in or third-party, arrives through the ``embedkit`` entry-point
group and the ``register_backbones`` hook. A plugin that fails to import, misspells a
hook or registers an invalid backbone is recorded in :func:`plugin_report` by name and
version; the other plugins keep working.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from importlib import import_module, metadata
from typing import Any

import pluggy

from .. import hookspecs
from ..errors import DuplicateBackboneError, EmbedkitError, InvalidBackboneError, UnknownBackboneError
from .backbone import Backbone

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "embedkit"
LOAD_ENV = "EMBEDKIT_LOAD_PLUGINS"
# embedkit's own resolvers, shipped as plugins through the same ``resolve_backbone`` hook a third
# party implements (as llm ships ``llm.default_plugins``): a fine-tune kept in the default model
# store by its name, then a folder holding model.onnx + tokenizer.json. Both are ``tryfirst``,
# so they answer before third-party resolvers, as they did when the registry hard-coded them;
# the later one here is asked first. Named, not imported, so this leaf imports nothing above it.
DEFAULT_PLUGINS = ("embedkit.models.importer", "embedkit.models.finetuned")


@dataclass
class PluginInfo:
    """What ``embedkit plugins`` shows for one plugin."""

    name: str
    distribution: str
    version: str
    backbones: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "backbones": self.backbones,
            "status": "ok" if self.ok else "broken",
            "errors": self.errors,
        }


class Registry:
    """Backbones collected from the loaded plugins."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("embedkit")
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self.backbones: dict[str, Backbone] = {}
        self.owner: dict[str, str] = {}
        self.duplicates: dict[str, str] = {}

    # -- loading -------------------------------------------------------------
    def load_default_plugins(self) -> None:
        """Register embedkit's own resolvers (:data:`DEFAULT_PLUGINS`); they are not listed by
        :func:`plugin_report` and ``EMBEDKIT_LOAD_PLUGINS`` does not filter them."""
        for name in DEFAULT_PLUGINS:
            self.pm.register(import_module(name), name=name)
        self.pm.check_pending()

    def load_entry_points(self) -> None:
        allowed = _allowed_plugins()
        found = list(metadata.entry_points(group=ENTRY_POINT_GROUP))
        if allowed is not None:
            # A name that matches nothing is a typo or an uninstalled plugin: say so, with the choices.
            known = {ep.name for ep in found} | {ep.dist.name for ep in found if ep.dist is not None}
            unknown = sorted(allowed - known)
            if unknown:
                choices = ", ".join(sorted({f"{ep.name} ({ep.dist.name if ep.dist else '?'})" for ep in found})) or "none"
                logger.warning("%s names %s, which no installed plugin is called; installed plugins: %s",
                               LOAD_ENV, ", ".join(repr(u) for u in unknown), choices)
        for ep in found:
            dist = ep.dist.name if ep.dist is not None else "?"
            version = ep.dist.version if ep.dist is not None else "?"
            if allowed is not None and ep.name not in allowed and dist not in allowed:
                continue
            info = PluginInfo(ep.name, dist, version)
            self.plugins[ep.name] = info
            try:
                module = ep.load()
            except Exception as exc:  # any import failure must not break the other plugins
                info.errors.append(f"import failed: {type(exc).__name__}: {exc}")
                logger.warning("plugin %s (%s %s) failed to import: %s", ep.name, dist, version, exc)
                continue
            self.add_plugin(module, ep.name, info)

    def add_plugin(self, plugin: Any, name: str, info: PluginInfo | None = None) -> PluginInfo:
        """Register an in-process plugin object (module or instance) and collect its backbones."""
        if info is None:
            info = PluginInfo(name, "(in process)", "-")
        self.plugins[name] = info
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
        except Exception as exc:  # misspelt hook, bad hookimpl signature
            info.errors.append(f"invalid hooks: {type(exc).__name__}: {exc}")
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            return info
        for impl in self.pm.hook.register_backbones.get_hookimpls():
            if impl.plugin_name == name:
                self._collect(impl, info)
        return info

    def _collect(self, impl: Any, info: PluginInfo) -> None:
        def register(backbone: Any) -> None:
            if not isinstance(backbone, Backbone):
                info.errors.append(f"register() takes an embedkit.Backbone, got {type(backbone).__name__}")
                return
            try:
                backbone.validate()
            except InvalidBackboneError as exc:
                info.errors.append(f"backbone {getattr(backbone, 'name', '?')!r} rejected: {exc}")
                logger.warning("plugin %s: backbone rejected: %s", info.name, exc)
                return
            if backbone.name in self.backbones:
                # Neither plugin silently wins: the name is refused on use and both are flagged.
                other = self.owner[backbone.name]
                message = (
                    f"backbone name {backbone.name!r} is registered by both plugin {other!r} "
                    f"and plugin {info.name!r}"
                )
                self.duplicates[backbone.name] = message
                info.errors.append(message)
                self.plugins[other].errors.append(message)
                logger.warning("%s", message)
                return
            self.backbones[backbone.name] = backbone
            self.owner[backbone.name] = info.name
            info.backbones.append(backbone.name)

        try:
            impl.function(register=register)
        except Exception as exc:  # a bad plugin costs only its own backbones
            info.errors.append(f"register_backbones failed: {type(exc).__name__}: {exc}")
            logger.warning("plugin %s failed to register backbones: %s", info.name, exc)

    # -- lookup --------------------------------------------------------------
    def get(self, spec: str) -> Backbone:
        if spec in self.duplicates:
            raise DuplicateBackboneError(self.duplicates[spec])
        if spec in self.backbones:
            return self.backbones[spec]
        try:
            found = self.pm.hook.resolve_backbone(spec=spec)
        except EmbedkitError:
            raise
        except Exception as exc:
            raise UnknownBackboneError(f"{spec} ({type(exc).__name__}: {exc})", list(self.backbones)) from exc
        if found is None:
            raise UnknownBackboneError(spec, list(self.backbones))
        found.validate()
        return found


def _allowed_plugins() -> set[str] | None:
    raw = os.environ.get(LOAD_ENV)
    if raw is None:
        return None
    return {p.strip() for p in raw.split(",") if p.strip()}


_lock = threading.Lock()
_registry: Registry | None = None


def registry() -> Registry:
    """The process-wide registry, loaded from entry points on first use."""
    global _registry
    with _lock:
        if _registry is None:
            reg = Registry()
            reg.load_default_plugins()
            reg.load_entry_points()
            _registry = reg
        return _registry


def reset() -> None:
    """Forget loaded plugins (the next lookup reloads entry points and EMBEDKIT_LOAD_PLUGINS)."""
    global _registry
    with _lock:
        _registry = None


def register_plugin(plugin: Any, name: str) -> PluginInfo:
    """Register an in-process plugin object, as a test or an application would."""
    return registry().add_plugin(plugin, name)


def list_backbones() -> list[Backbone]:
    """All registered backbones, sorted by name."""
    reg = registry()
    return [reg.backbones[n] for n in sorted(reg.backbones)]


def get_backbone(spec: str) -> Backbone:
    """Look a backbone up by registered name, or let a plugin resolve a spec such as a path."""
    return registry().get(spec)


def plugin_report() -> list[PluginInfo]:
    """Every plugin seen, with its status, backbones and errors."""
    return sorted(registry().plugins.values(), key=lambda p: p.name)
