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

And one QEMU does more cheaply: after translating a block, Unicorn marks the block's pages "not dirty" in
the TLB (so the next store to them invalidates the code) by walking **every entry of every TLB**
(``tlb_reset_dirty_by_vaddr``, ~6% of a PVH boot's samples). QEMU's main TLB is direct-mapped by virtual
page: only the slot of each covered page can hold it, so the patch looks at those slots (and, as before,
the 8-entry victim TLB).

Then pyemu's own per-block cost: its C block gate (:mod:`pyemu.accel.tcg.block_gate`), a
``UC_HOOK_BLOCK`` callback, was called at every block start to find, almost always, that nothing needs
it (13% of a PVH boot's samples, most of it the call itself). The last three patches add
``uc_pyemu_block_gate(uc, attention, watched, seen, last_block)``: the translated code then tests
``*attention != 0 || **watched != *seen`` inline and calls the hook only then, and stores the block's
start in ``*last_block`` after it. pyemu points these at the gate's attention word (set by whoever sets
a gate flag), at QEMU's ``env->cr[4]`` and the CR4 the gate last saw (the CR4 guard), and at the gate's
``last_block`` (the CR4 guard's previous block, the guest profiler's samples). Since
``cr4-write-notifies-gate``, pyemu asks (``uc_pyemu_gate_options``) for blocks without the CR4 watch and
without the ``last_block`` store (kept only while a sampling profiler asks for it): the CR4 write helper
sets ``*attention`` and records the MOV's address itself, and each block is left with one load and one
branch before its code.

And one the guest needs that QEMU 5.0's TCG cannot give: RDMSR of IA32_ARCH_CAPABILITIES reads 0 there, so a
guest told it runs on a family-6 Intel CPU assumes every speculative-execution flaw and turns on page-table
isolation, whose CR3 switch at every kernel entry and exit flushes the software TLB. The last three patches
add ``uc_pyemu_set_arch_capabilities(uc, value)`` and make the MSR read that value
(:data:`pyemu.accel.tcg.msrs.SOFTWARE_CPU_ARCH_CAPABILITIES`).

And events that Unicorn only reports, which pyemu then carried out in Python: the ``native-*`` and
``fill-fallback-in-run`` patches let the engine deliver page faults through the guest's IDT with QEMU's
own ``x86_cpu_do_interrupt``, fill a TLB entry that pyemu's fill hook hands over within the run (before,
the failed fill ended ``emu_start``), and execute SYSCALL in IA-32e mode instead of calling the hooks.
pyemu switches them on per engine (``uc_pyemu_native_events``; :mod:`pyemu.accel.tcg.engine_delivery`).
The ``irq-*`` patches do the same for external interrupts: the block gate, finding one pending with IF=1,
raises QEMU's ``CPU_INTERRUPT_HARD`` (``uc_pyemu_raise_interrupt``) instead of stopping the run, and QEMU's
own hardirq path (``x86_cpu_exec_interrupt``, which honours the interrupt shadow) asks the vCPU's interrupt
controller for the vector through a callback (``uc_pyemu_interrupt_controller``) and delivers it
(:meth:`pyemu.accel.tcg.block_gate.BlockGate.take_interrupts_in_engine`).
With QEMU delivering events, its delivery's own faults reach the guest: the ``idt-error-code-*`` patches
correct the error code of a fault on the IDT (QEMU 5.0's long mode says vector * 16 + 2, and never sets EXT).
The ``pause-*`` patches call a function of pyemu's at every PAUSE (``uc_pyemu_on_pause``): the block gate
ends the vCPU's turn there when another vCPU waits for it, as QEMU's single-threaded TCG moves on to the
next vCPU at every PAUSE (:func:`pyemu.accel.tcg.block_gate.BlockGate`). The ``halt-*`` patches call one at
every HLT with IF=1 (``uc_pyemu_on_halt``): the block gate spins there for the vCPU's halt-polling window,
and an interrupt that arrives meanwhile is taken inside the same run, so a vCPU woken from HLT by its disk
or network no longer leaves the engine, runs its loop in Python and enters the engine again
(:meth:`pyemu.accel.tcg.block_gate.BlockGate.poll_halts_in_engine`).

And two for pyemu's TLB-fill hook (:mod:`pyemu.accel.tcg.tlb_fill`), which fills ~700k entries in a PVH
boot: Unicorn restores RIP and the lazy flags before every hook call (a look-up of the running block
among all blocks), which the hook does not need when it reads its registers in place
(``fill-without-state-restore``, switched on per engine with ``uc_pyemu_native_events``); and a hook could not say how large the guest's page is, so only a
second walk by Unicorn's own MMU noted large pages for INVLPG (``fill-page-size`` takes the size from two
permission bits). Together with the hook setting the accessed/dirty bits itself, a PVH boot went from
2.45 to 2.26 s (interleaved medians of 10; QEMU 2.41 s in the same rounds).

And one for pyemu's block hook, which covers every address: after each translation Unicorn recorded the
block's range in the hook's hash table (a malloc'd entry and a look-up per block, ~75k in a boot) so that
deleting the hook could retranslate just those blocks. ``global-hooks-keep-no-regions`` records nothing
for a hook over all addresses, and ``global-hook-delete-flushes`` drops every block when such a hook is
deleted (pyemu deletes it only with its engine). PVH boot, interleaved medians of 12: 2.26 -> 2.17 s.

And one correctness gap of Unicorn's own (QEMU has it right): self-modifying-code checks on stores. QEMU keeps
every store to a RAM page that holds translated code on the slow path, in every TLB entry that maps the page.
Unicorn makes a not-executable entry's stores fast after its first one, and when a page gets code only
re-arms the entry of the code's own virtual page, so code rewritten through a second mapping (Linux's
not-executable mapping of a module being loaded, the direct map) could run as its old bytes. The
``page-has-code``, ``stores-to-code-stay-checked`` and ``protect-code-in-every-mapping`` patches restore
QEMU's rule (:mod:`pyemu.accel.tcg.tlb_fill` has the story).

