"""Where pyemu keeps what it fetches, builds or measures outside the repository (guest assets, compiled C
hooks, host facts), and how small cache files are written."""

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


def store_small_file(path: Path, content: str | bytes) -> bool:
    """Write ``content`` to ``path`` whole or not at all (a rename), so a concurrent reader never sees half of
    it. False when it cannot be written: a cache that cannot be written only costs the next process the
    work it saves."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            temporary.write_bytes(content)
        else:
            temporary.write_text(content)
        os.replace(temporary, path)
        return True
    except OSError:
        try:
            temporary.unlink()
        except OSError:
            pass
        return False
