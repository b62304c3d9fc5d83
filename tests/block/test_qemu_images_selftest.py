"""Fixture self-tests: every corpus image's reference model agrees with QEMU's own reading of the image.

These run without pyemu's qcow2 code. A failure here means a builder in qemu_images.py models a qemu-io
command wrongly, not that pyemu is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

import json

from qemu_images import CASES, HUGE_SIZE, SNAPSHOT_NAMES, Corpus, QemuImage, qemu_img, qemu_info, qemu_map


def check_features(image: QemuImage, info: dict) -> None:
    """The image really contains what its case is about (a builder that silently produced a plain image
    would make the pyemu tests pass vacuously)."""
    data = info["format-specific"]["data"]
    name = image.name
    assert data["compat"] == image.options.get("compat", data["compat"])
    if "compressed" in name:
        report = json.loads(qemu_img("check", "-U", "--output=json", image.path, check=False).stdout)
        assert report.get("compressed-clusters", 0) > 0, report
    if name.startswith(("zeros_v3", "extl2")) or name == "chain3":
        zero_extents = [e for e in qemu_map(image.path) if e["depth"] == 0 and e["present"] and e["zero"]]
        assert zero_extents, "no zero clusters at depth 0"
    if name.startswith("extl2"):
        assert data["extended-l2"] is True
        cluster = info["cluster-size"]
        assert any(e["depth"] == 0 and e["present"] and e["length"] % cluster for e in qemu_map(image.path)), \
            "no subcluster-sized extents"
    if name.startswith("refcount"):
        assert data["refcount-bits"] == int(name.removeprefix("refcount"))
    if name == "relative_backing":
        assert info["backing-filename"] == "../base/base.qcow2"
    if name == "raw_backing":
        assert info["backing-filename-format"] == "raw"


@pytest.mark.parametrize("case", sorted(CASES))
def test_fixture_selftest_model_matches_qemu(qemu_corpus: Corpus, case: str, tmp_path: Path) -> None:
    image = qemu_corpus.get(case)
    info = qemu_info(image.path)
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == image.size
    if "cluster_size" in image.options:
        assert info["cluster-size"] == int(image.options["cluster_size"])
    if image.chain:
        assert "backing-filename" in info
    assert sorted(s["name"] for s in info.get("snapshots", [])) == sorted(image.snapshots)
    assert sorted(image.snapshots) == sorted(SNAPSHOT_NAMES.get(case, []))
    check_features(image, info)
    image.verify_with_qemu(tmp_path)


def test_fixture_selftest_lazy_image_is_dirty(qemu_corpus: Corpus) -> None:
    image = qemu_corpus.get("lazy_dirty")
    if not image.dirty:
        pytest.skip("qemu-io did not leave the lazy-refcounts image dirty on this QEMU")
    info = qemu_info(image.path)
    assert info["dirty-flag"] is True
    assert info["format-specific"]["data"]["lazy-refcounts"] is True


def test_fixture_selftest_huge_image_is_sparse(qemu_corpus: Corpus) -> None:
    image = qemu_corpus.get("huge_sparse")
    assert image.size == HUGE_SIZE
    assert image.path.stat().st_size < 16 << 20


def test_fixture_selftest_clean_images_check_clean(qemu_corpus: Corpus) -> None:
    """Every image except the deliberately dirty one passes ``qemu-img check`` (so a pyemu check() finding
    errors on them is pyemu's bug)."""
    for case in sorted(CASES):
        image = qemu_corpus.get(case)
        proc = qemu_img("check", "-U", image.path, check=False)
        if image.dirty:
            continue
        assert proc.returncode == 0, f"{case}: {proc.stdout}{proc.stderr}"
