"""The plugin contract: what a plugin may implement.

A plugin is any module or object with functions decorated by ``hookimpl``,
advertised through the ``embedkit`` entry-point group.
"""
from __future__ import annotations

from typing import Callable

import pluggy

hookspec = pluggy.HookspecMarker("embedkit")
hookimpl = pluggy.HookimplMarker("embedkit")


@hookspec
def register_backbones(register: Callable[..., None]) -> None:
    """Call ``register(backbone)`` once per :class:`embedkit.Backbone` the plugin provides.

    Registration must be cheap: no torch import, no weight loading, no file reads.
    """


@hookspec(firstresult=True)
def resolve_backbone(spec: str):  # type: ignore[empty-body]
    """Turn a spec that is not a registered name (e.g. a local model folder) into a Backbone.

    Return ``None`` when the plugin does not recognise ``spec``.
    """
