"""Marks shared by the pyemu-img tests (a module of its own: ``from conftest import`` would pick up whichever
directory's conftest pytest imported last)."""

import shutil

import pytest

needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
                                    reason="qemu-img/qemu-io (QEMU 7.2 utils) not installed")
