"""Fixtures for the Python API tests: tiny guests and short socket directories."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from guest_programs import write_echo_kernel, write_spin_kernel  # noqa: E402


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for Unix sockets (sun_path holds 107 bytes; pytest's tmp_path can be longer)."""
    path = tempfile.mkdtemp(prefix="pyemu-api-", dir="/tmp")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def echo_kernel(short_dir: Path) -> Path:
    return write_echo_kernel(short_dir)


@pytest.fixture
def spin_kernel(short_dir: Path) -> Path:
    return write_spin_kernel(short_dir)