And one that matters as soon as a device runs beside the vCPU: QEMU 5.0's TCG emits a guest's barriers
(MFENCE, and every locked instruction, which x86 defines as a full barrier) only in its parallel mode,
which Unicorn never uses -- one vCPU thread needs no barrier among vCPUs. But pyemu's devices are other
host threads, and virtio's notification suppression is a store-then-load handshake on each side
(``smp_mb()`` between them; Linux's is ``lock add $0, -4(%rsp)``): without a host barrier the host's
store buffer lets the guest's load pass its store, both sides read the old values, and a kick or an
interrupt is lost (a stalled queue). Measured with the store-buffering litmus test of
tests/guest/test_tcg_memory_ordering.py: 4-15% of overlapping iterations had both sides miss each
other's store, with MFENCE, ``lock add`` or XCHG as the guest's barrier. The ``guest-fences-are-host-fences``,
``locked-ops-are-host-fences`` and ``locked-cmpxchg8b-is-a-host-fence`` patches emit the host barrier
(``lock or $0, (%rsp)``) for MFENCE and after each locked read-modify-write; the read-modify-write itself
needs no atomicity, as only one engine runs at a time and devices never modify guest memory that way.

Measured, PVH boot of Debian's kernel to /init and power-off (``benchmarks/boot.py``, same run, QEMU
2.0 s): 4.78 s on PyPI's library; 3.79 s with the two exit-check patches; 3.52 s with the TLB patch
too; 3.15 s with the conditional gate. The tight ``dec/jnz`` loop of ``benchmarks/tcg_cpu.py``: see
README.md.

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

import re
from dataclasses import dataclass
from pathlib import Path

from pyemu.accel.tcg.errors import EngineBuildError
from pyemu.system.digest import sha256

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

CODE_PAGE_TLB_SLOTS_ONLY = SourcePatch(
    name="code-page-tlb-slots-only",
    path="qemu/accel/tcg/cputlb.c",
    # tlb_reset_dirty_by_vaddr's loop over every entry of every main TLB: only the covered pages' slots.
    pattern=(r"^(\s+)unsigned int n = tlb_n_entries\(&env_tlb\(env\)->f\[mmu_idx\]\);\n\n"
             r"\1for \(i = 0; i < n; i\+\+\) \{\n"
             r"\1    tlb_reset_dirty_range_by_vaddr_locked\(uc, &env_tlb\(env\)->f\[mmu_idx\]\.table\[i\],\n"
             r"(\s+)start1, length\);\n"
             r"\1\}\n"),
    replacement=(r"\1target_ulong page;\n\n"
                 r"\1/* pyemu: the main TLB is direct-mapped by virtual page, so only the slots of the covered\n"
                 r"\1 * pages can hold them (the victim TLB below is still searched whole). */\n"
                 r"\1for (page = start1; page - start1 < length; page += TARGET_PAGE_SIZE) {\n"
                 r"\1    tlb_reset_dirty_range_by_vaddr_locked(uc, tlb_entry(env, mmu_idx, page),\n"
                 r"\2start1, length);\n"
                 r"\1}\n"),
    count=1,
)

GATE_FIELDS = SourcePatch(
    name="gate-fields",
    path="include/uc_priv.h",
    pattern=r"^(    bool skip_sync_pc_on_exit;\n)(\};)",
    replacement=(r"\1"
                 r"    /* pyemu: the block hook runs only when *pyemu_attention != 0 or **pyemu_watched !=\n"
                 r"     * *pyemu_seen; every block stores its start in *pyemu_last_block after it. */\n"
                 r"    int32_t *pyemu_attention;\n"
                 r"    uint64_t **pyemu_watched;\n"
                 r"    uint64_t *pyemu_seen;\n"
                 r"    uint64_t *pyemu_last_block;\n"
                 r"    /* pyemu: PYEMU_GATE_* options (uc_pyemu_gate_options). */\n"
                 r"    int32_t pyemu_gate_options;\n"
                 r"\2"),
    count=1,
)

GATE_API = SourcePatch(
    name="gate-api",
    path="uc.c",
    pattern=r"^(UNICORN_EXPORT\nuc_err uc_emu_stop\(uc_engine \*uc\)\n)",
    replacement=(
        "/* pyemu: make the block hook conditional (see uc_struct.pyemu_attention). Call before any code is\n"
        " * translated: the addresses are built into the translated blocks. */\n"
        "UNICORN_EXPORT\n"
        "uc_err uc_pyemu_block_gate(uc_engine *uc, int32_t *attention, uint64_t **watched, uint64_t *seen,\n"
        "                           uint64_t *last_block)\n"
        "{\n"
        "    if (!attention || !watched || !seen || !last_block) {\n"
        "        return UC_ERR_ARG;\n"
        "    }\n"
        "    uc->pyemu_attention = attention;\n"
        "    uc->pyemu_watched = watched;\n"
        "    uc->pyemu_seen = seen;\n"
        "    uc->pyemu_last_block = last_block;\n"
        "    return UC_ERR_OK;\n"
        "}\n"
        "\n"
        "/* pyemu: PYEMU_GATE_CR4_NOTIFY (1): blocks carry no CR4 watch; the CR4 write helper sets\n"
        " * *pyemu_attention and stores the MOV's address in *pyemu_last_block instead. PYEMU_GATE_TRACK_BLOCKS\n"
        " * (2): every block stores its start in *pyemu_last_block (for sampling profilers). Like\n"
        " * uc_pyemu_block_gate, before any code is translated. */\n"
        "UNICORN_EXPORT\n"
        "uc_err uc_pyemu_gate_options(uc_engine *uc, int32_t options)\n"
        "{\n"
        "    if (!uc->pyemu_attention || (options & ~3)) {\n"
        "        return UC_ERR_ARG;\n"
        "    }\n"
        "    uc->pyemu_gate_options = options;\n"
        "    return UC_ERR_OK;\n"
        "}\n"
        "\n"
        r"\1"),
    count=1,
)

