"""pyemu's libunicorn: the source patches refuse a source they do not fit, the library choice follows
PYEMU_UNICORN and the cache, and CI runs the tests on the build (.ci/run builds it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pyemu.accel import tcg
from pyemu.accel.tcg.engine_build import check_library, kept_sdist, main, unpack_source
from pyemu.accel.tcg.engine_library import LIBRARY_NAME, build_dir, loaded_library, select_engine_library
from pyemu.accel.tcg.engine_patches import (EXIT_LABEL_AT_BLOCK_END, EXIT_LABEL_FIELD, INLINE_BLOCK_START_CHECK,
                                            NO_CHECK_AFTER_MEMORY_ACCESS, PATCHES, SourcePatch, apply_patches,
                                            patch_digest)
from pyemu.accel.tcg.errors import EngineBuildError

# The lines of Unicorn 2.1.4 the patches anchor on, in the files they patch: enough to patch a tree.
TCG_OP = "void f(void)\n{\n    x();\n\n    check_exit_request(tcg_ctx);\n}\n" * 5 \
    + "void g(void)\n{\n        check_exit_request(tcg_ctx);\n        return;\n}\n" \
    + "void check_exit_request(TCGContext *tcg_ctx)\n{\n}\n"
TCG_H = "struct TCGContext {\n    TCGv_i32 delay_slot_flag;\n};\n"
GEN_ICOUNT = ("static inline void gen_tb_start(TCGContext *tcg_ctx, TranslationBlock *tb)\n{\n"
              "    if (tcg_ctx->delay_slot_flag != NULL) {\n        y();\n    }\n"
              "    gen_helper_check_exit_request(tcg_ctx, puc, tmp);\n}\n\n"
              "static inline void gen_tb_end(TCGContext *tcg_ctx, TranslationBlock *tb, int num_insns)\n{\n"
              "    tcg_gen_exit_tb(tcg_ctx, tb, TB_EXIT_REQUESTED);\n}\n")


EXIT_CHECK_PATCHES = (NO_CHECK_AFTER_MEMORY_ACCESS, EXIT_LABEL_FIELD, INLINE_BLOCK_START_CHECK,
                      EXIT_LABEL_AT_BLOCK_END)


def _apply(patches: tuple[SourcePatch, ...], root: Path) -> None:
    for patch in patches:
        patch.apply(root)


def _source_tree(root: Path) -> Path:
    for relative, text in (("qemu/tcg/tcg-op.c", TCG_OP), ("qemu/include/tcg/tcg.h", TCG_H),
                           ("qemu/include/exec/gen-icount.h", GEN_ICOUNT)):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    return root


def test_patches_apply_to_the_lines_they_were_written_for(tmp_path: Path) -> None:
    root = _source_tree(tmp_path)
    _apply(EXIT_CHECK_PATCHES, root)
    tcg_op = (root / "qemu/tcg/tcg-op.c").read_text()
    assert tcg_op.count("check_exit_request(tcg_ctx);") == 0
    assert "void check_exit_request(TCGContext *tcg_ctx)" in tcg_op
    gen_icount = (root / "qemu/include/exec/gen-icount.h").read_text()
    assert "gen_helper_check_exit_request" not in gen_icount
    assert "tcg_gen_brcondi_i32(tcg_ctx, TCG_COND_LT, count, 0, tcg_ctx->pyemu_exit_request_label);" in gen_icount
    assert gen_icount.index("gen_set_label(tcg_ctx, tcg_ctx->pyemu_exit_request_label);") \
        < gen_icount.index("tcg_gen_exit_tb(tcg_ctx, tb, TB_EXIT_REQUESTED);")
    assert "pyemu_exit_request_label;" in (root / "qemu/include/tcg/tcg.h").read_text()


def test_a_source_that_does_not_fit_is_refused_not_half_patched(tmp_path: Path) -> None:
    root = _source_tree(tmp_path)
    (root / "qemu/tcg/tcg-op.c").write_text(TCG_OP.replace("    check_exit_request(tcg_ctx);\n", "", 1))
    with pytest.raises(EngineBuildError, match="expected 6 match") as raised:
        _apply(EXIT_CHECK_PATCHES, root)
    assert raised.value.step == "patch"
    missing = SourcePatch("missing", "qemu/nowhere.c", "x", "y", 1)
    with pytest.raises(EngineBuildError, match="cannot read qemu/nowhere.c"):
        missing.apply(root)


def test_every_patch_fits_unicorns_real_source(tmp_path: Path) -> None:
    """Against the sdist the build was made from (kept in the cache by ``pyemu-engine build``)."""
    sdist = kept_sdist()
    if not sdist.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{sdist} missing in CI: .ci/run must run 'pyemu-engine build'")
        pytest.skip("no Unicorn sdist kept (run 'pyemu-engine build')")
    source = unpack_source(sdist, tmp_path)
    apply_patches(source)
    translator = (source / "qemu/accel/tcg/translator.c").read_text()
    assert "uc->pyemu_attention" in translator and "pyemu_last_block" in translator
    assert "uc_pyemu_block_gate" in (source / "uc.c").read_text()
    assert "uc_pyemu_gate_options" in (source / "uc.c").read_text()
    assert "pyemu_gate_options & 1" in (source / "qemu/target/i386/misc_helper.c").read_text()


def test_a_changed_patch_set_is_a_different_build() -> None:
    digest = patch_digest()
    assert len(digest) == 16 and build_dir().name.endswith(digest)
    original = PATCHES[0]
    changed = SourcePatch(original.name, original.path, original.pattern, original.replacement, original.count + 1)
    import pyemu.accel.tcg.engine_patches as patches

    try:
        patches.PATCHES = (changed, *PATCHES[1:])
        assert patch_digest() != digest
    finally:
        patches.PATCHES = PATCHES


def _fake_build(cache: Path) -> Path:
    directory = build_dir({"PYEMU_CACHE": str(cache)})
    directory.mkdir(parents=True)
    (directory / LIBRARY_NAME).write_bytes(b"\x7fELF")
    (directory / "stamp").write_text("{}\n")
    return directory


def test_choice_follows_pyemu_unicorn_and_the_cache(tmp_path: Path) -> None:
    env: dict[str, str] = {"PYEMU_CACHE": str(tmp_path)}
    assert select_engine_library(env, unicorn_loaded=False) == "pypi"        # nothing built
    assert "LIBUNICORN_PATH" not in env
    with pytest.raises(EngineBuildError, match="no build"):
        select_engine_library({**env, "PYEMU_UNICORN": "pyemu"}, unicorn_loaded=False)
    with pytest.raises(EngineBuildError, match="expected one of auto, pypi, pyemu"):
        select_engine_library({**env, "PYEMU_UNICORN": "fast"}, unicorn_loaded=False)
    directory = _fake_build(tmp_path)
    assert select_engine_library(env, unicorn_loaded=False) == "pyemu"
    assert env["LIBUNICORN_PATH"] == str(directory)
    child = dict(env, PYEMU_UNICORN="pypi")                                   # inherits the parent's choice
    assert select_engine_library(child, unicorn_loaded=False) == "pypi"
    assert "LIBUNICORN_PATH" not in child
    assert select_engine_library({**env, "PYEMU_UNICORN": "pypi"} | {"LIBUNICORN_PATH": ""},
                                 unicorn_loaded=False) == "pypi"
    user = {"PYEMU_CACHE": str(tmp_path), "LIBUNICORN_PATH": "/opt/unicorn"}
    assert select_engine_library(user, unicorn_loaded=False) == "user"
    assert user["LIBUNICORN_PATH"] == "/opt/unicorn"
    late = {"PYEMU_CACHE": str(tmp_path)}                                     # unicorn already imported
    assert select_engine_library(late, unicorn_loaded=True) == "pypi" and "LIBUNICORN_PATH" not in late


def test_the_build_is_not_loaded_under_another_binding_release(tmp_path: Path) -> None:
    _fake_build(tmp_path)
    env = {"PYEMU_CACHE": str(tmp_path)}
    assert select_engine_library(env, unicorn_loaded=False, binding_matches=False) == "pypi"
    assert "LIBUNICORN_PATH" not in env
    with pytest.raises(EngineBuildError, match="binding is not 2.1.4"):
        select_engine_library({**env, "PYEMU_UNICORN": "pyemu"}, unicorn_loaded=False, binding_matches=False)
    assert select_engine_library(env, unicorn_loaded=False, binding_matches=True) == "pyemu"


def test_an_incomplete_build_is_not_chosen(tmp_path: Path) -> None:
    directory = _fake_build(tmp_path)
    (directory / "stamp").unlink()                                            # the stamp is written last
    assert select_engine_library({"PYEMU_CACHE": str(tmp_path)}, unicorn_loaded=False) == "pypi"


def test_the_build_check_refuses_a_directory_without_the_library(tmp_path: Path) -> None:
    """The binding falls back to PyPI's library silently; the check notices which one it loaded."""
    with pytest.raises(EngineBuildError) as raised:
        check_library(tmp_path)
    assert raised.value.step == "check"


