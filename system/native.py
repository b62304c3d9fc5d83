"""Small C modules compiled with cffi (API mode) at first use and kept in pyemu's cache.

Why C at all: a few paths run thousands of times a second and Python there costs more than the work (the
software CPU's block gate, the virtio-blk data plane). Why build at first use rather than at install: the
project installs with ``pip -e`` and has no build step; gcc and the Python headers are on every machine it
supports. A module is named after a digest of its C source, its cdef and the Python version, so a changed
source builds a new file next to the old one and a running process never loads a stale build.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType
from typing import Sequence

from pyemu.system import log
from pyemu.system.cache import cache_root
from pyemu.system.digest import sha256


class NativeBuildError(Exception):
    """A C module could not be compiled or loaded (``build_dir``: where the compiler ran)."""

    def __init__(self, message: str, *, build_dir: str) -> None:
        super().__init__(message)
        self.build_dir = build_dir


_lock = threading.Lock()
_loaded: dict[str, ModuleType] = {}
_by_sources: dict[tuple[str, tuple[Path, ...]], ModuleType] = {}
"""Modules already loaded, by what was asked for: later calls skip reading and hashing the sources
(~130 us each; the accelerator asks for the block gate several times per VM)."""


def module_name(prefix: str, source: str, cdef: str) -> str:
    digest = sha256((source + cdef + sys.version).encode()).hexdigest()[:16]
    return f"_pyemu_{prefix}_{digest}"


def load_native(prefix: str, sources: Sequence[Path], cdef: str, *, what: str) -> ModuleType:
    """Build (first use) and import the module made of ``sources`` declaring ``cdef``; ``what`` names it
    in errors ("the C block gate"). Later calls return the loaded module."""
    key = (prefix, tuple(sources))
    module = _by_sources.get(key)
    if module is not None:
        return module
    source = "\n".join(path.read_text() for path in sources)
    name = module_name(prefix, source, cdef)
    with _lock:
        module = _loaded.get(name)
        if module is not None:
            _by_sources[key] = module
            return module
        directory = cache_root()
        existing = sorted(directory.glob(f"{name}*.so")) if directory.is_dir() else []
        path = existing[0] if existing else _build(name, source, cdef, directory, what)
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise NativeBuildError(f"cannot load {what} from {path}", build_dir=str(directory))
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except ImportError as exc:
            raise NativeBuildError(f"cannot import {what} {path}: {exc}", build_dir=str(directory)) from exc
        _loaded[name] = module
        _by_sources[key] = module
        return module


def _build(name: str, source: str, cdef: str, directory: Path, what: str) -> Path:
    import cffi

    try:
        directory.mkdir(parents=True, exist_ok=True)
        workdir = tempfile.mkdtemp(prefix="build-", dir=directory)
    except OSError as exc:
        raise NativeBuildError(f"cannot create the build directory: {exc.strerror}",
                               build_dir=str(directory)) from exc
    ffi = cffi.FFI()
    ffi.cdef(cdef)
    ffi.set_source(name, source, extra_compile_args=["-O2"])
    try:
        built = Path(ffi.compile(tmpdir=workdir, verbose=False))
        target = directory / built.name
        os.replace(built, target)  # atomic: concurrent builders leave one complete file
    except Exception as exc:  # cffi raises VerificationError / distutils errors / OSError
        raise NativeBuildError(f"building {what} failed: {exc}", build_dir=workdir) from exc
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return target


class OptionalNative:
    """A C module a feature can do without: built and loaded at the first :meth:`get`, or, where it cannot
    be, None from then on (the reason logged once under ``-d unimp``, ``without`` saying what the process
    does instead)."""

    def __init__(self, prefix: str, sources: Sequence[Path], cdef: str, *, what: str, without: str) -> None:
        self._args = (prefix, tuple(sources), cdef)
        self._what = what
        self._without = without
        self._module: ModuleType | None = None
        self._unavailable = False

    def get(self) -> ModuleType | None:
        if self._module is None and not self._unavailable:
            prefix, sources, cdef = self._args
            try:
                self._module = load_native(prefix, sources, cdef, what=self._what)
            except NativeBuildError as exc:
                self._unavailable = True
                log.log("unimp", f"{self._what} unavailable, {self._without}: {exc}")
        return self._module