CONDITIONAL_BLOCK_HOOK = SourcePatch(
    name="conditional-block-hook",
    path="qemu/accel/tcg/translator.c",
    pattern=(r"^    if \(HOOK_EXISTS_BOUNDED\(uc, UC_HOOK_BLOCK, tb->pc\)\) \{\n"
             r"        ops->pc_sync\(db, cpu\);\n"
             r"        prev_op = tcg_last_op\(tcg_ctx\);\n"
             r"        block_hook = true;\n"
             r"        gen_uc_tracecode\(tcg_ctx, 0xf8f8f8f8, UC_HOOK_BLOCK_IDX, uc, db->pc_first\);\n"
             r"    \}\n"),
    replacement=(
        "    if (HOOK_EXISTS_BOUNDED(uc, UC_HOOK_BLOCK, tb->pc)) {\n"
        "        TCGLabel *pyemu_call = NULL, *pyemu_skip = NULL;\n"
        "        if (uc->pyemu_attention) {\n"
        "            /* pyemu: call the hook only when *attention != 0 or **watched != *seen. */\n"
        "            TCGv_ptr where = tcg_const_ptr(tcg_ctx, uc->pyemu_attention);\n"
        "            TCGv_i32 attention = tcg_temp_new_i32(tcg_ctx);\n"
        "            TCGv_ptr watched_at, seen_at, watched;\n"
        "            TCGv_i64 value, seen;\n"
        "            pyemu_call = gen_new_label(tcg_ctx);\n"
        "            pyemu_skip = gen_new_label(tcg_ctx);\n"
        "            tcg_gen_ld_i32(tcg_ctx, attention, where, 0);\n"
        "            tcg_gen_brcondi_i32(tcg_ctx, TCG_COND_NE, attention, 0, pyemu_call);\n"
        "            tcg_temp_free_i32(tcg_ctx, attention);\n"
        "            tcg_temp_free_ptr(tcg_ctx, where);\n"
        "            if (uc->pyemu_gate_options & 1) {  /* CR4 writes set attention themselves */\n"
        "                tcg_gen_br(tcg_ctx, pyemu_skip);\n"
        "            } else {\n"
        "            watched_at = tcg_const_ptr(tcg_ctx, uc->pyemu_watched);\n"
        "            seen_at = tcg_const_ptr(tcg_ctx, uc->pyemu_seen);\n"
        "            watched = tcg_temp_new_ptr(tcg_ctx);\n"
        "            value = tcg_temp_new_i64(tcg_ctx);\n"
        "            seen = tcg_temp_new_i64(tcg_ctx);\n"
        "            tcg_gen_ld_ptr(tcg_ctx, watched, watched_at, 0);\n"
        "            tcg_gen_ld_i64(tcg_ctx, value, watched, 0);\n"
        "            tcg_gen_ld_i64(tcg_ctx, seen, seen_at, 0);\n"
        "            tcg_gen_brcond_i64(tcg_ctx, TCG_COND_EQ, value, seen, pyemu_skip);\n"
        "            tcg_temp_free_i64(tcg_ctx, seen);\n"
        "            tcg_temp_free_i64(tcg_ctx, value);\n"
        "            tcg_temp_free_ptr(tcg_ctx, watched);\n"
        "            tcg_temp_free_ptr(tcg_ctx, seen_at);\n"
        "            tcg_temp_free_ptr(tcg_ctx, watched_at);\n"
        "            }\n"
        "            gen_set_label(tcg_ctx, pyemu_call);\n"
        "        }\n"
        "        ops->pc_sync(db, cpu);\n"
        "        prev_op = tcg_last_op(tcg_ctx);\n"
        "        block_hook = true;\n"
        "        gen_uc_tracecode(tcg_ctx, 0xf8f8f8f8, UC_HOOK_BLOCK_IDX, uc, db->pc_first);\n"
        "        if (pyemu_skip) {\n"
        "            TCGv_ptr where;\n"
        "            TCGv_i64 start;\n"
        "            gen_set_label(tcg_ctx, pyemu_skip);\n"
        "            if (!(uc->pyemu_gate_options & 1) || (uc->pyemu_gate_options & 2)) {\n"
        "                where = tcg_const_ptr(tcg_ctx, uc->pyemu_last_block);\n"
        "                start = tcg_const_i64(tcg_ctx, db->pc_first);\n"
        "                tcg_gen_st_i64(tcg_ctx, start, where, 0);\n"
        "                tcg_temp_free_i64(tcg_ctx, start);\n"
        "                tcg_temp_free_ptr(tcg_ctx, where);\n"
        "            }\n"
        "        }\n"
        "    }\n"),
    count=1,
)

ARCH_CAPABILITIES_FIELD = SourcePatch(
    name="arch-capabilities-field",
    path="include/uc_priv.h",
    pattern=r"^(    uint64_t \*pyemu_last_block;\n)",
    replacement=(r"\1"
                 r"    /* pyemu: what RDMSR of IA32_ARCH_CAPABILITIES (0x10a) reads; 0 until pyemu sets it. */\n"
                 r"    uint64_t pyemu_arch_capabilities;\n"),
    count=1,
)

ARCH_CAPABILITIES_API = SourcePatch(
    name="arch-capabilities-api",
    path="uc.c",
    pattern=r"^(UNICORN_EXPORT\nuc_err uc_emu_stop\(uc_engine \*uc\)\n)",
    replacement=(
        "/* pyemu: the value the guest reads from IA32_ARCH_CAPABILITIES (the CPU's \"not affected\" bits). */\n"
        "UNICORN_EXPORT\n"
        "uc_err uc_pyemu_set_arch_capabilities(uc_engine *uc, uint64_t value)\n"
        "{\n"
        "    uc->pyemu_arch_capabilities = value;\n"
        "    return UC_ERR_OK;\n"
        "}\n"
        "\n"
        r"\1"),
    count=1,
)

RDMSR_ARCH_CAPABILITIES = SourcePatch(
    name="rdmsr-arch-capabilities",
    path="qemu/target/i386/misc_helper.c",
    # helper_rdmsr's case list (QEMU 5.0 reads this MSR as 0, like every MSR it does not know).
    pattern=r"^(     case MSR_IA32_UCODE_REV:\n)",
    replacement=("    case MSR_IA32_ARCH_CAPABILITIES:\n"
                 "        val = env->uc->pyemu_arch_capabilities;  /* pyemu */\n"
                 "        break;\n"
                 r"\1"),
    count=1,
)

NATIVE_EVENT_FIELDS = SourcePatch(
    name="native-event-fields",
    path="include/uc_priv.h",
    pattern=r"^(    uint64_t pyemu_arch_capabilities;\n)",
    replacement=(r"\1"
                 r"    /* pyemu: exceptions (not INT n) whose vector bit is set here are delivered by QEMU's own\n"
                 r"     * x86_cpu_do_interrupt instead of the UC_HOOK_INTR hooks, while the CR4 the block gate\n"
                 r"     * watches is what it last saw. pyemu_native_delivered counts them and native SYSCALLs. */\n"
                 r"    uint64_t pyemu_native_vectors;\n"
                 r"    uint64_t pyemu_native_delivered;\n"
                 r"    /* pyemu: when a UC_HOOK_TLB_FILL hook misses after switching the engine to UC_TLB_CPU,\n"
                 r"     * the CPU's own MMU fills the entry (or raises the #PF) at once, inside the run. */\n"
                 r"    bool pyemu_fill_fallback;\n"
                 r"    /* pyemu: the TLB-fill hooks read no state that cpu_restore_state would bring up to date\n"
                 r"     * (RIP, the lazy flags), so a fill does not look the running block up to restore it. */\n"
                 r"    bool pyemu_fill_unsynced;\n"
                 r"    /* pyemu: SYSCALL in IA-32e mode with EFER.SCE does what the CPU does, not the hooks. */\n"
                 r"    bool pyemu_native_syscall;\n"),
    count=1,
)

