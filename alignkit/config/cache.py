"""alignkit's user cache folder: remembered weight hashes, data sets handed over in memory."""

from __future__ import annotations

import os


def user_cache_dir() -> str:
    """`$ALIGNKIT_CACHE_DIR`, else `$XDG_CACHE_HOME/alignkit`, else `~/.cache/alignkit`."""
    if os.environ.get("ALIGNKIT_CACHE_DIR"):
        return os.environ["ALIGNKIT_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "alignkit")
