"""Which libunicorn the software CPU loads: pyemu's patched build when it is there, else PyPI's.

Why here and not at build time: the Python binding ``unicorn`` loads its shared library once, when it is
first imported, from ``$LIBUNICORN_PATH`` if set. pyemu's build (``pyemu-engine build``, see
:mod:`pyemu.accel.tcg.engine_build`) lives in pyemu's cache, so :func:`select_engine_library` points
``LIBUNICORN_PATH`` there before the first ``import unicorn`` (``pyemu.accel.tcg`` calls it on import).

The build is used only with the binding release it was made from (2.1.4); another release of the
``unicorn`` package gets its own library. ``PYEMU_UNICORN`` chooses: ``auto`` (default: the build when
present, PyPI's library otherwise), ``pypi`` (always PyPI's), ``pyemu`` (the build; its absence is an
error when the software CPU starts). A
``LIBUNICORN_PATH`` the user set is left alone. Both libraries run the same guest-visible CPU; the build
drops per-access helper calls (:mod:`pyemu.accel.tcg.engine_patches`).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from pyemu.accel.tcg.engine_patches import UNICORN_VERSION, patch_digest
from pyemu.accel.tcg.errors import EngineBuildError
from pyemu.system.cache import cache_root

CHOICE_VARIABLE = "PYEMU_UNICORN"
LIBRARY_NAME = "libunicorn.so.2"
CHOICES = ("auto", "pypi", "pyemu")


def build_dir(environ: dict[str, str] | os._Environ[str] | None = None) -> Path:
    """Where the build for this Unicorn release and this patch set lives (a changed patch is a new dir)."""
    return cache_root(environ) / "unicorn" / f"{UNICORN_VERSION}-{patch_digest()}"


def built_library(environ: dict[str, str] | os._Environ[str] | None = None) -> Path | None:
    """The built library if a complete build is in the cache (the stamp is written last)."""
    directory = build_dir(environ)
    library = directory / LIBRARY_NAME
    if (directory / "stamp").is_file() and library.is_file():
        return library
    return None


def binding_is_built_release() -> bool:
    """Whether the installed ``unicorn`` binding is the release the build was made from (a stat, not an
    import: importing would load a library, and ``importlib.metadata`` costs ~30 ms at every start)."""
    spec = importlib.util.find_spec("unicorn")
    if spec is None or spec.origin is None:
        return False
    return (Path(spec.origin).parent.parent / f"unicorn-{UNICORN_VERSION}.dist-info").is_dir()


def select_engine_library(environ: dict[str, str] | os._Environ[str] | None = None, *,
                          unicorn_loaded: bool | None = None, binding_matches: bool | None = None) -> str:
    """Point ``LIBUNICORN_PATH`` at the chosen library before ``unicorn`` is imported; returns which one
    the process will use: ``"pyemu"``, ``"pypi"``, or ``"user"`` (``LIBUNICORN_PATH`` set beforehand).

    Raises :class:`EngineBuildError` for ``PYEMU_UNICORN=pyemu`` without a build, or an unknown choice.
    Once ``unicorn`` is loaded (``unicorn_loaded``, default: whether it is imported) the choice cannot
    change; the function then reports what is loaded.
    """
    env = os.environ if environ is None else environ
    loaded = "unicorn" in sys.modules if unicorn_loaded is None else unicorn_loaded
    choice = env.get(CHOICE_VARIABLE, "auto") or "auto"
    if choice not in CHOICES:
        raise EngineBuildError(f"{CHOICE_VARIABLE}={choice!r}: expected one of {', '.join(CHOICES)}",
                               step="select")
    current = env.get("LIBUNICORN_PATH")
    if current and Path(current) == build_dir(environ) and choice == "pypi" and not loaded:
        del env["LIBUNICORN_PATH"]  # inherited from a parent pyemu process that chose the build
        return "pypi"
    if current:
        return "pyemu" if Path(current) == build_dir(environ) else "user"
    if loaded:
        return "pypi"
    library = built_library(environ)
    if choice == "pyemu" and library is None:
        raise EngineBuildError(f"{CHOICE_VARIABLE}=pyemu but no build in {build_dir(environ)} "
                               "(run 'pyemu-engine build')", step="select")
    if library is not None and not (binding_is_built_release() if binding_matches is None else binding_matches):
        if choice == "pyemu":
            raise EngineBuildError(f"{CHOICE_VARIABLE}=pyemu but the installed unicorn binding is not "
                                   f"{UNICORN_VERSION}, the release the build was made from", step="select")
        return "pypi"  # another binding release: its own library, not a build of a different one
    if choice == "pypi" or library is None:
        return "pypi"
    env["LIBUNICORN_PATH"] = str(library.parent)
    return "pyemu"


def loaded_library() -> str:
    """The path of the libunicorn this process loaded (imports ``unicorn``): for benchmark reports."""
    from unicorn.unicorn_py3 import unicorn as binding

    return str(getattr(binding.uclib, "_name", "?"))