NATIVE_EVENT_API = SourcePatch(
    name="native-event-api",
    path="uc.c",
    pattern=r"^(UNICORN_EXPORT\nuc_err uc_emu_stop\(uc_engine \*uc\)\n)",
    replacement=(
        "/* pyemu: which exception vectors QEMU delivers itself (bit n = vector n; 0: every one goes to the\n"
        " * INTR hooks, as in Unicorn); flags bit 0: a TLB-fill hook's hand-over to the CPU's MMU happens\n"
        " * inside the run; bit 1: SYSCALL (IA-32e mode) is the CPU's, not the hooks'; bit 2: the TLB-fill\n"
        " * hooks need no restored CPU state (no cpu_restore_state before them). */\n"
        "UNICORN_EXPORT\n"
        "uc_err uc_pyemu_native_events(uc_engine *uc, uint64_t vectors, uint32_t flags)\n"
        "{\n"
        "    if (flags & ~7u) {\n"
        "        return UC_ERR_ARG;\n"
        "    }\n"
        "    uc->pyemu_native_vectors = vectors;\n"
        "    uc->pyemu_fill_fallback = flags & 1;\n"
        "    uc->pyemu_native_syscall = (flags >> 1) & 1;\n"
        "    uc->pyemu_fill_unsynced = (flags >> 2) & 1;\n"
        "    return UC_ERR_OK;\n"
        "}\n"
        "\n"
        "/* pyemu: how many exceptions and SYSCALLs QEMU did itself since the engine was made. */\n"
        "UNICORN_EXPORT\n"
        "uint64_t uc_pyemu_native_delivered(uc_engine *uc)\n"
        "{\n"
        "    return uc->pyemu_native_delivered;\n"
        "}\n"
        "\n"
        r"\1"),
    count=1,
)

NATIVE_EXCEPTION_DELIVERY = SourcePatch(
    name="native-exception-delivery",
    path="qemu/accel/tcg/cpu-exec.c",
    # cpu_handle_exception, before Unicorn hands the exception to its INTR hooks.
    pattern=r"^(        // Unicorn: call registered interrupt callbacks\n        catched = false;\n)",
    replacement=(
        "#if defined(TARGET_X86_64)\n"
        "        {\n"
        "            /* pyemu: deliver through the guest's IDT here, as QEMU does, for the chosen vectors. */\n"
        "            CPUArchState *pyemu_env = cpu->env_ptr;\n"
        "            int vector = cpu->exception_index;\n"
        "            if (vector < 64 && (uc->pyemu_native_vectors >> vector & 1) && !pyemu_env->exception_is_int\n"
        "                && (!uc->pyemu_watched || **uc->pyemu_watched == *uc->pyemu_seen)) {\n"
        "                CPU_GET_CLASS(cpu)->do_interrupt(cpu);\n"
        "                cpu->exception_index = -1;\n"
        "                uc->pyemu_native_delivered++;\n"
        "                *ret = EXCP_INTERRUPT;\n"
        "                return false;\n"
        "            }\n"
        "        }\n"
        "#endif\n"
        r"\1"),
    count=1,
)

FILL_FALLBACK_IN_RUN = SourcePatch(
    name="fill-fallback-in-run",
    path="qemu/softmmu/unicorn_vtlb.c",
    pattern=r"^(tlb_miss:\n)",
    replacement=(
        r"\1"
        "    if (handled && uc->pyemu_fill_fallback && cs->cc->tlb_fill != unicorn_fill_tlb) {\n"
        "        /* pyemu: the hook handed the access to the CPU's MMU (UC_TLB_CPU): fill or fault now. */\n"
        "        return cs->cc->tlb_fill(cs, address, size, rw, mmu_idx, probe, retaddr);\n"
        "    }\n"),
    count=1,
)

FILL_WITHOUT_STATE_RESTORE = SourcePatch(
    name="fill-without-state-restore",
    path="qemu/softmmu/unicorn_vtlb.c",
    # unicorn_fill_tlb restores RIP and the lazy flags (cpu_restore_state: a lookup of the running block
    # in the tree of all blocks, then a walk of its instruction data) before every TLB-fill hook, so a
    # hook may read them. pyemu's hook (tlb_fill.c) reads the control registers, EFER, CS and
    # env->eflags (VM, AC) in place, always current (uc_reg_read of RFLAGS would compute stale lazy
    # flags); a fill that faults restores the state on its way out (cpu_loop_exit_restore). ~720k fills
    # in a PVH boot of Debian's kernel.
    pattern=r"^    cpu_restore_state\(cs, retaddr, false\);\n(\n    HOOK_FOREACH\(uc, hook, UC_HOOK_TLB_FILL\) \{\n)",
    replacement=("    if (!uc->pyemu_fill_unsynced) {  /* pyemu */\n"
                 "        cpu_restore_state(cs, retaddr, false);\n"
                 "    }\n"
                 r"\1"),
    count=1,
)

FILL_PAGE_SIZE = SourcePatch(
    name="fill-page-size",
    path="qemu/softmmu/unicorn_vtlb.c",
    # A TLB-fill hook can only give a page and its permissions, so every entry is a 4 KiB page and
    # QEMU's note of large pages (INVLPG of any address in a 2 MiB or 1 GiB page flushes every entry it
    # made) was only made by a second walk with Unicorn's own MMU. pyemu's hook (tlb_fill.c) puts the
    # guest's page size into two permission bits no Unicorn check looks at.
    pattern=(r"^        tlb_set_page\(cs, address & TARGET_PAGE_MASK, e\.paddr & TARGET_PAGE_MASK, "
             r"perms_to_prot\(e\.perms\), mmu_idx, TARGET_PAGE_SIZE\);\n"),
    replacement=("        tlb_set_page(cs, address & TARGET_PAGE_MASK, e.paddr & TARGET_PAGE_MASK,\n"
                 "                     perms_to_prot(e.perms), mmu_idx,\n"
                 "                     (e.perms & 0x200) ? (1u << 30)  /* pyemu: the hook's page size */\n"
                 "                              : (e.perms & 0x100) ? (1u << 21) : TARGET_PAGE_SIZE);\n"),
    count=1,
)

