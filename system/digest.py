"""SHA-256 for the cache keys a VM computes at every start, without importing :mod:`hashlib`.

Why: ``hashlib`` loads OpenSSL's libcrypto when imported (~3 ms here, 2026-12-08), while CPython's own
SHA-256 (built in as ``_sha256`` up to 3.11, ``_sha2`` from 3.12) loads in ~0.1 ms and gives the same
digests. A VM's start hashes only short texts (a native module's C source, the engine patch set), so the
built-in implementation's speed does not matter; where neither module exists, ``hashlib`` is used.
"""

from __future__ import annotations

from typing import Any, Callable


def _find_constructor() -> Callable[[bytes], Any]:
    try:
        from _sha256 import sha256 as builtin  # CPython <= 3.11
        return builtin  # type: ignore[no-any-return]
    except ImportError:
        pass
    try:
        from _sha2 import sha256 as builtin  # CPython >= 3.12
        return builtin  # type: ignore[no-any-return]
    except ImportError:
        import hashlib

        return hashlib.sha256


sha256: Callable[[bytes], Any] = _find_constructor()
"""``sha256(data)``: a SHA-256 object (``update``, ``hexdigest``, ``digest``) as ``hashlib.sha256`` returns."""
