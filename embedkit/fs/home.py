"""embedkit's home folder: where the model store, tuning records and the output journal live."""
from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "EMBEDKIT_HOME"


def default_root() -> Path:
    """The user's model store: ``$EMBEDKIT_HOME`` when set, else the platform's user cache folder.

    The cache folder is ``platformdirs.user_cache_dir("embedkit")``: ``~/.cache/embedkit`` on
    Linux (``$XDG_CACHE_HOME/embedkit`` when that is set), ``~/Library/Caches/embedkit`` on
    macOS, ``%LOCALAPPDATA%\\embedkit\\Cache`` on Windows. It never depends on the working
    directory, so every process of one user shares one copy of each export.
    """
    home = os.environ.get(HOME_ENV)
    if home:
        return Path(home).expanduser().resolve()
    import platformdirs

    return Path(platformdirs.user_cache_dir("embedkit")).resolve()