GLOBAL_HOOKS_KEEP_NO_REGIONS = SourcePatch(
    name="global-hooks-keep-no-regions",
    path="include/uc_priv.h",
    # After translating each block, Unicorn records its address range in a hash table of every
    # UC_HOOK_BLOCK/UC_HOOK_CODE hook that covers it (a malloc'd entry per block), so that deleting the
    # hook can retranslate just those blocks. pyemu's block hook covers all addresses (begin > end) and is
    # deleted only with its engine: ~75k entries and a hash look-up per translated block of a Linux boot,
    # ~1% of its host samples. A hook over everything records nothing; deleting it flushes every block
    # (global-hook-delete-flushes).
    pattern=(r"^(static inline void hooked_regions_check_single\(struct list_item \*cur,\n"
             r"                                               uint64_t start, uint64_t length\)\n"
             r"\{\n    while \(cur != NULL\) \{\n)"
             r"        if \(HOOK_BOUND_CHECK\(\(struct hook \*\)cur->data, start\)\) \{\n"),
    replacement=(r"\1"
                 "        if (HOOK_BOUND_CHECK((struct hook *)cur->data, start) &&\n"
                 "            ((struct hook *)cur->data)->begin <= ((struct hook *)cur->data)->end) {  /* pyemu */\n"),
    count=1,
)

GLOBAL_HOOK_DELETE_FLUSHES = SourcePatch(
    name="global-hook-delete-flushes",
    path="uc.c",
    pattern=(r"^(        if \(list_exists\(&uc->hook\[i\], \(void \*\)hook\)\) \{\n)"
             r"(            g_hash_table_foreach\(hook->hooked_regions, hook_invalidate_region,\n)"),
    replacement=(r"\1"
                 "            if (hook->begin > hook->end && (i == UC_HOOK_BLOCK_IDX || i == UC_HOOK_CODE_IDX)) {\n"
                 "                uc->tb_flush(uc);  /* pyemu: its blocks were not recorded */\n"
                 "            }\n"
                 r"\2"),
    count=1,
)

CR4_WRITE_NOTIFIES_GATE = SourcePatch(
    name="cr4-write-notifies-gate",
    path="qemu/target/i386/misc_helper.c",
    # The CR4 guard (pyemu.accel.tcg.cr4_guard) checks a guest's MOV to CR4 at the next block start. Every
    # translated block used to watch env->cr[4] for it (two dependent loads, a compare and a branch at each
    # block entry, and a store of the block's start for the guard to find the MOV). With
    # PYEMU_GATE_CR4_NOTIFY the write helper itself asks for the gate (a MOV to CR4 ends its block, so the
    # next block start is the first point after it) and records where the MOV is (RIP was synced to it
    # before the helper call).
    pattern=r"^(    case 4:\n        cpu_x86_update_cr4\(env, \(uint32_t\)t0\);\n)",
    replacement=(r"\1"
                 "        if (env->uc->pyemu_gate_options & 1) {  /* pyemu */\n"
                 "            target_ulong pyemu_mov = env->eip + env->segs[R_CS].base;\n"
                 "            if (!(env->hflags & HF_CS64_MASK)) {\n"
                 "                pyemu_mov = (uint32_t)pyemu_mov;\n"
                 "            }\n"
                 "            *env->uc->pyemu_last_block = pyemu_mov;\n"
                 "            __atomic_store_n(env->uc->pyemu_attention, 1, __ATOMIC_SEQ_CST);\n"
                 "        }\n"),
    count=1,
)

NATIVE_SYSCALL = SourcePatch(
    name="native-syscall",
    path="qemu/target/i386/seg_helper.c",
    # Unicorn's helper_syscall only calls the UC_HOOK_INSN hooks; this runs the instruction (Intel SDM
    # vol. 2B "SYSCALL", IA-32e mode) when pyemu asks for it. Outside IA-32e mode, or with EFER.SCE clear
    # (#UD), the hooks still decide.
    pattern=(r"^(    // Unicorn: call registered syscall hooks\n    struct hook \*hook;\n    uc_engine \*uc = env->uc;\n"
             r"    bool synced = false;\n)"),
    replacement=(
        r"\1"
        "\n"
        "    if (uc->pyemu_native_syscall && (env->efer & MSR_EFER_SCE) && (env->hflags & HF_LMA_MASK)) {\n"
        "        /* pyemu: RCX = next RIP, R11 = RFLAGS without RF, RFLAGS &= ~(FMASK | RF), flat DPL-0\n"
        "         * CS (64-bit) and SS from STAR[47:32], CPL 0, RIP = LSTAR (CSTAR from compatibility mode). */\n"
        "        uint32_t rflags = cpu_compute_eflags(env);\n"
        "        int selector = (env->star >> 32) & 0xfffc;\n"
        "        target_ulong entry = (env->hflags & HF_CS64_MASK) ? env->lstar : env->cstar;\n"
        "        env->regs[R_ECX] = env->eip + next_eip_addend;\n"
        "        env->regs[11] = rflags & ~RF_MASK;\n"
        "        cpu_load_eflags(env, rflags & ~((uint32_t)env->fmask | RF_MASK),\n"
        "                        ~(CC_O | CC_S | CC_Z | CC_A | CC_P | CC_C | DF_MASK));\n"
        "        cpu_x86_load_seg_cache(env, R_CS, selector, 0, 0xffffffff, DESC_G_MASK | DESC_L_MASK |\n"
        "                               DESC_P_MASK | DESC_S_MASK | DESC_CS_MASK | DESC_R_MASK | DESC_A_MASK);\n"
        "        cpu_x86_load_seg_cache(env, R_SS, selector + 8, 0, 0xffffffff, DESC_G_MASK | DESC_B_MASK |\n"
        "                               DESC_P_MASK | DESC_S_MASK | DESC_W_MASK | DESC_A_MASK);\n"
        "        env->eip = entry;\n"
        "        uc->pyemu_native_delivered++;\n"
        "        return;\n"
        "    }\n"),
    count=1,
)

