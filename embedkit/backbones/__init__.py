"""Backbones: the :class:`~embedkit.Backbone` declaration, the plugin registry (pluggy) and blocks.

Imports only :mod:`embedkit.fs`, :mod:`embedkit.errors` and :mod:`embedkit.hookspecs`.
"""
