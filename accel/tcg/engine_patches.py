"""pyemu's changes to Unicorn 2.1.4's source: where the software CPU spends time for nothing.

Why: a PVH boot of Debian's kernel spends ~81% of its time inside Unicorn's ``emu_start`` (measured with
py-spy, session 10), so no Python-side change brings the software CPU level with QEMU's TCG. Unicorn adds
two costs to QEMU's generated code that QEMU itself does not have:

* after **every guest load and store**, a call to ``helper_check_exit_request`` (``tcg/tcg-op.c``), so a
  memory hook that calls ``uc_emu_stop`` stops right after the access. pyemu installs no memory hooks:
  its stops come from the C block gate at block starts and from device callbacks whose stop may wait for
  the next block start (a machine stop or reset asked for by a device write).
* at **every block start**, the same check as a helper call (``include/exec/gen-icount.h``), where QEMU
  emits an inline load of ``icount_decr`` and a branch to the block's ``TB_EXIT_REQUESTED`` exit. That
  exit is handled by ``cpu_tb_exec``, which puts RIP back at the block start.

Measured (tight ``dec/jnz`` loop and a PVH boot to the shell, same host, same run): bare Unicorn 428 ->
767 M instr/s; pyemu 303 -> 366 M instr/s; PVH boot 5.35-6.0 s -> 4.17-4.74 s.

What else the per-access check served, and why pyemu does not need it: a store that fails in the engine
(unmapped or write-protected physical memory) only requests an exit and relied on that check to leave
right after the store. In pyemu no store can fail there: every physical address below MAXPHYADDR (40
bits, CPUID 0x80000008) is RAM or a device window mapped with all permissions
(:mod:`pyemu.accel.tcg.memory_map`), and a page-table entry pointing above it is a reserved-bit #PF
(pinned by tests/guest/test_tcg_engine.py).

Each :class:`SourcePatch` names the text it expects and how many times; :func:`apply_patches` refuses a
source that does not match (another Unicorn version) rather than building something half-patched.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from pyemu.accel.tcg.errors import EngineBuildError

#: The Unicorn release these patches are written against (the Python binding must be the same release).
UNICORN_VERSION = "2.1.4"


@dataclass(frozen=True)
class SourcePatch:
    """Replace ``pattern`` (a regular expression) by ``replacement`` in ``path`` exactly ``count`` times."""

    name: str
    path: str
    pattern: str
    replacement: str
    count: int

    def apply(self, root: Path) -> None:
        target = root / self.path
        try:
            text = target.read_text()
        except OSError as exc:
            raise EngineBuildError(f"patch {self.name}: cannot read {self.path}: {exc.strerror}",
                                   step="patch") from exc
        new_text, found = re.subn(self.pattern, self.replacement, text, flags=re.MULTILINE)
        if found != self.count:
            raise EngineBuildError(
                f"patch {self.name}: expected {self.count} match(es) in {self.path}, found {found} "
                f"(is this Unicorn {UNICORN_VERSION}'s source?)", step="patch")
        target.write_text(new_text)


NO_CHECK_AFTER_MEMORY_ACCESS = SourcePatch(
    name="no-check-after-memory-access",
    path="qemu/tcg/tcg-op.c",
    # The six calls in tcg_gen_qemu_ld/st_i32/i64; the definition (``void check_exit_request(``) stays.
    pattern=r"^(\s+)check_exit_request\(tcg_ctx\);\n",
    replacement="",
    count=6,
)

EXIT_LABEL_FIELD = SourcePatch(
    name="exit-label-field",
    path="qemu/include/tcg/tcg.h",
    pattern=r"^(    TCGv_i32 delay_slot_flag;\n)",
    replacement=r"\1    struct TCGLabel *pyemu_exit_request_label;  /* pyemu: gen_tb_start's inline exit */\n",
    count=1,
)

INLINE_BLOCK_START_CHECK = SourcePatch(
    name="inline-block-start-check",
    path="qemu/include/exec/gen-icount.h",
    # The whole body of gen_tb_start: a helper call becomes a load and a branch (QEMU's own form).
    pattern=(r"^static inline void gen_tb_start\(TCGContext \*tcg_ctx, TranslationBlock \*tb\)\n\{\n"
             r"(?:.*\n)*?\}\n"),
    replacement=(
        "static inline void gen_tb_start(TCGContext *tcg_ctx, TranslationBlock *tb)\n"
        "{\n"
        "    /* pyemu: leave through the block's TB_EXIT_REQUESTED exit when an exit was requested. */\n"
        "    TCGv_i32 count = tcg_temp_new_i32(tcg_ctx);\n"
        "    tcg_ctx->pyemu_exit_request_label = gen_new_label(tcg_ctx);\n"
        "    tcg_gen_ld_i32(tcg_ctx, count, tcg_ctx->cpu_env,\n"
        "                   offsetof(ArchCPU, neg.icount_decr.u32) - offsetof(ArchCPU, env));\n"
        "    tcg_gen_brcondi_i32(tcg_ctx, TCG_COND_LT, count, 0, tcg_ctx->pyemu_exit_request_label);\n"
        "    tcg_temp_free_i32(tcg_ctx, count);\n"
        "}\n"),
    count=1,
)

EXIT_LABEL_AT_BLOCK_END = SourcePatch(
    name="exit-label-at-block-end",
    path="qemu/include/exec/gen-icount.h",
    pattern=r"^(\s+)(tcg_gen_exit_tb\(tcg_ctx, tb, TB_EXIT_REQUESTED\);\n)",
    replacement=r"\1gen_set_label(tcg_ctx, tcg_ctx->pyemu_exit_request_label);\n\1\2",
    count=1,
)

PATCHES: tuple[SourcePatch, ...] = (
    NO_CHECK_AFTER_MEMORY_ACCESS, EXIT_LABEL_FIELD, INLINE_BLOCK_START_CHECK, EXIT_LABEL_AT_BLOCK_END,
)


def apply_patches(source_root: Path) -> None:
    """Patch Unicorn's ``src`` directory in place (``source_root`` holds ``qemu/`` and ``CMakeLists.txt``)."""
    for patch in PATCHES:
        patch.apply(source_root)


def patch_digest() -> str:
    """A short hash of the patch set: part of the build's cache key, so a changed patch rebuilds."""
    digest = hashlib.sha256(UNICORN_VERSION.encode())
    for patch in PATCHES:
        for part in (patch.name, patch.path, patch.pattern, patch.replacement, str(patch.count)):
            digest.update(part.encode())
            digest.update(b"\0")
    return digest.hexdigest()[:16]
