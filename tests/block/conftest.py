"""Fixtures for the block-layer interop tests: the QEMU-made qcow2 corpus (see qemu_images.py), built lazily
once per session, and a skip when qemu-img/qemu-io are not installed."""

from __future__ import annotations

import pytest

from qemu_images import Corpus, qemu_tools_missing


@pytest.fixture(scope="session")
def qemu_corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    reason = qemu_tools_missing()
    if reason is not None:
        pytest.skip(reason)
    return Corpus(tmp_path_factory.mktemp("qcow2-corpus"))