def test_unpack_refuses_an_archive_without_unicorn_source(tmp_path: Path) -> None:
    import tarfile

    archive = tmp_path / "unicorn-2.1.4.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(__file__, arcname="unicorn-2.1.4/README")
    with pytest.raises(EngineBuildError, match="does not hold one unicorn source tree"):
        unpack_source(archive, tmp_path / "out")
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tar file")
    with pytest.raises(EngineBuildError, match="cannot unpack"):
        unpack_source(tmp_path / "junk.tar.gz", tmp_path / "out2")


def test_status_reports_what_this_process_loaded(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["selected"] == tcg.ENGINE_LIBRARY
    assert facts["loaded"] == loaded_library()
    if tcg.ENGINE_LIBRARY == "pyemu":
        assert Path(facts["loaded"]).parent == build_dir()


def test_ci_runs_the_software_cpu_on_pyemus_build() -> None:
    """.ci/run builds the library before the tests; a CI run that silently fell back would measure and
    test PyPI's library instead."""
    if not os.environ.get("CI"):
        pytest.skip("outside CI the build is optional ('pyemu-engine build')")
    assert tcg.ENGINE_LIBRARY == "pyemu", tcg.ENGINE_LIBRARY_ERROR
    assert Path(loaded_library()).parent == build_dir()


def test_the_block_gate_is_conditional_exactly_on_pyemus_build() -> None:
    from pyemu.testing import GuestProgram, prepared

    with prepared(GuestProgram("hlt")) as machine:
        assert machine.vcpu._gate.conditional == (tcg.ENGINE_LIBRARY == "pyemu")  # type: ignore[attr-defined]


def test_build_with_a_missing_sdist_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PYEMU_CACHE", str(tmp_path / "cache"))
    assert main(["build", "--force", "--quiet", "--sdist", str(tmp_path / "missing.tar.gz")]) == 1
    error = capsys.readouterr().err
    assert error.startswith("pyemu-engine: error (download): --sdist") and "no such file" in error
    assert not (tmp_path / "cache" / "unicorn").exists() or not any((tmp_path / "cache" / "unicorn").glob("2.1.4-*"))
