"""Fixtures for the VM-state tests: tiny guest programs and short socket directories."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory (Unix socket paths hold 107 bytes; pytest's tmp_path can be longer)."""
    path = tempfile.mkdtemp(prefix="pyemu-mig-", dir="/tmp")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)