PAGE_HAS_CODE = SourcePatch(
    name="page-has-code",
    path="qemu/accel/tcg/translate-all.c",
    pattern=r"^(static inline PageDesc \*page_find\(struct uc_struct \*uc, tb_page_addr_t index\)\n\{\n"
            r"    return page_find_alloc\(uc, index, 0\);\n\}\n)",
    replacement=(r"\1"
                 "\n"
                 "/* pyemu: whether any translation block still holds code from the RAM page at addr. */\n"
                 "bool pyemu_page_has_code(struct uc_struct *uc, tb_page_addr_t addr)\n"
                 "{\n"
                 "    PageDesc *p = page_find(uc, addr >> TARGET_PAGE_BITS);\n"
                 "    return p != NULL && p->first_tb != 0;\n"
                 "}\n"),
    count=1,
)

STORES_TO_CODE_STAY_CHECKED = SourcePatch(
    name="stores-to-code-stay-checked",
    path="qemu/accel/tcg/cputlb.c",
    # notdirty_write: Unicorn makes an entry's stores fast after its first one whenever the entry is not
    # executable; QEMU only once the page holds no more code. A writable but not executable mapping of a
    # code page (Linux loads a module through an NX mapping of pages a freed module's code was translated
    # from) must keep checking, or its later stores leave stale translations behind.
    pattern=r"^(            !\(tlbe->addr_code != -1\) &&\n)",
    replacement=r"\1            !pyemu_page_has_code(cpu->uc, ram_addr & TARGET_PAGE_MASK) &&\n",
    count=1,
)

PAGE_HAS_CODE_DECLARATION = SourcePatch(
    name="page-has-code-declaration",
    path="qemu/accel/tcg/cputlb.c",
    pattern=r"^(static void notdirty_write\(CPUState \*cpu, vaddr mem_vaddr, unsigned size,\n)",
    replacement=r"bool pyemu_page_has_code(struct uc_struct *uc, tb_page_addr_t addr);  /* pyemu */\n\n\1",
    count=1,
)

PROTECT_CODE_IN_EVERY_MAPPING = SourcePatch(
    name="protect-code-in-every-mapping",
    path="qemu/accel/tcg/cputlb.c",
    # tlb_protect_code runs when a RAM page gets its first translation block. Unicorn's is empty: only
    # the entry of the code's own virtual page is made to check stores again (tb_gen_code). QEMU marks
    # every TLB entry that maps the page, which also covers aliases (the direct map, another vmalloc
    # mapping) whose stores were already fast.
    pattern=(r"^(void tlb_protect_code\(struct uc_struct \*uc, ram_addr_t ram_addr\)\n\{\n"
             r"    cpu_physical_memory_test_and_clear_dirty\(ram_addr, TARGET_PAGE_SIZE,\n"
             r"                                             DIRTY_MEMORY_CODE\);\n)"),
    replacement=(r"\1"
                 "    if (uc->cpu) {  /* pyemu: every entry of this CPU that maps the page checks stores */\n"
                 "        tlb_reset_dirty(uc->cpu, (uintptr_t)qemu_map_ram_ptr(uc, NULL, ram_addr), TARGET_PAGE_SIZE);\n"
                 "    }\n"),
    count=1,
)

IRQ_FIELDS = SourcePatch(
    name="irq-fields",
    path="include/uc_priv.h",
    pattern=r"^(    bool pyemu_native_syscall;\n)",
    replacement=(r"\1"
                 r"    /* pyemu: external interrupts delivered by QEMU's own hardirq path. The target sets\n"
                 r"     * pyemu_raise_interrupt (request one at the next block boundary where IF=1); at that\n"
                 r"     * boundary pyemu_irq_acknowledge(pyemu_irq_opaque) names the vector, or -1 for none. */\n"
                 r"    void (*pyemu_raise_interrupt)(struct uc_struct *uc);\n"
                 r"    int (*pyemu_irq_acknowledge)(void *opaque);\n"
                 r"    void *pyemu_irq_opaque;\n"),
    count=1,
)

IRQ_API = SourcePatch(
    name="irq-api",
    path="uc.c",
    pattern=r"^(UNICORN_EXPORT\nuc_err uc_emu_stop\(uc_engine \*uc\)\n)",
    replacement=(
        "/* pyemu: where the vector of a requested external interrupt comes from (NULL: requests deliver\n"
        " * nothing). */\n"
        "UNICORN_EXPORT\n"
        "uc_err uc_pyemu_interrupt_controller(uc_engine *uc, int (*acknowledge)(void *), void *opaque)\n"
        "{\n"
        "    uc->pyemu_irq_acknowledge = acknowledge;\n"
        "    uc->pyemu_irq_opaque = opaque;\n"
        "    return UC_ERR_OK;\n"
        "}\n"
        "\n"
        "/* pyemu: request an external interrupt, taken at the next block boundary where the CPU accepts one\n"
        " * (IF=1, no interrupt shadow). Only from the thread running the engine (its hooks). */\n"
        "UNICORN_EXPORT\n"
        "uc_err uc_pyemu_raise_interrupt(uc_engine *uc)\n"
        "{\n"
        "    if (!uc->pyemu_raise_interrupt) {\n"
        "        return UC_ERR_ARCH;\n"
        "    }\n"
        "    uc->pyemu_raise_interrupt(uc);\n"
        "    return UC_ERR_OK;\n"
        "}\n"
        "\n"
        r"\1"),
    count=1,
)

IRQ_RAISE = SourcePatch(
    name="irq-raise",
    path="qemu/target/i386/unicorn.c",
    pattern=r"^(void uc_init\(struct uc_struct \*uc\)\n\{\n)",
    replacement=(
        "/* pyemu: QEMU's CPU_INTERRUPT_HARD, and the exit of the running block chain that makes the CPU loop\n"
        " * look at it (what QEMU's tcg_handle_interrupt does for its own thread). */\n"
        "static void pyemu_raise_interrupt(struct uc_struct *uc)\n"
        "{\n"
        "    uc->cpu->interrupt_request |= CPU_INTERRUPT_HARD;\n"
        "    atomic_set(&cpu_neg(uc->cpu)->icount_decr.u16.high, -1);\n"
        "}\n"
        "\n"
        r"\1"
        "    uc->pyemu_raise_interrupt = pyemu_raise_interrupt;\n"),
    count=1,
)

IRQ_ACKNOWLEDGE = SourcePatch(
    name="irq-acknowledge",
    path="qemu/target/i386/seg_helper.c",
    # x86_cpu_exec_interrupt's CPU_INTERRUPT_HARD case, where QEMU asks its interrupt controller.
    pattern=r"^(        // intno = cpu_get_pic_interrupt\(env\);\n        intno = 0;\n)",
    replacement=(
        r"\1"
        "        if (cs->uc->pyemu_irq_acknowledge) {\n"
        "            /* pyemu: the interrupt controller names the vector (and moves it to in-service). */\n"
        "            intno = cs->uc->pyemu_irq_acknowledge(cs->uc->pyemu_irq_opaque);\n"
        "            if (intno < 0) {\n"
        "                break;\n"
        "            }\n"
        "        }\n"),
    count=1,
)

