"""Where pyemu keeps what it fetches or builds outside the repository (guest assets, compiled C hooks)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(environ: dict[str, str] | os._Environ[str] | None = None) -> Path:
    """``$PYEMU_CACHE``, else ``$XDG_CACHE_HOME/pyemu``, else ``~/.cache/pyemu`` (not created)."""
    env = os.environ if environ is None else environ
    if env.get("PYEMU_CACHE"):
        return Path(env["PYEMU_CACHE"]).expanduser()
    if env.get("XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]).expanduser() / "pyemu"
    return Path(env.get("HOME") or Path.home()).expanduser() / ".cache" / "pyemu"