IDT_ERROR_CODE_LONG_MODE = SourcePatch(
    name="idt-error-code-long-mode",
    path="qemu/target/i386/seg_helper.c",
    # do_interrupt64's IDT checks (limit, gate type, DPL, present): QEMU 5.0 reports vector * 16 + 2 and
    # never the EXT bit. The error code names the IDT entry as in every mode (vector * 8, IDT bit 1), with
    # EXT (bit 0) set unless INT n/INT3/INTO caused the delivery (Intel SDM vol. 3A, 6.13 "Error Code").
    # Since the engine delivers page faults and external interrupts itself, a guest sees these codes.
    pattern=r"^(        raise_exception_err\(env, EXCP0[DB]_[A-Z]+, )intno \* 16 \+ 2\);\n",
    replacement=r"\1intno * 8 + 2 + (is_int ? 0 : 1));  /* pyemu */\n",
    count=4,
)

IDT_ERROR_CODE_EXT = SourcePatch(
    name="idt-error-code-ext",
    path="qemu/target/i386/seg_helper.c",
    # The same checks in do_interrupt_protected (and do_interrupt_real's IVT limit, where no error code
    # is pushed): the entry is right, the EXT bit is missing.
    pattern=r"^(        (?:    )?raise_exception_err\(env, EXCP0[DB]_[A-Z]+, )intno \* 8 \+ 2\);\n",
    replacement=r"\1intno * 8 + 2 + (is_int ? 0 : 1));  /* pyemu */\n",
    count=6,
)

PAUSE_FIELDS = SourcePatch(
    name="pause-fields",
    path="include/uc_priv.h",
    pattern=r"^(    void \*pyemu_irq_opaque;\n)",
    replacement=(r"\1"
                 r"    /* pyemu: called at every PAUSE, on the engine's thread, before the CPU loop is left as\n"
                 r"     * QEMU's do_pause leaves it; it may stop the run (uc_emu_stop). */\n"
                 r"    void (*pyemu_on_pause)(struct uc_struct *uc, void *opaque);\n"
                 r"    void *pyemu_pause_opaque;\n"),
    count=1,
)

PAUSE_API = SourcePatch(
    name="pause-api",
    path="uc.c",
    pattern=r"^(UNICORN_EXPORT\nuc_err uc_emu_stop\(uc_engine \*uc\)\n)",
    replacement=(
        "/* pyemu: a function the engine calls at every PAUSE (NULL: none). */\n"
        "UNICORN_EXPORT\n"
        "uc_err uc_pyemu_on_pause(uc_engine *uc, void (*on_pause)(struct uc_struct *, void *), void *opaque)\n"
        "{\n"
        "    uc->pyemu_on_pause = on_pause;\n"
        "    uc->pyemu_pause_opaque = opaque;\n"
        "    return UC_ERR_OK;\n"
        "}\n"
        "\n"
        r"\1"),
    count=1,
)

PAUSE_HOOK = SourcePatch(
    name="pause-hook",
    path="qemu/target/i386/misc_helper.c",
    # helper_pause, after RIP moved past the PAUSE: QEMU's do_pause then leaves the CPU loop ("just let
    # another CPU run"), which in Unicorn only re-enters it.
    pattern=r"^(    env->eip \+= next_eip_addend;\n\n    do_pause\(cpu\);\n)",
    replacement=("    env->eip += next_eip_addend;\n"
                 "    if (env->uc->pyemu_on_pause) {  /* pyemu */\n"
                 "        env->uc->pyemu_on_pause(env->uc, env->uc->pyemu_pause_opaque);\n"
                 "    }\n"
                 "\n"
                 "    do_pause(cpu);\n"),
    count=1,
)

HALT_FIELDS = SourcePatch(
    name="halt-fields",
    path="include/uc_priv.h",
    pattern=r"^(    void \*pyemu_pause_opaque;\n)",
    replacement=(r"\1"
                 r"    /* pyemu: called at a HLT with IF=1, on the engine's thread, after RIP moved past it; it may\n"
                 r"     * wait a little for an interrupt and returns 1 when one is pending (the CPU then takes it\n"
                 r"     * instead of halting), 0 to halt as QEMU does. */\n"
                 r"    int (*pyemu_on_halt)(struct uc_struct *uc, void *opaque);\n"
                 r"    void *pyemu_halt_opaque;\n"),
    count=1,
)

HALT_API = SourcePatch(
    name="halt-api",
    path="uc.c",
    pattern=r"^(UNICORN_EXPORT\nuc_err uc_emu_stop\(uc_engine \*uc\)\n)",
    replacement=(
        "/* pyemu: a function the engine calls at every HLT with IF=1 (NULL: none). */\n"
        "UNICORN_EXPORT\n"
        "uc_err uc_pyemu_on_halt(uc_engine *uc, int (*on_halt)(struct uc_struct *, void *), void *opaque)\n"
        "{\n"
        "    uc->pyemu_on_halt = on_halt;\n"
        "    uc->pyemu_halt_opaque = opaque;\n"
        "    return UC_ERR_OK;\n"
        "}\n"
        "\n"
        r"\1"),
    count=1,
)

HALT_HOOK = SourcePatch(
    name="halt-hook",
    path="qemu/target/i386/misc_helper.c",
    # helper_hlt, after RIP moved past the HLT. An interrupt the function saw pending is raised as the
    # block gate raises one (CPU_INTERRUPT_HARD), and the CPU loop, entered again with no exception,
    # takes it at once: the return address is the instruction after the HLT, as when a halted CPU wakes.
    pattern=r"^(    env->eip \+= next_eip_addend;\n\n    do_hlt\(cpu\);\n)",
    replacement=("    env->eip += next_eip_addend;\n"
                 "    if (env->uc->pyemu_on_halt && env->uc->pyemu_raise_interrupt && !env->uc->stop_request\n"
                 "        && (env->eflags & IF_MASK)\n"
                 "        && env->uc->pyemu_on_halt(env->uc, env->uc->pyemu_halt_opaque)) {  /* pyemu */\n"
                 "        CPUState *cs = CPU(cpu);\n"
                 "        env->hflags &= ~HF_INHIBIT_IRQ_MASK;\n"
                 "        env->uc->pyemu_raise_interrupt(env->uc);\n"
                 "        cs->exception_index = -1;\n"
                 "        cpu_loop_exit(cs);\n"
                 "    }\n"
                 "\n"
                 "    do_hlt(cpu);\n"),
    count=1,
)

GUEST_FENCES_ARE_HOST_FENCES = SourcePatch(
    name="guest-fences-are-host-fences",
    path="qemu/tcg/tcg-op.c",
    # tcg_gen_mb: MFENCE (and LFENCE/SFENCE, which need no host code on an x86 host) emit the barrier
    # outside the parallel mode too.
    pattern=r"^(void tcg_gen_mb\(TCGContext \*tcg_ctx, TCGBar mb_type\)\n\{\n)    if \(tcg_ctx->tb_cflags & CF_PARALLEL\) \{\n"
            r"        tcg_gen_op1\(tcg_ctx, INDEX_op_mb, mb_type\);\n    \}\n",
    replacement=r"\1    tcg_gen_op1(tcg_ctx, INDEX_op_mb, mb_type);  /* pyemu: devices run beside the vCPU */\n",
    count=1,
)

LOCKED_OPS_ARE_HOST_FENCES = SourcePatch(
    name="locked-ops-are-host-fences",
    path="qemu/tcg/tcg-op.c",
    # The store of each read-modify-write outside the parallel mode (cmpxchg and the other atomic
    # operations, 32 and 64 bits): a full barrier after it, as a locked instruction is.
    pattern=r"^(        |    )(tcg_gen_qemu_st_i(?:32|64)\(tcg_ctx, t2, addr, idx, memop\);\n)",
    replacement=r"\1\2\1tcg_gen_mb(tcg_ctx, TCG_MO_ALL | TCG_BAR_SC);  /* pyemu */\n",
    count=4,
)

LOCKED_CMPXCHG8B_IS_A_HOST_FENCE = SourcePatch(
    name="locked-cmpxchg8b-is-a-host-fence",
    path="qemu/target/i386/translate.c",
    pattern=r"^( +)(gen_helper_cmpxchg(?:16|8)b_unlocked\(tcg_ctx, tcg_ctx->cpu_env, s->A0\);\n)",
    replacement=(r"\1\2\1if (s->prefix & PREFIX_LOCK) {  /* pyemu */\n"
                 r"\1    tcg_gen_mb(tcg_ctx, TCG_MO_ALL | TCG_BAR_SC);\n\1}\n"),
    count=2,
)

LONG_MODE_IGNORES_CS_DS_ES_SS_BASES = SourcePatch(
    name="long-mode-ignores-cs-ds-es-ss-bases",
    path="qemu/target/i386/translate.c",
    # In 64-bit mode a CS, DS, ES or SS segment-override prefix adds no base (the SDM's "segmentation in
    # IA-32e mode": those bases count as 0; only FS and GS add theirs). QEMU 5.0 added the
    # segment's cached base for an explicit override. Linux patches its LOCK prefixes into DS prefixes on
    # a single CPU ("ds cmpxchg" in _raw_spin_lock), and a DS loaded in user mode from a TLS descriptor
    # keeps its base in the kernel: x86 selftest ldt_gdt's timer interrupt then took its spin lock at
    # the lock's address plus the TLS base, faulted, and the guest hung (measured: CR2 - RDI = the test's
    # TLS base, 0x4... + 4, in every hang).
    pattern=(r"^(static void gen_lea_v_seg\(DisasContext \*s, MemOp aflag, TCGv a0,\n +int def_seg, int ovr_seg\)\n"
             r"\{\n    TCGContext \*tcg_ctx = s->uc->tcg_ctx;\n)"),
    replacement=(r"\1\n    if (CODE64(s) && ovr_seg >= 0 && ovr_seg < R_FS) {  /* pyemu */\n"
                 r"        ovr_seg = -1;\n    }\n"),
    count=1,
)

PATCHES: tuple[SourcePatch, ...] = (
    NO_CHECK_AFTER_MEMORY_ACCESS, EXIT_LABEL_FIELD, INLINE_BLOCK_START_CHECK, EXIT_LABEL_AT_BLOCK_END,
    CODE_PAGE_TLB_SLOTS_ONLY, GATE_FIELDS, GATE_API, CONDITIONAL_BLOCK_HOOK, ARCH_CAPABILITIES_FIELD,
    ARCH_CAPABILITIES_API, RDMSR_ARCH_CAPABILITIES, NATIVE_EVENT_FIELDS, NATIVE_EVENT_API,
    NATIVE_EXCEPTION_DELIVERY, FILL_FALLBACK_IN_RUN, FILL_WITHOUT_STATE_RESTORE, FILL_PAGE_SIZE,
    GLOBAL_HOOKS_KEEP_NO_REGIONS, GLOBAL_HOOK_DELETE_FLUSHES, CR4_WRITE_NOTIFIES_GATE,
    NATIVE_SYSCALL,
    PAGE_HAS_CODE, PAGE_HAS_CODE_DECLARATION, STORES_TO_CODE_STAY_CHECKED, PROTECT_CODE_IN_EVERY_MAPPING,
    IRQ_FIELDS, IRQ_API, IRQ_RAISE, IRQ_ACKNOWLEDGE, IDT_ERROR_CODE_LONG_MODE, IDT_ERROR_CODE_EXT, PAUSE_FIELDS,
    PAUSE_API, PAUSE_HOOK, HALT_FIELDS, HALT_API, HALT_HOOK, GUEST_FENCES_ARE_HOST_FENCES, LOCKED_OPS_ARE_HOST_FENCES,
    LOCKED_CMPXCHG8B_IS_A_HOST_FENCE, LONG_MODE_IGNORES_CS_DS_ES_SS_BASES,
)


def apply_patches(source_root: Path) -> None:
    """Patch Unicorn's ``src`` directory in place (``source_root`` holds ``qemu/`` and ``CMakeLists.txt``)."""
    for patch in PATCHES:
        patch.apply(source_root)


def patch_digest() -> str:
    """A short hash of the patch set: part of the build's cache key, so a changed patch rebuilds."""
    digest = sha256(UNICORN_VERSION.encode())
    for patch in PATCHES:
        for part in (patch.name, patch.path, patch.pattern, patch.replacement, str(patch.count)):
            digest.update(part.encode())
            digest.update(b"\0")
    return digest.hexdigest()[:16]
